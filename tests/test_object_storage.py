"""Sources and outputs on object storage, against a real local S3 endpoint (moto's server, see
tests/s3_server.py): the output equals a local run's, verify and the readers go by the manifest, a
SIGKILLed run resumes without a duplicate or unlisted shard object, and what cannot work is refused."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hold_at import start_held

import fastfeat
from fastfeat import data, storage
from fastfeat.cli import main
from fastfeat.sources import ItemReader, list_items

pytestmark = pytest.mark.slow  # moto's S3 server and subprocess extracts

KW = dict(model="caffenet", weights="random:4", layers="relu7", batch_size=4, shard_size=4, progress=False)
RUN_FILES = ["errors.parquet", "items-00000.arrow", "manifest.json", "summary.json"]


def _manifest(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "manifest.json")))


def _shard_records(out: str) -> list[tuple]:
    """What the manifest says of each shard: where the rows come from, not where the folder is."""
    keys = ("index", "file", "rows", "first_item", "end_item", "sha256", "bytes", "errors", "warnings")
    return [tuple(json.dumps(r[k]) for k in keys) for r in _manifest(out)["shards"]]


def _read_table(location: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(location)))


def _rows(out: str) -> pa.Table:
    """Every row of the manifest's shards, in shard order."""
    return pa.concat_tables([_read_table(storage.join(out, r["file"])) for r in _manifest(out)["shards"]])


def _object_names(s3, out: str) -> list[str]:
    """The keys under ``out``; not the empty ``out/`` marker pyarrow leaves after deleting an object."""
    return [k for k in s3.keys(out.split("?")[0].removeprefix(f"s3://{s3.bucket}/")) if k]


@pytest.fixture(scope="module")
def corpus(dataset, tmp_path_factory) -> str:
    """The labelled dataset plus two images that cannot be used: the errors table has rows."""
    root = tmp_path_factory.mktemp("s3corpus") / "src"
    shutil.copytree(dataset, root)
    (root / "cat" / "not_an_image.jpg").write_bytes(b"this is not an image\n" * 20)
    jpg = next(os.path.join(d, f) for d, _, fs in os.walk(dataset) for f in sorted(fs) if f.endswith(".jpg"))
    (root / "dog" / "truncated.jpg").write_bytes(open(jpg, "rb").read()[:300])
    return str(root)


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("s3local") / "out")
    fastfeat.extract(corpus, out, **KW)
    return out


@pytest.fixture(scope="module")
def s3_corpus(s3_endpoint, corpus) -> str:
    """The corpus uploaded to the bucket: its key prefix."""
    prefix = s3_endpoint.prefix()
    s3_endpoint.upload_tree(corpus, prefix + "/src")
    return prefix


# -- the same output as a local run ---------------------------------------------------------------------
@pytest.mark.parametrize("source", ["s3", "local"])
def test_extract_to_s3_equals_a_local_run(source, s3_endpoint, s3_corpus, corpus, local_run, capsys):
    s3 = s3_endpoint
    if source == "s3":  # the endpoint named in the URIs themselves: every derived key keeps the options
        src, out = s3.query_uri(s3_corpus, "src"), s3.query_uri(s3.prefix(), "out")
    else:
        src, out = corpus, s3.uri(s3.prefix(), "out")
    summary = fastfeat.extract(src, out, **KW)
    assert summary["errors"] == 2 and summary["out"] == out.split("?")[0]
    assert _shard_records(out) == _shard_records(local_run)  # same files, byte for byte (sha256)
    assert _rows(out).equals(_rows(local_run))
    assert _read_table(storage.join(out, "errors.parquet")).equals(
        _read_table(os.path.join(local_run, "errors.parquet"))
    )
    assert main(["verify", out]) == 0
    got, want = data.load(out, "relu7"), data.load(local_run, "relu7")
    assert got[:2] == want[:2] and (got[2] == want[2]).all()
    parts = [r["file"] for r in _manifest(out)["shards"]]
    assert _object_names(s3, out) == sorted(RUN_FILES + parts)  # nothing else: no temp, no marker object
    assert fastfeat.extract(src, out, **KW)["up_to_date"]
    # verify reads the objects, not just the manifest: a stray shard object and a damaged one are found.
    client, key = s3.client(), out.split("?")[0].removeprefix(f"s3://{s3.bucket}/")
    client.put_object(Bucket=s3.bucket, Key=f"{key}/part-09999.parquet", Body=b"stray")
    client.put_object(Bucket=s3.bucket, Key=f"{key}/{parts[1]}", Body=b"x" * _manifest(out)["shards"][1]["bytes"])
    capsys.readouterr()
    assert main(["verify", out]) == 1
    err = capsys.readouterr().err
    assert "part-09999.parquet: not listed in the manifest" in err and f"{parts[1]}: checksum mismatch" in err


def _tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def other_sources(photos, tmp_path_factory, s3_endpoint):
    """A list file, WebDataset tars and a Parquet file, locally and (same relative layout) on S3."""
    root = tmp_path_factory.mktemp("s3kinds")
    (root / "img").mkdir()
    images = {f"img/{i}_{os.path.basename(p)}": open(p, "rb").read() for i, p in enumerate(photos[:5])}
    for name, payload in images.items():
        (root / name).write_bytes(payload)
    lines = ["# path<TAB>label"] + [f"{name}\t{'even' if i % 2 == 0 else 'odd'}" for i, name in enumerate(images)]
    (root / "list.tsv").write_text("\n".join(lines) + "\n")
    members = [(f"s{i}.{n.rsplit('.', 1)[1]}", b) for i, (n, b) in enumerate(images.items())]
    members += [(f"s{i}.cls", str(i % 2).encode()) for i in range(len(images))]
    _tar(str(root / "shards-0.tar"), members[:3] + members[5:8])
    _tar(str(root / "shards-1.tar"), members[3:5] + members[8:])
    table = pa.table({"image": list(images.values()), "label": [n[4] for n in images]})
    pq.write_table(table, root / "data.parquet", row_group_size=2)
    prefix = s3_endpoint.prefix()
    s3_endpoint.upload_tree(str(root), prefix)
    return str(root), prefix


@pytest.mark.parametrize("name", ["list.tsv", "shards-{0..1}.tar", "data.parquet"])
def test_list_tar_and_parquet_sources_on_s3_read_like_local_copies(name, other_sources, s3_endpoint):
    local_root, prefix = other_sources
    local, remote = list_items(os.path.join(local_root, name)), list_items(s3_endpoint.uri(prefix, name))
    assert list(remote.ids()) == list(local.ids()) and list(remote.labels()) == list(local.labels())
    assert all(p.startswith(f"s3://{s3_endpoint.bucket}/{prefix}/") for p in (it.path for it in remote))
    reader, local_reader = ItemReader(), ItemReader()
    assert [reader.read(it) for it in remote] == [local_reader.read(it) for it in local]


@pytest.mark.parametrize("name", ["list.tsv", "shards-{0..1}.tar"])
def test_list_and_tar_sources_on_s3_extract_like_local_ones(name, other_sources, s3_endpoint, tmp_path):
    local_root, prefix = other_sources
    local_out, out = str(tmp_path / "out"), s3_endpoint.uri(s3_endpoint.prefix(), "out")
    fastfeat.extract(os.path.join(local_root, name), local_out, **KW)
    fastfeat.extract(s3_endpoint.uri(prefix, name), out, **KW)
    assert _rows(out).equals(_rows(local_out)) and _shard_records(out) == _shard_records(local_out)
    assert main(["verify", out]) == 0
    # --overwrite on an object store: the other run's objects are deleted, not left beside the new ones.
    fastfeat.extract(s3_endpoint.uri(prefix, name), out, **{**KW, "shard_size": 2}, overwrite=True)
    parts = [r["file"] for r in _manifest(out)["shards"]]
    assert len(parts) == 3 and _object_names(s3_endpoint, out) == sorted(RUN_FILES + parts)


def test_npy_format_on_s3_reads_like_a_local_one(other_sources, s3_endpoint, tmp_path):
    """--format npy: the .npy files are staged locally (their header is rewritten on close), uploaded,
    and fastfeat.data reads the rows of a unit with a ranged GET."""
    local_root, _ = other_sources
    kw = {**KW, "format": "npy", "shard_size": 3}
    local_out, out = str(tmp_path / "out"), s3_endpoint.uri(s3_endpoint.prefix(), "out")
    fastfeat.extract(os.path.join(local_root, "list.tsv"), local_out, **kw)
    fastfeat.extract(os.path.join(local_root, "list.tsv"), out, **kw)
    assert _shard_records(out) == _shard_records(local_out) and main(["verify", out]) == 0
    got, want = data.load(out, "relu7", rows=[4, 0, 3]), data.load(local_out, "relu7", rows=[4, 0, 3])
    assert got[:2] == want[:2] and (got[2] == want[2]).all() and len(got[0]) == 3


# -- kill and resume ----------------------------------------------------------------------------------------
def test_sigkill_while_writing_to_s3_then_resume_equals_a_clean_run(corpus, s3_endpoint, tmp_path):
    src = corpus  # 18 images, 6 shards
    prefix = s3_endpoint.prefix()
    out = s3_endpoint.uri(prefix, "out")
    flags = ["--model", "caffenet", "--weights", "random:4", "--layers", "relu7", "--batch-size", "2"]
    flags += ["--shard-size", "3", "--no-progress"]
    args = ["extract", str(src), "--out", out, *flags]
    cmd = [sys.executable, "-m", "fastfeat", *args]
    client = s3_endpoint.client()

    def finished() -> int:
        try:
            body = client.get_object(Bucket=s3_endpoint.bucket, Key=f"{prefix}/out/manifest.json")["Body"].read()
        except client.exceptions.NoSuchKey:
            return 0
        return len(json.loads(body)["shards"])

    # Held (tests/hold_at.py) just before the second shard's upload: the first shard is listed, the
    # second one is staged on this host, written in full but not uploaded; then killed.
    proc = start_held(args, str(tmp_path), "fastfeat.storage:upload", 2, ".parquet")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_shards = -(-sum(len(fs) for _, _, fs in os.walk(src)) // 3)
    assert finished() == 1 < n_shards
    staged = [f for f in os.listdir(_staging_dir(out)) if f".{proc.pid}@" in f]  # the killed run's partial shard
    assert staged
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not [f for f in os.listdir(_staging_dir(out)) if f in staged]  # removed, as a dead process's files
    clean = str(tmp_path / "clean")
    subprocess.run([*cmd[:6], clean, *cmd[7:]], check=True, capture_output=True, timeout=300)
    assert _rows(out).equals(_rows(clean)) and _shard_records(out) == _shard_records(clean)
    ids = _rows(out).column("id").to_pylist()
    assert len(ids) == len(set(ids))
    parts = [r["file"] for r in _manifest(out)["shards"]]
    assert len(parts) == n_shards and _object_names(s3_endpoint, out) == sorted(RUN_FILES + parts)
    assert main(["verify", out]) == 0


def _staging_dir(out: str) -> str:
    from fastfeat.output import OutputDir

    return OutputDir.staging_dir(type("Out", (), {"path": out})())


# -- refused -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-shards", "2", "--shard-index", "1"], "--num-shards parts cannot share an output on object storage"),
        (["--devices", "0,1"], "--devices parts cannot share an output on object storage"),
    ],
)
def test_parts_writing_to_s3_are_refused(flags, message, s3_endpoint, corpus, capsys):
    out = s3_endpoint.uri(s3_endpoint.prefix(), "out")
    assert main(["extract", corpus, "--out", out, "--weights", "random:0", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--ray" in err[0], err
    assert _object_names(s3_endpoint, out) == []


def test_bad_uris_are_one_line_errors_and_write_nothing(s3_endpoint, corpus, tmp_path, capsys):
    prefix = s3_endpoint.prefix()
    cases = [
        (["extract", corpus, "--out", "s3://no-such-bucket/out"], "bucket does not exist: s3://no-such-bucket"),
        (["extract", s3_endpoint.uri(prefix, "nothing"), "--out", str(tmp_path / "o")], "source does not exist: s3://"),
        (["extract", "nosuchscheme://x/y", "--out", str(tmp_path / "o")], "cannot use nosuchscheme://x/y"),
        (["verify", s3_endpoint.uri(prefix, "out")], "cannot read s3://"),
    ]
    for argv, message in cases:
        extra = ["--weights", "random:0"] if argv[0] == "extract" else []
        assert main([*argv, *extra]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "o").exists() and s3_endpoint.keys(prefix) == []


def test_location_helpers():
    q = "s3://b/run?endpoint_override=h:1&scheme=http"
    assert storage.join(q, "part-00000.parquet") == "s3://b/run/part-00000.parquet?endpoint_override=h:1&scheme=http"
    assert storage.parent(storage.join(q, "x.jpg")) == q and storage.basename(storage.join(q, "x.jpg")) == "x.jpg"
    assert storage.display(q) == "s3://b/run" and storage.join("out", "a") == os.path.join("out", "a")
    assert storage.local_path("file:///data/my%20out") == "/data/my out" and storage.local_path("rel/x") == "rel/x"
    assert not storage.is_remote("file:///x") and storage.is_remote("gs://b/x") and not storage.is_remote("/x")
    with pytest.raises(storage.StorageError, match="another host"):
        storage.local_path("file://elsewhere/x")
