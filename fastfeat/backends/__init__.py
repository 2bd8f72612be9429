"""Forward-pass backends, registered by name.

A backend is one module ``<name>_backend.py`` in this package that defines a
:class:`~fastfeat.backends.base.Backend` subclass with ``name = "<name>"``, decorated with
``@register_backend``; ``extract``, ``profile``, the CLI help and the benchmarks all see a new
backend without any other edit.  Listing the names imports nothing (see fastfeat.registry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    import torch

    from ..models import ModelSpec
    from .base import Backend


REGISTRY = Registry(__name__, "backend", suffix="_backend", default="torch")
register_backend = REGISTRY.register  # class decorator: ``--backend cls.name``
backend_names = REGISTRY.names  # every backend of this package, torch (the default) first
get_backend = REGISTRY.get


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` here (one line), or None when it can."""
    return get_backend(name).unavailable(device)


def make_backend(
    name: str,
    spec: ModelSpec,
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    *,
    compile_mode: str | None = None,
) -> Backend:
    """A backend ready to run; ``compile_mode`` (torch.compile's mode) only for the compile backend."""
    cls = get_backend(name)
    why = cls.unavailable(device)
    if why is not None:
        raise ConfigError(f"backend {name!r} is not available: {why}")
    if compile_mode is None:
        return cls(spec, tensors, device, dtype)
    if not getattr(cls, "takes_compile_mode", False):
        raise ConfigError(f"--compile-mode applies to --backend compile, not {name!r}")
    return cls(spec, tensors, device, dtype, compile_mode=compile_mode)


__all__ = ["backend_names", "get_backend", "make_backend", "register_backend", "unavailable_reason"]
