"""Shared fixtures: real photos shipped inside installed packages, datasets built from them."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py, tests/helpers.py

# Before anything imports triton: the interpreter on CPU-only machines, exact bf16 (see the module).
from helpers import jpeg_bytes  # noqa: E402
from triton_interpreter import interpreter_bf16_fix  # noqa: E402, F401


def _photo_paths() -> list[str]:
    import skimage
    import sklearn

    sk = os.path.join(os.path.dirname(skimage.__file__), "data")
    sl = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    names = [os.path.join(sk, f) for f in ("astronaut.png", "coffee.png", "rocket.jpg", "chelsea.png", "camera.png")]
    names += [os.path.join(sl, f) for f in ("china.jpg", "flower.jpg")]
    return [p for p in names if os.path.isfile(p)]


@pytest.fixture(scope="session")
def photos() -> list[str]:
    paths = _photo_paths()
    if len(paths) < 5:
        pytest.skip("scikit-image / scikit-learn sample photos are not installed")
    return paths


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, photos) -> str:
    """A labelled folder: cat/ and dog/ subfolders plus one unlabelled root image.

    Mixes real PNGs and JPEGs with generated JPEGs (several qualities), a greyscale
    JPEG and an RGBA PNG.
    """
    root = tmp_path_factory.mktemp("dataset")
    (root / "cat").mkdir()
    (root / "dog").mkdir()
    for i, p in enumerate(photos):
        dst = root / ("cat" if i % 2 == 0 else "dog") / os.path.basename(p)
        shutil.copy(p, dst)
        img = Image.open(p).convert("RGB")
        (root / ("dog" if i % 2 == 0 else "cat") / f"gen_{i}_q{80 + 3 * i}.jpg").write_bytes(
            jpeg_bytes(img.resize((img.width * 3 // 4, img.height * 3 // 4)), quality=80 + 3 * i)
        )
    first = Image.open(photos[0])
    (root / "grey.jpg").write_bytes(jpeg_bytes(first.convert("L")))
    first.convert("RGBA").save(root / "cat" / "alpha.png")
    return str(root)


@pytest.fixture(scope="session")
def corrupt_dataset(tmp_path_factory, photos) -> str:
    """Good photos with a truncated JPEG and a text file named .jpg in between."""
    root = tmp_path_factory.mktemp("corrupt")
    good = [p for p in photos if p.endswith((".jpg", ".png"))][:4]
    for i, p in enumerate(good):
        shutil.copy(p, root / f"{i * 2:02d}_{os.path.basename(p)}")
    jpg = next(p for p in photos if p.endswith(".jpg"))
    data = open(jpg, "rb").read()
    (root / "01_truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "03_text.jpg").write_bytes(b"this is not an image\n" * 20)
    return str(root)


@pytest.fixture(scope="session")
def clean_copy(tmp_path_factory, corrupt_dataset) -> str:
    """The corrupt dataset minus its bad files, with the same ids for the good ones."""
    root = tmp_path_factory.mktemp("clean")
    for name in sorted(os.listdir(corrupt_dataset)):
        if name not in ("01_truncated.jpg", "03_text.jpg"):
            shutil.copy(os.path.join(corrupt_dataset, name), root / name)
    return str(root)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto's server, a subprocess on 127.0.0.1) with an empty bucket.

    Yields a tests/s3_server.py ``S3Endpoint``: ``uri(*parts)`` -> ``s3://bucket/...``, ``prefix()`` a
    fresh key prefix, ``env`` the AWS_* variables, ``keys(prefix)``, ``upload_tree(folder, prefix)``,
    ``client()`` (boto3).  The AWS_* variables are set in os.environ for the rest of the session, so
    subprocesses (CLI runs, local Ray workers) reach the server too."""
    import s3_server

    proc, endpoint = s3_server.start()
    saved = {k: os.environ.get(k) for k in endpoint.env}
    os.environ.update(endpoint.env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3_server.stop(proc, endpoint)


@pytest.fixture(scope="session", autouse=True)
def _random_weights_made_once():
    """``random:SEED`` weights of a built-in network are a pure function of its parameter shapes and the
    seed, and cost ~0.8 s for CaffeNet on 2 cores, paid by every in-process extract: each set is made
    once per session and every caller gets its own copy (a caller may pack or modify its tensors)."""
    from collections import OrderedDict

    import fastfeat.weights as weights

    made: OrderedDict = OrderedDict()  # the last few sets only: VGG-16's is 550 MB
    make = weights.random_weights

    def made_once(spec, seed: int):
        if getattr(spec, "is_zoo", False):  # the library's own initialisation, cheap for the small test models
            return make(spec, seed)
        key = (seed, tuple(spec.param_shapes().items()))
        if key not in made:
            made[key] = make(spec, seed)
            while len(made) > 4:
                made.popitem(last=False)
        made.move_to_end(key)
        return {name: t.clone() for name, t in made[key].items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "random_weights", made_once)
        yield
