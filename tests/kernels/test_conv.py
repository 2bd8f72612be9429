"""conv2d_nhwc / pack_conv_weight against torch.nn.functional.conv2d (NCHW, fp32).

Inputs are rounded to the tested dtype first and the reference is computed in fp32 from those same
rounded values, so the error measured is the kernel's own (accumulation order + the one output rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fastfeat.kernels import autotune, conv2d_nhwc, conv_output_size, interpreter_active, pack_conv_weight
from fastfeat.kernels.autotune import (
    FMA_CONV_REG_BUDGET,
    GATHER_A_REG_BUDGET,
    MMA_SYNC_REG_BUDGET,
    _tile_regs,
    conv_configs,
    prune_conv,
)

# Relative error ||out - ref|| / ||ref|| allowed, keyed by OUTPUT dtype. fp32: exact-product fp32
# accumulation in another order (measured ~4e-7). fp16 / bf16: dominated by the final rounding of each
# output (rms 2^-11/sqrt(3) ~ 2.8e-4 and 2^-8/sqrt(3) ~ 2.3e-3). A dropped tap, channel or group is
# a >= 1e-2 error, so all three still catch real bugs.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 6e-3}


@dataclass(frozen=True)
class ConvCase:
    name: str
    n: int
    h: int
    w: int
    cin: int
    cout: int
    k: tuple[int, int]
    s: tuple[int, int]
    p: tuple[int, int]
    g: int

    def __str__(self) -> str:
        return self.name


def _case(name, n, hw, cin, cout, k, s=1, p=0, g=1) -> ConvCase:
    h, w = hw if isinstance(hw, tuple) else (hw, hw)
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    return ConvCase(name, n, h, w, cin, cout, pair(k), pair(s), pair(p), g)


# The real layers. conv1/conv2 run at batch 1 (the interpreter is slow), the 13x13 layers at batch 2.
REAL_LAYERS = [
    _case("caffenet_conv1", 1, 227, 3, 96, 11, s=4),
    _case("caffenet_conv2", 1, 27, 96, 256, 5, p=2, g=2),
    _case("caffenet_conv3", 2, 13, 256, 384, 3, p=1),
    _case("caffenet_conv4", 2, 13, 384, 384, 3, p=1, g=2),
    _case("caffenet_conv5", 2, 13, 384, 256, 3, p=1, g=2),
    _case("alexnet_conv1", 1, 224, 3, 64, 11, s=4, p=2),
    _case("alexnet_conv2", 1, 27, 64, 192, 5, p=2),
    _case("alexnet_conv3", 2, 13, 192, 384, 3, p=1),
    _case("alexnet_conv4", 2, 13, 384, 256, 3, p=1),
    _case("alexnet_conv5", 2, 13, 256, 256, 3, p=1),
]

# Same geometry (kernel, stride, padding, groups, channels) on a small image: cheap enough to run in
# every dtype. CaffeNet conv1 exercises the flattened K loop (K = 363), conv2 the tap loop with groups
# and Cin/g = 48 (a masked channel slab).
SMALL_REAL_GEOMETRY = [
    _case("caffenet_conv1_35px", 2, 35, 3, 96, 11, s=4),
    _case("caffenet_conv2_9px", 2, 9, 96, 256, 5, p=2, g=2),
]

# Tails everywhere: batch 1, non-square images and kernels, Cin/Cout not multiples of any block,
# Cin/g below and above the tap-loop threshold, 1x1, big padding, asymmetric stride.
ODD_SHAPES = [
    _case("b1_cin5_cout7_s2", 1, (9, 11), 5, 7, 3, s=2, p=1),
    _case("cin20_g3_k3x5", 2, (10, 7), 60, 30, (3, 5), p=(1, 2), g=3),
    _case("cin17_cout33_pad3", 1, 6, 17, 33, 3, p=3),
    _case("pointwise_cin70", 3, 5, 70, 40, 1),
    _case("stride_2x3", 1, (12, 13), 24, 24, 3, s=(2, 3), p=1, g=2),
    _case("kernel_eq_image", 2, 5, 8, 10, 5),
]


def _inputs(case: ConvCase, dtype: torch.dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.h, case.w, case.cin, generator=gen)
    fan_in = case.cin // case.g * case.k[0] * case.k[1]
    weight = torch.randn(case.cout, case.cin // case.g, *case.k, generator=gen) / fan_in**0.5
    bias = 0.1 * torch.randn(case.cout, generator=gen)
    return x.to(dtype).to(device), weight.to(dtype).to(device), bias.to(device)


def _reference(case: ConvCase, x, weight, bias, relu: bool):
    y = F.conv2d(x.float().permute(0, 3, 1, 2), weight.float(), bias, stride=case.s, padding=case.p, groups=case.g)
    if relu:
        y = F.relu(y)
    return y.permute(0, 2, 3, 1)


def _run(case: ConvCase, dtype, out_dtype, relu, device, nan_like, assert_close):
    x, weight, bias = _inputs(case, dtype, device)
    packed = pack_conv_weight(weight, case.g)
    oh = conv_output_size(case.h, case.k[0], case.s[0], case.p[0])
    ow = conv_output_size(case.w, case.k[1], case.s[1], case.p[1])
    out = nan_like((case.n, oh, ow, case.cout), out_dtype, device)
    y = conv2d_nhwc(
        x,
        packed,
        bias,
        kernel_size=case.k,
        stride=case.s,
        padding=case.p,
        groups=case.g,
        relu=relu,
        out_dtype=out_dtype,
        out=out,
    )
    assert y is out
    assert not torch.isnan(y).any(), "some outputs were never written"
    ref = _reference(case, x, weight, bias, relu)
    assert_close(y, ref, TOLERANCES[out_dtype])


@pytest.mark.slow  # real sizes; the same geometries on small images run in every dtype in the fast loop
@pytest.mark.parametrize("case", REAL_LAYERS, ids=str)
def test_real_layers_fp16(case, device, nan_like, assert_close):
    _run(case, torch.float16, torch.float16, True, device, nan_like, assert_close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SMALL_REAL_GEOMETRY, ids=str)
def test_real_geometry_all_dtypes(case, dtype, device, nan_like, assert_close):
    _run(case, dtype, dtype, True, device, nan_like, assert_close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ODD_SHAPES, ids=str)
def test_odd_shapes(case, dtype, device, nan_like, assert_close):
    # No ReLU here: the raw conv output keeps the negative half, so a sign or bias bug cannot hide.
    _run(case, dtype, dtype, False, device, nan_like, assert_close)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_output_from_16bit_inputs(dtype, device, nan_like, assert_close):
    # A feature requested in fp32 must not pass through a 16-bit rounding: hold it to the fp32 tolerance.
    _run(SMALL_REAL_GEOMETRY[1], dtype, torch.float32, True, device, nan_like, assert_close)


def test_relu_and_bias_are_applied(device):
    case = ODD_SHAPES[0]
    x, weight, bias = _inputs(case, torch.float32, device)
    packed = pack_conv_weight(weight, case.g)
    kw = dict(kernel_size=case.k, stride=case.s, padding=case.p, groups=case.g)
    raw = conv2d_nhwc(x, packed, None, relu=False, **kw)
    with_bias = conv2d_nhwc(x, packed, bias, relu=False, **kw)
    relu = conv2d_nhwc(x, packed, bias, relu=True, **kw)
    torch.testing.assert_close(with_bias, raw + bias, rtol=1e-5, atol=1e-5)
    assert (with_bias < 0).any(), "degenerate test: no negative pre-activations"
    torch.testing.assert_close(relu, with_bias.clamp_min(0), rtol=0, atol=0)


def test_pack_conv_weight_layout():
    weight = torch.randn(8, 3, 2, 4)  # Cout=8, Cin/g=3, KH=2, KW=4, groups=2
    packed = pack_conv_weight(weight, groups=2)
    assert packed.shape == (2, 4, 2 * 4 * 3) and packed.is_contiguous()
    for co in range(8):
        for kh in range(2):
            for kw in range(4):
                for ci in range(3):
                    k = (kh * 4 + kw) * 3 + ci
                    assert packed[co // 4, co % 4, k] == weight[co, ci, kh, kw]
    assert pack_conv_weight(weight, 1, dtype=torch.float16).dtype == torch.float16


def _valid_args(device):
    x = torch.randn(1, 8, 8, 4, device=device)
    packed = pack_conv_weight(torch.randn(6, 2, 3, 3, device=device), groups=2)
    bias = torch.zeros(6, device=device)
    return x, packed, bias


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, p, b: (x[0], p, b, {}), "rank 4"),
        (lambda x, p, b: (x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), p, b, {}), "contiguous"),
        (lambda x, p, b: (x.half(), p, b, {}), "dtype"),
        (lambda x, p, b: (x.int(), p.int(), b, {}), "dtype"),
        (lambda x, p, b: (x[..., :3].contiguous(), p, b, {"groups": 1}), "groups"),
        (lambda x, p, b: (torch.cat([x, x], -1), p, b, {}), "mismatch"),
        (lambda x, p, b: (x, p, b.half(), {}), "bias"),
        (lambda x, p, b: (x, p, b[:5], {}), "bias"),
        (lambda x, p, b: (x, p, b, {"kernel_size": 5}), "mismatch"),
        (lambda x, p, b: (x, p, b, {"stride": 0}), "geometry"),
        (lambda x, p, b: (x[:, :2, :2].contiguous(), p, b, {"padding": 0}), "too small"),
        (lambda x, p, b: (x, p, b, {"out": torch.empty(1, 8, 8, 5, device=x.device)}), "out has shape"),
        (lambda x, p, b: (x, p, b, {"out_dtype": torch.int32}), "out_dtype"),
    ],
)
def test_value_errors(mutate, match, device):
    x, packed, bias = _valid_args(device)
    x, packed, bias, extra = mutate(x, packed, bias)
    kwargs = dict(kernel_size=3, stride=1, padding=1, groups=2)
    kwargs.update(extra)
    with pytest.raises(ValueError, match=match):
        conv2d_nhwc(x, packed, bias, **kwargs)


def test_pack_conv_weight_value_errors():
    with pytest.raises(ValueError, match="4-D"):
        pack_conv_weight(torch.randn(6, 2, 3))
    with pytest.raises(ValueError, match="divisible"):
        pack_conv_weight(torch.randn(6, 2, 3, 3), groups=4)


def test_int64_offsets_past_2_31(large_gpu, assert_close):
    """x has 9*1024*1024*256 > 2^31 elements: the last image's input and output offsets overflow int32."""
    x = torch.empty(9, 1024, 1024, 256, dtype=torch.float16, device=large_gpu).normal_()
    weight = (torch.randn(16, 256, 3, 3, device=large_gpu) / 48).half()
    bias = torch.randn(16, device=large_gpu)
    y = conv2d_nhwc(x, pack_conv_weight(weight), bias, kernel_size=3, padding=1)
    # Only the last image: its elements sit beyond 2^31 in x.
    ref = F.conv2d(x[-1:].float().permute(0, 3, 1, 2), weight.float(), bias, padding=1).permute(0, 2, 3, 1)
    assert_close(y[-1:], ref, TOLERANCES[torch.float16])


def test_gpu_config_lists(monkeypatch):
    """The GPU config list obeys the conv rules; the interpreter gets exactly one config."""
    if interpreter_active():
        assert len(conv_configs()) == 1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = conv_configs()
    assert len(configs) > 1
    # pytorch#173068: num_warps >= 8 miscompiles the flattened non-1x1 conv K loop.
    assert all(c.num_warps <= 4 for c in configs)
    x = torch.empty(1, 1, 1, 1)
    # Tap loop over Cin/g = 48: no K slab wider than 64 channels survives.
    tap = prune_conv(configs, {"x_ptr": x}, TAP_LOOP=True, CIN_G=48)
    assert tap and all(c.kwargs["BLOCK_K"] <= 64 for c in tap)
    # Flattened loop (conv1): only tiles whose element-wise gathers fit in registers.
    flat = prune_conv(configs, {"x_ptr": x}, TAP_LOOP=False, CIN_G=3, DOT_PRECISION="tf32")
    assert 0 < len(flat) < len(configs)
    assert all(_tile_regs(c, 2.0, 0.0) <= GATHER_A_REG_BUDGET for c in flat)
    # Exact fp32 products run on FMA units with both operands in registers: small tiles only, both loops.
    for tap_loop, cin_g in ((True, 256), (False, 3)):
        ieee = prune_conv(configs, {"x_ptr": x}, TAP_LOOP=tap_loop, CIN_G=cin_g, DOT_PRECISION="ieee")
        assert ieee and all(_tile_regs(c, 1.0, 1.0) <= FMA_CONV_REG_BUDGET for c in ieee)


class _FakeCudaTensor:
    """What the prune hooks read from a CUDA tensor, on a machine without one."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def element_size(self) -> int:
        return self.dtype.itemsize


def test_gpu_prune_per_device(monkeypatch):
    """A100 (sm80, mma.sync) drops the tap-loop tiles whose operand fragments would spill; H100 keeps them."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # The GPU check runs the tests with FASTFEAT_AUTOTUNE=0 (one config per launch): this test is about the
    # full autotune list (it failed there, and passes here with the variable set).
    monkeypatch.delenv("FASTFEAT_AUTOTUNE", raising=False)
    configs = conv_configs()
    args = {"x_ptr": _FakeCudaTensor(torch.bfloat16)}
    kept = {}
    for capability, smem in ((8, 163 * 1024), (9, 227 * 1024)):
        monkeypatch.setattr(autotune, "_device_capability", lambda index, c=capability: c)
        monkeypatch.setattr(autotune, "_max_shared_memory", lambda index, s=smem: s)
        kept[capability] = prune_conv(configs, args, TAP_LOOP=True, CIN_G=256, DOT_PRECISION="tf32")
        assert all(autotune._tile_smem_bytes(c, 2, capability) <= smem for c in kept[capability])
    assert all(_tile_regs(c, 0.5, 0.5) <= MMA_SYNC_REG_BUDGET for c in kept[8])
    assert len(kept[9]) == len(configs) > len(kept[8]) > 0


def test_autotune_key_tells_batches_apart(monkeypatch):
    """conv1 has 3,025 output pixels per image: its M bucket is capped alike at batch 1 and 64, so the
    batch bucket must be in the key, or conv1 would be tuned once, at whichever batch ran first."""
    from fastfeat.kernels.autotune import BATCH_BUCKET_CAP, batch_bucket, m_bucket
    from fastfeat.kernels.conv import _conv2d_nhwc_kernel

    assert m_bucket(1 * 55 * 55) == m_bucket(64 * 55 * 55)
    assert "BATCH_BUCKET" in _conv2d_nhwc_kernel.keys and "M_BUCKET" in _conv2d_nhwc_kernel.keys
    assert len({batch_bucket(b) for b in (1, 64, 256)}) == 3
    assert batch_bucket(1000) == BATCH_BUCKET_CAP == batch_bucket(256)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTFEAT_AUTOTUNE", "0")  # the GPU check's test phase: one config, untimed
    one = prune_conv(conv_configs(), {"x_ptr": torch.empty(1, 1, 1, 1)}, TAP_LOOP=True, CIN_G=256)
    assert len(one) == 1


def test_fp32_references_are_exact():
    """cuDNN computes fp32 convolutions in TF32 by default: the fp32 references above would be ~1e-3 off on
    a GPU and every fp32 test at 1e-5 would fail (tests/kernels/conftest.py turns it off for each test)."""
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
