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

``BLOCK_C`` is fitted to the channel count where it can be: without the LRN the channel block is the
largest power of two up to 64 that divides C (96 channels: three blocks of 32, no masked lanes). The
fused LRN still needs every channel of a pixel in one program, so its block is next_pow2(C) (96 -> 128):
fitting it would need tiles of two widths (64 + 32) joined across the seam, not done.

Which variant is faster is unmeasured (no GPU here); ``gpu_check.py``'s roofline step times both.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch_args import check_kernel_tensor, int_pair, on_tensor_device, output_buffer, resolve_out_dtype
from .lrn import LRN_NUM_WARPS, LRNParams, check_lrn_params
from .sizes import pool_output_size

# Output rows per program: long enough that the carried row saves most of the shared loads, short enough
# that a batch-1 pool still has a few hundred programs (conv1's 27 output rows: 4 strips).
POOL_ROWS = 8
# Output columns per program: the pooled maps are 6..56 wide; 16 columns x 64 channels = 1024 elements.
POOL_BLOCK_W = 16
# Widest channel block without the LRN (64 fp16 channels = 128-byte rows).
MAX_POOL_BLOCK_C = 64


def fitted_block_c(channels: int, fuse_lrn: bool) -> int:
    """The channel block: all channels (rounded up to a power of two) with the LRN, else the largest power
    of two <= MAX_POOL_BLOCK_C dividing ``channels`` (>= 16 when possible, else next_pow2 up to 64)."""
    if fuse_lrn:
        return triton.next_power_of_2(max(channels, 1))
    block = MAX_POOL_BLOCK_C
    while block > 16 and channels % block:
        block //= 2
    if channels % block:  # no power of two >= 16 divides it: mask the tail of the last block
        block = min(MAX_POOL_BLOCK_C, triton.next_power_of_2(max(channels, 1)))
    return block


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
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """x_ptr: [N, H, W, C] NHWC contiguous; y_ptr: [N, OH, OW, C] NHWC contiguous.

    Grid: (N * cdiv(OH, ROWS), cdiv(OW, BLOCK_W), cdiv(C, BLOCK_C)); with FUSE_LRN, BLOCK_C >= C.
    """
    strips = tl.cdiv(OH, ROWS)
    img = tl.program_id(0) // strips
    oh0 = (tl.program_id(0) - img * strips) * ROWS
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    w_ok = offs_w < OW
    c_ok = offs_c < C
    iw0 = offs_w * STRIDE_W - PAD_W
    x_img = img.to(tl.int64) * H * W * C
    y_img = img.to(tl.int64) * OH * OW * C
    CARRY: tl.constexpr = KH == STRIDE_H + 1  # windows share exactly one row: carry its horizontal max
    if CARRY:
        carried = _row_max(x_ptr, x_img, oh0 * STRIDE_H - PAD_H, iw0, H, W, C, offs_c, c_ok, w_ok, KW)
    for r in range(ROWS):
        oh = oh0 + r
        ih0 = oh * STRIDE_H - PAD_H
        if CARRY:
            best = carried
            for kh in tl.static_range(1, KH):
                row = _row_max(x_ptr, x_img, ih0 + kh, iw0, H, W, C, offs_c, c_ok, w_ok, KW)
                best = tl.maximum(best, row)
            carried = row
        else:
            best = tl.full((BLOCK_W, BLOCK_C), float("-inf"), dtype=tl.float32)
            for kh in tl.static_range(KH):
                best = tl.maximum(best, _row_max(x_ptr, x_img, ih0 + kh, iw0, H, W, C, offs_c, c_ok, w_ok, KW))
        if APPLY_RELU:
            best = tl.maximum(best, 0.0)
        ok = w_ok[:, None] & c_ok[None, :] & (oh < OH)
        if FUSE_LRN:
            # Lanes past C and dead columns are exactly 0: the zero padding of the channel window.
            best = tl.where(ok, best, 0.0)
            HALF: tl.constexpr = (LRN_SIZE - 1) // 2
            prefix = tl.cumsum(best * best, axis=1)  # prefix[c] = sum of squares of channels 0..c
            hi = tl.minimum(offs_c + HALF, BLOCK_C - 1)  # lanes past C hold 0: clamping to the end is exact
            lo = offs_c - HALF - 1
            upper = tl.gather(prefix, tl.broadcast_to(hi[None, :], (BLOCK_W, BLOCK_C)), axis=1)
            lower = tl.gather(prefix, tl.broadcast_to(tl.maximum(lo, 0)[None, :], (BLOCK_W, BLOCK_C)), axis=1)
            window = upper - tl.where((lo >= 0)[None, :], lower, 0.0)
            best = best * tl.exp2(-beta * tl.log2(lrn_k + alpha_over_n * window))
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
):
    """``pool.maxpool2d_nhwc`` (same arguments, same results) with the row-walking 2-D tiles above."""
    check_kernel_tensor("x", x, ndim=4)
    kh, kw = int_pair("kernel_size", kernel_size)
    sh, sw = int_pair("stride", stride)
    ph, pw = int_pair("padding", padding)
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"invalid geometry kernel_size={kernel_size} stride={stride} padding={padding}")
    if 2 * ph > kh or 2 * pw > kw:
        raise ValueError(f"padding {padding} must be at most half the kernel {kernel_size}")
    n, h, w, c = x.shape
    if lrn is not None:
        if not isinstance(lrn, (tuple, list)) or len(lrn) != 4:
            raise ValueError(f"lrn must be LRNParams(size, alpha, beta, k) or None, got {lrn!r}")
        lrn = LRNParams(*lrn)
        check_lrn_params(lrn.size, lrn.alpha, lrn.beta, lrn.k, c)
    oh = pool_output_size(h, kh, sh, ph, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, ceil_mode)
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} is too small for a {kh}x{kw} pool with padding {padding}")
    out = output_buffer(out, shape=(n, oh, ow, c), dtype=resolve_out_dtype(out_dtype, x.dtype), device=x.device)
    if n * oh * ow == 0 or c == 0:
        return out
    block_c = fitted_block_c(c, lrn is not None)
    params = lrn if lrn is not None else LRNParams()
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
            ROWS=POOL_ROWS,
            BLOCK_W=POOL_BLOCK_W,
            BLOCK_C=block_c,
            num_warps=LRN_NUM_WARPS,
        )
    return out
