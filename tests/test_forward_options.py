"""How the forward pass runs, as chosen and recorded: --compile-mode and --cuda-graphs (CPU only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastfeat.arguments import check_compile_mode
from fastfeat.backends import make_backend
from fastfeat.backends.compile_backend import recorded_mode
from fastfeat.errors import ConfigError
from fastfeat.models import get_model
from fastfeat.weights import load_weights

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastfeat", "samples")


def test_compile_mode_is_checked_and_belongs_to_the_compile_backend():
    check_compile_mode("reduce-overhead", "compile")
    check_compile_mode(None, "torch")
    with pytest.raises(ConfigError, match="unknown --compile-mode"):
        check_compile_mode("fast", "compile")
    with pytest.raises(ConfigError, match="applies to --backend compile"):
        check_compile_mode("max-autotune", "triton")
    spec = get_model("caffenet")
    with pytest.raises(ConfigError, match="applies to --backend compile"):
        make_backend("torch", spec, load_weights(spec, "random:0").tensors, torch.device("cpu"), torch.float32,
                     compile_mode="default")  # fmt: skip


def test_recorded_compile_mode():
    assert recorded_mode("compile", "cuda", None) == "max-autotune-no-cudagraphs"  # the default, unchanged
    assert recorded_mode("compile", "cpu", None) == "freezing"
    assert recorded_mode("compile", "cuda", "reduce-overhead") == "reduce-overhead"
    assert recorded_mode("torch", "cuda", None) is None


def test_compile_backend_takes_the_mode():
    from fastfeat.backends.compile_backend import CompileNet

    spec = get_model("caffenet")
    tensors = load_weights(spec, "random:0").tensors
    net = CompileNet(spec, tensors, torch.device("cpu"), torch.float32, compile_mode="max-autotune")
    assert net.mode == "max-autotune" and net._how == {"mode": "max-autotune"}
    default = CompileNet(spec, tensors, torch.device("cpu"), torch.float32)
    assert default.mode is None and default._how == {"options": {"freezing": True}}


def test_run_metadata_records_the_forward_choices(tmp_path):
    from fastfeat.extractor import Extractor

    ex = Extractor(SAMPLES, str(tmp_path / "o"), weights="random:0", device="cpu", progress=False)
    assert ex.metadata["cuda_graphs"] is False and ex.metadata["compile_mode"] is None
    assert ex.output.config["metadata"]["cuda_graphs"] is False  # part of the run config: a resume must match


@pytest.mark.slow  # a CLI subprocess
def test_compile_mode_on_another_backend_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fastfeat", "extract", SAMPLES, "--out", str(tmp_path / "o"), "--weights", "random:0",
         "--compile-mode", "max-autotune"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fastfeat: error: --compile-mode applies to --backend compile, not 'torch'"
    ]
    assert not (tmp_path / "o").exists()
