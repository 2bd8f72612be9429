"""Every layer op of CaffeNet and AlexNet at batch 64 in bf16: torch backend, and triton on CUDA.

    pytest benchmarks/test_bench_layers.py --benchmark-only
    pytest benchmarks/test_bench_layers.py --benchmark-only -k "caffenet and conv1"

Each op is timed on the real output of the op before it (one forward pass per model and
backend, on random N(0,1) images), the way ``fastfeat profile`` does.  Benchmarks are grouped
per layer, so torch and triton sit next to each other.  Each benchmark's p20/p50/p80 in ms is
appended to benchmarks/results/results.csv (conftest.py; ``--results-csv`` writes elsewhere).
Not part of the test run (testpaths = tests); never run two benchmarks at once on a small machine.
"""

from __future__ import annotations

import functools

import pytest
import torch
from results import device_name

from fastfeat.backends import make_backend, unavailable_reason
from fastfeat.backends.plan import Op
from fastfeat.models import MODELS, get_model
from fastfeat.runtime import PRECISIONS, keep_freed_memory
from fastfeat.weights import load_weights

BATCH = 64
# The same heap behaviour as `fastfeat extract` and `fastfeat profile`: without it every CPU op
# page-faults its output in again and memory-bound layers look 2-3x slower than they run.
keep_freed_memory()
PRECISION = "bf16"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton only on a GPU: the CPU interpreter measures numpy, not the kernels.
BACKENDS = ["torch"] + (["triton"] if DEVICE.type == "cuda" and unavailable_reason("triton", DEVICE) is None else [])

CASES = [
    pytest.param(model, backend, layer, id=f"{model}-{backend}-{layer}")
    for model in MODELS
    for backend in BACKENDS
    for layer in get_model(model).layer_names
]


@functools.cache
def forward_inputs(model: str, backend: str) -> dict[str, tuple[Op, torch.Tensor]]:
    """First covered layer of each op -> (op, the input it gets in a real forward pass)."""
    spec = get_model(model)
    net = make_backend(backend, spec, load_weights(spec, "random:0").tensors, DEVICE, PRECISIONS[PRECISION])
    images = torch.randn(BATCH, spec.input_size, spec.input_size, 3, generator=torch.Generator().manual_seed(0))
    x = net.prepare(images)
    inputs = {}
    with torch.inference_mode():
        for op in net.plan([spec.layer_names[-1]]):
            inputs[op.covers[0]] = (op, x)
            x = op.run(x)
    return inputs


def synchronized(run):
    """On CUDA, a call ends when its kernels do: the benchmark's wall clock then times the GPU work."""
    if DEVICE.type != "cuda":
        return run

    def run_and_wait(x):
        y = run(x)
        torch.cuda.synchronize(DEVICE)
        return y

    return run_and_wait


@pytest.mark.parametrize("model, backend, layer", CASES)
def test_layer(benchmark, result_row, model, backend, layer):
    inputs = forward_inputs(model, backend)
    if layer not in inputs:
        fused = next(op.name for op, _ in inputs.values() if layer in op.covers)
        pytest.skip(f"{backend} computes {layer} inside {fused}")
    op, x = inputs[layer]
    benchmark.group = f"{model} {layer} b{BATCH} {PRECISION}"
    benchmark.extra_info.update(op=op.name, covers=list(op.covers))
    result_row.update(
        kernel=f"{model}/{op.name}",
        provider=backend,
        shape="x".join(map(str, x.shape)),
        dtype=PRECISION,
        batch=BATCH,
        device=device_name(str(DEVICE)),
    )
    with torch.inference_mode():
        benchmark(synchronized(op.run), x)
