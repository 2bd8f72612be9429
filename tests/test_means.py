"""``--mean-file`` (fastfeat.means): the accepted shapes, the shape reported as saved, and the refusal of a
mean file with a model that normalises with mean/std (torchvision style)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastfeat.cli import main
from fastfeat.errors import ConfigError
from fastfeat.means import MEAN_SHAPES, PreprocessError, check_mean_file, load_mean
from fastfeat.models import get_model


def _save(tmp_path, array) -> str:
    path = str(tmp_path / "mean.npy")
    np.save(path, np.asarray(array, np.float32))
    return path


def test_accepted_shapes(tmp_path):
    rng = np.random.default_rng(0)
    chw = rng.uniform(90, 130, size=(3, 256, 256)).astype(np.float32)
    from_chw = load_mean(_save(tmp_path, chw), 227, 256)
    from_hwc = load_mean(_save(tmp_path, chw.transpose(1, 2, 0)), 227, 256)
    assert from_chw.shape == (227, 227, 3)
    np.testing.assert_array_equal(from_chw, chw.transpose(1, 2, 0)[14:241, 14:241])  # centre crop, as Caffe's
    np.testing.assert_array_equal(from_hwc, from_chw)
    np.testing.assert_array_equal(load_mean(_save(tmp_path, [104, 117, 123]), 227, 256), [104, 117, 123])
    exact = load_mean(_save(tmp_path, np.ones((227, 227, 3))), 227, 256)  # S == crop is enough
    assert exact.shape == (227, 227, 3)


@pytest.mark.parametrize("shape", [(3, 100, 100), (100, 100, 3), (3, 256, 200), (2, 5), (4,), (256, 256, 4)])
def test_a_refused_shape_is_reported_as_saved(tmp_path, shape):
    with pytest.raises(PreprocessError) as refused:
        load_mean(_save(tmp_path, np.zeros(shape)), 227, 256)
    message = str(refused.value)
    assert f"shape {shape};" in message, message  # (3, 100, 100), not the transposed (100, 100, 3)
    assert f"expected {MEAN_SHAPES} with S >= 227" in message and "\n" not in message


def test_missing_mean_file(tmp_path):
    with pytest.raises(PreprocessError, match="not found"):
        load_mean(str(tmp_path / "nope.npy"), 227, 256)


def test_help_names_the_accepted_shapes(capsys):
    for command in ("extract", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert MEAN_SHAPES in help_text and "Caffe-style models only" in help_text, command


@pytest.mark.parametrize("model", ["alexnet", "vgg16"])
def test_mean_file_with_a_mean_std_model_is_refused(model, tmp_path):
    mean_file = _save(tmp_path, [104, 117, 123])
    with pytest.raises(ConfigError, match=r"--mean-file is a Caffe-style mean .* normalises with a mean and std of its own"):
        check_mean_file(mean_file, get_model(model).preprocess, model)
    check_mean_file(mean_file, get_model("caffenet").preprocess, "caffenet")  # accepted
    check_mean_file(None, get_model(model).preprocess, model)  # no mean file: nothing to refuse


def test_cli_refuses_mean_file_with_alexnet_in_one_line_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "a.jpg")
    mean_file = _save(tmp_path, np.zeros((3, 256, 256)))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fastfeat", "extract", str(src), "--out", str(out), "--model", "alexnet",
         "--weights", "random:0", "--mean-file", mean_file],
        capture_output=True, text=True, timeout=300, env=os.environ,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("fastfeat: error: --mean-file is a Caffe-style mean") and "'alexnet'" in proc.stderr
    assert not out.exists()


def test_serve_config_refuses_mean_file_with_alexnet(tmp_path):
    from fastfeat.serve.config import ServeConfig, check_serve_config

    cfg = ServeConfig(model="alexnet", weights="random:0", mean_file=_save(tmp_path, [104, 117, 123]))
    with pytest.raises(ConfigError, match="--mean-file is a Caffe-style mean"):
        check_serve_config(cfg)


def test_extract_api_refuses_mean_file_with_alexnet_and_writes_nothing(tmp_path):
    import fastfeat

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "a.jpg")
    with pytest.raises(ConfigError, match="--mean-file is a Caffe-style mean"):
        fastfeat.extract(
            str(src), str(tmp_path / "out"), model="alexnet", weights="random:0",
            mean_file=_save(tmp_path, [104, 117, 123]), progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
