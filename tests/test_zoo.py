"""torchvision:NAME and timm:NAME models (fastfeat.zoo): the network part equals the library's own forward
(fp32, same input tensor, 1e-5), end to end equals the library's own PIL preprocessing + forward within the
DALI-vs-PIL resampling difference (measured: docs/models.md), taps and shapes as `models show` lists them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import column_matrix, cut_after_shards, fast_first, read_features

from fastfeat.errors import ConfigError
from fastfeat.model_lookup import resolve_model as get_model

TIMM_MODELS = ("timm:vit_tiny_patch16_224", "timm:convnext_atto")
# DALI's resize (antialiased linear / cubic) against torchvision's/timm's PIL transforms, per image
# ||fastfeat - library|| / ||library|| at the pooled feature; measured maxima 0.09% (resnet18), 0.17% (ViT),
# 0.43% (ConvNeXt) on the test photos (docs/models.md).
END_TO_END_TOL = 1e-2


def _needs(name: str) -> None:
    if name.startswith("timm:"):
        pytest.importorskip("timm")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _module(spec, seed=0):
    from fastfeat.weights import load_weights

    weights = load_weights(spec, f"random:{seed}")
    module = spec.build_module()
    module.load_state_dict(weights.tensors)
    return weights, module.eval()


def _library_reference(spec, module, x):
    """The library's own forward: (final output, pooled feature), with no fastfeat code in between."""
    with torch.no_grad():
        if spec.library == "timm":
            return module(x), module.forward_head(module.forward_features(x), pre_logits=True)
        return module(x), torch.flatten(torch.nn.Sequential(*list(module.children())[:-1])(x), 1)


@pytest.mark.parametrize("name", ["torchvision:resnet18", *TIMM_MODELS])
def test_network_part_equals_library_forward(name):
    _needs(name)
    from fastfeat.model_lookup import make_model_backend as make_backend

    spec = get_model(name)
    weights, module = _module(spec)
    net = make_backend("torch", spec, weights.tensors, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(1)
    nhwc = torch.randn(2, spec.input_size, spec.input_size, 3, generator=gen)
    final, pooled = ("logits", "pre_logits") if spec.library == "timm" else ("fc", "flatten")
    got = net.forward_intermediates(net.prepare(nhwc), [pooled, final])
    ref_final, ref_pooled = _library_reference(spec, module, nhwc.permute(0, 3, 1, 2).contiguous())
    assert _rel(got[final], ref_final) < 1e-5
    assert _rel(got[pooled], ref_pooled) < 1e-5


# The default tap is the classifier's input, whatever the head looks like: a Linear after a ReLU and a
# Dropout (AlexNet), after flatten (ResNet), a class token picked by indexing (ViT), a Hardswish head.
@pytest.mark.parametrize(
    "name", fast_first(["torchvision:alexnet", "torchvision:vit_b_16", "torchvision:resnet18",
                        "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0"])
)  # fmt: skip
def test_default_tap_is_the_classifiers_input(name):
    spec = get_model(name)
    last_linear = [m for m in spec.build_module().modules() if isinstance(m, torch.nn.Linear)][-1]
    (default,) = spec.default_layers
    assert spec.raw_shapes[default] == (last_linear.in_features,), (default, spec.raw_shapes[default])


def test_pools_on_a_token_tap():
    pytest.importorskip("timm")
    from fastfeat.zoo_net import pool_tap

    spec = get_model("timm:vit_tiny_patch16_224", "none")
    _, module = _module(spec)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    caught = {}
    module.blocks[11].register_forward_hook(lambda m, i, o: caught.setdefault("t", o))
    with torch.no_grad():
        module(x)
    tokens = caught["t"]
    assert spec.raw_shapes["blocks.11"] == tuple(tokens.shape[1:])
    assert torch.equal(pool_tap(tokens, "cls"), tokens[:, 0])
    assert torch.allclose(pool_tap(tokens, "avg"), tokens.mean(1))
    assert torch.equal(pool_tap(tokens, "none"), tokens)
    with pytest.raises(ValueError, match="does not apply"):
        get_model("timm:convnext_atto", "cls").parse_layers("stages.3")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("zoo_photos")
    for p in photos:
        shutil.copy(p, root)
    return str(root)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision:resnet18", *TIMM_MODELS])
def test_end_to_end_equals_library_preprocessing(name, photo_dir, tmp_path):
    _needs(name)
    from PIL import Image

    import fastfeat

    spec = get_model(name)
    final, pooled = ("logits", "pre_logits") if spec.library == "timm" else ("fc", "flatten")
    out = str(tmp_path / "out")
    fastfeat.extract(photo_dir, out, model=name, weights="random:0", layers=[pooled, final], precision="fp32",
                     dtype="float32", batch_size=4, progress=False)  # fmt: skip
    table = read_features(out)
    meta = json.loads(next(iter(table.schema.metadata.values())))
    assert meta["model_config"]["library"] == spec.library
    _, module = _module(spec)
    if spec.library == "timm":
        import timm.data

        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=module))
    else:
        import torchvision

        transform = torchvision.models.get_model_weights(spec.arch).DEFAULT.transforms()
    ids = table.column("id").to_pylist()
    x = torch.stack([transform(Image.open(os.path.join(photo_dir, i)).convert("RGB")) for i in ids])
    ref_final, ref_pooled = _library_reference(spec, module, x)
    for layer, ref in ((pooled, ref_pooled), (final, ref_final)):
        got = column_matrix(table, layer)
        assert got.shape == (len(ids), *spec.shapes()[layer])
        for row, want in zip(got, ref.numpy(), strict=True):
            assert _rel(row, want) < END_TO_END_TOL


def test_models_show_lists_taps_with_shapes():
    from fastfeat.model_listing import show_rows

    rows = {r["name"]: r for r in show_rows("torchvision:resnet18", None, "float16")}
    assert rows["layer4"]["shape"] == [512] and rows["layer4"]["map_shape"] == [512, 7, 7]
    assert rows["layer4"]["bytes_per_image"] == 512 * 2
    assert rows["flatten"]["default"]
    none = {r["name"]: r for r in show_rows("torchvision:resnet18", "none", "float32")}
    assert none["layer3"]["shape"] == [256, 14, 14] and none["layer3"]["bytes_per_image"] == 256 * 14 * 14 * 4
    # The shapes listed are what the forward pass returns.
    from fastfeat.model_lookup import make_model_backend as make_backend

    spec = get_model("torchvision:resnet18", "none")
    weights, _ = _module(spec)
    net = make_backend("torch", spec, weights.tensors, torch.device("cpu"), torch.float32)
    acts = net.forward_intermediates(net.prepare(torch.rand(1, 224, 224, 3)), ["layer2.0", "layer3", "avgpool"])
    for n, a in acts.items():
        assert list(a.shape[1:]) == none[n]["shape"]


def test_bad_arguments_one_line():
    from fastfeat.arguments import check_arguments

    common = dict(weights="random:0", batch_size=4, shard_size=10, dtype="float16", precision=None, device="cpu",
                  format="parquet", max_pixels=10**8, num_threads=None, num_shards=1, shard_index=0,
                  max_error_rate=None)  # fmt: skip
    with pytest.raises(ConfigError, match="own networks and torchvision models chaining .* only .*BatchNorm2d"):
        check_arguments(model="torchvision:resnet18", layers=None, backend="triton", **common)
    with pytest.raises(ConfigError, match="unknown layer 'nope'"):
        check_arguments(model="torchvision:resnet18", layers="nope", backend="torch", **common)
    with pytest.raises(ConfigError, match="--pool applies to"):
        check_arguments(model="caffenet", layers=None, backend="torch", pool="avg", **common)
    with pytest.raises(ConfigError, match="unknown --pool"):
        check_arguments(model="torchvision:resnet18", layers=None, backend="torch", pool="median", **common)
    with pytest.raises(ConfigError, match="unknown torchvision model"):
        check_arguments(model="torchvision:no_such_net", layers=None, backend="torch", **common)


def test_local_weights_files(tmp_path):
    from safetensors.torch import save_file

    from fastfeat.weights import WeightsError, load_weights

    spec = get_model("torchvision:resnet18")
    weights, module = _module(spec, seed=3)
    pth, st = tmp_path / "r18.pth", tmp_path / "r18.safetensors"
    torch.save(module.state_dict(), pth)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(st))
    for path in (pth, st):
        loaded = load_weights(spec, str(path)).tensors
        assert all(torch.equal(loaded[k].to(v.dtype), v) for k, v in module.state_dict().items())
    other = get_model("torchvision:resnet34")
    with pytest.raises(WeightsError, match="missing key|unexpected key|has shape"):
        load_weights(other, str(pth))


@pytest.mark.slow
def test_models_cli_list_and_show():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "fastfeat", "models", "list"], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "caffenet" in run.stdout and "torchvision:NAME" in run.stdout
    run = subprocess.run([sys.executable, "-m", "fastfeat", "models", "show", "torchvision:resnet18", "--json"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert run.returncode == 0
    assert {r["name"]: r["shape"] for r in json.loads(run.stdout)}["fc"] == [1000]
    run = subprocess.run([sys.executable, "-m", "fastfeat", "models", "show", "torchvision:nope"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_resume_with_a_torchvision_model_equals_clean_run(photo_dir, tmp_path):
    import fastfeat

    kw = dict(model="torchvision:resnet18", weights="random:5", layers="layer3,flatten", batch_size=2, shard_size=2,
              progress=False, pool="max")  # fmt: skip
    full = tmp_path / "full"
    fastfeat.extract(photo_dir, str(full), **kw)
    part = tmp_path / "part"
    fastfeat.extract(photo_dir, str(part), **kw)
    # A crash during shard 2: the manifest lists shards 0 and 1 only, later files are gone.
    cut_after_shards(part, 2)
    summary = fastfeat.extract(photo_dir, str(part), **kw)
    assert summary["skipped_already_done"] == 4 and summary["complete"]
    assert read_features(str(part)).equals(read_features(str(full)))
    # Another --pool is another run: refused, not mixed in.
    with pytest.raises(ValueError, match="different run .*pool: max → avg"):
        fastfeat.extract(photo_dir, str(part), **{**kw, "pool": "avg"})


@pytest.mark.slow
def test_serve_a_torchvision_model_equals_extract(photos, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import fastfeat
    from fastfeat.serve.app import create_app
    from fastfeat.serve.batching import Batcher
    from fastfeat.serve.config import ServeConfig, check_serve_config
    from fastfeat.serve.engine import Engine
    from fastfeat.serve.metrics import Metrics

    photo = next(p for p in photos if p.endswith(".jpg"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(open(photo, "rb").read())
    run = dict(model="torchvision:resnet18", weights="random:4", layers="layer4", precision="fp32")
    fastfeat.extract(str(src), str(tmp_path / "out"), batch_size=1, dtype="float32", progress=False, **run)
    want = column_matrix(read_features(str(tmp_path / "out")), "layer4")[0].astype(np.float32)

    cfg = ServeConfig(**run, device="cpu", max_batch=2)
    engine = Engine(cfg, check_serve_config(cfg))
    batcher = Batcher(engine.decode, engine.forward, cfg.max_batch, cfg.max_delay_ms / 1000, cfg.queue_limit)
    metrics = Metrics(cfg.max_batch, lambda: batcher.waiting, lambda: batcher.admitted)
    with TestClient(create_app(cfg, engine, batcher, metrics, None)) as client:
        r = client.post("/v1/features", content=(src / "a.jpg").read_bytes(), params={"id": "a.jpg"},
                        headers={"Content-Type": "image/jpeg"})  # fmt: skip
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["images"][0]["features"]["layer4"], np.float32)
        assert got.shape == (512,)
        assert _rel(got, want) < 1e-5
        assert client.get("/v1/model").json()["model_config"]["pool"] == "avg"


def test_torchvision_published_weights_go_through_the_verified_cache(tmp_path, monkeypatch):
    from fastfeat.published import DownloadError, fetch, lookup

    entry = lookup("ResNet18_Weights.IMAGENET1K_V1")
    assert entry.model == "torchvision:resnet18" and entry.file == "resnet18-f37072fd.pth"
    assert (entry.checksum_kind, entry.checksum) == ("sha256-prefix", "f37072fd")
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    monkeypatch.setenv("FASTFEAT_CACHE", str(cache))
    monkeypatch.setenv("FASTFEAT_WEIGHTS_MIRROR", mirror.as_uri())
    with pytest.raises(DownloadError, match="cannot download ResNet18_Weights.IMAGENET1K_V1") as offline:
        fetch(entry, log=lambda line: None)
    assert "\n" not in str(offline.value)
    # A file of the published name whose sha256 does not start with the name's prefix is never cached.
    _, module = _module(get_model("torchvision:resnet18"))
    torch.save(module.state_dict(), mirror / entry.file)
    with pytest.raises(DownloadError, match="sha256|bytes"):
        fetch(entry, log=lambda line: None)
    assert not (cache / "weights" / entry.file).exists()
    with pytest.raises(ConfigError, match="not torchvision:resnet34"):
        from fastfeat.published import check_model

        check_model(entry, "torchvision:resnet34")
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        lookup("ResNet18_Weights.NOPE")


@pytest.mark.slow
def test_ray_run_with_a_torchvision_model_equals_single_process_run(photo_dir, tmp_path):
    ray = pytest.importorskip("ray")
    from helpers import torch_threads

    from fastfeat.cluster import run_on_ray
    from fastfeat.extractor import Extractor

    run = dict(model="torchvision:resnet18", weights="random:6", layers="layer2,flatten", batch_size=2,
               shard_size=3, progress=False, precision="fp32")  # fmt: skip
    with torch_threads(1):  # the worker's count (cpus_per_worker=1)
        Extractor(photo_dir, str(tmp_path / "single"), **run).run()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_on_ray(Extractor(photo_dir, str(tmp_path / "ray"), **run), workers=1, cpus_per_worker=1)
    finally:
        ray.shutdown()
    assert summary["complete"]
    assert read_features(str(tmp_path / "ray")).equals(read_features(str(tmp_path / "single")))


def test_profile_times_each_module_of_a_library_model():
    from fastfeat.profile import profile

    (result,) = profile(model="torchvision:resnet18", batch_sizes="1", repeat=2, warmup=0, precision="fp32",
                        device="cpu", weights="random:0")  # fmt: skip
    rows = {r["name"]: r for r in result["modules"]}
    assert list(rows)[:5] == ["conv1", "bn1", "relu", "maxpool", "layer1.0"] and "(between modules)" in rows
    assert rows["layer4.1"]["shape"] == [512, 7, 7] and rows["fc"]["shape"] == [1000]
    assert all(r["ms_median"] > 0 for n, r in rows.items() if n != "(between modules)")
    assert abs(sum(r["percent"] for r in rows.values()) - 100) < 1
    with pytest.raises(ValueError, match="--backend torch only"):
        profile(model="torchvision:resnet18", backends="compile", batch_sizes="1", repeat=1, device="cpu")
