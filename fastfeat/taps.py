"""Layer taps by the model's own names: which there are, and a callable that returns them.

torchvision: the graph node names of ``get_graph_node_names`` (eval mode; the input node ``x`` left
out), run through ``create_feature_extractor`` (torch.fx), which computes nothing past the deepest one.
timm: the ``feature_info`` modules (their outputs caught by forward hooks) and ``features`` /
``pre_logits`` / ``logits`` from ``forward_features`` and ``forward_head``.
"""

from __future__ import annotations

from collections.abc import Callable

TIMM_HEAD_TAPS = ("features", "pre_logits", "logits")


def tap_names(library: str, module) -> list[str]:
    if library == "timm":
        return [info["module"] for info in module.feature_info] + list(TIMM_HEAD_TAPS)
    from torchvision.models.feature_extraction import get_graph_node_names

    _, eval_nodes = get_graph_node_names(module)
    nodes = [n for n in eval_nodes if n != "x"]
    # A container module (layer4, layer4.1, features) names its last node's output
    # (create_feature_extractor's rule): listed right after that node.
    containers = [n for n, m in module.named_modules() if n and list(m.children())]
    out = []
    for i, node in enumerate(nodes):
        out.append(node)
        following = nodes[i + 1] if i + 1 < len(nodes) else ""
        ends = [c for c in containers if node.startswith(c + ".") and not following.startswith(c + ".")]
        out.extend(sorted(ends, key=lambda c: -c.count(".")))  # layer4.1, then layer4
    return out


def _torchvision_nodes(module, names: list[str]) -> dict[str, str]:
    """Each requested tap -> the graph node whose output it is (a container: its last node)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    _, nodes = get_graph_node_names(module)
    resolved = {}
    for name in names:
        if name in nodes:
            resolved[name] = name
        else:
            inside = [n for n in nodes if n.startswith(name + ".")]
            if not inside:
                raise KeyError(f"no graph node or module {name!r}")
            resolved[name] = inside[-1]
    return resolved


def tap_function(library: str, module, names: list[str]) -> Callable:
    """``run(x) -> {name: raw activation}`` for the requested taps (module in eval mode)."""
    if library == "timm":
        return _TimmTaps(module, names)
    from torchvision.models.feature_extraction import create_feature_extractor

    nodes = _torchvision_nodes(module, names)
    # One output per node: create_feature_extractor keeps one name per node, so taps that are the same
    # node (layer4 and layer4.1.relu_1) are copied out under each name.
    extractor = create_feature_extractor(module, return_nodes=sorted(set(nodes.values()))).eval()
    _copy_taps_before_in_place_ops(extractor)

    def run(x):
        out = extractor(x)
        return {name: out[node] for name, node in nodes.items()}

    return run


def _copy_if_tensor(value):
    """A tap's value, copied if it is a tensor: a graph node may also be a size or a tuple (a ViT's
    ``x.shape``, which every-tap listings such as ``fastfeat models show`` evaluate)."""
    import torch

    return value.clone() if isinstance(value, torch.Tensor) else value


def _copy_taps_before_in_place_ops(graph_module) -> None:
    """Each returned node's output copied right after it is computed.

    torchvision's ReLU(inplace=True) and ``out += identity`` overwrite the tensor they take, so without
    the copy a tapped conv, batch-norm or linear output comes back as its ReLU's (or the residual sum)
    whenever a deeper tap runs the in-place op too (``features.0`` with ``features.3`` on AlexNet)."""
    graph = graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    (returned,) = output.args
    copies = {}
    for node in returned.values():
        if node not in copies:
            with graph.inserting_after(node):
                copies[node] = graph.call_function(_copy_if_tensor, (node,))
    output.args = ({name: copies[node] for name, node in returned.items()},)
    graph_module.recompile()


def tap_outputs(library: str, module, names: list[str], x):
    return tap_function(library, module, names)(x)


class _TimmTaps:
    def __init__(self, module, names: list[str]):
        self.module, self.names = module, list(names)
        self.stages = [n for n in self.names if n not in TIMM_HEAD_TAPS]
        self.caught: dict = {}
        for n in self.stages:
            module.get_submodule(n).register_forward_hook(self._catcher(n))

    def _catcher(self, name: str):
        def hook(_module, _inputs, output):
            self.caught[name] = output

        return hook

    def __call__(self, x):
        self.caught = {}
        m, out = self.module, {}
        feats = m.forward_features(x)
        out.update(self.caught)
        if "features" in self.names:
            out["features"] = feats
        if "pre_logits" in self.names:
            out["pre_logits"] = m.forward_head(feats, pre_logits=True)
        if "logits" in self.names:
            out["logits"] = m.forward_head(feats)
        return {n: out[n] for n in self.names}
