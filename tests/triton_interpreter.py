"""Triton on a CPU-only machine: the interpreter, made exact for bf16.

Device: on a CUDA machine the tests run the compiled kernels on the GPU. Without CUDA, this file sets
``TRITON_INTERPRET=1`` (``os.environ.setdefault``, so an explicit setting wins) before anything imports
triton, and the kernels run in Triton's numpy interpreter on CPU tensors.

bf16 decision: bf16 is tested on the CPU too, through the session fixture ``interpreter_bf16_fix``
(autouse). Upstream's interpreter keeps bf16 tensors as raw uint16 bit patterns, so
``InterpreterBuilder.create_dot`` multiplies the bit patterns as integers (results off by ~1e10), and
its fp32 -> bf16 cast truncates instead of rounding to nearest even. The fixture monkeypatches both:
bf16 dot operands are widened exactly to fp32 before ``np.matmul`` (the same fp32 products and
accumulation as the GPU's bf16 MMA), and fp32 <-> bf16 casts are done with exact bit arithmetic (RTNE on
the way down). The kernels never do arithmetic on bf16 values other than dot, loads, stores and casts, so
nothing else needs patching. On a GPU the fixture does nothing.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fastfeat.kernels import interpreter_active  # noqa: E402


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    f = np.ascontiguousarray(values, dtype=np.float32)
    u = f.view(np.uint32)
    # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then drop 16 bits.
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), rounded)


@pytest.fixture(scope="session", autouse=True)
def interpreter_bf16_fix():
    """Make the interpreter's bf16 ``tl.dot`` and fp32 <-> bf16 casts numerically correct (no-op on GPU)."""
    if not interpreter_active():
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    original_dot = InterpreterBuilder.create_dot
    original_cast = InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a_f32 = _bf16_bits_to_f32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data
            b_f32 = _bf16_bits_to_f32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data
            return TensorHandle(np.matmul(a_f32, b_f32, dtype=d.data.dtype) + d.data, d.dtype.scalar)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.bfloat16 and dst_ty == tl.float32:
            return TensorHandle(_bf16_bits_to_f32(src.data), tl.float32)
        if src_ty == tl.float32 and dst_ty == tl.bfloat16:
            return TensorHandle(_f32_to_bf16_bits(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    mp = pytest.MonkeyPatch()
    mp.setattr(InterpreterBuilder, "create_dot", create_dot)
    mp.setattr(InterpreterBuilder, "cast_impl", cast_impl)
    try:
        yield
    finally:
        mp.undo()
