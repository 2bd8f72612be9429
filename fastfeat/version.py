"""fastfeat's version: a leaf module, so that what records it (metadata, summaries, the User-Agent) need
not import the package's ``__init__`` (whose lazy ``extract`` would close an import cycle)."""

__version__ = "0.1.0"  # as pyproject.toml's [project] version
