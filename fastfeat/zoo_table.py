"""A torchvision model as a layer table, so that the triton backend runs it on fastfeat's own kernels.

A model whose forward is a chain (every graph node takes the previous node's output alone) of Conv2d,
ReLU, MaxPool2d, Linear, and of layers that are the identity at inference -- Dropout, Identity, Flatten /
``torch.flatten(x, 1)``, an AdaptiveAvgPool2d whose output size is its input's at the model's input size
-- becomes a :class:`fastfeat.models.ModelSpec` (torchvision's AlexNet, the VGGs without batch norm).
Its layers are named by their graph node names (``features.0``, ``classifier.4``), and read their
weights under torchvision's own state-dict keys (the module's path: a module called twice is two layers
with one set of weights).  The identity nodes and the containers (``features``,
``classifier``) are taps without a layer of their own: each names the output of the layer before it,
reshaped to the tap's shape (``flatten`` is ``features.12``'s map, flattened C×H×W).

Every other model is refused in one line (``triton_refusal``) naming what the table cannot hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .layers import Conv, Layer, Linear, MaxPool, ReLU
from .models import ModelSpec

# The leaf module kinds a table can hold; AdaptiveAvgPool2d only where it is the identity.
TABLE_MODULE_KINDS = ("Conv2d", "ReLU", "MaxPool2d", "Linear", "Dropout", "Flatten", "Identity", "AdaptiveAvgPool2d")
_IDENTITY_KINDS = ("Dropout", "Identity")


class NotTranslatable(ValueError):
    """Why a module cannot become a layer table (one line, completes "the triton backend cannot run X: ")."""


@dataclass(frozen=True)
class ZooTable:
    """A library model as the triton backend runs it: ``spec`` its layer table, ``sources`` each tap ->
    the table's layer whose output it is (a layer's own name maps to itself)."""

    spec: ModelSpec
    sources: dict[str, str]


def _pair(value, what: str, node: str) -> int:
    """A square hyper-parameter as one int (torchvision writes both ints and pairs)."""
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise NotTranslatable(f"{node} has a non-square {what} {tuple(value)}")
    return int(a)


def _conv(name: str, key: str, m) -> Conv:
    if m.dilation not in (1, (1, 1)) or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise NotTranslatable(f"Conv2d {name} is dilated, not zero-padded or padded {m.padding!r}")
    if m.bias is None:
        raise NotTranslatable(f"Conv2d {name} has no bias")
    return Conv(name, key=key, out=m.out_channels, kernel=_pair(m.kernel_size, "kernel", name),
                stride=_pair(m.stride, "stride", name), pad=_pair(m.padding, "padding", name),
                groups=m.groups)  # fmt: skip


def _pool(name: str, m) -> MaxPool:
    if m.dilation not in (1, (1, 1)) or m.return_indices:
        raise NotTranslatable(f"MaxPool2d {name} is dilated or returns indices")
    kernel, pad = _pair(m.kernel_size, "kernel", name), _pair(m.padding, "padding", name)
    stride = _pair(m.stride if m.stride is not None else m.kernel_size, "stride", name)
    # torch's ceil mode drops a last window that would start in the padding; Caffe's (the kernels') keeps
    # it.  They agree where no window can start there: no padding, windows at least a stride wide.
    if m.ceil_mode and (pad or kernel < stride):
        raise NotTranslatable(f"MaxPool2d {name} rounds up (ceil_mode) with padding or a stride above its kernel")
    return MaxPool(name, kernel=kernel, stride=stride, pad=pad, ceil=bool(m.ceil_mode))


def _is_flatten_call(node) -> bool:
    import torch

    if node.op != "call_function" or node.target is not torch.flatten:
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def translate(module, name: str, input_size: int) -> ZooTable:
    """The layer table of ``module`` (eval mode) for ``input_size``×``input_size`` RGB inputs, named
    by torchvision's graph node names; NotTranslatable says why not."""
    from torchvision.models.feature_extraction import NodePathTracer

    tracer = NodePathTracer()
    graph = tracer.trace(module.eval())
    layers: list[Layer] = []
    sources: dict[str, str] = {}
    shape: tuple[int, ...] = (3, input_size, input_size)
    previous = None
    for node in graph.nodes:
        if node.op == "placeholder":
            previous = node
            continue
        if node.op == "output":
            break
        if node.op == "get_attr":
            raise NotTranslatable(f"its forward reads the parameter {node.target} outside a layer")
        qualname = tracer.node_to_qualname[node]
        if node.all_input_nodes != [previous]:
            takes = ", ".join(tracer.node_to_qualname.get(n, n.name) for n in node.all_input_nodes) or "nothing"
            raise NotTranslatable(f"its forward is not a chain of layers ({qualname} takes {takes})")
        previous = node
        kind = type(module.get_submodule(node.target)).__name__ if node.op == "call_module" else None
        m = module.get_submodule(node.target) if kind else None
        if kind == "Conv2d" and len(shape) == 3:
            layer = _conv(qualname, node.target, m)
        elif kind == "MaxPool2d" and len(shape) == 3:
            layer = _pool(qualname, m)
        elif kind == "ReLU":
            layer = ReLU(qualname)
        elif kind == "Linear" and len(shape) == 1:
            if m.bias is None:
                raise NotTranslatable(f"Linear {qualname} has no bias")
            layer = Linear(qualname, key=node.target, out=m.out_features)
        elif kind == "Linear":
            raise NotTranslatable(f"Linear {qualname} takes an unflattened {'x'.join(map(str, shape))} map")
        elif kind in _IDENTITY_KINDS or (kind == "Flatten" and (m.start_dim, m.end_dim) == (1, -1)):
            layer = None
            shape = (math.prod(shape),) if kind == "Flatten" else shape
        elif _is_flatten_call(node):
            layer, shape = None, (math.prod(shape),)
        elif kind == "AdaptiveAvgPool2d" and len(shape) == 3:
            size = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size, m.output_size)
            size = tuple(s if o is None else o for s, o in zip(shape[1:], size, strict=True))
            if size != shape[1:]:
                raise NotTranslatable(f"its AdaptiveAvgPool2d {qualname} maps {shape[1]}x{shape[2]} to "
                                      f"{size[0]}x{size[1]} at input {input_size} (only the identity runs)")  # fmt: skip
            layer = None
        else:
            what = kind or (getattr(node.target, "__name__", None) or str(node.target))
            raise NotTranslatable(f"the triton kernels have no layer for {what} ({qualname})")
        if layer is not None:
            layers.append(layer)
            shape = layer.out_shape(shape)
            sources[qualname] = qualname
        elif not layers:
            raise NotTranslatable(f"{qualname} comes before any layer the kernels run")
        else:
            sources[qualname] = layers[-1].name
    spec = ModelSpec(name=name, input_size=input_size, layers=tuple(layers), preprocess=None,
                     description=f"{name} as a layer table (fastfeat.zoo_table)")  # fmt: skip
    return ZooTable(spec, sources)


def table_for(spec) -> ZooTable:
    """The layer table of a torchvision ZooSpec (NotTranslatable: why not), its taps checked against the
    spec's: every tap resolved, each the same number of values, the state dict the module's."""
    if spec.library != "torchvision":
        raise NotTranslatable(f"{spec.library} models are not translated into a layer table")
    return _table(spec.name, spec.arch, spec.input_size, tuple(spec.raw_shapes.items()),
                  tuple(spec.state_shapes.items()), spec.preprocess)  # fmt: skip


@lru_cache(maxsize=8)
def _table(name, arch, input_size, raw_shapes, state_shapes, preprocess) -> ZooTable:
    import dataclasses

    from .zoo import build_module

    table = translate(build_module("torchvision", arch), name, input_size)
    spec = dataclasses.replace(table.spec, preprocess=preprocess)
    if spec.param_shapes() != dict(state_shapes):
        raise NotTranslatable("its state dict holds more than its layers' weights")
    layer_shapes, sources = spec.shapes(), dict(table.sources)
    nodes = list(sources)
    for tap, raw in raw_shapes:
        if tap not in sources:  # a container: its last node's output (fastfeat.taps)
            inside = [n for n in nodes if n.startswith(tap + ".")]
            if not inside:
                raise NotTranslatable(f"its tap {tap} is no node of the traced forward")
            sources[tap] = sources[inside[-1]]
        made = layer_shapes[sources[tap]]
        if (made if len(raw) == 3 else math.prod(made)) != (raw if len(raw) == 3 else math.prod(raw)):  # a bug
            raise RuntimeError(f"{name}: tap {tap} is {raw}, the layer table computes {made}")
    return ZooTable(spec, {tap: sources[tap] for tap, _ in raw_shapes})


def triton_refusal(spec) -> str | None:
    """Why the triton backend cannot run this torchvision/timm model (one line), or None when it can."""
    other = [k for k in spec.module_kinds if k not in TABLE_MODULE_KINDS]
    if other:
        kinds = ", ".join(other[:4]) + (" …" if len(other) > 4 else "")
        return (f"the triton backend runs fastfeat's own networks and torchvision models chaining "
                f"{', '.join(TABLE_MODULE_KINDS)} only ({spec.name} has {kinds}); use --backend torch or compile")  # fmt: skip
    try:
        table_for(spec)
    except NotTranslatable as exc:
        return f"the triton backend cannot run {spec.name}: {exc}; use --backend torch or compile"
    return None
