"""Load model weights from user-supplied files, or seeded random weights.

Weights come from ``.pth`` (torchvision-style state dict, loaded with
``torch.load(weights_only=True)``), ``.safetensors``, BVLC ``.caffemodel`` (see
fastfeat.caffemodel), MatConvNet ``.mat`` (fastfeat.matconvnet), OverFeat's raw float32
``net_weight_0``/``net_weight_1`` for the OverFeat models (fastfeat.overfeat), a published name such as ``caffenet-imagenet`` (downloaded once,
checked and cached by fastfeat.published, then read by the same readers), or
``random:SEED`` for tests and benchmarks, which is labelled as such in every output's metadata.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .caffemodel import CaffeModelError, read_caffemodel
from .checksum import file_sha256
from .errors import FastfeatError
from .matconvnet import MatConvNetError, read_matconvnet
from .models import ModelSpec
from .overfeat import RAW_FLOAT32_MODELS, OverFeatError, read_overfeat
from .published import WEIGHTS_CHOICES
from .published import resolve as resolve_published


class WeightsError(FastfeatError):
    pass


@dataclass
class Weights:
    tensors: dict[str, torch.Tensor]  # state-dict key -> fp32 tensor, validated against the spec
    sha256: str
    source: str  # the file path, or "random:SEED"

    @property
    def is_random(self) -> bool:
        return self.source.startswith("random:")


def random_weights(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """He-initialised weights (std sqrt(2/fan_in)), small positive biases, from one seed.

    The scale keeps activations O(1) through every layer so that random-weight
    features are realistic inputs for benchmarks and precision tests.
    """
    if getattr(spec, "is_zoo", False):  # a torchvision/timm model: the library's own initialisation
        return spec.random_state(seed)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in spec.param_shapes().items():
        if key.endswith(".weight"):
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
        else:
            out[key] = torch.rand(shape, generator=gen) * 0.1
    return out


SAVE_A_STATE_DICT = "save model.state_dict() with torch.save and pass that file"

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # pickle protocol 2 + torch's legacy magic number (a long)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_REJECTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def _load_torch_file(path: str):
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code."""
    with warnings.catch_warnings():
        # Any pickle that torch.save did not write warns about its protocol before it fails; our error says it all.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def _explain_torch_load_error(path: str, exc: BaseException) -> str:
    """What the file is and what to do, in one line: never torch's advice to load it unsafely."""
    text = _ANSI.sub("", str(exc))
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    again = f"copy it again, or {SAVE_A_STATE_DICT}"
    if not head:
        return f"the file is empty; {SAVE_A_STATE_DICT}"
    if (m := _REJECTED_GLOBAL.search(text)) is not None:
        name = m.group(1)
        if name.split(".")[0] == "numpy":
            return f"it holds numpy arrays ({name}), not torch tensors; {SAVE_A_STATE_DICT}"
        return (
            f"it is a pickled Python object ({name}), e.g. a whole model saved with torch.save(model), "
            f"not a state dict of tensors (fastfeat loads tensors only); {SAVE_A_STATE_DICT}"
        )
    if head == _ZIP_MAGIC:
        if "central directory" in text or "failed reading" in text:
            return f"it is a truncated or damaged PyTorch file (its zip archive cannot be read); {again}"
        return f"it is a zip archive but not one written by torch.save; {SAVE_A_STATE_DICT}"
    if head.startswith(_LEGACY_MAGIC):
        return f"it is a truncated or damaged PyTorch file (legacy format); {again}"
    if head[:1] == b"\x80":  # pickle's PROTO opcode: a pickle, but not one torch.save wrote
        return f"it is a Python pickle, not a PyTorch weights file; {SAVE_A_STATE_DICT}"
    return f"it is not a PyTorch weights file (nor, by its name, .safetensors or .caffemodel); {SAVE_A_STATE_DICT}"


TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
NAMED_EXTENSIONS = (*TORCH_EXTENSIONS, ".safetensors", ".caffemodel", ".mat")


def _read_state_dict(path: str, spec: ModelSpec) -> dict[str, torch.Tensor]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".mat":  # MatConvNet (fastfeat.matconvnet)
        return {k: torch.from_numpy(v) for k, v in read_matconvnet(path, spec).items()}
    if spec.name in RAW_FLOAT32_MODELS and ext not in NAMED_EXTENSIONS:  # OverFeat's net_weight_0/1
        return {k: torch.from_numpy(v) for k, v in read_overfeat(path, spec).items()}
    if ext == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # safetensors raises SafetensorError, OSError... for a damaged file
            raise WeightsError(f"cannot read weights {path}: not a whole .safetensors file ({exc})") from None
    if ext == ".caffemodel":
        with open(path, "rb") as f:
            return {k: torch.from_numpy(np.array(v)) for k, v in read_caffemodel(f.read()).items()}
    try:
        obj = _load_torch_file(path)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError... for a bad file
        raise WeightsError(f"cannot read weights {path}: {_explain_torch_load_error(path, exc)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}; {SAVE_A_STATE_DICT}")
    return obj


def validate_state_dict(spec: ModelSpec, state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Check keys and shapes; returns fp32 contiguous tensors keyed as the spec expects."""
    expected = spec.param_shapes()
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(
            f"{origin}: missing key {missing[0]!r} for model {spec.name!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise WeightsError(f"{origin}: unexpected key {unexpected[0]!r} for model {spec.name!r}")
    out = {}
    for key, shape in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{origin}: key {key!r} is not a tensor")
        if tuple(t.shape) != shape:
            # Caffe's legacy blobs store fc weights as 1×1×out×in: accept any view with the same values.
            if t.numel() == math.prod(shape) and [d for d in t.shape if d != 1] == [d for d in shape if d != 1]:
                t = t.reshape(shape)
            else:
                raise WeightsError(
                    f"{origin}: key {key!r} has shape {tuple(t.shape)}, model {spec.name!r} expects {shape}"
                )
        # Integer buffers (BatchNorm's num_batches_tracked) keep their dtype.
        floating = t.is_floating_point()
        out[key] = t.detach().to(torch.float32 if floating else t.dtype).contiguous()
    return out


def load_weights(spec: ModelSpec, source: str) -> Weights:
    """Load ``source`` (a file path, a published name or ``random:SEED``) for ``spec``; raises WeightsError
    (or, for a published name that cannot be fetched, published.DownloadError) with one line."""
    if source.startswith("random:"):
        seed_text = source.split(":", 1)[1]
        if not seed_text.isdigit():
            raise WeightsError(f"bad weights {source!r}: expected random:SEED with an integer seed")
        tensors = random_weights(spec, int(seed_text))
        h = hashlib.sha256()
        for key in sorted(tensors):
            h.update(key.encode())
            h.update(tensors[key].numpy())  # the array's buffer, not a 240 MB tobytes() copy (same bytes)
        return Weights(tensors, h.hexdigest(), source)
    name, published = source, resolve_published(source, spec.name)
    if published is not None:  # a registered name: its checked cached file, downloaded first if needed
        source = published[0]
    if not os.path.isfile(source):
        raise WeightsError(f"weights file not found: {source} ({WEIGHTS_CHOICES})")
    try:
        state = _read_state_dict(source, spec)
    except WeightsError:
        raise
    except (MatConvNetError, OverFeatError) as exc:  # already one line naming the file
        raise WeightsError(str(exc)) from None
    except (CaffeModelError, Exception) as exc:  # torch/safetensors raise many types for a bad file
        text = _ANSI.sub("", str(exc)).strip()
        msg = text.splitlines()[0] if text else type(exc).__name__
        raise WeightsError(f"cannot read weights {source}: {msg}") from None
    if published is not None:
        return Weights(validate_state_dict(spec, state, source), published[1], name)
    return Weights(validate_state_dict(spec, state, source), file_sha256(source), os.path.abspath(source))
