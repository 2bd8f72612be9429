"""The decoder's side effects: warnings attributed only from the decoder's own messages, one fallback
pipeline built once, and no thread pool, open file or handle left behind on error paths."""

from __future__ import annotations

import io
import os
import sys
import threading

import numpy as np
import pytest
import torch
from helpers import jpeg_bytes
from PIL import Image

import fastfeat
from fastfeat import console as console_module
from fastfeat.console import split_decoder_lines
from fastfeat.decode import Decoder
from fastfeat.models import get_model
from fastfeat.sinks.base import Layout, Rows
from fastfeat.sinks.npy import NpySink
from fastfeat.sources import reader as reader_module
from fastfeat.sources.items import Item
from fastfeat.sources.reader import ItemReader

PRE = get_model("alexnet").preprocess
CPU = torch.device("cpu")


def _sample(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8)


@pytest.fixture(scope="module")
def images(photos):
    """Four good JPEGs (as decoder input), one whose entropy-coded data is damaged (decodes, with a
    libjpeg warning), one that is not an image, one GIF (Pillow's fallback decodes it); their sizes."""
    good = [Image.open(p).convert("RGB").resize((96, 80)) for p in photos[:4]]
    damaged = bytearray(jpeg_bytes(Image.open(photos[0]).convert("RGB"), quality=90))
    mid = len(damaged) // 2
    damaged[mid : mid + 200] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    gif = io.BytesIO()
    good[1].save(gif, format="GIF")
    w, h = Image.open(photos[0]).size
    return {
        "good": ([_sample(jpeg_bytes(im)) for im in good], [(96, 80)] * 4),
        "damaged": (_sample(bytes(damaged)), (w, h)),
        "garbage": (_sample(b"\xff\xd8\xff\xe0" + b"not an image" * 20), (96, 80)),
        "gif": (_sample(gif.getvalue()), (96, 80)),
    }


# -- warnings: only the decoder's own messages ----------------------------------------------------
def test_decoder_lines_are_told_from_other_output():
    text = (
        "Corrupt JPEG data: 265 extraneous bytes before marker 0xd9\n"
        "\x1b[0;31m[WARNING] \x1b[0m[jpeg_parser] Invalid marker\n"
        "[W1207 01:02:03.456 forward.cpp:12] a warning of the forward pass\n"
        "INFO: something a library logged\n"
        "Premature end of JPEG file\n"
    )
    decoder, others = split_decoder_lines(text)
    assert decoder == ["Corrupt JPEG data: 265 extraneous bytes before marker 0xd9",
                       "[WARNING] [jpeg_parser] Invalid marker", "Premature end of JPEG file"]  # fmt: skip
    assert others == ["[W1207 01:02:03.456 forward.cpp:12] a warning of the forward pass",
                      "INFO: something a library logged"]  # fmt: skip


def test_another_threads_stderr_during_decode_is_no_warning_record(images, monkeypatch):
    """Another thread writes to fd 2 (as native code does) and to sys.stderr inside every decode call, while
    the capture is on: no image gets a warning for it, the damaged one still gets its own, and the other
    thread's lines reach the real stderr."""
    passed_on = io.StringIO()
    monkeypatch.setattr(console_module, "console", lambda: passed_on)
    real_run = Decoder._run

    def run_with_a_noisy_neighbour(self, *args, **kwargs):
        def neighbour():
            os.write(2, b"[W forward.cpp:42] another thread's native warning\n")
            print("another thread's Python warning", file=sys.__stderr__, flush=True)

        thread = threading.Thread(target=neighbour)
        thread.start()
        thread.join()  # written while this decode call's capture is on, from another thread
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "_run", run_with_a_noisy_neighbour)
    decoder = Decoder(PRE, 8, CPU, num_threads=1)
    good, sizes = images["good"]
    batch, bad, notes = decoder.decode(good, sizes)
    assert batch is not None and bad == {} and notes == {}, notes
    damaged, size = images["damaged"]
    batch, bad, notes = decoder.decode([good[0], damaged, good[1]], [sizes[0], size, sizes[1]])
    assert bad == {} and list(notes) == [1], notes
    assert notes[1].startswith("Corrupt JPEG data") and "another thread" not in notes[1], notes
    assert "another thread's native warning" in passed_on.getvalue()


# -- one fallback pipeline, built once ------------------------------------------------------------
@pytest.fixture
def builds(monkeypatch):
    """Every pipeline a Decoder builds: ("main" | "single" | "raw") in order."""
    made: list[str] = []
    real_build = Decoder._build

    def counting(self, raw=False, batch_size=None):
        made.append("raw" if raw else "single" if batch_size == 1 else "main")
        return real_build(self, raw, batch_size)

    monkeypatch.setattr(Decoder, "_build", counting)
    return made


def test_the_fallback_pipeline_is_built_once_across_bad_batches(images, builds):
    decoder = Decoder(PRE, 4, CPU, num_threads=1)
    good, sizes = images["good"]
    clean, _, _ = decoder.decode(good, sizes)
    garbage, gif = images["garbage"][0], images["gif"][0]
    for k in range(3):  # three batches that each fail in DALI: one bad sample, then two
        bad_batch = [good[0], garbage, good[2], garbage] if k == 2 else [good[0], garbage, good[2], good[3]]
        batch, bad, _ = decoder.decode(bad_batch, sizes)
        assert sorted(bad) == ([1, 3] if k == 2 else [1]), bad
        assert torch.equal(batch[0], clean[0]) and torch.equal(batch[2], clean[2])  # good rows as in a clean batch
        assert not batch[1].any()
    batch, bad, _ = decoder.decode([gif, good[1]], sizes[:2])  # DALI cannot, Pillow can: the raw pipeline
    assert bad == {} and torch.equal(batch[1], clean[1])
    assert builds == ["main", "single", "raw"], builds


def test_a_pipeline_that_no_longer_decodes_is_rebuilt(images, builds, monkeypatch):
    """The guard behind the reuse: where a failure left a pipeline unusable, it is built anew."""
    monkeypatch.setattr(Decoder, "_usable_after_failure", lambda self, pipe: False)
    decoder = Decoder(PRE, 4, CPU, num_threads=1)
    good, sizes = images["good"]
    garbage = images["garbage"][0]
    batch, bad, _ = decoder.decode([good[0], garbage, good[2], garbage], sizes)
    assert sorted(bad) == [1, 3]
    # main; after the batch failed: main again; single; after each bad sample: single again
    assert builds == ["main", "main", "single", "single", "single"], builds


# -- leaks on error paths -------------------------------------------------------------------------
def _open_files_under(folder) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


def _npy_sink() -> NpySink:
    return NpySink(Layout({"relu6": 4, "relu7": 3}, "float16", {"model": "test"}))


def test_an_npy_sink_failing_mid_shard_leaves_no_open_file(tmp_path):
    sink = _npy_sink()
    paths = {name: str(tmp_path / (name + ".tmp")) for name in sink.shard_files(0)}
    writer = sink.open(paths)
    ok = {"relu6": np.ones((2, 4), np.float16), "relu7": np.ones((2, 3), np.float16)}
    writer.add(Rows(["a", "b"], [None, None], [(1, 1)] * 2, ok))
    assert len(_open_files_under(tmp_path)) == 2  # the two layers' arrays
    with pytest.raises(ValueError, match="relu7"):
        # relu6 is written, then relu7 has the wrong width: a failure in the middle of a batch
        writer.add(Rows(["c"], [None], [(1, 1)], {"relu6": ok["relu6"][:1], "relu7": np.ones((1, 5), np.float16)}))
    writer.abort()  # what the runner does with a shard that failed
    assert _open_files_under(tmp_path) == []


def test_an_npy_shard_that_fails_to_open_closes_and_removes_what_it_opened(tmp_path, monkeypatch):
    from fastfeat.output import OutputDir, ShardTransaction
    from fastfeat.sinks import npy

    out = OutputDir(str(tmp_path / "out"), {"run": "npy"})
    out.create()
    opened = []

    def second_open_fails(path, mode="r", *args, **kwargs):
        if len(opened) == 1:
            raise OSError(28, "No space left on device", path)
        opened.append(open(path, mode, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(npy, "open", second_open_fails, raising=False)  # the npy module's open() only
    with pytest.raises(OSError, match="No space left"):
        ShardTransaction(out, _npy_sink(), 0, 0, 2)
    assert opened and opened[0].closed
    assert _open_files_under(tmp_path) == []
    assert [e for e in os.listdir(tmp_path / "out") if e.startswith("part-")] == []  # no temp file left


def test_extract_stops_the_scaled_decode_threads(tmp_path, monkeypatch):
    """--decode dct decodes large JPEGs on a thread pool: the run shuts it down when it ends (not when the
    decoder happens to be collected: the test keeps it)."""
    decoders = []
    real_init = Decoder.__init__

    def kept(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        decoders.append(self)

    monkeypatch.setattr(Decoder, "__init__", kept)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # at least twice the resize target both ways: decoded at reduced scale by Pillow
        Image.new("RGB", (1024, 768), (40 * i, 90, 150)).save(src / f"{i}.jpg", quality=90)
    fastfeat.extract(str(src), str(tmp_path / "out"), model="alexnet", weights="random:2", layers="relu7",
                     progress=False, batch_size=4, decode="dct", num_threads=2)  # fmt: skip
    assert len(decoders) == 1 and decoders[0]._scaled_pool is None  # used, then shut down
    assert [t.name for t in threading.enumerate() if t.name.startswith("fastfeat-scaled-decode")] == []


def test_a_decoder_closes_its_thread_pool(images):
    decoder = Decoder(PRE, 4, CPU, num_threads=2, mode="dct")
    big = Image.new("RGB", (1024, 768), (90, 120, 150))
    batch, bad, _ = decoder.decode([_sample(jpeg_bytes(big))], [(1024, 768)])
    assert batch is not None and bad == {} and decoder._scaled_pool is not None  # the pool was used
    pool = decoder._scaled_pool
    decoder.close()
    assert pool._shutdown and not [t for t in pool._threads if t.is_alive()]


class _FakeRemoteFile:
    def __init__(self, uri: str):
        self.uri, self.closed = uri, False

    def read_at(self, size: int, offset: int) -> bytes:
        assert not self.closed
        return b"x" * size

    def close(self) -> None:
        self.closed = True


def test_the_reader_closes_a_remote_tar_shard_it_has_done_with(monkeypatch):
    opened: list[_FakeRemoteFile] = []

    def open_input_file(uri):
        opened.append(_FakeRemoteFile(uri))
        return opened[-1]

    monkeypatch.setattr(reader_module.storage, "is_remote", lambda path: path.startswith("s3://"))
    monkeypatch.setattr(reader_module.storage, "open_input_file", open_input_file)
    reader = ItemReader()
    for shard in ("s3://b/000.tar", "s3://b/000.tar", "s3://b/001.tar"):
        assert reader.read(Item("k", shard, None, offset=512, size=10)) == b"x" * 10
    assert [f.uri for f in opened] == ["s3://b/000.tar", "s3://b/001.tar"]  # one open per shard
    assert opened[0].closed and not opened[1].closed  # the first closed when the next one came
    reader.close()
    assert opened[1].closed
