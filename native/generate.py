"""Generate the C sources of libfastfeat_kernels.so: every Triton kernel specialisation the triton backend
launches for the shipped networks, compiled ahead of time for sm_80 and sm_90, one dispatcher per
(kernel, dtype, target). CMake runs it (``add_custom_command``); it needs no GPU and no CUDA toolkit.

Steps:

1. **Record** the launches the backend makes (``fastfeat.kernels.aot.recording``: the kernels are
   replaced by recorders and ``TritonNet.plan`` runs over empty CPU tensors) for every model of
   ``fastfeat.models.list_models()``, dtype and target, for three plans (only the last layer requested:
   everything fused; every layer requested: nothing fused; the convs plus the last layer: conv without
   ReLU, then ReLU + pool (+ LRN)). Conv, pool and LRN launches are recorded at batch 1 and 16, which
   gives both divisibility-by-16 classes of their pixel counts (their configs do not depend on the
   batch). fc layers are recorded at every batch size class that changes the GEMM's specialisation:
   M == 1 (folded to a constant), M < 16 / M % 16 == 0 / neither, the thin-tile family (M <= 32) or not,
   and every split-K count up to the batch at which split-K stops (``fc_batches``), with both split-K
   reduces (``SPLIT_K_REDUCES``: the GEMM + reduce pair and the GEMM with the reduce folded in).
2. **Choose one config** per specialisation and target: the first config the autotuner's prune hook
   keeps on that target (``aot.build_jobs(one_config=True)``): exactly what ``FASTFEAT_AUTOTUNE=0``
   launches, so the AOT kernels and the Python kernels run the same code on the same inputs.
3. **Compile** each distinct specialisation (``triton_compat.compile_binary``) in worker processes,
   cached under ``<cache>/<hash>/`` where the hash covers the kernel sources, the Triton version and
   this generator (``cache_key``).
4. **Emit** C: each specialisation fills Triton's AOT template (``triton/tools/extra/cuda/compile.c``,
   as ``triton.tools.compile`` does; patched so that a CUDA error is returned, never ``exit()``), and
   ``triton.tools.link`` links the specialisations of one (kernel, dtype, target) into one dispatcher
   ``ff_<family>_<dtype>_<target>(stream, args..., algo_id)`` that picks the variant by the arguments'
   16-divisibility and ==1 hints. ``ff_entries.c`` maps each (family, dtype, target, key) -- the inputs
   of the config choice -- to an algo id; ``entries.json`` is the same list, machine-readable;
   ``ff_networks.inc`` describes each network's fused forward plan for ``fastfeat-layer-bench``.

    python native/generate.py --out build/native-gen --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fastfeat from this checkout when it is not installed

# Before triton is imported: @triton.jit under the interpreter builds kernels that cannot be compiled.
if os.environ.pop("TRITON_INTERPRET", None) == "1" and "triton" in sys.modules:
    raise SystemExit("triton was imported with TRITON_INTERPRET=1; the AOT build needs the compiled kernels")

from fastfeat.kernels import aot, triton_compat  # noqa: E402  (imports no triton)

# Kernel -> family (the C identifiers' middle part). Order = the C enum ff_family.
FAMILIES = {
    "_conv2d_nhwc_kernel": "conv",
    "_linear_kernel": "linear",
    "_splitk_reduce_kernel": "reduce",
    "_maxpool_nhwc_kernel": "pool",
    "_lrn_nhwc_kernel": "lrn",
    "_linear_splitk_fused_kernel": "linear_fused",
}
# Kernel -> the fastfeat.kernels module that defines it.
KERNEL_MODULES = {
    "_conv2d_nhwc_kernel": "conv",
    "_linear_kernel": "gemm",
    "_splitk_reduce_kernel": "gemm",
    "_maxpool_nhwc_kernel": "pool",
    "_lrn_nhwc_kernel": "lrn",
    "_linear_splitk_fused_kernel": "gemm",
}
# Order = the C enum fastfeat_dtype; the names are aot.DTYPES' keys.
DTYPES = ("fp32", "fp16", "bf16")
# Order = the C target index; names are aot.TARGETS' keys.
TARGETS = ("sm80", "sm90")
# The lookup key of each family: the launch values the config choice (the prune hook) and the compiled
# code depend on, besides the tile itself. ff_lookup in fastfeat_kernels.c computes the same fields.
KEY_FIELDS = {
    "conv": ("CIN_G", "KH", "KW", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "TAP_LOOP", "HAS_BIAS", "APPLY_RELU",
             "IEEE"),
    "linear": ("SMALL_M", "UNALIGNED_LOADS", "UNALIGNED_N", "SPLIT", "HAS_BIAS", "APPLY_RELU", "IEEE"),
    "reduce": ("SPLIT_K", "HAS_BIAS", "APPLY_RELU"),
    "pool": ("KH", "KW", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "APPLY_RELU", "FUSE_LRN", "LRN_SIZE", "BLOCK_P",
             "BLOCK_C"),
    "lrn": ("SIZE", "BLOCK_P", "BLOCK_C"),
    # The exact SPLIT_K: the fused kernel's arrival test and its unrolled sum are compiled for it.
    "linear_fused": ("SMALL_M", "UNALIGNED_LOADS", "UNALIGNED_N", "SPLIT_K", "HAS_BIAS", "APPLY_RELU", "IEEE"),
}  # fmt: skip
MAX_KEY = 12
TILE_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "BLOCK_P", "BLOCK_C", "BLOCK")
# Batch sizes of the conv-side recording: 1 and 16 give both 16-divisibility classes of N*OH*OW.
CONV_BATCHES = (1, 16)
# The kernel arguments that scale with the batch. Each specialisation is compiled batch-generic: these are
# neither folded (== 1) nor assumed divisible by 16, so one variant serves every batch size (they are
# loop and mask bounds, so this costs no vector width on the operands); it halves the compiles.
BATCH_ARGS = {
    "_conv2d_nhwc_kernel": "M_GEMM",
    "_linear_kernel": "M",
    "_splitk_reduce_kernel": "M",
    "_maxpool_nhwc_kernel": "P_TOTAL",
    "_lrn_nhwc_kernel": "P_TOTAL",
    "_linear_splitk_fused_kernel": "M",
}
# A value that is neither 1 nor a multiple of 16: what the batch arguments are specialised as.
GENERIC_BATCH_VALUE = 3
# The C grid of each family, in terms of the kernel's arguments and constexprs (as the launchers compute it).
GRIDS = {
    "conv": ("CDIV(M_GEMM, BLOCK_M) * CDIV(COUT_G, BLOCK_N)", "C_IN / CIN_G", "1"),
    "linear": ("CDIV(M, BLOCK_M) * CDIV(N, BLOCK_N)", "CDIV(K, K_PER_SPLIT)", "1"),
    "reduce": ("CDIV((uint64_t)M * N, BLOCK)", "1", "1"),
    "pool": ("CDIV(P_TOTAL, BLOCK_P)", "CDIV(C, BLOCK_C)", "1"),
    "lrn": ("CDIV(P_TOTAL, BLOCK_P)", "1", "1"),
    # SPLIT_K, the compiled constant: the last arrival of a tile waits for exactly that many programs.
    "linear_fused": ("CDIV(M, BLOCK_M) * CDIV(N, BLOCK_N)", "SPLIT_K", "1"),
}
# The split-K reduces the library ships (gemm.SPLIT_K_REDUCES; fc launches are recorded with each).
SPLIT_K_REDUCES = ("separate", "fused")


def fc_batches(max_tile_rows: int = 40) -> list[int]:
    """Batch sizes that reach every GEMM specialisation class of the fc layers.

    Within the thin-tile family (M <= 32) the split-K count changes at M = 16; above it, at every
    multiple of the 128-row tile, until the tiles alone fill the GPU (fc8's eight column tiles need 33
    row tiles on 132 SMs). M itself is compiled batch-generic (``BATCH_ARGS``), so one M per range.
    """
    return [1, 16, 32] + [128 * j for j in range(1, max_tile_rows + 1)]


# -- 1. recording --------------------------------------------------------------------------------
def record_launches(
    models: list[str], dtypes: list[str], targets: list[str], conv_batches=CONV_BATCHES, fc_batch_sizes=None
) -> dict[str, list]:
    """{target: [(label, launch)]} of the backend's launches (see the module docstring): every plan at
    ``conv_batches``, and each fc op also at ``fc_batch_sizes`` (default ``fc_batches()``)."""
    fc_sizes = fc_batches() if fc_batch_sizes is None else fc_batch_sizes
    import torch

    from fastfeat.backends.triton_backend import TritonNet
    from fastfeat.models import get_model

    out: dict[str, list] = {t: [] for t in targets}
    for model in models:
        spec = get_model(model)
        tensors = {k: torch.empty(shape) for k, shape in spec.param_shapes().items()}  # never read
        convs = [layer.name for layer in spec.layers if layer.kind == "conv"]
        plans = ([spec.layer_names[-1]], spec.layer_names, convs + [spec.layer_names[-1]])
        for dtype_name in dtypes:
            dtype = getattr(torch, aot.DTYPES[dtype_name])
            for target in targets:
                sm_count = aot.TARGETS[target].sm_count
                with aot.recording(sm_count):
                    net = TritonNet(spec, tensors, torch.device("cpu"), dtype)
                for names in plans:
                    for batch in conv_batches:
                        x = torch.empty((batch, spec.input_size, spec.input_size, 3), dtype=dtype)  # never read
                        with aot.recording(sm_count) as sink, torch.inference_mode():
                            for op in net.plan(names):
                                if op.run is torch.relu:  # a torch op, not a kernel; the shape is unchanged
                                    continue
                                start = len(sink)
                                if op.kind == "fc" and batch == conv_batches[0]:
                                    for reduce, m in itertools.product(SPLIT_K_REDUCES, fc_sizes):
                                        with aot.split_k_reduce_mode(reduce):
                                            op.run(torch.empty((m, *x.shape[1:]), dtype=dtype))
                                        out[target] += [
                                            (aot.label(model, op.name, dtype_name, m), c) for c in sink[start:]
                                        ]
                                        start = len(sink)
                                x = op.run(x)
                                out[target] += [(aot.label(model, op.name, dtype_name, batch), c) for c in sink[start:]]
    return out


# -- 2. specialisations, configs, lookup keys ------------------------------------------------------
def launch_key(family: str, named: dict, constexprs: dict) -> tuple[int, ...]:
    """The lookup key of a recorded launch (KEY_FIELDS[family]); fastfeat_kernels.c derives the same."""
    from fastfeat.kernels.autotune import ALIGN_ELEMS

    v = {**named, **constexprs}
    if family == "conv":
        v["IEEE"] = constexprs["DOT_PRECISION"] == "ieee"
    elif family in ("linear", "linear_fused"):
        v["IEEE"] = constexprs["DOT_PRECISION"] == "ieee"
        v["SMALL_M"] = int(named["M_BUCKET"]) <= 32
        v["UNALIGNED_LOADS"] = int(named["STRIDE_WK"]) % ALIGN_ELEMS != 0 or int(named["N_LOAD"]) % ALIGN_ELEMS != 0
        v["UNALIGNED_N"] = int(named["N"]) % ALIGN_ELEMS != 0
        v["SPLIT"] = int(constexprs["SPLIT_K"]) > 1
    return tuple(int(v[f]) for f in KEY_FIELDS[family])


def specialisations(launches: dict[str, list]):
    """(variants, entries): every distinct compile (``aot.build_jobs`` with one config, exact epilogue
    flags) with its algo, and every (family, dtype, target, key) with the algo it dispatches to."""
    from fastfeat.kernels.gemm import ARRIVAL_TILE

    variants: dict[tuple, dict] = {}
    algos: dict[tuple, int] = {}  # (unit, algo identity) -> algo index within the unit
    unit_algos: dict[tuple, int] = {}
    entries: dict[tuple, dict] = {}
    for target, items in launches.items():
        arch = aot.TARGETS[target].arch
        for label, launch in items:
            module, name, kernel, args, kwargs = launch
            fn = triton_compat.jit_function(kernel)
            named = {**dict(zip(triton_compat.arg_names(fn), args, strict=False)), **kwargs}
            batch_arg = triton_compat.arg_names(fn).index(BATCH_ARGS[name])
            generic = (*args[:batch_arg], GENERIC_BATCH_VALUE, *args[batch_arg + 1 :])
            [job] = aot.build_jobs(
                {target: [(label, (module, name, kernel, generic, kwargs))]}, [target], True, True, False
            )
            family = FAMILIES[name]
            dtype = aot.job_dtype(job)
            unit = (family, dtype, target)
            declared = set(triton_compat.constexpr_params(fn))
            real = {k: v for k, v in job["constexprs"].items() if k in declared}
            algo_id = (repr(sorted(aot.merge_key(name, real, True).items())), job["num_warps"], job["num_stages"])
            if (unit, algo_id) not in algos:
                algos[(unit, algo_id)] = unit_algos[unit] = unit_algos.get(unit, -1) + 1
            algo = algos[(unit, algo_id)]
            # As aot.build_jobs dedups: SPLIT_K > 1 values share one compile (the body only tests == 1).
            merged = repr(sorted(aot.merge_key(name, job["constexprs"], True).items()))
            ident = (name, tuple(job["signature"].items()), merged, repr(sorted(job["attrs"].items())),
                     job["num_warps"], job["num_stages"], arch)  # fmt: skip
            var = variants.setdefault(ident, {**job, "family": family, "dtype": dtype, "algo": algo, "launches": []})
            if label not in var["launches"]:
                var["launches"].append(label)
            key = (family, dtype, target, launch_key(family, named, job["constexprs"]))
            entry = entries.setdefault(key, {"algo": algo, "job": job, "launches": []})
            if entry["algo"] != algo:
                raise RuntimeError(
                    f"lookup key {key} of {label} maps to two configs ({entry['job']['config']} and {job['config']}): "
                    "KEY_FIELDS misses an input of the config choice"
                )
            if label not in entry["launches"]:  # a GEMM without split-K is recorded under both reduces
                entry["launches"].append(label)
            tile = job["constexprs"]
            if family == "linear_fused" and min(tile["BLOCK_M"], tile["BLOCK_N"]) < ARRIVAL_TILE:
                raise RuntimeError(
                    f"{label}: fused split-K tile {job['config']} is smaller than the {ARRIVAL_TILE}x{ARRIVAL_TILE} "
                    "tiles its arrival counters are sized for (gemm.ARRIVAL_TILE, fastfeat_kernels.c)"
                )
    return list(variants.values()), entries


# -- 3. compiling, with a cache ------------------------------------------------------------------
def cache_key() -> str:
    """The AOT cache's directory name: ``fastfeat.kernels.native.kernel_hash`` (each kernel's Triton cache
    key, the Triton version, the cache format), which the library also embeds.

    Not the whole kernel modules (editing a launcher recompiles nothing), nor this generator: it decides
    which specialisations exist, and each cache entry is named by the hash of its complete spec
    (``variant_hash``: signature, constexprs, divisibility, warps, stages, target).
    """
    from fastfeat.kernels.native import kernel_hash

    return kernel_hash()


def variant_hash(var: dict) -> str:
    text = json.dumps([var["kernel"], var["signature"], var["constexprs"], sorted(map(repr, var["attrs"].items())),
                       var["num_warps"], var["num_stages"], var["arch"]], sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compile(var: dict) -> dict:
    """Worker: compile one variant; its cubin and launch metadata (errors are returned, not raised)."""
    import importlib

    fn = triton_compat.jit_function(getattr(importlib.import_module(var["module"]), var["kernel"]))
    options = {"num_warps": var["num_warps"], "num_stages": var["num_stages"]}
    try:
        return triton_compat.compile_binary(fn, var["signature"], var["constexprs"], var["attrs"], var["arch"], options)
    except Exception as e:  # noqa: BLE001 - reported with the variant's launches by the caller
        return {"error": f"{type(e).__name__}: {e}"[: aot.MAX_ERROR_CHARS]}


def compile_all(variants: list[dict], cache_dir: pathlib.Path, jobs: int) -> tuple[int, int]:
    """Fill each variant's "binary" from the cache or the compiler; (compiled, cached) counts."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for var in variants:
        path = cache_dir / f"{variant_hash(var)}.json"
        if path.exists():
            var["binary"] = json.loads(path.read_text())
        else:
            todo.append(var)
    if todo:
        scratch = tempfile.mkdtemp(prefix="fastfeat-aot-triton-")  # keeps ~/.triton/cache clean
        try:
            failed = []
            with ProcessPoolExecutor(max_workers=max(1, jobs), initializer=aot.worker_init, initargs=(scratch,)) as ex:
                # Each result is cached as it arrives, so an interrupted build resumes where it stopped.
                for var, res in zip(todo, ex.map(_compile, todo, chunksize=1), strict=True):
                    if "error" in res:
                        failed.append((var, res))
                        continue
                    res = {**res, "cubin": res["cubin"].hex()}
                    tmp = cache_dir / f".{variant_hash(var)}.tmp"
                    tmp.write_text(json.dumps(res))
                    tmp.replace(cache_dir / f"{variant_hash(var)}.json")  # atomic: no torn entry if killed
                    var["binary"] = res
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if failed:
            for v, r in failed[:5]:
                print(
                    f"compile failed: {v['kernel']} [{v['config']}] {v['target']}: {r['error'][:400]}", file=sys.stderr
                )
            raise SystemExit(f"{len(failed)} of {len(todo)} AOT compiles failed")
    return len(todo), len(variants) - len(todo)


# -- 4. C emission -------------------------------------------------------------------------------
PRELUDE = """/* Generated by native/generate.py from Triton's AOT template (triton/tools/extra/cuda/compile.c).
   Do not edit. The template's CUDA_CHECK exits the process on any CUDA error; here it records the error
   and returns, and a launcher whose module failed to load returns that error instead of launching. */
#include <stdint.h>
#include <string.h>
#include <cuda.h>
#include "ff_aot_runtime.h"

#define CUDA_CHECK(ans) { CUresult ff_r_ = (ans); if (ff_r_ != CUDA_SUCCESS) { ff_aot_note_error(ff_r_); return; } }
#define CDIV(a, b) (((int64_t)(a) + (b) - 1) / (b))
"""


def _unit_name(family: str, dtype: str, target: str) -> str:
    return f"ff_{family}_{dtype}_{target}"


def _c_args(var: dict, declared: set) -> tuple[list, list]:
    """(full, passed): the kernel's runtime arguments as (C type, name), all of them (ints folded because
    they equal 1 as int32_t, as triton.tools.compile does) and those the specialisation takes."""
    full, passed = [], []
    for name, ty in var["signature"].items():
        if name in declared:
            continue
        if ty == "constexpr":  # an int folded because it equals 1
            full.append(("int32_t", name))
            continue
        full.append((triton_compat.aot_c_type(ty), name))
        passed.append((triton_compat.aot_c_type(ty), name))
    return full, passed


def emit_variant(var: dict, unit: str, templates: dict, declared: set) -> tuple[str, str]:
    """(C body, header) of one specialisation: Triton's compile.c/compile.h filled as triton.tools.compile
    fills them, with our grid and algo naming."""
    binary = var["binary"]
    if binary["global_scratch"] or binary["profile_scratch"]:
        raise SystemExit(f"{var['kernel']} needs global/profile scratch memory, which Triton's AOT launcher lacks")
    full, passed = _c_args(var, declared)
    index = {name: i for i, (_, name) in enumerate(full)}
    hints = {}
    for (i,), attr in var["attrs"].items():
        name = list(var["signature"])[i]
        if any(a[0] == "tt.divisibility" and a[1] == 16 for a in attr):
            hints[index[name]] = "d"
    for name, ty in var["signature"].items():
        if ty == "constexpr" and name not in declared:
            hints[index[name]] = "c"
    suffix = "".join(f"{i}{hints[i]}" for i in sorted(hints))
    func = f"{unit}_{variant_hash(var)[:8]}_{suffix}"
    values = {**var["constexprs"]}

    def c_expr(expr: str) -> str:
        # Constexprs and folded ints become literals: the specialised launcher has no such parameter.
        return re.sub(r"\b[A-Z_][A-Z_0-9]*\b", lambda m: str(int(values[m.group(0)])) if m.group(0) in values
                      and m.group(0) not in ("CDIV",) else m.group(0), expr)  # fmt: skip

    grid = [f"(unsigned int)({c_expr(g)})" for g in GRIDS[var["family"]]]
    cubin = bytes.fromhex(binary["cubin"])
    params = {
        "kernel_name": func,
        "triton_kernel_name": binary["name"],
        "bin_size": len(cubin),
        "bin_data": ",".join(f"0x{b:02x}" for b in cubin),
        "signature": ", ".join(f"{t} {n}" for t, n in passed),
        "full_signature": ", ".join(f"{t} {n}" for t, n in full),
        "arg_pointers": ", ".join([f"&{n}" for _, n in passed] + ["&global_scratch", "&profile_scratch"]),
        "num_args": len(passed) + 2,
        "kernel_docstring": f"{var['kernel']} {var['target']} [{var['config']}] "
        + " ".join(f"{k}={v}" for k, v in var["constexprs"].items()),
        "shared": binary["shared"],
        "num_warps": var["num_warps"],
        "algo_info": f"algo{var['algo']}",
        "gridX": grid[0],
        "gridY": grid[1],
        "gridZ": grid[2],
        # A field of Triton's compile.h template ("CUresult{_placeholder} kernel(...)"), empty as compile.py sets it.
        "_placeholder": "",
        "warp_size": triton_compat.CUDA_WARP_SIZE,
        "backend_name": "cuda",
    }
    source = templates["compile.c"].format(**params)
    marker = "// globals"
    if marker not in source:
        raise SystemExit("Triton's compile.c template changed (no '// globals' marker): update native/generate.py")
    body = "#undef CUBIN_NAME\n" + source.split(marker, 1)[1]
    patches = [
        (f"       load_{func}();\n", f"       load_{func}();\n    if ({func}_func == NULL)\n      return ff_aot_load_error();\n"),
        (f"{params['warp_size']}, 1, 1, {binary['shared']}, stream, args, NULL);\n}}",
         f"{params['warp_size']}, 1, 1, {binary['shared']}, stream, args, NULL);\n    return CUDA_SUCCESS;\n}}"),
        (f"unsigned char CUBIN_NAME[{len(cubin)}]", f"static const unsigned char CUBIN_NAME[{len(cubin)}]"),
    ]  # fmt: skip
    for old, new in patches:
        if old not in body:
            raise SystemExit(
                f"Triton's compile.c template changed ({old.strip()[:60]!r} not found): update native/generate.py"
            )
        body = body.replace(old, new)
    return body, templates["compile.h"].format(**params)


def link_unit(headers: list[tuple[str, str]], unit: str, workdir: pathlib.Path) -> tuple[str, str]:
    """Run ``triton.tools.link`` over the unit's headers (in algo order); its (.c, .h) texts."""
    d = workdir / unit
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, text) in enumerate(headers):
        p = d / f"{i:05d}_{name}.h"
        p.write_text(text)
        paths.append(str(p))
    out = d / unit
    subprocess.run([sys.executable, "-m", "triton.tools.link", *paths, "-o", str(out)], check=True)
    return out.with_suffix(".c").read_text(), out.with_suffix(".h").read_text()


def emit(variants: list[dict], entries: dict, out: pathlib.Path, matrix: dict) -> list[dict]:
    """Write units/*.c, ff_units.h, ff_entries.c, ff_constants.h, ff_networks.inc and entries.json."""
    import importlib

    templates = triton_compat.aot_templates()
    (out / "units").mkdir(parents=True, exist_ok=True)
    declared_by_kernel = {}
    for kernel in FAMILIES:
        mod = importlib.import_module(f"fastfeat.kernels.{KERNEL_MODULES[kernel]}")
        fn = triton_compat.jit_function(getattr(mod, kernel))
        declared_by_kernel[kernel] = set(triton_compat.constexpr_params(fn))
    unit_headers = []
    with tempfile.TemporaryDirectory(prefix="fastfeat-aot-link-") as work:
        for kernel, family in FAMILIES.items():
            for dtype in DTYPES:
                for target in TARGETS:
                    unit = _unit_name(family, dtype, target)
                    mine = sorted((v for v in variants if (v["family"], v["dtype"], v["target"]) == (family, dtype, target)),
                                  key=lambda v: (v["algo"], variant_hash(v)))  # fmt: skip
                    path = out / "units" / f"{unit}.c"
                    if not mine:
                        _write_if_changed(
                            path, f"/* {unit}: no specialisation is launched */\ntypedef int {unit}_empty;\n"
                        )
                        continue
                    bodies, headers = [], []
                    for v in mine:
                        body, header = emit_variant(v, unit, templates, declared_by_kernel[kernel])
                        bodies.append(body)
                        headers.append((variant_hash(v), header))
                    link_c, link_h = link_unit(headers, unit, pathlib.Path(work))
                    _write_if_changed(path, PRELUDE + "\n".join(bodies) + "\n/* triton.tools.link */\n" + link_c)
                    unit_headers.append(link_h)
    units_h = "/* Generated by native/generate.py: the dispatchers of triton.tools.link. */\n" + "\n".join(unit_headers)
    _write_if_changed(out / "ff_units.h", units_h)
    listing = write_entries(entries, out, {v_unit(v) for v in variants}, matrix)
    _write_if_changed(out / "ff_constants.h", constants_header())
    _write_if_changed(out / "ff_networks.inc", networks_source(matrix["models"]))
    return listing


def v_unit(v: dict) -> str:
    return _unit_name(v["family"], v["dtype"], v["target"])


def write_entries(entries: dict, out: pathlib.Path, units: set, matrix: dict) -> list[dict]:
    rows, listing = [], []
    order = {f: i for i, f in enumerate(FAMILIES.values())}
    for i, ((family, dtype, target, key), e) in enumerate(
        sorted(entries.items(), key=lambda kv: (order[kv[0][0]], DTYPES.index(kv[0][1]), kv[0][2], kv[0][3]))
    ):
        job = e["job"]
        tile = {f: job["constexprs"].get(f, 0) for f in TILE_FIELDS}
        keys = ", ".join(str(k) for k in key + (0,) * (MAX_KEY - len(key)))
        tiles = ", ".join(str(int(tile[f])) for f in TILE_FIELDS)
        rows.append(f"  {{FF_{family.upper()}, {DTYPES.index(dtype)}, {TARGETS.index(target)}, {{{keys}}}, {e['algo']}, "
                    f"{{{tiles}}}, {job['num_warps']}, {job['num_stages']}}},")  # fmt: skip
        listing.append({
            "index": i, "family": family, "kernel": job["kernel"], "dtype": dtype, "target": target,
            "arch": aot.TARGETS[target].arch, "key": dict(zip(KEY_FIELDS[family], key, strict=True)),
            "algo": e["algo"], "config": job["config"], "tile": {k: v for k, v in tile.items() if v},
            "num_warps": job["num_warps"], "num_stages": job["num_stages"], "launches": e["launches"],
        })  # fmt: skip
    tables = []
    for family in FAMILIES.values():
        cells = []
        for dtype in DTYPES:
            row = [(_unit_name(family, dtype, t) if _unit_name(family, dtype, t) in units else "NULL") for t in TARGETS]
            cells.append("{" + ", ".join(row) + "}")
        tables.append(
            f"const ff_{family}_unit_fn ff_{family}_units[FF_NUM_DTYPES][FF_NUM_TARGETS] = {{{', '.join(cells)}}};"
        )
    text = (
        "/* Generated by native/generate.py: the lookup table (family, dtype, target, key) -> algo id. */\n"
        '#include "ff_internal.h"\n#include "ff_units.h"\n\n'
        "const ff_entry ff_entries[] = {\n" + "\n".join(rows) + "\n};\n"
        f"const int ff_num_entries = {len(rows)};\n\n" + "\n".join(tables) + "\n"
    )
    import triton

    info = (
        f"fastfeat kernels (triton {triton.__version__}): {', '.join(matrix['models'])}; "
        f"{', '.join(matrix['dtypes'])}; {', '.join(matrix['targets'])}; {len(rows)} entries, {len(units)} dispatchers"
    )
    text += (
        f"const char ff_build_info[] = {json.dumps(info)};\nconst char ff_kernel_hash[] = {json.dumps(cache_key())};\n"
    )
    _write_if_changed(out / "ff_entries.c", text)
    doc = {"built": matrix, "key_fields": KEY_FIELDS, "dtypes": DTYPES, "targets": TARGETS, "entries": listing}
    _write_if_changed(out / "entries.json", json.dumps(doc, indent=1) + "\n")
    return listing


def constants_header() -> str:
    """The launchers' size constants, read from the Python modules so the two cannot drift."""
    from fastfeat.kernels import autotune, conv, gemm, lrn, pool

    consts = {
        "FF_TAP_LOOP_MIN_CIN": conv.TAP_LOOP_MIN_CIN,
        "FF_MAX_GEMM_M": conv.MAX_GEMM_M,
        "FF_M_BUCKET_CAP": autotune.M_BUCKET_CAP,
        "FF_BATCH_BUCKET_CAP": autotune.BATCH_BUCKET_CAP,
        "FF_ALIGN_ELEMS": autotune.ALIGN_ELEMS,
        "FF_SPLIT_K_GRANULE": gemm.SPLIT_K_GRANULE,
        "FF_SPLIT_K_MIN_CHUNK": gemm.SPLIT_K_MIN_CHUNK,
        "FF_MAX_SPLIT_K": gemm.MAX_SPLIT_K,
        "FF_TARGET_PROGRAMS_PER_SM": gemm.TARGET_PROGRAMS_PER_SM,
        "FF_NOMINAL_BLOCK_N": gemm.NOMINAL_BLOCK_N,
        "FF_REDUCE_BLOCK": gemm.REDUCE_BLOCK,
        "FF_ARRIVAL_TILE": gemm.ARRIVAL_TILE,
        "FF_POOL_BLOCK_P": pool.POOL_BLOCK_P,
        "FF_POOL_BLOCK_C": pool.POOL_BLOCK_C,
        "FF_LRN_TILE_ELEMS": lrn.LRN_TILE_ELEMS,
        "FF_MAX_LRN_CHANNELS": lrn.MAX_LRN_CHANNELS,
        "FF_MAX_KEY": MAX_KEY,
    }
    lines = ["/* Generated by native/generate.py from fastfeat.kernels' constants. */", "#pragma once"]
    lines += [f"#define {k} {int(v)}" for k, v in consts.items()]
    # Static tables in a header: unused in some translation units, hence the attribute.
    lines.append("#define FF_UNUSED __attribute__((unused))")
    lines.append(
        "FF_UNUSED static const int ff_target_arch[] = {" + ", ".join(str(aot.TARGETS[t].arch) for t in TARGETS) + "};"
    )
    lines.append(
        "FF_UNUSED static const char *const ff_target_names[] = {" + ", ".join(f'"{t}"' for t in TARGETS) + "};"
    )
    lines.append("FF_UNUSED static const char *const ff_dtype_names[] = {" + ", ".join(f'"{d}"' for d in DTYPES) + "};")
    return "\n".join(lines) + "\n"


def networks_source(models: list[str]) -> str:
    """C++ initialisers of each network's fused forward plan (``TritonNet.plan([last layer])``), for the bench."""
    import torch

    from fastfeat.backends.triton_backend import TritonNet
    from fastfeat.layers import LRN, Conv, Linear, MaxPool, ReLU
    from fastfeat.models import get_model

    def q(s: str) -> str:
        return json.dumps(s)

    nets = []
    for model in models:
        spec = get_model(model)
        tensors = {k: torch.empty(shape) for k, shape in spec.param_shapes().items()}
        with aot.recording(aot.TARGETS["sm90"].sm_count):
            net = TritonNet(spec, tensors, torch.device("cpu"), torch.float32)
        shapes, macs, inputs = spec.shapes(), spec.macs(), spec.input_shapes()
        layers = ", ".join(
            f"{{{q(layer.name)}, {q(layer.kind)}, {q('x'.join(map(str, shapes[layer.name])))}, {macs[layer.name]}LL}}"
            for layer in spec.layers
        )
        ops = []
        for op in net.plan([spec.layer_names[-1]]):
            first = spec.layer(op.covers[0])
            covers = [spec.layer(n) for n in op.covers]
            in_shape = list(inputs[op.covers[0]])
            out_shape = list(shapes[op.covers[-1]])
            p = [0] * 12
            lrn = (5, 1e-4, 0.75, 1.0)
            if isinstance(first, Conv):
                fam = "FF_OP_CONV"
                p[:8] = [first.out, first.groups, first.kernel, first.stride, first.pad, int(len(covers) > 1), 1, 0]
            elif isinstance(first, Linear):
                fam = "FF_OP_FC"
                p[:3] = [first.out, int(len(covers) > 1), 1]
            elif isinstance(first, (ReLU, MaxPool)):
                fam = "FF_OP_POOL"
                pool = covers[1] if isinstance(first, ReLU) else first
                norm = next((c for c in covers if isinstance(c, LRN)), None)
                p[:6] = [
                    pool.kernel,
                    pool.stride,
                    pool.pad,
                    int(pool.ceil),
                    int(isinstance(first, ReLU)),
                    int(norm is not None),
                ]
                if norm is not None:
                    lrn = (norm.size, norm.alpha, norm.beta, norm.k)
            elif isinstance(first, LRN):
                fam = "FF_OP_LRN"
                lrn = (first.size, first.alpha, first.beta, first.k)
            else:
                raise SystemExit(f"{model}: no native op for layer kind {first.kind}")
            cov = ", ".join(q(n) for n in op.covers)
            dims = lambda s: "{" + ", ".join(str(d) for d in s + [0] * (3 - len(s))) + "}"  # noqa: E731
            ops.append(
                f"{{{q(op.name)}, {q(op.kind)}, {fam}, {{{cov}}}, {len(covers)}, {dims(in_shape)}, {len(in_shape)}, "
                f"{dims(out_shape)}, {len(out_shape)}, {{{', '.join(map(str, p))}}}, "
                f"{{{lrn[0]}, {float(lrn[1])!r}, {float(lrn[2])!r}, {float(lrn[3])!r}}}}}"
            )
        nets.append(f"{{{q(model)}, {spec.input_size}, {{{layers}}}, {{{', '.join(ops)}}}}}")
    from fastfeat import __version__

    return ("// Generated by native/generate.py: each network's fused forward plan (TritonNet.plan([last layer])).\n"
            f"static const char kFastfeatVersion[] = {q(__version__)};\n"
            "static const NetDesc kNetworks[] = {\n  " + ",\n  ".join(nets) + "\n};\n")  # fmt: skip


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    """Write ``path`` unless it already holds ``text``: an unchanged file keeps its mtime, so a warm
    rebuild recompiles nothing."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def default_cache_root() -> pathlib.Path:
    env = os.environ.get("FASTFEAT_AOT_CACHE")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fastfeat" / "aot"


def main(argv=None) -> int:
    from fastfeat.models import list_models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the generated sources")
    ap.add_argument("--models", nargs="+", default=None, help="default: every shipped model")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    ap.add_argument("--jobs", type=int, default=2, help="compiler processes")
    ap.add_argument(
        "--cache", default=None, help="AOT cache root (default $FASTFEAT_AOT_CACHE or ~/.cache/fastfeat/aot)"
    )
    ap.add_argument("--stamp", help="touch this file when done (CMake's output)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    models = args.models or list_models()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    why = aot.preflight(args.targets)
    if why:
        raise SystemExit(why)
    launches = record_launches(models, args.dtypes, args.targets)
    variants, entries = specialisations(launches)
    n_launches = sum(len(v) for v in launches.values())
    print(f"aot: {n_launches} launches -> {len(variants)} specialisations, {len(entries)} lookup entries", flush=True)
    cache_dir = pathlib.Path(args.cache) if args.cache else default_cache_root()
    cache_dir = cache_dir / cache_key()
    compiled, cached = compile_all(variants, cache_dir, args.jobs)
    print(f"aot: compiled {compiled}, from cache {cached} ({cache_dir})", flush=True)
    emit(variants, entries, out, {"models": models, "dtypes": args.dtypes, "targets": args.targets})
    summary = {"models": models, "dtypes": args.dtypes, "targets": args.targets, "launches": n_launches,
               "specialisations": len(variants), "entries": len(entries), "compiled": compiled, "cached": cached,
               "cache_dir": str(cache_dir), "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    _write_if_changed(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(f"aot: done in {summary['seconds']} s", flush=True)
    if args.stamp:
        pathlib.Path(args.stamp).touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
