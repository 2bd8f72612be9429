"""A user's mistake or fastfeat's bug: FastfeatError is one line and exit code 2, anything else (even a
ValueError from numpy or pyarrow) is a traceback, a line saying it is a bug, and exit code 1."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastfeat import caffemodel, data, errors, means, plot, probe, storage, weights
from fastfeat.cli import main
from fastfeat.output import layout
from fastfeat.sinks import REGISTRY, format_names, register_sink
from fastfeat.sinks.base import ShardFileError
from fastfeat.sinks.parquet import ParquetSink
from fastfeat.sources import items

BROKEN = "broken-for-test"


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("one")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "a.jpg")
    return str(root)


@pytest.fixture
def broken_sink():
    """An output format whose writer fails as a bug in fastfeat would: numpy's ValueError on a bad reshape."""

    class BrokenSink(ParquetSink):
        name = BROKEN

        def open(self, paths):
            writer = super().open(paths)
            inner_add = writer.add

            def add(rows):
                np.zeros(3).reshape(2, 2)  # ValueError: cannot reshape array of size 3 into shape (2,2)
                inner_add(rows)

            writer.add = add
            return writer

    register_sink(BrokenSink)  # through the plug-in registry, as a user's own format would be
    try:
        yield BrokenSink
    finally:
        del REGISTRY.classes[BROKEN]


def test_a_sink_registered_from_outside_the_package_is_a_format(broken_sink):
    assert BROKEN in format_names() and format_names()[0] == "parquet"  # the default still first


def test_an_internal_error_prints_its_traceback_and_exits_1(broken_sink, one_image, tmp_path, capsys):
    args = ["extract", one_image, "--out", str(tmp_path / "out"), "--weights", "random:0", "--format", BROKEN]
    code = main([*args, "--no-progress", "--layers", "relu7"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback (most recent call last)" in err and "cannot reshape array of size 3" in err, err
    assert "fastfeat: error:" not in err  # not dressed up as the user's mistake
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastfeat: internal error: this is a bug in fastfeat"), last
    assert "the traceback above" in last and f"--format {BROKEN}" in last  # what to attach to the report


def test_a_user_error_is_still_one_line_and_exit_2(one_image, tmp_path, capsys):
    code = main(["extract", one_image, "--out", str(tmp_path / "out"), "--weights", "random:0", "--layers", "fc9"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [err.strip()] and err.startswith("fastfeat: error: unknown layer 'fc9'"), err
    assert not (tmp_path / "out").exists()


def test_a_plain_value_error_is_not_taken_for_the_users(monkeypatch, capsys):
    def bug(args):
        raise ValueError("zip() argument 2 is shorter than argument 1")  # what zip(strict=True) raises

    monkeypatch.setattr("fastfeat.cli._run_verify", bug)
    assert main(["verify", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "zip() argument 2" in err and "internal error: this is a bug" in err


@pytest.mark.parametrize(
    "cls",
    [
        errors.ConfigError, storage.StorageError, plot.PlotError, means.PreprocessError, layout.OutputError,
        data.DataError, items.SourceError, weights.WeightsError, probe.ProbeError, caffemodel.CaffeModelError,
        ShardFileError,
    ],
)  # fmt: skip
def test_every_user_error_class_is_a_fastfeat_error(cls):
    assert issubclass(cls, errors.FastfeatError)
    assert issubclass(cls, ValueError)  # Python API callers that catch ValueError keep working


def test_user_facing_value_errors_became_fastfeat_errors():
    from fastfeat.launch import worker_env
    from fastfeat.models import get_model, parse_layers
    from fastfeat.profile import parse_batch_sizes, parse_count

    for call in (
        lambda: get_model("nope"),
        lambda: parse_layers(get_model("caffenet"), ""),
        lambda: parse_batch_sizes("1,x"),
        lambda: parse_count("three", "--repeat", 1),
        lambda: worker_env(5, {"CUDA_VISIBLE_DEVICES": "0"}),
    ):
        with pytest.raises(errors.FastfeatError):
            call()


# Exceptions that are not the user's to fix, each with its handling: a sample's decode failure becomes an
# error record; a Ray run that cannot go on and an HTTP answer are reported by their own code paths.
NOT_USER_ERRORS = {"SampleError", "RayRunError", "ApiError"}


def test_no_error_class_escapes_the_user_or_bug_split():
    """Every ``class *Error`` defined in fastfeat is a FastfeatError (one line, exit 2) or is named above:
    a new module's error class cannot fall into the "bug" branch by accident (as RetrievalError once did)."""
    import ast
    import importlib
    import pathlib

    root = pathlib.Path(errors.__file__).parent
    missed = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name not in NOT_USER_ERRORS:
                name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
                cls = getattr(importlib.import_module(name), node.name)
                if not issubclass(cls, errors.FastfeatError):
                    missed.append(f"{name}.{node.name}")
    assert not missed, f"error classes outside FastfeatError: {missed}"
