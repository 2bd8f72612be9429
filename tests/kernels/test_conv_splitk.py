"""conv2d_nhwc(k_split=True), the tap-segmented conv of kernels/conv_splitk.py, against F.conv2d, and its
bits: the split launch (one program per tile and segment, last-arrival in-order reduce) and the in-kernel
sum (one program per tile) give the same bits, so a row is the same at batch 1 and inside larger batches.

Small shapes segment only when ``SEGMENT_MIN_K`` is lowered (``segment_small``); one case keeps the real
threshold. The mode follows ``split_pays``, which under the interpreter's nominal 132 SMs always splits
these shapes, so the tests force it either way (``force_split``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastfeat.kernels import conv2d_nhwc, conv_output_size, pack_conv_weight
from fastfeat.kernels import conv_splitk as splitk

# Same tolerances as tests/kernels/test_conv.py (keyed by output dtype).
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 6e-3}
DTYPES = [torch.float32, torch.bfloat16]

# (name, n, h, w, cin, cout, kernel, padding, groups, segment_min_k or None for the real one).
CASES = [
    # The real threshold: K = 9 * 192 = 1728 -> 3 segments of 3 taps. Batch 1, Cout not a multiple of BLOCK_N.
    ("b1_k1728_real", 1, 5, 5, 192, 40, 3, 1, 1, None),
    # Uneven segments (25 taps -> 9, 9, 7), Cin/g = 20 (masked channel slab), groups, batch 3.
    ("b3_5x5_g2_cin20", 3, 6, 7, 40, 22, 5, 2, 2, 128),
    # Non-square image, no padding, Cin = 17 (not a multiple of any BLOCK_K), Cout = 9.
    ("b2_cin17_cout9", 2, 7, 6, 17, 9, 3, 0, 1, 32),
]


def _inputs(n, h, w, cin, cout, k, g, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, cin, generator=gen)
    weight = torch.randn(cout, cin // g, k, k, generator=gen) / (cin // g * k * k) ** 0.5
    bias = 0.1 * torch.randn(cout, generator=gen)
    return x.to(dtype).to(device), weight.to(dtype).to(device), bias.to(device)


def _reference(x, weight, bias, pad, groups):
    y = F.conv2d(x.float().permute(0, 3, 1, 2), weight.float(), bias, padding=pad, groups=groups)
    return y.permute(0, 2, 3, 1)


@pytest.fixture
def segment_small(monkeypatch):
    def lower(min_k):
        if min_k is not None:
            monkeypatch.setattr(splitk, "SEGMENT_MIN_K", min_k)

    return lower


@pytest.fixture
def force_split(monkeypatch):
    """force_split(True / False / callable(m_gemm) -> bool): the launch mode, whatever the tile count."""

    def force(split):
        rule = split if callable(split) else (lambda m_gemm: split)
        monkeypatch.setattr(splitk, "split_pays", lambda m_gemm, cout_g, groups, sms: rule(m_gemm))

    return force


def _conv(x, packed, bias, k, pad, g, out=None):
    return conv2d_nhwc(x, packed, bias, kernel_size=k, padding=pad, groups=g, relu=False, out=out, k_split=True)


def _segments(h, w, cin, cout, k, pad, g):
    oh, ow = conv_output_size(h, k, 1, pad), conv_output_size(w, k, 1, pad)
    return splitk.conv_k_segments(oh * ow, cin // g, cout // g, g, k * k, True, 132)[0]


def test_segments_from_the_per_image_shape():
    """The CaffeNet/AlexNet 13x13 convs segment, a layer whose one image fills the GPU and conv1 do not;
    the segments cover every tap once. Nothing here can see the batch: the function has no batch input."""
    assert splitk.conv_k_segments(13 * 13, 256, 384, 1, 9, True, 132) == (3, 3)  # CaffeNet conv3
    assert splitk.conv_k_segments(13 * 13, 192, 192, 2, 9, True, 132) == (3, 3)  # conv4 (groups 2)
    assert splitk.conv_k_segments(27 * 27, 48, 128, 2, 25, True, 132) == (2, 13)  # conv2: K = 1200
    assert splitk.conv_k_segments(224 * 224, 64, 64, 1, 9, True, 132) == (1, 9)  # VGG conv1_2: 392 tiles
    assert splitk.conv_k_segments(55 * 55, 3, 96, 1, 121, False, 132) == (1, 121)  # flattened loop
    for taps in range(2, 30):
        segments, per = splitk.conv_k_segments(9, 512, 64, 1, taps, True, 132)
        assert (segments - 1) * per < taps <= segments * per


@pytest.mark.parametrize("split", [True, False], ids=["split", "in_kernel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_matches_reference(case, dtype, split, device, nan_like, assert_close, segment_small, force_split):
    _, n, h, w, cin, cout, k, pad, g, min_k = case
    segment_small(min_k)
    force_split(split)
    assert _segments(h, w, cin, cout, k, pad, g) > 1, "degenerate case: the layer does not segment"
    x, weight, bias = _inputs(n, h, w, cin, cout, k, g, dtype, device)
    packed = pack_conv_weight(weight, g)
    out = nan_like((n, conv_output_size(h, k, 1, pad), conv_output_size(w, k, 1, pad), cout), dtype, device)
    y = _conv(x, packed, bias, k, pad, g, out=out)
    assert y is out and not torch.isnan(y).any(), "some outputs were never written"
    assert_close(y, _reference(x, weight, bias, pad, g), TOLERANCES[dtype])
    if split:  # every tile's last arrival re-zeroed its counter: the shared buffer is ready for reuse
        assert not splitk.arrival_counters(device, 1).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_and_in_kernel_sums_are_bit_identical(dtype, device, segment_small, force_split):
    _, n, h, w, cin, cout, k, pad, g, min_k = CASES[1]
    segment_small(min_k)
    x, weight, bias = _inputs(n, h, w, cin, cout, k, g, dtype, device, seed=1)
    packed = pack_conv_weight(weight, g)
    force_split(True)
    split = _conv(x, packed, bias, k, pad, g)
    force_split(False)
    assert torch.equal(split, _conv(x, packed, bias, k, pad, g))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_bits_independent_of_batch(dtype, device, position_invariant_dot, segment_small, force_split):
    """Image X alone (batch 1: split) equals X at row 0 of a batch of 5 and row 11 of a batch of 16 (both
    summed in one program per tile, as a batch large enough to fill the GPU would be)."""
    _, _, h, w, cin, cout, k, pad, g, min_k = CASES[2]
    segment_small(min_k)
    pixels = conv_output_size(h, k, 1, pad) * conv_output_size(w, k, 1, pad)
    force_split(lambda m_gemm: m_gemm <= pixels)
    x, weight, bias = _inputs(16, h, w, cin, cout, k, g, dtype, device, seed=2)
    packed = pack_conv_weight(weight, g)
    alone = _conv(x[11:12], packed, bias, k, pad, g)[0]
    in_five = _conv(torch.cat([x[11:12], x[:4]]), packed, bias, k, pad, g)[0]
    in_sixteen = _conv(x, packed, bias, k, pad, g)[11]
    assert torch.equal(alone, in_five), "the row changed between batch 1 (split) and batch 5 (in-kernel)"
    assert torch.equal(alone, in_sixteen), "the row changed between batch 1 (split) and batch 16 (in-kernel)"


def test_tiles_are_finished_by_the_counted_last_arrival(device, monkeypatch, segment_small, force_split):
    """The split mode writes a tile only from the program that counts itself last: with counters that an
    earlier launch left non-zero (poisoned past any segment count) no program does, and the output keeps
    its NaN poison. (Deterministic on a GPU too, where programs run concurrently.)"""
    _, n, h, w, cin, cout, k, pad, g, min_k = CASES[2]
    segment_small(min_k)
    force_split(True)
    x, weight, bias = _inputs(n, h, w, cin, cout, k, g, torch.float32, device, seed=3)
    packed = pack_conv_weight(weight, g)
    ref = _reference(x, weight, bias, pad, g)
    torch.testing.assert_close(_conv(x, packed, bias, k, pad, g), ref, rtol=0, atol=1e-4)
    poisoned = torch.full((64,), 100, dtype=torch.int32, device=device)
    monkeypatch.setattr(splitk, "arrival_counters", lambda device, tiles: poisoned)
    bad = _conv(x, packed, bias, k, pad, g, out=torch.full_like(ref, float("nan")))
    assert torch.isnan(bad).all()


def test_layer_that_does_not_segment_runs_the_plain_kernel(device):
    """k_split on a conv too short to segment (K = 9 * 17) is the plain kernel: the same bits."""
    x, weight, bias = _inputs(2, 7, 6, 17, 9, 3, 1, torch.float32, device, seed=4)
    packed = pack_conv_weight(weight)
    assert _segments(7, 6, 17, 9, 3, 0, 1) == 1
    plain = conv2d_nhwc(x, packed, bias, kernel_size=3)
    assert torch.equal(_conv(x, packed, bias, 3, 0, 1), plain)
