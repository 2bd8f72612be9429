"""Autotune configs and launch-environment helpers for fastfeat.kernels.

The config factories return one list per kernel family that covers both Ampere (sm80: A100, 164 KiB
shared memory per block) and Hopper (sm90: H100/H200, 227 KiB). Which GPU the process will use is not
known at import time (and asking would initialise CUDA before DALI forks its workers), so the lists are
the union and ``prune_by_shared_memory`` drops, on the first launch, the configs whose pipelined
operand tiles cannot fit the actual device. The configs in ``HOPPER_ONLY_*`` (8-warp GEMM tiles, deeper
pipelines) are kept only on compute capability 9.x (``keep_for_capability``), so an A100 tunes over
exactly the configs it had before they were added; they come last in each list, so the first config a
prune hook keeps, the one ``FASTFEAT_AUTOTUNE=0`` and the AOT library use, is unchanged. ``prune_by_registers`` drops the configs that would spill
registers for the launch at hand (budgets measured with ``benchmarks/compile_check.py``, which compiles
every kernel and config for sm80 and sm90 without a GPU). Under ``TRITON_INTERPRET=1`` each factory
returns exactly one small config: the numpy interpreter gains nothing from tuning and every extra
config would be benchmarked on the CPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .versions import triton_too_old

if (_too_old := triton_too_old(triton.__version__)) is not None:
    raise ImportError(_too_old)

# Power-of-two cap for the M bucket used as an autotune key: beyond it the best tile no longer changes.
M_BUCKET_CAP = 4096
# Power-of-two cap for the batch bucket of the conv autotune key. M alone cannot tell batches apart once
# it passes M_BUCKET_CAP (conv1 has 3,025 output pixels per image, so batch 1 and batch 256 would share
# a bucket and be tuned at whichever ran first); from 256 images on, every conv layer of these networks
# has over 40,000 output rows, several waves of 128-row tiles on 132 SMs, and the best tile stops moving.
BATCH_BUCKET_CAP = 256
# FASTFEAT_AUTOTUNE=0 keeps one config per launch (the first the prune rules keep) instead of timing them
# all: the GPU check's kernel tests verify numerics, and tuning each test shape would take most of its time.
AUTOTUNE_ENV = "FASTFEAT_AUTOTUNE"
# Dtypes every launcher accepts for activations and weights (accumulation is always fp32).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Register budgets of the pruning rules: estimated 32-bit registers per thread held by the fp32
# accumulator plus the operand tiles that live in registers (see ``_tile_regs``). Calibrated with
# benchmarks/compile_check.py (triton 3.8, ptxas 12.9, sm_80 and sm_90): configs above them spill.
# Flattened conv loop: A is gathered element by element, with per-element index and padding math.
GATHER_A_REG_BUDGET = 96
# GEMM whose weight rows are unaligned (an unpadded fc8, N = 1000): B loads are scalar.  Also the budget
# under which sm_80 stores an unaligned output row without spilling (see prune_gemm).
GATHER_B_REG_BUDGET = 96
# input_precision="ieee" (exact fp32): tl.dot runs on FMA units with both operand tiles in registers.
FMA_REG_BUDGET = 88
# The same for a conv, whose tap loop also holds the window's indices: 128 x 64 x 16 at 4 warps (88)
# reached 255 registers and spilled 56 bytes in conv1's space-to-depth form on sm_90.
FMA_CONV_REG_BUDGET = 80
# Pre-Hopper mma.sync conv: the A/B fragments of a whole K slab sit in registers beside the accumulator.
MMA_SYNC_REG_BUDGET = 160
# First compute capability whose tl.dot (wgmma) reads its operands from shared memory.
HOPPER_CAPABILITY = 9
# Smallest BLOCK_M that Triton lowers to wgmma (one warpgroup covers 64 rows); thinner tiles use mma.sync.
WGMMA_MIN_BLOCK_M = 64
# Triton specialises an int argument on divisibility by 16 only; anything else is "unaligned".
ALIGN_ELEMS = 16


def interpreter_active() -> bool:
    """True when Triton runs kernels in its numpy CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def m_bucket(m: int) -> int:
    """Round a GEMM M up to a power of two (capped) so autotuning runs once per size class, not per batch."""
    return min(triton.next_power_of_2(max(int(m), 1)), M_BUCKET_CAP)


def batch_bucket(n: int) -> int:
    """Round a batch size up to a power of two (capped at BATCH_BUCKET_CAP): the conv's second size key."""
    return min(triton.next_power_of_2(max(int(n), 1)), BATCH_BUCKET_CAP)


def autotune_enabled() -> bool:
    """False when FASTFEAT_AUTOTUNE=0: launches take the first config the prune rules keep, untimed.

    Read at every prune (a new autotune key), not at import, so a process can switch it between phases.
    """
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _tuned(configs: list) -> list:
    """The configs to time: all of them, or only the first when autotuning is off (then none is timed)."""
    return configs if autotune_enabled() else configs[:1]


def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
        num_stages=stages,
        num_warps=warps,
    )


def _dedup(configs: list[triton.Config]) -> list[triton.Config]:
    seen: set[tuple] = set()
    out = []
    for c in configs:
        sig = (tuple(sorted(c.kwargs.items())), c.num_stages, c.num_warps)
        if sig not in seen:
            seen.add(sig)
            out.append(c)
    return out


def _signature(config: triton.Config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_stages, config.num_warps)


# Most warps of any conv config: with num_warps >= 8 Triton miscompiles a conv K loop that walks
# (kh, kw, channel slab) as one flat counter split by integer division (pytorch#173068, fixed there by
# capping non-1x1 convs at 4 warps, pytorch#177823 / #183989). Both loop shapes of conv.py are that
# form: the tap loop divides its counter by NUM_CB and KW (even for a 1x1 kernel, and for the
# space-to-depth conv1, which runs it), the flattened loop divides k by KW*CIN_G and CIN_G.
CONV_MAX_WARPS = 4

# Hopper-only conv configs: 4 warps (see CONV_MAX_WARPS), deeper pipelines that fit 227 KiB but were not
# in the Ampere-era list (wgmma keeps num_stages A/B buffers in shared memory).
HOPPER_ONLY_CONV = [
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 64, 64, 5, 4),
    _cfg(64, 128, 64, 5, 4),
]
# Hopper-only GEMM configs: 8 warps (two warpgroups) with 4-stage pipelines, and 128-wide K slabs; the
# GEMM's K loop has no index division, so 8 warps are safe. Small-M (weight-streaming) tiles with more
# loads in flight: 8 warps, 4-5 stages.
# (32 x 256 x 128 at 8 warps, 4 stages, spilled 60 bytes for fc8 at batch 1 on sm_90: not listed.)
HOPPER_ONLY_GEMM_SMALL_M = [
    _cfg(16, 128, 256, 4, 8),
]
HOPPER_ONLY_GEMM = [
    _cfg(128, 256, 64, 4, 8),
    _cfg(256, 128, 64, 4, 8),
    _cfg(128, 128, 128, 3, 8),
    _cfg(128, 128, 64, 5, 8),
]
_HOPPER_ONLY = {_signature(c) for c in HOPPER_ONLY_CONV + HOPPER_ONLY_GEMM_SMALL_M + HOPPER_ONLY_GEMM}


def is_hopper_only(config: triton.Config) -> bool:
    """True for a config that only compute capability 9.x keeps (``HOPPER_ONLY_*``)."""
    return _signature(config) in _HOPPER_ONLY


def keep_for_capability(configs: list, capability: int | None) -> list:
    """The configs a device of major compute ``capability`` may run: all on 9.x (Hopper), else all but
    the Hopper-only ones. None (not a CUDA tensor: the interpreter) counts as not Hopper."""
    if capability == HOPPER_CAPABILITY:
        return list(configs)
    return [c for c in configs if not is_hopper_only(c)]


def conv_config_table() -> list[triton.Config]:
    """Every conv config a GPU can be tuned over (before pruning), whatever the process runs on."""
    ampere = [
        _cfg(128, 128, 32, 3, 4),
        _cfg(128, 64, 32, 4, 4),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 32, 4, 4),
        _cfg(128, 64, 16, 4, 4),
        _cfg(64, 64, 64, 3, 4),
    ]
    # Hopper's larger shared memory affords deeper pipelines and wider K slabs at the same warp count.
    hopper = [
        _cfg(128, 128, 64, 3, 4),
        _cfg(128, 128, 32, 5, 4),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
    ]
    return _dedup(ampere + hopper + HOPPER_ONLY_CONV)


def conv_configs() -> list[triton.Config]:
    """Configs for the implicit-GEMM convolution (M = output pixels, N = Cout/groups, K = KH*KW*Cin/g).

    Every conv config uses at most CONV_MAX_WARPS = 4 warps (see there): with num_warps >= 8 Triton
    miscompiles the flattened (kh, kw, cin) K loop of a non-1x1 convolution (pytorch#173068).
    """
    if interpreter_active():
        return [_cfg(128, 64, 64, stages=1, warps=4)]
    return conv_config_table()


def gemm_config_table() -> list[triton.Config]:
    """Every GEMM config a GPU can be tuned over (before pruning), whatever the process runs on."""
    # Small M (1..32 rows): the kernel is bound by streaming the weight, so tiles are thin in M and
    # long in K to keep many bytes of W in flight per program; split-K (chosen by the launcher) adds
    # the parallelism that the few N tiles lack.
    small_m = [
        _cfg(16, 64, 128, 4, 4),
        _cfg(16, 128, 128, 4, 4),
        _cfg(16, 64, 256, 3, 4),
        _cfg(16, 128, 256, 3, 4),
        _cfg(32, 64, 128, 4, 4),
        _cfg(32, 128, 128, 4, 4),
        _cfg(16, 256, 128, 4, 8),
        _cfg(16, 128, 128, 6, 4),
    ]
    ampere = [
        _cfg(128, 128, 32, 4, 4),
        _cfg(128, 256, 32, 3, 8),
        _cfg(256, 128, 32, 3, 8),
        _cfg(128, 64, 32, 4, 4),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 64, 4, 4),
        _cfg(64, 64, 32, 4, 4),  # the one full tile within FMA_REG_BUDGET (exact fp32)
    ]
    hopper = [
        _cfg(128, 256, 64, 3, 8),
        _cfg(256, 128, 64, 3, 8),
        _cfg(128, 128, 64, 4, 8),
        _cfg(128, 128, 64, 5, 4),
    ]
    return _dedup(small_m + ampere + hopper + HOPPER_ONLY_GEMM_SMALL_M + HOPPER_ONLY_GEMM)


def gemm_configs() -> list[triton.Config]:
    """Configs for ``linear``: BLOCK_M=16 weight-streaming tiles for small M, square-ish tiles for large M.

    ``prune_gemm`` keeps only the family that matches the call's M bucket.
    """
    if interpreter_active():
        return [_cfg(16, 128, 256, stages=1, warps=4)]
    return gemm_config_table()


@functools.lru_cache(maxsize=16)
def _max_shared_memory(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))


@functools.lru_cache(maxsize=16)
def _device_capability(device_index: int) -> int:
    return int(torch.cuda.get_device_capability(device_index)[0])


def _device_index(t) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def tensor_capability(t) -> int | None:
    """Major compute capability of the device holding ``t``; None for a tensor not on a CUDA device."""
    return _device_capability(_device_index(t)) if t.is_cuda else None


def _tile_smem_bytes(config: triton.Config, elem_bytes: int, capability: int) -> int:
    """Bytes of the pipelined A/B buffers: triton 3.8 allocates num_stages of them for wgmma (Hopper,
    BLOCK_M >= 64) and num_stages - 1 otherwise (measured with benchmarks/compile_check.py)."""
    kw = config.kwargs
    per_stage = (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elem_bytes
    wgmma = capability >= HOPPER_CAPABILITY and kw["BLOCK_M"] >= WGMMA_MIN_BLOCK_M
    return per_stage * max(config.num_stages - (0 if wgmma else 1), 1)


def prune_by_shared_memory(configs, named_args, tensor_arg: str):
    """Drop configs whose pipelined A/B tiles exceed the device's shared memory.

    The estimate ignores epilogue scratch, so a borderline config can still fail to launch; the
    autotuner then scores it as infinitely slow, so this is only a tuning-time saving.
    """
    t = named_args[tensor_arg]
    if not t.is_cuda:
        return configs
    index = _device_index(t)
    limit, capability = _max_shared_memory(index), _device_capability(index)
    kept = [c for c in configs if _tile_smem_bytes(c, t.element_size(), capability) <= limit]
    return kept or configs[:1]


def _tile_regs(config: triton.Config, a_weight: float, b_weight: float) -> float:
    """Estimated 32-bit registers per thread: the fp32 accumulator plus weighted A and B tiles."""
    kw = config.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    return (bm * bn + a_weight * bm * bk + b_weight * bk * bn) / (32 * config.num_warps)


def prune_by_registers(configs, budget: float, a_weight: float, b_weight: float):
    """Drop configs whose ``_tile_regs`` estimate exceeds ``budget``; keep the smallest if none fits."""
    estimate = lambda c: _tile_regs(c, a_weight, b_weight)
    return [c for c in configs if estimate(c) <= budget] or [min(configs, key=estimate)]


def _prune_fma(configs, args, budget: float = FMA_REG_BUDGET):
    if args.get("DOT_PRECISION") == "ieee":
        return prune_by_registers(configs, budget, 1.0, 1.0)
    return configs


def prune_conv(configs, named_args, **kwargs):
    """Conv pruning: shared-memory fit, no K slab wider than the channel group in the tap loop, and the
    register budgets (flattened-loop gathers, exact-fp32 FMA dot, pre-Hopper mma.sync fragments)."""
    args = {**named_args, **kwargs}
    configs = keep_for_capability(configs, tensor_capability(args["x_ptr"]))
    configs = [c for c in configs if c.num_warps <= CONV_MAX_WARPS] or configs[:1]
    configs = prune_by_shared_memory(configs, args, "x_ptr")
    if args.get("TAP_LOOP", False):
        widest = max(16, triton.next_power_of_2(int(args["CIN_G"])))
        narrow = [c for c in configs if c.kwargs["BLOCK_K"] <= widest]
        configs = narrow or configs
    elif "TAP_LOOP" in args:
        # Each gathered A element costs its value, address and padding test: weigh A twice.
        configs = prune_by_registers(configs, GATHER_A_REG_BUDGET, 2.0, 0.0)
    configs = _prune_fma(configs, args, FMA_CONV_REG_BUDGET)
    x = args["x_ptr"]
    if x.is_cuda and args.get("DOT_PRECISION") != "ieee" and _device_capability(_device_index(x)) < HOPPER_CAPABILITY:
        words = x.element_size() / 4  # 32-bit registers per operand element
        configs = prune_by_registers(configs, MMA_SYNC_REG_BUDGET, words, words)
    return _tuned(configs)


def prune_gemm(configs, named_args, **kwargs):
    """GEMM pruning: keep thin-M tiles for M <= 32 and full tiles above, then shared-memory fit, then
    the register budgets (scalar B loads when the weight's row stride or its load width is unaligned,
    exact-fp32 FMA dot).

    ``pack_linear_weight`` pads the rows to a multiple of 16 and the launcher loads the padding, so only
    a weight packed some other way (a contiguous [K, N] with N = 1000, say) takes the scalar-load rule."""
    args = {**named_args, **kwargs}
    small = int(args["M_BUCKET"]) <= 32
    configs = keep_for_capability(configs, tensor_capability(args["x_ptr"]))
    split_k = int(args.get("SPLIT_K", 1))
    if split_k > 1:
        # The split-K launches (the fused reduce re-reads the partials beside the accumulator) spill in
        # every full Hopper-only tile on sm_90 (benchmarks/compile_check.py): keep them to SPLIT_K == 1.
        configs = [c for c in configs if not (is_hopper_only(c) and c.kwargs["BLOCK_M"] > 32)] or configs[:1]
    family = [c for c in configs if (c.kwargs["BLOCK_M"] <= 32) == small]
    configs = prune_by_shared_memory(family or configs, args, "x_ptr")
    unaligned_loads = any(name in args and int(args[name]) % ALIGN_ELEMS != 0 for name in ("STRIDE_WK", "N_LOAD"))
    # Pre-Hopper (mma.sync), an output row of unaligned N (fc8: 1000) is stored element by element from
    # the accumulator fragments, and the large tiles spill at sm_80 (benchmarks/compile_check.py); the
    # budget of the scalar-load rule keeps exactly the tiles that do not.  Hopper's wgmma path does not
    # spill there, except in the fused split-K kernel: its full tiles spilled 100-400 bytes on sm_90 for
    # fc8 at batch 256 and 2048, and the same budget keeps the clean ones. The rule follows SPLIT_K, not
    # the kernel, so both split-K reduces run one config and give the same bits.
    x = args["x_ptr"]
    unaligned_store = (
        "N" in args
        and int(args["N"]) % ALIGN_ELEMS != 0
        and x.is_cuda
        and (split_k > 1 or _device_capability(_device_index(x)) < HOPPER_CAPABILITY)
    )
    if unaligned_loads or unaligned_store:
        configs = prune_by_registers(configs, GATHER_B_REG_BUDGET, 0.0, 1.0)
    return _tuned(_prune_fma(configs, args))


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


# Streaming multiprocessors assumed under the interpreter (an H100/H200 has 132), so split-K heuristics
# behave there as they would on the target GPU and their code path gets exercised on the CPU.
_NOMINAL_SM_COUNT = 132


def sm_count(device: torch.device) -> int:
    """Number of SMs of ``device`` (a nominal Hopper count on the CPU interpreter)."""
    if device.type != "cuda":
        return _NOMINAL_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
