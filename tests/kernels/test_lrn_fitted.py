"""lrn_nhwc_fitted (channel blocks fitted to C, LRN window halo) against F.local_response_norm, with the
tolerances of test_pool_lrn.py; and the block arithmetic it shares with the row-walking pool."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_pool_lrn import CAFFENET_LRN, DTYPES, TOLERANCES, _nchw, _nhwc, _x

from fastfeat.kernels import LRNParams
from fastfeat.kernels.lrn import fitted_channel_block, lrn_halo_width, lrn_needs_halo, lrn_nhwc_fitted


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, lrn",
    [
        ((1, 5, 7, 96), CAFFENET_LRN),  # batch 1, norm1's channels: three blocks of 32
        ((3, 3, 5, 100), CAFFENET_LRN),  # batch 3, 100 channels: blocks of 64, masked tail
        ((2, 3, 3, 3), LRNParams(5, 1e-2, 0.75, 1.0)),  # 3 channels: one block, no halo
        ((1, 3, 3, 384), LRNParams(3, 2e-4, 0.5, 2.0)),  # 384 channels: six blocks of 64, halo of 1
        ((2, 3, 5, 48), LRNParams(41, 1e-3, 0.75, 1.0)),  # window wider than a block: halo of 32
    ],
)
def test_lrn_fitted(shape, lrn, dtype, device, nan_like, assert_close):
    x = _x(shape, dtype, device)
    out = nan_like(shape, dtype, device)
    y = lrn_nhwc_fitted(x, size=lrn.size, alpha=lrn.alpha, beta=lrn.beta, k=lrn.k, out=out)
    assert y is out and not torch.isnan(y).any(), "some outputs were never written"
    ref = _nhwc(F.local_response_norm(_nchw(x), lrn.size, lrn.alpha, lrn.beta, lrn.k))
    assert_close(y, ref, TOLERANCES[dtype])
    assert (x.float() - ref).norm() > 0.05 * ref.norm(), "degenerate test: LRN barely changes the output"


def test_lrn_fitted_fp32_output(device, assert_close):
    x = _x((1, 4, 4, 96), torch.bfloat16, device)
    y = lrn_nhwc_fitted(x, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, _nhwc(F.local_response_norm(_nchw(x), 5, 1e-4, 0.75, 1.0)), TOLERANCES[torch.float32])


def test_lrn_fitted_value_errors(device):
    with pytest.raises(ValueError, match="odd"):
        lrn_nhwc_fitted(torch.randn(1, 2, 2, 4, device=device), size=4)
    with pytest.raises(ValueError, match="rank 4"):
        lrn_nhwc_fitted(torch.randn(2, 2, 4, device=device))


def test_fitted_channel_block():
    assert [fitted_channel_block(c) for c in (96, 256, 384, 64, 192)] == [32, 64, 64, 64, 64]
    assert [fitted_channel_block(c) for c in (100, 70, 3, 1)] == [64, 64, 4, 1]
    assert [lrn_halo_width(n) for n in (1, 3, 5, 7, 41)] == [1, 1, 2, 4, 32]
    assert lrn_needs_halo(96, 32, 5) and not lrn_needs_halo(96, 128, 5) and not lrn_needs_halo(96, 32, 1)
