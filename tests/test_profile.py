"""`fastfeat profile`: per-layer timing, its accounting (MACs, shares), table, JSON, PNG and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import fast_first

from fastfeat.backends import make_backend
from fastfeat.backends.plan import Op
from fastfeat.cli import main
from fastfeat.models import get_model
from fastfeat.profile import format_table, plot_profile, profile, resolve_backends, time_plan
from fastfeat.weights import load_weights

TOTAL_MACS = {"caffenet": 724_406_816, "alexnet": 714_188_480}
BATCH_SIZES = (1, 4)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RESULT_SCHEMA = {
    "model": str,
    "backend": str,
    "device": str,
    "device_name": str,
    "precision": str,
    "batch_size": int,
    "total_ms": float,
    "layers": list,
    "fastfeat_version": str,
    "git_sha": (str, type(None)),
}
LAYER_SCHEMA = {
    "name": str,
    "type": str,
    "covers": list,
    "macs": int,
    "ms_median": float,
    "ms_p20": float,
    "ms_p80": float,
    "percent": float,
}


def schema_errors(results) -> list[str]:
    """Every way ``results`` (parsed JSON) departs from the documented result schema."""
    if not isinstance(results, list) or not results:
        return ["results must be a non-empty list"]
    errors = []
    for i, result in enumerate(results):
        for key, kind in RESULT_SCHEMA.items():
            if key not in result:
                errors.append(f"result {i}: missing {key!r}")
            elif not isinstance(result[key], kind) or isinstance(result[key], bool):
                errors.append(f"result {i}: {key!r} is {type(result[key]).__name__}")
        for j, layer in enumerate(result.get("layers", [])):
            for key, kind in LAYER_SCHEMA.items():
                if key not in layer:
                    errors.append(f"result {i} layer {j}: missing {key!r}")
                elif not isinstance(layer[key], kind) or isinstance(layer[key], bool):
                    errors.append(f"result {i} layer {j}: {key!r} is {type(layer[key]).__name__}")
            if not all(isinstance(name, str) for name in layer.get("covers", [])):
                errors.append(f"result {i} layer {j}: covers must hold layer names")
            if layer.get("type") not in ("conv", "relu", "pool", "norm", "fc"):
                errors.append(f"result {i} layer {j}: unknown type {layer.get('type')!r}")
    return errors


def check_accounting(result: dict) -> None:
    spec = get_model(result["model"])
    batch = result["batch_size"]
    covered = [name for layer in result["layers"] for name in layer["covers"]]
    assert covered == spec.layer_names  # every layer exactly once, in forward order
    assert sum(layer["percent"] for layer in result["layers"]) == pytest.approx(100.0, abs=1e-6)
    # Cross-check of three reported fields (not a re-summation): each op's share of total_ms is its percent.
    # The reported times themselves are checked against a controlled clock in
    # test_profile_covers_every_layer_with_exact_macs.
    assert result["total_ms"] > 0
    for layer in result["layers"]:
        assert 100.0 * layer["ms_median"] / result["total_ms"] == pytest.approx(layer["percent"], rel=1e-9, abs=1e-9)
    per_image = spec.macs()
    for layer in result["layers"]:
        assert layer["macs"] == sum(per_image[name] for name in layer["covers"]) * batch
        assert 0 < layer["ms_p20"] <= layer["ms_median"] <= layer["ms_p80"]
    assert sum(layer["macs"] for layer in result["layers"]) == TOTAL_MACS[spec.name] * batch


@pytest.fixture(scope="module", params=fast_first(sorted(TOTAL_MACS)))
def torch_results(request) -> list[dict]:
    return profile(model=request.param, device="cpu", precision="fp32", batch_sizes=BATCH_SIZES, repeat=3, warmup=1)


def test_profile_covers_every_layer_with_exact_macs(torch_results, monkeypatch):
    import math
    import random
    import time
    import types

    import fastfeat.profile

    assert [(r["backend"], r["batch_size"]) for r in torch_results] == [("torch", b) for b in BATCH_SIZES]
    assert schema_errors(torch_results) == []
    for result in torch_results:
        check_accounting(result)
        assert result["device"] == "cpu" and result["precision"] == "fp32"
        assert result["by_type"]["conv"]["macs"] + result["by_type"]["fc"]["macs"] == result["total_macs"]
        assert sum(entry["percent"] for entry in result["by_type"].values()) == pytest.approx(100.0, abs=1e-6)

    # Real clock: every op runs once (repeat=1, no warm-up), so the reported forward time must fit inside
    # the wall-clock time of the whole call (which also loads weights and builds the net).
    spec = get_model(torch_results[0]["model"])
    t0 = time.perf_counter()
    (real,) = profile(model=spec.name, device="cpu", precision="fp32", batch_sizes=(1,), repeat=1, warmup=0)
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert 0 < real["total_ms"] <= wall_ms

    # Controlled clock: the CPU timer reads the clock before and after each timed run, so run k lasts
    # durations[k] ms.  Every expected number below comes from these durations, not from the result.
    repeat, batches = 3, (1, 2)
    # The torch backend's ops on this CPU (conv+ReLU fused where oneDNN runs the dtype natively).
    weights = load_weights(spec, "random:0").tensors
    ops = make_backend("torch", spec, weights, torch.device("cpu"), torch.float32).plan(spec.layer_names[-1:])
    n_ops = len(ops)
    rng = random.Random(0)
    durations = [rng.uniform(0.5, 20.0) for _ in range(len(batches) * n_ops * repeat)]
    readings, now = [], 1000.0
    for d in durations:
        readings += [now, now + d / 1e3]
        now += d / 1e3 + 0.0123  # time between timed runs is not charged to any op
    clock = iter(readings)
    monkeypatch.setattr(fastfeat.profile, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    results = profile(model=spec.name, device="cpu", precision="fp32", batch_sizes=batches, repeat=repeat, warmup=1)
    assert next(clock, None) is None  # exactly two readings per timed run
    for b, (batch, result) in enumerate(zip(batches, results, strict=True)):
        runs = durations[b * n_ops * repeat : (b + 1) * n_ops * repeat]
        per_op = [sorted(runs[i * repeat : (i + 1) * repeat]) for i in range(n_ops)]
        medians = [lo_mid_hi[1] for lo_mid_hi in per_op]
        total = math.fsum(medians)
        assert result["total_ms"] == pytest.approx(total, rel=1e-9)
        assert result["ms_per_image"] == pytest.approx(total / batch, rel=1e-9)
        assert result["images_per_s"] == pytest.approx(1e3 * batch / total, rel=1e-9)
        assert result["gflops"] == pytest.approx(2 * TOTAL_MACS[spec.name] * batch / (total * 1e6), rel=1e-9)
        for layer, (lo, mid, hi), median in zip(result["layers"], per_op, medians, strict=True):
            assert layer["ms_median"] == pytest.approx(median, rel=1e-9)
            # numpy's linear interpolation of 3 sorted values: positions 0.4 and 1.6
            assert layer["ms_p20"] == pytest.approx(lo + 0.4 * (mid - lo), rel=1e-9)
            assert layer["ms_p80"] == pytest.approx(mid + 0.6 * (hi - mid), rel=1e-9)
            assert layer["percent"] == pytest.approx(100.0 * median / total, rel=1e-9)
        for kind, entry in result["by_type"].items():
            kind_ms = math.fsum(m for op, m in zip(ops, medians, strict=True) if op.kind == kind)
            assert entry["ms"] == pytest.approx(kind_ms, rel=1e-9)
            assert entry["percent"] == pytest.approx(100.0 * kind_ms / total, rel=1e-9)


def test_results_round_trip_through_json(torch_results):
    assert schema_errors(json.loads(json.dumps(torch_results))) == []


def test_schema_check_rejects_broken_results(torch_results, tmp_path):
    # The subject is the product's JSON file (`fastfeat profile --json` goes through write_json): it must
    # hold exactly the results, in the documented schema.  The schema check that the other tests rely on
    # is then run on that file with each documented key removed or mistyped, so that a product file
    # lacking any of them could not pass those tests.
    from fastfeat.profile import write_json

    path = tmp_path / "profile.json"
    write_json(torch_results, str(path))
    written = json.loads(path.read_text())
    assert written == torch_results
    assert schema_errors(written) == []

    broken = json.loads(path.read_text())[:1]
    del broken[0]["total_ms"]
    broken[0]["batch_size"] = "4"
    broken[0]["layers"][0]["macs"] = 1.5
    errors = schema_errors(broken)
    assert "result 0: missing 'total_ms'" in errors
    assert "result 0: 'batch_size' is str" in errors
    assert "result 0 layer 0: 'macs' is float" in errors
    for key in RESULT_SCHEMA:
        broken = json.loads(path.read_text())
        del broken[-1][key]
        assert schema_errors(broken) == [f"result {len(broken) - 1}: missing {key!r}"]
    for key in LAYER_SCHEMA:
        broken = json.loads(path.read_text())
        del broken[0]["layers"][-1][key]
        last = len(broken[0]["layers"]) - 1
        assert f"result 0 layer {last}: missing {key!r}" in schema_errors(broken)
    broken = json.loads(path.read_text())
    broken[0]["layers"][0]["type"] = "dropout"
    broken[0]["layers"][1]["covers"] = [3]
    broken[0]["total_ms"] = True  # a bool is an int to isinstance, never a valid number here
    assert schema_errors(broken) == [
        "result 0: 'total_ms' is bool",
        "result 0 layer 0: unknown type 'dropout'",
        "result 0 layer 1: covers must hold layer names",
    ]
    assert schema_errors([]) == ["results must be a non-empty list"]


def test_each_op_runs_on_the_previous_ops_output():
    seen = []

    def double(x):
        return x * 2

    def record(x):
        seen.append(x.clone())
        return x + 1

    ops = [Op("a", "conv", ("a",), double), Op("b", "relu", ("b",), record)]
    x = torch.randn(2, 3)
    timed = time_plan(ops, x, repeat=3, warmup=2, device=torch.device("cpu"))
    assert len(seen) == 2 + 3  # warm-up runs, then timed runs, all on op a's real output
    assert all(torch.equal(s, x * 2) for s in seen)
    assert [(op.name, len(times), shape) for op, times, shape in timed] == [("a", 3, (2, 3)), ("b", 3, (2, 3))]


def _fuse_conv_relu(result: dict) -> dict:
    """The torch result re-grouped the way the triton backend fuses: conv+relu and fc+relu as one op."""
    fused = json.loads(json.dumps(result))
    layers = []
    for layer in fused["layers"]:
        if layer["type"] == "relu" and layers and layers[-1]["type"] in ("conv", "fc"):
            prev = layers[-1]
            prev["covers"] += layer["covers"]
            prev["name"] = "+".join(prev["covers"])
            for key in ("macs", "ms_median", "ms_p20", "ms_p80", "percent"):
                prev[key] += layer[key]
        else:
            layers.append(layer)
    fused["layers"], fused["backend"] = layers, "fused"
    return fused


def test_table_lines_up_fused_and_unfused_ops(torch_results):
    fused = _fuse_conv_relu(torch_results[0])
    check_accounting(fused)
    table = format_table([torch_results[0], fused])
    lines = table.splitlines()
    assert "torch b=1" in lines[1] and "fused b=1" in lines[1]
    spec = get_model(torch_results[0]["model"])
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in spec.layer_names}
    assert set(rows) == set(spec.layer_names)
    assert "(fused)" in rows["relu1"] and "(fused)" not in rows["conv1"] and "(fused)" not in rows["pool1"]
    assert rows["relu6"].count("(fused)") == 1  # only the fused backend's group
    # conv1 row: shape, per-image MACs, then two groups of ms/batch, ms/img, %, GFLOP/s
    conv1 = rows["conv1"].split()
    assert conv1[:4] == [
        "conv1",
        "conv",
        "x".join(map(str, spec.shapes()["conv1"])),
        f"{spec.macs()['conv1'] / 1e6:.1f}M",
    ]
    assert len(conv1) == 4 + 2 * 4
    for kind in ("conv", "fc", "pool", "relu"):
        assert any(line.split()[:1] == [kind] for line in lines)


def test_plot_writes_a_png(torch_results, tmp_path):
    path = tmp_path / "profile.png"
    plot_profile([*torch_results, _fuse_conv_relu(torch_results[-1])], str(path))
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_cli_end_to_end(tmp_path, capsys):
    json_path, png_path = tmp_path / "profile.json", tmp_path / "profile.png"
    argv = ["profile", "--model", "alexnet", "--device", "cpu", "--precision", "fp32", "--batch-size", "1,2"]
    argv += ["--repeat", "2", "--json", str(json_path), "--plot", str(png_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in get_model("alexnet").layer_names:
        assert f"\n{name} " in out
    results = json.loads(json_path.read_text())
    assert schema_errors(results) == []
    assert [r["batch_size"] for r in results] == [1, 2]
    for result in results:
        check_accounting(result)
    assert png_path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "vgg99"], "unknown model 'vgg99'"),
        (["--batch-size", "1,x"], "batch sizes must be comma-separated positive integers"),
        (["--batch-size", "0"], "batch sizes must be positive integers"),
        (["--backend", "tensorrt"], "unknown backend 'tensorrt'"),
        (["--repeat", "0"], "repeat must be at least 1"),
        (["--precision", "int8"], "unknown precision 'int8'"),
        (["--plot", "/nonexistent-dir/p.png"], "its directory does not exist"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(args, message, capsys):
    assert main(["profile", "--device", "cpu", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfeat: error: ") and message in lines[0]


def test_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        profile(backends=("triton",), device="cpu", batch_sizes=(1,), repeat=1)
    assert "triton" not in resolve_backends("all", torch.device("cpu"))
    assert resolve_backends("torch,torch", torch.device("cpu")) == ["torch"]


TRITON_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)
x = torch.zeros(5)
add_one[(1,)](x, 5, BLOCK=8)
assert x.tolist() == [1.0] * 5, x
from fastfeat.kernels import backend_available
ok, why = backend_available()
assert ok, why
"""

TRITON_PROFILE = """
import json, sys
from fastfeat.profile import profile
results = profile("caffenet", backends=("triton",), device="cpu", precision="fp32", batch_sizes=(1,), repeat=1, warmup=0)
json.dump(results, sys.stdout)
"""


@pytest.mark.slow
def test_triton_backend_under_the_interpreter():
    # Triton reads TRITON_INTERPRET when it is imported, so the run gets a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    probe = subprocess.run([sys.executable, "-c", TRITON_PROBE], env=env, capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"the Triton interpreter is not usable here: {probe.stderr.strip().splitlines()[-1:]}")
    run = subprocess.run([sys.executable, "-c", TRITON_PROFILE], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    assert schema_errors(results) == []
    assert [(r["backend"], r["batch_size"]) for r in results] == [("triton", 1)]
    check_accounting(results[0])


# -- a loaded machine (fastfeat.profile_noise), with injected timings and load ----------------------
def test_quiet_timings_raise_no_warning():
    from fastfeat.profile_noise import timing_quality

    rng = np.random.default_rng(0)
    ops = {f"op{i}": list(rng.uniform(0.9, 1.1, 10) * (0.01 + i * 1.37)) for i in range(12)}
    q = timing_quality(ops, load=0.4, cores=2)
    assert q == {"load_average": 0.4, "cores": 2, "loaded": False, "noisy_ops": {}, "tick_ms": None, "warnings": []}


def test_a_loaded_machine_is_detected_three_ways():
    """The issue's case: another job on both cores, small ops descheduled for whole 4 ms ticks."""
    from fastfeat.profile_noise import timing_quality

    rng = np.random.default_rng(1)
    ops = {f"small{i}": list(4.0 * rng.integers(0, 3, 10) + rng.uniform(0.001, 0.01, 10)) for i in range(6)}
    ops["conv"] = list(rng.uniform(40.0, 41.0, 10))  # large and steady: not flagged
    q = timing_quality(ops, load=17.6, cores=2)
    assert q["loaded"] and q["load_average"] == 17.6
    assert q["tick_ms"] == 4.0
    assert "conv" not in q["noisy_ops"] and set(q["noisy_ops"]) <= {f"small{i}" for i in range(6)}
    assert len(q["noisy_ops"]) >= 4
    text = "\n".join(q["warnings"])
    assert "load average 17.6 on 2 cores" in text and "multiples of 4 ms" in text and "vary by more than 50%" in text


def test_spread_alone_and_ticks_alone():
    from fastfeat.profile_noise import spread, tick_ms, timing_quality

    assert spread([1.0, 1.0, 1.0]) == 0.0 and spread([1.0, 2.0, 3.0, 4.0, 5.0]) > 0.5
    assert tick_ms([10.0 * k + 0.1 for k in range(2, 12)]) == 10.0
    assert tick_ms([4.0 * k + 0.05 for k in range(2, 12)]) == 4.0
    assert tick_ms(list(np.linspace(8.3, 47.9, 30))) is None  # evenly spread: no tick
    q = timing_quality({"a": [1.0, 5.0, 1.0, 9.0, 1.0], "b": [0.001, 0.02, 0.001]}, load=None, cores=2)
    assert q["noisy_ops"] == {"a": 4.8} and not q["loaded"]  # b: below the timer floor, not judged


def test_the_table_marks_noisy_ops_and_warns_within_120_characters(torch_results):
    import copy

    from fastfeat.profile_noise import timing_quality

    result = copy.deepcopy(torch_results[-1])
    first = result["layers"][0]["name"]
    ops = {op["name"]: [1.0] * 5 for op in result["layers"]}
    ops[first] = [0.1, 4.1, 8.1, 0.1, 4.1, 8.1, 4.1, 8.1, 4.1, 8.1]
    result["timing_quality"] = timing_quality(ops, load=9.0, cores=2)
    table = format_table([result])
    lines = table.splitlines()
    assert all(len(line) <= 120 for line in lines), max(lines, key=len)
    row = next(line for line in lines if line.split()[:1] == [result["layers"][0]["covers"][0]])
    assert "~" in row
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 2 and "loaded: load average 9.0 on 2 cores" in warnings[0]
    assert json.loads(json.dumps(result))["timing_quality"]["noisy_ops"] == {
        first: result["timing_quality"]["noisy_ops"][first]
    }
