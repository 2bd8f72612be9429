"""What L2 normalisation and test-time augmentation do to the linear probe, on a data set that ships
with the installed packages (no ImageNet weights or Caltech-101 here).

Data: "crops of 7 photos" (tests/crop_classes.py): 7 classes × ``--per-class`` random crops of the
scikit-image / scikit-learn sample photos, 128×128 JPEGs.  Features: CaffeNet with seeded random
weights (``random:0``), relu6 and relu7, extracted with ``--augment center``, ``center+flip`` and
``10crop``.  Probe: DeCAF's protocol (``fastfeat probe``): ``--train-per-class`` training crops per
class, the rest for testing, 5 splits, C chosen on held-out training rows, SVM (and with
``--classifiers svm,logreg`` logistic regression), with and without ``--l2-normalize``; then the torch
engine against scikit-learn on one configuration (2 splits).  Also draws the t-SNE of relu7 (``fastfeat plot``) committed as a sample.

    python benchmarks/probe_check.py --per-class 40 --train-per-class 20

Accuracies are deterministic (seeded crops, weights and splits); the seconds are not benchmarks.
Writes benchmarks/results/probe_cpu.json and benchmarks/results/tsne_crop_classes.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from conftest import _photo_paths  # noqa: E402
from crop_classes import make_crop_classes  # noqa: E402
from data_loading import cpu_model  # noqa: E402

import fastfeat  # noqa: E402
from fastfeat.plot import plot_embedding  # noqa: E402
from fastfeat.probe import run_probe  # noqa: E402

AUGMENTS = ("center", "center+flip", "10crop")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--classifiers", default="svm", help="svm, logreg or svm,logreg (logreg: ~5x slower)")
    ap.add_argument("--work", default=None, help="folder for the images and features (default: a temp dir)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="fastfeat-probe-")
    src = os.path.join(work, "src")
    if not os.path.isdir(src):
        make_crop_classes(src, _photo_paths(), args.per_class)
    outs = {}
    for augment in AUGMENTS:
        outs[augment] = os.path.join(work, augment)
        fastfeat.extract(src, outs[augment], model="caffenet", weights="random:0", layers=["relu6", "relu7"],
                         augment=augment, progress=False)  # fmt: skip
    runs = []
    plan = [(a, "relu7", clf, l2) for a in AUGMENTS for clf in args.classifiers.split(",") for l2 in (False, True)]
    plan += [("center", "relu6", "svm", l2) for l2 in (False, True)]
    for augment, layer, classifier, l2 in plan:
        r = run_probe(outs[augment], layer, train_per_class=args.train_per_class, splits=args.splits,
                      classifier=classifier, l2_normalize=l2)  # fmt: skip
        runs.append(r)
        m = r["mean_class_accuracy"]
        print(f"{augment:12s} {layer} {classifier:6s} L2={l2!s:5s} {m['mean']:.2%} ± {m['std']:.2%} "
              f"({r['seconds']} s, C per split {[s['C'] for s in r['per_split']]})", file=sys.stderr)  # fmt: skip
    engines = {}
    for engine in ("sklearn", "torch"):
        r = run_probe(outs["center"], "relu7", train_per_class=args.train_per_class, splits=2,
                      classifier="logreg", c=10.0, l2_normalize=True, engine=engine, device="cpu")  # fmt: skip
        engines[engine] = {"mean_class_accuracy": r["mean_class_accuracy"], "seconds": r["seconds"],
                           "per_split": [s["mean_class_accuracy"] for s in r["per_split"]]}  # fmt: skip
    results = os.path.join(HERE, "results")
    plot = plot_embedding(outs["center"], "relu7", os.path.join(results, "tsne_crop_classes.png"), seed=0)
    table = [
        {
            "augment": r["augment"]["views"],
            "layer": r["layer"],
            "classifier": r["classifier"],
            "l2_normalize": r["l2_normalize"],
            "mean_class_accuracy": r["mean_class_accuracy"],
            "accuracy": r["accuracy"],
            "C_per_split": [s["C"] for s in r["per_split"]],
        }  # fmt: skip
        for r in runs
    ]
    result = {
        "what": "linear probe (DeCAF protocol) on crops of 7 photos, CaffeNet random:0 features",
        "machine": cpu_model(),
        "data": {
            "classes": 7,
            "per_class": args.per_class,
            "train_per_class": args.train_per_class,
            "test_per_class": args.per_class - args.train_per_class,
            "splits": args.splits,
            "chance": 1 / 7,
        },  # fmt: skip
        "probes": table,
        "engines_logreg_C10_l2_2splits": engines,
        "plot": {**plot, "out": "benchmarks/results/tsne_crop_classes.png"},
    }
    print(json.dumps(result, indent=1))
    with open(os.path.join(results, "probe_cpu.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
