"""PASCAL VOC 2007 classification: the devkit's image sets and labels, and its 11-point average precision.

**Files read** (``DEVKIT`` is the ``VOCdevkit/VOC2007`` folder; only ``ImageSets/Main`` is used):

* ``ImageSets/Main/{trainval,test}.txt``: one image id per line (``000005``), the file stem of
  ``JPEGImages/000005.jpg``;
* ``ImageSets/Main/{class}_{trainval,test}.txt``: ``<id> <label>`` per line, label ``1`` (the class
  is in the image), ``-1`` (it is not) or ``0`` ("difficult": only difficult instances of it);
  each must list exactly the ids of its set;
* for C chosen on held-out data: ``ImageSets/Main/{train,val}.txt``, the devkit's own split of
  trainval (disjoint, their union trainval).

**AP** is ``VOCevalcls.m`` of the VOC2007 devkit (``VOCdevkit/VOCcode``), the 11-point interpolated
average precision: images sorted by decreasing score, difficult ones (label 0) removed from the list
(they count neither as true nor as false positives), precision and recall at every cut-off, and AP the
mean over the recall thresholds t = 0, 0.1, ..., 1 of the highest precision at a recall >= t (0 where
none).  The thresholds are ``np.arange(0, 1.1, 0.1)`` as in the Python ports of the devkit
(py-faster-rcnn's ``voc_ap(use_07_metric=True)``), compared in floating point as there.  Equal scores
keep the order of the devkit's list (MATLAB's ``sort`` is stable).  A class with no positive image has
no AP: :func:`eleven_point_ap` raises ``ValueError`` and the evaluation (``fastfeat.voc_eval``) refuses
such a class before any training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import FastfeatError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
LABELS = (-1, 0, 1)  # not present, difficult, present
THRESHOLDS = np.arange(0.0, 1.1, 0.1)  # the 11 recall thresholds, as the Python ports compute them


class VocError(FastfeatError):
    """A devkit that cannot be read, or an output that does not hold its images: one line, exit code 2."""


def eleven_point_ap(scores, labels) -> float:
    """VOC2007's 11-point interpolated AP of ``scores`` (higher: more likely) against ``labels`` (1, -1, 0).

    Difficult images (0) are ignored; ties keep the given order.  ``ValueError`` when no label is 1."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be two equal 1-D arrays")
    if not np.isin(labels, LABELS).all():
        raise ValueError("labels must be 1 (present), -1 (absent) or 0 (difficult)")
    positives = int((labels == 1).sum())
    if positives == 0:
        raise ValueError("no positive image: AP is undefined")
    if np.isnan(scores).any():
        raise ValueError("scores hold NaN")
    ranked = labels[np.argsort(-scores, kind="stable")]
    ranked = ranked[ranked != 0]  # a difficult image repeats the previous (recall, precision) point
    tp = np.cumsum(ranked == 1)
    fp = np.cumsum(ranked == -1)
    recall = tp / positives
    precision = tp / (tp + fp)
    return float(sum(precision[recall >= t].max(initial=0.0) for t in THRESHOLDS) / len(THRESHOLDS))


@dataclass(frozen=True)
class Devkit:
    """The image sets (``sets["trainval"]``: ids in file order) and ``labels[cls][set]``: an int8 array
    aligned with ``sets[set]`` (sets trainval and test; train and val are parts of trainval)."""

    root: str
    classes: tuple[str, ...]
    sets: dict[str, list[str]]
    labels: dict[str, dict[str, np.ndarray]]


def _main(root: str, name: str) -> str:
    return os.path.join(root, "ImageSets", "Main", name)


def _lines(root: str, name: str) -> list[str]:
    path = _main(root, name)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise VocError(f"--devkit {root}: no ImageSets/Main/{name} (give the VOCdevkit/VOC2007 folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VocError(f"--devkit {root}: cannot read ImageSets/Main/{name}: {exc}") from None


def read_set(root: str, name: str) -> list[str]:
    """The ids of ``ImageSets/Main/<name>.txt``, in file order; an id listed twice is an error."""
    ids = [line.split()[0] for line in _lines(root, f"{name}.txt")]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise VocError(f"--devkit {root}: ImageSets/Main/{name}.txt lists {twice[0]} twice")
    return ids


def read_labels(root: str, cls: str, set_name: str, ids: list[str]) -> np.ndarray:
    """``{cls}_{set_name}.txt`` as labels aligned with ``ids`` (the set's ids); it must list exactly them."""
    name = f"{cls}_{set_name}.txt"
    by_id: dict[str, int] = {}
    for n, line in enumerate(_lines(root, name), 1):
        parts = line.split()
        try:
            label = int(parts[1]) if len(parts) == 2 else None
        except ValueError:
            label = None
        if label not in LABELS:
            raise VocError(f"--devkit {root}: ImageSets/Main/{name} line {n}: expected '<id> <1|-1|0>', got {line!r}")
        if parts[0] in by_id:
            raise VocError(f"--devkit {root}: ImageSets/Main/{name} lists {parts[0]} twice")
        by_id[parts[0]] = label
    missing = [i for i in ids if i not in by_id]
    extra = sorted(set(by_id) - set(ids))
    if missing or extra:
        what = f"lacks {len(missing)} id(s) of {set_name}.txt, e.g. {missing[0]}" if missing else (
            f"lists {len(extra)} id(s) not in {set_name}.txt, e.g. {extra[0]}"
        )  # fmt: skip
        raise VocError(f"--devkit {root}: ImageSets/Main/{name} {what}")
    return np.array([by_id[i] for i in ids], dtype=np.int8)


def parse_classes(value: str | None) -> tuple[str, ...]:
    """``--classes``: None -> the 20 VOC classes; else a comma-separated subset of them, in VOC order."""
    if value is None:
        return VOC_CLASSES
    names = [c.strip() for c in value.split(",") if c.strip()]
    unknown = [c for c in names if c not in VOC_CLASSES]
    if not names or unknown:
        raise VocError(f"--classes: unknown class {unknown[0] if unknown else '(none given)'}; VOC's are {', '.join(VOC_CLASSES)}")  # fmt: skip
    return tuple(c for c in VOC_CLASSES if c in names)


def read_devkit(root: str, classes: tuple[str, ...] = VOC_CLASSES, train_val: bool = True) -> Devkit:
    """Read and check the devkit's files (see the module); ``train_val``: also train.txt and val.txt."""
    if not os.path.isdir(root):
        raise VocError(f"--devkit {root}: no such folder")
    sets = {name: read_set(root, name) for name in ("trainval", "test")}
    shared = set(sets["trainval"]) & set(sets["test"])
    if shared:
        raise VocError(f"--devkit {root}: {len(shared)} id(s) in both trainval.txt and test.txt, e.g. {min(shared)}")
    if train_val:
        sets["train"], sets["val"] = read_set(root, "train"), read_set(root, "val")
        if set(sets["train"]) & set(sets["val"]) or set(sets["train"]) | set(sets["val"]) != set(sets["trainval"]):
            raise VocError(f"--devkit {root}: train.txt and val.txt must split trainval.txt (disjoint, union trainval)")
    labels = {cls: {s: read_labels(root, cls, s, sets[s]) for s in ("trainval", "test")} for cls in classes}
    return Devkit(root=root, classes=tuple(classes), sets=sets, labels=labels)


__all__ = [
    "LABELS",
    "THRESHOLDS",
    "VOC_CLASSES",
    "Devkit",
    "VocError",
    "eleven_point_ap",
    "parse_classes",
    "read_devkit",
]
