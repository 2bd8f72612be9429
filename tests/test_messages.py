"""What the user reads: weights-file errors, --help texts, profile's skipped backends, the end-of-run summary."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from fastfeat.caveats import RANDOM_WEIGHTS_NOTE
from fastfeat.cli import _layer_names_help, main
from fastfeat.models import MODELS, get_model, parse_layers
from fastfeat.summary import ProgressBar, format_summary, run_summary
from fastfeat.weights import WeightsError, load_weights

# ----------------------------------------------------------------------------------------------
# 1. --weights files that are not state dicts
# ----------------------------------------------------------------------------------------------
UNSAFE_ADVICE = ("weights_only=False", "will likely succeed", "add_safe_globals", "two options", "\x1b")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastfeat", *args], capture_output=True, text=True, timeout=300, env=os.environ
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastfeat: error: cannot read weights ")
    for bad in UNSAFE_ADVICE:
        assert bad not in lines[0]
    assert "save model.state_dict() with torch.save and pass that file" in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("one")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "a.jpg")
    return str(root)


@pytest.mark.slow
def test_cli_whole_pickled_model_is_one_plain_line(tmp_path, one_image):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.AlexNet(num_classes=8)
    model.classifier = torch.nn.Linear(256 * 6 * 6, 8)  # a real torchvision AlexNet object, kept small
    path = tmp_path / "whole.pth"
    torch.save(model, path)  # the whole module, not model.state_dict()
    out = tmp_path / "out"
    line = _one_error_line(_cli("extract", one_image, "--out", str(out), "--model", "alexnet", "--weights", str(path)))
    assert "pickled Python object (torchvision.models.alexnet.AlexNet)" in line
    assert "torch.save(model)" in line and "not a state dict" in line
    assert not out.exists()  # nothing written for a bad argument


@pytest.mark.slow
def test_cli_random_bytes_is_not_a_pytorch_file(tmp_path, one_image):
    path = tmp_path / "garbage.pth"
    rng = random.Random(0)
    path.write_bytes(b"\x13" + bytes(rng.randrange(256) for _ in range(4095)))  # neither a zip nor a pickle
    line = _one_error_line(_cli("extract", one_image, "--out", str(tmp_path / "o"), "--weights", str(path)))
    assert "it is not a PyTorch weights file" in line


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("truncated", "truncated or damaged PyTorch file"),
        ("truncated_legacy", "truncated or damaged PyTorch file (legacy format)"),
        ("empty", "the file is empty"),
        ("plain_pickle", "a Python pickle, not a PyTorch weights file"),
        ("legacy_whole_model", "pickled Python object (torch.nn.modules.container.Sequential)"),
        ("tensor", "expected a state dict, got Tensor"),
    ],
)
def test_bad_weights_files_say_what_they_are(tmp_path, monkeypatch, kind, expected):
    import pickle

    spec = get_model("alexnet")
    path = tmp_path / f"{kind}.pth"
    state = {"a": torch.zeros(100)}
    if kind == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "truncated_legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:-40])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    elif kind == "legacy_whole_model":
        torch.save(torch.nn.Sequential(torch.nn.ReLU()), path, _use_new_zipfile_serialization=False)
    else:
        torch.save(torch.zeros(3), path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with _no_warnings(), pytest.raises(WeightsError) as info:
        load_weights(spec, str(path))
    message = str(info.value)
    assert calls == [True]  # never weights_only=False, whatever the file
    assert "\n" not in message and expected in message, message
    assert "save model.state_dict() with torch.save and pass that file" in message
    for bad in UNSAFE_ADVICE:
        assert bad not in message


class _no_warnings:
    """No warning escapes (torch's "Detected pickle protocol" UserWarning included)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self._caught = self._ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        assert [str(w.message) for w in self._caught] == []


def test_a_state_dict_still_loads(tmp_path):
    spec = get_model("alexnet")
    tensors = load_weights(spec, "random:1").tensors
    path = tmp_path / "sd.pth"
    torch.save(tensors, path)
    loaded = load_weights(spec, str(path)).tensors
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


# ----------------------------------------------------------------------------------------------
# 2. Help texts, layer aliases, a bare `fastfeat`
# ----------------------------------------------------------------------------------------------
def _help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's wrapping undone


def test_extract_help_shows_defaults_layers_and_decaf_aliases(capsys):
    text = _help(capsys, "extract")
    assert re.search(r"--batch-size BATCH_SIZE images per forward pass \(default 64\)", text)
    assert re.search(r"--dtype \{float16,float32\} stored feature type \(default float16\)", text)
    assert "DeCAF6 = relu6, DeCAF7 = relu7 (aliases decaf6, decaf7)" in text
    for name in MODELS:
        assert f"{name}: " in text
    listing = dict(part.split(": ", 1) for part in _layer_names_help().split("; "))
    assert listing["caffenet"] == "conv1-5 relu1-7 pool1,2,5 norm1,2 fc6-8"
    assert listing["alexnet"] == "conv1-5 relu1-7 pool1,2,5 fc6-8"
    assert set(listing) == set(MODELS)


def test_decaf_aliases_for_every_model_with_relu6_relu7():
    for spec in MODELS.values():
        if {"relu6", "relu7"} <= set(spec.layer_names):
            assert parse_layers(spec, "DeCAF7,decaf6") == ["relu6", "relu7"]
            assert parse_layers(spec, ["relu6", "DECAF6"]) == ["relu6"]
    caffenet = get_model("caffenet")
    no_fc = dataclasses.replace(caffenet, layers=caffenet.layers[: caffenet.index("pool5") + 1])
    with pytest.raises(ValueError, match="unknown layer 'decaf6'"):
        parse_layers(no_fc, "decaf6")
    with pytest.raises(ValueError, match="unknown layer 'Relu6'"):
        parse_layers(caffenet, "Relu6")  # only the aliases ignore case


def test_verify_help_says_what_it_checks_and_the_exit_codes(capsys):
    text = _help(capsys, "verify")
    assert "manifest.json" in text and "checksum" in text
    assert "Exit code 0 when everything matches, 1 when a problem was found, 2" in text


def test_bare_fastfeat_prints_the_whole_usage(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: fastfeat")
    assert all(cmd in captured.err for cmd in ("extract", "profile", "verify", "--version"))
    assert "the following arguments are required" not in captured.err


# ----------------------------------------------------------------------------------------------
# 3. profile --backend all tells what it leaves out; torch.compile's CUDA_HOME warning is silenced
# ----------------------------------------------------------------------------------------------
def test_profile_all_tells_which_backends_it_skips(monkeypatch):
    from fastfeat import profile as profile_mod

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lines: list[str] = []
    names = profile_mod.resolve_backends("all", torch.device("cpu"), lines.append)
    assert "triton" not in names and "torch" in names
    skipped = [line for line in lines if line.startswith("profile: skipping triton: ")]
    assert len(skipped) == 1 and "TRITON_INTERPRET=1" in skipped[0]
    assert all(line.startswith("profile: skipping ") for line in lines)
    assert profile_mod.resolve_backends("all", torch.device("cpu")) == names  # log is optional

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(profile_mod, "load_weights", stop)  # right after the backends are resolved
    lines.clear()
    with pytest.raises(Stop):
        profile_mod.profile(backends="all", device="cpu", batch_sizes=(1,), repeat=1, log=lines.append)
    assert skipped[0] in lines


NO_CUDA_PROBE = """
import logging, sys
import fastfeat.backends.compile_backend  # noqa: F401
import torch.utils.cpp_extension  # a CUDA build of torch warns here when no GPU is visible
log = logging.getLogger("torch.utils.cpp_extension")
log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/somewhere")
log.warning("another cpp_extension warning")
logging.getLogger("torch.other").warning("No CUDA runtime is found (from another logger)")
print("done", file=sys.stderr)
"""


@pytest.mark.slow
def test_compile_backend_silences_only_the_no_cuda_runtime_warning(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "CUDA_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", NO_CUDA_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "using CUDA_HOME" not in proc.stderr
    assert "another cpp_extension warning" in proc.stderr
    assert "No CUDA runtime is found (from another logger)" in proc.stderr
    assert proc.stderr.rstrip().endswith("done")


# ----------------------------------------------------------------------------------------------
# 4. The end-of-run summary and the progress bar
# ----------------------------------------------------------------------------------------------
def _stats(errors=0, warnings=0):
    busy = {"read": 0.5, "decode": 2.0, "h2d": 0.1, "forward": 9.2, "d2h": 0.05, "write": 0.3}
    wait = {"read": 8.0, "decode": 6.0, "forward": 0.4, "write": 9.0}
    return SimpleNamespace(rows=1000 - errors, errors=errors, warnings=warnings, wall_s=10.0, busy=busy, wait=wait)


def _ex(tmp_path):
    return SimpleNamespace(
        items=[None] * 1200, shard_index=0, num_shards=1, out=str(tmp_path / "feats"), spec=get_model("caffenet"),
        backend_name="torch", format="parquet", device=torch.device("cpu"), precision="fp32", batch_size=64,
    )  # fmt: skip


OLD_KEYS = {
    "images", "part", "processed", "skipped_already_done", "rows_written", "errors", "wall_s", "images_per_s",
    "stage_busy_s", "thread_wait_s", "complete", "out", "model", "backend", "format", "device", "precision",
    "batch_size", "fastfeat_version", "git_sha",
}  # fmt: skip


def test_run_summary_keeps_every_field_and_adds_startup(tmp_path):
    s = run_summary(_ex(tmp_path), _stats(), 1000, 200, True, "abc", startup_s=4.0)
    assert OLD_KEYS <= set(s)
    assert s["images_per_s"] == 100.0 and s["startup_s"] == 4.0
    assert s["images_per_s_with_startup"] == round(1000 / 14.0, 2)
    old_call = run_summary(_ex(tmp_path), _stats(), 1000, 200, True, "abc")  # startup_s is optional
    assert old_call["startup_s"] is None and old_call["images_per_s_with_startup"] is None


def test_format_summary_is_a_short_readable_block(tmp_path, monkeypatch):
    import fastfeat.summary as summary_module

    monkeypatch.setattr(summary_module, "command_started_at", None)  # a library call (main() in-process sets it)
    s = run_summary(_ex(tmp_path), _stats(), 1000, 0, True, None, startup_s=4.0)
    text = format_summary(s)
    lines = text.splitlines()
    assert 5 <= len(lines) <= 8 and all(len(line) <= 100 for line in lines), text
    for jargon in ("h2d", "d2h", "waiting on queues", "stage busy"):
        assert jargon not in text
    assert re.search(r"^images processed: +1,000$", text, re.M)
    assert re.search(r"^rows written: +1,000$", text, re.M)
    assert re.search(r"^errors: +0$", text, re.M)
    assert re.search(r"^time: +10\.00 s, 100\.0 img/s \(the pipeline: read, decode, forward, write\)$", text, re.M)
    assert re.search(r"^start-up: +4\.00 s before the pipeline \(model load, decoder build\)$", text, re.M)
    assert "wall time" not in text and "first batch" not in text  # a library call: no process figures
    assert re.search(r"^bottleneck: +the forward pass \(busy 92% of the time\)$", text, re.M)
    assert "errors.parquet" not in text
    assert "img/s" not in format_summary(run_summary(_ex(tmp_path), _stats(), 0, 1000, True, None))


def test_summary_timings_add_up_from_the_process_start(tmp_path, monkeypatch):
    """The issue's run said "with start-up: 2.53 s" and "first batch: 5.25 s after the command started"
    in a 6.2 s command: now every figure names what it covers, and none exceeds the wall time counted
    from the process's start (set by the command line: injected here)."""
    import time

    import fastfeat.summary as summary_module

    now = time.time()
    monkeypatch.setattr(summary_module, "command_started_at", now - 20.0)  # imports: 20 - 14 - ~0 s
    stats = _stats()
    stats.first_batch_at = now - 8.0
    s = run_summary(_ex(tmp_path), stats, 1000, 0, True, None, startup_s=4.0)
    whole = s["process_wall_s"]
    assert 20.0 <= whole < 21.0
    assert s["time_to_first_batch_s"] == pytest.approx(12.0, abs=0.01)
    assert s["wall_s"] + s["startup_s"] <= whole and s["time_to_first_batch_s"] <= whole
    text = format_summary(s)
    figures = {
        label: float(m.group(1))
        for label in ("time", "start-up", "first batch", "wall time")
        if (m := re.search(rf"^{label}: +([\d.]+) s", text, re.M))
    }
    assert set(figures) == {"time", "start-up", "first batch", "wall time"}, text
    assert all(v <= figures["wall time"] for v in figures.values())
    assert figures["time"] + figures["start-up"] <= figures["wall time"]
    assert re.search(r"^wall time: +20\.\d\d s, \S+ img/s since the process started \(all of the above\)$", text, re.M)
    assert re.search(r"^first batch: +12\.00 s after the process started \(imports included\)$", text, re.M)
    assert all(len(line) <= 100 for line in text.splitlines()), text


def test_random_weights_are_flagged_in_the_summary(tmp_path):
    ex = _ex(tmp_path)
    assert "warning" not in format_summary(run_summary(ex, _stats(), 1000, 0, True, None))
    ex.weights_id = {"source": "random:0", "sha256": "0" * 64, "random": True}
    text = format_summary(run_summary(ex, _stats(), 1000, 0, True, None))
    assert re.search(rf"^warning: +{re.escape(RANDOM_WEIGHTS_NOTE)}$", text, re.M), text
    assert len(next(line for line in text.splitlines() if line.startswith("warning:"))) <= 120


def test_format_summary_points_to_errors_parquet(tmp_path):
    ex = _ex(tmp_path)
    text = format_summary(run_summary(ex, _stats(errors=3, warnings=1), 1000, 0, True, None))
    where = os.path.join(os.path.abspath(ex.out), "errors.parquet")
    assert f"3 images skipped, 1 image kept with a warning; listed in {where}" in text
    busy = {"read": 0.1, "decode": 7.5, "h2d": 0.0, "forward": 1.0, "d2h": 0.0, "write": 0.2}
    stats = SimpleNamespace(**{**vars(_stats()), "busy": busy})
    assert "bottleneck: the forward pass" not in format_summary(run_summary(ex, stats, 1000, 0, True, None))
    assert "decoding (DALI) (busy 75% of the time)" in format_summary(run_summary(ex, stats, 1000, 0, True, None))


def test_progress_bar_shows_the_running_error_count(capsys):
    bar = ProgressBar(20)
    bar.update(4, 0)
    assert not bar._bar.postfix
    bar.update(4, 1)
    assert bar._bar.postfix == "1 error"
    bar.update(4, 0)
    bar.update(4, 2)
    assert bar.errors == 3 and bar._bar.postfix == "3 errors"
    assert "3 errors" in str(bar._bar)
    bar.close()
    assert "3 errors" in capsys.readouterr().err


def test_compile_filter_is_on_the_cpp_extension_logger():
    import fastfeat.backends.compile_backend  # noqa: F401

    log = logging.getLogger("torch.utils.cpp_extension")
    record = log.makeRecord(log.name, logging.WARNING, __file__, 1, "No CUDA runtime is found, using CUDA_HOME='%s'",
                            ("/usr/local",), None)  # fmt: skip
    assert not log.filter(record)
    other = log.makeRecord(log.name, logging.WARNING, __file__, 1, "something else", (), None)
    assert log.filter(other)
