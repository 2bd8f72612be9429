"""Read MatConvNet SimpleNN model files (``imagenet-vgg-f.mat``, ``-m``, ``-s``, ``-m-2048``, ...) with
``scipy.io.loadmat``: the learned filters as a state dict, and the mean image of their normalisation block.

Layout, as vlfeat/matconvnet utils/import-caffe.py writes it (the converter of the published files):

* ``layers`` is a cell array of structs with ``name`` and ``type``; a ``conv`` layer carries its filters as
  ``weights{1}`` (kh × kw × in × out) and ``weights{2}`` (the biases) from beta16 on, or as the fields
  ``filters`` / ``biases`` in the older files.  A fully connected layer is a ``conv`` whose filter covers
  the whole input map (H × W × C × out, written with ``reshape(..., order='F')`` from Caffe's C×H×W blob), so
  both kinds become a torch weight by ``transpose(3, 2, 0, 1)`` (and a flatten for the fully connected ones).
* The mean is ``normalization.averageImage`` (older files) or ``meta.normalization.averageImage`` (beta16
  on): an H × W × 3 image, or 3 values, in RGB.
* The filters expect RGB input: import-caffe.py flips BVLC (BGR) models' conv1 to RGB and keeps the
  deep_eval release (``--caffe-variant=vgg-caffe``), which is RGB already.  For a model whose spec reads BGR,
  conv1's input channels are flipped here, so the same preprocessing serves the Caffe and MatConvNet weights.

MATLAB v7.3 files (HDF5) are not readable by scipy: one-line error.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import FastfeatError
from .layers import Conv, Linear
from .models import ModelSpec


class MatConvNetError(FastfeatError):
    pass


def _load(path: str) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except NotImplementedError:  # scipy's answer to a v7.3 (HDF5) file
        raise MatConvNetError(f"{path} is a MATLAB v7.3 (HDF5) file; save it with save(..., '-v7') first") from None
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... for a bad file
        raise MatConvNetError(f"cannot read {path} as a MATLAB file: {str(exc).splitlines()[0]}") from None


def _as_list(value) -> list:
    """A cell array as a list (squeeze_me turns a 1-element cell into the element itself)."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return list(value.ravel())
    return [value]


def _conv_params(layer) -> tuple[np.ndarray, np.ndarray] | None:
    """(filters, biases) of a conv layer in either layout, None for a layer without weights."""
    if getattr(layer, "type", None) != "conv":
        return None
    if hasattr(layer, "weights"):
        cells = _as_list(layer.weights)
        if len(cells) != 2:
            raise MatConvNetError(
                f"layer {getattr(layer, 'name', '?')!r}: weights has {len(cells)} entries, expected 2"
            )
        return np.asarray(cells[0], np.float32), np.asarray(cells[1], np.float32)
    if hasattr(layer, "filters") and hasattr(layer, "biases"):
        return np.asarray(layer.filters, np.float32), np.asarray(layer.biases, np.float32)
    return None


def read_matconvnet(path: str, spec: ModelSpec) -> dict[str, np.ndarray]:
    """``{"<key>.weight": array, "<key>.bias": array}`` in torch layout for ``spec``; MatConvNetError when the
    file's conv layers do not match the spec's layers with weights one for one."""
    mat = _load(path)
    if "layers" not in mat:
        raise MatConvNetError(f"{path}: no 'layers' variable: not a MatConvNet SimpleNN model")
    found = [(getattr(layer, "name", f"#{i + 1}"), p) for i, layer in enumerate(_as_list(mat["layers"]))
             if (p := _conv_params(layer)) is not None]  # fmt: skip
    wanted = [layer for layer in spec.layers if isinstance(layer, (Conv, Linear))]
    if len(found) != len(wanted):
        raise MatConvNetError(
            f"{path}: {len(found)} conv layers with weights, model {spec.name!r} has {len(wanted)} "
            f"({', '.join(layer.name for layer in wanted)})"
        )
    inputs = spec.input_shapes()
    out: dict[str, np.ndarray] = {}
    for (mat_name, (filters, biases)), layer in zip(found, wanted, strict=True):
        cin = inputs[layer.name]
        if isinstance(layer, Conv):
            cin_g = cin[0] // layer.groups
            mcn_shape = (layer.kernel, layer.kernel, cin_g, layer.out)
        else:  # a fully connected layer: one filter over the whole C×H×W (or F) input
            c, h, w = cin if len(cin) == 3 else (cin[0], 1, 1)
            mcn_shape = (h, w, c, layer.out)
        if filters.size != math.prod(mcn_shape) or biases.size != layer.out:
            raise MatConvNetError(
                f"{path}: layer {mat_name!r} has {filters.size:,} filter and {biases.size:,} bias values, "
                f"{spec.name} {layer.name} expects {mcn_shape} and {layer.out}"
            )
        # squeeze_me dropped singleton dimensions only: the values keep their logical order.
        weight = filters.reshape(mcn_shape).transpose(3, 2, 0, 1)
        if isinstance(layer, Linear):
            weight = weight.reshape(layer.out, -1)
        elif layer is wanted[0] and spec.preprocess.channel_order == "BGR":
            weight = weight[:, ::-1]  # RGB filters for BGR input
        out[f"{layer.param_key}.weight"] = np.ascontiguousarray(weight)
        out[f"{layer.param_key}.bias"] = biases.reshape(layer.out)
    return out


def read_matconvnet_mean(path: str) -> np.ndarray:
    """The ``averageImage`` of the file's normalisation block: H×W×3 or (3,), float32, RGB."""
    mat = _load(path)
    norm = mat.get("normalization")
    if norm is None and "meta" in mat:
        norm = getattr(mat["meta"], "normalization", None)
    average = getattr(norm, "averageImage", None) if norm is not None else None
    if average is None:
        raise MatConvNetError(f"{path}: no normalization.averageImage nor meta.normalization.averageImage")
    average = np.asarray(average, np.float32)
    if average.size == 3:
        return average.reshape(3)
    if average.ndim != 3 or average.shape[2] != 3:
        raise MatConvNetError(f"{path}: averageImage has shape {average.shape}, expected H×W×3 or 3 values")
    return average
