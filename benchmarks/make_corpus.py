"""Build an ImageNet-like JPEG corpus from real photos shipped in scikit-image / scikit-learn.

ImageNet's validation JPEGs average about 400×350 pixels and 110 KB at quality ~90.
Each image here is a random crop of a real photo, resized to a random size around
400×350, with mild sensor-like noise (photos from packages are cleaner than camera
JPEGs and would otherwise compress far below ImageNet's size), saved at quality 85–95
with 4:4:4 chroma.  Default settings give a mean of about 100 KB (p10 ~55, p90 ~145).

    python benchmarks/make_corpus.py --out corpus --count 1000
    python benchmarks/make_corpus.py --out large --count 96 --large

``--large``: photos of 2 to 12 megapixels (uniform in megapixels, aspect 4:3 or 3:2, either way
up), as phones and web crawls produce, quality 85-95 with 4:2:0 chroma as cameras write it: the
package photos upscaled with the same sensor-like noise, mean about 2-4 MB a file.
"""

from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
from PIL import Image


def source_photos() -> list[str]:
    """The package photos; where scikit-image / scikit-learn are not installed (the GPU machine), the
    five photos fastfeat ships (fastfeat/samples): a different corpus, recorded by the caller."""
    try:
        import skimage
        import sklearn
    except ImportError:
        samples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastfeat", "samples")
        return sorted(os.path.join(samples, n) for n in os.listdir(samples) if n.endswith(".jpg"))

    sk = os.path.join(os.path.dirname(skimage.__file__), "data")
    sl = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    names = ["astronaut.png", "coffee.png", "rocket.jpg", "chelsea.png", "motorcycle_left.png", "hubble_deep_field.jpg"]
    paths = [os.path.join(sk, n) for n in names] + [os.path.join(sl, n) for n in ("china.jpg", "flower.jpg")]
    return [p for p in paths if os.path.isfile(p)]


def make_corpus(out: str, count: int, seed: int = 0, noise: float = 9.0, subsampling: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in source_photos()]
    os.makedirs(out, exist_ok=True)
    sizes, dims = [], []
    for i in range(count):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        scale = rng.uniform(0.55, 1.0)
        ch, cw = int(h * scale), int(w * scale)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        tw = int(np.clip(rng.normal(400, 70), 200, 640))
        th = int(np.clip(rng.normal(350, 60), 180, 560))
        img = Image.fromarray(src[top : top + ch, left : left + cw]).resize((tw, th), Image.BILINEAR)
        a = np.asarray(img, np.float32) + rng.normal(0, noise, (th, tw, 3))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(85, 96)), subsampling=subsampling)
        label = f"class{i % 10}"
        os.makedirs(os.path.join(out, label), exist_ok=True)
        with open(os.path.join(out, label, f"img_{i:06d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        sizes.append(len(buf.getvalue()))
        dims.append((tw, th))
    stats = {
        "count": count,
        "mean_kb": round(float(np.mean(sizes)) / 1000, 1),
        "p10_kb": round(float(np.percentile(sizes, 10)) / 1000, 1),
        "p90_kb": round(float(np.percentile(sizes, 90)) / 1000, 1),
        "mean_width": round(float(np.mean([d[0] for d in dims])), 1),
        "mean_height": round(float(np.mean([d[1] for d in dims])), 1),
    }
    return stats


def make_large_corpus(out: str, count: int, seed: int = 0, noise: float = 6.0) -> dict:
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in source_photos()]
    os.makedirs(out, exist_ok=True)
    sizes, dims = [], []
    for i in range(count):
        megapixels = rng.uniform(2.0, 12.0)
        aspect = (4 / 3, 3 / 2)[i % 2]
        long = int(np.sqrt(megapixels * 1e6 * aspect))
        short = int(long / aspect)
        tw, th = (long, short) if rng.random() < 0.7 else (short, long)  # most photos are landscape
        img = photos[i % len(photos)].resize((tw, th), Image.BICUBIC)
        a = np.asarray(img, np.int16) + rng.integers(
            -int(noise * 1.7), int(noise * 1.7) + 1, (th, tw, 3), dtype=np.int16
        )
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(85, 96)), subsampling=2)
        label = f"class{i % 10}"
        os.makedirs(os.path.join(out, label), exist_ok=True)
        with open(os.path.join(out, label, f"big_{i:06d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        sizes.append(len(buf.getvalue()))
        dims.append((tw, th))
    return {
        "count": count,
        "kind": "large photos, 2-12 MP",
        "mean_kb": round(float(np.mean(sizes)) / 1000, 1),
        "mean_megapixels": round(float(np.mean([w * h for w, h in dims])) / 1e6, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="corpus")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=9.0, help="std of added noise, in 0..255 pixel units")
    ap.add_argument("--large", action="store_true", help="2-12 megapixel photos instead of ImageNet-like ones")
    args = ap.parse_args()
    if args.large:
        print(json.dumps(make_large_corpus(args.out, args.count, args.seed)))
    else:
        print(json.dumps(make_corpus(args.out, args.count, args.seed, args.noise)))


if __name__ == "__main__":
    main()
