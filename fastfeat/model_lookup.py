"""``--model NAME`` to its spec: a built-in network (fastfeat.models) or, for ``torchvision:NAME`` /
``timm:NAME``, a fastfeat.zoo.ZooSpec under ``--pool``.  Here, not in fastfeat.models, so that the
layer-list module does not import the library-model one (which builds on its Preprocess)."""

from __future__ import annotations

from .models import ModelSpec, get_model
from .zoo import ZooSpec, is_zoo_name, zoo_spec


def resolve_model(name: str, pool: str | None = None) -> ModelSpec | ZooSpec:
    if is_zoo_name(name):
        return zoo_spec(name, pool)
    if pool is not None:
        raise ValueError(f"--pool applies to torchvision:NAME and timm:NAME models, not {name!r}")
    return get_model(name)


def make_model_backend(name: str, spec, tensors, device, dtype, *, compile_mode: str | None = None):
    """fastfeat.backends.make_backend, or for a library model its module on the torch/compile backend, or
    its layer table on the triton backend."""
    from .backends import make_backend

    if not getattr(spec, "is_zoo", False):
        return make_backend(name, spec, tensors, device, dtype, compile_mode=compile_mode)
    from .backends import get_backend
    from .errors import ConfigError
    from .zoo_net import ZooNet, ZooTritonNet

    if (why := get_backend(name).unavailable(device)) is not None:
        raise ConfigError(f"backend {name!r} is not available: {why}")
    if name == "triton":  # a torchvision model as a layer table (fastfeat.zoo_table), or a one-line refusal
        if compile_mode is not None:
            raise ConfigError("--compile-mode applies to --backend compile, not 'triton'")
        return ZooTritonNet(spec, tensors, device, dtype)
    return ZooNet(spec, tensors, device, dtype, backend=name, compile_mode=compile_mode)
