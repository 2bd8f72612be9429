"""torchvision's published weights by their own names (``--weights ResNet50_Weights.IMAGENET1K_V2``) as
entries of fastfeat.published (which builds its PublishedWeights from the fields returned here), so they go through the same verified cache: torchvision names every file
``<name>-<first hex digits of its sha256>.pth`` (torch.hub checks that prefix; so does fastfeat) and
publishes its size in MiB (``meta["_file_size"]``); ``$FASTFEAT_WEIGHTS_MIRROR`` replaces the origin.

timm's hub files by name (``timm:ARCH.TAG``) are fastfeat.hub_weights: timm's configurations carry no
checksum, so the sha256 and size come from the hub's own API.
"""

from __future__ import annotations

import re
from functools import lru_cache

_TORCHVISION_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")
_HASHED_FILE = re.compile(r"-([0-9a-f]{8,})\.pth$")


def is_torchvision_weights_name(source: str | None) -> bool:
    return bool(source) and bool(_TORCHVISION_NAME.match(source))


@lru_cache(maxsize=64)
def torchvision_entry(source: str) -> dict | None:
    """The PublishedWeights fields for ``ResNet50_Weights.IMAGENET1K_V2`` (any torchvision weights enum member), or None when
    ``source`` is not one; ValueError (one line) for a name torchvision does not know or a file without a
    hash in its name."""
    if not is_torchvision_weights_name(source):
        return None
    import torchvision.models as tvm

    try:
        weights = tvm.get_weight(source)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"unknown torchvision weights {source!r} (see torchvision.models.get_model_weights)") from None
    archs = [a for a in tvm.list_models() if tvm.get_model_weights(a) is type(weights)]
    file = weights.url.rsplit("/", 1)[-1]
    digest = _HASHED_FILE.search(file)
    size_mib = weights.meta.get("_file_size")
    if digest is None or size_mib is None:
        raise ValueError(f"torchvision weights {source}: {file} carries no sha256 prefix or size to check")
    return dict(
        name=source,
        model=f"torchvision:{archs[0]}" if archs else "torchvision:?",
        url=weights.url,
        file=file,
        checksum_kind="sha256-prefix",
        checksum=digest.group(1),
        size=None,
        size_mib=float(size_mib),
        published_in=f"torchvision {source} (url, _file_size; the sha256 prefix is the file name's suffix)",
    )
