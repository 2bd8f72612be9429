"""Read OverFeat's released weights: headerless float32 files (``net_weight_0`` for the fast network,
``net_weight_1`` for the accurate one, from ``overfeat-weights.tgz``).

Layout (jhjin/overfeat-torch run.lua, whose ParamBank offsets these follow; sermanet/OverFeat
src/overfeat.cpp ``load_tensor`` reads the same file with fread of native floats): for each layer with
weights, in order, the weight as out × in × kh × kw, then the bias (out).  The fully connected layers are
convolutions over the whole input map, so their weight is out × C × H × W, which is the C×H×W flatten of a
linear layer as is.  x86's native byte order, little-endian, is assumed.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import FastfeatError
from .models import ModelSpec

# The models whose weights come as these raw files; a file named otherwise than .pth/.safetensors/
# .caffemodel/.mat is read as one for them.
RAW_FLOAT32_MODELS = {"overfeat-fast": "net_weight_0", "overfeat-accurate": "net_weight_1"}


class OverFeatError(FastfeatError):
    pass


def expected_bytes(spec: ModelSpec) -> int:
    return 4 * sum(math.prod(shape) for shape in spec.param_shapes().values())


def read_overfeat(path: str, spec: ModelSpec) -> dict[str, np.ndarray]:
    """``{"<key>.weight": array, "<key>.bias": array}``; the file's size is checked against the layer table
    before a value is read."""
    size, want = os.path.getsize(path), expected_bytes(spec)
    if size != want:
        hint = RAW_FLOAT32_MODELS.get(spec.name, "a raw float32 file")
        raise OverFeatError(
            f"{path} has {size:,} bytes; {spec.name}'s layer table needs {want:,} (float32 weights and biases "
            f"layer by layer, OverFeat's {hint})"
        )
    values = np.memmap(path, dtype="<f4", mode="r")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for key, shape in spec.param_shapes().items():  # layer order: weight, then bias
        n = math.prod(shape)
        out[key] = np.array(values[offset : offset + n]).reshape(shape)
        offset += n
    del values
    return out
