"""Read failures by cause (issue 22.1): a passing fault is retried and never recorded; a fault that does not
pass stops the run without committing the shard that holds the image; only an image's own reason makes an
error record, with its cause.  Local faults come from a reader hook (``open`` in fastfeat.sources.reader
raising EIO), object-store ones from the tests' fault proxy in front of moto (tests/s3_fault_proxy.py).
The backoff never sleeps here: ``fastfeat.faults.sleep`` is replaced by a recorder."""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import shutil
import threading
from collections import Counter

import pyarrow.parquet as pq
import pytest

import fastfeat
from fastfeat import faults, sources, storage
from fastfeat.cli import main
from fastfeat.errors import ReadStopped
from fastfeat.extractor import Extractor
from fastfeat.faults import Backoff, ImageUnreadable, ReadFault, image_cause, is_transient
from fastfeat.sources import Item, ItemReader

KW = dict(model="caffenet", weights="random:4", layers="relu7", batch_size=2, shard_size=4, progress=False)


# -- classification and backoff (no model) ----------------------------------------------------------------
@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EIO, "Input/output error"),
        OSError(errno.ESTALE, "Stale file handle"),
        OSError(errno.EAGAIN, "Resource temporarily unavailable"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        TimeoutError("timed out"),
        # pyarrow's S3 client, as it fails through the fault proxy (503 on HEAD, a reset), and S3's throttling:
        OSError(
            "When reading information for key 'p/a.jpg' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."
        ),  # noqa: E501
        OSError(
            "When reading information for key 'p/a.jpg' in bucket 'b': AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 56, Failure when receiving data from the peer"
        ),  # noqa: E501
        OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."),
        OSError("AWS Error UNKNOWN (HTTP status 429) during GetObject operation"),
    ],
    ids=["EIO", "ESTALE", "EAGAIN", "reset", "timeout", "s3-503", "s3-reset", "s3-slowdown", "s3-429"],
)
def test_passing_faults_are_transient_and_not_the_images(exc):
    assert is_transient(exc) and image_cause(exc) is None


@pytest.mark.parametrize(
    "exc, cause",
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), "missing"),
        (OSError(errno.ENOTDIR, "Not a directory"), "missing"),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), "not_image"),
        (ImageUnreadable("truncated tar member: 10 of 2000 bytes", "corrupt"), "corrupt"),
        (PermissionError(errno.EACCES, "Permission denied"), None),
        (OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"), None),
    ],
)
def test_only_an_images_own_reason_has_a_cause(exc, cause):
    assert image_cause(exc) == cause
    if cause is None:
        assert not is_transient(exc)  # the setup's: retrying would not help, it stops the run at once


def test_backoff_grows_to_its_cap_with_jitter():
    backoff, rng = Backoff(base_s=0.5, cap_s=4.0), random.Random(1)
    for retry, full in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        delays = [backoff.delay(retry, rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 4  # jittered, not one fixed value


class FlakyOpen:
    """``open`` for fastfeat.sources.reader: EIO for the first ``first`` opens of each file ``match`` picks."""

    def __init__(self, first: int, match=lambda path: True):
        self.first, self.match, self.opens = first, match, Counter()

    def __call__(self, file, *args, **kwargs):
        if self.match(str(file)):
            self.opens[str(file)] += 1
            if self.opens[str(file)] <= self.first:
                raise OSError(errno.EIO, "Input/output error", file)
        return builtins.open(file, *args, **kwargs)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Every backoff delay asked for; nothing actually waits."""
    asked: list[float] = []
    monkeypatch.setattr(faults, "sleep", asked.append)
    return asked


def test_reader_retries_eio_then_gives_up_and_tries_once_until_a_read_succeeds(tmp_path, monkeypatch, sleeps):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(name.encode())
    flaky = FlakyOpen(3, lambda p: not p.endswith("c.jpg"))
    monkeypatch.setattr(sources.reader, "open", flaky, raising=False)
    reader = ItemReader(retries=3, backoff=Backoff(base_s=1.0, cap_s=2.0))
    item = lambda name: Item(name, str(tmp_path / name), None)  # noqa: E731
    assert reader.read(item("a.jpg")) == b"a.jpg" and len(sleeps) == 3
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0 and 1.0 <= sleeps[2] <= 2.0  # capped
    flaky.first = 10**9  # b.jpg never opens now
    with pytest.raises(ReadFault) as exc:
        reader.read(item("b.jpg"))
    assert exc.value.attempts == 4 and str(exc.value).endswith("(4 attempts)") and "b.jpg" in str(exc.value)
    assert flaky.opens[str(tmp_path / "b.jpg")] == 4 and len(sleeps) == 6
    with pytest.raises(ReadFault) as exc:  # the store is still failing: one try, no backoff
        reader.read(item("a.jpg"))
    assert exc.value.attempts == 1 and len(sleeps) == 6
    assert reader.read(item("c.jpg")) == b"c.jpg"  # a success: retries again from here on
    with pytest.raises(ReadFault) as exc:
        reader.read(item("b.jpg"))
    assert exc.value.attempts == 4


# -- whole runs, local faults ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(dataset, tmp_path_factory) -> str:
    """Ten good images in two label folders: three output shards of KW."""
    root = tmp_path_factory.mktemp("faults") / "src"
    names = sorted(os.path.relpath(os.path.join(d, f), dataset) for d, _, fs in os.walk(dataset) for f in fs)
    for rel in [n for n in names if "/" in n][:10]:
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(dataset, rel), root / rel)
    return str(root)


@pytest.fixture(scope="module")
def clean(small, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("faults_clean") / "out")
    fastfeat.extract(small, out, **KW)
    return out


def _manifest(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "manifest.json")))


def _shards(out: str) -> list[tuple]:
    """Each committed shard as the manifest says: file, checksum (byte-for-byte identity), rows, records."""
    return [(r["file"], r["sha256"], r["rows"], r["errors"], r["warnings"]) for r in _manifest(out)["shards"]]


def _assert_equals_clean(out: str, clean: str) -> None:
    assert _shards(out) == _shards(clean) and len(_shards(out)) == 3
    assert _manifest(out)["complete"]
    assert pq.read_table(os.path.join(out, "errors.parquet")).num_rows == 0  # no image recorded as failed
    assert main(["verify", out]) == 0


def test_local_eio_on_the_first_reads_is_ridden_out_with_no_error_record(small, clean, tmp_path, monkeypatch, sleeps):
    flaky = FlakyOpen(3)
    monkeypatch.setattr(sources.reader, "open", flaky, raising=False)
    out = str(tmp_path / "out")
    summary = fastfeat.extract(small, out, **KW)
    assert summary["errors"] == 0 and summary["rows_written"] == 10
    _assert_equals_clean(out, clean)
    assert len(flaky.opens) == 10 and set(flaky.opens.values()) == {4}  # every image failed 3 times first
    assert len(sleeps) == 30


def test_a_local_fault_that_persists_stops_the_run_in_one_line_and_a_rerun_finishes(
    small, clean, tmp_path, monkeypatch, sleeps, capsys
):  # fmt: skip
    out = str(tmp_path / "out")
    items = sources.list_items(small)
    bad = items[5]  # shard 1 holds items 4..7
    flaky = FlakyOpen(10**9, lambda p: p == bad.path)
    monkeypatch.setattr(sources.reader, "open", flaky, raising=False)
    argv = ["extract", small, "--out", out, "--model", "caffenet", "--weights", "random:4", "--layers", "relu7",
            "--batch-size", "2", "--shard-size", "4", "--no-progress", "--read-retries", "2"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastfeat: error: stopped: 1 image of output shard 1 ")
    assert "Input/output error" in err[0] and "(3 attempts)" in err[0] and repr(bad.id) in err[0]
    assert flaky.opens[bad.path] == 3 and len(sleeps) == 2
    manifest = _manifest(out)
    assert [r["index"] for r in manifest["shards"]] == [0] and not manifest["complete"]  # shard 0 kept
    assert sorted(f for f in os.listdir(out) if f.startswith("part-")) == ["part-00000.parquet"]  # no temp left
    assert all(not r["errors"] for r in manifest["shards"])
    monkeypatch.setattr(sources.reader, "open", builtins.open, raising=False)  # the fault is gone
    fastfeat.extract(small, out, **KW)
    _assert_equals_clean(out, clean)


def test_negative_read_retries_is_a_one_line_error_that_writes_nothing(small, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["extract", small, "--out", str(out), "--weights", "random:4", "--read-retries", "-1"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "fastfeat: error: --read-retries must be at least 0, got -1\n"
    assert not out.exists()
    with pytest.raises(ValueError, match="--read-retries must be a whole number, at least 0, got -1"):
        fastfeat.extract(small, str(out), **KW, read_retries=-1)
    assert not out.exists()


def test_error_records_carry_their_cause(corrupt_dataset, tmp_path):
    out = str(tmp_path / "out")
    fastfeat.extract(corrupt_dataset, out, **KW)
    table = pq.read_table(os.path.join(out, "errors.parquet"))
    assert table.column_names == ["id", "stage", "message", "kept", "cause"]
    causes = dict(zip(table.column("id").to_pylist(), table.column("cause").to_pylist(), strict=True))
    assert causes == {"01_truncated.jpg": "corrupt", "03_text.jpg": "not_image"}
    assert {e["id"]: e["cause"] for r in _manifest(out)["shards"] for e in r["errors"]} == causes


def test_an_output_of_an_older_fastfeat_resumes_and_verifies(corrupt_dataset, tmp_path):
    """Records without a cause (an older fastfeat's) are kept on resume: a null cause in errors.parquet."""
    out = str(tmp_path / "out")
    kw = {**KW, "shard_size": 2}
    fastfeat.extract(corrupt_dataset, out, **kw)  # shards [00, 01_truncated] [02, 03_text] [04, 06]
    path = os.path.join(out, "manifest.json")
    manifest = json.load(open(path))
    for r in manifest["shards"][1:]:
        os.remove(os.path.join(out, r["file"]))
    manifest["shards"] = manifest["shards"][:1]
    for e in manifest["shards"][0]["errors"]:
        del e["cause"]
    manifest["complete"] = False
    os.remove(os.path.join(out, "errors.parquet"))
    with open(path, "w") as f:
        json.dump(manifest, f)
    fastfeat.extract(corrupt_dataset, out, **kw)
    table = pq.read_table(os.path.join(out, "errors.parquet"))
    assert dict(zip(table.column("id").to_pylist(), table.column("cause").to_pylist(), strict=True)) == {
        "01_truncated.jpg": None,
        "03_text.jpg": "not_image",
    }
    assert _manifest(out)["complete"] and main(["verify", out]) == 0


# -- object storage through the fault proxy --------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_small(s3_endpoint, small) -> str:
    """The small folder on S3: its URI."""
    prefix = s3_endpoint.prefix()
    s3_endpoint.upload_tree(small, prefix + "/src")
    return s3_endpoint.uri(prefix, "src")


def _s3_extract(source: str, out: str, **kw) -> dict:
    """Listed with the store healthy, then run: the faults configured by ``kw["faults"]`` hit the reads."""
    configure = kw.pop("faults")
    ex = Extractor(source, out, **{**KW, **kw})
    configure()
    return ex.run()


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["503", "reset"])
def test_s3_with_a_fifth_of_requests_failing_equals_a_clean_run(s3_endpoint, s3_small, clean, tmp_path, sleeps, failure):  # fmt: skip
    out = str(tmp_path / "out")
    with s3_endpoint.faults() as proxy:
        _s3_extract(s3_small, out, faults=lambda: proxy.configure(fail_share=0.2, failure=failure, seed=3))
        assert proxy.failures > 0
    _assert_equals_clean(out, clean)


@pytest.mark.slow
def test_s3_with_every_key_failing_its_first_requests_equals_a_clean_run(s3_endpoint, s3_small, clean, tmp_path, sleeps):  # fmt: skip
    out = str(tmp_path / "out")
    with s3_endpoint.faults() as proxy:
        # More than the S3 client's own retries (pyarrow 26 sends a failing request 31 times in 6 s before
        # it raises): fastfeat's retries must act.
        _s3_extract(s3_small, out, faults=lambda: proxy.configure(fail_first=40, failure="503"))
    assert len(sleeps) >= 10  # at least one retry per image
    _assert_equals_clean(out, clean)


def _down_at(proxy, key_suffix: str) -> threading.Thread:
    """The store goes down when the read of the key ending in ``key_suffix`` arrives; that request is reset."""
    hold = proxy.hold(lambda req: req.key.endswith(key_suffix))

    def go_down() -> None:
        if hold.reached.wait(300):
            proxy.down()
            hold.drop()

    thread = threading.Thread(target=go_down, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_s3_store_down_mid_run_is_ridden_out(s3_endpoint, s3_small, small, clean, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    sixth = sources.list_items(small)[5].id
    with s3_endpoint.faults() as proxy:
        waits: list[float] = []

        def sleep(seconds: float) -> None:  # the outage ends while fastfeat backs off for the second time
            waits.append(seconds)
            if len(waits) == 2:
                proxy.up()

        monkeypatch.setattr(faults, "sleep", sleep)
        thread = _down_at(proxy, sixth)
        _s3_extract(s3_small, out, faults=lambda: None)
        thread.join(5)
        assert len(waits) == 2 and any(d == "503" for _, _, d in proxy.log)
    _assert_equals_clean(out, clean)


@pytest.mark.slow
def test_s3_store_down_too_long_stops_the_run_and_a_rerun_equals_a_clean_run(
    s3_endpoint, s3_small, small, clean, tmp_path, sleeps
):  # fmt: skip
    out = str(tmp_path / "out")
    fifth = sources.list_items(small)[4].id  # the first of the batch [4, 5] of shard 1
    with s3_endpoint.faults() as proxy:
        thread = _down_at(proxy, fifth)
        with pytest.raises(ReadStopped) as exc:
            _s3_extract(s3_small, out, faults=lambda: None, read_retries=1)
        thread.join(5)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("stopped: 2 images of output shard 1 ")  # both of its batch
    assert "HTTP status 503" in message and repr(fifth) in message
    assert [r["index"] for r in _manifest(out)["shards"]] == [0]
    fastfeat.extract(s3_small, out, **KW)  # the store is back
    _assert_equals_clean(out, clean)


@pytest.mark.slow
def test_s3_key_that_always_fails_stops_the_run_and_commits_no_shard_holding_it(
    s3_endpoint, s3_small, small, clean, tmp_path, sleeps, capsys
):  # fmt: skip
    out = str(tmp_path / "out")
    last = sources.list_items(small)[9]  # shard 2 (items 8, 9)
    key = s3_small.removeprefix("s3://") + "/" + last.id
    with s3_endpoint.faults() as proxy:
        ex = Extractor(s3_small, out, **KW, read_retries=1)
        proxy.configure(always_fail={key})
        with pytest.raises(ReadStopped) as exc:
            ex.run()
    message = str(exc.value)
    assert message.startswith("stopped: 1 image of output shard 2 ") and repr(last.id) in message
    assert "not the image's" in message and "\n" not in message
    assert [r["index"] for r in _manifest(out)["shards"]] == [0, 1]
    assert not os.path.exists(os.path.join(out, "part-00002.parquet"))
    fastfeat.extract(s3_small, out, **KW)
    _assert_equals_clean(out, clean)
