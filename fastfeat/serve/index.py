"""Nearest neighbours over an output directory of ``fastfeat extract`` (``fastfeat serve --index DIR``).

The directory is read through its manifest (only finished shards), in either format: ``.npy``
shards are memory-mapped and ``.parquet`` shards streamed by record batch, so that reading never
holds more than one chunk besides the index.  Every row is L2-normalised, so that an inner product is
a cosine, and added to a faiss index: a flat (exact) one below ``exact_below`` rows, HNSW above,
where a flat query would cost more than a forward pass (see config.DEFAULT_EXACT_BELOW).  faiss
keeps its own float32 copy: memory is rows × dim × 4 bytes (HNSW adds its graph).

The directory must hold features of the served network: the same model, weights and preprocessing,
and the searched layer.  Precision, backend and device may differ (features agree within the
tolerances stated in README).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator

import numpy as np

from ..errors import ConfigError
from ..output.schema import ManifestError, validate_manifest

CHUNK_ROWS = 4096  # rows read, normalised and added at a time
HNSW_M = 32  # graph degree: faiss's recommended 16-64; recall@10 measured in benchmarks/index_threshold.py
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
_PREPROCESSING_KEYS = ("style", "resize", "crop", "channel_order", "mean", "std", "mean_sha256")


def read_manifest(path: str) -> dict:
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--index {path}: cannot read its manifest.json ({exc})") from None
    try:
        validate_manifest(manifest, "manifest.json")
    except ManifestError as exc:
        raise ConfigError(f"--index {path}: {exc}") from None
    if "layers" not in manifest["config"].get("metadata", {}):
        raise ConfigError(f"--index {path}: its manifest.json records no layers (config.metadata.layers)")
    return manifest


def check_compatible(path: str, stored: dict, served: dict, layer: str) -> None:
    """ConfigError naming the first difference that makes stored and served features incomparable."""
    if stored.get("model") != served["model"]:
        raise ConfigError(f"--index {path} holds {stored.get('model')} features; the server runs {served['model']}")
    pool_s, pool_v = ((m.get("model_config") or {}).get("pool") for m in (stored, served))
    if pool_s != pool_v:  # a torchvision/timm model's --pool: same layer names, other features
        raise ConfigError(f"--index {path} holds features pooled with --pool {pool_s}; the server pools with --pool {pool_v}")  # fmt: skip
    if stored.get("weights", {}).get("sha256") != served["weights"]["sha256"]:
        raise ConfigError(
            f"--index {path} was extracted with other weights ({stored.get('weights', {}).get('source')}); "
            f"the server runs {served['weights']['source']}"
        )
    pre_s, pre_v = stored.get("preprocessing", {}), served["preprocessing"]
    for key in _PREPROCESSING_KEYS:
        if pre_s.get(key) != pre_v.get(key):
            raise ConfigError(f"--index {path}: preprocessing {key} {pre_s.get(key)} differs from the server's {pre_v.get(key)}")  # fmt: skip
    views = (stored.get("augment") or {}).get("views", "center")
    if views != (served.get("augment") or {}).get("views", "center"):
        # Refused, not warned: a query's centre-crop features against rows averaged over other views
        # rank neighbours differently, and nothing in a response would show it.
        raise ConfigError(
            f"--index {path} was extracted with --augment {views}; the server computes centre-crop features "
            "(--augment center): extract the index again without --augment"
        )
    if layer not in stored.get("layers", {}):
        raise ConfigError(f"--index {path} holds layers {','.join(stored.get('layers', {}))}, not {layer}")


def _chunks(path: str, manifest: dict, layer: str) -> Iterator[tuple[list[str], list[str | None], np.ndarray]]:
    """(ids, labels, [rows, dim] float32) of every finished shard, in manifest order, CHUNK_ROWS at a time."""
    import pyarrow.parquet as pq

    fmt = manifest["config"].get("format", "parquet")
    for shard in sorted(manifest.get("shards", []), key=lambda s: s["index"]):
        file = os.path.join(path, shard["file"])
        try:
            if fmt == "npy":
                meta = pq.read_table(file, columns=["id", "label"])
                ids, labels = meta.column("id").to_pylist(), meta.column("label").to_pylist()
                matrix = np.load(file.replace(".ids.parquet", f".{layer}.npy"), mmap_mode="r")
                for i in range(0, len(ids), CHUNK_ROWS):
                    # A copy, always: the rows are normalised in place and the mapping is read-only.
                    chunk = np.array(matrix[i : i + CHUNK_ROWS], np.float32)
                    yield ids[i : i + CHUNK_ROWS], labels[i : i + CHUNK_ROWS], chunk
            elif fmt == "parquet":
                for batch in pq.ParquetFile(file).iter_batches(batch_size=CHUNK_ROWS, columns=["id", "label", layer]):
                    col = batch.column(layer)
                    values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(batch), col.type.list_size)
                    chunk = values.astype(np.float32)  # a copy (astype's default), normalised in place
                    yield batch.column("id").to_pylist(), batch.column("label").to_pylist(), chunk
            else:
                raise ConfigError(f"--index {path}: unknown shard format {fmt!r}")
        except ConfigError:
            raise
        except (OSError, ValueError) as exc:  # a missing, truncated or foreign shard file
            raise ConfigError(f"--index {path}: cannot read shard {shard['file']}: {exc}") from None


class NeighborIndex:
    """Cosine nearest neighbours of query features among the rows of an extract output."""

    def __init__(self, path: str, layer: str, manifest: dict, exact_below: int):
        import faiss

        self.path, self.layer, self.manifest = os.path.abspath(path), layer, manifest
        self.metadata = manifest["config"]["metadata"]
        self.dim = int(np.prod(self.metadata["layers"][layer]))
        total = sum(s["rows"] for s in manifest.get("shards", []))
        if total == 0:
            raise ConfigError(f"--index {path} holds no finished shard with rows")
        self.exact = total < exact_below
        if self.exact:
            self.index = faiss.IndexFlatIP(self.dim)
        else:
            self.index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self.ids: list[str] = []
        self.labels: list[str | None] = []
        for ids, labels, values in _chunks(path, manifest, layer):
            if values.shape[1] != self.dim:
                raise ConfigError(f"--index {path}: {layer} rows have {values.shape[1]} values, expected {self.dim}")
            values = np.ascontiguousarray(values)
            faiss.normalize_L2(values)  # an all-zero row stays zero: cosine 0 with everything
            self.index.add(values)
            self.ids += ids
            self.labels += labels
        self._search_lock = threading.Lock()  # HNSW's efSearch is index state; one search at a time is simplest
        self.source = manifest.get("source")
        self.image_column = manifest["config"].get("image_column", "image")
        self._items: dict[str, object] | None = None
        self._items_lock = threading.Lock()

    @property
    def kind(self) -> str:
        return "exact (faiss IndexFlatIP)" if self.exact else f"approximate (faiss IndexHNSWFlat, M={HNSW_M})"

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> list[list[dict]]:
        """For each query row: up to k {"id", "label", "score"} by descending cosine."""
        import faiss

        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(len(queries), self.dim).copy()
        faiss.normalize_L2(q)
        k = min(k, len(self.ids))
        with self._search_lock:
            if not self.exact:
                self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * k)
            scores, rows = self.index.search(q, k)
        return [
            [{"id": self.ids[r], "label": self.labels[r], "score": float(s)} for s, r in zip(ss, rr, strict=True) if r >= 0]
            for ss, rr in zip(scores, rows, strict=True)
        ]  # fmt: skip

    def describe(self) -> dict:
        return {
            "dir": self.path,
            "rows": len(self.ids),
            "layer": self.layer,
            "dim": self.dim,
            "search": self.kind,
            "complete": bool(self.manifest.get("complete")),
            "thumbnails": self.thumbnails_available(),
            "metadata": self.metadata,
        }

    # -- thumbnails: the indexed images themselves, read back from the extract's source ----------
    def thumbnails_available(self) -> bool:
        return bool(self.source) and os.path.exists(self.source)

    def item(self, id_: str):
        """The source Item of an indexed id (None when not indexed or the source is gone)."""
        if not self.thumbnails_available():
            return None
        with self._items_lock:
            if self._items is None:  # listed on first use: a million-image source takes seconds
                from ..sources import list_items

                indexed = set(self.ids)
                self._items = {it.id: it for it in list_items(self.source, self.image_column) if it.id in indexed}
        return self._items.get(id_)


def load_index(path: str, served_metadata: dict, layer: str | None, exact_below: int) -> NeighborIndex:
    manifest = read_manifest(path)
    stored = manifest["config"]["metadata"]
    if layer is None:  # the deepest served layer the directory holds
        held = [n for n in served_metadata["layers"] if n in stored["layers"]]
        if not held:
            raise ConfigError(
                f"--index {path} holds layers {','.join(stored['layers'])}; the server computes "
                f"{','.join(served_metadata['layers'])}: none in common"
            )
        layer = held[-1]
    check_compatible(path, stored, served_metadata, layer)
    return NeighborIndex(path, layer, manifest, exact_below)
