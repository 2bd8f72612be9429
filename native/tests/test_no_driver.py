"""ctest native_no_driver: the library loads with ctypes on a machine without a CUDA driver (ctest points
FASTFEAT_CUDA_DRIVER at a path that cannot exist), and every entry point answers with a status, never
a crash: "no CUDA driver" for well-formed calls, argument errors for malformed ones."""

from __future__ import annotations

import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import library_path  # noqa: E402

from fastfeat.kernels import native  # noqa: E402  (imports neither torch nor triton)

NO_DRIVER = native.ERR_NO_DRIVER
INVALID, BAD_DTYPE, SHAPE, ARCH = 1, 2, native.ERR_UNSUPPORTED_SHAPE, native.ERR_WRONG_ARCH
# Any 16-byte aligned address: never dereferenced, the driver check comes first.
FAKE = ctypes.c_void_p(1 << 20)
BF16 = 2


def main() -> int:
    lib = native.load(library_path())
    failures = []

    def expect(what, got, want):
        if got != want:
            failures.append(f"{what}: status {got} ({native.status_string(lib, got)}), expected {want}")

    conv = native.ConvDesc(2, 27, 27, 96, 256, 2, 5, 5, 1, 1, 2, 2, 1, 1, 0)
    pool = native.PoolDesc(2, 55, 55, 96, 3, 3, 2, 2, 0, 0, 1, 1, 1, native.LrnParams(5, 1e-4, 0.75, 1.0))
    lrn = native.LrnDesc(2, 27, 27, 256, native.LrnParams(5, 1e-4, 0.75, 1.0))
    gemm = native.GemmDesc(2, 4096, 9216, 4096, 4096, 1, 1, 0)
    size = ctypes.c_size_t(0)
    arch, sms = ctypes.c_int(0), ctypes.c_int(0)

    # Every launching entry point, well formed: no driver.
    expect("conv2d", lib.fastfeat_conv2d_bias_relu(None, BF16, conv, FAKE, FAKE, FAKE, FAKE), NO_DRIVER)
    expect("maxpool", lib.fastfeat_maxpool_relu_lrn(None, BF16, pool, FAKE, FAKE), NO_DRIVER)
    expect("lrn", lib.fastfeat_lrn(None, BF16, lrn, FAKE, FAKE), NO_DRIVER)
    expect("gemm", lib.fastfeat_gemm_bias_relu(None, BF16, gemm, FAKE, FAKE, FAKE, FAKE, FAKE, 1 << 30), NO_DRIVER)
    expect("gemm_workspace_bytes", lib.fastfeat_gemm_workspace_bytes(gemm, ctypes.byref(size)), NO_DRIVER)
    fused = native.GemmDesc(2, 4096, 9216, 4096, 4096, 1, 1, 0, native.SPLIT_K_REDUCE_CODES["fused"])
    expect(
        "gemm fused", lib.fastfeat_gemm_bias_relu(None, BF16, fused, FAKE, FAKE, FAKE, FAKE, FAKE, 1 << 30), NO_DRIVER
    )
    expect("gemm_workspace_bytes fused", lib.fastfeat_gemm_workspace_bytes(fused, ctypes.byref(size)), NO_DRIVER)
    expect("check_device", lib.fastfeat_check_device(ctypes.byref(arch), ctypes.byref(sms)), NO_DRIVER)
    if "/nonexistent/" not in lib.fastfeat_driver_error().decode():
        failures.append(f"driver error does not name the library tried: {lib.fastfeat_driver_error().decode()!r}")

    # Malformed calls are refused before the driver is asked, and never crash.
    expect("conv2d NULL desc", lib.fastfeat_conv2d_bias_relu(None, BF16, None, FAKE, FAKE, FAKE, FAKE), INVALID)
    expect("conv2d NULL x", lib.fastfeat_conv2d_bias_relu(None, BF16, conv, None, FAKE, FAKE, FAKE), INVALID)
    expect("conv2d misaligned y", lib.fastfeat_conv2d_bias_relu(None, BF16, conv, FAKE, FAKE, FAKE, ctypes.c_void_p((1 << 20) + 2)), INVALID)  # fmt: skip
    expect("conv2d dtype 7", lib.fastfeat_conv2d_bias_relu(None, 7, conv, FAKE, FAKE, FAKE, FAKE), BAD_DTYPE)
    expect("maxpool dtype -1", lib.fastfeat_maxpool_relu_lrn(None, -1, pool, FAKE, FAKE), BAD_DTYPE)
    expect("lrn NULL desc", lib.fastfeat_lrn(None, BF16, None, FAKE, FAKE), INVALID)
    expect("gemm NULL y", lib.fastfeat_gemm_bias_relu(None, BF16, gemm, FAKE, FAKE, FAKE, None, None, 0), INVALID)
    expect("gemm_workspace_bytes NULL out", lib.fastfeat_gemm_workspace_bytes(gemm, None), INVALID)
    bad_reduce = native.GemmDesc(2, 4096, 9216, 4096, 4096, 1, 1, 0, 7)  # neither separate (0) nor fused (1)
    expect("gemm split_k_reduce 7", lib.fastfeat_gemm_bias_relu(None, BF16, bad_reduce, FAKE, FAKE, FAKE, FAKE, FAKE, 1 << 30), INVALID)  # fmt: skip
    expect("gemm_workspace_bytes split_k_reduce 7", lib.fastfeat_gemm_workspace_bytes(bad_reduce, ctypes.byref(size)), INVALID)  # fmt: skip

    # Plans need no GPU: a shipped layer resolves, others are refused with a reason.
    plan = native.Plan()
    expect("plan conv2 sm90", lib.fastfeat_conv2d_plan(90, 132, BF16, conv, ctypes.byref(plan)), 0)
    expect("plan conv2 sm75", lib.fastfeat_conv2d_plan(75, 40, BF16, conv, ctypes.byref(plan)), ARCH)
    odd = native.ConvDesc(2, 27, 27, 96, 256, 2, 7, 7, 1, 1, 3, 3, 1, 1, 0)  # a 7x7 kernel: not in any network
    expect("plan 7x7 conv", lib.fastfeat_conv2d_plan(90, 132, BF16, odd, ctypes.byref(plan)), SHAPE)
    bad = native.ConvDesc(2, 27, 27, 96, 256, 3, 5, 5, 1, 1, 2, 2, 1, 1, 0)  # 96 channels in 3 groups of 256/3
    expect("plan inconsistent groups", lib.fastfeat_conv2d_plan(90, 132, BF16, bad, ctypes.byref(plan)), INVALID)
    tiny = native.PoolDesc(2, 2, 2, 96, 3, 3, 2, 2, 2, 2, 1, 1, 0, native.LrnParams(5, 1e-4, 0.75, 1.0))
    expect("plan pool padding > kernel/2", lib.fastfeat_maxpool_plan(90, 132, BF16, tiny, ctypes.byref(plan)), INVALID)
    expect("plan gemm split_k_reduce 7", lib.fastfeat_gemm_plan(90, 132, BF16, bad_reduce, ctypes.byref(plan)), INVALID)  # fmt: skip
    # fc6 at batch 2 splits K on 132 SMs: the separate reduce is a second launch, the fused one is not.
    expect("plan gemm separate", lib.fastfeat_gemm_plan(90, 132, BF16, gemm, ctypes.byref(plan)), 0)
    if (plan.num_launches, plan.counter_bytes) != (2, 0) or plan.split_k < 2:
        failures.append(f"separate split-K plan: {plan.num_launches} launches, split {plan.split_k}, {plan.counter_bytes} counter bytes")  # fmt: skip
    expect("plan gemm fused", lib.fastfeat_gemm_plan(90, 132, BF16, fused, ctypes.byref(plan)), 0)
    if (plan.num_launches, plan.entry[1]) != (1, -1) or plan.split_k < 2 or plan.counter_bytes == 0:
        failures.append(f"fused split-K plan: {plan.num_launches} launches, entries {list(plan.entry)}, split {plan.split_k}, {plan.counter_bytes} counter bytes")  # fmt: skip
    expect("plan gemm K=0", lib.fastfeat_gemm_plan(90, 132, BF16, native.GemmDesc(2, 16, 0, 16, 16, 0, 0, 0), ctypes.byref(plan)), INVALID)  # fmt: skip

    # Every status has its own readable message.
    messages = [native.status_string(lib, code) for code in range(11)]
    if len(set(messages)) != len(messages) or not all(messages):
        failures.append(f"status messages are not distinct: {messages}")
    if "no CUDA driver" not in native.status_string(lib, NO_DRIVER):
        failures.append(f"status {NO_DRIVER} does not say 'no CUDA driver'")

    for f in failures:
        print("FAIL", f)
    print(f"{len(failures)} failures; library: {lib.fastfeat_build_info().decode()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
