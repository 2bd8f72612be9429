"""Index arithmetic shared by the windowed NHWC kernels (convolution and pooling)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nhwc_window_origin(offs, H, W, C, OH, OW, STRIDE_H, STRIDE_W, PAD_H, PAD_W):
    """Top-left input corner of the windows of flat output pixels ``offs`` (= n*OH*OW + oh*OW + ow).

    Returns (ih0, iw0, base): the corner's row and column (negative or past the edge in the
    padding, which callers mask) and the element offset of (n, ih0, iw0, channel 0) in an NHWC
    tensor with C channels, in int64 because N*H*W*C passes 2^31 at large batch.
    """
    ow = offs % OW
    t = offs // OW
    oh = t % OH
    img = t // OH
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    base = ((img.to(tl.int64) * H + ih0) * W + iw0) * C
    return ih0, iw0, base
