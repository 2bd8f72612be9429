"""``@triton.jit`` pieces of the GEMM-shaped kernels: the fully connected GEMM (``gemm.py``) and the
implicit-GEMM convolutions (``conv.py``, ``conv_splitk.py``). Triton inlines them into each kernel, so
a kernel compiles to the same code as with the piece written out in its body (benchmarks/compile_check.py
--ptx-digest checks that)."""

from __future__ import annotations

import triton
import triton.language as tl

from .indexing import nhwc_window_origin


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n), walking GROUP_M row-tiles per column so that
    concurrently running programs share B tiles in L2."""
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def bias_relu(acc, bias_ptrs, bias_ok, HAS_BIAS: tl.constexpr, APPLY_RELU: tl.constexpr):
    """The epilogue of an fp32 [rows, columns] tile, before its one rounding: + the column's bias (read
    from ``bias_ptrs``, one per column, where ``bias_ok``) when HAS_BIAS, then ReLU when APPLY_RELU."""
    if HAS_BIAS:
        acc += tl.load(bias_ptrs, mask=bias_ok, other=0.0)[None, :]
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0)
    return acc


@triton.jit
def conv_tile(
    pid_m, pid_n, g, w_ptr, H, W, C_IN, OH, OW, M_GEMM, COUT_G,
    CIN_G: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Where the operands of output tile (pid_m, pid_n) of channel group g start, for the implicit-GEMM
    convs (arguments as ``conv._conv2d_nhwc_kernel``'s). Returns (offs_m, offs_n, m_ok, n_ok, ih0, iw0,
    row_base, w_group, w_cols): the tile's pixels and output channels and which exist, the pixels' window
    corners and the int64 offset of (n, ih0, iw0, the group's first channel), the group's weights and
    each output channel's weight row."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M_GEMM
    n_ok = offs_n < COUT_G

    # Window corners (int64 offsets; corners in the padding are masked by the K loops), then group g's channels.
    ih0, iw0, row_base = nhwc_window_origin(offs_m, H, W, C_IN, OH, OW, STRIDE_H, STRIDE_W, PAD_H, PAD_W)
    row_base += g * CIN_G

    K_GEMM: tl.constexpr = KH * KW * CIN_G
    w_group = w_ptr + g.to(tl.int64) * COUT_G * K_GEMM
    w_cols = offs_n * K_GEMM  # int32 is enough: the whole packed weight is far below 2^31 elements
    return offs_m, offs_n, m_ok, n_ok, ih0, iw0, row_base, w_group, w_cols


@triton.jit
def tap_range_dot(
    acc, x_ptr, w_group, w_cols, row_base, ih0, iw0, m_ok, n_ok, H, W, C_IN, first_tap, end_tap,
    CIN_G: tl.constexpr, KW: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``acc`` plus the products of taps [first_tap, end_tap) of a conv tile (the tap loop; the operands
    from ``conv_tile``), in tap and then channel-slab order.

    One loop over (tap, channel slab) pairs rather than two nested loops: Triton software-pipelines only
    the innermost loop, and a nested slab loop has just 1-6 trips per tap here. The (tap, slab) split is
    scalar arithmetic on the loop counter, not per-element work."""
    NUM_CB: tl.constexpr = (CIN_G + BLOCK_K - 1) // BLOCK_K  # channel slabs per tap
    for it in range(first_tap * NUM_CB, end_tap * NUM_CB):
        tap = it // NUM_CB
        c0 = (it - tap * NUM_CB) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh
        iw = iw0 + kw
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_ok = offs_c < CIN_G  # Cin/g need not be a multiple of BLOCK_K (e.g. 48 for conv2)
        a_rows = row_base + (kh * W + kw) * C_IN
        a = tl.load(x_ptr + a_rows[:, None] + offs_c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(
            w_group + w_cols[None, :] + (tap * CIN_G + offs_c)[:, None],
            mask=c_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc
