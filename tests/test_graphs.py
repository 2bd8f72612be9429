"""CUDA-graph bookkeeping (fastfeat.graphs) on a CPU, with a stand-in capture: buckets, padding, LRU
eviction, the eager fallback after a failed capture, and the --cuda-graphs choice."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastfeat.errors import ConfigError
from fastfeat.graphs import GraphForward, bucket_for, resolve_cuda_graphs


def doubled(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 'forward pass' whose rows are independent, as a network's are."""
    return {"out": x * 2 + 1}


class FakeCapture:
    """Records what is captured; replay recomputes into the captured outputs, as a graph replay would."""

    def __init__(self, fail_for: set[int] = frozenset()):
        self.captured: list[int] = []
        self.fail_for = fail_for

    def __call__(self, fn, static_input):
        bucket = static_input.shape[0]
        if bucket in self.fail_for:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        self.captured.append(bucket)
        outputs = fn(static_input)

        def replay():
            for k, v in fn(static_input).items():
                outputs[k].copy_(v)

        return replay, outputs


def test_bucket_is_the_next_power_of_two_capped_at_the_largest_batch():
    assert [bucket_for(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert bucket_for(48, 48) == 48 and bucket_for(33, 48) == 48 and bucket_for(17, 48) == 32
    assert bucket_for(65, 64) is None
    with pytest.raises(ValueError):
        bucket_for(0, 64)


def test_short_batch_padded_to_its_bucket_and_padded_rows_dropped():
    capture = FakeCapture()
    graphs = GraphForward(doubled, max_rows=8, capture=capture)
    x = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    assert torch.equal(graphs(x)["out"], doubled(x)["out"])
    short = graphs(x[:5] + 100)["out"]
    assert capture.captured == [8]  # 5 rows: bucket 8, the graph of the full batches
    assert short.shape == (5, 3) and torch.equal(short, doubled(x[:5] + 100)["out"])
    assert graphs.stats["replays"] == 2 and graphs.stats["captures"] == 1


def test_least_recently_used_graph_is_evicted():
    capture = FakeCapture()
    graphs = GraphForward(doubled, max_rows=64, max_graphs=2, capture=capture)
    for n in (1, 2, 1, 4):  # bucket 2 is the least recently used when 4 arrives
        graphs(torch.ones(n, 3))
    assert capture.captured == [1, 2, 4]
    assert [key[0] for key in graphs.graphs] == [1, 4] and graphs.stats["evictions"] == 1
    graphs(torch.ones(2, 3))  # captured again
    assert capture.captured == [1, 2, 4, 2] and len(graphs.graphs) == 2


def test_failed_capture_runs_that_bucket_eagerly_from_then_on(caplog):
    capture = FakeCapture(fail_for={4})
    graphs = GraphForward(doubled, max_rows=4, capture=capture)
    x = torch.randn(3, 5)
    with caplog.at_level("WARNING", logger="fastfeat.graphs"):
        assert torch.equal(graphs(x)["out"], doubled(x)["out"])
        assert torch.equal(graphs(x)["out"], doubled(x)["out"])
    assert graphs.stats["capture_failures"] == 1 and graphs.stats["eager"] == 2  # tried once, not per batch
    assert len([r for r in caplog.records if "capture failed" in r.message]) == 1
    assert "RuntimeError: operation not permitted" in next(iter(graphs.failed.values()))
    assert torch.equal(graphs(torch.ones(1, 5))["out"], doubled(torch.ones(1, 5))["out"])
    assert capture.captured == [1]  # other buckets still get graphs


def test_batch_above_the_largest_bucket_runs_eagerly():
    graphs = GraphForward(doubled, max_rows=4, capture=FakeCapture())
    assert graphs(torch.ones(5, 2))["out"].shape == (5, 2) and graphs.stats["eager"] == 1


def test_cuda_graphs_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_cuda_graphs("auto", cuda, "triton") and resolve_cuda_graphs("auto", cuda, "torch")
    assert not resolve_cuda_graphs("auto", cuda, "compile")  # torch.compile has its own (reduce-overhead)
    assert resolve_cuda_graphs("on", cuda, "compile")
    assert not resolve_cuda_graphs("auto", cpu, "torch") and not resolve_cuda_graphs("off", cuda, "triton")
    with pytest.raises(ConfigError, match="--cuda-graphs on needs a CUDA device"):
        resolve_cuda_graphs("on", cpu, "torch")
    with pytest.raises(ConfigError, match="unknown --cuda-graphs"):
        resolve_cuda_graphs("yes", cuda, "torch")


@pytest.mark.slow  # a CLI subprocess each
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("command", ["extract", "profile", "serve"])
def test_cuda_graphs_on_a_cpu_is_a_one_line_error(command, tmp_path):
    args = {
        "extract": ["extract", "--sample", "--out", str(tmp_path / "o"), "--weights", "random:0", "--device", "cpu"],
        "profile": ["profile", "--device", "cpu", "--batch-size", "1", "--repeat", "1"],
        "serve": ["serve", "--weights", "random:0", "--device", "cpu", "--port", "0"],
    }[command]
    done = subprocess.run(
        [sys.executable, "-m", "fastfeat", *args, "--cuda-graphs", "on"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cuda-graphs on needs a CUDA device" in lines[0], done.stderr
    assert not (tmp_path / "o").exists()
