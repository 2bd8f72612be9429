"""Uploads to object storage killed at exact points (SIGKILL, and SIGINT) and resumed: the resume equals a
clean run byte for byte and no stray object is left (fastfeat.storage writes a temp key and publishes it
with a server-side copy; the output's opening deletes what a killed writer left).

The points are deterministic holds, not sleeps: the fault proxy in front of the test S3 server
(tests/s3_fault_proxy.py, ``s3_endpoint.proxy``) holds one chosen request (the completion of a shard's
temp upload, its publishing copy, the temp's deletion, the manifest's temp upload or its copy) and tells
the test it is held; the test then signals the extract process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fastfeat
from fastfeat import storage
from fastfeat.cli import main

pytestmark = pytest.mark.slow

FLAGS = ["--model", "caffenet", "--weights", "random:4", "--layers", "relu7", "--batch-size", "2", "--shard-size", "3"]
KW = dict(model="caffenet", weights="random:4", layers="relu7", batch_size=2, shard_size=3, progress=False)
RUN_FILES = ["errors.parquet", "items-00000.arrow", "manifest.json", "summary.json"]
WAIT_S = 300  # bound on every hold and process below
# ``python -m fastfeat ARGS`` with Python's default SIGINT handler installed first.
SIGINT_DEFAULT = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from fastfeat.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _nth(n: int, match):
    """A hold predicate true for the n-th request that ``match`` accepts."""
    seen = [0]

    def predicate(req) -> bool:
        if match(req):
            seen[0] += 1
            return seen[0] == n
        return False

    return predicate


def _copy_to(name: str):
    return lambda r: r.method == "PUT" and r.key.endswith("/" + name) and "x-amz-copy-source" in r.headers


def _temp_of(name: str, method: str, query: str = ""):
    return lambda r: r.method == method and "/.tmp-" in r.key and r.key.endswith("-" + name) and query in r.query


# (point, predicate factory): the held request
POINTS = {
    "shard temp upload completes": lambda: _nth(1, _temp_of("part-00001.parquet", "POST", "uploadId=")),
    "shard published by copy": lambda: _nth(1, _copy_to("part-00001.parquet")),
    "shard temp deleted": lambda: _nth(1, _temp_of("part-00001.parquet", "DELETE")),
    "manifest temp upload completes": lambda: _nth(3, _temp_of("manifest.json", "POST", "uploadId=")),
    "manifest published by copy": lambda: _nth(3, _copy_to("manifest.json")),
}


CASES = [(p, signal.SIGKILL) for p in POINTS] + [
    ("shard temp upload completes", signal.SIGINT),
    ("manifest published by copy", signal.SIGINT),
]


@pytest.fixture(scope="module")
def clean_run(dataset, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("clean") / "out")
    fastfeat.extract(dataset, out, **KW)
    return out


def _manifest(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "manifest.json")))


def _rows(out: str) -> pa.Table:
    tables = [pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(out, r["file"])))) for r in _manifest(out)["shards"]]  # fmt: skip
    return pa.concat_tables(tables)


def _records(out: str) -> list:
    keys = ("index", "file", "rows", "first_item", "end_item", "sha256", "bytes", "errors", "warnings")
    return [tuple(json.dumps(r[k]) for k in keys) for r in _manifest(out)["shards"]]


@pytest.mark.parametrize(
    "point, signum",
    [pytest.param(p, s, id=f"{p.replace(' ', '_')}-{s.name}") for p, s in CASES],
)
def test_killed_upload_then_resume_equals_a_clean_run_and_leaves_no_stray_object(
    point, signum, s3_endpoint, dataset, clean_run
):
    prefix = s3_endpoint.prefix()
    out = s3_endpoint.uri(prefix, "out")
    cmd = [sys.executable, "-m", "fastfeat", "extract", dataset, "--out", out, *FLAGS, "--no-progress"]
    # Ctrl-C as a terminal delivers it: Python's own SIGINT handler in the child, whatever disposition the
    # test process would hand down (a child started while SIGINT is ignored ignores it too).
    interruptible = [sys.executable, "-c", SIGINT_DEFAULT, *cmd[3:]]
    with s3_endpoint.faults() as proxy:
        hold = proxy.hold(POINTS[point]())
        proc = subprocess.Popen(interruptible, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert hold.reached.wait(WAIT_S), f"never reached: {point}"
            proc.send_signal(signum)
            if signum == signal.SIGINT:  # Python acts on it once the held call returns
                hold.release()
            _, err = proc.communicate(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode != 0, err
    names = s3_endpoint.keys(prefix + "/out")
    if "manifest.json" in names:  # whatever the point, a manifest is whole (JSON), never empty or partial
        listed = {r["file"] for r in _manifest(out)["shards"]}
        assert listed <= set(names), (listed, names)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    assert _rows(out).equals(_rows(clean_run)) and _records(out) == _records(clean_run)
    parts = [r["file"] for r in _manifest(out)["shards"]]
    assert [k for k in s3_endpoint.keys(prefix + "/out") if k] == sorted(RUN_FILES + parts)  # no .tmp-, no extra
    assert main(["verify", out]) == 0


def test_an_upload_that_fails_midway_publishes_nothing(s3_endpoint):
    """The bug of apache/arrow#40502 (a stream closed on an exception publishes what it holds), fixed by
    the temp key: an exception between open and the end of the write leaves no object at all."""
    prefix = s3_endpoint.prefix()
    target = s3_endpoint.uri(prefix, "manifest.json")

    def write(out):
        out.write(b'{"half": ')
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        storage._put(target, write)
    # (pyarrow leaves an empty "prefix/" marker when it deletes a folder's last object: not data)
    assert [k for k in s3_endpoint.keys(prefix) if k] == []
    storage.write_bytes(target, b"{}")
    assert [k for k in s3_endpoint.keys(prefix) if k] == ["manifest.json"] and storage.read_bytes(target) == b"{}"
