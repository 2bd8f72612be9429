"""Load model weights from user-supplied files, or seeded random weights.

Nothing is downloaded: weights come from ``.pth`` (torchvision-style state dict,
loaded with ``torch.load(weights_only=True)``), ``.safetensors``, BVLC
``.caffemodel`` (see fastfeat.caffemodel), or ``random:SEED`` for tests and
benchmarks, which is labelled as such in every output's metadata.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .caffemodel import CaffeModelError, read_caffemodel
from .checksum import file_sha256
from .models import ModelSpec


class WeightsError(ValueError):
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
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in spec.param_shapes().items():
        if key.endswith(".weight"):
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
        else:
            out[key] = torch.rand(shape, generator=gen) * 0.1
    return out


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if ext == ".caffemodel":
        with open(path, "rb") as f:
            return {k: torch.from_numpy(np.array(v)) for k, v in read_caffemodel(f.read()).items()}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
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
        out[key] = t.detach().to(torch.float32).contiguous()
    return out


def load_weights(spec: ModelSpec, source: str) -> Weights:
    """Load ``source`` (a file path or ``random:SEED``) for ``spec``; raises WeightsError with one line."""
    if source.startswith("random:"):
        seed_text = source.split(":", 1)[1]
        if not seed_text.isdigit():
            raise WeightsError(f"bad weights {source!r}: expected random:SEED with an integer seed")
        tensors = random_weights(spec, int(seed_text))
        h = hashlib.sha256()
        for key in sorted(tensors):
            h.update(key.encode())
            h.update(tensors[key].numpy().tobytes())
        return Weights(tensors, h.hexdigest(), source)
    if not os.path.isfile(source):
        raise WeightsError(f"weights file not found: {source}")
    try:
        state = _read_state_dict(source)
    except WeightsError:
        raise
    except (CaffeModelError, Exception) as exc:  # torch/safetensors raise many types for a bad file
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read weights {source}: {msg}") from None
    return Weights(validate_state_dict(spec, state, source), file_sha256(source), os.path.abspath(source))
