"""fastfeat: fast, exactly-once bulk CNN feature extraction (DeCAF, CaffeNet, AlexNet)."""

__version__ = "0.1.0"

from . import samples  # noqa: E402  (light: the folder of the sample photos, fastfeat.samples.path())


def extract(source: str, out: str, **kwargs) -> dict:
    """Extract features of ``source`` into shards in ``out``; see fastfeat.extractor.Extractor."""
    from .extractor import extract as _extract

    return _extract(source, out, **kwargs)


__all__ = ["__version__", "extract", "samples"]
