"""Max-pool (+ReLU, + the CaffeNet LRN) on NHWC with 2-D tiles that walk down the rows: a second variant.

``pool.py``'s kernel gives each program a flat run of output pixels and loads all KH x KW taps of every
window: with 3x3 windows at stride 2 the input rows shared by vertically adjacent windows are loaded
twice, and with the LRN fused every element does four ``tl.gather`` shuffles for its window sum.
Here a program owns one image, a strip of ``ROWS`` output rows, ``BLOCK_W`` output columns and a
channel block: a [BLOCK_W, BLOCK_C] tile per output row. It forms the horizontal max of each input
row once and, when windows overlap by one row (KH == STRIDE_H + 1, as in every CaffeNet/AlexNet/VGG
pool), carries the last row's horizontal max into the next output row: (KH - 1) * KW loads per output
instead of KH * KW (6 instead of 9), plus one row per strip. The LRN window sum is a running sum: an
inclusive ``tl.cumsum`` over the channels and two gathers (the prefix at c + n/2 minus the prefix at
c - n/2 - 1) instead of n - 1 gathers. The squares are non-negative, so the prefix difference loses at
most one rounding of the running total, relative to a scale that is >= k.

``BLOCK_C`` is fitted to the channel count (``lrn.fitted_channel_block``: the largest power of two up to
64 that divides C; 96 channels: three blocks of 32, no masked lanes; 256 and 384: blocks of 64). With
the LRN fused (``lrn_halo=True``, the default) a block also pools ``lrn_halo_width(n)`` channels on each
side (2 for n = 5: 4 extra channels per 32, 12.5 %), whose squares complete the window sums of the
block's edge lanes. ``lrn_halo=False`` keeps the earlier layout: one block of next_pow2(C) channels per
pixel (96 -> 128 lanes, a quarter of them masked), no halo.

Which variant is faster is unmeasured (no GPU here); ``gpu_check.py``'s roofline step times both.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch_args import check_kernel_tensor, on_tensor_device, output_buffer, resolve_out_dtype
from .lrn import (
    LRN_NUM_WARPS,
    LRNParams,
    fitted_channel_block,
    lrn_add_halo,
    lrn_block_window_sums,
    lrn_halo_width,
    lrn_needs_halo,
    lrn_scale,
)
from .pool import checked_pool_args

# Output rows per program: long enough that the carried row saves most of the shared loads, short enough
# that a batch-1 pool still has a few hundred programs (conv1's 27 output rows: 4 strips).
POOL_ROWS = 8
# Output columns per program: the pooled maps are 6..56 wide; 16 columns x 64 channels = 1024 elements.
POOL_BLOCK_W = 16


def fitted_block_c(channels: int, fuse_lrn: bool, lrn_halo: bool = True) -> int:
    """The channel block: ``lrn.fitted_channel_block(channels)`` (96 -> 32, 256 -> 64), except with the
    LRN fused and ``lrn_halo=False``: every channel of a pixel in one block, next_pow2(channels)."""
    if fuse_lrn and not lrn_halo:
        return triton.next_power_of_2(max(channels, 1))
    return fitted_channel_block(channels)


@triton.jit
def _row_max(x_ptr, img_base, ih, iw0, H, W, C, offs_c, c_ok, w_ok, KW: tl.constexpr):
    """Max over KW taps of input row ``ih`` for the windows starting at columns ``iw0`` (fp32, -inf where
    the row or a tap is outside the image)."""
    best = tl.full((iw0.shape[0], offs_c.shape[0]), float("-inf"), dtype=tl.float32)
    row_in = (ih >= 0) & (ih < H)
    for kw in tl.static_range(KW):
        iw = iw0 + kw
        ok = w_ok & (iw >= 0) & (iw < W) & row_in
        off = img_base + (ih * W + iw).to(tl.int64) * C
        v = tl.load(x_ptr + off[:, None] + offs_c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        best = tl.maximum(best, tl.where(ok[:, None], v.to(tl.float32), float("-inf")))
    return best


@triton.jit
def _window_max(x_ptr, img_base, ih0, carried, iw0, H, W, C, offs_c, c_ok, w_ok, KH: tl.constexpr,
                KW: tl.constexpr, CARRY: tl.constexpr):  # fmt: skip
    """(max over the KH x KW windows whose top input row is ``ih0``, the horizontal max of their last row).

    With CARRY (KH == STRIDE_H + 1) ``carried`` is the horizontal max of row ``ih0``, from the previous
    output row (or the strip's first load); without it ``carried`` is ignored and passed back unchanged."""
    if CARRY:
        best = carried
        for kh in tl.static_range(1, KH):
            row = _row_max(x_ptr, img_base, ih0 + kh, iw0, H, W, C, offs_c, c_ok, w_ok, KW)
            best = tl.maximum(best, row)
        carried = row
    else:
        best = tl.full((iw0.shape[0], offs_c.shape[0]), float("-inf"), dtype=tl.float32)
        for kh in tl.static_range(KH):
            best = tl.maximum(best, _row_max(x_ptr, img_base, ih0 + kh, iw0, H, W, C, offs_c, c_ok, w_ok, KW))
    return best, carried


@triton.jit
def _maxpool_rows_nhwc_kernel(
    x_ptr,
    y_ptr,
    H,
    W,
    C,
    OH,
    OW,
    alpha_over_n,
    beta,
    lrn_k,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    FUSE_LRN: tl.constexpr,
    LRN_SIZE: tl.constexpr,
    HAS_HALO: tl.constexpr,
    HALO_W: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """x_ptr: [N, H, W, C] NHWC contiguous; y_ptr: [N, OH, OW, C] NHWC contiguous.

    Grid: (N * cdiv(OH, ROWS), cdiv(OW, BLOCK_W), cdiv(C, BLOCK_C)). With FUSE_LRN, either BLOCK_C >= C
    or HAS_HALO: HALO_W >= LRN_SIZE // 2 channels each side of the block are pooled too (never stored).
    """
    strips = tl.cdiv(OH, ROWS)
    img = tl.program_id(0) // strips
    oh0 = (tl.program_id(0) - img * strips) * ROWS
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c0 = tl.program_id(2) * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    w_ok = offs_w < OW
    c_ok = offs_c < C
    iw0 = offs_w * STRIDE_W - PAD_W
    x_img = img.to(tl.int64) * H * W * C
    y_img = img.to(tl.int64) * OH * OW * C
    CARRY: tl.constexpr = KH == STRIDE_H + 1  # windows share exactly one row: carry its horizontal max
    HALF: tl.constexpr = (LRN_SIZE - 1) // 2
    first = oh0 * STRIDE_H - PAD_H
    carried = tl.full((BLOCK_W, BLOCK_C), float("-inf"), dtype=tl.float32)
    if CARRY:
        carried = _row_max(x_ptr, x_img, first, iw0, H, W, C, offs_c, c_ok, w_ok, KW)
    if HAS_HALO:
        offs_l = c0 - HALO_W + tl.arange(0, HALO_W)  # always < C
        offs_r = c0 + BLOCK_C + tl.arange(0, HALO_W)
        l_ok = offs_l >= 0
        r_ok = offs_r < C
        carried_l = tl.full((BLOCK_W, HALO_W), float("-inf"), dtype=tl.float32)
        carried_r = tl.full((BLOCK_W, HALO_W), float("-inf"), dtype=tl.float32)
        if CARRY:
            carried_l = _row_max(x_ptr, x_img, first, iw0, H, W, C, offs_l, l_ok, w_ok, KW)
            carried_r = _row_max(x_ptr, x_img, first, iw0, H, W, C, offs_r, r_ok, w_ok, KW)
    for r in range(ROWS):
        oh = oh0 + r
        ih0 = oh * STRIDE_H - PAD_H
        best, carried = _window_max(x_ptr, x_img, ih0, carried, iw0, H, W, C, offs_c, c_ok, w_ok, KH, KW, CARRY)
        if APPLY_RELU:
            best = tl.maximum(best, 0.0)
        row_ok = w_ok & (oh < OH)
        ok = row_ok[:, None] & c_ok[None, :]
        if FUSE_LRN:
            # Lanes past C and dead columns are exactly 0: the zero padding of the channel window.
            best = tl.where(ok, best, 0.0)
            window = lrn_block_window_sums(best * best, HALF, BLOCK_W, BLOCK_C)
            if HAS_HALO:
                best_l, carried_l = _window_max(x_ptr, x_img, ih0, carried_l, iw0, H, W, C, offs_l, l_ok, w_ok,
                                                KH, KW, CARRY)  # fmt: skip
                best_r, carried_r = _window_max(x_ptr, x_img, ih0, carried_r, iw0, H, W, C, offs_r, r_ok, w_ok,
                                                KH, KW, CARRY)  # fmt: skip
                if APPLY_RELU:
                    best_l = tl.maximum(best_l, 0.0)
                    best_r = tl.maximum(best_r, 0.0)
                # Channels outside [0, C) (and dead columns, never stored) add nothing.
                best_l = tl.where(row_ok[:, None] & l_ok[None, :], best_l, 0.0)
                best_r = tl.where(row_ok[:, None] & r_ok[None, :], best_r, 0.0)
                window = lrn_add_halo(window, best_l * best_l, best_r * best_r, HALF, HALO_W, BLOCK_C)
            best = lrn_scale(best, window, alpha_over_n, beta, lrn_k)
        y_off = y_img + (oh * OW + offs_w).to(tl.int64)[:, None] * C + offs_c[None, :]
        tl.store(y_ptr + y_off, best.to(y_ptr.dtype.element_ty), mask=ok)


def maxpool2d_nhwc_rows(
    x,
    *,
    kernel_size=3,
    stride=2,
    padding=0,
    ceil_mode: bool = True,
    relu: bool = False,
    lrn: LRNParams | tuple | None = None,
    out_dtype=None,
    out=None,
    lrn_halo: bool = True,
):
    """``pool.maxpool2d_nhwc`` (same arguments, same results) with the row-walking 2-D tiles above.

    ``lrn_halo``: with the LRN fused, fitted channel blocks plus a channel halo (True) or one block of
    next_pow2(C) channels per pixel (False); without the LRN both are the same launch."""
    check_kernel_tensor("x", x, ndim=4)
    n, h, w, c = x.shape
    kh, kw, sh, sw, ph, pw, oh, ow, lrn = checked_pool_args(
        tuple(x.shape), kernel_size, stride, padding, ceil_mode, lrn
    )
    out = output_buffer(out, shape=(n, oh, ow, c), dtype=resolve_out_dtype(out_dtype, x.dtype), device=x.device)
    if n * oh * ow == 0 or c == 0:
        return out
    block_c = fitted_block_c(c, lrn is not None, lrn_halo)
    params = lrn if lrn is not None else LRNParams()
    has_halo = lrn is not None and lrn_needs_halo(c, block_c, params.size)
    grid = (n * triton.cdiv(oh, POOL_ROWS), triton.cdiv(ow, POOL_BLOCK_W), triton.cdiv(c, block_c))
    with on_tensor_device(x):
        _maxpool_rows_nhwc_kernel[grid](
            x,
            out,
            h,
            w,
            c,
            oh,
            ow,
            float(params.alpha) / params.size,
            float(params.beta),
            float(params.k),
            KH=kh,
            KW=kw,
            STRIDE_H=sh,
            STRIDE_W=sw,
            PAD_H=ph,
            PAD_W=pw,
            APPLY_RELU=bool(relu),
            FUSE_LRN=lrn is not None,
            LRN_SIZE=params.size,
            HAS_HALO=has_halo,
            HALO_W=lrn_halo_width(params.size),
            ROWS=POOL_ROWS,
            BLOCK_W=POOL_BLOCK_W,
            BLOCK_C=block_c,
            num_warps=LRN_NUM_WARPS,
        )
    return out
