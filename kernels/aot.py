"""Ahead-of-time compile check of the fastfeat.kernels Triton kernels for A100 (sm_80) and H100/H200 (sm_90).

Needs no GPU: Triton compiles (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for a ``GPUTarget`` on the CPU with
the ptxas it bundles. That catches what the CPU interpreter never sees: ops or layouts the GPU backend
rejects, register spills, and configs whose shared memory does not fit the device.

The pieces, in the order a check uses them (``benchmarks/compile_check.py`` is the command line):

* ``recording(sm_count)``: replaces every kernel in ``KERNELS`` by a recorder, so that running the
  launchers (on empty CPU tensors) collects ``(module, kernel name, kernel, args, kwargs)`` launches;
* ``build_jobs``: specialises each launch exactly as ``JITFunction.run`` would, expands an autotuned
  launch into the configs its ``early_config_prune`` hook keeps on the target (each marked with whether
  the hook keeps it at the target's real shared-memory limit), and deduplicates the compiles;
* ``compile_jobs`` / ``compile_job``: compiles them (in worker processes), reading registers and
  spills from ptxas -v and shared memory from the compiled kernel;
* ``assess`` / ``is_problem`` / ``summarise``: the flags and totals (see ``assess``);
* ``normalise_ptx`` / ``compare_digests``: with ``ptx_digest=True`` each job also records the sha256 of
  its PTX without debug information (``ptx_sha256``), so that two checks (e.g. before and after a
  refactor of the kernel sources) can show which compiles changed their machine code.

Every private Triton API is reached through ``triton_compat`` (which names the Triton versions it was
checked against). This module imports neither triton nor torch at import time: a process that has
imported triton under ``TRITON_INTERPRET=1`` (the test suite) can import it to read its constants, and
the compiling process must settle TRITON_INTERPRET (unset it) before calling anything here that imports
triton, since ``@triton.jit`` under the interpreter builds kernels that cannot be compiled.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from . import triton_compat
from .kernel_list import KERNELS
from .triton_compat import DEFAULT_NUM_STAGES, DEFAULT_NUM_WARPS, LAUNCH_OPTIONS


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
# Kernels the JIT launchers run that the AOT library (native/generate.py) does not ship: recorded and
# compiled by the compile check, never part of the library's families or its kernel hash.
#
# The split-K reduce: the library ships both forms, ``_splitk_reduce_kernel`` (a second launch) and
# ``_linear_splitk_fused_kernel`` (the reduce folded into the GEMM), and runs the separate one unless the
# caller asks otherwise (fastfeat_gemm_desc.split_k_reduce; kernels/native.py: FASTFEAT_NATIVE_SPLITK_REDUCE).
# What the fused form took, for the record (ABI version 2):
#   * its int32 arrival counters (one per 16x16 output tile, zero before a launch and left zero after)
#     live at the end of the caller's workspace (``fastfeat_gemm_workspace_bytes`` grows by
#     4 * cdiv(M, 16) * cdiv(N, 16) bytes after the partials, 16-byte aligned), and the API requires that
#     workspace to be zeroed once before its first fused use and used by one stream at a time (the header
#     states the contract; kernels/native.py allocates it with torch.zeros per stream, layer_bench.cpp
#     memsets it once): a memset before each launch would be the second stream operation the fusion removes;
#   * native/generate.py's family ``linear_fused`` (key: the GEMM's M class and alignment classes, the exact
#     SPLIT_K, HAS_BIAS, APPLY_RELU, IEEE; grid as ``linear``'s with SPLIT_K splits; M batch-generic),
#     recorded under ``split_k_reduce_mode("fused")``; fastfeat_kernels.c's gemm_plan looks it up in place
#     of the ``linear`` + ``reduce`` pair when the descriptor asks for the fused reduce;
#   * kernel_list.KERNELS holds the kernel, which changed the kernel hash (libraries built before are refused).
# Still unmeasured: the acq_rel ordering through a cubin launched by the AOT dispatcher, and which form is
# faster, need a GPU (native/tests/test_gpu_splitk.py, gpu_check's native step); the two forms give the
# same bits, so the default can change without changing any result.
JIT_ONLY_KERNELS = (
    ("pool_rows", "_maxpool_rows_nhwc_kernel"),
    ("conv_splitk", "_conv2d_nhwc_segmented_kernel"),
    ("lrn", "_lrn_nhwc_fitted_kernel"),
)
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
# and the launches that the extra dtypes are compiled for. Labels are "<model>/<op name> <dtype> b<batch>".
REPRESENTATIVE = (
    ("caffenet/conv3+relu3 {dtype} b256", "_conv2d_nhwc_kernel"),  # tap loop
    ("caffenet/conv1+relu1 {dtype} b256", "_conv2d_nhwc_kernel"),  # flattened (kh, kw, cin) loop
    ("caffenet/fc6+relu6 {dtype} b2048", "_linear_kernel"),  # SPLIT_K == 1, full tiles
    ("caffenet/fc6+relu6 {dtype} b1", "_linear_kernel"),  # SPLIT_K > 1, thin tiles
    ("caffenet/fc6+relu6 {dtype} b1", "_splitk_reduce_kernel"),
    ("caffenet/fc6+relu6 {dtype} b1", "_linear_splitk_fused_kernel"),  # split-K, reduce folded in
    ("caffenet/conv1 s2d {dtype} b256", "_conv2d_nhwc_kernel"),  # conv1 as a space-to-depth 3x3 tap loop
    ("caffenet/conv3 splitk {dtype} b1", "_conv2d_nhwc_segmented_kernel"),  # one program per (tile, segment)
    ("caffenet/conv3 splitk {dtype} b256", "_conv2d_nhwc_segmented_kernel"),  # segments summed in one program
    ("caffenet/pool1+norm1 rows {dtype} b256", "_maxpool_rows_nhwc_kernel"),  # row-walking pool + LRN
    ("caffenet/pool1+norm1 rows-halo {dtype} b256", "_maxpool_rows_nhwc_kernel"),  # fitted BLOCK_C + LRN halo
    ("caffenet/pool5 rows {dtype} b256", "_maxpool_rows_nhwc_kernel"),  # the same, no LRN, fitted BLOCK_C
    ("caffenet/relu1+pool1+norm1 {dtype} b256", "_maxpool_nhwc_kernel"),  # ReLU + pool + LRN in one kernel
    ("caffenet/norm1 {dtype} b256", "_lrn_nhwc_kernel"),
    ("caffenet/norm1 fitted {dtype} b256", "_lrn_nhwc_fitted_kernel"),  # fitted BLOCK_C + channel halo
)
# Batch sizes the representative launches need (b1: M=1 and split-K; b2048: SPLIT_K=1).
REPRESENTATIVE_BATCHES = (1, 256, 2048)
# Dtype names of the command line -> torch attribute names.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Epilogue switches (one fused op each): by default launches that differ only in these compile once, in
# the heavier setting (True); exhaustive=True compiles every setting that occurs.
MERGED_FLAGS = ("APPLY_RELU", "HAS_BIAS")

__all__ = [
    "DEFAULT_NUM_STAGES",
    "DEFAULT_NUM_WARPS",
    "DTYPES",
    "EXIT_UNAVAILABLE",
    "JIT_ONLY_KERNELS",
    "KERNELS",
    "LAUNCH_OPTIONS",
    "MAX_REGS",
    "MERGED_FLAGS",
    "MINOR_SPILL_BYTES",
    "REPRESENTATIVE",
    "REPRESENTATIVE_BATCHES",
    "TARGETS",
    "Target",
    "assess",
    "build_jobs",
    "compare_digests",
    "compile_job",
    "compile_jobs",
    "compiler_unavailable",
    "config_name",
    "count_compiles",
    "is_problem",
    "job_dtype",
    "job_key",
    "label",
    "merge_key",
    "normalise_ptx",
    "prune",
    "recording",
    "select_representative",
    "specialise",
    "split_k_reduce_mode",
    "summarise",
    "to_json",
    "worker_init",
]


def label(model: str, op_name: str, dtype_name: str, batch: int) -> str:
    """The label of a recorded launch, as ``REPRESENTATIVE`` and the JSON's ``launches`` spell it."""
    return f"{model}/{op_name} {dtype_name} b{batch}"


# -- recording the launches ------------------------------------------------------------------------
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
def recording(sm_count: int, split_k_reduce: str = "separate"):
    """Replace every kernel by a recorder; let the launchers accept CPU tensors; fix the SM count.

    ``split_k_reduce``: how ``linear`` sums split-K partials while recording: "separate" (the default:
    what the AOT library runs unless told otherwise; a GEMM and a reduce launch) or "fused" (one launch;
    the JIT path's default). ``split_k_reduce_mode`` switches it inside a recording.

    Yields the list the launches are appended to, as ``(module, kernel name, kernel, args, kwargs)``
    with tensors replaced by their dtype. Everything is restored on exit.
    """
    package = importlib.import_module(__package__)
    from . import autotune, conv, conv_splitk, gemm, launch_args

    sink: list = []
    saved = []

    def patch(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    try:
        for module, name in KERNELS + JIT_ONLY_KERNELS:
            mod = importlib.import_module(f".{module}", __package__)
            patch(mod, name, _Recorder(module, name, getattr(mod, name), sink))
        # The launchers' device checks accept CPU tensors only "under the interpreter".
        patch(package, "interpreter_active", lambda: True)
        patch(autotune, "interpreter_active", lambda: True)
        patch(launch_args, "interpreter_active", lambda: True)
        for module in (gemm, conv, conv_splitk):
            patch(module, "sm_count", lambda device: sm_count)
        patch(gemm, "DEFAULT_SPLIT_K_REDUCE", split_k_reduce)
        yield sink
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


@contextlib.contextmanager
def split_k_reduce_mode(mode: str):
    """Inside ``recording``: record ``linear``'s split-K launches with reduce ``mode`` ("fused" or "separate")."""
    from . import gemm

    if mode not in gemm.SPLIT_K_REDUCES:
        raise ValueError(f"split-K reduce must be one of {gemm.SPLIT_K_REDUCES}, got {mode!r}")
    saved = gemm.DEFAULT_SPLIT_K_REDUCE
    gemm.DEFAULT_SPLIT_K_REDUCE = mode
    try:
        yield
    finally:
        gemm.DEFAULT_SPLIT_K_REDUCE = saved


# -- specialisation and pruning ------------------------------------------------------------------
def _as_arg(value):
    return triton_compat.mock_tensor(value.dtype) if isinstance(value, _TensorInfo) else value


def specialise(fn, bound: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs by name, attrs by (index,)) for a launch with the argument values ``bound``."""
    return triton_compat.specialise(fn, bound, _as_arg)


def prune(autotuner, named_args: dict, kwargs: dict, target: Target, smem_limit: int) -> list:
    """The configs the autotuner's early_config_prune keeps on ``target`` with ``smem_limit`` bytes."""
    from . import autotune

    saved = autotune._max_shared_memory, autotune._device_capability
    autotune._max_shared_memory = lambda index: smem_limit
    autotune._device_capability = lambda index: target.arch // 10
    try:
        return triton_compat.early_prune(autotuner, named_args, kwargs)
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
    """Deduplicated compile jobs for the recorded launches (``{target: [(label, launch)]}``) on each target.

    An autotuned launch compiles the configs its prune hook keeps when shared memory is unlimited (so
    an overflow is seen, not hidden), or every config with ``all_configs``, or with ``one_config`` only
    the first config the hook keeps at the real limit; each job records whether the hook, with the
    target's real limit, keeps it. Launches that differ only in ``MERGED_FLAGS`` compile once (unless
    ``exhaustive``), and so do the GEMM's SPLIT_K > 1 values.
    """
    jobs: dict[tuple, dict] = {}
    for target_name in targets:
        target = TARGETS[target_name]
        for launch_label, (module, name, kernel, args, kwargs) in launches[target_name]:
            fn = triton_compat.jit_function(kernel)
            options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
            call_kwargs = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
            named_args = dict(zip(triton_compat.arg_names(fn), args, strict=False))
            if triton_compat.is_autotuner(kernel):
                kept = prune(kernel, named_args, call_kwargs, target, target.smem_limit)
                if all_configs:
                    candidates = triton_compat.autotune_configs(kernel)
                else:
                    candidates = prune(kernel, named_args, call_kwargs, target, NO_SMEM_LIMIT)
                if one_config:
                    candidates = kept[:1]
                variants = [(*triton_compat.config_fields(c), c in kept) for c in candidates]
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
                        "module": f"{__package__}.{module}",
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
                if launch_label not in job["launches"]:
                    job["launches"].append(launch_label)
    return list(jobs.values())


def select_representative(items: list, dtype: str) -> list:
    """The launches named in REPRESENTATIVE, for ``dtype``, from a list of ``(label, launch)``."""
    chosen = []
    for template, kernel in REPRESENTATIVE:
        wanted = template.format(dtype=dtype)
        match = next((it for it in items if it[0] == wanted and it[1][1] == kernel), None)
        if match is None:
            raise RuntimeError(f"no launch of {kernel} labelled {wanted!r}; did the backend's plan change?")
        chosen.append(match)
    return chosen


def count_compiles(jobs: list[dict]) -> dict[tuple[str, str], int]:
    """Number of jobs per (kernel, target)."""
    counts: dict[tuple[str, str], int] = {}
    for job in jobs:
        counts[(job["kernel"], job["target"])] = counts.get((job["kernel"], job["target"]), 0) + 1
    return counts


# -- compiling ---------------------------------------------------------------------------------
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def worker_init(cache_dir: str) -> None:
    """Set up a compiling process: compiled (not interpreted) kernels, ``cache_dir``, ptxas -v reports."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    triton_compat.configure_compiler(cache_dir)


def compiler_unavailable(arch: int) -> str | None:
    """Why triton cannot build for ``arch`` here (a trivial kernel fails), or None."""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _probe_kernel(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)

        # A failing ptxas prints the whole PTX; compile_for_cuda captures it.
        triton_compat.compile_for_cuda(
            _probe_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 128}, {}, arch
        )
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"
        return f"triton cannot compile for sm_{arch} on this machine: {_reason(f'{type(e).__name__}: {e}')}"
    return None


def preflight(targets) -> str | None:
    """Before compiling: warn (stderr) when Triton is a version ``triton_compat`` was not checked
    against, and say why a target cannot compile here (None when every one can)."""
    import sys

    unchecked = triton_compat.unchecked_version_message()
    if unchecked:
        print(f"warning: {unchecked}", file=sys.stderr)
    for target in targets:
        why = compiler_unavailable(TARGETS[target].arch)
        if why:
            return why
    return None


def compile_job(job: dict, ptx_digest: bool = False, ptx_dir: str | None = None) -> dict:
    """Compile one job; returns its result fields (never raises for a compile error).

    ``ptx_digest``: also ``ptx_sha256``, the sha256 of ``normalise_ptx(ptx)``; ``ptx_dir``: also write that
    normalised PTX to ``<ptx_dir>/<ptx_file_name(job)>`` (to diff the jobs whose digest changed)."""
    fn = triton_compat.jit_function(getattr(importlib.import_module(job["module"]), job["kernel"]))
    options = {"num_warps": job["num_warps"], "num_stages": job["num_stages"]}
    start = time.perf_counter()
    try:
        shared, ptxas, ptx = triton_compat.compile_for_cuda(
            fn, job["signature"], job["constexprs"], job["attrs"], job["arch"], options
        )
    except Exception as e:  # noqa: BLE001 - every compiler error is a result to report
        text = f"{type(e).__name__}: {e}"
        return {"ok": False, "error": text[:MAX_ERROR_CHARS], "reason": _reason(text), "compile_s": _since(start)}
    regs = [int(r) for r in _REGS.findall(ptxas)]
    spills = [tuple(int(v) for v in m) for m in _SPILLS.findall(ptxas)]
    result = {
        "ok": True,
        "n_regs": max(regs) if regs else None,
        "stack_bytes": sum(s[0] for s in spills),
        "spill_store_bytes": sum(s[1] for s in spills),
        "spill_load_bytes": sum(s[2] for s in spills),
        "n_spills": sum(s[1] + s[2] for s in spills),
        "shared_bytes": shared,
        "compile_s": _since(start),
    }
    if ptx_digest or ptx_dir:
        code = normalise_ptx(ptx)
        result["ptx_sha256"] = hashlib.sha256(code.encode()).hexdigest()
        if ptx_dir:
            with open(os.path.join(ptx_dir, ptx_file_name(job)), "w") as f:
                f.write(code)
    return result


def compile_jobs(
    jobs: list[dict], processes: int, cache_dir: str, ptx_digest: bool = False, ptx_dir: str | None = None
) -> list[dict]:
    """Compile every job in ``processes`` worker processes; adds the results, ``smem_limit`` and ``flags``
    (and ``ptx_sha256`` with ``ptx_digest``; see ``compile_job``)."""
    work = functools.partial(compile_job, ptx_digest=ptx_digest, ptx_dir=ptx_dir)
    with ProcessPoolExecutor(max_workers=max(1, processes), initializer=worker_init, initargs=(cache_dir,)) as ex:
        results = list(ex.map(work, jobs))
    for job, res in zip(jobs, results, strict=True):
        job.update(res)
        job["smem_limit"] = TARGETS[job["target"]].smem_limit
        job["flags"] = assess(job)
    return jobs


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)


def _reason(text: str) -> str:
    """One line of a compiler error worth showing in the table."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.startswith("Repro"):
            return ln[:160]
    return lines[-1][:160] if lines else "unknown error"


# -- assessing ---------------------------------------------------------------------------------
def assess(job: dict) -> list[str]:
    """Flags of a compiled job.

    * ``FAIL``: the compiler raised;
    * ``SMEM>LIMIT``: shared memory above the target's limit although the prune hook keeps the config;
    * ``SPILL``: ptxas spilled registers in a config the prune hook keeps;
    * ``smem>limit(pruned)``, ``spill(pruned)``, ``pruned``: the hook drops the config on that target;
    * ``spill(minor)``: at most MINOR_SPILL_BYTES spilled with registers to spare (ptxas's own choice);
    * ``regs-at-cap``: MAX_REGS registers per thread, no spill.

    FAIL, SMEM>LIMIT and SPILL are problems (``is_problem``).
    """
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


def job_dtype(job: dict) -> str:
    """The activation dtype of a job (its x, or for the split-K reduction its output)."""
    sig = job["signature"]
    return sig.get("x_ptr", sig.get("y_ptr", "?")).lstrip("*")


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


def to_json(jobs: list[dict], summary: dict) -> dict:
    """The JSON document of a check: summary, targets, and every job (attrs keyed by argument index)."""
    serialisable = [{**j, "attrs": {str(k[0]): v for k, v in j["attrs"].items()}} for j in jobs]
    return {"summary": summary, "targets": {k: vars(v) for k, v in TARGETS.items()}, "jobs": serialisable}


# -- PTX digests ---------------------------------------------------------------------------------------
# What ``normalise_ptx`` drops, besides comments and blank lines: line-table directives, DWARF sections
# (file paths, function and inlined-helper names, source ranges), and label definitions nothing refers to.
_PTX_SOURCE_DIRECTIVES = (".loc", ".file")
_PTX_DEBUG_SECTION = re.compile(r"^\s*\.section\s+\.debug_")
_PTX_LABEL_DEFINITION = re.compile(r"^\s*(\$L__\w+):$")
_PTX_LABEL = re.compile(r"\$L__\w+")


def normalise_ptx(ptx: str) -> str:
    """``ptx`` without what only encodes source positions or names, so that two compiles of the same code
    from sources that differ in layout (a helper moved, lines added, another checkout path) compare equal.

    Drops: ``//`` comments (LLVM's block and function notes), blank lines and trailing blanks, the ``.loc``
    and ``.file`` directives, every ``.section .debug_*`` block (the DWARF data: file paths, the names of
    the kernel and of each inlined ``@triton.jit`` helper, their address ranges), and the definitions of
    labels that nothing left refers to (``$L__func_begin0``, ``$L__tmp3``: the marks those ranges used).
    Kept: everything else, instructions and branch labels included, in order.
    """
    kept: list[str] = []
    section = None  # inside a debug section: [seen its opening brace, brace depth]
    for raw in ptx.splitlines():
        line = raw.split("//", 1)[0].rstrip()
        body = line.strip()
        if section is not None and body:
            if not section[0] and not body.startswith("{"):
                section = None  # a section with no body: this line is code again
            else:
                section[0] = section[0] or "{" in body
                section[1] += body.count("{") - body.count("}")
                if section[1] <= 0:
                    section = None
                continue
        if _PTX_DEBUG_SECTION.match(line):
            depth = body.count("{") - body.count("}")
            section = None if "{" in body and depth <= 0 else ["{" in body, depth]
            continue
        if not body or body.split(None, 1)[0] in _PTX_SOURCE_DIRECTIVES:
            continue
        kept.append(line)
    referenced = {name for line in kept if not _PTX_LABEL_DEFINITION.match(line) for name in _PTX_LABEL.findall(line)}
    kept = [ln for ln in kept if not (m := _PTX_LABEL_DEFINITION.match(ln)) or m.group(1) in referenced]
    return "\n".join(kept) + "\n"


def job_key(job: dict) -> str:
    """What identifies a compile across two checks (of two checkouts): kernel, target, config, signature,
    constexprs and divisibility attributes, as text (the same for a job in memory and read from JSON)."""
    attrs = {str(k[0]) if isinstance(k, tuple) else str(k): v for k, v in job["attrs"].items()}
    fields = [job["kernel"], job["target"], job["config"], job["num_warps"], job["num_stages"],
              job["signature"], job["constexprs"], attrs]  # fmt: skip
    return json.dumps(fields, sort_keys=True, default=str)


def ptx_file_name(job: dict) -> str:
    """``<kernel>-<target>-<12 hex digits of the job key>.ptx``: one file per job in a ``ptx_dir``."""
    return f"{job['kernel']}-{job['target']}-{hashlib.sha256(job_key(job).encode()).hexdigest()[:12]}.ptx"


def compare_digests(before: list[dict], after: list[dict]) -> dict:
    """Match the jobs of two checks by ``job_key`` and compare their ``ptx_sha256``.

    Returns {"compared", "identical", "changed": [(before job, after job)], "only_before": [jobs],
    "only_after": [jobs], "undigested": [job keys]}; a job without a digest on either side (failed, or
    compiled without ``ptx_digest``) is "undigested", never "identical"."""
    old = {job_key(j): j for j in before}
    new = {job_key(j): j for j in after}
    out = {"compared": 0, "identical": 0, "changed": [], "undigested": [],
           "only_before": [old[k] for k in old if k not in new], "only_after": [new[k] for k in new if k not in old]}  # fmt: skip
    for key in old.keys() & new.keys():
        a, b = old[key].get("ptx_sha256"), new[key].get("ptx_sha256")
        if a is None or b is None:
            out["undigested"].append(key)
            continue
        out["compared"] += 1
        if a == b:
            out["identical"] += 1
        else:
            out["changed"].append((old[key], new[key]))
    return out
