"""Run the benchmark scripts from a source checkout where fastfeat is not installed (a lent GPU machine)."""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_importable() -> None:
    """``fastfeat`` and ``fastfeat.kernels`` (kernels/ at the top level) from this checkout, if not installed."""
    try:
        import fastfeat.kernels  # noqa: F401

        return
    except ImportError:
        pass
    sys.path.insert(0, ROOT)
    import fastfeat

    spec = importlib.util.spec_from_file_location(
        "fastfeat.kernels", os.path.join(ROOT, "kernels", "__init__.py"),
        submodule_search_locations=[os.path.join(ROOT, "kernels")],
    )  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastfeat.kernels"] = module
    spec.loader.exec_module(module)
    fastfeat.kernels = module
