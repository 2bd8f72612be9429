"""What a user sees at the end of a run: verify's verdict on unfinished or tampered output, failures
that must look like failures, corrupt JPEGs, resume after harmless changes, appending new items,
a finished output recognised before the model is loaded, bad flags before the heavy imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import column_matrix, cut_after_shards, jpeg_bytes, read_features
from PIL import Image

import fastfeat
from fastfeat.cli import main
from fastfeat.errors import ExtractFailed

KW = {"model": "alexnet", "weights": "random:2", "layers": "relu7", "progress": False, "batch_size": 4}


def _errors(out) -> dict[str, tuple[str, str, bool]]:
    t = pq.read_table(os.path.join(out, "errors.parquet")).to_pylist()
    return {r["id"]: (r["stage"], r["message"], r["kept"]) for r in t}


# -- verify -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "out"
    fastfeat.extract(dataset, str(out), shard_size=4, **KW)
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(src, dst)
    return dst


def _verify(out, capsys, *flags) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["verify", str(out), *flags])
    return code, capsys.readouterr().err


def test_verify_refuses_an_interrupted_run_unless_partial(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    n = len(json.loads((out / "manifest.json").read_text())["shards"])
    cut_after_shards(out, 2)  # as a run killed after 2 shards
    code, err = _verify(out, capsys)
    assert code == 1 and f"incomplete: 2 of {n} shards finished, missing 2-{n - 1}" in err, err
    assert "--partial" in err
    code, err = _verify(out, capsys, "--partial")
    assert code == 0, err


def test_verify_refuses_one_half_of_a_split_run(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    fastfeat.extract(dataset, str(out), shard_size=4, num_shards=2, shard_index=0, **KW)
    code, err = _verify(out, capsys)
    assert code == 1 and "incomplete" in err and "missing 1, 3" in err, err
    assert _verify(out, capsys, "--partial")[0] == 0


def test_verify_flags_a_stray_shard_and_a_missing_error_table(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    shutil.copy(out / "part-00000.parquet", out / "part-00009.parquet")
    code, err = _verify(out, capsys)
    assert code == 1 and "part-00009.parquet: not listed in the manifest" in err
    (out / "part-00009.parquet").unlink()
    (out / "errors.parquet").unlink()
    code, err = _verify(out, capsys)
    assert code == 1 and "errors.parquet: missing" in err
    shutil.copy(finished / "errors.parquet", out / "errors.parquet")
    assert _verify(out, capsys)[0] == 0


# -- failures look like failures --------------------------------------------------------------------
def test_a_run_without_any_row_exits_non_zero(tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"missing_{i}.jpg\n" for i in range(4)))
    code = main(["extract", str(lst), "--out", str(tmp_path / "o"), "--weights", "random:0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "no image could be used: all 4 failed" in err and "errors.parquet" in err
    # The error names the path it tried.
    assert all(str(tmp_path / f"missing_{i}.jpg") in _errors(tmp_path / "o")[f"missing_{i}.jpg"][1] for i in range(4))


def test_max_error_rate(corrupt_dataset, tmp_path, capsys):
    # 2 bad files of 6: 33% errors.
    with pytest.raises(ExtractFailed, match="2 of 6 images failed") as failed:
        fastfeat.extract(corrupt_dataset, str(tmp_path / "a"), max_error_rate=0.25, **KW)
    assert failed.value.summary["rows_written"] == 4  # the rows are written all the same
    assert fastfeat.extract(corrupt_dataset, str(tmp_path / "b"), max_error_rate=0.5, **KW)["errors"] == 2
    code = main(["extract", corrupt_dataset, "--out", str(tmp_path / "c"), "--weights", "random:0",
                 "--no-progress", "--max-error-rate", "0.1"])  # fmt: skip
    assert code == 1 and "above --max-error-rate 0.1" in capsys.readouterr().err


# -- corrupt JPEGs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def damaged_jpegs(photos, tmp_path_factory):
    """Good JPEGs, and the same JPEGs with 200 garbage bytes in the middle of their entropy-coded data."""
    root = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(0)
    for i, p in enumerate(photos[:4]):
        data = bytearray(jpeg_bytes(Image.open(p).convert("RGB"), quality=90))
        (root / f"{i}_good.jpg").write_bytes(bytes(data))
        mid = len(data) // 2
        data[mid : mid + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
        (root / f"{i}_damaged.jpg").write_bytes(bytes(data))
    return root


@pytest.mark.slow
def test_recoverable_corruption_is_kept_with_a_record_and_never_printed_raw(damaged_jpegs, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastfeat", "extract", str(damaged_jpegs), "--out", str(out), "--model", "alexnet",
           "--weights", "random:2", "--layers", "relu7", "--batch-size", "8", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Corrupt JPEG" not in proc.stderr and "\x1b[" not in proc.stderr, proc.stderr  # nothing raw
    records = _errors(out)
    damaged = sorted(f for f in os.listdir(damaged_jpegs) if "damaged" in f)
    assert sorted(records) == damaged, records  # every damaged file has a record, no good one has
    for name in damaged:
        stage, message, kept = records[name]
        assert stage == "decode" and kept and "Corrupt JPEG data" in message, (name, records[name])
    table = read_features(str(out))
    assert table.num_rows == 8  # kept: the decoder recovered them
    # The good images' features do not depend on their damaged batch mates: the same batches with the
    # damaged files replaced by intact copies give bit-identical good rows.
    intact = tmp_path / "intact"
    shutil.copytree(damaged_jpegs, intact)
    for name in damaged:
        shutil.copy(intact / name.replace("damaged", "good"), intact / name)
    fastfeat.extract(str(intact), str(tmp_path / "intact_out"), **{**KW, "batch_size": 8})
    clean = read_features(str(tmp_path / "intact_out"))
    good = [i for i, name in enumerate(table.column("id").to_pylist()) if "good" in name]
    assert np.array_equal(column_matrix(table, "relu7")[good], column_matrix(clean, "relu7")[good])
    assert fastfeat.output.verify(str(out)) == []


def test_strict_skips_what_the_decoder_warned_about(damaged_jpegs, tmp_path):
    s = fastfeat.extract(str(damaged_jpegs), str(tmp_path / "out"), strict=True, **{**KW, "batch_size": 8})
    assert s["rows_written"] == 4 and s["errors"] == 4
    records = _errors(tmp_path / "out")
    assert all(not kept and "damaged" in name for name, (_, _, kept) in records.items()) and len(records) == 4
    assert sorted(read_features(str(tmp_path / "out")).column("id").to_pylist()) == [f"{i}_good.jpg" for i in range(4)]


# -- resume after harmless changes, append ----------------------------------------------------------
def test_a_moved_source_resumes_and_a_changed_precision_is_named(dataset, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dataset, src)
    out = str(tmp_path / "out")
    fastfeat.extract(str(src), out, shard_size=4, **KW)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    moved = tmp_path / "moved"
    src.rename(moved)
    s = fastfeat.extract(str(moved), out, shard_size=4, **KW)
    assert s["complete"] and s["skipped_already_done"] == 4
    other = (
        "fp32"
        if json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["metadata"]["precision"] != "fp32"
        else "fp16"
    )
    with pytest.raises(ValueError) as refused:
        fastfeat.extract(str(moved), out, shard_size=4, precision=other, **KW)
    message = str(refused.value)
    assert f"→ {other}" in message and "precision: " in message and len(message) < 300, message


def test_append_extracts_only_the_new_items(dataset, tmp_path, photos):
    src = tmp_path / "src"
    shutil.copytree(dataset, src)
    out = str(tmp_path / "out")
    first = fastfeat.extract(str(src), out, shard_size=4, **KW)
    Image.open(photos[0]).convert("RGB").save(src / "cat" / "zz_new.jpg")
    Image.open(photos[1]).convert("RGB").save(src / "aa_new.jpg")
    with pytest.raises(ValueError, match=r"2 added, 0 removed.*--append"):
        fastfeat.extract(str(src), out, shard_size=4, **KW)
    s = fastfeat.extract(str(src), out, shard_size=4, append=True, **KW)
    assert s["processed"] == 2 and s["rows_written"] == 2 and s["complete"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [g["items"] for g in manifest["generations"]] == [first["images"], 2]
    assert fastfeat.output.verify(out) == []
    ids = read_features(out).column("id").to_pylist()
    assert sorted(ids) == sorted({*ids}) and len(ids) == first["images"] + 2
    assert ids[-2:] == ["aa_new.jpg", "cat/zz_new.jpg"]  # new shards after the existing ones, in source order
    # The same command again: nothing new, nothing to do; a clean run of the grown folder has the same rows.
    assert fastfeat.extract(str(src), out, shard_size=4, append=True, **KW)["up_to_date"]
    clean = str(tmp_path / "clean")
    fastfeat.extract(str(src), clean, shard_size=4, **KW)
    a, b = read_features(out), read_features(clean)
    order = [b.column("id").to_pylist().index(i) for i in ids]
    assert np.array_equal(column_matrix(a, "relu7"), column_matrix(b, "relu7")[order])


# -- a finished output, bad flags -------------------------------------------------------------------
def test_a_finished_output_is_recognised_before_the_model_is_loaded(finished, tmp_path, dataset, monkeypatch):
    out = _copy(finished, tmp_path)
    summary_before = (out / "summary.json").read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built for a finished output")

    monkeypatch.setattr(fastfeat.extractor, "build_stages", no_model)  # backend and decoder are built there
    s = fastfeat.extract(dataset, str(out), shard_size=4, **KW)
    assert s["up_to_date"] and s["rows"] == json.loads(summary_before)["rows_written"]
    assert (out / "summary.json").read_text() == summary_before  # the real run's figures are kept


@pytest.mark.parametrize(
    "flags, message",
    [(["--batch-size", "0"], "--batch-size must be >= 1"), (["--backend", "tensorrt"], "unknown backend"),
     (["--model", "vgg99"], "unknown model"), (["--layers", "fc9"], "unknown layer"),
     (["--format", "lance"], "unknown output format"), (["--max-error-rate", "2"], "--max-error-rate")],
)  # fmt: skip
def test_bad_flags_are_reported_before_torch_is_imported(flags, message, dataset, tmp_path):
    code = (
        "import sys; from fastfeat.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules and 'nvidia.dali' not in sys.modules, 'heavy import'; sys.exit(rc)"
    )
    cmd = [sys.executable, "-c", code, "extract", dataset, "--out", str(tmp_path / "o"), "--weights", "random:0"]
    proc = subprocess.run(cmd + flags, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o").exists()
