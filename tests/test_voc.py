"""fastfeat eval voc: VOC2007's 11-point AP on hand-computed cases and against an independent
implementation (a literal port of the devkit's VOCevalcls.m loop: difficult images kept in the list,
0/0 precisions skipped as MATLAB's max skips NaN), the devkit reader and its refusals, and the command
end to end on a small VOC-style devkit the tests write (crops of real photos, made-up labels)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from crop_classes import make_crop_classes

import fastfeat
import fastfeat.data
from fastfeat.cli import main
from fastfeat.probe import C_GRID
from fastfeat.voc import VOC_CLASSES, VocError, eleven_point_ap, parse_classes, read_devkit
from fastfeat.voc_eval import evaluate, format_report


def devkit_ap(scores, labels) -> float:
    """VOCevalcls.m written out: stable sort by -score, tp/fp cumulated over every image (a difficult
    one adds to neither), prec = tp/(tp+fp), AP = mean over t = 0:0.1:1 of max(prec(rec >= t))."""
    positives = sum(1 for lab in labels if lab > 0)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable, as MATLAB's
    tp = fp = 0
    points = []
    for i in order:
        tp += labels[i] > 0
        fp += labels[i] < 0
        points.append((tp / positives, tp / (tp + fp) if tp + fp else math.nan))
    ap = 0.0
    for k in range(11):
        at = [p for r, p in points if r >= k * 0.1 and not math.isnan(p)]
        ap += (max(at) if at else 0.0) / 11
    return ap


def test_eleven_point_ap_on_hand_computed_cases():
    assert eleven_point_ap([4, 3, 2, 1], [1, 1, -1, -1]) == pytest.approx(1.0)  # perfect ranking
    # reversed, 2 of 4 positive: precision 1/3 then 1/2 at recall 1/2 and 1; the max at recall >= t is 1/2
    assert eleven_point_ap([1, 2, 3, 4], [1, 1, -1, -1]) == pytest.approx(0.5)
    assert eleven_point_ap([1, 2, 3, 4], [1, -1, -1, -1]) == pytest.approx(0.25)  # the one positive last
    # +, -, +, -, -, +: recall 1/3 at precision 1 (t = 0..0.3: 4 thresholds), 2/3 at 2/3 (t = 0.4..0.6: 3),
    # 1 at 1/2 (t = 0.7..1: 4) -> (4 * 1 + 3 * 2/3 + 4 * 1/2) / 11
    assert eleven_point_ap([6, 5, 4, 3, 2, 1], [1, -1, 1, -1, -1, 1]) == pytest.approx(8 / 11)
    # a difficult image ranked first is ignored (as a negative it would halve the AP)
    assert eleven_point_ap([3, 2, 1], [0, 1, -1]) == pytest.approx(1.0)
    assert eleven_point_ap([3, 2, 1], [-1, 1, -1]) == pytest.approx(0.5)
    # ties keep the given order: +, -, -, + -> precision 1 up to recall 1/2 (t = 0..0.5: 6), then 1/2 (5)
    assert eleven_point_ap([1, 1, 1, 1], [1, -1, -1, 1]) == pytest.approx((6 * 1 + 5 * 0.5) / 11)
    assert eleven_point_ap([1, 1, 1, 1], [-1, 1, -1, 1]) == pytest.approx(0.5)


def test_a_class_without_positive_has_no_ap():
    with pytest.raises(ValueError, match="no positive"):
        eleven_point_ap([1.0, 2.0], [-1, 0])
    with pytest.raises(ValueError):
        eleven_point_ap([1.0, 2.0], [1, 2])  # not a VOC label


def test_eleven_point_ap_matches_the_devkit_loop_on_random_scores():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(400):
        n = int(rng.integers(2, 80))
        labels = rng.choice([-1, 0, 1], size=n, p=[0.6, 0.1, 0.3])
        if not (labels == 1).any():
            continue
        # half the trials with many ties (integer scores), half continuous
        scores = rng.integers(0, 4, n).astype(float) if trial % 2 else rng.normal(size=n)
        assert eleven_point_ap(scores, labels) == pytest.approx(devkit_ap(scores.tolist(), labels.tolist()), abs=1e-12)
        checked += 1
    assert checked > 300


def write_devkit(root, sets: dict[str, list[str]], labels: dict[str, dict[str, int]]) -> str:
    """ImageSets/Main/<set>.txt and <class>_<set>.txt for trainval and test (labels: class -> id -> label)."""
    main_dir = os.path.join(root, "ImageSets", "Main")
    os.makedirs(main_dir, exist_ok=True)
    for name, ids in sets.items():
        with open(os.path.join(main_dir, f"{name}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    for cls, by_id in labels.items():
        for name in ("trainval", "test"):
            with open(os.path.join(main_dir, f"{cls}_{name}.txt"), "w") as f:
                f.write("".join(f"{i} {by_id[i]:>2}\n" for i in sets[name]))  # the devkit pads to two columns
    return str(root)


def _small_kit(tmp_path):
    sets = {"train": ["a1", "a2"], "val": ["a3", "a4"], "test": ["b1", "b2"]}
    sets["trainval"] = sets["train"] + sets["val"]
    labels = {"cat": {"a1": 1, "a2": -1, "a3": 1, "a4": 0, "b1": -1, "b2": 1}}
    return write_devkit(tmp_path / "VOC2007", sets, labels), sets, labels


def test_devkit_reader(tmp_path):
    root, sets, _ = _small_kit(tmp_path)
    kit = read_devkit(root, ("cat",))
    assert kit.sets["trainval"] == ["a1", "a2", "a3", "a4"] and kit.sets["val"] == ["a3", "a4"]
    assert kit.labels["cat"]["trainval"].tolist() == [1, -1, 1, 0] and kit.labels["cat"]["test"].tolist() == [-1, 1]
    assert parse_classes(None) == VOC_CLASSES and len(VOC_CLASSES) == 20
    assert parse_classes("dog, cat") == ("cat", "dog")  # VOC's order
    with pytest.raises(VocError, match="unknown class kitten"):
        parse_classes("cat,kitten")
    with pytest.raises(VocError, match="no ImageSets/Main/dog_trainval.txt"):
        read_devkit(root, ("dog",))
    with pytest.raises(VocError, match="no such folder"):
        read_devkit(str(tmp_path / "nowhere"), ("cat",))
    main_dir = os.path.join(root, "ImageSets", "Main")
    os.remove(os.path.join(main_dir, "val.txt"))
    read_devkit(root, ("cat",), train_val=False)  # a fixed C does not need train/val
    with pytest.raises(VocError, match="no ImageSets/Main/val.txt"):
        read_devkit(root, ("cat",))
    with open(os.path.join(main_dir, "cat_test.txt"), "a") as f:
        f.write("b3 1\n")
    with pytest.raises(VocError, match=r"cat_test.txt lists 1 id\(s\) not in test.txt, e.g. b3"):
        read_devkit(root, ("cat",), train_val=False)
    with open(os.path.join(main_dir, "cat_test.txt"), "w") as f:
        f.write("b1 -1\nb2 yes\n")
    with pytest.raises(VocError, match="line 2: expected"):
        read_devkit(root, ("cat",), train_val=False)


@pytest.mark.parametrize(
    "change, message",
    [
        ("none", "holds no manifest.json: not a fastfeat output directory"),  # the devkit is fine: DIR is read next
        ("no-positive", "class cat has no positive image in test"),
        ("no-devkit", "no ImageSets/Main/trainval.txt"),
        ("class", "--classes: unknown class kitten"),
        ("engine", "unknown --engine 'gpu'"),
    ],
)
def test_bad_devkit_or_flags_one_line_exit_2_before_any_output_is_read(tmp_path, capsys, change, message):
    root, sets, labels = _small_kit(tmp_path)
    main_dir = os.path.join(root, "ImageSets", "Main")
    extra = ["--classes", "cat", "--C", "1"]
    if change == "no-positive":
        with open(os.path.join(main_dir, "cat_test.txt"), "w") as f:
            f.write("b1 -1\nb2 0\n")
    elif change == "no-devkit":
        os.remove(os.path.join(main_dir, "trainval.txt"))
    elif change == "class":
        extra = ["--classes", "cat,kitten"]
    elif change == "engine":
        extra += ["--engine", "gpu"]
    report = tmp_path / "voc.json"
    assert main(["eval", "voc", str(tmp_path / "no-output"), "--devkit", root, *extra, "--json", str(report)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not report.exists()


PHOTOS = 4  # photo k < 3 is class VOC_CLASSES[k]'s positives; photo 3's crops are negatives for all
CLASSES = VOC_CLASSES[:3]
PER_PHOTO = {"train": 2, "val": 2, "test": 4}


@pytest.fixture(scope="module")
def voc(tmp_path_factory, photos):
    """A VOC-style tree: JPEGImages/<6 digits>.jpg (crops of 4 real photos, plus one image no set lists),
    ImageSets/Main for 3 classes, one difficult image per class in trainval and in test, and its extract."""
    root = tmp_path_factory.mktemp("voc")
    per_photo = sum(PER_PHOTO.values())
    names = make_crop_classes(str(root / "crops"), photos[:PHOTOS], per_photo + 1, seed=3)  # + 1: 999999.jpg
    images = root / "VOC2007" / "JPEGImages"
    images.mkdir(parents=True)
    sets: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    source: dict[str, int] = {}
    n = 0
    for k, name in enumerate(names):
        files = sorted(os.listdir(root / "crops" / name))
        at = 0
        for part, count in PER_PHOTO.items():
            for file in files[at : at + count]:
                n += 1
                image_id = f"{n:06d}"
                os.rename(root / "crops" / name / file, images / f"{image_id}.jpg")
                sets[part].append(image_id)
                source[image_id] = k
            at += count
    os.rename(root / "crops" / names[0] / sorted(os.listdir(root / "crops" / names[0]))[0], images / "999999.jpg")
    sets["trainval"] = sets["train"] + sets["val"]
    labels = {cls: {i: 1 if source[i] == c else -1 for i in source} for c, cls in enumerate(CLASSES)}
    for c, cls in enumerate(CLASSES):  # a difficult image of the background photo in each set
        background = [i for i in source if source[i] == PHOTOS - 1]
        labels[cls][background[c]] = 0  # train (c < 2) ...
        labels[cls][[i for i in sets["test"] if source[i] == PHOTOS - 1][c]] = 0  # ... and test
    devkit = write_devkit(root / "VOC2007", sets, labels)
    out = str(root / "out")
    fastfeat.extract(str(images), out, model="caffenet", weights="random:0", layers=["fc6", "relu7"], progress=False)
    return {"devkit": devkit, "out": out, "sets": sets, "labels": labels, "root": root}


def _reference_aps(voc, c: float) -> list[float]:
    """The protocol by hand: sklearn's LinearSVC on L2-normalised, standardised rows; AP by the devkit loop."""
    from sklearn.svm import LinearSVC

    ids, _, x = fastfeat.data.load(voc["out"], "relu7", dtype="float32")
    row = {os.path.splitext(os.path.basename(i))[0]: k for k, i in enumerate(ids)}
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    aps = []
    for cls in CLASSES:
        fit_ids = [i for i in voc["sets"]["trainval"] if voc["labels"][cls][i] != 0]
        xf = x[[row[i] for i in fit_ids]]
        mean = xf.mean(0, dtype=np.float64)
        scale = math.sqrt(np.mean(np.einsum("ij,ij->i", xf, xf, dtype=np.float64)) - mean @ mean)
        clf = LinearSVC(C=c, max_iter=100000).fit((xf - mean) / scale, [voc["labels"][cls][i] == 1 for i in fit_ids])
        test = voc["sets"]["test"]
        scores = clf.decision_function((x[[row[i] for i in test]] - mean) / scale)
        aps.append(devkit_ap(scores.tolist(), [voc["labels"][cls][i] for i in test]))
    return aps


@pytest.mark.slow  # the fixture's extract (~10 s on a loaded 2-core box)
def test_eval_voc_end_to_end_with_a_fixed_c(voc, tmp_path, capsys):
    report_file = tmp_path / "voc.json"
    args = ["eval", "voc", voc["out"], "--devkit", voc["devkit"], "--classes", ",".join(CLASSES), "--layer", "relu7"]
    assert main([*args, "--C", "1", "--json", str(report_file)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    assert [r["class"] for r in report["per_class"]] == list(CLASSES) and report["engine"] == "sklearn"
    assert report["test"] == PHOTOS * PER_PHOTO["test"] and report["l2_normalize"]
    assert [r["test_difficult"] for r in report["per_class"]] == [1, 1, 1]
    expected = _reference_aps(voc, 1.0)
    assert [r["AP"] for r in report["per_class"]] == pytest.approx(expected, abs=1e-9)
    assert report["mAP"] == pytest.approx(np.mean(expected)) and report["mAP"] > 0.5  # crops of distinct photos
    assert f"{'mAP':<12}  {report['mAP']:>7.2%}" in printed and "3 of VOC's 20 classes" in printed
    # the torch engine minimises the same objective: the same rankings up to near-ties
    torch_report = evaluate(voc["out"], voc["devkit"], "relu7", CLASSES, c=1.0, engine="torch", device="cpu")  # fmt: skip
    assert torch_report["engine"] == "torch" and torch_report["mAP"] == pytest.approx(report["mAP"], abs=0.03)


@pytest.mark.slow
def test_eval_voc_chooses_c_per_class_on_train_and_val(voc):
    report = evaluate(voc["out"], voc["devkit"], "relu7", CLASSES)
    for row in report["per_class"]:
        val = {float(k): v for k, v in row["val_AP"].items()}
        assert list(val) == list(C_GRID) and row["C"] == min(c for c in C_GRID if val[c] == max(val.values()))
        assert 0 <= row["AP"] <= 1
    assert report["C"] == "auto" and "chosen per class on train -> val" in format_report(report)


@pytest.mark.parametrize(
    "change, message",
    [
        ("layer", "has no layer pool5; it holds fc6, relu7"),
        ("no-layer", "holds layers fc6, relu7: choose one with --layer"),
        ("missing-image", "lacks 1 image(s) of the devkit's trainval/test, e.g. 123456"),
        ("no-positive", "class bird has no positive image in test"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_nothing_written(voc, tmp_path, capsys, change, message):
    import shutil

    devkit = str(tmp_path / "VOC2007")
    shutil.copytree(voc["devkit"], devkit, ignore=shutil.ignore_patterns("JPEGImages"))
    main_dir = os.path.join(devkit, "ImageSets", "Main")
    extra = ["--layer", "relu7"]
    if change == "layer":
        extra = ["--layer", "pool5"]
    elif change == "no-layer":
        extra = []
    elif change == "missing-image":  # an id the devkit lists but DIR does not hold
        for name in ["test.txt"] + [f"{cls}_test.txt" for cls in CLASSES]:
            with open(os.path.join(main_dir, name), "a") as f:
                f.write("123456\n" if name == "test.txt" else "123456 -1\n")
    elif change == "no-positive":
        with open(os.path.join(main_dir, "bird_test.txt"), "w") as f:
            f.write("".join(f"{i} -1\n" for i in voc["sets"]["test"]))
    report = tmp_path / "voc.json"
    argv = ["eval", "voc", voc["out"], "--devkit", devkit, "--classes", ",".join(CLASSES), "--C", "1"]
    assert main([*argv, *extra, "--json", str(report)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not report.exists()
