"""The torch-free modules stay torch-free: the read stage, ``--mean-file`` and printing must not load
torch or DALI (the Ray driver and the server print through fastfeat.console)."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = ["fastfeat.header", "fastfeat.means", "fastfeat.console", "fastfeat.sources", "fastfeat.augment"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch_or_dali(module):
    # A None entry in sys.modules makes any import of that name raise ImportError.
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['nvidia'] = None\n"
        f"import {module}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nvidia') and sys.modules[m])\n"
        "assert not loaded, loaded\n"
        "assert 'fastfeat.decode' not in sys.modules, 'fastfeat.decode was imported'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_augment_reads_a_mean_file_without_decode(tmp_path):
    """augment.py <-> decode.py was a cycle (load_mean): the views' mean now comes from fastfeat.means."""
    import numpy as np

    np.save(tmp_path / "mean.npy", np.full((3, 256, 256), 110, np.float32))
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['nvidia'] = None\n"
        "from fastfeat.augment import augmented_mean, get_views\n"
        "from fastfeat.models import get_model\n"
        f"mean = augmented_mean({str(tmp_path / 'mean.npy')!r}, get_model('caffenet').preprocess, get_views('5crop'))\n"
        "assert mean.shape == (5, 227, 227, 3), mean.shape\n"
        "assert 'fastfeat.decode' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_old_import_paths_still_work():
    """Public names keep their old homes (fastfeat.decode, fastfeat.output, fastfeat.sources)."""
    from fastfeat import decode, header, means, output, sources
    from fastfeat.console import console
    from fastfeat.output import manifest, transaction, verification
    from fastfeat.sources import items, reader

    assert decode.load_mean is means.load_mean and decode.read_image is header.read_image
    assert decode.console is console and decode.geometry is header.geometry
    assert output.OutputDir is manifest.OutputDir and output.ShardTransaction is transaction.ShardTransaction
    assert output.verify is verification.verify
    assert sources.Item is items.Item and sources.ItemReader is reader.ItemReader
