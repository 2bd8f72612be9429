"""Ray Data interop: fastfeat's decoder and forward pass as a ``map_batches`` callable class.

For pipelines that already live in Ray Data::

    import ray
    from fastfeat.ray_data import FeatureMapper

    ds = ray.data.read_parquet("s3://bucket/images/")          # a binary column "image"
    feats = ds.map_batches(
        FeatureMapper,
        fn_constructor_kwargs={"weights": "caffenet-imagenet", "layers": "relu7"},
        batch_format="pyarrow",
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=1),  # actors, each loading the model once
        num_cpus=1,             # per actor; GPU actors: num_gpus=1
    )  # size x num_cpus below the cluster's CPUs: Ray Data's read and write tasks need some too
    feats.write_parquet("s3://bucket/features/")

Each output row is its input row (without the image bytes unless ``keep_image``), one column per
layer (a fixed-size list of float16/float32, as in ``fastfeat extract``'s Parquet shards, null for an
image that could not be used) and ``error``: null, or why the image was skipped ("decode: ...").

This path is **at least once**: Ray Data retries failed tasks and its ``write_parquet`` writes straight
to the final path, so a retried or rerun write can leave duplicate rows or files.  ``fastfeat extract
--ray`` is the exactly-once one (a manifest, temp-then-rename shards, resume).
"""

from __future__ import annotations

import math

import numpy as np


class FeatureMapper:
    """``ds.map_batches(FeatureMapper, fn_constructor_kwargs={...}, batch_format="pyarrow", ...)``.

    Constructor arguments (``fn_constructor_kwargs``) are those of ``fastfeat extract``: ``weights``
    (required: a file, a published name or ``random:SEED``), ``model``, ``layers``, ``image_column``,
    ``device`` (auto: the GPU Ray gave the actor, else CPU), ``precision``, ``backend``, ``dtype``,
    ``mean_file``, ``max_pixels``, ``augment``, ``augment_reduce``, ``decode``, ``cuda_graphs``, ``compile_mode``, ``decoder``; ``num_threads`` defaults to the
    CPUs Ray granted the actor; ``batch_size`` is the decoder's (the largest batch it is given:
    pass ``map_batches`` the same); ``keep_image`` keeps the bytes column in the output.
    """

    def __init__(
        self, weights: str, model: str = "caffenet", layers: str | list[str] | None = None,
        image_column: str = "image", device: str = "auto", precision: str | None = None, backend: str = "torch",
        dtype: str = "float16", mean_file: str | None = None, max_pixels: int = 100_000_000,
        num_threads: int | None = None, batch_size: int = 64, augment: str = "center",
        augment_reduce: str = "mean", keep_image: bool = False, decode: str = "fast", cuda_graphs: str = "auto",
        compile_mode: str | None = None, decoder: str | None = None,
    ):  # fmt: skip
        import torch

        from .arguments import check_arguments
        from .graphs import resolve_cuda_graphs
        from .models import default_decoder
        from .runtime import resolve_device, resolve_precision
        from .stages import StageOptions, build_stages, mean_for
        from .weights import load_weights

        self.spec, self.layers = check_arguments(
            model=model, layers=layers, weights=weights, batch_size=batch_size, shard_size=1, dtype=dtype,
            precision=precision, device=device, backend=backend, format="parquet", max_pixels=max_pixels,
            num_threads=num_threads, num_shards=1, shard_index=0, max_error_rate=None, augment=augment,
            augment_reduce=augment_reduce, decode=decode, mean_file=mean_file, cuda_graphs=cuda_graphs,
            compile_mode=compile_mode, decoder=decoder,
        )  # fmt: skip
        threads = num_threads or _granted_cpus()
        torch.set_num_threads(threads)
        device = resolve_device(device)
        options = StageOptions(
            self.spec, self.layers, device, resolve_precision(precision, device), backend=backend, dtype=dtype,
            batch_size=batch_size, num_threads=threads, max_pixels=max_pixels, augment=augment,
            augment_reduce=augment_reduce, decode=decode, mean_file=mean_file,
            cuda_graphs=resolve_cuda_graphs(cuda_graphs, device, backend), compile_mode=compile_mode,
            mean_image=mean_for(mean_file, self.spec.preprocess, augment), decoder=decoder or default_decoder(),
        )  # fmt: skip
        tensors = load_weights(self.spec, weights).tensors  # a file, a published name (cached) or random:SEED
        self.stages = build_stages(options, tensors)
        self.device, self.batch_size, self.dims = device, batch_size, self.stages.dims
        self.decoder, self.forward = self.stages.decoder, self.stages.forward
        self.dtype, self.image_column, self.keep_image = dtype, image_column, keep_image

    def __call__(self, batch):
        """A ``pyarrow.Table`` (or a dict of numpy arrays) with the image column -> a ``pyarrow.Table``."""
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else pa.table(dict(batch))
        if self.image_column not in table.column_names:
            raise KeyError(f"no column {self.image_column!r} in the batch (columns: {', '.join(table.column_names)})")
        values = table.column(self.image_column).to_pylist()
        errors: list[str | None] = [None] * len(values)
        features = {n: np.zeros((len(values), d), np.float16 if self.dtype == "float16" else np.float32)
                    for n, d in self.dims.items()}  # fmt: skip
        for start in range(0, len(values), self.batch_size):  # Ray may hand over more rows than the decoder's batch
            self._extract(values[start : start + self.batch_size], start, errors, features)
        out = table.drop_columns([self.image_column]) if not self.keep_image else table
        mask = pa.array([e is not None for e in errors])
        value_type = pa.float16() if self.dtype == "float16" else pa.float32()
        for name, values_2d in features.items():
            flat = pa.array(values_2d.reshape(-1), value_type)
            out = out.append_column(name, pa.FixedSizeListArray.from_arrays(flat, self.dims[name], mask=mask))
        return out.append_column("error", pa.array(errors, pa.string()))

    def _extract(self, values: list, offset: int, errors: list, features: dict) -> None:
        from .runner import STAGES

        encoded, sizes, readable = [], [], []
        for j, value in enumerate(values):
            data = value.get("bytes") if isinstance(value, dict) else value
            if not data:
                errors[offset + j] = "read: empty image bytes"
                continue
            got, size, err = self.stages.read_bytes(data, str(offset + j))
            if err is not None:
                errors[offset + j] = f"{err[0]}: {err[1]}"
                continue
            encoded.append(got)
            sizes.append(size)
            readable.append(j)
        if not readable:
            return
        images, bad, _warned = self.decoder.decode(encoded, sizes)  # warned images keep their row, as in extract
        for k, message in bad.items():
            errors[offset + readable[k]] = f"decode: {message}"
        good = [k for k in range(len(readable)) if k not in bad]
        if images is None or not good:
            return
        feats = self.forward(images, good, dict.fromkeys(STAGES, 0.0))
        rows = [offset + readable[k] for k in good]
        for name, a in feats.items():
            features[name][rows] = a


def _granted_cpus() -> int:
    """The CPUs Ray granted this actor (1 outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return max(1, math.floor(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))
    except ImportError:
        pass
    return 1
