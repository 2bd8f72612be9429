"""linear / pack_linear_weight against torch.nn.functional.linear (fp32).

Inputs are rounded to the tested dtype first; the reference is fp32 math on the same rounded values.
CaffeNet and torchvision AlexNet share the fc shapes (9216 -> 4096 -> 4096 -> 1000), so the real-size
cases cover both nets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import fast_first

from fastfeat.kernels import autotune, linear, pack_linear_weight
from fastfeat.kernels.autotune import FMA_REG_BUDGET, GATHER_B_REG_BUDGET, _tile_regs, gemm_configs, prune_gemm
from fastfeat.kernels.gemm import SPLIT_K_GRANULE, WEIGHT_ROW_ALIGN

# Relative error ||out - ref|| / ||ref|| allowed, keyed by OUTPUT dtype. fp32: exact products, fp32
# accumulation in another order (K up to 9216, measured <= ~1e-6). fp16 / bf16: the final rounding of
# each output dominates (rms ~2.8e-4 / ~2.3e-3). A lost K slab or split is a >= 1e-2 error.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 6e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# pool5 of both nets: 256 channels of 6x6; fc6 was trained on its NCHW (C, H, W) flatten.
POOL5_CHW = (256, 6, 6)


def _inputs(m, k, n, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = 0.1 * torch.randn(n, generator=gen)
    return x.to(dtype).to(device), w.to(dtype).to(device), b.to(device)


def _reference(x, w, b, relu):
    y = F.linear(x.float(), w.float(), b)
    return F.relu(y) if relu else y


def _check(x, packed, w, b, relu, out_dtype, device, nan_like, assert_close, split_k=None):
    out = nan_like((x.shape[0], w.shape[0]), out_dtype, device)
    y = linear(x, packed, b, relu, out_dtype, out=out, split_k=split_k)
    assert y is out
    assert not torch.isnan(y).any(), "some outputs were never written"
    assert_close(y, _reference(x, w, b, relu), TOLERANCES[out_dtype])


@pytest.mark.slow
def test_fc6_real_size_nhwc_flatten(device, nan_like, assert_close):
    """fc6 at full size, M=2, fed the NHWC flatten of pool5 through the permuted packing."""
    c, h, w_ = POOL5_CHW
    gen = torch.Generator().manual_seed(6)
    pool5_nchw = torch.randn(2, c, h, w_, generator=gen).to(torch.float16).to(device)
    weight = (torch.randn(4096, c * h * w_, generator=gen) / (c * h * w_) ** 0.5).to(torch.float16).to(device)
    bias = (0.1 * torch.randn(4096, generator=gen)).to(device)
    packed = pack_linear_weight(weight, input_chw=POOL5_CHW)
    x_nhwc_flat = pool5_nchw.permute(0, 2, 3, 1).reshape(2, -1).contiguous()
    out = nan_like((2, 4096), torch.float16, device)
    y = linear(x_nhwc_flat, packed, bias, True, out=out)
    assert not torch.isnan(y).any()
    ref = F.relu(F.linear(pool5_nchw.float().flatten(1), weight.float(), bias))  # torch's NCHW flatten
    assert_close(y, ref, TOLERANCES[torch.float16])


@pytest.mark.parametrize(
    "name, k, n, relu",
    fast_first([("fc8", 4096, 1000, False), ("fc7", 4096, 4096, True)], spread=True),
)
def test_fc_real_sizes(name, k, n, relu, device, nan_like, assert_close):
    x, w, b = _inputs(2, k, n, torch.float16, device)
    _check(x, pack_linear_weight(w), w, b, relu, torch.float16, device, nan_like, assert_close)


def test_fc8_fp32_features_from_bf16(device, nan_like, assert_close):
    x, w, b = _inputs(2, 4096, 1000, torch.bfloat16, device)
    _check(x, pack_linear_weight(w), w, b, False, torch.float32, device, nan_like, assert_close)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m, k, n",
    [
        (1, 70, 50),  # batch 1, nothing a multiple of a block
        (2, 1000, 77),
        (17, 300, 130),  # M just past the 16-row tile
        (33, 600, 65),  # M past the small-M family
        (150, 129, 300),  # large-M family, K tail of one element
    ],
)
@pytest.mark.parametrize("split_k", [1, 3, None], ids=["nosplit", "split3", "auto"])
def test_odd_shapes(m, k, n, split_k, dtype, device, nan_like, assert_close):
    x, w, b = _inputs(m, k, n, dtype, device)
    _check(x, pack_linear_weight(w), w, b, True, dtype, device, nan_like, assert_close, split_k=split_k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_output_without_bias(dtype, device, nan_like, assert_close):
    x, w, _ = _inputs(5, 520, 96, dtype, device)
    out = nan_like((5, 96), torch.float32, device)
    for split_k in (1, 2):
        y = linear(x, pack_linear_weight(w), None, False, torch.float32, out=out, split_k=split_k)
        assert_close(y, F.linear(x.float(), w.float()), TOLERANCES[torch.float32])


def test_split_k_actually_splits(device):
    """Split and unsplit runs agree to fp32 rounding, and the split run takes the workspace path."""
    x, w, b = _inputs(3, 2048, 40, torch.float32, device)
    packed = pack_linear_weight(w)
    one = linear(x, packed, b, split_k=1)
    four = linear(x, packed, b, split_k=4)
    torch.testing.assert_close(four, one, rtol=1e-5, atol=1e-5)


def test_packed_weight_rows_are_padded_to_aligned_strides(device, nan_like, assert_close):
    """fc8's N = 1000 is no multiple of 16: packed rows are padded so every row starts aligned (vector
    loads); an unpadded contiguous [K, N] weight still works, through the scalar-load configs."""
    x, w, b = _inputs(3, 96, 1000, torch.float16, device)
    packed = pack_linear_weight(w)
    assert packed.shape == (96, 1000) and packed.stride() == (1008, 1)
    assert packed.untyped_storage().nbytes() == 96 * 1008 * 2
    assert torch.equal(packed, w.t())
    _check(x, packed, w, b, True, torch.float16, device, nan_like, assert_close)
    _check(x, w.t().contiguous(), w, b, True, torch.float16, device, nan_like, assert_close)
    aligned = pack_linear_weight(w[:992])  # already a multiple of 16: plain contiguous, no copy to pad
    assert aligned.is_contiguous() and aligned.stride() == (992, 1)


def test_relu_applied(device):
    x, w, b = _inputs(4, 64, 32, torch.float32, device)
    packed = pack_linear_weight(w)
    raw = linear(x, packed, b)
    assert (raw < 0).any(), "degenerate test: no negative pre-activations"
    torch.testing.assert_close(linear(x, packed, b, relu=True), raw.clamp_min(0), rtol=0, atol=0)


def test_pack_linear_weight_layout_and_chw_permutation():
    c, h, w_ = 5, 3, 4
    weight = torch.randn(7, c * h * w_)
    packed = pack_linear_weight(weight)
    assert packed.shape == (c * h * w_, 7) and packed.stride() == (WEIGHT_ROW_ALIGN, 1)
    assert torch.equal(packed, weight.t())
    permuted = pack_linear_weight(weight, input_chw=(c, h, w_))
    # Row (h, w, c) of the permuted packing must be column (c, h, w) of the original weight.
    for ci in range(c):
        for hi in range(h):
            for wi in range(w_):
                assert torch.equal(permuted[(hi * w_ + wi) * c + ci], weight[:, (ci * h + hi) * w_ + wi])
    # End to end on the small case: NHWC flatten + permuted weight == NCHW flatten + original weight.
    x = torch.randn(2, c, h, w_)
    torch.testing.assert_close(
        x.permute(0, 2, 3, 1).reshape(2, -1) @ permuted, x.flatten(1) @ weight.t(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, p, b: (x[0], p, b, {}), "rank 2"),
        (lambda x, p, b: (x, p.t().contiguous(), b, {}), "unpacked"),
        (lambda x, p, b: (x.half(), p, b, {}), "dtype"),
        (lambda x, p, b: (x.t().contiguous().t(), p, b, {}), "contiguous"),
        (lambda x, p, b: (x, p.t().contiguous().t(), b, {}), "row-major"),
        (lambda x, p, b: (x, p, b.half(), {}), "bias"),
        (lambda x, p, b: (x, p, b[:3], {}), "bias"),
        (lambda x, p, b: (x, p, b, {"split_k": 0}), "split_k"),
        (lambda x, p, b: (x, p, b, {"out": torch.empty(4, 5, device=x.device)}), "out has shape"),
    ],
)
def test_value_errors(mutate, match, device):
    x = torch.randn(4, 8, device=device)
    packed = pack_linear_weight(torch.randn(6, 8, device=device))
    bias = torch.zeros(6, device=device)
    x, packed, bias, extra = mutate(x, packed, bias)
    with pytest.raises(ValueError, match=match):
        linear(x, packed, bias, **extra)


def test_pack_linear_weight_value_errors():
    with pytest.raises(ValueError, match="2-D"):
        pack_linear_weight(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="input_chw"):
        pack_linear_weight(torch.randn(6, 8), input_chw=(2, 2, 3))


def test_int64_offsets_past_2_31(large_gpu, assert_close):
    """x has 240000*9216 > 2^31 elements: the last rows' offsets overflow int32."""
    x = torch.empty(240_000, 9216, dtype=torch.float16, device=large_gpu).normal_()
    w = (torch.randn(16, 9216, device=large_gpu) / 96).half()
    y = linear(x, pack_linear_weight(w))
    assert_close(y[-1000:], F.linear(x[-1000:].float(), w.float()), TOLERANCES[torch.float16])


class _FakeCudaTensor:
    """What the prune hooks read from a CUDA tensor (bf16), on a machine without one."""

    is_cuda = True
    device = torch.device("cuda", 0)
    dtype = torch.bfloat16

    def element_size(self) -> int:
        return 2


def test_gpu_config_lists(monkeypatch):
    """Small M keeps the thin BLOCK_M tiles, large M the full ones; no K slab straddles a split."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = gemm_configs()
    assert all(SPLIT_K_GRANULE % c.kwargs["BLOCK_K"] == 0 for c in configs)
    x = torch.empty(1, 1)
    small = prune_gemm(configs, {"x_ptr": x, "M_BUCKET": 2})
    large = prune_gemm(configs, {"x_ptr": x, "M_BUCKET": 1024})
    assert small and all(c.kwargs["BLOCK_M"] <= 32 for c in small)
    assert any(c.kwargs["BLOCK_M"] == 16 for c in small)
    assert large and all(c.kwargs["BLOCK_M"] >= 64 for c in large)
    # An aligned row stride changes nothing (fc8 packed: N = 1000, stride 1008); an unpadded fc8 weight
    # (stride 1000) makes the W^T rows unaligned and the B loads scalar.
    for m_bucket, family in ((2, small), (1024, large)):
        assert prune_gemm(configs, {"x_ptr": x, "M_BUCKET": m_bucket, "N": 1000, "STRIDE_WK": 1008}) == family
        unaligned = prune_gemm(configs, {"x_ptr": x, "M_BUCKET": m_bucket, "N": 1000, "STRIDE_WK": 1000})
        assert 0 < len(unaligned) < len(family)
        assert all(_tile_regs(c, 0.0, 1.0) <= GATHER_B_REG_BUDGET for c in unaligned)
        # Exact fp32 products (FMA units, operands in registers) keep the small tiles only.
        # An A100 (sm80, mma.sync) also stores N = 1000 rows element by element: the same small tiles.
        # (Shared memory unlimited here: only the capability differs between the two.)
        monkeypatch.setattr(autotune, "_max_shared_memory", lambda index: 1 << 30)
        monkeypatch.setattr(autotune, "_device_capability", lambda index: 8)
        a100 = prune_gemm(configs, {"x_ptr": _FakeCudaTensor(), "M_BUCKET": m_bucket, "N": 1000, "STRIDE_WK": 1008})
        assert a100 == unaligned
        monkeypatch.setattr(autotune, "_device_capability", lambda index: 9)
        h100 = prune_gemm(configs, {"x_ptr": _FakeCudaTensor(), "M_BUCKET": m_bucket, "N": 1000, "STRIDE_WK": 1008})
        # Hopper also gets its own configs (autotune.HOPPER_ONLY_GEMM*), after every other one.
        assert h100[: len(family)] == family and all(autotune.is_hopper_only(c) for c in h100[len(family) :])
        # ... except split-K launches (the fused reduce spills there), both reduces alike: one config, one result.
        split = {"x_ptr": _FakeCudaTensor(), "M_BUCKET": m_bucket, "N": 1000, "STRIDE_WK": 1008, "SPLIT_K": 2}
        h100_split = prune_gemm(configs, split)
        assert h100_split and all(_tile_regs(c, 0.0, 1.0) <= GATHER_B_REG_BUDGET for c in h100_split)
        assert prune_gemm(configs, {**split, "arrivals_ptr": None}) == h100_split
        assert prune_gemm(configs, {**split, "N": 1024}) != h100_split  # an aligned N: no such rule
        ieee = prune_gemm(configs, {"x_ptr": x, "M_BUCKET": m_bucket, "STRIDE_WK": 4096, "DOT_PRECISION": "ieee"})
        assert ieee and all(_tile_regs(c, 1.0, 1.0) <= FMA_REG_BUDGET for c in ieee)


def test_autotune_off_keeps_one_config(monkeypatch):
    """FASTFEAT_AUTOTUNE=0 (the GPU check's test phase): the first config the rules keep, nothing timed."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = gemm_configs()
    args = {"x_ptr": torch.empty(1, 1), "M_BUCKET": 1024, "STRIDE_WK": 4096}
    tuned = prune_gemm(configs, args)
    monkeypatch.setenv("FASTFEAT_AUTOTUNE", "0")
    assert len(tuned) > 1 and prune_gemm(configs, args) == tuned[:1]


# -- split-K with the reduce folded into the GEMM ---------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, k, n, split_k", [(1, 700, 40, 3), (5, 1100, 33, 5), (17, 520, 130, 2)])
def test_fused_split_k_matches_reference_and_separate_reduce(m, k, n, split_k, dtype, device, nan_like, assert_close):
    """The last-arrival reduce: right against plain PyTorch, and the same bits as the two-launch reduce
    (both sum the partials in split order). Batch 1, M and N not multiples of any tile."""
    from fastfeat.kernels.gemm import arrival_counters

    x, w, b = _inputs(m, k, n, dtype, device, seed=m + k)
    packed = pack_linear_weight(w)
    fused = nan_like((m, n), dtype, device)
    linear(x, packed, b, True, out=fused, split_k=split_k, split_k_reduce="fused")
    assert not torch.isnan(fused).any(), "some outputs were never written (no program saw itself last)"
    assert_close(fused, _reference(x, w, b, True), TOLERANCES[dtype])
    separate = nan_like((m, n), dtype, device)
    linear(x, packed, b, True, out=separate, split_k=split_k, split_k_reduce="separate")
    assert torch.equal(fused, separate)
    # Every tile's last arrival re-zeroed its counter: the shared buffer is ready for the next launch.
    assert not arrival_counters(device, 1).any()


@pytest.mark.parametrize("split_k", [3, 9])
def test_fused_split_k_sums_a_tall_tile_in_row_chunks(split_k, device, nan_like, assert_close, monkeypatch):
    """A tile is summed in row chunks (gemm.REDUCE_ROWS rows; half as many above REDUCE_ROWS_MAX_SPLITS
    splits): 64-row tiles, 37 rows (a short chunk, then empty ones), the same bits as the two-launch reduce."""
    from fastfeat.kernels import gemm

    tall = [autotune._cfg(64, 32, 32, stages=1, warps=4)]
    for kernel in (gemm._linear_splitk_fused_kernel, gemm._linear_kernel):  # the same partials in both paths
        monkeypatch.setattr(kernel, "configs", tall)
    dtype = DTYPES[0]
    x, w, b = _inputs(37, 2300, 45, dtype, device, seed=7)  # 9 splits of 256 (gemm.SPLIT_K_GRANULE)
    packed = pack_linear_weight(w)
    fused = nan_like((37, 45), dtype, device)
    linear(x, packed, b, True, out=fused, split_k=split_k, split_k_reduce="fused")
    assert not torch.isnan(fused).any(), "some rows of a tile were never summed"
    assert_close(fused, _reference(x, w, b, True), TOLERANCES[dtype])
    separate = nan_like((37, 45), dtype, device)
    linear(x, packed, b, True, out=separate, split_k=split_k, split_k_reduce="separate")
    assert torch.equal(fused, separate)


def test_fused_split_k_last_arrival_sums_every_split(device, monkeypatch):
    """Each tile is finished exactly once, by its last arrival, and from all of its splits.

    The interpreter runs programs one after another, so there the last arrival is the last split; a
    counter left non-zero by an earlier launch would make the wrong program finish the tile (or none):
    the poisoned counters below must give a wrong or unwritten result, which proves the test can fail.
    """
    from fastfeat.kernels import gemm

    x, w, b = _inputs(3, 1024, 48, torch.float32, device, seed=3)
    packed = pack_linear_weight(w)
    ref = _reference(x, w, b, False)
    good = linear(x, packed, b, split_k=4)
    torch.testing.assert_close(good, ref, rtol=0, atol=1e-4)
    poisoned = torch.full((64,), 2, dtype=torch.int32, device=device)  # "two splits already arrived"
    monkeypatch.setattr(gemm, "arrival_counters", lambda device, tiles: poisoned)
    bad = torch.full_like(good, float("nan"))
    linear(x, packed, b, out=bad, split_k=4)
    assert torch.isnan(bad).any() or not torch.allclose(bad, ref, atol=1e-3)


def test_split_k_reduce_value_error(device):
    x, w, b = _inputs(2, 64, 16, torch.float32, device)
    with pytest.raises(ValueError, match="split_k_reduce"):
        linear(x, pack_linear_weight(w), b, split_k_reduce="atomic")
