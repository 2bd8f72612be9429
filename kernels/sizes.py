"""Output-size arithmetic of the kernels, without Triton: the model specs share it (fastfeat.layers)."""

from __future__ import annotations


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution (floor mode, as in Caffe and torch)."""
    return (size + 2 * padding - kernel) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Max-pool output size with torch/Caffe rounding: in ceil mode the last window must start inside
    the input or its left/top padding, never in the right/bottom padding."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out
