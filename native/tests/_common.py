"""Shared by the native ctest scripts: the built library and its entry list (set by CMakeLists.txt)."""

from __future__ import annotations

import json
import os
import sys

# ctest's "skipped" status (SKIP_RETURN_CODE in CMakeLists.txt), as automake's test drivers read it.
EXIT_SKIP = 77


def library_path() -> str:
    path = os.environ.get("FASTFEAT_NATIVE_LIB")
    if not path or not os.path.isfile(path):
        sys.exit(f"FASTFEAT_NATIVE_LIB={path!r} is not a file: run through ctest (CMakeLists.txt sets it)")
    return path


def entries() -> dict:
    path = os.environ.get("FASTFEAT_NATIVE_ENTRIES")
    if not path or not os.path.isfile(path):
        sys.exit(f"FASTFEAT_NATIVE_ENTRIES={path!r} is not a file: run through ctest (CMakeLists.txt sets it)")
    with open(path) as f:
        return json.load(f)
