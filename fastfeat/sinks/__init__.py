"""Output formats, registered by name (``--format``).

A format is one module ``<name>.py`` in this package defining a :class:`~fastfeat.sinks.base.Sink`
subclass with ``name = "<name>"``, decorated with ``@register_sink``.  Listing the names imports
nothing; a format's module is imported when it is first asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Sink

DEFAULT_FORMAT = "parquet"
_NOT_FORMATS = ("base",)


def format_names() -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_FORMATS)
    return sorted(names, key=lambda n: n != DEFAULT_FORMAT)


def get_sink(name: str) -> type[Sink]:
    if name not in format_names():
        raise ConfigError(f"unknown output format {name!r}; choose from {', '.join(format_names())}")
    importlib.import_module(f"{__name__}.{name}")
    from .base import SINKS

    if name not in SINKS:
        raise RuntimeError(f"{__name__}.{name} registers no output format named {name!r}")
    return SINKS[name]


__all__ = ["DEFAULT_FORMAT", "format_names", "get_sink"]
