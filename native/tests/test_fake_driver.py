"""ctest native_fake_driver: the GEMM entry point's launch arithmetic for both split-K reduces, on a machine
with no GPU. ctest points FASTFEAT_CUDA_DRIVER at native/tests/fake_cuda.c (one sm_90 GPU with 132 SMs that
records each launch instead of running it), so ``fastfeat_gemm_bias_relu`` goes all the way to
cuLaunchKernel. Checked, for CaffeNet's fc6 at batch 1 and fc8 at batch 256:

* ``fastfeat_gemm_workspace_bytes`` per reduce (the fused one's includes the counters);
* a workspace one byte short, the separate form's size for the fused form, and NULL are refused with
  FASTFEAT_ERR_WORKSPACE, before anything launches;
* separate: two launches, the GEMM's grid over (tiles, split_k) writing the partials to the workspace,
  then the reduce; fused: one launch of the fused kernel over (tiles, split_k), the partials at the
  workspace's start and the arrival counters at the 16-byte aligned offset the plan reports.

Numerics need a GPU (test_gpu_splitk.py).
"""

from __future__ import annotations

import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import entries, library_path  # noqa: E402

from fastfeat.kernels import native  # noqa: E402  (imports neither torch nor triton)

WORKSPACE = 9
BASE = 1 << 24  # fake device addresses, 16-byte aligned; never dereferenced
X, W, B, Y, WS = (ctypes.c_void_p(BASE * i) for i in range(1, 6))
CASES = (  # (label, dtype code, m, n, k, padded row stride, relu)
    ("fc6 bf16 b1", 2, 1, 4096, 9216, 4096, 1),
    ("fc8 fp16 b256", 1, 256, 1000, 4096, 1008, 0),
)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def main() -> int:
    driver = os.environ.get("FASTFEAT_CUDA_DRIVER", "")
    fake = ctypes.CDLL(driver)  # the same handle the library's shim opened: its records are ours
    fake.fake_cuda_launch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint),
                                      ctypes.POINTER(ctypes.c_ulonglong)]  # fmt: skip
    lib = native.load(library_path())
    listing = entries()["entries"]
    failures: list[str] = []
    arch, sms = ctypes.c_int(0), ctypes.c_int(0)
    status = lib.fastfeat_check_device(ctypes.byref(arch), ctypes.byref(sms))
    if (status, arch.value, sms.value) != (0, 90, 132):
        print(f"FAIL the fake driver is not in use: status {status}, sm_{arch.value}, {sms.value} SMs ({driver})")
        return 1

    def recorded() -> list[tuple[str, tuple, tuple]]:
        out = []
        for i in range(fake.fake_cuda_num_launches()):
            name, grid, ptrs = ctypes.create_string_buffer(128), (ctypes.c_uint * 3)(), (ctypes.c_ulonglong * 6)()
            n = fake.fake_cuda_launch(i, name, 128, grid, ptrs)
            out.append((name.value.decode(), tuple(grid), tuple(ptrs[:n])))
        fake.fake_cuda_reset()
        return out

    for label, dtype, m, n, k, stride, relu in CASES:
        sizes, plans = {}, {}
        for form, code in native.SPLIT_K_REDUCE_CODES.items():
            d = native.GemmDesc(m, n, k, stride, stride, relu, 1, 0, code)
            need, plan = ctypes.c_size_t(0), native.Plan()
            if lib.fastfeat_gemm_workspace_bytes(d, ctypes.byref(need)) != 0:
                failures.append(f"{label} {form}: workspace query failed")
            if lib.fastfeat_gemm_plan(90, 132, dtype, d, ctypes.byref(plan)) != 0 or plan.split_k < 2:
                failures.append(f"{label} {form}: no split-K plan (split {plan.split_k})")
                continue
            if need.value != plan.workspace_bytes:
                failures.append(f"{label} {form}: workspace query {need.value} B, plan {plan.workspace_bytes} B")
            sizes[form], plans[form] = need.value, (d, plan)
        if len(plans) != 2:
            continue

        def gemm(form, workspace, nbytes, plans=plans, dtype=dtype):
            return lib.fastfeat_gemm_bias_relu(None, dtype, plans[form][0], X, W, B, Y, workspace, nbytes)

        refusals = (
            ("separate, one byte short", "separate", WS, sizes["separate"] - 1),
            ("separate, no workspace", "separate", None, 0),
            ("fused, one byte short", "fused", WS, sizes["fused"] - 1),
            ("fused, the separate form's size", "fused", WS, sizes["separate"]),
            ("fused, no workspace", "fused", None, 0),
        )
        for what, form, workspace, nbytes in refusals:
            status = gemm(form, workspace, nbytes)
            if status != WORKSPACE:
                failures.append(f"{label} {what}: status {status} ({native.status_string(lib, status)}), expected {WORKSPACE}")  # fmt: skip
        if recorded():
            failures.append(f"{label}: a refused call launched")

        sep_plan, fused_plan = plans["separate"][1], plans["fused"][1]
        splits = sep_plan.split_k
        if sizes["separate"] != splits * m * n * 4 or sep_plan.counter_bytes != 0:
            failures.append(f"{label}: separate workspace {sizes['separate']} B, counters {sep_plan.counter_bytes} B")
        counters = cdiv(m, 16) * cdiv(n, 16) * 4
        if (sizes["fused"], fused_plan.counter_bytes) != (cdiv(splits * m * n * 4, 16) * 16 + counters, counters):
            failures.append(
                f"{label}: fused workspace {sizes['fused']} B with {fused_plan.counter_bytes} B of counters"
            )

        status = gemm("separate", WS, sizes["separate"])
        got = recorded()
        tile = listing[sep_plan.entry[0]]["tile"]
        grid = (cdiv(m, tile["BLOCK_M"]) * cdiv(n, tile["BLOCK_N"]), splits, 1)
        if status != 0 or [g[0] for g in got] != [listing[e]["kernel"] for e in sep_plan.entry]:
            failures.append(f"{label} separate: status {status}, launches {got}")
        elif got[0][1] != grid or got[0][2] != (X.value, W.value, B.value, Y.value, WS.value):
            failures.append(f"{label} separate GEMM: grid {got[0][1]} (expected {grid}), pointers {got[0][2]}")
        elif got[1][2] != (WS.value, B.value, Y.value):
            failures.append(f"{label} separate reduce: pointers {got[1][2]}")

        status = gemm("fused", WS, sizes["fused"])
        got = recorded()
        tile = listing[fused_plan.entry[0]]["tile"]
        grid = (cdiv(m, tile["BLOCK_M"]) * cdiv(n, tile["BLOCK_N"]), splits, 1)
        arrivals = WS.value + sizes["fused"] - counters
        if status != 0 or [g[0] for g in got] != ["_linear_splitk_fused_kernel"]:
            failures.append(f"{label} fused: status {status}, launches {got}")
        elif got[0][1] != grid:
            failures.append(f"{label} fused: grid {got[0][1]}, expected {grid}")
        elif got[0][2] != (X.value, W.value, B.value, Y.value, WS.value, arrivals) or arrivals % 16:
            failures.append(f"{label} fused: pointers {got[0][2]}, expected the counters at {arrivals:#x}")
        # One counter per launched tile fits in the counters (16x16 tiles are the smallest any config has).
        if grid[0] * 4 > counters:
            failures.append(f"{label} fused: {grid[0]} tiles but {counters // 4} counters")

    for f in failures:
        print("FAIL", f)
    print(f"{len(CASES)} GEMMs checked through the fake driver; {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
