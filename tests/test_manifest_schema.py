"""manifest.json is checked when read: a hand-corrupted one is refused in one line by verify, resume,
fastfeat.data and serve --index, never a traceback, and its file names never leave the output folder."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import fast_first

import fastfeat
from fastfeat.cli import main
from fastfeat.data import DataError, Shards
from fastfeat.errors import ConfigError
from fastfeat.output import FORMAT, ManifestError, validate_manifest

KW = {"model": "alexnet", "weights": "random:2", "layers": "relu7", "progress": False, "batch_size": 4}
EXTRACT_FLAGS = ["--model", "alexnet", "--weights", "random:2", "--layers", "relu7", "--batch-size", "4",
                 "--shard-size", "4", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("schema") / "out"
    fastfeat.extract(dataset, str(out), shard_size=4, **KW)
    return out


def _set(path: list, value):
    def edit(m):
        *head, last = path
        for key in head:
            m = m[key]
        m[last] = value

    return edit


def _delete(path: list):
    def edit(m):
        *head, last = path
        for key in head:
            m = m[key]
        del m[last]

    return edit


# (edit of the parsed manifest, what the one-line error says)
CORRUPTIONS = {
    "missing top key": (_delete(["shards"]), "the manifest has no 'shards'"),
    "missing shard key": (_delete(["shards", 0, "sha256"]), "shard record 0 has no 'sha256'"),
    "bad config value": (_set(["config", "shard_size"], 0), "the run's config has shard_size 0, expected at least 1"),
    "bad layer shape": (_set(["config", "metadata", "layers", "relu7"], [-1]), "layer 'relu7' of the run's metadata"),
    "unknown top key": (_set(["colour"], "red"), "the manifest has an unknown key 'colour'"),
    "unknown shard key": (_set(["shards", 1, "owner"], "me"), "shard record 1 has an unknown key 'owner'"),
    "wrong type": (_set(["shards", 0, "rows"], "4"), "'rows' of shard 0 is a string ('4'), expected a non-negative"),
    "bool for a count": (_set(["rows"], True), "'rows' of the manifest is true, expected a non-negative integer"),
    "shards not a list": (_set(["shards"], {"0": 1}), "'shards' of the manifest is an object, expected a list"),
    "format version": (_set(["format"], "fastfeat/2"), "format 'fastfeat/2' is not one this fastfeat reads (fastfeat/1)"),
    "parent file name": (_set(["shards", 0, "file"], "../evil.parquet"), "shard 0 names file '../evil.parquet', not a"),
    "absolute file name": (_set(["shards", 0, "file"], "/etc/passwd"), "shard 0 names file '/etc/passwd'"),
    "separator in name": (_set(["shards", 0, "file"], "part-00000.x/../../evil"), "names file 'part-00000.x/../../evil'"),
    "another shard's file": (_set(["shards", 1, "file"], "part-00000.parquet"), "which is another shard's"),
    "items file outside": (_set(["generations", 0, "items_file"], "../items-00000.arrow"), "names items file '../items"),
    "bad sha256": (_set(["shards", 0, "sha256"], "abc"), "'sha256' of shard 0 is not a sha256"),
}  # fmt: skip


@pytest.fixture(params=sorted(CORRUPTIONS))
def corrupted(request, finished, tmp_path):
    """A copy of a finished output whose manifest was edited by hand; and the bait a path escape would touch."""
    edit, expected = CORRUPTIONS[request.param]
    out = tmp_path / "run" / "out"
    shutil.copytree(finished, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    bait = tmp_path / "run" / "evil.parquet"
    bait.write_bytes(b"not yours")
    return out, expected, bait


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfeat: error: "), err
    return lines[0]


def test_the_written_manifest_passes(finished):
    manifest = json.loads((finished / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and validate_manifest(manifest) is manifest
    assert main(["verify", str(finished)]) == 0


def test_verify_refuses_a_corrupted_manifest_in_one_line(corrupted, capsys):
    out, expected, bait = corrupted
    assert main(["verify", str(out)]) == 2
    line = _one_line(capsys)
    assert str(out / "manifest.json") in line and expected in line, line
    assert bait.read_bytes() == b"not yours"


# Resume reads the manifest through the same validation as verify (above, every case): three cases here.
@pytest.mark.parametrize("corrupted", fast_first(sorted(CORRUPTIONS), keep=3), indirect=True)
def test_resume_refuses_a_corrupted_manifest_in_one_line(corrupted, dataset, capsys):
    out, expected, bait = corrupted
    before = sorted(p.name for p in out.iterdir())
    assert main(["extract", dataset, "--out", str(out), *EXTRACT_FLAGS]) == 2
    line = _one_line(capsys)
    assert expected in line and "--overwrite to replace it" in line, line
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing deleted
    assert bait.read_bytes() == b"not yours"


def test_data_and_serve_index_refuse_a_path_escape(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../evil.parquet"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"names file '\.\./evil\.parquet'"):
        Shards(str(out))
    from fastfeat.serve.index import read_manifest

    with pytest.raises(ConfigError, match=r"--index .*names file '\.\./evil\.parquet'"):
        read_manifest(str(out))


def test_overwrite_replaces_a_manifest_it_cannot_read(finished, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format"] = "fastfeat/99"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["extract", dataset, "--out", str(out), *EXTRACT_FLAGS, "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["format"] == FORMAT
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize("not_a_manifest", [[], "fastfeat/1", None, 3])
def test_a_manifest_that_is_not_an_object(not_a_manifest):
    with pytest.raises(ManifestError, match=r"^m\.json: holds .*, not an object"):
        validate_manifest(not_a_manifest, "m.json")


def test_shards_the_writer_holds_are_not_checked_again(finished):
    """A writer re-reads the manifest at every commit and takes only the shards it does not hold yet."""
    manifest = json.loads((finished / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "not one"
    assert validate_manifest(manifest, held={manifest["shards"][0]["index"]}) is manifest
    with pytest.raises(ManifestError, match="'sha256' of shard 0 is not a sha256"):
        validate_manifest(manifest, held={manifest["shards"][1]["index"]})
    manifest["shards"][1]["index"] = manifest["shards"][0]["index"]
    with pytest.raises(ManifestError, match="shard 0 is listed twice"):  # held or not
        validate_manifest(manifest, held={0})
