"""The ahead-of-time kernel library (libfastfeat_kernels.so, built by CMakeLists.txt), through ctypes.

When the library is built, the launchers (conv2d_nhwc, linear, maxpool2d_nhwc, lrn_nhwc) hand every
launch it holds a specialisation for to it, so the triton backend starts with no JIT compilation and no
autotuning: the library runs, per specialisation and GPU, the first config the prune rules keep (what
``FASTFEAT_AUTOTUNE=0`` runs). Anything else -- no library, no CUDA driver, a GPU other than sm_80 /
sm_90, a shape outside the shipped networks, CPU tensors, another output dtype -- JIT-compiles as before.

Where the library is looked for, first hit wins:

* ``$FASTFEAT_NATIVE_LIB`` (a path; ``FASTFEAT_NATIVE=0`` disables the library altogether);
* ``libfastfeat_kernels.so`` next to this module (the CMake build copies it there);

A library built from other kernel sources than these (``kernel_hash`` differs), or for another C ABI
(``ABI_VERSION``), is not used: its cubins would silently run old code. ``describe()`` says which path the
launchers take, and why.

Split-K GEMMs: ``$FASTFEAT_NATIVE_SPLITK_REDUCE`` picks how the library sums the partials, "separate"
(default: a second launch) or "fused" (folded into the GEMM launch; its workspace, with the arrival
counters, is allocated zeroed once per (plan, stream), as the header's contract asks). Both give the same
bits; see ``split_k_reduce``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

from .kernel_list import KERNELS

LIB_NAME = "libfastfeat_kernels.so"
ENV_LIB = "FASTFEAT_NATIVE_LIB"
ENV_ENABLE = "FASTFEAT_NATIVE"
# fastfeat_kernels.h: FASTFEAT_KERNELS_ABI_VERSION and the status codes the launchers act on.
ABI_VERSION = 2
OK = 0
ERR_UNSUPPORTED_SHAPE = 3
ERR_NO_DRIVER = 4
ERR_NO_DEVICE = 5
ERR_NO_CONTEXT = 6
ERR_WRONG_ARCH = 7
ERR_LAUNCH = 8
ERR_OTHER_CONTEXT = 10
# Statuses after which this process stops asking the library (the answer will not change).
_FINAL = (ERR_NO_DRIVER, ERR_NO_DEVICE, ERR_WRONG_ARCH, ERR_OTHER_CONTEXT)
# fastfeat_splitk_reduce: the library's split-K reduces, and the switch that picks one.
SPLIT_K_REDUCE_CODES = {"separate": 0, "fused": 1}
ENV_SPLIT_K_REDUCE = "FASTFEAT_NATIVE_SPLITK_REDUCE"
DEFAULT_SPLIT_K_REDUCE = "separate"
# Bump with the AOT cache format (native/generate.py writes it into the hash).
AOT_FORMAT_VERSION = 1

log = logging.getLogger("fastfeat.kernels")


def kernel_hash() -> str:
    """Hash of what the compiled kernels depend on: each kernel's Triton cache key (its source, the
    @triton.jit functions it calls, the constexpr globals it reads), the Triton version, the AOT format.

    The build names its AOT cache after it and embeds it in the library; a library whose hash differs
    from the running sources is stale and is not used.
    """
    import hashlib
    import importlib

    import triton

    from .triton_compat import jit_function

    h = hashlib.sha256(f"triton={triton.__version__} format={AOT_FORMAT_VERSION}".encode())
    for module, kernel in KERNELS:
        fn = jit_function(getattr(importlib.import_module(f"{__package__}.{module}"), kernel))
        h.update(f"{kernel}={fn.cache_key}".encode())
    return h.hexdigest()[:16]


# -- the C structures of fastfeat_kernels.h ------------------------------------------------------------
class LrnParams(ctypes.Structure):
    _fields_ = [("size", ctypes.c_int), ("alpha", ctypes.c_double), ("beta", ctypes.c_double), ("k", ctypes.c_double)]


def _ints(*names):
    return [(n, ctypes.c_int) for n in names]


class ConvDesc(ctypes.Structure):
    _fields_ = _ints("n", "h", "w", "c_in", "c_out", "groups", "kernel_h", "kernel_w", "stride_h", "stride_w",
                     "pad_h", "pad_w", "relu", "has_bias", "allow_tf32")  # fmt: skip


class PoolDesc(ctypes.Structure):
    _fields_ = _ints("n", "h", "w", "c", "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w",
                     "ceil_mode", "relu", "fuse_lrn") + [("lrn", LrnParams)]  # fmt: skip


class LrnDesc(ctypes.Structure):
    _fields_ = _ints("n", "h", "w", "c") + [("lrn", LrnParams)]


class GemmDesc(ctypes.Structure):
    _fields_ = _ints("m", "n", "k", "w_row_stride", "w_readable_cols", "relu", "has_bias", "allow_tf32",
                     "split_k_reduce")  # fmt: skip


class Plan(ctypes.Structure):
    _fields_ = [("num_launches", ctypes.c_int), ("entry", ctypes.c_int * 2), ("split_k", ctypes.c_int),
                ("workspace_bytes", ctypes.c_size_t), ("counter_bytes", ctypes.c_size_t)]  # fmt: skip


_P = ctypes.c_void_p
_SIGNATURES = {
    "fastfeat_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "fastfeat_build_info": (ctypes.c_char_p, []),
    "fastfeat_kernel_hash": (ctypes.c_char_p, []),
    "fastfeat_abi_version": (ctypes.c_int, []),
    "fastfeat_num_entries": (ctypes.c_int, []),
    "fastfeat_driver_error": (ctypes.c_char_p, []),
    "fastfeat_last_cuda_error": (ctypes.c_int, []),
    "fastfeat_check_device": (ctypes.c_int, [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]),
    "fastfeat_conv2d_plan": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ConvDesc), ctypes.POINTER(Plan)]),
    "fastfeat_maxpool_plan": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(PoolDesc), ctypes.POINTER(Plan)]),
    "fastfeat_lrn_plan": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(LrnDesc), ctypes.POINTER(Plan)]),
    "fastfeat_gemm_plan": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(GemmDesc), ctypes.POINTER(Plan)]),
    "fastfeat_conv2d_output_size": (ctypes.c_int, [ctypes.POINTER(ConvDesc), ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]),
    "fastfeat_maxpool_output_size": (ctypes.c_int, [ctypes.POINTER(PoolDesc), ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]),
    "fastfeat_conv2d_bias_relu": (ctypes.c_int, [_P, ctypes.c_int, ctypes.POINTER(ConvDesc), _P, _P, _P, _P]),
    "fastfeat_maxpool_relu_lrn": (ctypes.c_int, [_P, ctypes.c_int, ctypes.POINTER(PoolDesc), _P, _P]),
    "fastfeat_lrn": (ctypes.c_int, [_P, ctypes.c_int, ctypes.POINTER(LrnDesc), _P, _P]),
    "fastfeat_gemm_bias_relu": (ctypes.c_int, [_P, ctypes.c_int, ctypes.POINTER(GemmDesc), _P, _P, _P, _P, _P, ctypes.c_size_t]),
    "fastfeat_gemm_workspace_bytes": (ctypes.c_int, [ctypes.POINTER(GemmDesc), ctypes.POINTER(ctypes.c_size_t)]),
}  # fmt: skip


def load(path: str) -> ctypes.CDLL:
    """Open the library at ``path`` with every entry point's ctypes signature set (OSError if it cannot)."""
    lib = ctypes.CDLL(path)
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def status_string(lib, status: int) -> str:
    return lib.fastfeat_status_string(status).decode()


# -- the launchers' side ---------------------------------------------------------------------------------
class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.resolved = False
        self.lib = None
        self.path: str | None = None
        self.reason = "not looked for yet"
        self.disabled: str | None = None  # a final status: the library cannot run in this process
        self.refused = False  # a library was found but not used (stale, another Triton): worth a warning
        self.launches = 0
        self.fallbacks: dict[str, int] = {}


_state = _State()


def candidates() -> list[str]:
    """Where the library is looked for, in order."""
    env = os.environ.get(ENV_LIB)
    return [env] if env else [os.path.join(os.path.dirname(os.path.abspath(__file__)), LIB_NAME)]


def _resolve() -> None:
    s = _state
    s.resolved = True
    if os.environ.get(ENV_ENABLE, "1") == "0":
        s.reason = f"disabled by {ENV_ENABLE}=0"
        return
    path = next((p for p in candidates() if os.path.isfile(p)), None)
    if path is None:
        s.reason = f"no {LIB_NAME} (looked in {', '.join(candidates())}; build it with CMake, see docs/native.md)"
        return
    try:
        lib = load(path)
    except (OSError, AttributeError) as e:
        s.reason = f"{path} cannot be loaded: {e}"
        return
    why = refusal(lib, path)
    if why is not None:
        s.reason, s.refused = why, True
        return
    s.lib, s.path = lib, path
    s.reason = f"{path}: {lib.fastfeat_build_info().decode()}"


def built_triton(build_info: str) -> str | None:
    """The Triton version a library was built with, read from its ``fastfeat_build_info()`` line
    ("fastfeat kernels (triton 3.6.0): ..."); None when the line does not say."""
    import re

    found = re.search(r"\(triton ([^)\s]+)\)", build_info)
    return found.group(1) if found else None


def rebuild_recipe(triton_version: str) -> str:
    """How to build the library for ``triton_version`` (docs/native.md has the whole recipe)."""
    return (
        f"rebuild it for triton {triton_version}: pip install --no-deps --target DIR triton=={triton_version}, then "
        "PYTHONPATH=DIR cmake -S . -B build -DPython3_EXECUTABLE=$PWD/.venv/bin/python -DFASTFEAT_AOT_TARGETS=sm90 "
        "&& PYTHONPATH=DIR cmake --build build (see docs/native.md)"
    )


def refusal(lib, path: str, triton_version: str | None = None, current_hash=None) -> str | None:
    """Why the opened library at ``path`` must not be used here (one line), or None when it may.

    Refused: another ABI; a library built for another Triton (its cubins and launch code follow that
    Triton's compiler and cache keys; the message says how to rebuild); one built from other kernel
    sources (``kernel_hash``). ``triton_version`` / ``current_hash``: this process's (defaults: the
    imported Triton, ``kernel_hash``), injectable for tests.
    """
    if lib.fastfeat_abi_version() != ABI_VERSION:
        return f"{path} has ABI version {lib.fastfeat_abi_version()}, this fastfeat needs {ABI_VERSION}: rebuild it"
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    built_for = built_triton(lib.fastfeat_build_info().decode())
    if built_for is not None and built_for != triton_version:
        return f"{path} was built for triton {built_for}, this process runs triton {triton_version}: " + (
            rebuild_recipe(triton_version)
        )
    try:
        current = (current_hash or kernel_hash)()
    except RuntimeError as e:  # kernels built for Triton's interpreter have no compiled form to compare
        return f"{path} cannot be checked against these kernel sources: {e}"
    built = lib.fastfeat_kernel_hash().decode()
    if built != current:
        return f"{path} was built from other kernel sources ({built}, these are {current}): rebuild it"
    return None


def library():
    """The loaded library, or None (``describe()`` says why)."""
    if not _state.resolved:
        with _state.lock:
            if not _state.resolved:
                _resolve()
                (log.warning if _state.refused else log.info)("fastfeat kernels: %s", describe())
    return _state.lib if _state.disabled is None else None


def reset() -> None:
    """Forget the library and the counters: the next launch looks for it again (after an environment change)."""
    global _state
    with _state.lock:
        _state = _State()


def describe() -> str:
    """One line: whether the launchers use the AOT library, where it is, and why not."""
    s = _state
    if not s.resolved:
        return "AOT library not looked for yet (it is on the first GPU launch)"
    if s.lib is None:
        return f"JIT (no AOT library: {s.reason})"
    if s.disabled:
        return f"JIT (AOT library {s.path} unusable here: {s.disabled})"
    falls = sum(s.fallbacks.values())
    return f"AOT library {s.reason} ({s.launches} AOT launches, {falls} JIT fallbacks)"


def stats() -> dict:
    """Counters: AOT launches and JIT fallbacks by reason (for the summary of a run)."""
    return {"library": _state.path if _state.lib is not None and not _state.disabled else None,
            "aot_launches": _state.launches, "jit_fallbacks": dict(_state.fallbacks), "describe": describe()}  # fmt: skip


# torch dtype name -> fastfeat_dtype
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def _library_for(device, dtype):
    """The library when launches on (``device``, ``dtype``) may use it, else None, decided without any
    ctypes work: CPU tensors, the interpreter and dtypes it has no code for never look for it."""
    from .autotune import interpreter_active

    if device.type != "cuda" or str(dtype).replace("torch.", "") not in _DTYPE_CODES or interpreter_active():
        return None
    return library()


def _launch(name: str, device, fn) -> bool:
    """Run ``fn(lib, stream)``; True when the library launched, False to JIT instead."""
    import torch

    lib = _state.lib
    if lib is None or _state.disabled is not None:
        return False
    status = fn(lib, ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream))
    if status == OK:
        _state.launches += 1
        return True
    reason = status_string(lib, status)
    if status == ERR_LAUNCH:
        raise RuntimeError(
            f"{name}: the AOT kernel library failed to launch (CUDA error {lib.fastfeat_last_cuda_error()}): {reason}"
        )
    if status in _FINAL:
        extra = lib.fastfeat_driver_error().decode() if status in (ERR_NO_DRIVER, ERR_NO_DEVICE) else ""
        _state.disabled = reason + (f" ({extra})" if extra else "")
        log.info("fastfeat kernels: %s", describe())
    key = f"{name}: {reason.split(':')[0]}"
    if key not in _state.fallbacks:
        log.info("fastfeat kernels: %s falls back to JIT: %s", name, reason)
    _state.fallbacks[key] = _state.fallbacks.get(key, 0) + 1
    return False


def _ptr(t) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


# -- launch plans: descriptors and fixed pointers built once per shape; None means JIT with no ctypes work --
def conv2d_launcher(x_shape, dtype, packed, bias, out, *, kernel, stride, padding, groups, relu, allow_tf32):
    """``run(x) -> bool`` launching conv2d_nhwc through the library for inputs of ``x_shape``, or None."""
    if out.dtype != dtype or _library_for(out.device, dtype) is None:
        return None
    n, h, w, cin = x_shape
    d = ConvDesc(n, h, w, cin, out.shape[3], groups, *kernel, *stride, *padding, int(relu), int(bias is not None),
                 int(allow_tf32))  # fmt: skip
    code, wp, bp, op = _DTYPE_CODES[str(dtype).replace("torch.", "")], _ptr(packed), _optional_ptr(bias), _ptr(out)
    device = out.device
    return lambda x: _launch(
        "conv2d_nhwc", device, lambda lib, s: lib.fastfeat_conv2d_bias_relu(s, code, d, _ptr(x), wp, bp, op)
    )


def maxpool_launcher(x_shape, dtype, out, *, kernel, stride, padding, ceil_mode, relu, lrn):
    """``run(x) -> bool`` launching maxpool2d_nhwc through the library, or None."""
    if out.dtype != dtype or _library_for(out.device, dtype) is None:
        return None
    n, h, w, c = x_shape
    params = LrnParams(*lrn) if lrn is not None else LrnParams(5, 1e-4, 0.75, 1.0)
    d = PoolDesc(n, h, w, c, *kernel, *stride, *padding, int(ceil_mode), int(relu), int(lrn is not None), params)
    code, op, device = _DTYPE_CODES[str(dtype).replace("torch.", "")], _ptr(out), out.device
    return lambda x: _launch(
        "maxpool2d_nhwc", device, lambda lib, s: lib.fastfeat_maxpool_relu_lrn(s, code, d, _ptr(x), op)
    )


def lrn_launcher(x_shape, dtype, out, *, size, alpha, beta, k):
    """``run(x) -> bool`` launching lrn_nhwc through the library, or None."""
    if out.dtype != dtype or _library_for(out.device, dtype) is None:
        return None
    n, h, w, c = x_shape
    d = LrnDesc(n, h, w, c, LrnParams(size, alpha, beta, k))
    code, op, device = _DTYPE_CODES[str(dtype).replace("torch.", "")], _ptr(out), out.device
    return lambda x: _launch("lrn_nhwc", device, lambda lib, s: lib.fastfeat_lrn(s, code, d, _ptr(x), op))


def split_k_reduce() -> str:
    """The split-K reduce the library runs: ``$FASTFEAT_NATIVE_SPLITK_REDUCE``, "separate" (default) or
    "fused"; ValueError (one line) for anything else. Read when a GEMM is planned."""
    value = os.environ.get(ENV_SPLIT_K_REDUCE, "").strip() or DEFAULT_SPLIT_K_REDUCE
    if value not in SPLIT_K_REDUCE_CODES:
        raise ValueError(f"{ENV_SPLIT_K_REDUCE} must be one of {', '.join(SPLIT_K_REDUCE_CODES)}, got {value!r}")
    return value


def linear_launcher(x_shape, dtype, w_packed, bias, out, *, readable_cols, relu, allow_tf32):
    """``run(x) -> bool`` launching linear through the library (its own split-K choice and the reduce of
    ``split_k_reduce()``), or None.

    The workspace is allocated here for the current stream, and on first use for any other stream: one per
    (plan, stream), so that launches sharing one are ordered. The fused reduce's is allocated zeroed
    (torch.zeros, on the stream that uses it) and never zeroed again: every fused launch leaves its
    counters at zero, and only launches of this plan, on that stream, touch it (the header's contract).
    """
    import torch

    reduce = split_k_reduce()  # a bad value is an error whether or not the library is there
    lib = _library_for(out.device, dtype) if out.dtype == dtype == w_packed.dtype else None
    if lib is None:
        return None
    m, k = x_shape
    d = GemmDesc(m, w_packed.shape[1], k, w_packed.stride(0), readable_cols, int(relu), int(bias is not None),
                 int(allow_tf32), SPLIT_K_REDUCE_CODES[reduce])  # fmt: skip
    need = ctypes.c_size_t(0)
    sized = lib.fastfeat_gemm_workspace_bytes(d, ctypes.byref(need))
    code, wp, bp, op = _DTYPE_CODES[str(dtype).replace("torch.", "")], _ptr(w_packed), _optional_ptr(bias), _ptr(out)
    device = out.device
    fill = torch.zeros if reduce == "fused" else torch.empty
    workspaces: dict[int, ctypes.c_void_p | None] = {}
    keep: list = []  # the workspace tensors, alive as long as this plan

    def workspace(stream: int) -> ctypes.c_void_p | None:
        """This plan's workspace for ``stream``, the current stream (its handle), allocated on first use
        there: the caching allocator ties it to that stream, and the zeroing is ordered before its launches."""
        ptr = workspaces.get(stream)
        if ptr is None and sized == OK and need.value:
            ws = fill(need.value, dtype=torch.uint8, device=device)
            keep.append(ws)
            ptr = workspaces.setdefault(stream, _ptr(ws))
        return ptr

    if sized == OK and need.value:
        workspace(torch.cuda.current_stream(device).cuda_stream)  # now, not later inside a graph capture

    def gemm(lib, s, x):
        if sized != OK:  # the workspace query's status, reported (and counted) as a launch's would be
            return sized
        return lib.fastfeat_gemm_bias_relu(s, code, d, _ptr(x), wp, bp, op, workspace(s.value or 0), need.value)

    return lambda x: _launch("linear", device, lambda lib, s: gemm(lib, s, x))


def _optional_ptr(t) -> ctypes.c_void_p | None:
    return _ptr(t) if t is not None else None


# -- one-off launches (a launcher called directly, not through a plan) ------------------------------------
def conv2d(x, packed, bias, out, *, kernel, stride, padding, groups, relu, allow_tf32) -> bool:
    """conv2d_nhwc through the library; False: not launched (JIT it)."""
    run = conv2d_launcher(tuple(x.shape), x.dtype, packed, bias, out, kernel=kernel, stride=stride, padding=padding,
                          groups=groups, relu=relu, allow_tf32=allow_tf32)  # fmt: skip
    return run is not None and run(x)


def maxpool(x, out, *, kernel, stride, padding, ceil_mode, relu, lrn) -> bool:
    """maxpool2d_nhwc through the library; False: not launched (JIT it)."""
    run = maxpool_launcher(tuple(x.shape), x.dtype, out, kernel=kernel, stride=stride, padding=padding,
                           ceil_mode=ceil_mode, relu=relu, lrn=lrn)  # fmt: skip
    return run is not None and run(x)


def lrn(x, out, *, size, alpha, beta, k) -> bool:
    """lrn_nhwc through the library; False: not launched (JIT it)."""
    run = lrn_launcher(tuple(x.shape), x.dtype, out, size=size, alpha=alpha, beta=beta, k=k)
    return run is not None and run(x)


def linear(x, w_packed, bias, out, *, readable_cols, relu, allow_tf32) -> bool:
    """linear through the library (with its own split-K choice); False: not launched (JIT it)."""
    run = linear_launcher(tuple(x.shape), x.dtype, w_packed, bias, out, readable_cols=readable_cols, relu=relu,
                          allow_tf32=allow_tf32)  # fmt: skip
    return run is not None and run(x)
