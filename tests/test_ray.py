"""``fastfeat extract --ray`` on a local Ray instance (one per module), and fastfeat.ray_data.

Faults are made deterministic with a hook the tests inject into the workers (run_on_ray's ``on_batch``:
fastfeat.testing.HoldShard): the worker about to write a batch of the named shard records its pid in
``held`` and waits, its temp file open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers import column_matrix, read_features, torch_threads

from fastfeat import cluster, storage
from fastfeat.cli import main
from fastfeat.cluster import RayRunError, run_on_ray
from fastfeat.errors import ReadStopped
from fastfeat.extractor import Extractor
from fastfeat.output import remove_tmp_of, tmp_name, verify
from fastfeat.testing import HoldShard

pytestmark = pytest.mark.slow  # Ray

ray = pytest.importorskip("ray")  # the dev install has it (fastfeat[ray]); a bare install skips this module

RUN = dict(model="caffenet", weights="random:0", layers="relu6", batch_size=2, shard_size=3, progress=False)
CLI_RUN = ["--weights", "random:0", "--layers", "relu6", "--batch-size", "2", "--shard-size", "3", "--no-progress"]


# A driver process whose workers hold (HoldShard): argv = source, out, Ray address, hold folder, RUN as JSON.
HELD_DRIVER = """
import json, sys
from fastfeat.cluster import run_on_ray
from fastfeat.extractor import Extractor
from fastfeat.testing import HoldShard
source, out, address, folder, run = sys.argv[1:]
ex = Extractor(source, out, **json.loads(run))
run_on_ray(ex, address=address, workers=1, cpus_per_worker=1, on_batch=HoldShard(folder))
"""


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory, s3_endpoint):
    """The one Ray instance of this module, and the folder of the workers' hold (HoldShard).  Started after
    s3_endpoint: the workers inherit the raylet's environment (its AWS_* variables)."""
    folder = tmp_path_factory.mktemp("hold")
    # Room for two runs' weights (232 MB each): a run's put may come before the last run's copy is freed,
    # and spilling it is refused on a disk over 95% full (CI failed so at stop 19).
    ray.init(num_cpus=2, object_store_memory=768 << 20, include_dashboard=False, log_to_driver=False)
    yield folder
    ray.shutdown()


@contextlib.contextmanager
def holding(folder, shard: int):
    """Workers stop mid-way through writing ``shard`` (the first attempt only) until the block ends."""
    (folder / "held").unlink(missing_ok=True)
    (folder / "hold").write_text(str(shard))
    try:
        yield
    finally:
        (folder / "hold").unlink(missing_ok=True)


# Generous: a worker reaches its shard only after Ray starts and its actor builds the model (tens of
# seconds on the 2-core box); the waits end as soon as that happens, or as soon as the driver has failed.
def wait_for(predicate, timeout: float = 180.0, what: str = "condition", failed=lambda: None):
    """``predicate()``'s first true value; fails at once, with its message, when ``failed()`` says the run
    being waited on has already ended (so a driver's own error is shown, not a 180 s timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if (why := failed()) is not None:
            raise AssertionError(f"while waiting for {what}: {why}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def thread_failed(thread: threading.Thread, result: dict):
    """For wait_for: the error a driver thread ended with (see drive() below), or None while it runs."""
    if thread.is_alive():
        return None
    return f"the driver ended: {result.get('error', result.get('summary'))!r}"


def process_failed(proc: subprocess.Popen):
    """For wait_for: a driver process's exit code and error output once it has ended, else None."""
    if proc.poll() is None:
        return None
    return f"the driver exited with {proc.returncode}: {proc.stderr.read().decode(errors='replace')[-2000:]}"


def held(folder) -> dict | None:
    try:
        return json.loads((folder / "held").read_text())
    except (OSError, ValueError):  # not yet written, or being written
        return None


@pytest.fixture(scope="module")
def clean(dataset, tmp_path_factory):
    """The reference: a single-process run of the same configuration."""
    out = tmp_path_factory.mktemp("clean") / "out"
    with torch_threads(1):  # the workers' count (cpus_per_worker=1)
        summary = Extractor(dataset, str(out), **RUN).run()
    assert summary["complete"]
    return out


def assert_same_output(got, ref) -> None:
    """Same shard files byte for byte, same manifest (the record of every shard), same errors table."""
    files = sorted(f for f in os.listdir(ref) if f.startswith("part-"))
    assert sorted(f for f in os.listdir(got) if f.startswith("part-")) == files, (
        "shard files differ (or temp files left)"
    )
    for name in [*files, "errors.parquet", "items-00000.arrow"]:
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name
    a, b = json.loads((got / "manifest.json").read_text()), json.loads((ref / "manifest.json").read_text())
    assert a == b
    assert verify(str(got)) == []
    assert read_features(str(got)).equals(read_features(str(ref)))


def test_ray_run_equals_single_process_run(dataset, clean, hold_dir, tmp_path):
    out = tmp_path / "out"
    summary = run_on_ray(Extractor(dataset, str(out), **RUN), workers=2, cpus_per_worker=1)
    assert_same_output(out, clean)
    ray_info = summary["ray"]
    assert ray_info["workers"] == 2 and ray_info["cpus_per_worker"] == 1 and ray_info["retried_shards"] == 0
    ref = json.loads((clean / "summary.json").read_text())
    assert (summary["rows_written"], summary["errors"]) == (ref["rows_written"], ref["errors"])
    assert summary["stage_busy_s"]["forward"] > 0 and set(summary["stage_busy_s"]) == set(ref["stage_busy_s"])
    # Up to date: a second run starts nothing and says so.
    again = run_on_ray(Extractor(dataset, str(out), **RUN), workers=2, cpus_per_worker=1)
    assert again["up_to_date"] and again["rows"] == summary["rows_written"]


def _workers_see(monkeypatch, folder) -> None:
    """The workers' view of --out is ``folder`` (a path local to their node), the driver's the real one."""
    real = cluster.worker_config
    monkeypatch.setattr(cluster, "worker_config", lambda ex: dataclasses.replace(real(ex), out=str(folder)))


@pytest.mark.slow
@pytest.mark.parametrize("exists", [True, False], ids=["empty-folder", "no-folder"])
def test_a_worker_that_does_not_see_the_drivers_output_stops_the_run_in_one_line(
    dataset, hold_dir, tmp_path, monkeypatch, exists
):  # fmt: skip
    out, node_local = tmp_path / "out", tmp_path / "node-local"
    if exists:
        node_local.mkdir()
    _workers_see(monkeypatch, node_local)
    with pytest.raises(RayRunError) as exc:
        run_on_ray(Extractor(dataset, str(out), **RUN), workers=2, cpus_per_worker=1)
    message = str(exc.value)
    assert message.startswith("--out must be storage every node shares: the Ray worker on ") and "\n" not in message
    assert f"finds no fastfeat run in {node_local}" in message
    assert (os.listdir(node_local) == []) if exists else not node_local.exists()  # the worker wrote nothing
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == [] and not [f for f in os.listdir(out) if f.startswith("part-")]


@pytest.mark.slow
def test_a_worker_writing_where_the_driver_cannot_see_is_never_committed(
    dataset, clean, hold_dir, tmp_path, monkeypatch
):  # fmt: skip
    """A stale node-local copy of OUT/ (the same manifest) passes the worker's check; the driver then does not
    find the shard files the worker returns, and stops before it lists any."""
    out, node_local = tmp_path / "out", tmp_path / "node-local"
    begin = Extractor.begin

    def begin_then_copy(self):
        todo = begin(self)
        shutil.copytree(out, node_local)
        return todo

    monkeypatch.setattr(Extractor, "begin", begin_then_copy)
    _workers_see(monkeypatch, node_local)
    with pytest.raises(RayRunError) as exc:
        run_on_ray(Extractor(dataset, str(out), **RUN), workers=1, cpus_per_worker=1)
    message = str(exc.value)
    assert message.startswith("--out must be storage every node shares: a Ray worker wrote output shard ")
    assert f"driver does not find in {out}" in message and "\n" not in message
    assert json.loads((out / "manifest.json").read_text())["shards"] == []
    assert not [f for f in os.listdir(out) if f.startswith("part-")]
    monkeypatch.undo()  # storage every node shares: the same command finishes the run
    summary = run_on_ray(Extractor(dataset, str(out), **RUN), workers=1, cpus_per_worker=1)
    assert summary["complete"] and verify(str(out)) == []
    assert summary["rows_written"] == json.loads((clean / "summary.json").read_text())["rows_written"]


def test_worker_killed_while_writing_a_shard(dataset, clean, hold_dir, tmp_path):
    out = tmp_path / "out"
    result: dict = {}

    def drive():
        try:
            ex = Extractor(dataset, str(out), **RUN)
            result["summary"] = run_on_ray(ex, workers=2, cpus_per_worker=1, on_batch=HoldShard(hold_dir))
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    with holding(hold_dir, shard=1):
        driver = threading.Thread(target=drive)
        driver.start()
        victim = wait_for(lambda: held(hold_dir), what="a worker to start writing shard 1",
                          failed=lambda: thread_failed(driver, result))  # fmt: skip
        tmp = [f for f in os.listdir(out) if f.startswith("part-00001.") and f.endswith(f".{victim['pid']}@{victim['host']}.tmp")]  # fmt: skip
        assert tmp, os.listdir(out)  # mid-shard: its temp file is there, not yet renamed
        os.kill(victim["pid"], signal.SIGKILL)
    driver.join(timeout=180)
    assert not driver.is_alive() and "error" not in result, result.get("error")
    assert result["summary"]["ray"]["retried_shards"] == 1
    assert_same_output(out, clean)  # includes: no temp file left, no shard file the manifest does not list


def test_driver_killed_then_rerun_resumes(dataset, clean, hold_dir, tmp_path):
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "fastfeat", "extract", dataset, "--out", str(out), *CLI_RUN]
    cmd += ["--ray", address, "--ray-workers", "1", "--ray-cpus-per-worker", "1"]
    # The first driver is --ray's own run_on_ray with the hold injected (the CLI takes no hook); the rerun is the CLI.
    held_driver = [sys.executable, "-c", HELD_DRIVER, dataset, str(out), address, str(hold_dir), json.dumps(RUN)]
    with holding(hold_dir, shard=1):
        driver = subprocess.Popen(held_driver, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            victim = wait_for(lambda: held(hold_dir), what="a worker to start writing shard 1",
                              failed=lambda: process_failed(driver))  # fmt: skip

            def committed():
                with contextlib.suppress(OSError, ValueError):
                    return len(json.loads((out / "manifest.json").read_text())["shards"])

            assert wait_for(committed, what="a shard in the manifest", failed=lambda: process_failed(driver)) >= 1
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
        finally:
            driver.kill()
    # Ray ends the dead driver's workers; the held one left a partial temp file behind.
    wait_for(lambda: not os.path.exists(f"/proc/{victim['pid']}"), what="the dead driver's workers to end")
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert_same_output(out, clean)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_already_done"] == 3 * len(manifest["shards"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ray", "--ray-workers", "0"], "--ray-workers must be at least 1, got 0"),
        (["--ray", "--ray-cpus-per-worker", "-1"], "--ray-cpus-per-worker must be a positive number"),
        (["--ray-workers", "2"], "need --ray"),
        (["--ray", "--num-shards", "2"], "drop --num-shards/--shard-index"),
        (["--ray", "--devices", "auto"], "--ray and --devices"),
    ],
)
def test_bad_ray_options_are_one_line_errors(dataset, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["extract", dataset, "--out", str(out), *CLI_RUN, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and not out.exists(), err


def test_more_cpus_per_worker_than_any_node_is_refused_before_writing(dataset, hold_dir, tmp_path, capsys):
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    code = main(["extract", dataset, "--out", str(out), *CLI_RUN, "--ray", address, "--ray-cpus-per-worker", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no node of the Ray cluster has that many CPUs (largest: 2)" in err, err
    assert not out.exists()


def test_object_store_out_of_disk_is_a_one_line_error_before_writing(dataset, hold_dir, tmp_path, capsys, monkeypatch):
    # What Ray raises for the weights' put when its store is full and the disk is over 95% full (seen in
    # CI at stop 19): the CLI said so in a traceback, after creating OUT/.
    def full(_value, **_kw):
        raise ray.exceptions.OutOfDiskError("Local disk is full\nThe object cannot be created because ...")

    monkeypatch.setattr(ray, "put", full)
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    code = main(["extract", dataset, "--out", str(out), *CLI_RUN, "--ray", address])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "Ray could not store the model weights (" in err and "Local disk is full" in err, err
    assert not out.exists()


def test_feature_mapper_in_a_ray_data_pipeline(dataset, corrupt_dataset, clean, hold_dir):
    from fastfeat.ray_data import FeatureMapper

    ref = read_features(str(clean))
    ids = ref.column("id").to_pylist()
    bad = os.path.join(corrupt_dataset, "03_text.jpg")
    images = [open(os.path.join(dataset, i), "rb").read() for i in ids] + [open(bad, "rb").read()]
    ds = ray.data.from_arrow(pa.table({"id": [*ids, "bad"], "image": images}))
    feats = ds.map_batches(
        FeatureMapper,
        fn_constructor_kwargs={"weights": "random:0", "layers": "relu6", "batch_size": 2},
        batch_format="pyarrow", batch_size=2, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
    )  # fmt: skip
    got = pa.concat_tables(ray.get(feats.to_arrow_refs())).sort_by("id")
    assert got.column_names == ["id", "relu6", "error"]  # the bytes are dropped
    failed = got.filter(pc.equal(got.column("id"), "bad"))
    assert failed.column("error").to_pylist() == ["header: not a recognised image format"]
    assert failed.column("relu6").null_count == 1
    good = got.filter(pc.not_equal(got.column("id"), "bad"))
    ref = ref.sort_by("id")
    assert good.column("id").to_pylist() == ref.column("id").to_pylist() and good.column("error").null_count == len(
        good
    )
    assert good.schema.field("relu6").type == ref.schema.field("relu6").type
    # Batches are composed differently from extract's (whose batches never span shards): the same
    # features up to the rounding of a different batch shape.
    np.testing.assert_allclose(
        column_matrix(good, "relu6").astype(np.float32), column_matrix(ref, "relu6").astype(np.float32),
        rtol=0.02, atol=0.02,
    )  # fmt: skip


def test_source_and_output_on_s3_equal_a_local_run(dataset, clean, hold_dir, s3_endpoint):
    s3 = s3_endpoint
    prefix = s3.prefix()
    s3.upload_tree(dataset, prefix + "/src")
    out = s3.uri(prefix, "out")
    summary = run_on_ray(Extractor(s3.uri(prefix, "src"), out, **RUN), workers=2, cpus_per_worker=1)
    assert summary["complete"] and summary["ray"]["workers"] == 2
    manifest = json.loads(storage.read_bytes(storage.join(out, "manifest.json")))
    ref = json.loads((clean / "manifest.json").read_text())
    assert manifest["shards"] == ref["shards"]  # every shard's file, sha256, rows and errors
    assert main(["verify", out]) == 0
    for name in [r["file"] for r in ref["shards"]] + ["errors.parquet"]:
        assert storage.read_bytes(storage.join(out, name)) == (clean / name).read_bytes(), name
    keys = [k for k in s3.keys(f"{prefix}/out") if k]
    assert sorted(os.path.basename(k) for k in keys) == sorted(
        [r["file"] for r in ref["shards"]] + ["errors.parquet", "items-00000.arrow", "manifest.json", "summary.json"]
    )  # no temp object, no unlisted shard


@pytest.mark.slow
def test_a_worker_that_cannot_read_an_image_stops_the_run_without_committing_its_shard(
    dataset, hold_dir, s3_endpoint, tmp_path
):  # fmt: skip
    """A key the store never serves: the worker's runner stops (ReadStopped, carried whole from the worker to
    the driver), its shard is not committed, no image is recorded as failed; the rerun finishes."""
    s3 = s3_endpoint
    prefix = s3.prefix()
    s3.upload_tree(dataset, prefix + "/src")
    out = tmp_path / "out"
    ex = Extractor(s3.uri(prefix, "src"), str(out), **RUN, read_retries=0)
    last = ex.items[len(ex.items) - 1]
    with s3.faults() as proxy:
        proxy.configure(always_fail={f"{s3.bucket}/{prefix}/src/{last.id}"})
        with pytest.raises(ReadStopped) as exc:
            run_on_ray(ex, workers=1, cpus_per_worker=1)
    last_shard = (len(ex.items) - 1) // RUN["shard_size"]
    assert str(exc.value).startswith(f"stopped: 1 image of output shard {last_shard} ") and exc.value.images == 1
    assert repr(last.id) in str(exc.value) and "(1 attempt)" in str(exc.value)
    manifest = json.loads((out / "manifest.json").read_text())
    assert last_shard not in [r["index"] for r in manifest["shards"]]
    assert all(not r["errors"] for r in manifest["shards"]) and not (out / f"part-{last_shard:05d}.parquet").exists()
    summary = run_on_ray(Extractor(s3.uri(prefix, "src"), str(out), **RUN), workers=1, cpus_per_worker=1)
    assert summary["complete"] and verify(str(out)) == []


def test_temp_files_of_other_hosts_are_left_to_their_owner(tmp_path):
    """A pid is only meaningful on its host: a dead-looking pid of another host is not removed at resume."""
    from fastfeat.output.layout import _remove_orphan_tmp

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = os.getpid()
    names = {
        "dead_here": tmp_name("part-00000.parquet", dead.pid),
        "alive_here": tmp_name("part-00001.parquet", alive),
        "other_host": f"part-00002.parquet.{dead.pid}@some-other-host.tmp",
        "old_style": f"part-00003.parquet.{dead.pid}.tmp",  # before host tags: written on this host
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    _remove_orphan_tmp(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([names["alive_here"], names["other_host"]])
    # The Ray driver knows its own dead workers on every host, and removes exactly their files.
    remove_tmp_of(str(tmp_path), {("some-other-host", dead.pid)})
    assert os.listdir(tmp_path) == [names["alive_here"]]


def test_unreachable_ray_address_is_a_one_line_error_before_writing(dataset, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastfeat", "extract", dataset, "--out", str(out), *CLI_RUN, "--ray", "127.0.0.1:1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and not out.exists(), proc.stderr
    assert proc.stderr.strip() == "fastfeat: error: cannot connect to Ray at 127.0.0.1:1: Connection refused"
