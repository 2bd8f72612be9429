"""Local response normalisation across channels (Caffe ACROSS_CHANNELS) on NHWC activations.

    y[c] = x[c] / (k + alpha / n * sum_{|c' - c| <= n // 2} x[c']^2) ^ beta

The window is centred and zero-padded at the channel edges; this is exactly
``torch.nn.functional.local_response_norm(x, n, alpha, beta, k)`` for odd n, and Caffe only allows odd
n. In NHWC the channels of one pixel are contiguous, so a program loads whole channel rows and forms
the window sums in registers with ``tl.gather`` (no second pass over memory). The helper
``lrn_across_channels`` is shared with the fused max-pool + LRN kernel in ``pool.py``.

Those kernels hold every channel of a pixel in one program, so the channel block is next_pow2(C):
conv1's 96 channels fill 96 of 128 lanes. The fitted variant (``lrn_nhwc_fitted``, and the fused pool in
``pool_rows.py``) splits the channels into blocks of ``fitted_channel_block(C)`` (96 -> 32, 256 and 384
-> 64) and loads a halo of ``lrn_halo_width(n)`` channels on each side (2 for n = 5) for the window sums
at the block's edges. Its window sum is a running sum: an inclusive ``tl.cumsum`` over the block and two
gathers (prefix at c + n/2 minus prefix at c - n/2 - 1) instead of n - 1 gathers, plus the halo's
squares added to the edge lanes. Which variant is faster is unmeasured (no GPU was lent to write it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch_args import (
    Launch,
    aot_or_jit,
    check_input,
    check_kernel_tensor,
    nothing,
    on_tensor_device,
    output_buffer,
    resolve_out_dtype,
    run_on_device,
)

# A program holds every channel of its pixels in registers; beyond this the tile would spill.
MAX_LRN_CHANNELS = 2048
# Elements per program (pixels x padded channels): 32 fp32 values per thread at 4 warps.
LRN_TILE_ELEMS = 4096
# Memory-bound elementwise-style kernel: 4 warps saturate bandwidth without spilling.
LRN_NUM_WARPS = 4
# Channel blocks of the fitted variants: the largest power of two in [MIN, MAX] that divides C (64 fp16
# channels = 128-byte rows); when none does, next_pow2(C) capped at MAX, with a masked tail.
MAX_FITTED_BLOCK_C = 64
MIN_FITTED_BLOCK_C = 16


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
def lrn_block_window_sums(sq, HALF: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Window sums of a [ROWS, BLOCK_C] tile of squares over channels |c' - c| <= HALF, counting only the
    channels inside the tile: an inclusive prefix sum and two gathers (prefix[c + HALF] - prefix[c -
    HALF - 1]). The squares are non-negative, so the difference loses at most one rounding of the
    running total, relative to a scale that is >= k."""
    lanes = tl.arange(0, BLOCK_C)
    prefix = tl.cumsum(sq, axis=1)
    hi = tl.minimum(lanes + HALF, BLOCK_C - 1)  # past the tile's end: the halo adds those channels
    lo = lanes - HALF - 1
    upper = tl.gather(prefix, tl.broadcast_to(hi[None, :], (ROWS, BLOCK_C)), axis=1)
    lower = tl.gather(prefix, tl.broadcast_to(tl.maximum(lo, 0)[None, :], (ROWS, BLOCK_C)), axis=1)
    return upper - tl.where((lo >= 0)[None, :], lower, 0.0)


@triton.jit
def lrn_add_halo(window, left_sq, right_sq, HALF: tl.constexpr, HALO_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Add the squares of the halo channels to the window sums of the edge lanes that reach them.

    left_sq[:, i] is channel c0 - HALO_W + i, right_sq[:, i] channel c0 + BLOCK_C + i (c0: the block's
    first channel); both [ROWS, HALO_W], 0 for channels outside [0, C). Lane j's window holds left column
    i when i >= HALO_W - HALF + j, and right column i when j >= BLOCK_C - HALF + i.
    """
    lanes = tl.arange(0, BLOCK_C)
    cols = tl.arange(0, HALO_W)
    for i in tl.static_range(HALO_W):
        pick = (cols == i)[None, :]
        left = tl.sum(tl.where(pick, left_sq, 0.0), axis=1)  # column i as a [ROWS] vector
        right = tl.sum(tl.where(pick, right_sq, 0.0), axis=1)
        window += tl.where((lanes <= i - (HALO_W - HALF))[None, :], left[:, None], 0.0)
        window += tl.where((lanes >= BLOCK_C - HALF + i)[None, :], right[:, None], 0.0)
    return window


@triton.jit
def lrn_scale(v, window, alpha_over_n, beta, k):
    """v / (k + alpha/n * window)^beta; the base is >= k > 0, so 2^(-beta * log2(base)) is defined."""
    return v * tl.exp2(-beta * tl.log2(k + alpha_over_n * window))


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


@triton.jit
def _lrn_nhwc_fitted_kernel(
    x_ptr,
    y_ptr,
    P_TOTAL,
    C,
    alpha_over_n,
    beta,
    k,
    SIZE: tl.constexpr,
    HAS_HALO: tl.constexpr,
    HALO_W: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """x_ptr, y_ptr: [P_TOTAL, C] contiguous (NHWC viewed as pixels x channels).

    Grid: (cdiv(P_TOTAL, BLOCK_P), cdiv(C, BLOCK_C)). HAS_HALO: more than one channel block and SIZE > 1;
    then HALO_W >= SIZE // 2 channels on each side of the block are loaded for the edge lanes' windows.
    """
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c0 = tl.program_id(1) * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    p_ok = offs_p < P_TOTAL
    rows = offs_p.to(tl.int64)[:, None] * C
    mask = p_ok[:, None] & (offs_c < C)[None, :]
    v = tl.load(x_ptr + rows + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    HALF: tl.constexpr = (SIZE - 1) // 2
    window = lrn_block_window_sums(v * v, HALF, BLOCK_P, BLOCK_C)
    if HAS_HALO:
        offs_l = c0 - HALO_W + tl.arange(0, HALO_W)
        offs_r = c0 + BLOCK_C + tl.arange(0, HALO_W)
        left = tl.load(x_ptr + rows + offs_l[None, :], mask=p_ok[:, None] & (offs_l >= 0)[None, :], other=0.0)
        right = tl.load(x_ptr + rows + offs_r[None, :], mask=p_ok[:, None] & (offs_r < C)[None, :], other=0.0)
        left = left.to(tl.float32)
        right = right.to(tl.float32)
        window = lrn_add_halo(window, left * left, right * right, HALF, HALO_W, BLOCK_C)
    y = lrn_scale(v, window, alpha_over_n, beta, k)
    tl.store(y_ptr + rows + offs_c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def fitted_channel_block(channels: int) -> int:
    """Channel block of the fitted variants: the largest power of two in [MIN_FITTED_BLOCK_C,
    MAX_FITTED_BLOCK_C] dividing ``channels`` (96 -> 32, 256 and 384 -> 64, 64 -> 64), else
    next_pow2(channels) capped at MAX_FITTED_BLOCK_C (100 -> 64 with a masked tail, 3 -> 4)."""
    block = MAX_FITTED_BLOCK_C
    while block > MIN_FITTED_BLOCK_C and channels % block:
        block //= 2
    if channels % block:
        block = min(MAX_FITTED_BLOCK_C, triton.next_power_of_2(max(channels, 1)))
    return block


def lrn_halo_width(size: int) -> int:
    """Channels loaded on each side of a block for an LRN window of ``size``: next_pow2(size // 2)."""
    return triton.next_power_of_2(max(size // 2, 1))


def lrn_needs_halo(channels: int, block_c: int, size: int) -> bool:
    """True when a block's window reaches channels of another block (several blocks, size > 1)."""
    return block_c < channels and size > 1


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


def _checked_output(x_shape: tuple, dtype, device, size, alpha, beta, k, out_dtype, out) -> tuple:
    """The LRN launchers' parameter checks and output buffer for an NHWC input: (out, pixels, channels)."""
    n, h, w, c = x_shape
    check_lrn_params(size, alpha, beta, k, c)
    out = output_buffer(out, shape=tuple(x_shape), dtype=resolve_out_dtype(out_dtype, dtype), device=device)
    return out, n * h * w, c


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
    return run_on_device(launch, x)


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
    out, p_total, c = _checked_output(x_shape, dtype, device, size, alpha, beta, k, out_dtype, out)
    if p_total == 0 or c == 0:
        return Launch(out, nothing)
    block_p, block_c = lrn_tile(c)
    from . import native

    # The AOT library (when built, and when it holds this specialisation) launches with no JIT.
    aot = native.lrn_launcher(x_shape, dtype, out, size=size, alpha=alpha, beta=beta, k=k)
    jit = _lrn_nhwc_kernel[(triton.cdiv(p_total, block_p),)]
    args = (out, p_total, c, float(alpha) / size, float(beta), float(k))
    consts = dict(SIZE=size, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=LRN_NUM_WARPS)
    return aot_or_jit(out, aot, jit, args, consts)


def lrn_nhwc_fitted(
    x: torch.Tensor,
    *,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lrn_nhwc`` (same arguments, same results within rounding) with channel blocks fitted to C and a
    channel halo (see the module docstring). JIT only: the AOT library ships ``lrn_nhwc``'s kernel."""
    check_kernel_tensor("x", x, ndim=4)
    out, p_total, c = _checked_output(tuple(x.shape), x.dtype, x.device, size, alpha, beta, k, out_dtype, out)
    if p_total == 0 or c == 0:
        return out
    block_c = fitted_channel_block(c)
    block_p = max(1, LRN_TILE_ELEMS // block_c)
    grid = (triton.cdiv(p_total, block_p), triton.cdiv(c, block_c))
    with on_tensor_device(x):
        _lrn_nhwc_fitted_kernel[grid](
            x,
            out,
            p_total,
            c,
            float(alpha) / size,
            float(beta),
            float(k),
            SIZE=size,
            HAS_HALO=lrn_needs_halo(c, block_c, size),
            HALO_W=lrn_halo_width(size),
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            num_warps=LRN_NUM_WARPS,
        )
    return out
