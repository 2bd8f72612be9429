"""fastfeat probe --layer a,b,c --chart: one probe per layer, one table, a JSON row per layer, the chart."""

from __future__ import annotations

import json

import pytest
from crop_classes import make_crop_classes

import fastfeat
from fastfeat.cli import main
from fastfeat.probe import run_probe

LAYERS = ["pool5", "fc6", "relu6", "fc7", "relu7"]


@pytest.fixture(scope="module")
def feats(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("depth")
    make_crop_classes(str(root / "src"), photos[:4], 6, seed=2)
    out = str(root / "out")
    fastfeat.extract(str(root / "src"), out, model="caffenet", weights="random:0", layers=LAYERS, progress=False)
    return out


@pytest.mark.slow
def test_depth_table_json_and_chart(feats, tmp_path, capsys):
    chart, report_file = str(tmp_path / "depth.png"), str(tmp_path / "depth.json")
    argv = ["probe", feats, "--layer", ",".join(LAYERS), "--train-per-class", "3", "--splits", "2"]
    assert main([*argv, "--json", report_file, "--chart", chart]) == 0
    printed = capsys.readouterr().out
    report = json.loads(open(report_file).read())
    assert [row["layer"] for row in report["layers"]] == LAYERS  # a row per layer, in the given order
    assert [row["depth"] for row in report["layers"]] == list(range(len(LAYERS)))
    for row in report["layers"]:
        assert row["layer"] in printed and len(row["C_per_split"]) == 2
        # each row is the single-layer probe's result, unchanged
        single = run_probe(feats, row["layer"], train_per_class=3, splits=2)
        assert row["mean_class_accuracy"] == pytest.approx(single["mean_class_accuracy"]["mean"])
        assert row["mean_class_accuracy_std"] == pytest.approx(single["mean_class_accuracy"]["std"])
        assert [s["C"] for s in single["per_split"]] == row["C_per_split"]
    with open(chart, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_depth_refuses_before_the_work(feats, tmp_path, capsys):
    assert main(["probe", feats, "--layer", "fc6,fc6"]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["probe", feats, "--layer", "fc6,relu7", "--chart", str(tmp_path / "d.txt")]) == 2
    assert ".png" in capsys.readouterr().err
    assert main(["probe", feats, "--layer", "fc6,conv9", "--train-per-class", "3"]) == 2
    err = capsys.readouterr().err
    assert "conv9" in err and "layer fc6" not in err  # refused before the first layer's probe
