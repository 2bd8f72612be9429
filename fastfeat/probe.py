"""``fastfeat probe``: the linear-probe evaluation of DeCAF (Donahue et al. 2014, Caltech-101) and
Chatfield et al. (2014) on an output directory.

Protocol, per split s = 0 … splits−1, with a generator seeded from (seed, s):

1. for each class, in class-index order, a random permutation of its labelled rows: the first
   ``train_per_class`` are the training set, the next ``test_per_class`` (default: all the others)
   the test set, as the Caltech-101 papers do (30 training images per class, test on the rest);
2. ``C auto``: a fifth of each class's training rows (at least one) is held out, a classifier is
   fitted on the rest for each C of ``C_GRID``, and the C with the best mean per-class accuracy on
   the held-out rows wins (ties: the smaller C, the stronger regularisation); then
3. the classifier is fitted on the whole training set with that C and scored on the test set:
   mean per-class accuracy (the papers' measure: the mean over classes of each class's accuracy,
   so a large class does not dominate) and overall accuracy.

Every fit standardises the rows it is given first (``fastfeat.probe_scaling``: centred on their
mean, divided by one scalar so their mean squared norm is 1; the test rows get the same transform).
So the grid is the same set of regularisation strengths whatever the features' scale (raw relu7
rows have squared norms of ~10⁷ with random weights, unit ones with ``--l2-normalize``), and the
solvers converge in a few hundred iterations where raw rows took thousands.  A fit that reaches its
iteration limit is rerun with ten times the limit; one that still does is counted in
``not_converged_fits`` and printed as a warning.

The report is the mean ± sample standard deviation of both over the splits.  Unlabelled rows are
not used; a class with fewer than ``train_per_class + 1`` rows is an error (every class needs a test
image).

Classifiers, both linear and L2-regularised with C as scikit-learn defines it (C × the summed loss
+ ½‖w‖²): ``logreg``, multinomial logistic regression (scikit-learn's ``LogisticRegression``, bias
not penalised); ``svm``, one-vs-rest squared-hinge SVM (``LinearSVC``, bias penalised as liblinear
does).  ``--l2-normalize`` scales every feature vector to unit length first (before standardising) (Razavian et al.,
Chatfield et al.).

Engines: ``sklearn`` holds the rows it needs in memory; ``torch`` (``fastfeat.probe_torch``)
minimises the same objectives with L-BFGS over batches streamed from ``fastfeat.data`` (on the GPU
when there is one), for sets that do not fit.  ``auto`` takes sklearn when the rows fit in
``IN_MEMORY_BYTES``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable

import numpy as np

from .caveats import RANDOM_WEIGHTS_NOTE, is_random_weights
from .data import DataError, Shards, class_index, label_codes, load
from .errors import FastfeatError
from .probe_scaling import STANDARDIZE, l2_normalize_rows, scale_from, threads_for

C_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # × 1 / mean squared norm of the rows (see above)
HELD_OUT_FRACTION = 0.2  # of each class's training rows, for choosing C
CLASSIFIERS = ("logreg", "svm")
ENGINES = ("auto", "sklearn", "torch")
SKLEARN_MAX_ITER = 1000  # per fit; a fit that reaches it is rerun with 10x the limit, then reported
LOGREG_TOL = 1e-6  # lbfgs gradient tolerance: at weak regularisation (C 1e3) the default 1e-4 stops far enough
# from the optimum to flip test predictions against the torch engine
IN_MEMORY_BYTES = 2 << 30  # engine auto: float32 feature rows up to this size go to scikit-learn


class ProbeError(FastfeatError):
    """A bad argument or a data set the protocol cannot run on: one line, exit code 2."""


def parse_c(value) -> float | None:
    """``auto`` -> None (choose on held-out rows), else a positive float."""
    if value is None or str(value).lower() == "auto":
        return None
    try:
        c = float(value)
    except ValueError:
        c = -1.0
    if not c > 0 or math.isinf(c):
        raise ProbeError(f"--C must be auto or a positive number, got {value!r}")
    return c


def make_splits(
    codes: np.ndarray, n_classes: int, train_per_class: int, test_per_class: int | None, splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(train rows, test rows)] per split, each sorted (rows are global row numbers)."""
    by_class = [np.flatnonzero(codes == k) for k in range(n_classes)]
    out = []
    for s in range(splits):
        rng = np.random.default_rng([seed, s])
        train, test = [], []
        for rows in by_class:
            p = rng.permutation(rows)
            train.append(p[:train_per_class])
            end = None if test_per_class is None else train_per_class + test_per_class
            test.append(p[train_per_class:end])
        out.append((np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
    return out


def held_out(train: np.ndarray, codes: np.ndarray, seed: int, split: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): a fifth of each class's training rows, at least one, held out."""
    rng = np.random.default_rng([seed, split, 1])
    fit, val = [], []
    for k in np.unique(codes[train]):
        rows = rng.permutation(train[codes[train] == k])
        n_val = max(1, round(len(rows) * HELD_OUT_FRACTION))
        val.append(rows[:n_val])
        fit.append(rows[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def mean_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == k] == k) for k in classes]))


class SklearnEngine:
    """scikit-learn on the needed rows, loaded once as float32."""

    name = "sklearn"

    def __init__(self, path: str, layer: str, classifier: str, l2_normalize: bool, rows: np.ndarray):
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise ProbeError("the sklearn engine needs scikit-learn: pip install 'fastfeat[probe]'") from None
        _, _, x = load(path, layer, dtype="float32", rows=rows)
        self.x = l2_normalize_rows(x) if l2_normalize else x
        self.rows = np.unique(rows)  # self.x[i] is row self.rows[i]
        self.classifier = classifier
        self.not_converged = 0
        self.refits = 0  # fits rerun with a raised iteration limit

    def mean_square_norm(self, rows: np.ndarray) -> float:
        x = self._rows(rows)
        return float(np.mean(np.einsum("ij,ij->i", x, x, dtype=np.float64))) or 1.0

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        return self.x[np.searchsorted(self.rows, rows)]

    def fit(self, rows: np.ndarray, y: np.ndarray, c: float, warm=None):
        """(model, mean row, scale): the classifier fitted on the standardised ``rows`` (fastfeat.probe_scaling).

        ``warm``, an earlier fit on the same rows, starts logistic regression from its weights."""
        with threads_for(len(rows) * self.x.shape[1]):
            return self._fit(rows, y, c, warm)

    def _fit(self, rows: np.ndarray, y: np.ndarray, c: float, warm):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC

        x = self._rows(rows)
        mean = x.mean(0, dtype=np.float64)
        scale = scale_from(self.mean_square_norm(rows), float(mean @ mean))
        xs = (x - mean.astype(np.float32)) / np.float32(scale)
        for max_iter in (SKLEARN_MAX_ITER, SKLEARN_MAX_ITER * 10):  # a fit at the limit is rerun, not kept
            if self.classifier == "logreg":
                model = LogisticRegression(C=c, max_iter=max_iter, tol=LOGREG_TOL, warm_start=warm is not None)
                if warm is not None:
                    model.coef_, model.intercept_ = warm[0].coef_.copy(), warm[0].intercept_.copy()
            else:
                model = LinearSVC(C=c, max_iter=max_iter * 10)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(xs, y)
            stopped = any(issubclass(w.category, ConvergenceWarning) for w in caught)
            if not stopped:
                break
            self.refits += max_iter == SKLEARN_MAX_ITER
        self.not_converged += stopped
        return model, mean.astype(np.float32), np.float32(scale)

    def predict(self, model, rows: np.ndarray) -> np.ndarray:
        clf, mean, scale = model
        with threads_for(len(rows) * self.x.shape[1]):
            return clf.predict((self._rows(rows) - mean) / scale)

    def positive_score(self, model, rows: np.ndarray) -> np.ndarray:
        """For a fit on labels 0/1: each row's decision value for class 1 (higher: more likely), in the order given."""
        clf, mean, scale = model
        with threads_for(len(rows) * self.x.shape[1]):
            return clf.decision_function((self._rows(rows) - mean) / scale).astype(np.float64)


def choose_engine(engine: str, n_rows: int, dim: int) -> str:
    if engine != "auto":
        return engine
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return "torch"
    return "sklearn" if n_rows * dim * 4 <= IN_MEMORY_BYTES else "torch"


def run_probe(
    path: str, layer: str = "relu7", train_per_class: int = 30, test_per_class: int | None = None,
    splits: int = 5, classifier: str = "logreg", c="auto", l2_normalize: bool = False, seed: int = 0,
    engine: str = "auto", device: str = "auto", log: Callable[[str], None] | None = None, **engine_options,
) -> dict:  # fmt: skip
    """Run the protocol (see the module); returns the report as a dict (what ``--json`` writes)."""
    started = time.perf_counter()
    if classifier not in CLASSIFIERS:
        raise ProbeError(f"unknown --classifier {classifier!r}; choose logreg or svm")
    if engine not in ENGINES:
        raise ProbeError(f"unknown --engine {engine!r}; choose from {', '.join(ENGINES)}")
    for flag, value in (("train-per-class", train_per_class), ("splits", splits), ("test-per-class", test_per_class)):
        if value is not None and value < 1:
            raise ProbeError(f"--{flag} must be >= 1, got {value}")
    fixed_c = parse_c(c)
    if fixed_c is None and train_per_class < 2:
        # C auto holds out at least one training row per class: with one there would be none left to fit on
        raise ProbeError(
            f"--C auto chooses C on held-out training rows (at least one per class) and needs --train-per-class "
            f">= 2, got {train_per_class}; give a fixed --C (e.g. --C 1) to train on one row per class"
        )
    try:
        shards = Shards(path)
        (layer,) = shards.check_layers(layer)
    except DataError as exc:
        raise ProbeError(str(exc)) from None
    classes = class_index(path, shards.manifest)
    codes = label_codes(shards.labels(), classes)
    counts = np.bincount(codes[codes >= 0], minlength=len(classes))
    if len(classes) < 2:
        raise ProbeError(f"{path} has {len(classes)} labelled class(es); a probe needs at least 2")
    short = [f"{classes[k]} ({counts[k]})" for k in range(len(classes)) if counts[k] < train_per_class + 1]
    if short:
        raise ProbeError(
            f"{len(short)} class(es) have fewer than --train-per-class + 1 = {train_per_class + 1} rows, e.g. "
            f"{', '.join(short[:3])}; lower --train-per-class"
        )
    split_rows = make_splits(codes, len(classes), train_per_class, test_per_class, splits, seed)
    needed = np.unique(np.concatenate([np.concatenate(s) for s in split_rows]))
    chosen = choose_engine(engine, len(needed), shards.layer_dims[layer])
    say = log or (lambda _line: None)
    if chosen == "sklearn":
        eng = SklearnEngine(path, layer, classifier, l2_normalize, needed)
    else:
        from .probe_torch import TorchEngine

        eng = TorchEngine(path, layer, classifier, l2_normalize, len(classes), codes, device=device, **engine_options)
    per_split = []
    for s, (train, test) in enumerate(split_rows):
        grid = {}
        if fixed_c is None:
            fit_rows, val_rows = held_out(train, codes, seed, s)
            warm = None
            for c_try in C_GRID:  # ascending: each fit starts from the last (warm start)
                warm = eng.fit(fit_rows, codes[fit_rows], c_try, warm)
                grid[c_try] = mean_class_accuracy(codes[val_rows], eng.predict(warm, val_rows))
            best = max(grid.values())
            c_used = min(c_try for c_try, acc in grid.items() if acc == best)
        else:
            c_used = fixed_c
        model = eng.fit(train, codes[train], c_used)
        pred = eng.predict(model, test)
        truth = codes[test]
        row = {
            "split": s, "C": c_used, "mean_class_accuracy": mean_class_accuracy(truth, pred),
            "accuracy": float(np.mean(pred == truth)), "train": len(train), "test": len(test),
            "held_out_accuracy": {str(k): v for k, v in grid.items()} or None,  # by C
        }  # fmt: skip
        per_split.append(row)
        say(f"split {s + 1}/{splits}: C={c_used:g} mean per-class accuracy {row['mean_class_accuracy']:.2%}")
    metadata = shards.metadata
    random_warning = [RANDOM_WEIGHTS_NOTE] if is_random_weights(metadata.get("weights")) else []
    mca = [r["mean_class_accuracy"] for r in per_split]
    acc = [r["accuracy"] for r in per_split]
    return {
        "dir": os.path.abspath(path),
        "layer": layer,
        "model": metadata.get("model"),
        "weights": metadata.get("weights"),
        "augment": metadata.get("augment"),
        "classifier": classifier,
        "engine": chosen,
        "C": "auto" if fixed_c is None else fixed_c,
        "C_grid": list(C_GRID) if fixed_c is None else None,
        "l2_normalize": l2_normalize,
        "standardize": STANDARDIZE,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "splits": splits,
        "seed": seed,
        "classes": len(classes),
        "chance": 1.0 / len(classes),
        "mean_class_accuracy": _mean_std(mca),
        "accuracy": _mean_std(acc),
        "per_split": per_split,
        "not_converged_fits": eng.not_converged,
        "fits_rerun_with_a_raised_limit": eng.refits,
        "warnings": ([not_converged_warning(eng.not_converged)] if eng.not_converged else []) + random_warning,
        "seconds": round(time.perf_counter() - started, 2),
    }


def not_converged_warning(fits: int) -> str:
    return (
        f"{fits} fit(s) stopped at the iteration limit (raised tenfold once) before converging: their accuracy "
        "may be off; try --l2-normalize or a smaller --C"
    )


def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def format_report(r: dict) -> str:
    test = "rest" if r["test_per_class"] is None else str(r["test_per_class"])
    lines = [
        f"{r['dir']}  {r['layer']} ({r['model']})  {r['classifier']} via {r['engine']}, C {r['C']}, "
        f"L2-normalised {'yes' if r['l2_normalize'] else 'no'}, augment {(r['augment'] or {}).get('views', 'center')}",
        f"{r['classes']} classes, {r['train_per_class']} train / {test} test per class, {r['splits']} splits "
        f"(seed {r['seed']}); chance {r['chance']:.2%}",
        "",
        f"{'split':>5}  {'C':>8}  {'mean per-class acc':>18}  {'overall acc':>11}  {'train':>6}  {'test':>6}",
    ]
    for s in r["per_split"]:
        lines.append(
            f"{s['split'] + 1:>5}  {s['C']:>8g}  {s['mean_class_accuracy']:>18.2%}  {s['accuracy']:>11.2%}  "
            f"{s['train']:>6}  {s['test']:>6}"
        )
    m, a = r["mean_class_accuracy"], r["accuracy"]
    lines.append(
        f"{'mean':>5}  {'':>8}  {m['mean']:>10.2%} ± {m['std']:.2%}  {a['mean']:>6.2%} ± {a['std']:.2%}".rstrip()
    )
    lines += [f"warning: {w}" for w in r.get("warnings", [])]
    return "\n".join(lines)


def write_json(report: dict, file: str) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


__all__ = ["C_GRID", "RANDOM_WEIGHTS_NOTE", "ProbeError", "format_report", "make_splits", "run_probe", "write_json"]
