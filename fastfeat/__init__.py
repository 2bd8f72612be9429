"""fastfeat: fast, exactly-once bulk CNN feature extraction (DeCAF, CaffeNet, AlexNet)."""

from . import samples  # (light: the folder of the sample photos, fastfeat.samples.path())
from .version import __version__


def extract(source: str, out: str, **kwargs) -> dict:
    """Extract features of ``source`` into shards in ``out``; see fastfeat.extractor.Extractor."""
    from .extractor import extract as _extract

    return _extract(source, out, **kwargs)


__all__ = ["__version__", "extract", "samples"]
