"""Batch-independence: an image's features are bit-identical alone and among other images.

Every kernel computes an output row from its own image only, sums in an order fixed by the layer's
shape and the config (never by timing: the split-K partials are summed in split order by whichever
program arrives last), so image X must give the same bits at batch 1 and at position 0 or 2 of a batch
of 3. Under the interpreter every launch runs the one interpreter config; on a GPU the autotuned config
is keyed on the batch bucket, so there the check holds per bucket (batch 1 and 3 share one).

Interpreter caveat: its ``tl.dot`` is ``np.matmul``, whose BLAS kernels sum an element in an order that
depends on where the element sits in the tile (edge rows and columns take other code paths), so under the
interpreter x's fp32 bits would move with its position in the batch for reasons no GPU has (an MMA sums
every output element of a tile in the same k order). ``position_invariant_dot`` therefore replaces the
interpreter's dot, for this module only, by a k-ordered sum of outer products: the same fp32 math with
every element accumulated in k order wherever it sits, which is what the kernels rely on. On a GPU the
fixture does nothing and the real MMAs are checked. (The fixture lives in tests/kernels/conftest.py:
test_conv_splitk.py uses it too.)
"""

from __future__ import annotations

import pytest
import torch

from fastfeat.kernels import (
    LRNParams,
    conv2d_nhwc,
    linear,
    maxpool2d_nhwc,
    pack_conv_weight,
    pack_linear_weight,
)
from fastfeat.kernels.conv_s2d import conv2d_nhwc_s2d, pack_conv_weight_s2d

DTYPES = [torch.float32, torch.bfloat16]


# Every test here runs with the k-ordered interpreter dot (tests/kernels/conftest.py; see above).
pytestmark = pytest.mark.usefixtures("position_invariant_dot")


def _batches(shape, dtype, device, seed=0):
    """(x alone [1, ...], a batch of 3 with x at position 0, a batch of 3 with x at position 2)."""
    gen = torch.Generator().manual_seed(seed)
    x, a, b = (torch.randn(1, *shape, generator=gen).to(dtype).to(device) for _ in range(3))
    return x, torch.cat([x, a, b]), torch.cat([a, b, x])


def _assert_batch_independent(op, shape, dtype, device):
    x, first, last = _batches(shape, dtype, device)
    alone = op(x)
    assert torch.equal(alone[0], op(first)[0]), "x's output changed with batch-mates after it"
    assert torch.equal(alone[0], op(last)[2]), "x's output changed with batch-mates before it"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_tap_loop(dtype, device):
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(40, 24, 3, 3, generator=gen) / 15).to(dtype).to(device)
    packed, bias = pack_conv_weight(w, groups=2), torch.randn(40, generator=gen).to(device)
    op = lambda x: conv2d_nhwc(x, packed, bias, kernel_size=3, padding=1, groups=2, relu=True)
    _assert_batch_independent(op, (7, 9, 48), dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv1_flattened_and_space_to_depth(dtype, device):
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(20, 3, 11, 11, generator=gen) / 19).to(dtype).to(device)
    bias = torch.randn(20, generator=gen).to(device)
    flat, s2d = pack_conv_weight(w), pack_conv_weight_s2d(w, stride=4)
    _assert_batch_independent(
        lambda x: conv2d_nhwc(x, flat, bias, kernel_size=11, stride=4), (27, 27, 3), dtype, device
    )
    op = lambda x: conv2d_nhwc_s2d(x, s2d, bias, kernel_size=11, stride=4)
    _assert_batch_independent(op, (27, 27, 3), dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_lrn(dtype, device):
    op = lambda x: maxpool2d_nhwc(x, kernel_size=3, stride=2, relu=True, lrn=LRNParams())
    _assert_batch_independent(op, (9, 9, 96), dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [None, 1, 3], ids=["auto", "nosplit", "split3"])
def test_linear_fused_split_k(split_k, dtype, device):
    """fc at small batch: the automatic split count is the same for 1 and 3 rows (both one thin tile)."""
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(72, 1536, generator=gen) / 40).to(dtype).to(device)
    packed, bias = pack_linear_weight(w), torch.randn(72, generator=gen).to(device)
    op = lambda x: linear(x, packed, bias, relu=True, split_k=split_k)
    _assert_batch_independent(op, (1536,), dtype, device)
