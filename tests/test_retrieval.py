"""fastfeat eval retrieval: the AP code on hand-computed cases and against an independent
implementation (Oxford's compute_ap.cpp formulation: walk the list, skip junk, add trapezoids), the
ground-truth readers on files in the benchmarks' formats, and the command end to end on a small
Holidays-style set made from real photos (crops, flips and rescalings as group members)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import fastfeat
from fastfeat.cli import main
from fastfeat.retrieval import evaluate
from fastfeat.retrieval_gt import GroundTruthError, read
from fastfeat.retrieval_metrics import mean_average_precision, ns_score, query_scores, revisited_protocols


def oxford_ap(ranking, ok, junk) -> float:
    """compute_ap.cpp of the Oxford Buildings set, written from its description: independent of revisitop's form."""
    ok, junk = set(ok), set(junk)
    old_recall, old_precision, ap, hits, seen = 0.0, 1.0, 0.0, 0, 0
    for item in ranking:
        if item in junk:
            continue
        hits += item in ok
        recall, precision = hits / len(ok), hits / (seen + 1)
        ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
        seen += 1
    return ap


def test_perfect_and_reversed_rankings():
    ap, prs = query_scores(np.arange(10), ok=[0, 1, 2])
    assert ap == pytest.approx(1.0) and prs == [1.0, 1.0, 1.0]
    # positives last among 10 (0-based 7, 8, 9): (1/8)/6 + (1/8 + 2/9)/6 + (2/9 + 3/10)/6
    ap, prs = query_scores(np.arange(10)[::-1], ok=[0, 1, 2])
    assert ap == pytest.approx((1 / 8) / 6 + (1 / 8 + 2 / 9) / 6 + (2 / 9 + 3 / 10) / 6)
    assert prs == [0.0, 0.0, pytest.approx(0.3)]  # mP@k at min(k, last positive's position)


def test_junk_ranked_first_is_ignored():
    ap, _ = query_scores(np.array([7, 8, 0, 1, 5]), ok=[0, 1], junk=[7, 8])
    assert ap == pytest.approx(1.0)
    # a negative before the positives is not ignored: positives at 1 and 2 -> (1/2)/4 ... by hand
    ap, _ = query_scores(np.array([7, 5, 0, 1]), ok=[0, 1], junk=[7])
    assert ap == pytest.approx((0 + 1 / 2) / 4 + (1 / 2 + 2 / 3) / 4)


def test_query_without_positive_is_left_out_of_the_mean():
    scores = mean_average_precision([np.arange(5), np.arange(5)], [{"ok": [0]}, {"ok": []}])
    assert scores["mAP"] == 1.0 and scores["queries_without_positive"] == 1 and scores["ap"][1] is None
    with pytest.raises(ValueError):
        mean_average_precision([np.arange(5)], [{"ok": []}])


def test_ap_matches_an_independent_implementation_on_random_rankings():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(5, 60))
        ranking = rng.permutation(n)
        labels = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])  # negative, positive, junk
        ok, junk = np.flatnonzero(labels == 1), np.flatnonzero(labels == 2)
        if not len(ok):
            continue
        ap, _ = query_scores(ranking, ok, junk)
        assert ap == pytest.approx(oxford_ap(ranking.tolist(), ok.tolist(), junk.tolist()), abs=1e-12)


def test_revisited_setups_and_ns_score():
    gnd = [{"easy": [1], "hard": [2], "junk": [3]}]
    setups = revisited_protocols(gnd)
    assert setups["easy"][0] == {"ok": [1], "junk": [3, 2]}
    assert setups["medium"][0] == {"ok": [1, 2], "junk": [3]}
    assert setups["hard"][0] == {"ok": [2], "junk": [3, 1]}
    assert ns_score([np.array([0, 1, 9, 2, 3])], [{0, 1, 2, 3}]) == 3.0


def test_ground_truth_files(tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "all_souls_1_query.txt").write_text("oxc1_all_souls_000013 136.5 34.1 648.5 955.7\n")
    (gt / "all_souls_1_good.txt").write_text("all_souls_000013\nall_souls_000026\n")
    (gt / "all_souls_1_ok.txt").write_text("all_souls_000040\n")
    (gt / "all_souls_1_junk.txt").write_text("all_souls_000091\n")
    truth = read("oxford5k", str(gt), [])
    (q,) = truth.queries
    assert q.name == "all_souls_000013" and q.bbx == (136.5, 34.1, 648.5, 955.7)
    assert q.lists == {"ok": ["all_souls_000013", "all_souls_000026", "all_souls_000040"], "junk": ["all_souls_000091"]}
    cfg = {"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": [{"bbx": [1.0, 2.0, 3.0, 4.0], "easy": [0], "hard": [2], "junk": [1]}]}  # fmt: skip
    pkl = tmp_path / "gnd_roxford5k.pkl"
    pkl.write_bytes(pickle.dumps(cfg, protocol=2))
    truth = read("roxford5k", str(pkl), [])
    assert truth.database == ["a", "b", "c"] and truth.queries[0].lists == {"easy": ["a"], "hard": ["c"], "junk": ["b"]}
    (tmp_path / "gnd.json").write_text(json.dumps(cfg))
    assert read("roxford5k", str(tmp_path / "gnd.json"), []).queries[0].bbx == (1.0, 2.0, 3.0, 4.0)
    # a pickle naming any global (here one that would run a command) is refused before anything runs
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "ran").encode() + b"'\ntR.")
    with pytest.raises(GroundTruthError, match="refused"):
        read("roxford5k", str(evil), [])
    assert not (tmp_path / "ran").exists()
    assert [q.name for q in read("holidays", None, ["100000", "100001", "100100", "100101"]).queries] == ["100000", "100100"]  # fmt: skip
    with pytest.raises(GroundTruthError, match="no query image"):
        read("holidays", None, ["100001"])


def _holidays_set(root: str, photos: list[str]) -> None:
    """Holidays naming: group GGGG, query GGGG00, members crops, a flip and a rescaling of the query photo."""
    os.makedirs(root)
    for g, path in enumerate(photos):
        img = Image.open(path).convert("RGB")
        img = img.resize((160, round(160 * img.height / img.width)))
        w, h = img.size
        members = [
            img,
            img.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
            img.transpose(Image.FLIP_LEFT_RIGHT),
            img.resize((w * 2 // 3, h * 2 // 3)),
        ]
        for k, member in enumerate(members):
            member.save(os.path.join(root, f"{100 + g:04d}{k:02d}.jpg"), quality=90)


def _reference_map(out: str) -> float:
    """Cosine by numpy, AP by the independent implementation above: the whole command checked."""
    ids, _, x = fastfeat.data.load(out, "relu7", dtype="float32")
    names = [os.path.splitext(os.path.basename(i))[0] for i in ids]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    aps = []
    for qi, q in enumerate(names):
        if not q.endswith("00"):
            continue
        order = np.argsort(-(x @ x[qi]), kind="stable")
        ranking = [names[i] for i in order if names[i] != q]
        aps.append(oxford_ap(ranking, [n for n in names if n[:4] == q[:4] and n != q], []))
    return float(np.mean(aps))


@pytest.fixture(scope="module")
def holidays(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("holidays")
    _holidays_set(str(root / "jpg"), photos)
    out = str(root / "out")
    fastfeat.extract(str(root / "jpg"), out, model="caffenet", weights="random:0", layers=["relu7"], progress=False)  # fmt: skip
    return str(root / "jpg"), out


def test_eval_retrieval_end_to_end_on_a_holidays_style_set(holidays, photos, tmp_path, capsys):
    import fastfeat.data  # noqa: F401

    _, out = holidays
    report_file = str(tmp_path / "r.json")
    assert main(["eval", "retrieval", out, "--dataset", "holidays", "--json", report_file]) == 0
    printed = capsys.readouterr().out
    report = json.loads(open(report_file).read())
    assert report["queries"] == len(photos) and report["database"] == 4 * len(photos)
    assert report["mAP"] == pytest.approx(_reference_map(out), abs=1e-6)
    assert f"mAP {report['mAP']:.2%}" in printed
    whitened = evaluate(out, "holidays", l2=True, pca=8, pca_from=out, whiten=True)
    assert 0 < whitened["mAP"] <= 1 and whitened["processing"]["pca"] == 8
    assert main(["eval", "retrieval", out, "--dataset", "holidays", "--whiten"]) == 2  # no --pca-from
    assert "--pca-from" in capsys.readouterr().err
    assert main(["eval", "retrieval", out, "--dataset", "oxford5k"]) == 2  # needs --gt


def test_oxford_style_ground_truth_with_cropped_queries(holidays, tmp_path, capsys):
    """Oxford's gt files for the same set (query = each group's first image, positives its group, one
    member junk); crop-queries writes the boxes, their extract is passed as --queries."""
    images, out = holidays
    gt = tmp_path / "gt"
    gt.mkdir()
    names = sorted(os.path.splitext(n)[0] for n in os.listdir(images))
    groups = sorted({n[:4] for n in names})
    for g in groups:
        members = [n for n in names if n[:4] == g]
        (gt / f"g{g}_1_query.txt").write_text(f"oxc1_{g}00 10 5 150.5 90\n")
        (gt / f"g{g}_1_good.txt").write_text("\n".join(members[:2]) + "\n")
        (gt / f"g{g}_1_ok.txt").write_text(members[2] + "\n")
        (gt / f"g{g}_1_junk.txt").write_text(members[3] + "\n")
    crops = str(tmp_path / "crops")
    assert main(["eval", "crop-queries", "--dataset", "oxford5k", "--gt", str(gt), "--images", images, "--out", crops]) == 0  # fmt: skip
    with Image.open(os.path.join(crops, f"{groups[0]}00.png")) as crop:
        assert crop.size == (141, 85)  # x 10..151 (150.5 rounded outwards), y 5..90
    qfeats = str(tmp_path / "qfeats")
    fastfeat.extract(crops, qfeats, model="caffenet", weights="random:0", layers=["relu7"], progress=False)
    capsys.readouterr()
    full = evaluate(out, "oxford5k", gt=str(gt))
    cropped = evaluate(out, "oxford5k", gt=str(gt), queries=qfeats)
    assert full["queries"] == cropped["queries"] == len(groups) and 0 < cropped["mAP"] <= 1
    # the full-image query is in the database and in its good list: ranked first, so AP counts it
    ids, _, x = fastfeat.data.load(out, "relu7", dtype="float32")
    assert all(ap > 0 for ap in full["ap"])
    # the same check as Holidays, by the independent AP: cropped queries, junk skipped
    _, _, qx = fastfeat.data.load(qfeats, "relu7", dtype="float32")
    q_ids = fastfeat.data.load(qfeats, "relu7")[0]
    stems = [os.path.splitext(os.path.basename(i))[0] for i in ids]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    aps = []
    for qid, q in zip(q_ids, qx, strict=True):
        g = os.path.splitext(os.path.basename(qid))[0][:4]
        order = np.argsort(-(xn @ (q / np.linalg.norm(q))), kind="stable")
        members = [n for n in names if n[:4] == g]
        aps.append(oxford_ap([stems[i] for i in order], members[:3], members[3:]))
    assert cropped["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)


def test_revisited_and_ukbench_end_to_end(holidays, tmp_path):
    images, out = holidays
    names = sorted(os.path.splitext(n)[0] for n in os.listdir(images))
    queries = [n for n in names if n.endswith("00")]
    imlist = [n for n in names if not n.endswith("00")]
    gnd = [{"bbx": [0, 0, 50, 50], "easy": [imlist.index(q[:4] + "01")], "hard": [imlist.index(q[:4] + "02")],
            "junk": [imlist.index(q[:4] + "03")]} for q in queries]  # fmt: skip
    pkl = tmp_path / "gnd_rtest.pkl"
    pkl.write_bytes(pickle.dumps({"imlist": imlist, "qimlist": queries, "gnd": gnd}, protocol=4))
    report = evaluate(out, "roxford5k", gt=str(pkl))
    assert report["database"] == len(imlist) and set(report["protocols"]) == {"easy", "medium", "hard"}
    for setup in report["protocols"].values():
        assert 0 < setup["mAP"] <= 1 and set(setup["mP@k"]) == {"1", "5", "10"}
    # UKBench naming over the same 4-image groups: N-S between 1 (itself first) and 4
    ukb = tmp_path / "ukb"
    ukb.mkdir()
    for i, n in enumerate(names):
        os.link(os.path.join(images, n + ".jpg"), ukb / f"ukbench{i:05d}.jpg")
    ukb_out = str(tmp_path / "ukb_out")
    fastfeat.extract(str(ukb), ukb_out, model="caffenet", weights="random:0", layers=["relu7"], progress=False)
    ns = evaluate(ukb_out, "ukbench")["ns_score"]
    assert 1.0 <= ns <= 4.0
