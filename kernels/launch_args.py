"""Argument checks and output allocation shared by the kernel launchers.

Every check raises ValueError with a readable message (never ``assert``): these run on user input.
"""

from __future__ import annotations

import contextlib

import torch

from .autotune import SUPPORTED_DTYPES, interpreter_active


def check_kernel_tensor(name: str, t, *, ndim: int, dtypes=SUPPORTED_DTYPES, contiguous: bool = True) -> None:
    """Validate a launcher argument: a tensor of the given rank and dtype, contiguous (unless told
    otherwise: see ``check_row_major``), on a usable device.

    Raises ValueError (never asserts) so that callers get a readable message.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {names}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() once, outside the hot loop)")
    check_kernel_device(name, t.device)


def check_kernel_device(name: str, device: torch.device) -> None:
    """ValueError unless the kernels can run on ``device``: CUDA, or a CPU under the interpreter."""
    if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
        return
    raise ValueError(
        f"{name} is on {device}; the triton kernels need a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1)"
    )


def check_input(name: str, shape: tuple, dtype: torch.dtype, device: torch.device, *, ndim: int) -> None:
    """A planned launch's input, known by shape, dtype and device only (the plan checks the tensor itself
    once per forward pass): the rank, a dtype the kernels store, a usable device."""
    if len(shape) != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(shape)}")
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise ValueError(f"{name} has dtype {dtype}; supported: {names}")
    check_kernel_device(name, device)


class Launch:
    """A launch planned for one input shape: every check done and the output allocated when it was made.

    ``launch(x)`` runs it on an input of that shape, dtype and device (contiguous) and returns ``out``, the
    same tensor every call: the caller owns the ordering (the next call overwrites it).
    """

    __slots__ = ("out", "_run")

    def __init__(self, out: torch.Tensor, run):
        self.out, self._run = out, run

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._run(x)
        return self.out


def run_on_device(launch: Launch, x: torch.Tensor) -> torch.Tensor:
    """``launch(x)`` with x's GPU as the current device: Triton launches on the current device and stream
    (see ``on_tensor_device``). For the one-call launchers; a planned forward pass sets the device once."""
    with on_tensor_device(x):
        return launch(x)


def nothing(x) -> None:
    """The run of a launch with nothing to compute (an empty output)."""


def aot_or_jit(out: torch.Tensor, aot, jit, args: tuple, consts: dict) -> Launch:
    """The launch of a one-kernel op: the AOT library's launcher ``aot`` (None when the library is not
    built or lacks the specialisation) where it takes the call, else ``jit(x, *args, **consts)``."""

    def run(x):
        if aot is None or not aot(x):
            jit(x, *args, **consts)

    return Launch(out, run)


def check_row_major(name: str, t, *, cols: int) -> None:
    """Validate a 2-D operand whose rows may be padded: unit column stride, row stride >= ``cols``.

    ``pack_linear_weight`` pads each row of W^T to a multiple of 16 elements and returns the [K, N] view,
    so that every row starts 16-element aligned and the kernel's weight loads are vectorised.
    """
    if t.stride(1) != 1 or t.stride(0) < cols or (t.shape[0] > 1 and t.stride(0) == 0):
        raise ValueError(
            f"{name} must be row-major with contiguous rows (strides (>= {cols}, 1)), got strides {t.stride()}; "
            "pack it with pack_linear_weight"
        )


def on_tensor_device(t: torch.Tensor):
    """A context that makes ``t``'s GPU the current CUDA device (nothing for a CPU tensor).

    Triton launches on torch's *current* device and that device's current stream, not on the device of
    the tensors it is given: a kernel called with cuda:1 tensors while cuda:0 is current runs on GPU 0
    with GPU-1 pointers ("Pointer argument cannot be accessed from Triton"), or, with peer access on,
    races on GPU 0's stream. torch's own ops switch devices this way for every call; the launchers do too.
    """
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def check_same_device(device: torch.device | None = None, **tensors) -> None:
    """Raise ValueError unless every given tensor (None entries skipped) lives on one device (``device``,
    when given: a planned launch's input device)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if device is not None:
        devices["x"] = device
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def output_buffer(out, *, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new output tensor, or the caller's ``out`` once it is checked to fit exactly."""
    if out is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    check_out(out, shape=shape, dtype=dtype, device=device)
    return out


def check_out(out, *, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """Validate a caller-provided output buffer."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected {dtype}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, expected {device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def int_pair(name: str, v) -> tuple[int, int]:
    """An int or a pair of ints as (h, w); ValueError otherwise (bools are rejected)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        return int(v[0]), int(v[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def resolve_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    """``out_dtype`` or ``default``; raises ValueError for dtypes the kernels cannot store."""
    dtype = default if out_dtype is None else out_dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"out_dtype {dtype} is not supported; use float32, float16 or bfloat16")
    return dtype


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: exact fp32 ("ieee") unless tf32 is asked for; irrelevant for 16-bit."""
    if dtype == torch.float32 and not allow_tf32:
        return "ieee"
    return "tf32"
