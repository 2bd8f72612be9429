"""Fixtures of the fastfeat.kernels tests (the interpreter set-up lives in tests/triton_interpreter.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from triton_interpreter import _bf16_bits_to_f32

from fastfeat.kernels import backend_available, interpreter_active


@pytest.fixture(autouse=True)
def _require_backend():
    ok, why = backend_available()
    if not ok:
        pytest.skip(why)


@pytest.fixture(autouse=True)
def exact_fp32_references():
    """The F.conv2d / F.linear references in exact fp32.

    On a GPU, cuDNN convolutions use TF32 for fp32 by default (``torch.backends.cudnn.allow_tf32`` is
    True): a 10-bit mantissa, so an fp32 reference would be ~1e-3 off and every fp32 test at 1e-5 would
    fail against a correct kernel.  Turned off here for the references (and back afterwards); the
    kernels compute exact fp32 unless asked for TF32.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels' tensors live: the GPU if there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Free GPU memory the > 2^31-element indexing tests need (a 4.5 GiB input plus outputs and references).
LARGE_TEST_GPU_BYTES = 16 * 2**30


@pytest.fixture
def large_gpu():
    """Skip unless a CUDA GPU with room for tensors of more than 2^31 elements is present.

    Those tests check the int64 offset arithmetic; under the interpreter they would need hours and
    more RAM than a CI machine has, so they are GPU-only.
    """
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: > 2^31-element tensors are far too slow for the CPU interpreter")
    free, _ = torch.cuda.mem_get_info()
    if free < LARGE_TEST_GPU_BYTES:
        pytest.skip(f"needs {LARGE_TEST_GPU_BYTES / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    return torch.device("cuda")


@pytest.fixture
def nan_like():
    """``nan_like(shape, dtype, device)``: an output buffer poisoned with NaN, so unwritten elements show."""

    def make(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    return make


@pytest.fixture
def assert_close():
    """``assert_close(out, ref, tol)``: no NaN/inf anywhere and ||out - ref|| / ||ref|| <= tol (in fp64)."""

    def check(out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
        assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
        out64 = out.detach().cpu().double()
        ref64 = ref.detach().cpu().double()
        assert torch.isfinite(out64).all(), f"{(~torch.isfinite(out64)).sum().item()} non-finite outputs"
        denom = ref64.norm().item()
        assert denom > 0, "reference is all zeros; the test inputs are degenerate"
        err = (out64 - ref64).norm().item() / denom
        assert err <= tol, f"relative error {err:.3e} > tolerance {tol:.1e}"
        return err

    return check


@pytest.fixture
def position_invariant_dot(monkeypatch):
    """Under the interpreter, ``tl.dot`` as a k-ordered sum of outer products (see test_determinism.py):
    numpy's BLAS sums an element in an order that depends on its place in the tile, which no GPU MMA does,
    so without this a row's bits would move with its position in the batch. No-op on a GPU."""
    if not interpreter_active():
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def as_f32(h):
        return _bf16_bits_to_f32(h.data) if h.dtype.scalar == tl.bfloat16 else h.data.astype(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a32, b32 = as_f32(a), as_f32(b)
        acc = d.data.astype(np.float32).copy()
        for k in range(a32.shape[-1]):
            acc += np.multiply.outer(a32[:, k], b32[k, :])
        return TensorHandle(acc, d.dtype.scalar)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", create_dot)
