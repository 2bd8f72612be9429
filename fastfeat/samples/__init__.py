"""A few freely licensed photos shipped with fastfeat, for a first run with nothing at hand.

``fastfeat extract --sample --out feats/ --weights caffenet-imagenet`` extracts them (or, from
Python, ``fastfeat.extract(fastfeat.samples.path(), "feats/", weights=...)``).  Five small JPEGs
(about 115 KB in all; the shorter side is 256 pixels, one is greyscale), downsized from
scikit-image's public-domain and CC0 sample photos; the licence of each is in LICENSES.md beside them.
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))
LICENSES = os.path.join(DIR, "LICENSES.md")


def path() -> str:
    """The folder of the sample photos (a source for ``fastfeat extract``: ids are the file names)."""
    return DIR


def files() -> list[str]:
    """The sample photos' paths, sorted."""
    return sorted(os.path.join(DIR, f) for f in os.listdir(DIR) if f.endswith(".jpg"))


__all__ = ["DIR", "LICENSES", "files", "path"]
