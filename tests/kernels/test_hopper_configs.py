"""The autotune config lists per GPU generation: Hopper-only configs (8-warp GEMM tiles, deeper conv
pipelines) reach only compute capability 9.x, sm_80 keeps the configs it had, no conv config has more
than 4 warps (pytorch#173068), and the first kept config (``FASTFEAT_AUTOTUNE=0``, the AOT library's
choice) is the same with or without the Hopper-only ones. Pure Python: nothing is compiled or launched."""

from __future__ import annotations

import pytest
import torch

from fastfeat.kernels import autotune
from fastfeat.kernels.autotune import (
    CONV_MAX_WARPS,
    HOPPER_ONLY_CONV,
    HOPPER_ONLY_GEMM,
    HOPPER_ONLY_GEMM_SMALL_M,
    conv_config_table,
    gemm_config_table,
    is_hopper_only,
    keep_for_capability,
    prune_conv,
    prune_gemm,
)

# (compute capability, opt-in shared memory per block): A100, H100/H200.
DEVICES = {"sm80": (8, 163 * 1024), "sm90": (9, 227 * 1024)}

# Conv launches of CaffeNet/AlexNet as the launcher passes them (bf16): the flattened loop (conv1), the
# tap loop (conv2 grouped, conv3), and conv1 as a space-to-depth 3x3 tap loop over 48 channels.
CONV_LAUNCHES = {
    "conv1_flattened": dict(CIN_G=3, KH=11, KW=11, TAP_LOOP=False),
    "conv2_tap": dict(CIN_G=48, KH=5, KW=5, TAP_LOOP=True),
    "conv3_tap": dict(CIN_G=256, KH=3, KW=3, TAP_LOOP=True),
    "conv1_s2d_tap": dict(CIN_G=48, KH=3, KW=3, TAP_LOOP=True),
}
# GEMM launches: fc6 at batch 1 (small-M family) and at batch 256 (full tiles); fc8's padded weight.
GEMM_LAUNCHES = {
    "fc6_b1": dict(M_BUCKET=1, N=4096, K=9216, STRIDE_WK=4096, N_LOAD=4096),
    "fc6_b256": dict(M_BUCKET=256, N=4096, K=9216, STRIDE_WK=4096, N_LOAD=4096),
    "fc8_b256": dict(M_BUCKET=256, N=1000, K=4096, STRIDE_WK=1008, N_LOAD=1008),
}


class _FakeCudaTensor:
    """What the prune hooks read from a CUDA tensor (bf16), on a machine without one."""

    is_cuda = True
    device = torch.device("cuda", 0)
    dtype = torch.bfloat16

    def element_size(self) -> int:
        return 2


@pytest.fixture
def on_device(monkeypatch):
    """``on_device(name)``: make the prune hooks see the named GPU; tune over every kept config."""
    monkeypatch.delenv(autotune.AUTOTUNE_ENV, raising=False)

    def use(name: str):
        capability, smem = DEVICES[name]
        monkeypatch.setattr(autotune, "_device_capability", lambda index: capability)
        monkeypatch.setattr(autotune, "_max_shared_memory", lambda index: smem)

    return use


def _sig(c):
    return (tuple(sorted(c.kwargs.items())), c.num_stages, c.num_warps)


def test_tables_hold_the_hopper_only_configs_once():
    """Each Hopper-only config is in its table, and no other config of the tables looks like one (so an
    A100 keeps exactly the rest)."""
    conv, gemm = conv_config_table(), gemm_config_table()
    assert len({_sig(c) for c in conv}) == len(conv) and len({_sig(c) for c in gemm}) == len(gemm)
    assert sum(map(is_hopper_only, conv)) == len(HOPPER_ONLY_CONV)
    assert sum(map(is_hopper_only, gemm)) == len(HOPPER_ONLY_GEMM) + len(HOPPER_ONLY_GEMM_SMALL_M)
    assert len(keep_for_capability(conv, 8)) == len(conv) - len(HOPPER_ONLY_CONV)
    assert keep_for_capability(gemm, 9) == gemm and keep_for_capability(gemm, None) == keep_for_capability(gemm, 8)
    assert keep_for_capability(gemm, 10) == keep_for_capability(gemm, 8)  # Blackwell: not tuned for it here
    # The GEMM's Hopper-only configs include 8-warp tiles in both families.
    assert any(c.num_warps == 8 for c in HOPPER_ONLY_GEMM) and any(c.num_warps == 8 for c in HOPPER_ONLY_GEMM_SMALL_M)


@pytest.mark.parametrize("launch", CONV_LAUNCHES, ids=str)
@pytest.mark.parametrize("device_name", DEVICES, ids=str)
def test_conv_never_gets_8_warps(launch, device_name, on_device):
    """Every conv loop of conv.py is the flattened (counter split by division) form: <= 4 warps on any GPU;
    the Hopper-only (deeper pipeline) configs only on sm_90; the first kept config unchanged."""
    on_device(device_name)
    table = conv_config_table()
    args = {"x_ptr": _FakeCudaTensor(), **CONV_LAUNCHES[launch]}
    kept = prune_conv(table, args, DOT_PRECISION="tf32")
    assert kept and all(c.num_warps <= CONV_MAX_WARPS for c in kept)
    assert all(c.num_warps <= CONV_MAX_WARPS for c in table)
    hopper = [c for c in kept if is_hopper_only(c)]
    if device_name == "sm80":
        assert not hopper
    without = prune_conv([c for c in table if not is_hopper_only(c)], args, DOT_PRECISION="tf32")
    assert _sig(kept[0]) == _sig(without[0]), "the first kept config (FASTFEAT_AUTOTUNE=0, AOT) moved"


def test_conv_hopper_only_configs_reach_sm90(on_device):
    """The tap loop of conv3 on an H100 tunes over the deeper pipelines too."""
    on_device("sm90")
    kept = prune_conv(conv_config_table(), {"x_ptr": _FakeCudaTensor(), **CONV_LAUNCHES["conv3_tap"]})
    assert any(is_hopper_only(c) for c in kept)


@pytest.mark.parametrize("launch", GEMM_LAUNCHES, ids=str)
def test_gemm_8_warp_hopper_configs_only_on_sm90(launch, on_device):
    """sm_80 keeps the configs it had (no Hopper-only one); sm_90 adds 8-warp configs after them; the
    first kept config is the same with or without the additions."""
    table = gemm_config_table()
    args = {"x_ptr": _FakeCudaTensor(), **GEMM_LAUNCHES[launch]}
    kept = {}
    for name in DEVICES:
        on_device(name)
        kept[name] = prune_gemm(table, dict(args), DOT_PRECISION="tf32")
        without = prune_gemm([c for c in table if not is_hopper_only(c)], dict(args), DOT_PRECISION="tf32")
        assert _sig(kept[name][0]) == _sig(without[0]), "the first kept config (FASTFEAT_AUTOTUNE=0, AOT) moved"
    assert not any(is_hopper_only(c) for c in kept["sm80"])
    added = [c for c in kept["sm90"] if is_hopper_only(c)]
    assert added and any(c.num_warps == 8 for c in added)


def test_split_k_launches_keep_no_full_hopper_only_tile(on_device):
    """The full Hopper-only tiles spill in the split-K kernels on sm_90 (compile check): a launch with
    SPLIT_K > 1 keeps none of them; the thin small-M ones stay."""
    on_device("sm90")
    table = gemm_config_table()
    for m_bucket in (1, 256):
        args = {"x_ptr": _FakeCudaTensor(), **GEMM_LAUNCHES["fc6_b256"], "M_BUCKET": m_bucket, "SPLIT_K": 4}
        kept = prune_gemm(table, args, DOT_PRECISION="tf32")
        assert kept and not any(is_hopper_only(c) and c.kwargs["BLOCK_M"] > 32 for c in kept)
