"""maxpool2d_nhwc_rows (row-walking 2-D tiles, carried row max, running LRN window sums) against
torch.nn.functional, with the shapes and tolerances of test_pool_lrn.py (max-pool alone must be exact)."""

from __future__ import annotations

import pytest
import torch
from helpers import fast_first
from test_pool_lrn import CAFFENET_LRN, DTYPES, TOLERANCES, _ref_pool, _x

from fastfeat.kernels import LRNParams, pool_output_size
from fastfeat.kernels.pool_rows import POOL_ROWS, fitted_block_c, maxpool2d_nhwc_rows


def _run(shape, dtype, device, nan_like, *, k=3, s=2, p=0, ceil_mode=True, relu=False, lrn=None, lrn_halo=True):
    x = _x(shape, dtype, device)
    n, h, w, c = shape
    (kh, kw), (sh, sw), (ph, pw) = (v if isinstance(v, tuple) else (v, v) for v in (k, s, p))
    oh, ow = pool_output_size(h, kh, sh, ph, ceil_mode), pool_output_size(w, kw, sw, pw, ceil_mode)
    out = nan_like((n, oh, ow, c), dtype, device)
    y = maxpool2d_nhwc_rows(
        x, kernel_size=k, stride=s, padding=p, ceil_mode=ceil_mode, relu=relu, lrn=lrn, out=out, lrn_halo=lrn_halo
    )
    assert y is out
    assert not torch.isnan(y).any(), "some outputs were never written"
    return y, _ref_pool(x, k, s, p, ceil_mode, relu, lrn)


# A max is exact in every dtype: fp32 in the fast loop, the 16-bit types in the full suite.
@pytest.mark.parametrize("dtype", fast_first(DTYPES), ids=str)
@pytest.mark.parametrize(
    "shape, k, s, p, ceil_mode",
    [
        ((1, 8, 8, 5), 3, 2, 0, True),  # batch 1, ceil-mode clipped last window, C below any block
        pytest.param(
            (3, 27, 27, 96), 3, 2, 0, True, marks=pytest.mark.slow
        ),  # CaffeNet pool2's geometry, 96 channels = 3 blocks of 32
        ((2, 5, 7, 70), 3, 2, 1, True),  # padding; 70 channels: no power of two >= 16 divides it
        ((1, 9, 6, 130), 2, 2, 0, False),  # no shared rows (KH == stride): the non-carrying loop
        ((3, 7, 7, 3), (3, 2), (1, 2), (1, 0), True),  # KH - stride = 2: the non-carrying loop
        ((2, 2 * POOL_ROWS + 3, 5, 24), 3, 2, 0, False),  # several row strips, the last one partial
    ],
)
def test_pool_rows_exact(shape, k, s, p, ceil_mode, dtype, device, nan_like):
    for relu in (False, True):
        y, ref = _run(shape, dtype, device, nan_like, k=k, s=s, p=p, ceil_mode=ceil_mode, relu=relu)
        assert torch.equal(y.float().cpu(), ref.cpu()), f"max-pool must be exact (relu={relu})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, lrn",
    [
        ((2, 13, 13, 96), CAFFENET_LRN),  # norm1's channel count
        ((1, 7, 9, 37), LRNParams(3, 2e-4, 0.5, 2.0)),  # channel tail, other parameters
        ((1, 5, 5, 4), LRNParams(7, 1e-3, 0.75, 1.0)),  # window wider than the channel count
        ((3, 11, 11, 256), CAFFENET_LRN),  # norm2's channel count, batch 3
    ],
)
def test_pool_rows_lrn(shape, lrn, dtype, device, nan_like, assert_close):
    """One block of every channel of a pixel (the layout before the halo; the halo: the test below)."""
    y, ref = _run(shape, dtype, device, nan_like, relu=True, lrn=lrn, lrn_halo=False)
    assert_close(y, ref, TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_rows_lrn_halo_small(dtype, device, nan_like, assert_close):
    """The fast case of the next test: 65 channels = a block of 64 and a 1-channel block, halos between."""
    y, ref = _run((1, 3, 5, 65), dtype, device, nan_like, relu=True, lrn=CAFFENET_LRN)
    assert_close(y, ref, TOLERANCES[dtype])


@pytest.mark.slow  # 3-6 s per case under the interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, k, s, p, ceil_mode, lrn",
    [
        ((1, 9, 9, 96), 3, 2, 0, True, CAFFENET_LRN),  # batch 1; 96 channels: blocks of 32, halos of 2
        ((3, 11, 13, 100), 3, 2, 0, True, CAFFENET_LRN),  # 100 channels: blocks of 64 with a masked tail
        ((2, 7, 5, 3), 3, 2, 1, True, CAFFENET_LRN),  # 3 channels: one block, no halo
        ((1, 2 * POOL_ROWS + 5, 9, 48), 3, 2, 0, False, LRNParams(3, 2e-4, 0.5, 2.0)),  # strips; halo of 1
        ((2, 6, 6, 48), 2, 2, 0, False, LRNParams(7, 1e-3, 0.75, 1.0)),  # non-carrying loop, halo of 4 (3 used)
        ((1, 5, 7, 48), 3, 2, 0, True, LRNParams(41, 1e-3, 0.75, 1.0)),  # window reaching past the next block
    ],
)
def test_pool_rows_lrn_halo(shape, k, s, p, ceil_mode, lrn, dtype, device, nan_like, assert_close):
    """The fitted channel blocks with the LRN halo against F.max_pool2d + F.local_response_norm."""
    y, ref = _run(shape, dtype, device, nan_like, k=k, s=s, p=p, ceil_mode=ceil_mode, relu=True, lrn=lrn)
    assert_close(y, ref, TOLERANCES[dtype])
    unnormalised = _ref_pool(_x(shape, dtype, device), k, s, p, ceil_mode, True, None)
    assert (unnormalised - ref).norm() > 0.05 * ref.norm(), "degenerate test: LRN barely changes the output"


def test_fitted_block_c():
    assert fitted_block_c(96, False) == 32  # not 128, not 64 with a half-empty second block
    assert fitted_block_c(256, False) == 64 and fitted_block_c(384, False) == 64 and fitted_block_c(192, False) == 64
    assert fitted_block_c(70, False) == 64 and fitted_block_c(5, False) == 8
    assert fitted_block_c(96, True) == 32  # the fused LRN with a channel halo: fitted as without it
    assert fitted_block_c(96, True, lrn_halo=False) == 128  # one block of every channel of a pixel
