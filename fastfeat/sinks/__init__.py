"""Output formats, registered by name (``--format``).

A format is one module ``<name>.py`` in this package defining a :class:`~fastfeat.sinks.base.Sink`
subclass with ``name = "<name>"``, decorated with ``@register_sink``.  Listing the names imports
nothing (see fastfeat.registry).
"""

from __future__ import annotations

from ..registry import Registry

DEFAULT_FORMAT = "parquet"
REGISTRY = Registry(__name__, "output format", default=DEFAULT_FORMAT, skip=("base",))
register_sink = REGISTRY.register  # class decorator: ``--format cls.name``
format_names = REGISTRY.names
get_sink = REGISTRY.get

__all__ = ["DEFAULT_FORMAT", "format_names", "get_sink", "register_sink"]
