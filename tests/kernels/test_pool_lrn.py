"""maxpool2d_nhwc (+ReLU, +fused LRN) and lrn_nhwc against torch.nn.functional.

References: F.max_pool2d and F.local_response_norm on NCHW fp32 built from the same rounded inputs.
Inputs are scaled so that the LRN term is far from 1 (a skipped normalisation would fail the check).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import fast_first

from fastfeat.kernels import LRNParams, lrn_nhwc, maxpool2d_nhwc, pool_output_size

# Relative error allowed, keyed by OUTPUT dtype, for anything that includes LRN. fp32: exp2/log2 and
# summation order (measured ~1e-7). fp16 / bf16: the final rounding of each output. Max-pool alone
# (with or without ReLU) only selects and rounds nothing, so it must be EXACT: tolerance 0.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 6e-3}
# Spread of the test activations: Caffe conv outputs are O(10..100); with alpha=1e-4, n=5 this makes
# k + alpha/n * sum(x^2) around 1.2-2, so the normalisation changes outputs by 10-40 %.
ACTIVATION_SCALE = 30.0

CAFFENET_LRN = LRNParams(5, 1e-4, 0.75, 1.0)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _x(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (ACTIVATION_SCALE * torch.randn(*shape, generator=gen)).to(dtype).to(device)


def _nchw(x):
    return x.float().permute(0, 3, 1, 2)


def _nhwc(y):
    return y.permute(0, 2, 3, 1)


def _ref_pool(x, k, s, p, ceil_mode, relu, lrn):
    y = _nchw(x)
    if relu:
        y = F.relu(y)
    y = F.max_pool2d(y, k, s, p, ceil_mode=ceil_mode)
    if lrn is not None:
        y = F.local_response_norm(y, lrn.size, lrn.alpha, lrn.beta, lrn.k)
    return _nhwc(y)


def _run_pool(shape, dtype, device, nan_like, *, k=3, s=2, p=0, ceil_mode=True, relu=False, lrn=None, out_dtype=None):
    x = _x(shape, dtype, device)
    n, h, w, c = shape
    y_dtype = out_dtype or dtype
    (kh, kw), (sh, sw), (ph, pw) = (v if isinstance(v, tuple) else (v, v) for v in (k, s, p))
    oh = pool_output_size(h, kh, sh, ph, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, ceil_mode)
    out = nan_like((n, oh, ow, c), y_dtype, device)
    y = maxpool2d_nhwc(
        x, kernel_size=k, stride=s, padding=p, ceil_mode=ceil_mode, relu=relu, lrn=lrn, out_dtype=out_dtype, out=out
    )
    assert y is out
    assert not torch.isnan(y).any(), "some outputs were never written"
    return x, y, _ref_pool(x, k, s, p, ceil_mode, relu, lrn)


# (name, NHWC input shape, ceil_mode, relu, lrn): the pools of both nets at batch 2.
REAL_POOLS = [
    ("caffenet_pool1_norm1", (2, 55, 55, 96), True, True, CAFFENET_LRN),
    ("caffenet_pool2_norm2", (2, 27, 27, 256), True, True, CAFFENET_LRN),
    ("caffenet_pool5", (2, 13, 13, 256), True, True, None),
    ("alexnet_pool1", (2, 55, 55, 64), False, False, None),
    ("alexnet_pool2", (2, 27, 27, 192), False, False, None),
    ("alexnet_pool5", (2, 13, 13, 256), False, False, None),
]


@pytest.mark.parametrize(
    "name, shape, ceil_mode, relu, lrn", fast_first(REAL_POOLS, keep=2, spread=True), ids=[r[0] for r in REAL_POOLS]
)
def test_real_pools_fp16(name, shape, ceil_mode, relu, lrn, device, nan_like, assert_close):
    x, y, ref = _run_pool(shape, torch.float16, device, nan_like, ceil_mode=ceil_mode, relu=relu, lrn=lrn)
    if lrn is None:
        assert torch.equal(y.float().cpu(), ref.cpu()), "max-pool must be exact"
    else:
        assert_close(y, ref, TOLERANCES[torch.float16])
        unnormalised = _ref_pool(x, 3, 2, 0, ceil_mode, relu, None)
        assert (unnormalised - ref).norm() > 0.05 * ref.norm(), "degenerate test: LRN barely changes the output"


# (name, NHWC input shape, relu): VGG-16's 2x2/stride-2 floor-mode pools at full size, the first and
# last with the preceding ReLU fused (the triton backend's relu1_2+pool1 when conv1_2 is requested).
VGG16_POOLS = [
    ("vgg16_relu1_2_pool1", (1, 224, 224, 64), True),
    ("vgg16_pool3", (2, 56, 56, 256), False),
    ("vgg16_relu5_3_pool5", (2, 14, 14, 512), True),
]


@pytest.mark.parametrize(
    "name, shape, relu", fast_first(VGG16_POOLS[::-1], spread=True), ids=[r[0] for r in VGG16_POOLS[::-1]]
)
def test_vgg16_pools_fp16(name, shape, relu, device, nan_like):
    _, y, ref = _run_pool(shape, torch.float16, device, nan_like, k=2, s=2, ceil_mode=False, relu=relu)
    n, h, w, c = shape
    assert y.shape == (n, h // 2, w // 2, c)
    assert torch.equal(y.float().cpu(), ref.cpu()), "max-pool must be exact"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, k, s, p, ceil_mode",
    [
        ((1, 8, 8, 5), 3, 2, 0, True),  # ceil adds a clipped last window (4 vs 3 outputs)
        ((1, 8, 8, 5), 3, 2, 0, False),
        ((2, 5, 7, 70), 3, 2, 1, True),  # ceil-mode window that would start in the padding is dropped
        ((1, 9, 6, 130), 2, 2, 0, False),  # C > channel tile, with a tail
        ((3, 7, 7, 3), (3, 2), (1, 2), (1, 0), True),
    ],
)
def test_pool_odd_shapes_exact(shape, k, s, p, ceil_mode, dtype, device, nan_like):
    for relu in (False, True):
        _, y, ref = _run_pool(shape, dtype, device, nan_like, k=k, s=s, p=p, ceil_mode=ceil_mode, relu=relu)
        assert torch.equal(y.float().cpu(), ref.cpu()), f"max-pool must be exact (relu={relu})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, lrn",
    [
        ((2, 13, 13, 96), CAFFENET_LRN),  # CaffeNet norm1 channel count on a small image
        ((1, 7, 9, 37), LRNParams(3, 2e-4, 0.5, 2.0)),  # channel tail, other parameters
        ((1, 5, 5, 4), LRNParams(7, 1e-3, 0.75, 1.0)),  # window wider than the channel count
    ],
)
def test_pool_lrn_all_dtypes(shape, lrn, dtype, device, nan_like, assert_close):
    _, y, ref = _run_pool(shape, dtype, device, nan_like, relu=True, lrn=lrn)
    assert_close(y, ref, TOLERANCES[dtype])


def test_pool_lrn_fp32_output_from_fp16(device, nan_like, assert_close):
    _, y, ref = _run_pool((2, 13, 13, 96), torch.float16, device, nan_like, lrn=CAFFENET_LRN, out_dtype=torch.float32)
    assert_close(y, ref, TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, lrn",
    [
        ((2, 27, 27, 256), CAFFENET_LRN),  # CaffeNet norm2 input at batch 2
        ((1, 3, 5, 37), LRNParams(3, 2e-4, 0.5, 2.0)),
        ((2, 2, 3, 1), LRNParams(5, 1e-2, 0.75, 1.0)),  # a single channel (alpha raised to matter)
    ],
)
def test_lrn(shape, lrn, dtype, device, nan_like, assert_close):
    x = _x(shape, dtype, device)
    out = nan_like(shape, dtype, device)
    y = lrn_nhwc(x, size=lrn.size, alpha=lrn.alpha, beta=lrn.beta, k=lrn.k, out=out)
    assert y is out and not torch.isnan(y).any()
    ref = _nhwc(F.local_response_norm(_nchw(x), lrn.size, lrn.alpha, lrn.beta, lrn.k))
    assert_close(y, ref, TOLERANCES[dtype])
    assert (x.float() - ref).norm() > 0.05 * ref.norm(), "degenerate test: LRN barely changes the output"


def test_lrn_fp32_output(device, assert_close):
    x = _x((1, 4, 4, 96), torch.bfloat16, device)
    y = lrn_nhwc(x, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, _nhwc(F.local_response_norm(_nchw(x), 5, 1e-4, 0.75, 1.0)), TOLERANCES[torch.float32])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(4, 4, 8)), "rank 4"),
        (dict(x=torch.randn(1, 8, 4, 4).permute(0, 2, 3, 1)), "contiguous"),
        (dict(lrn=LRNParams(4, 1e-4, 0.75, 1.0)), "odd"),
        (dict(lrn=(5, 1e-4)), "LRNParams"),
        (dict(kernel_size=3, padding=2), "half the kernel"),
        (dict(kernel_size=9, ceil_mode=False), "too small"),
        (dict(out=torch.empty(1, 3, 3, 4)), "out has shape"),  # ceil mode gives 4x4
    ],
)
def test_pool_value_errors(kwargs, match, device):
    args = dict(x=torch.randn(1, 8, 8, 4), kernel_size=3, stride=2)
    args.update(kwargs)
    x = args.pop("x").to(device)
    if "out" in args:
        args["out"] = args["out"].to(device)
    with pytest.raises(ValueError, match=match):
        maxpool2d_nhwc(x, **args)


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (torch.randn(1, 2, 2, 4).double(), {}, "dtype"),
        (torch.randn(1, 2, 2, 4), {"size": 0}, "odd"),
        (torch.randn(1, 2, 2, 4), {"k": 0.0}, "k must be"),
        (torch.randn(1, 1, 1, 4096), {}, "exceeds"),
    ],
)
def test_lrn_value_errors(x, kwargs, match, device):
    with pytest.raises(ValueError, match=match):
        lrn_nhwc(x.to(device), **kwargs)


def test_int64_offsets_past_2_31(large_gpu):
    """x has 9*1024*1024*256 > 2^31 elements: check the last image, whose offsets overflow int32."""
    x = torch.empty(9, 1024, 1024, 256, dtype=torch.float16, device=large_gpu).normal_()
    y = maxpool2d_nhwc(x, ceil_mode=True)
    ref = _nhwc(F.max_pool2d(_nchw(x[-1:]), 3, 2, ceil_mode=True))
    assert torch.equal(y[-1:].float(), ref)
    del y
    z = lrn_nhwc(x)
    ref = _nhwc(F.local_response_norm(_nchw(x[-1:]), 5, 1e-4, 0.75, 1.0))
    assert ((z[-1:].float() - ref).norm() / ref.norm()).item() <= TOLERANCES[torch.float16]
