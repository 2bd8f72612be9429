"""The lean launch path: a backend plans its forward pass once per (layers, input shape, dtype) and a
call only launches; the CUDA-graph wrapper's padding keeps the rows of an unpadded run.

Tiny networks (1/8 of CaffeNet's widths, 71x71 inputs, as gpu_check's dry run) under the Triton
interpreter on a CPU; on a GPU machine the same tests run there.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import fast_first

from fastfeat.backends import make_backend
from fastfeat.graphs import GraphForward
from fastfeat.kernels import backend_available
from fastfeat.layers import Conv, Linear
from fastfeat.models import get_model
from fastfeat.weights import load_weights

pytestmark = pytest.mark.skipif(not backend_available()[0], reason=backend_available()[1])
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny(model: str = "caffenet", divisor: int = 8, size: int = 71):
    spec = get_model(model)
    layers = tuple(
        dataclasses.replace(layer, out=layer.out // divisor) if isinstance(layer, (Conv, Linear)) else layer
        for layer in spec.layers
    )
    return dataclasses.replace(spec, name=f"{model}-tiny", input_size=size, layers=layers, expected_macs=None,
                               expected_shapes={})  # fmt: skip


def images(n: int, size: int = 71, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", fast_first(["torch", "triton"]))
def test_second_forward_makes_no_plan_and_a_new_shape_or_layer_set_does(backend):
    spec = tiny()
    net = make_backend(backend, spec, load_weights(spec, "random:0").tensors, DEVICE, torch.float32)
    x = net.prepare(images(2))
    first = {k: v.clone() for k, v in net.forward_intermediates(x, ["pool5", "relu7"]).items()}
    assert net.plans_made == 1
    again = net.forward_intermediates(x, ["pool5", "relu7"])
    assert net.plans_made == 1  # the same plan, no checks or allocations again
    for name in first:
        assert torch.equal(first[name], again[name]), name
    net.forward_intermediates(net.prepare(images(3)), ["pool5", "relu7"])
    assert net.plans_made == 2  # another batch size
    net.forward_intermediates(x, ["relu6"])
    assert net.plans_made == 3  # another layer set
    net.forward_intermediates(x, ["pool5", "relu7"])
    assert net.plans_made == 3  # still cached


def test_triton_outputs_are_the_plans_buffers():
    """The ownership rule: the next forward with the same plan overwrites what the last one returned.
    And no launch of a CPU plan ever looks for the AOT library (no ctypes work without one)."""
    from fastfeat.kernels import native

    native.reset()
    spec = tiny()
    net = make_backend("triton", spec, load_weights(spec, "random:0").tensors, DEVICE, torch.float32)
    a = net.forward_intermediates(net.prepare(images(2, seed=1)), ["relu7"])["relu7"]
    kept = a.clone()
    b = net.forward_intermediates(net.prepare(images(2, seed=2)), ["relu7"])["relu7"]
    assert a.data_ptr() == b.data_ptr() and not torch.equal(kept, b)
    if DEVICE.type == "cpu":
        assert not native._state.resolved


def test_triton_plan_checks_the_input_once_when_it_is_made():
    spec = tiny()
    net = make_backend("triton", spec, load_weights(spec, "random:0").tensors, DEVICE, torch.float32)
    wrong = images(2).to(DEVICE, torch.float16)
    with pytest.raises(ValueError, match="contiguous NHWC"):
        net.forward_intermediates(wrong, ["relu7"])


def _emulated_capture(fn, static_input):
    """A CPU stand-in for a CUDA graph: ``replay`` recomputes into the outputs of the 'capture'."""
    outputs = {k: v.clone() for k, v in fn(static_input).items()}

    def replay():
        for k, v in fn(static_input).items():
            outputs[k].copy_(v)

    return replay, outputs


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_last_batch_gives_the_rows_of_an_unpadded_run(backend):
    spec = tiny()
    net = make_backend(backend, spec, load_weights(spec, "random:0").tensors, DEVICE, torch.float32)
    taps = ["pool5", "relu7"]
    graphs = GraphForward(lambda t: net.forward_intermediates(t, taps), max_rows=4, capture=_emulated_capture)
    full = net.prepare(images(4, seed=3))
    graphs(full)  # a full batch first: its rows are in the static input when the short one comes
    short = net.prepare(images(3, seed=4))
    padded = {k: v.clone() for k, v in graphs(short).items()}
    assert graphs.stats["captures"] == 1 and graphs.stats["replays"] == 2  # the short batch reused bucket 4
    unpadded = net.forward_intermediates(short, taps)
    for name in taps:
        assert padded[name].shape[0] == 3
        if backend == "triton" and DEVICE.type == "cpu":  # the interpreter runs one config for any batch
            assert torch.equal(padded[name], unpadded[name]), name
        else:  # oneDNN/cuBLAS (and autotuned tiles) may pick another kernel for 4 rows than for 3: rounding
            err = (padded[name] - unpadded[name]).norm() / unpadded[name].norm()
            assert err < 1e-5, (name, float(err))
