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


def open_on_gpu(arch=None, sms=None):
    """``(device, library)`` for a GPU test: the built library made the triton backend's (ENV_LIB), loaded
    in a current CUDA context, its device check passed (``arch``/``sms``: optional ``ctypes.c_int`` the
    check fills). None, after printing why, where there is no CUDA GPU or the library refuses it."""
    import ctypes

    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU")
        return None
    from fastfeat.kernels import native

    os.environ[native.ENV_LIB] = library_path()
    dev = torch.device("cuda")
    torch.zeros(1, device=dev)  # a current context for the library
    lib = native.load(library_path())
    refs = [ctypes.byref(v) if v is not None else None for v in (arch, sms)]
    status = lib.fastfeat_check_device(*refs)
    if status != native.OK:
        print(f"skipped: {native.status_string(lib, status)}")
        return None
    return dev, lib
