"""A strided convolution with few input channels (conv1) as a stride-1 convolution over a space-to-depth input.

conv1 of CaffeNet/AlexNet (11x11, stride 4, 3 input channels) does not fit the tap loop of ``conv.py``: a
3-channel tap would waste most of every 16-wide channel slab, so it runs a flattened K = 363 loop with a
division, a modulo and a mask per element. Cut the (padded) input into stride x stride blocks and stack
each block's pixels as channels (space-to-depth): 227x227x3 at stride 4 becomes 57x57x48, and the 11x11
kernel, zero-padded to 12x12, becomes a 3x3 kernel over 48 channels with stride 1. Output pixel (oh, ow)
reads input rows 4*oh .. 4*oh+11, i.e. blocks oh .. oh+2, so the output is unchanged (55x55). The conv
then runs the same tap loop as conv3 (CIN_G = 48 >= ``TAP_LOOP_MIN_CIN``), 16-aligned channel slabs, no
per-element index math. The price: the zero taps (9*48 = 432 MACs per output instead of 363, +19%) and
one copy of the input into the space-to-depth layout per call (a torch permute; 0.3 MB per 227x227
bf16 image, about half of conv1's own output write). Which of the two is faster is for the GPU to say
(``benchmarks/gpu_check.py``'s layers step times both); ``use_space_to_depth`` is the per-layer choice.

Channel order of the transformed input: (dh, dw, c) -> (dh * stride_w + dw) * Cin + c, matched by
``pack_conv_weight_s2d``, which rearranges the weight once, when the backend prepares.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .conv import TAP_LOOP_MIN_CIN, conv2d_nhwc, pack_conv_weight
from .launch_args import check_kernel_tensor, int_pair
from .sizes import conv_output_size

# FASTFEAT_CONV_S2D=1 makes the triton backend run eligible layers (conv1) as space-to-depth convs; 0 or
# unset keeps the flattened loop, which the AOT library covers, until a GPU measurement says otherwise.
S2D_ENV = "FASTFEAT_CONV_S2D"


def s2d_eligible(cin: int, groups: int, kernel, stride) -> bool:
    """True for a conv whose input channels are too few for the tap loop but whose stride blocks are not:
    groups == 1, stride >= 2 on both axes, Cin < TAP_LOOP_MIN_CIN <= stride_h * stride_w * Cin."""
    kh, kw = int_pair("kernel_size", kernel)
    sh, sw = int_pair("stride", stride)
    return groups == 1 and min(sh, sw) >= 2 and cin < TAP_LOOP_MIN_CIN <= sh * sw * cin and kh >= sh and kw >= sw


def use_space_to_depth(cin: int, groups: int, kernel, stride) -> bool:
    """The backend's per-layer choice: eligible (``s2d_eligible``) and switched on by ``S2D_ENV``."""
    return os.environ.get(S2D_ENV, "0") == "1" and s2d_eligible(cin, groups, kernel, stride)


def _taps(kernel: int, stride: int) -> int:
    return -(-kernel // stride)


def pack_conv_weight_s2d(weight: torch.Tensor, *, stride, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rearrange a [Cout, Cin, KH, KW] weight once into the packed weight of the space-to-depth conv.

    The kernel is zero-padded to ceil(K/s)*s per axis and each s x s block of taps becomes s*s*Cin input
    channels ordered (dh, dw, c); the result is ``pack_conv_weight``'s [1, Cout, TH*TW*s_h*s_w*Cin] layout
    for a TH x TW kernel (TH = ceil(KH / s_h)).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"conv weight must be a 4-D tensor [Cout, Cin, KH, KW], got {shape}")
    sh, sw = int_pair("stride", stride)
    if min(sh, sw) < 1:
        raise ValueError(f"stride must be positive, got {stride!r}")
    cout, cin, kh, kw = weight.shape
    th, tw = _taps(kh, sh), _taps(kw, sw)
    w = F.pad(weight.detach(), (0, tw * sw - kw, 0, th * sh - kh))  # zero taps past the kernel's edge
    w = w.reshape(cout, cin, th, sh, tw, sw).permute(0, 3, 5, 1, 2, 4)  # [Cout, dh, dw, c, th, tw]
    return pack_conv_weight(w.reshape(cout, sh * sw * cin, th, tw), groups=1, dtype=dtype)


def space_to_depth_nhwc(x: torch.Tensor, *, kernel_size, stride, padding) -> torch.Tensor:
    """The NHWC input of the space-to-depth conv: [N, OH+TH-1, OW+TW-1, s_h*s_w*Cin], channels (dh, dw, c).

    The conv's zero padding is applied here (top/left as given; bottom/right up to the last block any
    output reads, or rows no output reads are cropped), so the stride-1 conv that follows has none.
    """
    check_kernel_tensor("x", x, ndim=4)
    kh, kw = int_pair("kernel_size", kernel_size)
    sh, sw = int_pair("stride", stride)
    ph, pw = int_pair("padding", padding)
    n, h, w, c = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} is too small for kernel {kh}x{kw} with padding {padding}")
    hb, wb = oh - 1 + _taps(kh, sh), ow - 1 + _taps(kw, sw)  # blocks per axis that some output reads
    # Rows [0, hb*sh) of the padded input: crop what no output reads, then pad to the block boundary.
    x = x[:, : max(0, hb * sh - ph), : max(0, wb * sw - pw)]
    x = F.pad(x, (0, 0, pw, wb * sw - pw - x.shape[2], ph, hb * sh - ph - x.shape[1]))
    x = x.reshape(n, hb, sh, wb, sw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hb, wb, sh * sw * c).contiguous()


def conv2d_nhwc_s2d(
    x: torch.Tensor,
    packed_s2d: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    kernel_size,
    stride,
    padding=0,
    relu: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """``conv2d_nhwc(x, ..., groups=1)`` computed as a stride-1 conv over ``space_to_depth_nhwc(x)``.

    x: [N, H, W, Cin] NHWC; packed_s2d: from ``pack_conv_weight_s2d`` (same dtype as x); the geometry is
    the original layer's (e.g. kernel 11, stride 4, padding 0). Same output, dtypes and ``out`` as
    ``conv2d_nhwc``; the sums run in another order (the tap loop's), so the bits differ from the
    flattened loop's within the usual rounding.
    """
    kh, kw = int_pair("kernel_size", kernel_size)
    sh, sw = int_pair("stride", stride)
    x_s2d = space_to_depth_nhwc(x, kernel_size=(kh, kw), stride=(sh, sw), padding=padding)
    return conv2d_nhwc(
        x_s2d,
        packed_s2d,
        bias,
        kernel_size=(_taps(kh, sh), _taps(kw, sw)),
        stride=1,
        padding=0,
        groups=1,
        relu=relu,
        out_dtype=out_dtype,
        out=out,
        allow_tf32=allow_tf32,
    )
