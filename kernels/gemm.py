"""Fully connected layers: y = relu?(x @ W^T + b) with a K-major packed weight and optional split-K.

Layout: the weight is packed once to W^T, [K, N] with N contiguous, so a (BLOCK_K x BLOCK_N) weight
tile is BLOCK_K coalesced row segments and the kernel never transposes in registers. Each row is padded
to a multiple of 16 elements (``WEIGHT_ROW_ALIGN``; the packed tensor is the [K, N] view of the padded
[K, N_pad] storage): fc8's N = 1000 would otherwise start every row at an unaligned address and Triton
would load the weight, the largest operand at small batch, one element at a time.

Small M (a few images; fc6/fc7/fc8 at batch 1..32) is weight-bandwidth bound: every weight byte is
used by only M rows. Such calls get thin BLOCK_M=16 tiles with long K slabs (``gemm_configs``), and,
because N/BLOCK_N tiles alone cannot fill a GPU (fc6: 4096/128 = 32 tiles on 132 SMs), the K range is
split across programs. Split-K writes fp32 partial tiles to a workspace that a second kernel sums in a
fixed order (deterministic, unlike atomics) before bias, ReLU and the single downcast.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from .autotune import ALIGN_ELEMS, gemm_configs, m_bucket, prune_gemm, sm_count
from .launch_args import (
    Launch,
    check_input,
    check_kernel_tensor,
    check_row_major,
    check_same_device,
    dot_precision,
    nothing,
    output_buffer,
    resolve_out_dtype,
    run_on_device,
)
from .tiles import bias_relu, grouped_tile

# Split-K boundaries are multiples of this, a multiple of every BLOCK_K, so no slab straddles splits.
SPLIT_K_GRANULE = 256
# Each split gets at least this much K, so the partial-sum traffic stays small next to the weight reads.
SPLIT_K_MIN_CHUNK = 512
# Upper bound on splits: the reduce kernel unrolls over them and the workspace grows with them.
MAX_SPLIT_K = 32
# Programs per SM that the split-K heuristic aims for, so loads of one program overlap another's math.
TARGET_PROGRAMS_PER_SM = 2
# Nominal tile used by the split-K heuristic (the autotuned tile is not known before launch).
NOMINAL_BLOCK_N = 128
# Elements per program in the split-K reduction (a pure streaming kernel).
REDUCE_BLOCK = 1024
# Rows the fused split-K kernel's last arrival sums at a time: 16 x BLOCK_N <= 4096 fp32 values, at most 32
# per thread at 4 warps for each split's load; it divides every BLOCK_M (16, 32, ..., 256). The unrolled sum
# keeps several splits' loads in flight, so above REDUCE_ROWS_MAX_SPLITS splits half as many rows: 16 rows
# spilled at 11 splits (128 x 128 tile, sm_90), 8 rows at every split count spilled on sm_80 (128 x 128 x 64).
REDUCE_ROWS = tl.constexpr(16)
REDUCE_ROWS_MAX_SPLITS = tl.constexpr(8)
# The fused reduce's arrival counters are sized for tiles of ARRIVAL_TILE x ARRIVAL_TILE, the smallest
# BLOCK_M and BLOCK_N of any config, so one count covers whichever config runs (the AOT library sizes the
# counters in its workspace the same way; native/generate.py checks that no compiled tile is smaller).
ARRIVAL_TILE = 16
# Packed weight rows start at multiples of this many elements: what Triton's divisibility-by-16
# specialisation of the row stride needs to vectorise the weight loads.
WEIGHT_ROW_ALIGN = ALIGN_ELEMS


@triton.jit
def _linear_tile(
    x_ptr,
    w_ptr,
    M,
    N,
    K,
    STRIDE_WK,
    N_LOAD,
    K_PER_SPLIT,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """The fp32 sum of this program's (BLOCK_M x BLOCK_N) output tile over its K split, as both GEMM
    kernels form it (arguments as ``_linear_kernel``'s). Returns (acc, pid, pid_k, offs_n, n_ok, out_off,
    out_mask): the tile, the program ids, its columns and where its [M, N] outputs go."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    n_load = offs_n < N_LOAD
    # Row offsets in int64: M*K and K*N pass 2^31 for large batches or wide layers.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K

    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        a = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(
            w_ptr + offs_k.to(tl.int64)[:, None] * STRIDE_WK + offs_n[None, :],
            mask=k_ok[:, None] & n_load[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    out_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    return acc, pid, pid_k, offs_n, n_ok, out_off, out_mask


# Tuned configs are cached on disk (see the conv kernel); the row stride is keyed (it decides the
# scalar-load prune rule), the M bucket is left unspecialised (read only by the autotuner).
@triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K", "STRIDE_WK", "N_LOAD", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_gemm},
    cache_results=True,
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    ws_ptr,
    M,
    N,
    K,
    STRIDE_WK,
    N_LOAD,
    M_BUCKET,
    K_PER_SPLIT,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) output tile over one K split.

    x_ptr: [M, K] row-major contiguous, fp32/fp16/bf16.
    w_ptr: [K, N] row-major with row stride STRIDE_WK >= N (W^T, from ``pack_linear_weight``), same dtype as x;
        columns [N, N_LOAD) of each row are readable (the packing's zero padding) and loaded with the
        rest, so that the load mask is as aligned as the rows: a mask at N = 1000 would split every
        vector load into scalar ones.  Their products land in accumulator columns that are never stored.
    b_ptr: [N] fp32 (ignored unless HAS_BIAS).
    y_ptr: [M, N] contiguous, written only when SPLIT_K == 1.
    ws_ptr: [SPLIT_K, M, N] fp32 partial sums, written only when SPLIT_K > 1.
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K). M_BUCKET is only an autotune key.
    """
    acc, pid, pid_k, offs_n, n_ok, out_off, out_mask = _linear_tile(
        x_ptr, w_ptr, M, N, K, STRIDE_WK, N_LOAD, K_PER_SPLIT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    )
    if SPLIT_K == 1:
        acc = bias_relu(acc, b_ptr + offs_n, n_ok, HAS_BIAS, APPLY_RELU)
        tl.store(y_ptr + out_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + out_off, acc, mask=out_mask)


# Same tuning as _linear_kernel (one family per M bucket); SPLIT_K is keyed since it changes the K range.
@triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K", "STRIDE_WK", "N_LOAD", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_gemm},
    cache_results=True,
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _linear_splitk_fused_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    ws_ptr,
    arrivals_ptr,
    M,
    N,
    K,
    STRIDE_WK,
    N_LOAD,
    M_BUCKET,
    K_PER_SPLIT,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Split-K GEMM whose reduction is folded in: the last program to finish a tile sums its partials.

    Arguments as ``_linear_kernel`` (SPLIT_K >= 2), plus arrivals_ptr: [tiles] int32, zero on entry and
    left zero on exit (the last arrival resets its tile's counter, so one buffer serves every launch that
    is ordered after this one on the stream). Every program stores its fp32 partial tile to
    ws[pid_k], then increments its tile's counter (acq_rel, so the partial is visible before the count);
    the program that sees SPLIT_K - 1 arrivals before it re-reads all SPLIT_K partials in split order
    0, 1, ..., SPLIT_K - 1 (its own included), so the sum -- and the result -- does not depend on which
    program finished last, and equals the separate reduce kernel's bit for bit. Bias, ReLU and the one
    downcast follow. Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K).
    """
    acc, pid, pid_k, offs_n, n_ok, out_off, out_mask = _linear_tile(
        x_ptr, w_ptr, M, N, K, STRIDE_WK, N_LOAD, K_PER_SPLIT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    )
    split_stride = tl.cast(M, tl.int64) * N  # tl.cast: an int argument equal to 1 arrives as a constexpr
    tl.store(ws_ptr + pid_k * split_stride + out_off, acc, mask=out_mask)
    # The counter is bumped by one thread: the CTA barrier orders every thread's partial stores before it
    # (the release below is cumulative over what the barrier made visible to that thread).
    tl.debug_barrier()
    # acq_rel at GPU scope (Triton's default for atomics): this program's partial is released before its
    # arrival counts, and the last arrival acquires every other program's partial before reading it.
    arrived_before = tl.atomic_add(arrivals_ptr + pid, 1, sem="acq_rel", scope="gpu")
    if arrived_before == SPLIT_K - 1:
        # The tile is summed ROWS rows at a time with offsets made afresh: the whole tile's sum and
        # its int64 offsets, live together in the accumulator's layout, spilled hundreds of bytes to 25 KB
        # per thread in every full tile (benchmarks/compile_check.py, sm_80 and sm_90).
        pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = cols < N
        # The bias is loaded once per tile, not per chunk through tiles.bias_relu: that spilled 184 bytes on
        # sm_80 (fc8, 64 x 128 tile), this 16.
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=cols_ok, other=0.0)
        ROWS: tl.constexpr = REDUCE_ROWS if SPLIT_K <= REDUCE_ROWS_MAX_SPLITS else REDUCE_ROWS // 2
        for r0 in range(0, BLOCK_M, ROWS):
            rows = pid_m * BLOCK_M + r0 + tl.arange(0, ROWS)
            chunk_off = rows.to(tl.int64)[:, None] * N + cols[None, :]
            chunk_mask = (rows < M)[:, None] & cols_ok[None, :]
            total = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                # .cg: read from L2, never from a line this SM's L1 might hold from before the other stores.
                total += tl.load(
                    ws_ptr + s * split_stride + chunk_off, mask=chunk_mask, other=0.0, cache_modifier=".cg"
                )
            if HAS_BIAS:
                total += bias[None, :]
            if APPLY_RELU:
                total = tl.maximum(total, 0.0)
            tl.store(y_ptr + chunk_off, total.to(y_ptr.dtype.element_ty), mask=chunk_mask)
        tl.atomic_xchg(arrivals_ptr + pid, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Sum the split-K partials in a fixed order, then bias, ReLU and one downcast.

    ws_ptr: [SPLIT_K, M, N] fp32 contiguous. b_ptr: [N] fp32. y_ptr: [M, N] contiguous.
    Grid: (cdiv(M*N, BLOCK),).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = tl.cast(M, tl.int64) * N  # tl.cast, not .to(): an int arg equal to 1 arrives as a constexpr
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0)
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def pack_linear_weight(
    weight: torch.Tensor,
    *,
    input_chw: tuple[int, int, int] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Repack a torch/Caffe fc weight [N_out, K] once, at model load, to the [K, N_out] layout of ``linear``.

    ``input_chw=(C, H, W)``: the layer was trained on a torch NCHW flatten (index c*H*W + h*W + w), as
    fc6 after pool5 is; the columns are permuted once so that the layer accepts the flatten of an NHWC
    tensor (index (h*W + w)*C + c) instead, and no activation transpose is needed at run time.
    ``dtype`` optionally casts. The result is [K, N_out] with unit column stride and a row stride padded
    up to a multiple of ``WEIGHT_ROW_ALIGN`` (zeros; ``linear`` loads them with the row, for aligned
    vector loads, and never stores their products).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"linear weight must be a 2-D tensor [N_out, K], got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"linear weight must be floating point, got {weight.dtype}")
    w = weight.detach()
    if dtype is not None:
        w = w.to(dtype)
    n_out, k = w.shape
    if input_chw is not None:
        if len(input_chw) != 3 or any(int(d) < 1 for d in input_chw):
            raise ValueError(f"input_chw must be three positive ints (C, H, W), got {input_chw!r}")
        c, h, wd = (int(d) for d in input_chw)
        if c * h * wd != k:
            raise ValueError(f"input_chw={input_chw} has {c * h * wd} elements but the weight has K={k}")
        w = w.reshape(n_out, c, h, wd).permute(0, 2, 3, 1).reshape(n_out, k)
    n_pad = triton.cdiv(n_out, WEIGHT_ROW_ALIGN) * WEIGHT_ROW_ALIGN
    if n_pad == n_out:
        return w.t().contiguous()
    padded = torch.zeros((k, n_pad), dtype=w.dtype, device=w.device)
    padded[:, :n_out] = w.t()
    return padded[:, :n_out]


# How the JIT path sums split-K partials: "fused" (the last program of a tile, one launch) or "separate"
# (``_splitk_reduce_kernel``, a second launch). Both give the same bits. The AOT library ships both and runs
# the separate one unless FASTFEAT_NATIVE_SPLITK_REDUCE=fused (kernels/native.py ``split_k_reduce``).
SPLIT_K_REDUCES = ("fused", "separate")
# What ``linear(split_k_reduce=None)`` runs; the AOT tooling switches it (see ``aot.recording``).
DEFAULT_SPLIT_K_REDUCE = "fused"
# Per-tile arrival counters of the fused reduce, one zeroed int32 buffer per (device, stream), grown on
# demand. Every launch leaves its counters at zero again, so launches ordered on one stream share it;
# launches on different streams get different buffers.
_arrival_buffers: dict[tuple, torch.Tensor] = {}
_arrival_lock = threading.Lock()


def arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``tiles`` counters for the fused split-K reduce on ``device``'s
    current stream (allocated once per stream and size class, then reused: each launch re-zeroes it)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    with _arrival_lock:
        buf = _arrival_buffers.get(key)
        if buf is None or buf.numel() < tiles:
            buf = torch.zeros(triton.next_power_of_2(max(tiles, 64)), dtype=torch.int32, device=device)
            _arrival_buffers[key] = buf
    return buf


def _readable_columns(w: torch.Tensor) -> int:
    """How many columns of every row of ``w`` may be read: its row stride when the storage holds the last
    row's padding too (as ``pack_linear_weight``'s does), else just N."""
    k, n = w.shape
    stride = w.stride(0)
    if stride > n and w.storage_offset() + k * stride <= w.untyped_storage().nbytes() // w.element_size():
        return stride
    return n


def _pick_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    bm = 16 if m <= 32 else 128
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, NOMINAL_BLOCK_N)
    target = TARGET_PROGRAMS_PER_SM * sm_count(device)
    if tiles >= target:
        return 1
    return max(1, min(triton.cdiv(target, tiles), k // SPLIT_K_MIN_CHUNK, MAX_SPLIT_K))


def linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    split_k_reduce: str | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """y = relu?(x @ W^T + bias) for x [M, K] and ``w_packed`` = W^T [K, N] from ``pack_linear_weight``.

    x: contiguous; w_packed: rows contiguous, row stride >= N (``pack_linear_weight`` pads it); same dtype
    (fp32/fp16/bf16). bias: [N] fp32 or None. Accumulation, bias and ReLU in fp32, one rounding to ``out_dtype`` (default: x.dtype). ``out``: optional
    preallocated [M, N] buffer. ``split_k``: None picks a split from M, N, K and the SM count; an int
    forces it (1 disables split-K). ``split_k_reduce``: "fused" sums the partials in the GEMM launch (the
    last program to finish a tile, in split order), "separate" in a second reduce launch; same bits;
    None: ``DEFAULT_SPLIT_K_REDUCE``.
    fp32 inputs use exact fp32 products unless ``allow_tf32``.
    """
    check_kernel_tensor("x", x, ndim=2)
    launch = plan_linear(
        tuple(x.shape), x.dtype, x.device, w_packed, bias, relu=relu, out_dtype=out_dtype, out=out, split_k=split_k,
        split_k_reduce=split_k_reduce, allow_tf32=allow_tf32,
    )  # fmt: skip
    return run_on_device(launch, x)


def plan_linear(
    x_shape: tuple,
    dtype: torch.dtype,
    device: torch.device,
    w_packed: torch.Tensor,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    split_k_reduce: str | None = None,
    allow_tf32: bool = False,
) -> Launch:
    """``linear`` planned for inputs of ``x_shape``/``dtype`` on ``device``: checks, output, the split-K
    choice and its workspace, the kernel arguments and the AOT descriptor made once (see
    ``conv.plan_conv2d_nhwc``)."""
    check_input("x", x_shape, dtype, device, ndim=2)
    check_kernel_tensor("w_packed", w_packed, ndim=2, contiguous=False)
    if w_packed.dtype != dtype:
        raise ValueError(f"w_packed dtype {w_packed.dtype} != x dtype {dtype}; pack with dtype=x.dtype")
    m, k = x_shape
    if w_packed.shape[0] != k:
        raise ValueError(
            f"x has K={k} features but w_packed is {tuple(w_packed.shape)} (expected [K, N] from "
            "pack_linear_weight; an unpacked [N, K] weight is the usual cause)"
        )
    n = w_packed.shape[1]
    check_row_major("w_packed", w_packed, cols=n)
    if bias is not None:
        check_kernel_tensor("bias", bias, ndim=1, dtypes=(torch.float32,))
        if bias.shape[0] != n:
            raise ValueError(f"bias has {bias.shape[0]} entries, expected N={n}")
    check_same_device(device, w_packed=w_packed, bias=bias)
    if split_k is not None and (not isinstance(split_k, int) or not 1 <= split_k <= MAX_SPLIT_K):
        raise ValueError(f"split_k must be an int in [1, {MAX_SPLIT_K}], got {split_k!r}")
    if split_k_reduce is None:
        split_k_reduce = DEFAULT_SPLIT_K_REDUCE
    if split_k_reduce not in SPLIT_K_REDUCES:
        raise ValueError(f"split_k_reduce must be one of {SPLIT_K_REDUCES}, got {split_k_reduce!r}")
    y_dtype = resolve_out_dtype(out_dtype, dtype)
    out = output_buffer(out, shape=(m, n), dtype=y_dtype, device=device)
    if m == 0 or n == 0:
        return Launch(out, nothing)
    if k == 0:
        raise ValueError("x has K=0 features")

    from . import native

    readable = _readable_columns(w_packed)
    # The AOT library (when built, and when it holds this specialisation) launches with no JIT. It makes
    # the same split-K choice (and allocates its own workspace), so a forced split_k stays with the JIT.
    aot = None
    if split_k is None:
        aot = native.linear_launcher(
            x_shape, dtype, w_packed, bias, out, readable_cols=readable, relu=relu, allow_tf32=allow_tf32
        )

    splits = split_k if split_k is not None else _pick_split_k(m, n, k, device)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), SPLIT_K_GRANULE) * SPLIT_K_GRANULE
    splits = triton.cdiv(k, k_per_split)  # rounding the chunk up may leave fewer, never empty, splits
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=device) if splits > 1 else out
    b_arg = bias if bias is not None else w_packed  # dummy pointer, never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), splits)

    consts = dict(
        SPLIT_K=splits, HAS_BIAS=bias is not None, APPLY_RELU=bool(relu), DOT_PRECISION=dot_precision(dtype, allow_tf32)
    )
    if splits > 1 and split_k_reduce == "fused":
        # Taken when the plan is made, so never allocated inside a CUDA graph capture; every launch leaves
        # them at zero. Sized for the most tiles a config can make (BLOCK_M, BLOCK_N >= ARRIVAL_TILE).
        arrivals = arrival_counters(device, triton.cdiv(m, ARRIVAL_TILE) * triton.cdiv(n, ARRIVAL_TILE))
        fused = _linear_splitk_fused_kernel[grid]
        fused_args = (
            w_packed,
            b_arg,
            out,
            ws,
            arrivals,
            m,
            n,
            k,
            w_packed.stride(0),
            readable,
            m_bucket(m),
            k_per_split,
        )

        def run_fused(x):
            if aot is not None and aot(x):
                return
            fused(x, *fused_args, **consts)

        return Launch(out, run_fused)

    gemm = _linear_kernel[grid]
    args = (w_packed, b_arg, out, ws, m, n, k, w_packed.stride(0), readable, m_bucket(m), k_per_split)
    reduce = _splitk_reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)] if splits > 1 else None
    reduce_consts = dict(SPLIT_K=splits, HAS_BIAS=bias is not None, APPLY_RELU=bool(relu), BLOCK=REDUCE_BLOCK)

    def run(x):
        if aot is not None and aot(x):
            return
        gemm(x, *args, **consts)
        if reduce is not None:
            reduce(ws, b_arg, out, m, n, **reduce_consts)

    return Launch(out, run)
