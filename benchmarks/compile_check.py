"""Ahead-of-time compile check of every fastfeat.kernels Triton kernel for A100 (sm_80) and H100/H200 (sm_90).

Needs no GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
compiler (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) on the CPU with the ptxas that triton bundles. It catches
what the CPU interpreter never sees: ops or layouts the GPU backend rejects, register spills, and
configs whose shared memory does not fit the device.

What is compiled: the exact launches the triton backend makes. ``TritonNet.plan`` runs over empty CPU
tensors with each kernel replaced by a recorder, for CaffeNet and AlexNet, for three plans (only the
last layer requested: conv+ReLU, pool(+LRN), fc+ReLU fused; every layer requested: plain conv, pool,
stand-alone LRN, fc without ReLU; the convs requested: ReLU+pool(+LRN) fused) at batch 1, 256 and 2048
in bf16, plus fp16 and fp32 for one CaffeNet launch per kernel shape family (``REPRESENTATIVE``). Each
launch is specialised exactly as ``JITFunction.run`` would (constexprs, ints equal to 1 folded to
constexprs, 16-divisibility of ints and pointers). An autotuned launch is compiled for every config its
``early_config_prune`` keeps on the target when shared memory is unlimited (the GEMM's M-bucket family,
the conv's channel-slab and register rules; ``--all-configs``: every config), and each is marked with
whether the hook keeps it at the target's real limit. The split-K choice uses each target's SM count
(A100: 108, H100/H200: 132). Identical (kernel, specialisation, config, target) combinations compile
once; launches that differ only in the epilogue switches APPLY_RELU / HAS_BIAS compile once, with both
on (``--exhaustive`` compiles each setting), and SPLIT_K > 1 values of the GEMM, which only tests
SPLIT_K == 1, compile once.

Reported per (kernel, config, target): compile success, registers per thread (ptxas -v), spill bytes
(stores + loads), shared memory (the compiled kernel's metadata), and flags:

* ``FAIL``: the compiler raised (the reason is printed; the full text is in the JSON);
* ``SMEM>LIMIT``: shared memory above the device limit (A100: 163 KiB, H100/H200: 227 KiB) although
  the prune hook keeps the config: it would fail to launch;
* ``SPILL``: ptxas spilled registers in a config the prune hook keeps;
* ``smem>limit(pruned)``, ``spill(pruned)``, ``pruned``: the hook drops the config on that target;
* ``spill(minor)``: at most MINOR_SPILL_BYTES spilled with registers to spare (ptxas's own choice);
* ``regs-at-cap``: 255 registers per thread, no spill.

FAIL, SMEM>LIMIT and SPILL are problems: the exit status is then 1 (0 when clean, 77 when triton cannot
compile for a GPU target on this machine).

    python benchmarks/compile_check.py --jobs 2 --json out.json   # 417 compiles, ~2 min on 2 cores
    python benchmarks/compile_check.py --quick              # first kept config per specialisation
    python benchmarks/compile_check.py --representative --targets sm90   # the CI subset (~6 s)
    python benchmarks/compile_check.py --all-configs --jobs 2    # also the pruned configs (~6 min)
    python benchmarks/compile_check.py --dry-run            # count the compiles only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkout import make_importable  # noqa: E402


@dataclass(frozen=True)
class Target:
    arch: int  # compute capability x 10, as GPUTarget wants it
    gpus: str
    smem_limit: int  # usable shared memory per block (opt-in maximum), bytes
    sm_count: int  # SMs the split-K heuristic sees


TARGETS = {
    "sm80": Target(80, "A100", 163 * 1024, 108),
    "sm90": Target(90, "H100/H200", 227 * 1024, 132),
}
# ptxas sometimes spills a word or two while far below the register cap (its own occupancy choice); a
# spill of at most this many bytes with registers to spare is reported as "spill(minor)", not a problem.
MINOR_SPILL_BYTES = 16
# The kernels the recorder intercepts: (module under fastfeat.kernels, global name).
KERNELS = (
    ("conv", "_conv2d_nhwc_kernel"),
    ("gemm", "_linear_kernel"),
    ("gemm", "_splitk_reduce_kernel"),
    ("pool", "_maxpool_nhwc_kernel"),
    ("lrn", "_lrn_nhwc_kernel"),
)
# Launch options a kernel call may carry besides its arguments (see triton's CUDAOptions).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# Triton's defaults for launches that do not set them (CUDAOptions).
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3
# Unlimited shared memory, to ask a prune hook which configs it keeps for reasons other than fit.
NO_SMEM_LIMIT = 1 << 40
# ptxas's per-thread register ceiling; a kernel at it is one change away from spilling.
MAX_REGS = 255
# Exit status when triton cannot compile for a GPU target on this machine (no ptxas, no NVIDIA backend):
# "skipped", as automake's test drivers read it. 1 means a kernel problem, 0 a clean check.
EXIT_UNAVAILABLE = 77
# Longest error text kept per failed compile in the JSON.
MAX_ERROR_CHARS = 4000
# One CaffeNet launch per kernel shape family, as (label, kernel): the CI subset (--representative)
# and the launches that the extra dtypes are compiled for.
REPRESENTATIVE = (
    ("caffenet/conv3+relu3 {dtype} b256", "_conv2d_nhwc_kernel"),  # tap loop
    ("caffenet/conv1+relu1 {dtype} b256", "_conv2d_nhwc_kernel"),  # flattened (kh, kw, cin) loop
    ("caffenet/fc6+relu6 {dtype} b2048", "_linear_kernel"),  # SPLIT_K == 1, full tiles
    ("caffenet/fc6+relu6 {dtype} b1", "_linear_kernel"),  # SPLIT_K > 1, thin tiles
    ("caffenet/fc6+relu6 {dtype} b1", "_splitk_reduce_kernel"),
    ("caffenet/relu1+pool1+norm1 {dtype} b256", "_maxpool_nhwc_kernel"),  # ReLU + pool + LRN in one kernel
    ("caffenet/norm1 {dtype} b256", "_lrn_nhwc_kernel"),
)
# Batch sizes the representative launches need (b1: M=1 and split-K; b2048: SPLIT_K=1).
REPRESENTATIVE_BATCHES = (1, 256, 2048)
# Dtype names of the command line -> torch attribute names.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Epilogue switches (one fused op each): by default launches that differ only in these compile once, in
# the heavier setting (True); --exhaustive compiles every setting that occurs.
MERGED_FLAGS = ("APPLY_RELU", "HAS_BIAS")


# -- recording the launches of the triton backend -------------------------------------------------
class _TensorInfo:
    """A recorded tensor argument: its dtype, and what ``prune_by_shared_memory`` reads from a CUDA tensor.

    Recording keeps no tensors: the (never touched) batch-2048 buffers would otherwise add up to tens of
    GB of address space and make forking the compiler processes fail.
    """

    is_cuda = True

    def __init__(self, dtype):
        import torch

        self.dtype = dtype
        self.device = torch.device("cuda", 0)

    def element_size(self) -> int:
        return self.dtype.itemsize


def _describe(value):
    import torch

    return _TensorInfo(value.dtype) if isinstance(value, torch.Tensor) else value


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` appends the call instead of launching."""

    def __init__(self, module: str, name: str, kernel, sink: list):
        self.module, self.name, self.kernel, self.sink = module, name, kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            args = tuple(_describe(a) for a in args)
            kwargs = {k: _describe(v) for k, v in kwargs.items()}
            self.sink.append((self.module, self.name, self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def recording(sm_count: int):
    """Replace every kernel by a recorder; let the launchers accept CPU tensors; fix the SM count."""
    import fastfeat.kernels as fk
    from fastfeat.kernels import autotune, gemm, launch_args

    sink: list = []
    saved = []

    def patch(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    try:
        for module, name in KERNELS:
            mod = importlib.import_module(f"fastfeat.kernels.{module}")
            patch(mod, name, _Recorder(module, name, getattr(mod, name), sink))
        # The launchers' device checks accept CPU tensors only "under the interpreter".
        patch(fk, "interpreter_active", lambda: True)
        patch(autotune, "interpreter_active", lambda: True)
        patch(launch_args, "interpreter_active", lambda: True)
        patch(gemm, "sm_count", lambda device: sm_count)
        yield sink
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def record_model_launches(model: str, dtype_name: str, batches, targets) -> dict[str, list[tuple[str, tuple]]]:
    """{target: [(label, launch)]} for three plans of ``model`` at each batch size.

    Plans: only the last layer requested (everything fused), every layer requested (nothing fused:
    plain conv, pool, stand-alone LRN, fc without ReLU), and the convs plus the last layer (conv
    without ReLU, then ReLU + pool (+ LRN) in one kernel).
    """
    import torch

    from fastfeat.backends.triton_backend import TritonNet
    from fastfeat.models import get_model

    dtype = getattr(torch, DTYPES[dtype_name])
    spec = get_model(model)
    tensors = {k: torch.empty(shape) for k, shape in spec.param_shapes().items()}  # never read
    with recording(TARGETS[targets[0]].sm_count):
        net = TritonNet(spec, tensors, torch.device("cpu"), dtype)
    convs = [layer.name for layer in spec.layers if layer.kind == "conv"]
    plans = ([spec.layer_names[-1]], spec.layer_names, convs + [spec.layer_names[-1]])
    out: dict[str, list] = {t: [] for t in targets}
    for target in targets:
        for batch in batches:
            for names in plans:
                x = torch.empty((batch, spec.input_size, spec.input_size, 3), dtype=dtype)  # never read
                with recording(TARGETS[target].sm_count) as sink, torch.inference_mode():
                    for op in net.plan(names):
                        if op.run is torch.relu:  # an un-fused ReLU is a torch op, not a kernel: skip the work
                            continue
                        start = len(sink)
                        x = op.run(x)
                        out[target] += [(f"{model}/{op.name} {dtype_name} b{batch}", c) for c in sink[start:]]
    return out


# -- specialisation, as JITFunction.run does it ----------------------------------------------------
def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise RuntimeError(
                f"{kernel!r} is not a compilable JITFunction (was triton imported with TRITON_INTERPRET=1?)"
            )
        fn = fn.fn
    return fn


def _mock(value):
    from triton.runtime.jit import MockTensor

    return MockTensor(value.dtype) if isinstance(value, _TensorInfo) else value  # 16-byte aligned, as torch's


def specialise(fn, bound: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs by name, attrs by (index,)) for a launch with the argument values ``bound``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name not in bound:
            if not p.has_default:
                raise ValueError(f"{fn.__name__}: no value for argument {p.name}")
            bound[p.name] = p.default
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        ty, attr = native_specialize_impl(
            BaseBackend, _mock(value), p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )[:2]
        signature[p.name] = ty
        if ty == "constexpr":  # an int equal to 1 (or None) is folded, as at run time
            constexprs[p.name] = value
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


def prune(autotuner, named_args: dict, kwargs: dict, target: Target, smem_limit: int) -> list:
    """The configs the autotuner's early_config_prune keeps on ``target`` with ``smem_limit`` bytes."""
    from fastfeat.kernels import autotune

    if autotuner.early_config_prune is None:
        return list(autotuner.configs)
    saved = autotune._max_shared_memory, autotune._device_capability
    autotune._max_shared_memory = lambda index: smem_limit
    autotune._device_capability = lambda index: target.arch // 10
    try:
        return autotuner.early_config_prune(autotuner.configs, dict(named_args), **kwargs)
    finally:
        autotune._max_shared_memory, autotune._device_capability = saved


def config_name(kwargs: dict, num_warps: int, num_stages: int) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "GROUP_M": "G", "BLOCK_P": "P", "BLOCK_C": "C"}
    parts = [f"{short.get(k, k)}{v}" for k, v in kwargs.items()]
    return " ".join(parts + [f"w{num_warps}", f"s{num_stages}"])


def merge_key(name: str, constexprs: dict, exhaustive: bool) -> dict:
    """The constexprs that decide the generated code: what deduplication compares."""
    key = dict(constexprs)
    if name == "_linear_kernel" and key["SPLIT_K"] > 1:
        key["SPLIT_K"] = "> 1"  # exact: the kernel body only tests SPLIT_K == 1
    if not exhaustive:
        key.update({f: True for f in MERGED_FLAGS if f in key})
    return key


def build_jobs(launches, targets: list[str], one_config: bool, exhaustive: bool, all_configs: bool) -> list[dict]:
    """Deduplicated compile jobs for the recorded launches on each target.

    An autotuned launch compiles the configs its prune hook keeps when shared memory is unlimited (so
    an overflow is seen, not hidden), or every config with ``all_configs``; each job records whether
    the hook, with the target's real limit, keeps it.
    """
    from triton.runtime.autotuner import Autotuner

    jobs: dict[tuple, dict] = {}
    for target_name in targets:
        target = TARGETS[target_name]
        for label, (module, name, kernel, args, kwargs) in launches[target_name]:
            fn = _jit_function(kernel)
            options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
            call_kwargs = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
            named_args = dict(zip(fn.arg_names, args, strict=False))
            if isinstance(kernel, Autotuner):
                kept = prune(kernel, named_args, call_kwargs, target, target.smem_limit)
                if all_configs:
                    candidates = list(kernel.configs)
                else:
                    candidates = prune(kernel, named_args, call_kwargs, target, NO_SMEM_LIMIT)
                if one_config:
                    candidates = kept[:1]
                variants = [(c.kwargs, c.num_warps, c.num_stages, c in kept) for c in candidates]
                tuned = True
            else:
                nw = options.get("num_warps", DEFAULT_NUM_WARPS)
                ns = options.get("num_stages", DEFAULT_NUM_STAGES)
                variants = [({}, nw, ns, True)]
                tuned = False
            for cfg_kwargs, num_warps, num_stages, is_kept in variants:
                bound = {**named_args, **call_kwargs, **cfg_kwargs}
                if not exhaustive:
                    bound.update({f: True for f in MERGED_FLAGS if f in bound})
                signature, constexprs, attrs = specialise(fn, bound)
                if tuned:
                    cfg = cfg_kwargs
                else:  # a fixed launch: name it after its tile constexprs
                    cfg = {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}
                key = (
                    name,
                    tuple(signature.items()),
                    repr(sorted(merge_key(name, constexprs, exhaustive).items())),
                    repr(sorted(attrs.items())),
                    num_warps,
                    num_stages,
                    target.arch,
                )
                job = jobs.get(key)
                if job is None:
                    job = jobs[key] = {
                        "kernel": name,
                        "module": f"fastfeat.kernels.{module}",
                        "target": target_name,
                        "arch": target.arch,
                        "config": config_name(cfg, num_warps, num_stages),
                        "num_warps": num_warps,
                        "num_stages": num_stages,
                        "signature": signature,
                        "constexprs": constexprs,
                        "attrs": attrs,
                        "pruned": not is_kept,
                        "launches": [],
                    }
                job["pruned"] = job["pruned"] and not is_kept  # in use if any launch keeps it
                if label not in job["launches"]:
                    job["launches"].append(label)
    return list(jobs.values())


def select_representative(items: list, dtype: str) -> list:
    """The launches named in REPRESENTATIVE, for ``dtype``."""
    chosen = []
    for template, kernel in REPRESENTATIVE:
        label = template.format(dtype=dtype)
        match = next((it for it in items if it[0] == label and it[1][1] == kernel), None)
        if match is None:
            raise RuntimeError(f"no launch of {kernel} labelled {label!r}; did the backend's plan change?")
        chosen.append(match)
    return chosen


# -- compiling ---------------------------------------------------------------------------------
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _worker_init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    from triton import knobs

    knobs.cache.dir = cache_dir
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output is printed; compile_job captures it
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its register report


def compiler_unavailable(arch: int) -> str | None:
    """Why ``triton.compile`` cannot build for ``arch`` here (a trivial kernel fails), or None."""
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        @triton.jit
        def _probe_kernel(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)

        src = ASTSource(_probe_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 128})
        with contextlib.redirect_stdout(io.StringIO()):  # a failing ptxas prints the whole PTX
            triton.compile(src, target=GPUTarget("cuda", arch, 32))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"
        return f"triton cannot compile for sm_{arch} on this machine: {_reason(f'{type(e).__name__}: {e}')}"
    return None


def compile_job(job: dict) -> dict:
    """Compile one job; returns its result fields (never raises for a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(getattr(importlib.import_module(job["module"]), job["kernel"]))
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    options = {"num_warps": job["num_warps"], "num_stages": job["num_stages"]}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=options)
    except Exception as e:  # noqa: BLE001 - every compiler error is a result to report
        text = f"{type(e).__name__}: {e}"
        return {"ok": False, "error": text[:MAX_ERROR_CHARS], "reason": _reason(text), "compile_s": _since(start)}
    ptxas = log.getvalue()
    regs = [int(r) for r in _REGS.findall(ptxas)]
    spills = [tuple(int(v) for v in m) for m in _SPILLS.findall(ptxas)]
    return {
        "ok": True,
        "n_regs": max(regs) if regs else None,
        "stack_bytes": sum(s[0] for s in spills),
        "spill_store_bytes": sum(s[1] for s in spills),
        "spill_load_bytes": sum(s[2] for s in spills),
        "n_spills": sum(s[1] + s[2] for s in spills),
        "shared_bytes": int(compiled.metadata.shared),
        "compile_s": _since(start),
    }


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)


def _reason(text: str) -> str:
    """One line of a compiler error worth showing in the table."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.startswith("Repro"):
            return ln[:160]
    return lines[-1][:160] if lines else "unknown error"


def assess(job: dict) -> list[str]:
    """Flags of a compiled job (see the module docstring)."""
    if not job["ok"]:
        return ["FAIL"]
    flags = []
    limit = TARGETS[job["target"]].smem_limit
    if job["shared_bytes"] > limit:
        flags.append("smem>limit(pruned)" if job["pruned"] else "SMEM>LIMIT")
    elif job["pruned"]:
        flags.append("pruned")
    regs = job["n_regs"] or 0
    if job["n_spills"]:
        if job["pruned"]:
            flags.append("spill(pruned)")
        elif job["n_spills"] <= MINOR_SPILL_BYTES and regs < MAX_REGS:
            flags.append("spill(minor)")
        else:
            flags.append("SPILL")
    if regs >= MAX_REGS:
        flags.append("regs-at-cap")
    return flags


def is_problem(job: dict) -> bool:
    return any(f in ("FAIL", "SMEM>LIMIT", "SPILL") for f in job["flags"])


# -- reporting ---------------------------------------------------------------------------------
def _kib(n) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def job_dtype(job: dict) -> str:
    """The activation dtype of a job (its x, or for the split-K reduction its output)."""
    sig = job["signature"]
    return sig.get("x_ptr", sig.get("y_ptr", "?")).lstrip("*")


def print_table(jobs: list[dict], verbose: bool) -> None:
    """One row per (kernel, dtype, config, target), worst case over its specialisations; every job with -v."""
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        key = (job["kernel"], job_dtype(job), job["config"], job["target"])
        groups.setdefault(key if not verbose else key + (id(job),), []).append(job)
    header = (
        f"{'kernel':<22} {'dtype':<5} {'config':<24} {'target':<6} {'ok':>5} {'regs':>5} {'spill':>6} {'smemKiB':>8}"
        "  flags"
    )
    print(header)
    print("-" * len(header))
    for key in sorted(groups, key=lambda k: k[:4]):
        rows = groups[key]
        ok = [r for r in rows if r["ok"]]
        regs = max((r["n_regs"] or 0 for r in ok), default=None)
        spill = max((r["n_spills"] for r in ok), default=None)
        smem = max((r["shared_bytes"] for r in ok), default=None)
        flags = sorted({f for r in rows for f in r["flags"]})
        first = rows[0]
        print(
            f"{first['kernel']:<22} {key[1]:<5} {first['config']:<24} {first['target']:<6} {len(ok):>2}/{len(rows):<2} "
            f"{'-' if regs is None else regs:>5} {'-' if spill is None else spill:>6} {_kib(smem):>8}  {' '.join(flags)}"
        )
        if verbose:
            print(f"    {', '.join(first['launches'])}")
    for job in jobs:
        if not job["ok"]:
            print(f"FAIL {job['kernel']} [{job['config']}] {job['target']}: {job['reason']}")
            print(f"     launches: {', '.join(job['launches'][:4])}{' ...' if len(job['launches']) > 4 else ''}")


def summarise(jobs: list[dict], wall_s: float) -> dict:
    """Counts, flags, and the worst registers / spills / shared memory among the configs that can launch."""
    ok = [j for j in jobs if j["ok"]]
    kept = [j for j in ok if not j["pruned"]]

    def worst(field):
        j = max(kept, key=lambda j: j[field] or 0, default=None)
        if j is None:
            return None
        return {"value": j[field], "kernel": j["kernel"], "config": j["config"], "target": j["target"]}

    flags: dict[str, int] = {}
    for j in jobs:
        for f in j["flags"]:
            flags[f] = flags.get(f, 0) + 1
    return {
        "compiled": len(jobs),
        "succeeded": len(ok),
        "failed": len(jobs) - len(ok),
        "problems": sum(is_problem(j) for j in jobs),
        "flags": flags,
        "worst_regs": worst("n_regs"),
        "worst_spills": worst("n_spills"),
        "worst_shared_bytes": worst("shared_bytes"),
        "wall_s": round(wall_s, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--models", nargs="+", default=["caffenet", "alexnet"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 256, 2048],
                    help="batch sizes (1: the M=1 specialisation and split-K; 2048: SPLIT_K=1 in fc6 and fc7)")  # fmt: skip
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    ap.add_argument("--extra-dtypes", nargs="*", default=["fp16", "fp32"], choices=list(DTYPES),
                    help="also compiled, every config, for the representative CaffeNet launches")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="one config (the first kept) per specialisation and target")
    ap.add_argument("--representative", action="store_true",
                    help="only the CI subset: one launch per kernel shape family, first kept config, bf16")  # fmt: skip
    ap.add_argument("--exhaustive", action="store_true",
                    help=f"do not merge launches that differ only in {', '.join(MERGED_FLAGS)}")  # fmt: skip
    ap.add_argument("--all-configs", action="store_true",
                    help="compile every config of the lists, also those the prune hooks drop (marked pruned)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="count the compiles per kernel and target, compile none")
    ap.add_argument("--jobs", type=int, default=1, help="compiler processes (default 1)")
    ap.add_argument("--json", help="write every result to this path")
    ap.add_argument("--verbose", "-v", action="store_true", help="one row per specialisation, with its layers")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    # Before triton is imported: with TRITON_INTERPRET=1, @triton.jit builds interpreter functions (which
    # cannot be compiled) and the autotune factories return their one interpreter config.
    os.environ.pop("TRITON_INTERPRET", None)
    cache_dir = tempfile.mkdtemp(prefix="fastfeat-compile-check-")  # keeps ~/.triton/cache clean
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        return run_check(args, cache_dir, started)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def run_check(args, cache_dir: str, started: float) -> int:
    for target in args.targets:
        why = compiler_unavailable(TARGETS[target].arch)
        if why:
            print(why)
            return EXIT_UNAVAILABLE
    make_importable()
    from fastfeat.kernels import interpreter_active

    if interpreter_active():
        raise SystemExit("triton was imported with TRITON_INTERPRET=1; the compile check needs the compiled kernels")

    launches: dict[str, list] = {t: [] for t in args.targets}

    def record(model, dtype, batches, representative=False):
        for target, items in record_model_launches(model, dtype, batches, args.targets).items():
            launches[target] += select_representative(items, dtype) if representative else items

    if args.representative:
        record("caffenet", "bf16", REPRESENTATIVE_BATCHES, representative=True)
    else:
        for model in args.models:
            for dtype in args.dtypes:
                record(model, dtype, args.batches)
        for dtype in [d for d in args.extra_dtypes if d not in args.dtypes]:
            record("caffenet", dtype, REPRESENTATIVE_BATCHES, representative=True)
    jobs = build_jobs(launches, args.targets, args.quick or args.representative, args.exhaustive, args.all_configs)
    print(f"{sum(len(v) for v in launches.values())} launches -> {len(jobs)} distinct compiles", flush=True)
    if args.dry_run:
        counts: dict[tuple, int] = {}
        for job in jobs:
            counts[(job["kernel"], job["target"])] = counts.get((job["kernel"], job["target"]), 0) + 1
        for (kernel, target), n in sorted(counts.items()):
            print(f"  {kernel:<22} {target}: {n}")
        return 0

    with ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=_worker_init, initargs=(cache_dir,)) as ex:
        results = list(ex.map(compile_job, jobs))
    for job, res in zip(jobs, results, strict=True):
        job.update(res)
        job["smem_limit"] = TARGETS[job["target"]].smem_limit
        job["flags"] = assess(job)

    print_table(jobs, args.verbose)
    summary = summarise(jobs, time.perf_counter() - started)
    print(json.dumps(summary, indent=1))
    if args.json:
        serialisable = [{**j, "attrs": {str(k[0]): v for k, v in j["attrs"].items()}} for j in jobs]
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "targets": {k: vars(v) for k, v in TARGETS.items()}, "jobs": serialisable},
                      f, indent=1, default=str)  # fmt: skip
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
