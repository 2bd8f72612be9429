"""conv2d_nhwc_s2d (a strided conv as a stride-1 tap-loop conv over a space-to-depth input) against
torch.nn.functional.conv2d, in fp32 from the same rounded inputs (see test_conv.py for the tolerances)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastfeat.kernels import conv_output_size
from fastfeat.kernels.conv_s2d import (
    S2D_ENV,
    conv2d_nhwc_s2d,
    pack_conv_weight_s2d,
    s2d_eligible,
    space_to_depth_nhwc,
    use_space_to_depth,
)

TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 6e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (name, batch, (H, W), Cin, Cout, kernel, stride, padding): conv1's geometry on small images (CaffeNet:
# no padding, a bottom/right row cropped or padded; AlexNet: padding 2), batch 1 and 3, Cout not a
# multiple of any BLOCK_N, a kernel that is a multiple of the stride, an asymmetric stride.
CASES = [
    ("caffenet_conv1_35px", 1, (35, 35), 3, 96, (11, 11), (4, 4), (0, 0)),
    ("alexnet_conv1_32px", 3, (32, 32), 3, 64, (11, 11), (4, 4), (2, 2)),
    ("cout10_nonsquare", 3, (19, 23), 3, 10, (11, 11), (4, 4), (0, 0)),
    ("k4_s2_cin5", 2, (9, 10), 5, 7, (4, 4), (2, 2), (1, 1)),
    ("k5x7_s2x3_cin4", 1, (13, 16), 4, 12, (5, 7), (2, 3), (2, 1)),
]


def _inputs(n, hw, cin, cout, k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *hw, cin, generator=gen)
    w = torch.randn(cout, cin, *k, generator=gen) / (cin * k[0] * k[1]) ** 0.5
    b = 0.1 * torch.randn(cout, generator=gen)
    return x.to(dtype).to(device), w.to(dtype).to(device), b.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_s2d_conv_matches_reference(case, dtype, device, nan_like, assert_close):
    _, n, hw, cin, cout, k, s, p = case
    x, w, b = _inputs(n, hw, cin, cout, k, dtype, device)
    oh, ow = conv_output_size(hw[0], k[0], s[0], p[0]), conv_output_size(hw[1], k[1], s[1], p[1])
    out = nan_like((n, oh, ow, cout), dtype, device)
    y = conv2d_nhwc_s2d(x, pack_conv_weight_s2d(w, stride=s), b, kernel_size=k, stride=s, padding=p, out=out)
    assert y is out
    assert not torch.isnan(y).any(), "some outputs were never written"
    ref = F.conv2d(x.float().permute(0, 3, 1, 2), w.float(), b, stride=s, padding=p).permute(0, 2, 3, 1)
    assert_close(y, ref, TOLERANCES[dtype])


def test_s2d_relu_and_fp32_output(device, nan_like, assert_close):
    x, w, b = _inputs(2, (35, 35), 3, 96, (11, 11), torch.bfloat16, device, seed=1)
    out = nan_like((2, 7, 7, 96), torch.float32, device)
    conv2d_nhwc_s2d(
        x, pack_conv_weight_s2d(w, stride=4), b, kernel_size=11, stride=4, relu=True, out_dtype=torch.float32, out=out
    )
    ref = F.relu(F.conv2d(x.float().permute(0, 3, 1, 2), w.float(), b, stride=4)).permute(0, 2, 3, 1)
    assert_close(out, ref, TOLERANCES[torch.float32])


def test_space_to_depth_layout():
    """Channel (dh * s + dw) * C + c of block (i, j) is input pixel (s*i + dh - pad, s*j + dw - pad)."""
    x = torch.arange(1 * 9 * 9 * 2, dtype=torch.float32).reshape(1, 9, 9, 2)
    xs = space_to_depth_nhwc(x, kernel_size=5, stride=2, padding=1)
    # OH = (9 + 2 - 5) // 2 + 1 = 4; TH = 3 -> 6 blocks per axis, 12 padded rows (1 top, 2 bottom).
    assert xs.shape == (1, 6, 6, 8)
    padded = F.pad(x, (0, 0, 1, 2, 1, 2))
    for i, j, dh, dw, c in [(0, 0, 0, 0, 0), (0, 0, 1, 1, 1), (2, 3, 1, 0, 1), (5, 5, 1, 1, 0)]:
        assert xs[0, i, j, (dh * 2 + dw) * 2 + c] == padded[0, 2 * i + dh, 2 * j + dw, c]


def test_pack_weight_s2d_layout():
    w = torch.randn(4, 3, 11, 11)
    packed = pack_conv_weight_s2d(w, stride=4)
    assert packed.shape == (1, 4, 3 * 3 * 48)
    # Tap (th, tw) = (2, 1), channel (dh, dw, c) = (3, 0, 2): kernel row 4*2+3 = 11 is past the edge (zero);
    # (dh, dw, c) = (2, 3, 1): kernel (10, 7), channel 1.
    tap = (2 * 3 + 1) * 48
    assert packed[0, 1, tap + (3 * 4 + 0) * 3 + 2] == 0
    assert packed[0, 1, tap + (2 * 4 + 3) * 3 + 1] == w[1, 1, 10, 7]


def test_eligibility_and_switch(monkeypatch):
    assert s2d_eligible(3, 1, 11, 4)  # conv1
    assert not s2d_eligible(96, 2, 5, 1)  # conv2: stride 1
    assert not s2d_eligible(3, 1, 3, 2)  # 4 * 3 = 12 channels: still below the tap loop's threshold
    assert not s2d_eligible(3, 3, 11, 4)  # grouped
    monkeypatch.delenv(S2D_ENV, raising=False)
    assert not use_space_to_depth(3, 1, 11, 4)
    monkeypatch.setenv(S2D_ENV, "1")
    assert use_space_to_depth(3, 1, 11, 4)


def test_value_errors(device):
    with pytest.raises(ValueError, match="4-D"):
        pack_conv_weight_s2d(torch.zeros(3, 3, 3), stride=2)
    with pytest.raises(ValueError, match="too small"):
        space_to_depth_nhwc(torch.zeros(1, 5, 5, 3), kernel_size=11, stride=4, padding=0)
