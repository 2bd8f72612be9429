"""Implicit-GEMM 2-D convolution on NHWC activations, with bias + ReLU fused into the epilogue.

The convolution is computed as one GEMM per channel group without materialising im2col:

    M = N * OH * OW            (output pixels, flattened n, oh, ow)
    N = Cout / groups          (output channels of the group)
    K = KH * KW * Cin / groups (taps x input channels, ordered (kh, kw, cin) to match the NHWC gather)

A tile of A is gathered straight from the NHWC input: for a fixed tap (kh, kw) the Cin/g channels of
one input pixel are contiguous, so each row of the tile is one coalesced load. Two K-loop shapes:

* tap loop (Cin/g >= ``TAP_LOOP_MIN_CIN``, i.e. every CaffeNet/AlexNet layer but conv1): one loop over
  (tap, channel slab) pairs, so the padding test is one per row per step and no per-element integer
  division is needed;
* flattened loop (conv1, Cin = 3): K is walked in BLOCK_K slabs and each k is decomposed into
  (kh, kw, cin) with constexpr divisors; a 3-channel tap would otherwise waste most of every slab.
  K = 363 is not a multiple of any BLOCK_K, so every slab is masked on k < K. Neither operand can be
  loaded in vectors (3-channel pixels, 363-element weight rows), so this loop is computed transposed
  (see the kernel) and ``autotune.prune_conv`` keeps only tiles whose gathers fit in registers.

Configs keep num_warps <= 4 (see ``autotune.conv_configs``): with num_warps >= 8 Triton miscompiles a
flattened K loop over a non-1x1 kernel (pytorch#173068), which both loop shapes here are.

Max-pool fusion: not done, by choice. CaffeNet/AlexNet pool with 3x3 windows at stride 2, so windows
overlap: every odd output row and column of the conv feeds two pool windows. An implicit-GEMM tile owns
a flat run of output pixels, not a spatial rectangle, so fusing would need (a) a 2-D spatial tiling of
M plus a one-pixel halo recomputed by neighbouring tiles (about (2T+1)^2/(2T)^2 extra work in the most
expensive kernel of the network), or (b) atomic max across tiles, which Triton lacks for fp16/bf16 and
which needs a pre-initialised output. Either way the saving is small: the pool re-reads the conv output
once (e.g. conv1: 55*55*96 values per image) while the conv does ~KH*KW*Cin/g MACs per output value.
Feature extraction also often asks for the pre-pool conv blob, which must then be written anyway. So
ReLU is fused here, and max-pool (+ReLU, + the CaffeNet LRN) is one separate kernel in ``pool.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import batch_bucket, conv_configs, m_bucket, prune_conv, sm_count
from .conv_splitk import conv_k_segments, segmented_run
from .launch_args import (
    Launch,
    aot_or_jit,
    check_input,
    check_kernel_tensor,
    check_same_device,
    dot_precision,
    int_pair,
    nothing,
    output_buffer,
    resolve_out_dtype,
    run_on_device,
)
from .sizes import conv_output_size
from .tiles import bias_relu, conv_tile, grouped_tile, tap_range_dot

# Cin/g at or above which the tap loop is used; below it a channel slab would be mostly padding.
TAP_LOOP_MIN_CIN = 16
# The flattened pixel index (n, oh, ow) is kept in int32; element offsets are built in int64.
MAX_GEMM_M = 2**31 - 1


# Keyed on the batch bucket as well as the M bucket (see autotune.BATCH_BUCKET_CAP); tuned configs are
# cached on disk (Triton's cache dir, keyed by GPU target, kernel source, key and config list), so a
# second run and the sibling --devices workers that start after the first has tuned skip the tuning.
@triton.autotune(
    configs=conv_configs(),
    key=["M_BUCKET", "BATCH_BUCKET", "COUT_G", "CIN_G", "KH", "KW", "TAP_LOOP"],
    prune_configs_by={"early_config_prune": prune_conv},
    cache_results=True,
)
# The bucket arguments are read only by the autotuner: unspecialised, a bucket of 1 (or a multiple of
# 16) would otherwise compile a variant of its own.
@triton.jit(do_not_specialize=["M_BUCKET", "BATCH_BUCKET"])
def _conv2d_nhwc_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    H,
    W,
    C_IN,
    OH,
    OW,
    C_OUT,
    M_GEMM,
    COUT_G,
    M_BUCKET,
    BATCH_BUCKET,
    CIN_G: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    TAP_LOOP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One (BLOCK_M pixels) x (BLOCK_N output channels) tile of one channel group.

    x_ptr: [N, H, W, C_IN] NHWC, contiguous, fp32/fp16/bf16.
    w_ptr: [groups, COUT_G, KH*KW*CIN_G] contiguous, same dtype as x; K ordered (kh, kw, cin).
    b_ptr: [C_OUT] fp32 (ignored unless HAS_BIAS).
    y_ptr: [N, OH, OW, C_OUT] NHWC, contiguous; group g writes channels [g*COUT_G, (g+1)*COUT_G).
    Grid: (cdiv(M_GEMM, BLOCK_M) * cdiv(COUT_G, BLOCK_N), groups). M_BUCKET and BATCH_BUCKET are only
    autotune keys.
    """
    K_GEMM: tl.constexpr = KH * KW * CIN_G
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M_GEMM, BLOCK_M), tl.cdiv(COUT_G, BLOCK_N), GROUP_M)
    offs_m, offs_n, m_ok, n_ok, ih0, iw0, row_base, w_group, w_cols = conv_tile(
        pid_m, pid_n, g, w_ptr, H, W, C_IN, OH, OW, M_GEMM, COUT_G,
        CIN_G, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, BLOCK_M, BLOCK_N,
    )  # fmt: skip

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TAP_LOOP:
        acc = tap_range_dot(
            acc, x_ptr, w_group, w_cols, row_base, ih0, iw0, m_ok, n_ok, H, W, C_IN, 0, KH * KW,
            CIN_G, KW, DOT_PRECISION, BLOCK_K,
        )  # fmt: skip
    else:
        # Computed transposed, acc^T = W_g x A^T, so that the gathered tile is [BLOCK_K, BLOCK_M]: with
        # no contiguous axis to coalesce, Triton spreads the threads over the last axis, the pixels, and
        # each thread keeps the loop-invariant row state (base offset, window origin, bounds) of a few
        # pixels instead of BLOCK_M / num_warps of them; as A @ W^T this loop spilled registers in most
        # configs (found by benchmarks/compile_check.py).
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K_GEMM, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K_GEMM
            # Constexpr divisors: these compile to multiply-shift sequences, not hardware division.
            kh = offs_k // (KW * CIN_G)
            rem = offs_k - kh * (KW * CIN_G)
            kw = rem // CIN_G
            ci = rem - kw * CIN_G
            ih = ih0[None, :] + kh[:, None]
            iw = iw0[None, :] + kw[:, None]
            a_mask = m_ok[None, :] & k_ok[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_off = row_base[None, :] + ((kh * W + kw) * C_IN + ci)[:, None]
            a_t = tl.load(x_ptr + a_off, mask=a_mask, other=0.0)
            b_t = tl.load(w_group + w_cols[:, None] + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc_t = tl.dot(b_t, a_t, acc_t, input_precision=DOT_PRECISION)
        acc = tl.trans(acc_t)  # once per tile, into the epilogue's [BLOCK_M, BLOCK_N] orientation

    # Epilogue in fp32, one rounding to the output dtype at the very end.
    acc = bias_relu(acc, b_ptr + g * COUT_G + offs_n, n_ok, HAS_BIAS, APPLY_RELU)
    y_off = offs_m.to(tl.int64)[:, None] * C_OUT + (g * COUT_G + offs_n)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def pack_conv_weight(weight: torch.Tensor, groups: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Repack a torch/Caffe conv weight once, at model load, for ``conv2d_nhwc``.

    weight: [Cout, Cin/groups, KH, KW] (the torch.nn.Conv2d / Caffe blob layout).
    Returns a contiguous [groups, Cout/groups, KH*KW*Cin/groups] tensor whose K axis is ordered
    (kh, kw, cin), the order in which the kernel gathers NHWC input. ``dtype`` optionally casts.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"conv weight must be a 4-D tensor [Cout, Cin/g, KH, KW], got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"conv weight must be floating point, got {weight.dtype}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    cout, cin_g, kh, kw = weight.shape
    if cout % groups != 0:
        raise ValueError(f"Cout={cout} is not divisible by groups={groups}")
    w = weight.detach()
    if dtype is not None:
        w = w.to(dtype)
    return w.permute(0, 2, 3, 1).reshape(groups, cout // groups, kh * kw * cin_g).contiguous()


def conv2d_nhwc(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    kernel_size,
    stride=1,
    padding=0,
    groups: int = 1,
    relu: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    allow_tf32: bool = False,
    k_split: bool = False,
) -> torch.Tensor:
    """y = relu?(conv2d(x, w, bias)) with NHWC input and output.

    x: [N, H, W, Cin] contiguous (NHWC), fp32/fp16/bf16. packed: from ``pack_conv_weight``, same dtype
    as x. bias: [Cout] fp32 or None. Accumulation, bias and ReLU are fp32; the result is rounded once
    to ``out_dtype`` (default: x.dtype). ``out``: optional preallocated [N, OH, OW, Cout] buffer.
    fp32 inputs use exact fp32 products unless ``allow_tf32``. ``k_split``: sum K by tap segments fixed
    by the layer's per-image shape, split across programs when the output has few tiles (conv_splitk.py;
    bit-identical at every batch size, but other bits than ``k_split=False``); a layer that does not
    segment runs as without it.
    """
    check_kernel_tensor("x", x, ndim=4)
    launch = plan_conv2d_nhwc(
        tuple(x.shape), x.dtype, x.device, packed, bias, kernel_size=kernel_size, stride=stride, padding=padding,
        groups=groups, relu=relu, out_dtype=out_dtype, out=out, allow_tf32=allow_tf32, k_split=k_split,
    )  # fmt: skip
    return run_on_device(launch, x)


def plan_conv2d_nhwc(
    x_shape: tuple,
    dtype: torch.dtype,
    device: torch.device,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    kernel_size,
    stride=1,
    padding=0,
    groups: int = 1,
    relu: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    allow_tf32: bool = False,
    k_split: bool = False,
) -> Launch:
    """``conv2d_nhwc`` planned for inputs of ``x_shape``/``dtype`` on ``device``: the checks, the output
    buffer, the grid, the kernel arguments and the AOT library's descriptor, all made here, once.

    The returned launch runs on the current CUDA device and stream (the caller makes them x's)."""
    check_input("x", x_shape, dtype, device, ndim=4)
    check_kernel_tensor("packed", packed, ndim=3)
    if packed.dtype != dtype:
        raise ValueError(f"packed weight dtype {packed.dtype} != input dtype {dtype}; pack with dtype=x.dtype")
    kh, kw = int_pair("kernel_size", kernel_size)
    sh, sw = int_pair("stride", stride)
    ph, pw = int_pair("padding", padding)
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"invalid geometry kernel_size={kernel_size} stride={stride} padding={padding}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    n, h, w, cin = x_shape
    if cin % groups != 0:
        raise ValueError(f"input channels {cin} are not divisible by groups={groups}")
    cin_g = cin // groups
    if packed.shape[0] != groups:
        raise ValueError(f"packed weight has {packed.shape[0]} groups, conv called with groups={groups}")
    if packed.shape[2] != kh * kw * cin_g:
        raise ValueError(
            f"channel/kernel mismatch: packed weight has K={packed.shape[2]} per output channel, "
            f"but x has Cin/g={cin_g} and kernel {kh}x{kw} (K={kh * kw * cin_g})"
        )
    cout_g = packed.shape[1]
    cout = groups * cout_g
    if bias is not None:
        check_kernel_tensor("bias", bias, ndim=1, dtypes=(torch.float32,))
        if bias.shape[0] != cout:
            raise ValueError(f"bias has {bias.shape[0]} entries, expected Cout={cout}")
    check_same_device(device, packed=packed, bias=bias)
    oh = conv_output_size(h, kh, sh, ph)
    ow = conv_output_size(w, kw, sw, pw)
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} is too small for kernel {kh}x{kw} with padding {padding}")
    m_gemm = n * oh * ow
    if m_gemm > MAX_GEMM_M:
        raise ValueError(f"N*OH*OW={m_gemm} exceeds {MAX_GEMM_M}; split the batch")
    y_dtype = resolve_out_dtype(out_dtype, dtype)
    out = output_buffer(out, shape=(n, oh, ow, cout), dtype=y_dtype, device=device)
    if m_gemm == 0:
        return Launch(out, nothing)

    # bias or a dummy pointer, never read when HAS_BIAS is False
    args = (packed, bias if bias is not None else packed, out, h, w, cin, oh, ow, cout, m_gemm, cout_g,
            m_bucket(m_gemm), batch_bucket(n))  # fmt: skip
    tap_loop = cin_g >= TAP_LOOP_MIN_CIN
    consts = dict(
        CIN_G=cin_g, KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw, PAD_H=ph, PAD_W=pw, TAP_LOOP=tap_loop,
        HAS_BIAS=bias is not None, APPLY_RELU=bool(relu), DOT_PRECISION=dot_precision(dtype, allow_tf32),
    )  # fmt: skip
    if k_split:
        segments, per = conv_k_segments(oh * ow, cin_g, cout_g, groups, kh * kw, tap_loop, sm_count(device))
        if segments > 1:
            # Always JIT: the AOT library holds only the unsegmented kernel, whose bits differ.
            run = segmented_run(args, consts, m_gemm=m_gemm, cout_g=cout_g, groups=groups, segments=segments,
                                taps_per_segment=per, device=device)  # fmt: skip
            return Launch(out, run)

    def grid(meta):
        return (triton.cdiv(m_gemm, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]), groups)

    from . import native

    # The AOT library (when built, and when it holds this specialisation) launches with no JIT.
    aot = native.conv2d_launcher(
        x_shape, dtype, packed, bias, out, kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw), groups=groups,
        relu=relu, allow_tf32=allow_tf32,
    )  # fmt: skip
    jit = _conv2d_nhwc_kernel[grid]
    return aot_or_jit(out, aot, jit, args, consts)
