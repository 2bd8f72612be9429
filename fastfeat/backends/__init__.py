"""Forward-pass backends, registered by name.

A backend is one module ``<name>_backend.py`` in this package that defines a
:class:`~fastfeat.backends.base.Backend` subclass named ``<name>`` and decorated with
``@register_backend``; the modules are discovered here, so ``extract``, ``profile``, the CLI help
and the benchmarks all see a new backend without any other edit.  Listing the names imports
nothing (the CLI checks ``--backend`` before torch is imported); a backend's module is imported
when it is first asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ..models import ModelSpec
    from .base import Backend

SUFFIX = "_backend"


def backend_names() -> list[str]:
    """Every backend of this package, torch (the default) first."""
    names = sorted(m.name.removesuffix(SUFFIX) for m in pkgutil.iter_modules(__path__) if m.name.endswith(SUFFIX))
    return sorted(names, key=lambda n: n != "torch")


def get_backend(name: str) -> type[Backend]:
    if name not in backend_names():
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(backend_names())}")
    importlib.import_module(f"{__name__}.{name}{SUFFIX}")
    from .base import BACKENDS

    if name not in BACKENDS:  # a module that forgot its decorator or named its class otherwise
        raise RuntimeError(f"{__name__}.{name}{SUFFIX} registers no backend named {name!r}")
    return BACKENDS[name]


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` here (one line), or None when it can."""
    return get_backend(name).unavailable(device)


def make_backend(
    name: str, spec: ModelSpec, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> Backend:
    cls = get_backend(name)
    why = cls.unavailable(device)
    if why is not None:
        raise ConfigError(f"backend {name!r} is not available: {why}")
    return cls(spec, tensors, device, dtype)


__all__ = ["backend_names", "get_backend", "make_backend", "unavailable_reason"]
