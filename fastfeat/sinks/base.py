"""The sink protocol: how one output format writes and reads back a shard.

A sink knows a file format and nothing of exactly-once: ``fastfeat.output`` hands it temporary
paths, then fsyncs, checksums and renames what it wrote, records the shard in the manifest, and
deletes the temporary files of a shard that was aborted.  So a format is one module here:

* ``shard_files(k)``: the final file names of shard k, the first one being the shard's primary
  file (what the manifest's ``file`` names);
* ``open(paths)``: a :class:`ShardWriter` writing to ``paths`` (final name -> temporary path);
* ``inspect(paths)``: (rows, ids) read back from a finished shard, for ``fastfeat verify``;
  raises on a damaged file.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import FastfeatError
from . import register_sink  # noqa: F401  (re-exported: format modules import it from here)


class ShardFileError(FastfeatError):
    """A shard file that is damaged or not one fastfeat wrote (read back by verify or fastfeat.data)."""


@dataclass
class Rows:
    """One batch of output rows: ``features[layer]`` is a C-contiguous [rows, dim] array of the stored dtype."""

    ids: list[str]
    labels: list[str | None]
    sizes: list[tuple[int, int]]  # the original (upright) width, height
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Layout:
    """What every shard of a run holds: the layers' flat sizes, the stored dtype and the run's metadata."""

    layer_dims: dict[str, int]
    dtype: str  # "float16" or "float32"
    metadata: dict

    @property
    def metadata_json(self) -> str:
        return json.dumps(self.metadata, sort_keys=True)


class ShardWriter(ABC):
    @abstractmethod
    def add(self, rows: Rows) -> None: ...

    @abstractmethod
    def close(self) -> int:
        """Finish every file (not yet fsynced: the caller does); returns the rows written."""

    @abstractmethod
    def abort(self) -> None:
        """Release the files; the caller deletes them."""


class Sink(ABC):
    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, layout: Layout):
        self.layout = layout

    @abstractmethod
    def shard_files(self, index: int) -> list[str]: ...

    @abstractmethod
    def open(self, paths: dict[str, str]) -> ShardWriter: ...

    @abstractmethod
    def inspect(self, paths: dict[str, str]) -> tuple[int, list[str]]: ...
