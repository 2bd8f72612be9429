"""Any torchvision or timm image model as a fastfeat model: ``--model torchvision:NAME`` / ``timm:NAME``.

A :class:`ZooSpec` stands where a :class:`fastfeat.models.ModelSpec` stands (name, preprocess, layer
names, per-image shapes, state-dict shapes), so the decoder, the sinks, resume, Ray and serve take it
unchanged; its forward pass is the library's own module (fastfeat.zoo_net), not a layer list, except on
the triton backend, which runs a torchvision model translated into a layer table (fastfeat.zoo_table).

Taps (``--layers``) are the model's own names: torchvision's graph node names
(``torchvision.models.feature_extraction.get_graph_node_names``, eval mode, the input node left out);
timm's ``feature_info`` modules (``stages.N``, ``blocks.N``) plus ``features`` (``forward_features``),
``pre_logits`` and ``logits`` (``forward_head``).  ``--pool`` reduces each tap: ``avg``/``max`` over
the spatial positions of a C×H×W map or the tokens of a T×C sequence, ``cls`` the first token of a
sequence, ``none`` keeps the whole map (flattened; its shape is in the metadata).  A 1-d tap is kept.

Preprocessing comes from the model's own configuration: timm's ``resolve_data_config`` (input size,
crop_pct -> the resize ``floor(size / crop_pct)``, interpolation, mean/std); torchvision's weights enum
``DEFAULT.transforms()`` (resize, crop, interpolation, mean/std) -- the published preprocessing of the
architecture, used for random weights too (recorded as such); a model without a weights enum gets
the ImageNet defaults (256/224, bilinear), and its metadata says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import ConfigError
from .models import Preprocess

LIBRARIES = ("torchvision", "timm")
POOLS = ("avg", "max", "cls", "none")
DEFAULT_POOL = "avg"
# The extra that brings timm (pyproject.toml).
TIMM_MISSING = "timm is not installed: pip install 'fastfeat[timm]' (or pip install timm)"


def is_zoo_name(name: str) -> bool:
    return isinstance(name, str) and name.split(":", 1)[0] in LIBRARIES and ":" in name


def pooled_shape(shape: tuple[int, ...], pool: str) -> tuple[int, ...] | None:
    """A tap's per-image shape after ``pool``; None where the pool does not apply (cls on a conv map)."""
    if len(shape) <= 1 or pool == "none":
        return tuple(shape)
    if len(shape) == 3:  # C×H×W
        return None if pool == "cls" else (shape[0],)
    if len(shape) == 2:  # T×C tokens
        return (shape[1],)
    return None


@dataclass(frozen=True, eq=False)
class ZooSpec:
    """A torchvision/timm model as fastfeat sees it; plain data (it travels to Ray workers)."""

    name: str  # "torchvision:resnet18"
    library: str
    arch: str
    pool: str
    input_size: int
    preprocess: Preprocess
    preprocess_source: str  # where the preprocessing came from, said in words
    raw_shapes: dict[str, tuple[int, ...]]  # every tap, unpooled, per image, in forward order
    default_layers: tuple[str, ...]
    state_shapes: dict[str, tuple[int, ...]]
    module_kinds: tuple[str, ...]  # leaf module class names, first appearance order
    description: str = ""
    expected_shapes: dict = field(default_factory=dict)
    is_zoo = True

    # -- the ModelSpec surface the pipeline reads ---------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return list(self.raw_shapes)

    def index(self, name: str) -> int:
        try:
            return self.layer_names.index(name)
        except ValueError:
            raise KeyError(f"unknown layer {name!r} for model {self.name!r}; `fastfeat models show {self.name}` "
                           "lists its taps") from None  # fmt: skip

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of every tap under this spec's pool (a tap the pool cannot reduce keeps its shape
        here; parse_layers refuses to tap it)."""
        return {n: pooled_shape(s, self.pool) or s for n, s in self.raw_shapes.items()}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.state_shapes)

    def macs(self) -> dict[str, int]:
        return {n: 0 for n in self.raw_shapes}  # not derived for library models

    def feature_info(self) -> list[dict]:
        shapes = self.shapes()
        return [{"name": n, "kind": "tap", "shape": list(shapes[n]), "macs": 0} for n in self.raw_shapes]

    def config(self) -> dict:
        """What the metadata and the run configuration record about the model beyond the common fields."""
        return {"library": self.library, "architecture": self.arch, "pool": self.pool,
                "preprocessing_from": self.preprocess_source}  # fmt: skip

    # -- building ---------------------------------------------------------------------------------
    def build_module(self):
        """The library's module with its own initialisation, eval mode, fp32, on the CPU."""
        return build_module(self.library, self.arch)

    def random_state(self, seed: int) -> dict:
        """``random:SEED``: the library's own initialisation under ``torch.manual_seed(seed)`` (restored after)."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.build_module()
        return {k: v.detach().to(torch.float32).contiguous() for k, v in module.state_dict().items()}

    def parse_layers(self, layers) -> list[str]:
        names = list(self.default_layers) if layers is None else (
            [n.strip() for n in layers.split(",") if n.strip()] if isinstance(layers, str) else list(layers))  # fmt: skip
        if not names:
            raise ValueError("no layers requested")
        for n in names:
            self.index(n)
            if pooled_shape(self.raw_shapes[n], self.pool) is None:
                raise ValueError(f"--pool {self.pool} does not apply to {n!r} of {self.name} (shape "
                                 f"{'x'.join(map(str, self.raw_shapes[n]))}); use avg, max or none")  # fmt: skip
        return sorted(set(names), key=self.index)


def _import(library: str):
    if library == "timm":
        try:
            import timm
        except ImportError:
            raise ConfigError(TIMM_MISSING) from None
        return timm
    import torchvision.models

    return torchvision.models


def build_module(library: str, arch: str):
    lib = _import(library)
    try:
        if library == "timm":
            module = lib.create_model(arch, pretrained=False)
        else:
            module = lib.get_model(arch, weights=None)
    except (RuntimeError, ValueError, KeyError) as exc:  # unknown names
        raise ConfigError(f"unknown {library} model {arch!r}: {str(exc).splitlines()[0]}") from None
    return module.eval()


def _torchvision_preprocess(arch: str) -> tuple[Preprocess, str]:
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(arch)
        weights = enum.DEFAULT
    except (ValueError, KeyError, AttributeError):
        weights = None
    if weights is None:
        pre = Preprocess("torchvision", 256, 224, "RGB", _px((0.485, 0.456, 0.406)), _px((0.229, 0.224, 0.225)))
        return pre, "ImageNet defaults (no torchvision weights enum for this architecture)"
    t = weights.transforms()
    interp = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}[t.interpolation.value]
    pre = Preprocess("torchvision", int(t.resize_size[0]), int(t.crop_size[0]), "RGB", _px(t.mean), _px(t.std),
                     interpolation=interp)  # fmt: skip
    return pre, f"torchvision {weights}.transforms() (the architecture's published preprocessing)"


def _timm_preprocess(module) -> tuple[Preprocess, str]:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=module)
    if cfg.get("crop_mode", "center") != "center":
        raise ConfigError(f"timm crop_mode {cfg['crop_mode']!r} is not supported (center only)")
    size = int(cfg["input_size"][-1])
    resize = math.floor(size / cfg["crop_pct"])  # timm's transforms_factory: scale_size = floor(size / crop_pct)
    interp = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}.get(cfg["interpolation"], "linear")
    pre = Preprocess("torchvision", resize, size, "RGB", _px(cfg["mean"]), _px(cfg["std"]), interpolation=interp)
    return pre, f"timm resolve_data_config: crop_pct {cfg['crop_pct']}, {cfg['interpolation']}"


def _px(values) -> tuple[float, float, float]:
    return tuple(float(v) * 255 for v in values)


@lru_cache(maxsize=32)
def zoo_spec(name: str, pool: str | None = None) -> ZooSpec:
    """The spec of ``torchvision:NAME`` / ``timm:NAME`` (built once per process: it runs the model once on
    a zero image, batch 1, to learn every tap's shape)."""
    import torch

    pool = pool or DEFAULT_POOL
    if pool not in POOLS:
        raise ConfigError(f"unknown --pool {pool!r}; choose from {', '.join(POOLS)}")
    library, arch = name.split(":", 1)
    module = build_module(library, arch)
    if library == "timm":
        pre, source = _timm_preprocess(module)
    else:
        pre, source = _torchvision_preprocess(arch)
    x = torch.zeros(1, 3, pre.crop, pre.crop)
    from .taps import tap_names, tap_outputs

    names = tap_names(library, module)
    with torch.inference_mode():
        outs = tap_outputs(library, module, names, x)
    raw = {n: tuple(t.shape[1:]) for n, t in outs.items() if isinstance(t, torch.Tensor) and t.dim() >= 2}
    kinds = []
    for m in module.modules():
        k = type(m).__name__
        if not list(m.children()) and k not in kinds:
            kinds.append(k)
    # The default tap is the classifier's input: the node before the last one, containers left out (a
    # container names its last node's output, so `classifier` would be the logits again).
    containers = {n for n, m in module.named_modules() if n and next(m.children(), None) is not None}
    nodes = [t for t in raw if t not in containers] or list(raw)
    default = ("pre_logits",) if library == "timm" else (nodes[-2] if len(nodes) > 1 else nodes[-1],)
    return ZooSpec(
        name=name, library=library, arch=arch, pool=pool, input_size=pre.crop, preprocess=pre,
        preprocess_source=source, raw_shapes=raw, default_layers=default,
        state_shapes={k: tuple(v.shape) for k, v in module.state_dict().items()}, module_kinds=tuple(kinds),
        description=f"{library} {arch}",
    )  # fmt: skip
