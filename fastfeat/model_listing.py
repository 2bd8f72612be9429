"""``fastfeat models list`` and ``fastfeat models show NAME``: the networks, and every tap of one with its
per-image shape and bytes per image (as stored: --dtype float16 by default)."""

from __future__ import annotations

import math

from .zoo import POOLS, pooled_shape

NAMING = (
    "any torchvision model: --model torchvision:NAME (torchvision.models.list_models(), e.g. torchvision:resnet50); "
    "any timm model: --model timm:NAME (timm.list_models(), e.g. timm:vit_small_patch16_224; pip install "
    "'fastfeat[timm]'); `fastfeat models show NAME` lists its taps"
)


def list_lines() -> list[str]:
    from .models import MODELS

    width = max(map(len, MODELS))
    lines = [f"{name:<{width}}  {spec.description}" for name, spec in MODELS.items()]
    return [*lines, "", NAMING]


def show_rows(name: str, pool: str | None, dtype: str) -> list[dict]:
    """One row per tap: name, shape (under --pool; a zoo model's unpooled map too), bytes per image."""
    from .model_lookup import resolve_model

    spec = resolve_model(name, pool)
    size = 2 if dtype == "float16" else 4
    rows = []
    raw = getattr(spec, "raw_shapes", None) or spec.shapes()
    for tap, shape in spec.shapes().items():
        row = {"name": tap, "shape": list(shape), "bytes_per_image": math.prod(shape) * size}
        if getattr(spec, "is_zoo", False):
            row["map_shape"] = list(raw[tap])
            row["pools"] = [p for p in POOLS if pooled_shape(raw[tap], p) is not None]
            row["default"] = tap in spec.default_layers
        rows.append(row)
    return rows


def format_show(name: str, rows: list[dict], pool: str | None, dtype: str) -> str:
    from .model_lookup import resolve_model

    spec = resolve_model(name, pool)
    head = [f"{spec.name}: {len(rows)} taps; shapes under --pool {getattr(spec, 'pool', 'none')}, bytes per image "
            f"as --dtype {dtype}"]  # fmt: skip
    if getattr(spec, "is_zoo", False):
        pre = spec.preprocess
        head.append(f"preprocessing ({spec.preprocess_source}): shorter side {pre.resize}, centre {pre.crop}², "
                    f"{pre.interpolation}, mean {[round(m / 255, 4) for m in pre.mean]}, "
                    f"std {[round(s / 255, 4) for s in pre.std]}")  # fmt: skip
        from .zoo_table import triton_refusal

        why = triton_refusal(spec)  # None: a layer table the triton kernels run (fastfeat.zoo_table)
        head.append("backends: torch, compile, triton" if why is None else f"backends: torch, compile ({why})")
    width = max(len(r["name"]) for r in rows)
    body = []
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        line = f"{r['name']:<{width}}  {shape:<14} {r['bytes_per_image']:>12,} B"
        if "map_shape" in r:
            line += f"  map {'x'.join(map(str, r['map_shape']))}" + ("  (default)" if r["default"] else "")
        body.append(line)
    return "\n".join(head + body)
