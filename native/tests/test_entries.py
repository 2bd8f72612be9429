"""ctest native_entries_cover_launches: every kernel launch the triton backend makes for the shipped
networks has a dispatcher entry in the built library, and the library picks the same kernel, config and
split-K as the Python launchers.

The launches are recorded afresh from the backend (``fastfeat.kernels.aot.recording`` over
``TritonNet.plan``; nothing is read from the build), at batch sizes the build did not record (the
library's specialisations are batch-generic), for every model, dtype and target. For each launch the
library's plan function -- the C code that computes what a launch of those arguments runs, with no GPU
-- is called through ctypes with the launcher's arguments, and its entry (entries.json, written by the
build) is compared with the config ``aot.build_jobs`` chooses for the launch: the first the prune hook
keeps, as FASTFEAT_AUTOTUNE=0 runs it. A kernel, model, launcher or prune-rule change that the build has
not seen fails here.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import generate  # noqa: E402  (native/generate.py: its recorder, which is the backend's)
from _common import entries, library_path  # noqa: E402

from fastfeat.kernels import aot, native, triton_compat  # noqa: E402

# Batch sizes the build does not record: odd and round ones, every split-K regime of the fc layers.
CONV_BATCHES = (3, 32)
FC_BATCHES = (1, 5, 24, 33, 100, 200, 333, 640, 1000, 2000, 5000)
DTYPE_CODES = {d: i for i, d in enumerate(generate.DTYPES)}


def desc_and_plan(lib, family: str, v: dict, arch: int, sm_count: int, dtype: int):
    """The library's plan for a recorded launch with argument values ``v`` (named args + constexprs)."""
    plan = native.Plan()
    tf32 = int(v.get("DOT_PRECISION") == "tf32")
    if family == "conv":
        n = v["M_GEMM"] // (v["OH"] * v["OW"])
        d = native.ConvDesc(n, v["H"], v["W"], v["C_IN"], v["C_OUT"], v["C_IN"] // v["CIN_G"], v["KH"], v["KW"],
                            v["STRIDE_H"], v["STRIDE_W"], v["PAD_H"], v["PAD_W"], int(v["APPLY_RELU"]),
                            int(v["HAS_BIAS"]), tf32)  # fmt: skip
        status = lib.fastfeat_conv2d_plan(arch, sm_count, dtype, d, ctypes.byref(plan))
    elif family in ("linear", "linear_fused"):
        # A _linear_kernel launch is either half of the separate reduce's pair or a GEMM without split-K
        # (the same entry whichever reduce recorded it); the fused kernel is the fused reduce's one launch.
        reduce = native.SPLIT_K_REDUCE_CODES["fused" if family == "linear_fused" else "separate"]
        d = native.GemmDesc(v["M"], v["N"], v["K"], v["STRIDE_WK"], v["N_LOAD"], int(v["APPLY_RELU"]),
                            int(v["HAS_BIAS"]), tf32, reduce)  # fmt: skip
        status = lib.fastfeat_gemm_plan(arch, sm_count, dtype, d, ctypes.byref(plan))
    elif family == "pool":
        n = v["P_TOTAL"] // (v["OH"] * v["OW"])
        lrn = native.LrnParams(v["LRN_SIZE"], v["alpha_over_n"] * v["LRN_SIZE"], v["beta"], v["lrn_k"])
        status = None
        for ceil_mode in (0, 1):  # the launch records the output size, not the rounding: find the one that gives it
            d = native.PoolDesc(n, v["H"], v["W"], v["C"], v["KH"], v["KW"], v["STRIDE_H"], v["STRIDE_W"], v["PAD_H"],
                                v["PAD_W"], ceil_mode, int(v["APPLY_RELU"]), int(v["FUSE_LRN"]), lrn)  # fmt: skip
            oh, ow = ctypes.c_int(0), ctypes.c_int(0)
            if lib.fastfeat_maxpool_output_size(d, ctypes.byref(oh), ctypes.byref(ow)) == 0 and (
                oh.value,
                ow.value,
            ) == (v["OH"], v["OW"]):
                status = lib.fastfeat_maxpool_plan(arch, sm_count, dtype, d, ctypes.byref(plan))
                break
        if status is None:
            raise AssertionError(f"no pool rounding gives the recorded {v['OH']}x{v['OW']}")
    else:
        d = native.LrnDesc(
            v["P_TOTAL"], 1, 1, v["C"], native.LrnParams(v["SIZE"], v["alpha_over_n"] * v["SIZE"], v["beta"], v["k"])
        )
        status = lib.fastfeat_lrn_plan(arch, sm_count, dtype, d, ctypes.byref(plan))
    return status, plan


def check_fused_workspace(plan, v: dict, where: str, failures: list) -> None:
    """The fused reduce's workspace: the launcher's fp32 partials, then its arrival counters (one int32 per
    ARRIVAL_TILE-square tile, as many as the launcher's buffer holds at least) at a 16-byte aligned offset."""
    from fastfeat.kernels.gemm import ARRIVAL_TILE

    partials = int(v["SPLIT_K"]) * int(v["M"]) * int(v["N"]) * 4
    counters = -(-int(v["M"]) // ARRIVAL_TILE) * -(-int(v["N"]) // ARRIVAL_TILE) * 4
    want = (-(-partials // 16) * 16 + counters, counters)
    if (plan.workspace_bytes, plan.counter_bytes) != want:
        failures.append(f"{where}: fused workspace {plan.workspace_bytes} B with {plan.counter_bytes} B of counters, "
                        f"expected {want[0]} B with {want[1]} B")  # fmt: skip


def main() -> int:
    started = time.perf_counter()
    os.environ.pop("TRITON_INTERPRET", None)
    lib = native.load(library_path())
    doc = entries()
    listing, built = doc["entries"], doc["built"]
    from fastfeat.models import list_models

    if set(built["models"]) != set(list_models()) or set(built["dtypes"]) != set(generate.DTYPES):
        print(f"note: a partial build ({built}); checking the launches of that matrix only")
    launches = generate.record_launches(built["models"], built["dtypes"], built["targets"], CONV_BATCHES, FC_BATCHES)
    failures: list[str] = []
    checked = 0
    for target, items in launches.items():
        t = aot.TARGETS[target]
        pending_reduce = None  # the reduce entry a split-K GEMM plan announced, checked on the next launch
        for label, launch in items:
            module, name, kernel, args, kwargs = launch
            fn = triton_compat.jit_function(kernel)
            named = {**dict(zip(triton_compat.arg_names(fn), args, strict=False)), **kwargs}
            [job] = aot.build_jobs({target: [(label, launch)]}, [target], True, True, False)
            values = {**named, **job["constexprs"]}
            family = generate.FAMILIES[name]
            dtype = aot.job_dtype(job)
            where = f"{label} [{target}] {name}"
            if family == "reduce":
                entry_index, pending_reduce = pending_reduce, None
                if entry_index is None:
                    failures.append(f"{where}: the library planned no split-K reduction before it")
                    continue
            else:
                if pending_reduce is not None:
                    failures.append(f"{where}: the library planned a split-K reduction the launcher did not make")
                    pending_reduce = None
                status, plan = desc_and_plan(lib, family, values, t.arch, t.sm_count, DTYPE_CODES[dtype])
                if status != 0:
                    failures.append(f"{where}: no entry ({native.status_string(lib, status)})")
                    continue
                entry_index = plan.entry[0]
                if family in ("linear", "linear_fused"):
                    split = int(values["SPLIT_K"])
                    if plan.split_k != split:
                        failures.append(f"{where}: library splits K {plan.split_k} ways, the launcher {split}")
                    launches = 2 if family == "linear" and split > 1 else 1
                    if plan.num_launches != launches:
                        failures.append(f"{where}: library plans {plan.num_launches} launches for SPLIT_K={split}")
                    if family == "linear_fused":
                        check_fused_workspace(plan, values, where, failures)
                    if plan.num_launches == 2:
                        pending_reduce = plan.entry[1]
            e = listing[entry_index]
            want = {"kernel": name, "dtype": dtype, "target": target, "config": job["config"],
                    "num_warps": job["num_warps"], "num_stages": job["num_stages"],
                    "key": dict(zip(generate.KEY_FIELDS[family], generate.launch_key(family, named, job["constexprs"]), strict=True))}  # fmt: skip
            got = {k: e[k] for k in want}
            if got != want:
                failures.append(f"{where}: entry {entry_index} is {got}, the launcher runs {want}")
            checked += 1
    for f in failures[:40]:
        print("FAIL", f)
    print(f"{checked} launches checked against {len(listing)} entries in {time.perf_counter() - started:.1f} s; "
          f"{len(failures)} failures")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
