"""Split-K for the tap-loop convolution: K cut into tap segments fixed by the layer, never by the batch.

At batch 1 the convolutions after conv1 have few output tiles: CaffeNet conv3 is 169 pixels x 384
channels, 2 x 3 tiles of 128 x 128, six programs on a 132-SM GPU. Cutting its K axis (9 taps x 256
channels) into segments gives each (tile, segment) pair a program of its own.

Determinism (an image's features must not depend on its batch-mates or the batch size) fixes the design:

* **Segments come from the per-image shape only** (``conv_k_segments``: output pixels per image, channels,
  taps, groups and the device's SM count), never from N: a layer is cut the same way at every batch size.
  Segments are whole taps, so no boundary depends on the autotuned BLOCK_K.
* **Both launch modes sum the same segment partials in the same order.** ``SPLIT`` (few tiles): one
  program per (tile, segment) stores its fp32 partial, and the last program of a tile to arrive (an
  acq_rel arrival counter, as in ``gemm._linear_splitk_fused_kernel``) re-reads all of them in segment
  order 0, 1, ..., S-1 and applies bias, ReLU and the downcast. Not ``SPLIT`` (enough tiles): one program
  per tile computes segment 0's partial, adds it to a zero total, then segment 1's, and so on: the same
  fp32 values added in the same order. So whether a batch splits (a choice that may follow the batch
  size freely, ``split_pays``) does not change a bit. Under the interpreter, which runs one config, this
  is tested bit for bit (tests/kernels/test_conv_splitk.py); on a GPU it holds where the two launches'
  autotuned configs sum a segment with the same MMA sequence, the same per-bucket caveat as the rest of
  the kernels (docs/kernels.md).

Cost at large batch, hence the gate. The non-split mode keeps two fp32 tiles live (the running total and
the segment partial; ``prune_segmented`` drops the configs whose two tiles would not fit in registers,
128 x 128 with 4 warps among them)
and restarts the software pipeline at every segment. A layer whose single image makes more than half a
wave of tiles (VGG's 224 and 112 pixel layers) never segments and runs ``conv._conv2d_nhwc_kernel``
unchanged; segments hold at least ``SEGMENT_MIN_K`` of K, so a pipeline restart is amortised over at least
eight 64-wide slabs. Which way the trade falls at batch 256 is for a GPU to measure (the ``layers`` step
of benchmarks/gpu_check.py times both); until then the triton backend segments only when
``FASTFEAT_CONV_SPLITK=1`` (``use_conv_split_k``). The AOT library ships the unsegmented kernel only,
so a segmented conv is always JIT-launched: mixing the two would change bits between shapes the library
holds and shapes it does not.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import autotune
from .autotune import conv_configs, prune_by_registers, prune_conv, sm_count
from .gemm import arrival_counters
from .tiles import bias_relu, conv_tile, grouped_tile, tap_range_dot

# FASTFEAT_CONV_SPLITK=1 makes the triton backend run segmentable convs through this module's kernel;
# 0 or unset keeps conv._conv2d_nhwc_kernel (what the AOT library ships) until a GPU measurement decides.
SPLITK_ENV = "FASTFEAT_CONV_SPLITK"
# Least K (taps x Cin/g) per segment: at least eight 64-wide slabs between pipeline restarts, and the
# partial-sum traffic of a split stays small next to the operand reads.
SEGMENT_MIN_K = 512
# Upper bound on segments: the workspace and the in-order re-read grow with them.
MAX_SEGMENTS = 8
# A layer segments only if one image makes at most 1/this of a wave of tiles: above that a split buys less
# than 2x the programs at batch 1, while the in-kernel mode's cost is paid at every batch size.
MIN_WAVE_SHARE_INVERSE = 2
# Nominal tile for counting tiles before the autotuner picks one (the conv configs' largest).
NOMINAL_BLOCK_M = 128
NOMINAL_BLOCK_N = 128
# Programs per SM a split aims for (as gemm's split-K heuristic).
TARGET_PROGRAMS_PER_SM = 2
# Registers per thread of ONE fp32 tile (BLOCK_M * BLOCK_N / threads) allowed in the non-split mode, where
# two are live (the total and the segment partial): 128 x 64 with 4 warps keeps both in 128 registers;
# 128 x 128 with 4 warps would need 256, past ptxas's 255, and spill. An estimate, not a ptxas count:
# benchmarks/compile_check.py compiles the kept configs.
TWO_ACC_REG_BUDGET = 64


def use_conv_split_k() -> bool:
    """The backend's switch: segmentable convs take this module's kernel when ``SPLITK_ENV`` is 1."""
    return os.environ.get(SPLITK_ENV, "0") == "1"


def conv_k_segments(
    out_pixels_per_image: int, cin_g: int, cout_g: int, groups: int, taps: int, tap_loop: bool, sms: int
) -> tuple[int, int]:
    """(segments, taps per segment) of a tap-loop conv, from its per-image shape and the SM count only.

    (1, taps): not segmented, because the layer has the flattened loop or one tap, one image already makes
    more than half a wave of tiles (``MIN_WAVE_SHARE_INVERSE``), or K is too short for two
    ``SEGMENT_MIN_K`` segments.
    """
    if not tap_loop or taps < 2:
        return 1, taps
    tiles = triton.cdiv(out_pixels_per_image, NOMINAL_BLOCK_M) * triton.cdiv(cout_g, NOMINAL_BLOCK_N) * groups
    if tiles * MIN_WAVE_SHARE_INVERSE > sms:
        return 1, taps
    want = triton.cdiv(TARGET_PROGRAMS_PER_SM * sms, tiles)
    segments = min(want, taps * cin_g // SEGMENT_MIN_K, taps, MAX_SEGMENTS)
    if segments < 2:
        return 1, taps
    per = triton.cdiv(taps, segments)
    return triton.cdiv(taps, per), per  # rounding the share up may leave fewer, never empty, segments


def split_pays(m_gemm: int, cout_g: int, groups: int, sms: int) -> bool:
    """Whether a segmented conv launches one program per (tile, segment): while its tiles fill less than
    one wave of ``sms``. May follow the batch size: both modes give the same bits."""
    return triton.cdiv(m_gemm, NOMINAL_BLOCK_M) * triton.cdiv(cout_g, NOMINAL_BLOCK_N) * groups < sms


def prune_segmented(configs, named_args, **kwargs):
    """``autotune.prune_conv`` over the configs that hold a second fp32 tile without spilling.

    Two tiles are live in both modes (the in-kernel mode's total and partial; the split mode's last
    arrival sums re-read partials while the tile's own may still be held): every config keeps one tile
    within ``TWO_ACC_REG_BUDGET``, and where the operand fragments sit in registers too (mma.sync before
    Hopper, and the exact-fp32 FMA dot) the conv's own estimate plus the second tile must stay within
    ``autotune.MMA_SYNC_REG_BUDGET``. Calibrated with benchmarks/compile_check.py (sm_80: 128 x 64 x 64
    spilled 64-216 bytes at 254 registers; sm_90's wgmma reads its operands from shared memory)."""
    args = {**named_args, **kwargs}
    configs = prune_by_registers(configs, TWO_ACC_REG_BUDGET, 0.0, 0.0)
    x = args["x_ptr"]
    ieee = args.get("DOT_PRECISION") == "ieee"
    if ieee or (x.is_cuda and autotune._device_capability(autotune._device_index(x)) < autotune.HOPPER_CAPABILITY):
        words = 1.0 if ieee else x.element_size() / 4  # 32-bit registers per operand element
        budget = autotune.FMA_REG_BUDGET if ieee else autotune.MMA_SYNC_REG_BUDGET

        def estimate(c):
            tile = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] / (32 * c.num_warps)
            return autotune._tile_regs(c, words, words) + tile

        configs = [c for c in configs if estimate(c) <= budget] or [min(configs, key=estimate)]
    return prune_conv(configs, named_args, **kwargs)


def segmented_configs() -> list:
    """``autotune.conv_configs`` plus small tiles: with exact fp32 (FMA dot, both operands in registers)
    and a second fp32 tile, every conv config spills at sm_80 and sm_90 (benchmarks/compile_check.py)."""
    configs = conv_configs()
    if autotune.interpreter_active():
        return configs
    small = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=3, num_warps=4),
    ]
    return configs + small


@triton.jit
def _segment_partial(
    x_ptr, w_group, w_cols, row_base, ih0, iw0, m_ok, n_ok, H, W, C_IN, segment,
    CIN_G: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TAPS_PER_SEGMENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 sum over taps [segment * TAPS_PER_SEGMENT, ...) of one tile: conv.py's tap loop on a tap range."""
    first_tap = segment * TAPS_PER_SEGMENT
    end_tap = tl.minimum(first_tap + TAPS_PER_SEGMENT, KH * KW)
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return tap_range_dot(
        part, x_ptr, w_group, w_cols, row_base, ih0, iw0, m_ok, n_ok, H, W, C_IN, first_tap, end_tap,
        CIN_G, KW, DOT_PRECISION, BLOCK_K,
    )  # fmt: skip


@triton.jit
def _epilogue(total, b_ptr, y_ptr, channels, c_ok, y_off, y_mask, HAS_BIAS: tl.constexpr, APPLY_RELU: tl.constexpr):
    """conv.py's epilogue: fp32 bias and ReLU, one rounding to the output dtype, the store."""
    total = bias_relu(total, b_ptr + channels, c_ok, HAS_BIAS, APPLY_RELU)
    tl.store(y_ptr + y_off, total.to(y_ptr.dtype.element_ty), mask=y_mask)


# Keyed as the conv kernel, plus the segmentation and the mode (they change the loop and the registers).
@triton.autotune(
    configs=segmented_configs(),
    key=["M_BUCKET", "BATCH_BUCKET", "COUT_G", "CIN_G", "KH", "KW", "SEGMENTS", "SPLIT"],
    prune_configs_by={"early_config_prune": prune_segmented},
    cache_results=True,
)
@triton.jit(do_not_specialize=["M_BUCKET", "BATCH_BUCKET"])
def _conv2d_nhwc_segmented_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    ws_ptr,
    arrivals_ptr,
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
    TAPS_PER_SEGMENT: tl.constexpr,
    SEGMENTS: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One tile of ``conv._conv2d_nhwc_kernel`` (same tensors and layouts) with K summed by tap segments.

    ws_ptr: [SEGMENTS, M_GEMM, C_OUT] fp32 partials (SPLIT only). arrivals_ptr: int32 counters, one per
    (group, tile), zero on entry and left zero (SPLIT only). TAP_LOOP is always True (read by the prune).
    Grid: (cdiv(M_GEMM, BLOCK_M) * cdiv(COUT_G, BLOCK_N), groups, SEGMENTS if SPLIT else 1).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_pid_m = tl.cdiv(M_GEMM, BLOCK_M)
    num_pid_n = tl.cdiv(COUT_G, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m, offs_n, m_ok, n_ok, ih0, iw0, row_base, w_group, w_cols = conv_tile(
        pid_m, pid_n, g, w_ptr, H, W, C_IN, OH, OW, M_GEMM, COUT_G,
        CIN_G, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    y_off = offs_m.to(tl.int64)[:, None] * C_OUT + (g * COUT_G + offs_n)[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]

    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT:
        segment = tl.program_id(2)
        part = _segment_partial(
            x_ptr, w_group, w_cols, row_base, ih0, iw0, m_ok, n_ok, H, W, C_IN, segment,
            CIN_G, KH, KW, TAPS_PER_SEGMENT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        seg_stride = tl.cast(M_GEMM, tl.int64) * C_OUT  # tl.cast: an int argument equal to 1 is a constexpr
        tl.store(ws_ptr + segment * seg_stride + y_off, part, mask=y_mask)
        # As gemm._linear_splitk_fused_kernel: the barrier orders every thread's partial stores before the
        # one-thread arrival, acq_rel releases them and lets the last arrival acquire the others'.
        tl.debug_barrier()
        tile = g * (num_pid_m * num_pid_n) + pid
        arrived_before = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived_before == SEGMENTS - 1:
            # A loop, not static_range: unrolled, the compiler issued all SEGMENTS loads at once and spilled.
            for s in range(SEGMENTS):
                # .cg: from L2, never from a line this SM's L1 may hold from before the other stores.
                total += tl.load(ws_ptr + s * seg_stride + y_off, mask=y_mask, other=0.0, cache_modifier=".cg")
            _epilogue(total, b_ptr, y_ptr, g * COUT_G + offs_n, n_ok, y_off, y_mask, HAS_BIAS, APPLY_RELU)
            tl.atomic_xchg(arrivals_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    else:
        for s in range(SEGMENTS):
            total += _segment_partial(
                x_ptr, w_group, w_cols, row_base, ih0, iw0, m_ok, n_ok, H, W, C_IN, s,
                CIN_G, KH, KW, TAPS_PER_SEGMENT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        _epilogue(total, b_ptr, y_ptr, g * COUT_G + offs_n, n_ok, y_off, y_mask, HAS_BIAS, APPLY_RELU)


def segmented_run(x_args: tuple, consts: dict, *, m_gemm: int, cout_g: int, groups: int, segments: int,
                  taps_per_segment: int, device):  # fmt: skip
    """The launch of a segmented conv whose arguments ``conv.plan_conv2d_nhwc`` made: ``x_args`` are the
    conv kernel's arguments after x_ptr (packed, bias, out, H ... BATCH_BUCKET), ``consts`` its constexprs
    (TAP_LOOP True). Adds the segmentation (``conv_k_segments``), the mode (``split_pays``) and, when it
    splits, the workspace and counters, allocated here, once (so never inside a CUDA graph capture)."""
    split = split_pays(m_gemm, cout_g, groups, sm_count(device))
    packed, bias_arg, y = x_args[:3]
    ws, arrivals = y, y  # dummy pointers, never read when SPLIT is False
    if split:
        ws = torch.empty((segments, m_gemm, y.shape[-1]), dtype=torch.float32, device=device)
        # Sized for the most tiles a config can make (BLOCK_M, BLOCK_N >= 16), every group.
        arrivals = arrival_counters(device, triton.cdiv(m_gemm, 16) * triton.cdiv(cout_g, 16) * groups)
    args = (packed, bias_arg, y, ws, arrivals, *x_args[3:])
    kernel_consts = {**consts, "TAPS_PER_SEGMENT": taps_per_segment, "SEGMENTS": segments, "SPLIT": split}

    def grid(meta):
        tiles = triton.cdiv(m_gemm, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"])
        return (tiles, groups, segments if split else 1)

    jit = _conv2d_nhwc_segmented_kernel[grid]
    return lambda x: jit(x, *args, **kernel_consts)
