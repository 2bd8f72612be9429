"""A small labelled image set whose classes CNN features separate even with random weights.

Class k is "crops of photo k": random windows (a fifth to a half of the photo's shorter side, at a
random place, mirrored half the time) of one real photo shipped with scikit-image/scikit-learn,
resized to 128×128 and saved as JPEG.  The classes differ in colour and texture statistics, as
real categories do, but no two images of a class are the same pixels, so a probe has to generalise
from the training crops to unseen ones (and the corner crops of ``--augment`` see new content).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

SIZE = 128


def make_crop_classes(root: str, photos: list[str], per_class: int, seed: int = 0) -> list[str]:
    """Write ``root/<photo stem>/<i>.jpg`` for every photo; returns the class names."""
    rng = np.random.default_rng(seed)
    classes = []
    for path in photos:
        name = os.path.splitext(os.path.basename(path))[0]
        classes.append(name)
        os.makedirs(os.path.join(root, name), exist_ok=True)
        img = Image.open(path).convert("RGB")
        short = min(img.size)
        for i in range(per_class):
            side = int(short * rng.uniform(0.2, 0.5))
            x, y = rng.integers(0, img.width - side + 1), rng.integers(0, img.height - side + 1)
            crop = img.crop((int(x), int(y), int(x) + side, int(y) + side)).resize((SIZE, SIZE), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(os.path.join(root, name, f"{i:03d}.jpg"), quality=int(rng.integers(75, 95)))
    return classes
