"""A backend's forward pass as a list of ops, shared by extraction and profiling.

An op computes one layer, or several fused layers (the triton backend runs
conv+ReLU as one kernel, for instance).  ``covers`` names the layers an op
computes, in order; the op's output is the output of the last of them.  A backend
never fuses past a requested layer, so every requested layer is some op's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Op:
    name: str  # "conv1", or "conv1+relu1" for a fused op
    kind: str  # the kind of the op's first layer: conv, relu, pool, norm or fc
    covers: tuple[str, ...]
    run: Callable[[torch.Tensor], torch.Tensor]


def fused_name(covers) -> str:
    return "+".join(covers)


def run_plan(ops: list[Op], x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    wanted = set(names)
    out: dict[str, torch.Tensor] = {}
    for op in ops:
        x = op.run(x)
        if op.covers[-1] in wanted:
            out[op.covers[-1]] = x
    missing = wanted - set(out)
    if missing:  # a backend fused past a requested layer: a bug, not a user error
        raise RuntimeError(f"plan does not produce requested layers {sorted(missing)}")
    return out
