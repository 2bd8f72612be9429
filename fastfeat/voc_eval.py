"""``fastfeat eval voc``: PASCAL VOC 2007 classification of an extract output, as Chatfield et al. (2014).

Protocol, for each class of the devkit (read by :mod:`fastfeat.voc`):

1. features: the output's rows of ``layer``, matched to the devkit's image ids by file stem; each row
   scaled to unit L2 norm (Chatfield et al. L2-normalise their CNN features), then, per fit, the
   probe's standardisation (``fastfeat.probe_scaling``: centred on the fitted rows' mean, divided by
   one scalar), which makes C mean the same whatever the layer's scale;
2. a linear one-vs-rest SVM (the probe's ``svm``: squared hinge, L2-regularised, bias penalised, as
   liblinear's ``LinearSVC``) with the class's positives (label 1) against its negatives (-1);
   difficult images (0) are left out of training, as they are out of the AP;
3. ``C auto``: for each C of the probe's grid an SVM fitted on the devkit's ``train`` set is scored
   on its ``val`` set by 11-point AP; the best C (ties: the smaller) is kept, per class, as
   Chatfield et al. choose C on VOC's validation set; a fixed ``C`` skips this;
4. the SVM is refitted on all of ``trainval`` with that C and ranks the ``test`` images: the class's
   AP is :func:`fastfeat.voc.eleven_point_ap` (VOC2007's 11-point AP, difficult ignored); mAP is the
   mean over the classes.

A class without a positive (or without a negative) in a set it is trained or scored on is refused
before any fit: its AP is undefined.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from .caveats import RANDOM_WEIGHTS_NOTE, is_random_weights
from .data import DataError, Shards
from .probe import C_GRID, ProbeError, SklearnEngine, choose_engine, not_converged_warning, parse_c
from .probe_scaling import STANDARDIZE
from .voc import VOC_CLASSES, Devkit, VocError, eleven_point_ap, read_devkit

ENGINES = ("auto", "sklearn", "torch")


def _layer(shards: Shards, path: str, layer: str | None) -> str:
    if layer is None:
        if len(shards.layer_dims) != 1:
            raise VocError(f"{path} holds layers {', '.join(shards.layer_dims)}: choose one with --layer")
        return next(iter(shards.layer_dims))
    try:
        shards.check_layers(layer)
    except DataError as exc:
        raise VocError(str(exc)) from None
    return layer


def rows_by_stem(shards: Shards, path: str) -> dict[str, int]:
    """{file stem: global row number} of every row of the output (reads only the id column)."""
    out: dict[str, int] = {}
    at = 0
    for unit in shards.units:
        for id_ in shards.read(unit, [], ids=True)["id"].to_pylist():
            stem = os.path.splitext(os.path.basename(id_))[0]
            if stem in out:
                raise VocError(f"{path} holds two images named {stem}: names must be unique")
            out[stem] = at
            at += 1
    return out


def _check_class(devkit: Devkit, cls: str, auto: bool) -> None:
    """Every set the class is fitted or scored on needs a positive (and a fit also a negative)."""
    trainval, test = devkit.labels[cls]["trainval"], devkit.labels[cls]["test"]
    checks = [("trainval", trainval, True), ("test", test, False)]
    if auto:
        in_set = {i: k for k, i in enumerate(devkit.sets["trainval"])}
        for part in ("train", "val"):
            labels = trainval[[in_set[i] for i in devkit.sets[part]]]
            checks.append((part, labels, part == "train"))
    for name, labels, fitted in checks:
        if not (labels == 1).any() or (fitted and not (labels == -1).any()):
            need = "a positive and a negative" if fitted else "a positive"
            raise VocError(f"class {cls} has no {'positive' if not (labels == 1).any() else 'negative'} image in "
                           f"{name} (it needs {need} there); leave it out with --classes")  # fmt: skip


def evaluate(
    path: str, devkit: str, layer: str | None = None, classes: tuple[str, ...] = VOC_CLASSES, c="auto",
    engine: str = "auto", device: str = "auto", log: Callable[[str], None] | None = None,
) -> dict:  # fmt: skip
    """Run the protocol (see the module) on the output ``path``; returns the report (what ``--json`` writes)."""
    started = time.perf_counter()
    if engine not in ENGINES:
        raise VocError(f"unknown --engine {engine!r}; choose from {', '.join(ENGINES)}")
    try:
        fixed_c = parse_c(c)
    except ProbeError as exc:
        raise VocError(str(exc)) from None
    kit = read_devkit(devkit, classes, train_val=fixed_c is None)
    for cls in kit.classes:
        _check_class(kit, cls, fixed_c is None)
    try:
        shards = Shards(path)
    except DataError as exc:
        raise VocError(str(exc)) from None
    layer = _layer(shards, path, layer)
    stems = rows_by_stem(shards, path)
    missing = [i for s in ("trainval", "test") for i in kit.sets[s] if i not in stems]
    if missing:
        raise VocError(f"{path} lacks {len(missing)} image(s) of the devkit's trainval/test, e.g. {missing[0]}")
    rows = {s: np.array([stems[i] for i in ids], dtype=np.int64) for s, ids in kit.sets.items()}
    trainval_at = {i: k for k, i in enumerate(kit.sets["trainval"])}
    part_at = {s: np.array([trainval_at[i] for i in kit.sets[s]], np.int64) for s in ("train", "val") if s in kit.sets}
    needed = np.unique(np.concatenate([rows["trainval"], rows["test"]]))
    chosen = choose_engine(engine, len(needed), shards.layer_dims[layer])
    codes = np.full(shards.num_rows, -1, np.int64)
    if chosen == "sklearn":
        try:
            eng = SklearnEngine(path, layer, "svm", True, needed)
        except ProbeError as exc:
            raise VocError(str(exc)) from None
    else:
        from .probe_torch import TorchEngine

        eng = TorchEngine(path, layer, "svm", True, 2, codes, device=device)
    say = log or (lambda _line: None)
    per_class = []
    for k, cls in enumerate(kit.classes):
        trainval, test = kit.labels[cls]["trainval"], kit.labels[cls]["test"]
        codes[:] = -1
        codes[rows["trainval"]] = np.where(trainval == 1, 1, np.where(trainval == -1, 0, -1))
        if chosen == "torch":
            eng.set_codes(codes)
        grid = {}
        if fixed_c is None:
            fit_rows = rows["train"][trainval[part_at["train"]] != 0]
            warm = None
            for c_try in C_GRID:
                warm = eng.fit(fit_rows, codes[fit_rows], c_try, warm)
                grid[c_try] = eleven_point_ap(eng.positive_score(warm, rows["val"]), trainval[part_at["val"]])
            best = max(grid.values())
            c_used = min(c_try for c_try, ap in grid.items() if ap == best)
        else:
            c_used = fixed_c
        fit_rows = rows["trainval"][trainval != 0]
        model = eng.fit(fit_rows, codes[fit_rows], c_used)
        ap = eleven_point_ap(eng.positive_score(model, rows["test"]), test)
        per_class.append({
            "class": cls, "AP": ap, "C": c_used, "val_AP": {str(c_): v for c_, v in grid.items()} or None,
            "train_positives": int((trainval == 1).sum()), "train_negatives": int((trainval == -1).sum()),
            "test_positives": int((test == 1).sum()), "test_difficult": int((test == 0).sum()),
        })  # fmt: skip
        say(f"{cls} ({k + 1}/{len(kit.classes)}): C={c_used:g} AP {ap:.2%}")
    metadata = shards.metadata
    warnings = [not_converged_warning(eng.not_converged)] if eng.not_converged else []
    warnings += [RANDOM_WEIGHTS_NOTE] if is_random_weights(metadata.get("weights")) else []
    if kit.classes != VOC_CLASSES:
        warnings.append(f"{len(kit.classes)} of VOC's 20 classes: the mAP is not comparable with published ones")
    return {
        "dir": os.path.abspath(path), "devkit": os.path.abspath(devkit), "layer": layer,
        "model": metadata.get("model"), "weights": metadata.get("weights"), "augment": metadata.get("augment"),
        "classifier": "svm", "engine": chosen, "C": "auto" if fixed_c is None else fixed_c,
        "C_grid": list(C_GRID) if fixed_c is None else None, "C_chosen_on": "train -> val, per class" if fixed_c is None else None,  # fmt: skip
        "l2_normalize": True, "standardize": STANDARDIZE, "ap": "VOC2007 11-point interpolated, difficult ignored",
        "trainval": len(kit.sets["trainval"]), "test": len(kit.sets["test"]), "classes": list(kit.classes),
        "mAP": float(np.mean([r["AP"] for r in per_class])), "per_class": per_class,
        "not_converged_fits": eng.not_converged, "warnings": warnings,
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip


def format_report(r: dict) -> str:
    lines = [
        f"{r['dir']}  {r['layer']} ({r['model']})  VOC2007: {r['trainval']} trainval, {r['test']} test images",
        f"one-vs-rest linear SVM via {r['engine']}, C {r['C']}{' (chosen per class on train -> val)' if r['C'] == 'auto' else ''}, "  # fmt: skip
        "L2-normalised rows; 11-point AP, difficult ignored",
        "",
        f"{'class':<12}  {'AP':>7}  {'C':>8}  {'test +':>6}",
    ]
    for row in r["per_class"]:
        lines.append(f"{row['class']:<12}  {row['AP']:>7.2%}  {row['C']:>8g}  {row['test_positives']:>6}")
    lines.append(f"{'mAP':<12}  {r['mAP']:>7.2%}")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


__all__ = ["evaluate", "format_report", "rows_by_stem"]
