"""Ground truth of the image-retrieval benchmarks, read from their own released formats.

Images are matched by file stem (``all_souls_000013``), so an extract's ids may carry folders and
any extension.  Every reader returns a :class:`GroundTruth`: the database stems (None: every row of
the output) and, per query, its stem, crop box (or None) and its ``ok`` / ``junk`` stems (revisited
sets: ``easy`` / ``hard`` / ``junk``).

* **holidays** (INRIA Holidays, Jégou et al. 2008): no file; groups by name, ``XXXXYY.jpg`` is in
  group XXXX and ``XXXX00`` is its query, the rest of the group its positives.  The query itself is
  left out of its ranking, as ``eval_holidays.py`` does (declared junk here, which is the same).
* **oxford5k / paris6k** (Philbin et al. 2007/2008): ``--gt`` is the folder of ``*_query.txt``
  (``oxc1_all_souls_000013 136.5 34.1 648.5 955.7``: image and crop box x1 y1 x2 y2) and
  ``*_good.txt``, ``*_ok.txt``, ``*_junk.txt``; positives are good + ok, junk is ignored.
* **roxford5k / rparis6k** (Radenović et al. 2018): ``--gt`` is ``gnd_roxford5k.pkl``
  (``{"imlist", "qimlist", "gnd": [{"bbx", "easy", "hard", "junk"}]}``), read by a pickle reader
  that refuses every global (class or function), so no code in the file can run: plain dicts,
  lists, strings and numbers only (a file holding numpy arrays is refused; convert it once to JSON
  with the same keys, which ``--gt file.json`` accepts).  Indices are into ``imlist``.
* **ukbench** (Nistér & Stewénius 2006): no file; ``ukbenchNNNNN`` is in group NNNNN // 4, every
  image is a query and its group of 4 (itself included) the positives.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pickle
import re
from dataclasses import dataclass, field

from .errors import FastfeatError

DATASETS = ("holidays", "oxford5k", "paris6k", "roxford5k", "rparis6k", "ukbench")
NEEDS_GT = ("oxford5k", "paris6k", "roxford5k", "rparis6k")
MAX_GT_BYTES = 64 << 20  # a revisited gnd file is ~1 MB


class GroundTruthError(FastfeatError):
    """Ground truth that cannot be read or does not match the output: one line, exit code 2."""


@dataclass
class Query:
    name: str
    bbx: tuple[float, float, float, float] | None = None
    lists: dict[str, list[str]] = field(default_factory=dict)  # ok/junk, or easy/hard/junk


@dataclass
class GroundTruth:
    dataset: str
    queries: list[Query]
    database: list[str] | None = None  # stems; None: every row
    exclude_query: bool = False  # Holidays: the query is not ranked against itself


def stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def read(dataset: str, gt: str | None, names: list[str]) -> GroundTruth:
    """The ground truth of ``dataset``; ``names``, the stems of the output's rows (holidays, ukbench)."""
    if dataset not in DATASETS:
        raise GroundTruthError(f"unknown --dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if dataset in NEEDS_GT and not gt:
        raise GroundTruthError(f"--dataset {dataset} needs --gt (its ground-truth {'folder' if dataset in ('oxford5k', 'paris6k') else 'file'})")  # fmt: skip
    if dataset == "holidays":
        return _holidays(names)
    if dataset == "ukbench":
        return _ukbench(names)
    if dataset in ("oxford5k", "paris6k"):
        return _oxford(dataset, gt)
    return _revisited(dataset, gt)


def _holidays(names: list[str]) -> GroundTruth:
    groups: dict[str, list[str]] = {}
    for n in names:
        if not re.fullmatch(r"\d{6}", n):
            raise GroundTruthError(f"holidays: image {n!r} is not named as Holidays' NNNNNN.jpg")
        groups.setdefault(n[:4], []).append(n)
    queries = []
    for key in sorted(groups):
        q = key + "00"
        if q not in groups[key]:
            raise GroundTruthError(f"holidays: group {key} has no query image {q}.jpg")
        queries.append(Query(q, lists={"ok": sorted(set(groups[key]) - {q}), "junk": [q]}))
    return GroundTruth("holidays", queries, exclude_query=True)


def _ukbench(names: list[str]) -> GroundTruth:
    groups: dict[int, list[str]] = {}
    for n in names:
        m = re.fullmatch(r"ukbench(\d+)", n)
        if not m:
            raise GroundTruthError(f"ukbench: image {n!r} is not named as UKBench's ukbenchNNNNN.jpg")
        groups.setdefault(int(m.group(1)) // 4, []).append(n)
    queries = [Query(n, lists={"ok": sorted(groups[g])}) for g in sorted(groups) for n in sorted(groups[g])]
    return GroundTruth("ukbench", queries)


def _read_list(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def _oxford(dataset: str, folder: str) -> GroundTruth:
    if not os.path.isdir(folder):
        raise GroundTruthError(f"--gt {folder}: not a folder (the {dataset} ground truth: *_query.txt, *_good.txt ...)")
    files = sorted(glob.glob(os.path.join(folder, "*_query.txt")))
    if not files:
        raise GroundTruthError(f"--gt {folder} holds no *_query.txt file")
    queries = []
    for file in files:
        base = file[: -len("_query.txt")]
        with open(file, encoding="utf-8") as f:
            fields = f.read().split()
        if len(fields) != 5:
            raise GroundTruthError(f"{file}: expected 'image x1 y1 x2 y2', got {' '.join(fields)!r}")
        try:
            bbx = tuple(float(v) for v in fields[1:])
        except ValueError:
            raise GroundTruthError(f"{file}: the crop box is not 4 numbers") from None
        lists = {}
        for kind in ("good", "ok", "junk"):
            path = f"{base}_{kind}.txt"
            if not os.path.isfile(path):
                raise GroundTruthError(f"--gt {folder}: {os.path.basename(path)} is missing")
            lists[kind] = _read_list(path)
        name = fields[0].removeprefix("oxc1_")  # Oxford's query files prefix the image name
        queries.append(Query(name, bbx, {"ok": lists["good"] + lists["ok"], "junk": lists["junk"]}))
    return GroundTruth(dataset, queries)


class _NoGlobals(pickle.Unpickler):
    """Python's documented restricted unpickler, restricted to nothing: no class or function is ever looked up."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused: the file names {module}.{name} (only plain data is read)")


def _revisited(dataset: str, path: str) -> GroundTruth:
    if not os.path.isfile(path):
        raise GroundTruthError(f"--gt {path}: no such file (gnd_{dataset}.pkl or its JSON form)")
    if os.path.getsize(path) > MAX_GT_BYTES:
        raise GroundTruthError(f"--gt {path}: larger than {MAX_GT_BYTES >> 20} MiB, not a ground-truth file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".json"):
            cfg = json.loads(raw)
        else:
            cfg = _NoGlobals(io.BytesIO(raw), encoding="latin1").load()
        imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
        queries = []
        for q, g in zip(qimlist, gnd, strict=True):
            lists = {k: [stem(imlist[int(i)]) for i in g.get(k, [])] for k in ("easy", "hard", "junk")}
            bbx = tuple(float(v) for v in g["bbx"]) if g.get("bbx") is not None else None
            queries.append(Query(stem(q), bbx, lists))
        database = [stem(n) for n in imlist]
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise GroundTruthError(f"--gt {path}: not a revisited ground-truth file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None  # fmt: skip
    return GroundTruth(dataset, queries, database)


__all__ = ["DATASETS", "GroundTruth", "GroundTruthError", "Query", "read", "stem"]
