"""Local response normalisation across channels (Caffe ACROSS_CHANNELS) on NHWC activations.

    y[c] = x[c] / (k + alpha / n * sum_{|c' - c| <= n // 2} x[c']^2) ^ beta

The window is centred and zero-padded at the channel edges; this is exactly
``torch.nn.functional.local_response_norm(x, n, alpha, beta, k)`` for odd n, and Caffe only allows odd
n. In NHWC the channels of one pixel are contiguous, so a program loads whole channel rows and forms
the window sums in registers with ``tl.gather`` (no second pass over memory). The helper
``lrn_across_channels`` is shared with the fused max-pool + LRN kernel in ``pool.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch_args import (
    Launch,
    check_input,
    check_kernel_tensor,
    nothing,
    on_tensor_device,
    output_buffer,
    resolve_out_dtype,
)

# A program holds every channel of its pixels in registers; beyond this the tile would spill.
MAX_LRN_CHANNELS = 2048
# Elements per program (pixels x padded channels): 32 fp32 values per thread at 4 warps.
LRN_TILE_ELEMS = 4096
# Memory-bound elementwise-style kernel: 4 warps saturate bandwidth without spilling.
LRN_NUM_WARPS = 4


class LRNParams(NamedTuple):
    """Caffe LRN parameters (CaffeNet/AlexNet-Caffe defaults)."""

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0


@triton.jit
def lrn_across_channels(
    v,
    offs_c,
    C,
    alpha_over_n,
    beta,
    k,
    SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Normalise a [BLOCK_P, BLOCK_C] fp32 tile holding ALL channels of BLOCK_P pixels.

    v must be 0 in lanes c >= C (they are gathered as the zero padding of the window).
    offs_c: [BLOCK_C] channel index (0..BLOCK_C-1). Returns the fp32 normalised tile.
    """
    HALF: tl.constexpr = (SIZE - 1) // 2
    sq = v * v
    acc = sq  # the window's centre tap needs no gather
    for d in tl.static_range(SIZE):
        if d != HALF:
            src = offs_c + (d - HALF)
            # Taps left of channel 0 are zero padding; taps at c >= C read the zeroed lanes; the clamp
            # only keeps the gather index in range.
            ok = (src >= 0) & (src < C)
            src = tl.minimum(tl.maximum(src, 0), BLOCK_C - 1)
            idx = tl.broadcast_to(src[None, :], (BLOCK_P, BLOCK_C))
            acc += tl.where(ok[None, :], tl.gather(sq, idx, axis=1), 0.0)
    scale = k + alpha_over_n * acc
    # scale >= k > 0, so scale^-beta = 2^(-beta * log2(scale)) is well defined.
    return v * tl.exp2(-beta * tl.log2(scale))


@triton.jit
def _lrn_nhwc_kernel(
    x_ptr,
    y_ptr,
    P_TOTAL,
    C,
    alpha_over_n,
    beta,
    k,
    SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """x_ptr, y_ptr: [P_TOTAL, C] contiguous (an NHWC tensor viewed as pixels x channels).

    Grid: (cdiv(P_TOTAL, BLOCK_P),); BLOCK_C >= C so one program sees every channel of its pixels.
    """
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_p < P_TOTAL)[:, None] & (offs_c < C)[None, :]
    off = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y = lrn_across_channels(v, offs_c, C, alpha_over_n, beta, k, SIZE, BLOCK_P, BLOCK_C)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


def check_lrn_params(size, alpha, beta, k, channels: int) -> None:
    """Raise ValueError for LRN parameters the kernels do not implement."""
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"LRN size must be a positive odd int (Caffe requires odd), got {size!r}")
    if not k > 0:
        raise ValueError(f"LRN k must be > 0, got {k!r}")
    if beta < 0 or alpha < 0:
        raise ValueError(f"LRN alpha and beta must be >= 0, got alpha={alpha!r} beta={beta!r}")
    if channels > MAX_LRN_CHANNELS:
        raise ValueError(f"LRN over {channels} channels exceeds the supported {MAX_LRN_CHANNELS}")


def lrn_tile(channels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for a tile that holds all ``channels`` of a few pixels."""
    block_c = triton.next_power_of_2(max(channels, 1))
    return max(1, LRN_TILE_ELEMS // block_c), block_c


def lrn_nhwc(
    x: torch.Tensor,
    *,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Caffe across-channel LRN of an NHWC tensor x [N, H, W, C] (fp32/fp16/bf16, contiguous).

    Computed in fp32, rounded once to ``out_dtype`` (default x.dtype). ``out``: optional preallocated
    [N, H, W, C] buffer.
    """
    check_kernel_tensor("x", x, ndim=4)
    launch = plan_lrn_nhwc(
        tuple(x.shape), x.dtype, x.device, size=size, alpha=alpha, beta=beta, k=k, out_dtype=out_dtype, out=out
    )
    with on_tensor_device(x):  # Triton launches on the current device: make it x's
        return launch(x)


def plan_lrn_nhwc(
    x_shape: tuple,
    dtype: torch.dtype,
    device: torch.device,
    *,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> Launch:
    """``lrn_nhwc`` planned for inputs of ``x_shape``/``dtype`` on ``device`` (see ``conv.plan_conv2d_nhwc``)."""
    check_input("x", x_shape, dtype, device, ndim=4)
    n, h, w, c = x_shape
    check_lrn_params(size, alpha, beta, k, c)
    y_dtype = resolve_out_dtype(out_dtype, dtype)
    out = output_buffer(out, shape=tuple(x_shape), dtype=y_dtype, device=device)
    p_total = n * h * w
    if p_total == 0 or c == 0:
        return Launch(out, nothing)
    block_p, block_c = lrn_tile(c)
    from . import native

    # The AOT library (when built, and when it holds this specialisation) launches with no JIT.
    aot = native.lrn_launcher(x_shape, dtype, out, size=size, alpha=alpha, beta=beta, k=k)
    jit = _lrn_nhwc_kernel[(triton.cdiv(p_total, block_p),)]
    args = (out, p_total, c, float(alpha) / size, float(beta), float(k))
    consts = dict(SIZE=size, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=LRN_NUM_WARPS)

    def run(x):
        if aot is None or not aot(x):
            jit(x, *args, **consts)

    return Launch(out, run)
