"""The one adapter through which fastfeat.kernels reaches Triton's private, unstable APIs.

The ahead-of-time compile check (``fastfeat.kernels.aot``) has to do what Triton does inside
``JITFunction.run`` without launching anything: unwrap autotuners, specialise arguments, ask an
autotuner's prune hook which configs it keeps, and compile for a GPU target that is not present. None
of that is public API; every such call is in this module, so a Triton upgrade is checked (and, if
needed, fixed) here alone. Checked against triton 3.8.0 (``CHECKED_TRITON_VERSIONS``), whose internals
used here are:

* ``triton._C.libtriton.native_specialize_impl(backend, arg, is_const, specialize, align)``
  -> ``(type, attr, ...)``, and ``triton.backends.compiler.BaseBackend.parse_attr``;
* ``triton.runtime.jit.JITFunction`` (``params``: ``KernelParam`` with ``name``, ``is_constexpr``,
  ``is_const``, ``has_default``, ``default``, ``do_not_specialize``, ``do_not_specialize_on_alignment``;
  ``arg_names``) and ``triton.runtime.jit.MockTensor`` (a 16-byte-aligned tensor of a dtype);
* ``triton.runtime.autotuner.Autotuner`` (``configs``, ``early_config_prune``; wrappers such as
  ``Heuristics`` expose the wrapped kernel as ``fn``), ``triton.Config`` (``kwargs``, ``num_warps``,
  ``num_stages``);
* ``triton.compiler.ASTSource(fn, signature, constexprs, attrs)``,
  ``triton.backends.compiler.GPUTarget("cuda", arch, warp_size)``, ``triton.compile(src, target=,
  options=)`` and the compiled kernel's ``metadata.shared`` and ``asm["ptx"]``;
* ``triton.knobs``: ``cache.dir``, ``nvidia.dump_ptxas_log`` (ptxas -v output printed to stdout),
  ``compilation.always_compile``;
* the defaults of ``triton.backends.nvidia.compiler.CUDAOptions`` (``DEFAULT_NUM_WARPS``,
  ``DEFAULT_NUM_STAGES``) and its launch options (``LAUNCH_OPTIONS``).

With another Triton, ``unchecked_version_message`` says so (``warn_if_unchecked`` turns it into a
warning); the check may still work, but its results have not been validated there.

Nothing here imports triton at module import time: the caller decides when triton is imported (after
TRITON_INTERPRET is settled, since ``@triton.jit`` under the interpreter builds uncompilable kernels).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

# The Triton versions this adapter was checked against (the full compile check ran clean with them).
CHECKED_TRITON_VERSIONS = ("3.8.0",)
# Launch options a kernel call may carry besides its arguments (fields of triton's CUDAOptions).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# CUDAOptions' defaults for launches that do not set them.
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3
# Threads per warp of an NVIDIA GPUTarget.
CUDA_WARP_SIZE = 32


# -- version ----------------------------------------------------------------------------------------
def triton_version() -> str:
    import triton

    return triton.__version__


def unchecked_version_message(version: str | None = None) -> str | None:
    """Why the running (or the given) Triton is not one this adapter was checked against, or None."""
    version = triton_version() if version is None else version
    release = version.split("+")[0]  # local builds (3.8.0+git1234) count as their release
    if release in CHECKED_TRITON_VERSIONS:
        return None
    return (
        f"triton {version} is not among the versions fastfeat.kernels.triton_compat was checked against "
        f"({', '.join(CHECKED_TRITON_VERSIONS)}); the compile check relies on Triton internals and may "
        "fail or mis-report with it"
    )


def warn_if_unchecked() -> str | None:
    """Issue a RuntimeWarning when the running Triton is unchecked; returns the message (or None)."""
    message = unchecked_version_message()
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return message


# -- kernels, autotuners and configs ----------------------------------------------------------------
def jit_function(kernel):
    """The compilable ``JITFunction`` under ``kernel`` (an autotuner, heuristics, or the function itself)."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise RuntimeError(
                f"{kernel!r} is not a compilable JITFunction (was triton imported with TRITON_INTERPRET=1?)"
            )
        fn = fn.fn
    return fn


def arg_names(fn) -> list[str]:
    """The positional parameter names of a ``JITFunction``."""
    return list(fn.arg_names)


def is_autotuner(kernel) -> bool:
    from triton.runtime.autotuner import Autotuner

    return isinstance(kernel, Autotuner)


def autotune_configs(autotuner) -> list:
    """Every config of an autotuner's list, before pruning."""
    return list(autotuner.configs)


def early_prune(autotuner, named_args: dict, kwargs: dict) -> list:
    """The configs the autotuner's ``early_config_prune`` hook keeps for this call (all without a hook).

    The hook sees whatever the caller has arranged (device limits, ...) at the time of the call.
    """
    if autotuner.early_config_prune is None:
        return list(autotuner.configs)
    return autotuner.early_config_prune(autotuner.configs, dict(named_args), **kwargs)


def config_fields(config) -> tuple[dict, int, int]:
    """(kwargs, num_warps, num_stages) of a ``triton.Config``."""
    return dict(config.kwargs), config.num_warps, config.num_stages


# -- specialisation, as JITFunction.run does it ---------------------------------------------------
def mock_tensor(dtype):
    """A stand-in tensor argument of ``dtype`` (16-byte aligned, as torch's allocations are)."""
    from triton.runtime.jit import MockTensor

    return MockTensor(dtype)


def specialise(fn, bound: dict, as_arg=lambda value: value) -> tuple[dict, dict, dict]:
    """(signature, constexprs by name, attrs by (index,)) of a launch of ``fn`` with the values ``bound``.

    Exactly as ``JITFunction.run``: constexprs, ints equal to 1 (and None) folded to constexprs,
    16-divisibility of ints and pointers. Parameters missing from ``bound`` take their defaults (and
    are added to it). ``as_arg`` maps a value to what the specialiser sees (e.g. a ``mock_tensor``).
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name not in bound:
            if not p.has_default:
                raise ValueError(f"{fn.__name__}: no value for argument {p.name}")
            bound[p.name] = p.default
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        ty, attr = native_specialize_impl(
            BaseBackend, as_arg(value), p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )[:2]
        signature[p.name] = ty
        if ty == "constexpr":  # an int equal to 1 (or None) is folded, as at run time
            constexprs[p.name] = value
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


# -- compiling for a GPU target without a GPU -------------------------------------------------------
def configure_compiler(cache_dir: str) -> None:
    """Compile into ``cache_dir``, always (a cache hit skips ptxas), printing ptxas -v to stdout."""
    from triton import knobs

    knobs.cache.dir = cache_dir
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output is printed; compile_for_cuda captures it
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its register report


def compile_for_cuda(
    fn, signature: dict, constexprs: dict, attrs: dict, arch: int, options: dict[str, Any] | None = None
) -> tuple[int, str, str]:
    """Compile ``fn`` for ``sm_<arch>`` with triton's bundled ptxas; (shared memory bytes, captured stdout,
    the PTX text).

    The captured stdout holds the ptxas -v report once ``configure_compiler`` ran (and, when ptxas
    fails, the PTX it printed). Compiler errors propagate.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, CUDA_WARP_SIZE), options=options)
    return int(compiled.metadata.shared), log.getvalue(), compiled.asm["ptx"]


# -- ahead-of-time C sources (the native library, native/generate.py) -------------------------------
# Kernel scalar types -> the C types of the launcher's parameters. Triton's own map
# (``triton.backends.nvidia.driver.ty_to_cpp``) says "double" for fp32 scalars: its JIT launcher parses
# Python floats as double and narrows them itself, but an AOT launcher hands cuLaunchKernel a pointer to
# the C value, so a double would pass its low 4 bytes as the kernel's fp32 argument.
_AOT_C_TYPES = {"i1": "int8_t", "i8": "int8_t", "i16": "int16_t", "i32": "int32_t", "i64": "int64_t",
                "u1": "uint8_t", "u8": "uint8_t", "u16": "uint16_t", "u32": "uint32_t", "u64": "uint64_t",
                "fp32": "float", "f32": "float", "fp64": "double"}  # fmt: skip


def aot_c_type(ty: str) -> str:
    """The C type of a kernel argument of Triton type ``ty`` in an AOT launcher (pointers: CUdeviceptr)."""
    if ty.startswith("*"):
        return "CUdeviceptr"
    if ty not in _AOT_C_TYPES:
        raise ValueError(f"no AOT C type for kernel argument type {ty!r}")
    return _AOT_C_TYPES[ty]


def constexpr_params(fn) -> list[str]:
    """Names of the parameters of ``fn`` declared ``tl.constexpr`` (not those folded because they equal 1)."""
    return [p.name for p in fn.params if p.is_constexpr]


def aot_templates() -> dict[str, str]:
    """The texts of Triton's AOT templates for CUDA (``triton/tools/extra/cuda``): compile.c, compile.h, link.h.

    ``triton.tools.compile`` fills compile.c/compile.h for one specialisation; ``triton.tools.link``
    reads the ``tt-linker`` lines of the headers and writes one dispatcher per kernel.
    """
    import pathlib

    import triton.tools

    root = pathlib.Path(triton.tools.__file__).parent / "extra" / "cuda"
    return {name: (root / name).read_text() for name in ("compile.c", "compile.h", "link.h")}


def compile_binary(fn, signature: dict, constexprs: dict, attrs: dict, arch: int, options: dict) -> dict:
    """Compile ``fn`` for ``sm_<arch>``; the cubin and the launch metadata an AOT launcher needs.

    Returns {"cubin": bytes, "name": kernel symbol, "shared": bytes of shared memory, "global_scratch":
    bytes, "profile_scratch": bytes}; compiler errors propagate.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature, constexprs, attrs)
    with contextlib.redirect_stdout(io.StringIO()):  # ptxas -v output, when configure_compiler asked for it
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, CUDA_WARP_SIZE), options=options)
    meta = compiled.metadata
    return {
        "cubin": compiled.asm["cubin"],
        "name": meta.name,
        "shared": int(meta.shared),
        "global_scratch": int(getattr(meta, "global_scratch_size", 0) or 0),
        "profile_scratch": int(getattr(meta, "profile_scratch_size", 0) or 0),
    }
