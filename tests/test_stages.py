"""The four paths that build the stage stack (fastfeat.stages.build_stages) give the same features, bit for
bit, for the same images and options: ``fastfeat.extract``, the Ray worker's code (its plain-Python base,
LocalShardWorker, without Ray), the Ray Data mapper (called on a pyarrow table, without Ray) and the
server's Engine (decode + forward).  With a mean image, and with views (the server takes no --augment:
it is compared on the centre view)."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import column_matrix, fast_first, read_features

import fastfeat
from fastfeat.cluster import pack_items, worker_config
from fastfeat.extractor import Extractor
from fastfeat.ray_data import FeatureMapper
from fastfeat.ray_worker import LocalShardWorker
from fastfeat.serve.config import ServeConfig
from fastfeat.serve.engine import Engine

N = 4  # images, all in one batch on every path (a batch's size may change a backend's summation order)
RUN = dict(model="caffenet", weights="random:7", layers="pool1", dtype="float32", batch_size=N)


@pytest.fixture(scope="module")
def images(tmp_path_factory, photos):
    """A folder of N photos (PNG and JPEG, several sizes) and {id: bytes} of the same files."""
    root = tmp_path_factory.mktemp("stages")
    data = {}
    for i, p in enumerate(photos[:N]):
        name = f"img{i}.{p.rsplit('.', 1)[1]}"
        shutil.copy(p, root / name)
        data[name] = (root / name).read_bytes()
    return str(root), data


@pytest.fixture(scope="module")
def mean_file(tmp_path_factory):
    """A Caffe-style mean image (3x256x256, not symmetric: a mirrored or shifted crop of it differs)."""
    path = tmp_path_factory.mktemp("mean") / "mean.npy"
    np.save(path, np.random.default_rng(0).uniform(90, 130, (3, 256, 256)).astype(np.float32))
    return str(path)


@pytest.fixture
def same_torch_threads():
    """The mapper and the worker set torch's threads: keep them as extract runs, and restore them after."""
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def by_id(table: pa.Table, ids: list[str]) -> np.ndarray:
    rows = {id_: i for i, id_ in enumerate(table.column("id").to_pylist())}
    return column_matrix(table, "pool1")[[rows[i] for i in ids]]


@pytest.mark.parametrize("augment", fast_first(["center", "flip", "5crop"]))
def test_extract_ray_worker_ray_data_and_serve_give_the_same_features(
    images, mean_file, tmp_path, same_torch_threads, augment
):
    folder, data = images
    ids = sorted(data)
    opts = dict(RUN, mean_file=mean_file, augment=augment)

    fastfeat.extract(folder, str(tmp_path / "extract"), progress=False, **opts)
    extracted = by_id(read_features(str(tmp_path / "extract")), ids)
    assert extracted.shape[0] == N and np.isfinite(extracted).all()

    # The Ray worker's code: the driver's Extractor plans and creates OUT/, the worker writes every shard.
    ex = Extractor(folder, str(tmp_path / "worker"), progress=False, **opts)
    todo, _, _ = ex.begin()
    worker = LocalShardWorker(worker_config(ex), ex.weights.tensors, threads=same_torch_threads)
    for shard in todo:
        record, _stats = worker.run_shard(shard, pack_items(ex.items[shard.first : shard.end]))
        ex.output.commit_shards([record])
    worked = by_id(read_features(str(tmp_path / "worker")), ids)

    mapper = FeatureMapper(num_threads=same_torch_threads, **opts)
    mapped_table = mapper(pa.table({"image": [data[i] for i in ids], "name": ids}))
    assert mapped_table.column("error").to_pylist() == [None] * N
    mapped = column_matrix(mapped_table, "pool1")

    np.testing.assert_array_equal(worked, extracted)
    np.testing.assert_array_equal(mapped, extracted)

    if augment == "center":  # the server makes one centre view
        cfg = ServeConfig(
            model=RUN["model"], weights=RUN["weights"], layers="pool1", device="cpu", max_batch=N,
            mean_file=mean_file, threads=None,
        )  # fmt: skip
        engine = Engine(cfg, ["pool1"])
        checked = [engine.check(data[i]) for i in ids]
        assert all(err is None for _, _, err in checked)
        batch, bad, _ = engine.decode([c[0] for c in checked], [c[1] for c in checked])
        assert bad == {}
        served = engine.forward(batch, list(range(N)))["pool1"]
        np.testing.assert_array_equal(served, extracted)
        assert engine.metadata == ex.metadata  # GET /v1/model describes the stored features' making


def test_a_mirrored_view_subtracts_the_mirrored_mean(mean_file, same_torch_threads):
    """``flip`` (one mirrored view) with a mean image: the mean is mirrored with the view (the Ray Data
    mapper once mirrored it only for several views; the test above holds the other paths to it)."""
    opts = dict(RUN, mean_file=mean_file, augment="flip")
    mapper = FeatureMapper(num_threads=same_torch_threads, **opts)
    assert mapper.stages.options.mean_image.shape == (1, 227, 227, 3)
    np.testing.assert_array_equal(mapper.stages.options.mean_image[0], mapper_mean_mirrored(mean_file))


def mapper_mean_mirrored(mean_file: str) -> np.ndarray:
    """An independent mirrored centre crop of the (3,256,256) mean: Caffe's offset (256-227)//2, HWC."""
    m = np.load(mean_file).transpose(1, 2, 0)
    off = (256 - 227) // 2
    return m[off : off + 227, off : off + 227][:, ::-1]
