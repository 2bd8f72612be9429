"""Max-pool on NHWC activations, optionally fused with ReLU and with the CaffeNet channel LRN.

CaffeNet runs conv -> relu -> pool(3x3/2, ceil) -> LRN(5) after conv1 and conv2; AlexNet (torchvision)
runs conv -> relu -> pool(3x3/2, floor). One kernel covers both: each program takes BLOCK_P output
pixels x BLOCK_C channels, reduces the KHxKW window in fp32 (channels contiguous in NHWC, so each tap
is one coalesced load), and, when LRN is fused, BLOCK_C spans every channel so the window sums of
``lrn.lrn_across_channels`` are formed in registers before the single store. The pooled tensor is never
written when LRN follows it. The conv kernel does not absorb the pool; see ``conv.py`` for why.

Output size follows torch/Caffe: floor or ceil of (H + 2p - k) / s, plus one, and in ceil mode the last
window is dropped if it would start inside the right/bottom padding. Padding is implicit -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexing import nhwc_window_origin
from .launch_args import (
    Launch,
    aot_or_jit,
    check_input,
    check_kernel_tensor,
    int_pair,
    nothing,
    output_buffer,
    resolve_out_dtype,
    run_on_device,
)
from .lrn import LRN_NUM_WARPS, LRNParams, check_lrn_params, lrn_across_channels, lrn_tile
from .sizes import pool_output_size

# Channel tile of the unfused pool: 64 contiguous channels = 128 B rows in fp16.
POOL_BLOCK_C = 64
# Output pixels per program of the unfused pool (64 x 64 = 4096 elements, 32 per thread).
POOL_BLOCK_P = 64


@triton.jit
def _maxpool_nhwc_kernel(
    x_ptr,
    y_ptr,
    H,
    W,
    C,
    OH,
    OW,
    P_TOTAL,
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
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """x_ptr: [N, H, W, C] NHWC contiguous. y_ptr: [N, OH, OW, C] NHWC contiguous (P_TOTAL = N*OH*OW).

    Grid: (cdiv(P_TOTAL, BLOCK_P), cdiv(C, BLOCK_C)); with FUSE_LRN, BLOCK_C >= C and the second axis is 1.
    """
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < P_TOTAL
    c_ok = offs_c < C

    # int64 window corners; corners in the padding are masked below.
    ih0, iw0, row_base = nhwc_window_origin(offs_p, H, W, C, OH, OW, STRIDE_H, STRIDE_W, PAD_H, PAD_W)

    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = ih0 + kh
            iw = iw0 + kw
            ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            v = tl.load(
                x_ptr + (row_base + (kh * W + kw) * C)[:, None] + offs_c[None, :],
                mask=ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            # Padding and clipped taps must not win the max: widen to fp32 first, then -inf them.
            best = tl.maximum(best, tl.where(ok[:, None], v, float("-inf")))
    if APPLY_RELU:
        # relu(max(x)) == max(relu(x)): one clamp per output instead of one per tap.
        best = tl.maximum(best, 0.0)
    if FUSE_LRN:
        # Lanes past C (and dead pixels) must be exactly 0: they are the zero padding of the LRN window.
        best = tl.where(p_ok[:, None] & c_ok[None, :], best, 0.0)
        best = lrn_across_channels(best, offs_c, C, alpha_over_n, beta, lrn_k, LRN_SIZE, BLOCK_P, BLOCK_C)
    y_off = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(y_ptr + y_off, best.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def checked_pool_args(x_shape: tuple, kernel_size, stride, padding, ceil_mode: bool, lrn) -> tuple:
    """The max-pool launchers' argument checks for an NHWC input of ``x_shape``: (kh, kw, sh, sw, ph, pw,
    oh, ow, lrn) with ``lrn`` as ``LRNParams`` or None; ValueError for what the kernels do not take."""
    kh, kw = int_pair("kernel_size", kernel_size)
    sh, sw = int_pair("stride", stride)
    ph, pw = int_pair("padding", padding)
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"invalid geometry kernel_size={kernel_size} stride={stride} padding={padding}")
    if 2 * ph > kh or 2 * pw > kw:
        raise ValueError(f"padding {padding} must be at most half the kernel {kernel_size}")
    _, h, w, c = x_shape
    if lrn is not None:
        if not isinstance(lrn, (tuple, list)) or len(lrn) != 4:
            raise ValueError(f"lrn must be LRNParams(size, alpha, beta, k) or None, got {lrn!r}")
        lrn = LRNParams(*lrn)
        check_lrn_params(lrn.size, lrn.alpha, lrn.beta, lrn.k, c)
    oh = pool_output_size(h, kh, sh, ph, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, ceil_mode)
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} is too small for a {kh}x{kw} pool with padding {padding}")
    return kh, kw, sh, sw, ph, pw, oh, ow, lrn


def maxpool2d_nhwc(
    x: torch.Tensor,
    *,
    kernel_size=3,
    stride=2,
    padding=0,
    ceil_mode: bool = True,
    relu: bool = False,
    lrn: LRNParams | tuple | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Max-pool an NHWC tensor x [N, H, W, C] (fp32/fp16/bf16, contiguous), then optionally LRN.

    ``relu``: apply ReLU to the pooled values (for a conv output that was stored before its ReLU).
    ``lrn``: ``LRNParams(size, alpha, beta, k)`` (or a 4-tuple) to fuse Caffe's across-channel LRN after
    the pool, as in CaffeNet's pool1/norm1 and pool2/norm2. ``ceil_mode=True`` is Caffe's rounding,
    False is torchvision AlexNet's. Math in fp32, rounded once to ``out_dtype`` (default x.dtype).
    ``out``: optional preallocated [N, OH, OW, C] buffer.
    """
    check_kernel_tensor("x", x, ndim=4)
    launch = plan_maxpool2d_nhwc(
        tuple(x.shape), x.dtype, x.device, kernel_size=kernel_size, stride=stride, padding=padding,
        ceil_mode=ceil_mode, relu=relu, lrn=lrn, out_dtype=out_dtype, out=out,
    )  # fmt: skip
    return run_on_device(launch, x)


def plan_maxpool2d_nhwc(
    x_shape: tuple,
    dtype: torch.dtype,
    device: torch.device,
    *,
    kernel_size=3,
    stride=2,
    padding=0,
    ceil_mode: bool = True,
    relu: bool = False,
    lrn: LRNParams | tuple | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> Launch:
    """``maxpool2d_nhwc`` planned for inputs of ``x_shape``/``dtype`` on ``device`` (checks, output, grid,
    arguments and the AOT descriptor made once; see ``conv.plan_conv2d_nhwc``)."""
    check_input("x", x_shape, dtype, device, ndim=4)
    n, h, w, c = x_shape
    kh, kw, sh, sw, ph, pw, oh, ow, lrn = checked_pool_args(x_shape, kernel_size, stride, padding, ceil_mode, lrn)
    y_dtype = resolve_out_dtype(out_dtype, dtype)
    out = output_buffer(out, shape=(n, oh, ow, c), dtype=y_dtype, device=device)
    p_total = n * oh * ow
    if p_total == 0 or c == 0:
        return Launch(out, nothing)

    if lrn is not None:
        block_p, block_c = lrn_tile(c)
    else:
        block_p, block_c = POOL_BLOCK_P, min(POOL_BLOCK_C, triton.next_power_of_2(c))
    params = lrn if lrn is not None else LRNParams()
    from . import native

    # The AOT library (when built, and when it holds this specialisation) launches with no JIT.
    aot = native.maxpool_launcher(
        x_shape, dtype, out, kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw), ceil_mode=ceil_mode, relu=relu,
        lrn=lrn,
    )  # fmt: skip
    jit = _maxpool_nhwc_kernel[(triton.cdiv(p_total, block_p), triton.cdiv(c, block_c))]
    args = (out, h, w, c, oh, ow, p_total, float(params.alpha) / params.size, float(params.beta), float(params.k))
    consts = dict(
        KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw, PAD_H=ph, PAD_W=pw, APPLY_RELU=bool(relu), FUSE_LRN=lrn is not None,
        LRN_SIZE=params.size, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=LRN_NUM_WARPS,
    )  # fmt: skip
    return aot_or_jit(out, aot, jit, args, consts)
