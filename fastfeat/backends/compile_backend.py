"""The ``compile`` backend: the torch backend's forward pass through ``torch.compile`` (Inductor).

On CPU the graph is compiled with *freezing* (weights become constants, so Inductor can pre-pack
them for oneDNN and fold the layout conversions); on CUDA with max-autotune's Triton templates,
the fair opponent of the hand-written ``triton`` backend.  One graph per (requested layers, batch
shape): a run compiles once for its full batches and once for a shard's shorter last batch.

Profiling compiles each op on its own instead (``compiles_each_op``), so every layer keeps its time.

Inductor keeps what it compiled in a disk cache, by default under /tmp (emptied by reboots, often a
tmpfs).  Unless ``$TORCHINDUCTOR_CACHE_DIR`` says otherwise, this backend puts it in fastfeat's cache
(``<cache>/inductor``, see fastfeat.published.cache_dir): AlexNet's first batch at batch 64 on the
2-core Intel Xeon dev box takes 16.2 s with an empty cache and 4.7 s with a filled one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil

import torch

from ..published import cache_dir
from .base import register_backend
from .plan import run_plan
from .torch_backend import TorchNet

# On CUDA, max-autotune searches Triton templates for every conv/GEMM.  No CUDA graphs by default:
# profiling times each op alone, and a graph per op would time a replay the real forward pass never
# does (--compile-mode reduce-overhead or max-autotune asks for them: the fair opponent of
# --cuda-graphs).  On CPU, max-autotune buys little and compiles for minutes; freezing is what pays
# there, and is what runs unless a mode is asked for.
MODES = {"cuda": "max-autotune-no-cudagraphs", "cpu": None}
# The recorded mode of the CPU default (torch.compile's options={"freezing": True}, no mode).
CPU_DEFAULT = "freezing"

NO_CUDA_RUNTIME = "No CUDA runtime is found"


def recorded_mode(backend: str, device_type: str, compile_mode: str | None) -> str | None:
    """The torch.compile mode a run of ``backend`` on ``device_type`` compiles with, as its metadata and
    results record it (None: the backend does not compile)."""
    if backend != CompileNet.name:
        return None
    if compile_mode is not None:
        return compile_mode
    return MODES.get(device_type) or CPU_DEFAULT


class _NoCudaRuntimeFilter(logging.Filter):
    """Drops exactly torch.utils.cpp_extension's "No CUDA runtime is found, using CUDA_HOME=..." warning.

    A CUDA build of torch logs it (logging, not warnings) when Inductor first imports cpp_extension on a
    machine without a GPU: true, but irrelevant to a CPU compile.  Every other record passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(NO_CUDA_RUNTIME))


# On the logger itself (records created there, before any handler), installed before cpp_extension is imported.
_cpp_extension_logger = logging.getLogger("torch.utils.cpp_extension")
if not any(isinstance(f, _NoCudaRuntimeFilter) for f in _cpp_extension_logger.filters):
    _cpp_extension_logger.addFilter(_NoCudaRuntimeFilter())


def _use_fastfeat_inductor_cache() -> None:
    """Inductor's disk cache in fastfeat's cache directory, unless ``$TORCHINDUCTOR_CACHE_DIR`` is set.

    Inductor writes its default into the environment the first time it needs it, so this must run
    before torch._dynamo / torch._inductor are first used in the process."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir(), "inductor"))


@register_backend
class CompileNet(TorchNet):
    name = "compile"
    compiles_on_first_call = True
    compiles_each_op = True  # for fastfeat.profile: time each op compiled on its own
    prepacks_weights = False  # freezing packs the weights itself

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        _use_fastfeat_inductor_cache()  # before dynamo's import, which fixes Inductor's default
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python version"
        if device.type == "cpu":
            # Inductor writes and builds C++ for CPU kernels.
            if not any(c and shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++")):
                return "torch.compile on CPU needs a C++ compiler (g++, clang++ or $CXX)"
        elif importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs the triton package"
        return None

    takes_compile_mode = True  # make_backend passes --compile-mode

    def __init__(self, spec, tensors, device, dtype, compile_mode: str | None = None):
        _use_fastfeat_inductor_cache()
        super().__init__(spec, tensors, device, dtype)
        self._graphs: dict[tuple[str, ...], object] = {}
        self.mode = compile_mode if compile_mode is not None else MODES.get(device.type)
        # torch.compile takes a mode or options, not both: the CPU default is freezing, with no mode.
        self._how = {"mode": self.mode} if self.mode is not None else {"options": {"freezing": True}}

    def compile_op(self, run):
        """torch.compile one callable alone (fullgraph: a graph break is an error, not a silent eager run)."""
        return torch.compile(run, mode=self.mode, dynamic=False, fullgraph=True)

    @torch.inference_mode()
    def forward_intermediates(self, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        key = tuple(names)
        graph = self._graphs.get(key)
        if graph is None:
            ops = self.plan(names)
            graph = torch.compile(lambda t: run_plan(ops, t, names), dynamic=False, fullgraph=True, **self._how)
            self._graphs[key] = graph
        return graph(x)
