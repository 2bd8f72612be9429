"""timm's hub weights by name (``--weights timm:ARCH.TAG``, fastfeat.hub_weights) through the verified cache.

No hub is reachable from the test machines: a local HTTP server on 127.0.0.1 plays the hub (the paths-info
API and the ``/resolve/<commit>/`` file) and ``$HF_ENDPOINT`` points at it.  The file it serves is a real
safetensors state dict of timm's tiny ``test_vit`` (random weights), so a good download is loaded by the
same reader and run.
"""

from __future__ import annotations

import glob
import hashlib
import http.server
import json
import os
import socket
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fastfeat import hub_weights, published
from fastfeat.cli import main
from fastfeat.extractor import weights_identity
from fastfeat.model_lookup import resolve_model
from fastfeat.published import DownloadError, cached_path, fetch, lookup, resolve
from fastfeat.weights import load_weights

pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

NAME = "timm:test_vit.r160_in1k"
MODEL = "timm:test_vit"
REPO, FILE = "timm/test_vit.r160_in1k", "model.safetensors"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """The two hub requests fastfeat makes: POST /api/models/REPO/paths-info/main (form paths=FILE) and
    GET /REPO/resolve/COMMIT/FILE.  ``served`` is what the GET sends; ``published`` what the API says."""

    def __init__(self, data: bytes):
        self.published = data
        self.served = data
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802  (http.server's name)
                hub.requests.append(("POST", self.path))
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if self.path != f"/api/models/{REPO}/paths-info/main":
                    self.send_error(404)
                    return
                answer = [
                    {
                        "type": "file", "path": p, "size": len(hub.published), "oid": "f" * 40,
                        "lfs": {"oid": hashlib.sha256(hub.published).hexdigest(), "size": len(hub.published),
                                "pointerSize": 134},
                        "lastCommit": {"id": COMMIT, "title": "Add model", "date": "2023-03-21T00:00:00.000Z"},
                    }
                    for p in form.get("paths", []) if p == FILE
                ]  # fmt: skip
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                hub.requests.append(("GET", self.path))
                if self.path != f"/{REPO}/resolve/{COMMIT}/{FILE}":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(hub.served)))
                self.end_headers()
                self.wfile.write(hub.served)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def spec():
    return resolve_model(MODEL)


@pytest.fixture(scope="module")
def state_bytes(spec) -> bytes:
    return safetensors_torch.save(spec.random_state(3))


@pytest.fixture
def hub(state_bytes, tmp_path, monkeypatch):
    server = FakeHub(state_bytes)
    monkeypatch.setenv("FASTFEAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", server.base + "/")
    monkeypatch.delenv("FASTFEAT_WEIGHTS_MIRROR", raising=False)
    monkeypatch.setattr(published, "_CHECKED", {})
    yield server
    server.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache_files(tmp_path) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "cache" / "weights" / "*")))


def _pre_logits(spec, tensors, x):
    module = spec.build_module()
    module.load_state_dict(tensors)
    with torch.inference_mode():
        return module.forward_head(module.forward_features(x), pre_logits=True)


def test_name_resolves_to_the_hub_repo_and_safetensors_file():
    entry = lookup("timm:vit_small_patch16_224.augreg_in21k_ft_in1k")
    assert entry.hub == ("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "main", "model.safetensors")
    assert entry.model == "timm:vit_small_patch16_224"
    assert (
        entry.url
        == "https://huggingface.co/timm/vit_small_patch16_224.augreg_in21k_ft_in1k/resolve/main/model.safetensors"
    )
    assert lookup("timm:test_vit").hub == (REPO, "main", FILE)  # no tag: timm's default one
    published.check_model(entry, "timm:vit_small_patch16_224.augreg_in21k_ft_in1k")  # a tagged model: same arch
    with pytest.raises(ValueError, match="not timm:vit_tiny_patch16_224"):
        published.check_model(entry, "timm:vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="unknown timm weights timm:vit_small_patch16_224.nope"):
        lookup("timm:vit_small_patch16_224.nope")
    assert hub_weights._safetensors_file("open_clip_pytorch_model.bin") == "open_clip_model.safetensors"
    assert hub_weights._safetensors_file("pytorch_model.bin") == "model.safetensors"


def test_good_download_is_pinned_cached_and_loads_as_the_local_file(hub, spec, state_bytes, tmp_path):
    path, sha256, entry = resolve(NAME, MODEL, log=lambda line: None)
    assert sha256 == hashlib.sha256(state_bytes).hexdigest()
    assert entry.commit == COMMIT and entry.url.endswith(f"/resolve/{COMMIT}/{FILE}")
    assert [m for m, _ in hub.requests] == ["POST", "GET"]
    with open(path, "rb") as f:
        assert f.read() == state_bytes
    record = json.loads(Path(path + ".json").read_text())
    assert (record["commit"], record["sha256"], record["size"]) == (COMMIT, sha256, len(state_bytes))
    assert _cache_files(tmp_path) == sorted([os.path.basename(path), os.path.basename(path) + ".json",
                                             os.path.basename(path) + ".lock"])  # fmt: skip
    # The run metadata's weights entry: the name, the sha256, the hub repo, file and pinned commit.
    identity, _ = weights_identity(spec, NAME)
    assert identity == {"source": NAME, "sha256": sha256, "random": False, "repo": REPO, "file": FILE,
                        "revision": COMMIT, "url": f"https://huggingface.co/{REPO}/resolve/{COMMIT}/{FILE}"}  # fmt: skip
    local = tmp_path / "local.safetensors"
    local.write_bytes(state_bytes)
    by_name, by_file = load_weights(spec, NAME), load_weights(spec, str(local))
    assert by_name.sha256 == by_file.sha256 == sha256
    x = torch.randn(2, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_pre_logits(spec, by_name.tensors, x), _pre_logits(spec, by_file.tensors, x))


def test_second_run_offline_uses_the_cached_file_and_its_record(hub, tmp_path, monkeypatch):
    path, sha256, _ = resolve(NAME, MODEL, log=lambda line: None)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(published, "_CHECKED", {})  # a new process: the cached file is checked again
    asked = len(hub.requests)
    again = resolve(NAME, MODEL, log=lambda line: None)
    assert again[:2] == (path, sha256) and again[2].commit == COMMIT
    assert len(hub.requests) == asked


def test_tampered_download_is_refused_in_one_line_and_nothing_is_cached(hub, state_bytes, tmp_path):
    hub.served = state_bytes[:-1] + bytes([state_bytes[-1] ^ 1])  # same size, one bit off
    with pytest.raises(DownloadError, match=f"the download of {NAME} from .* is not the published file") as err:
        fetch(lookup(NAME), log=lambda line: None)
    assert "\n" not in str(err.value) and "sha256" in str(err.value)
    assert _cache_files(tmp_path) == [os.path.basename(cached_path(lookup(NAME))) + ".lock"]


def test_hub_down_is_one_line_naming_the_url_and_the_cache_path(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert main(["weights", "download", NAME]) == 2
    err = capsys.readouterr().err.strip()
    path = cached_path(lookup(NAME))
    assert "\n" not in err and err.startswith(f"fastfeat: error: cannot ask the hub for {NAME}: ")
    assert f"/{REPO}/resolve/main/{FILE} by hand" in err and path in err
    assert _cache_files(tmp_path) == []


def test_a_cached_file_without_its_record_is_checked_by_the_hub_else_refused_offline(hub, state_bytes, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    path = cached_path(lookup(NAME))
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(state_bytes)  # saved by hand
    port = hub.base.rsplit(":", 1)[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(DownloadError, match="has no record of the hub's sha256") as err:
        fetch(lookup(NAME), log=lambda line: None)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert fetch(lookup(NAME), log=lambda line: None) == (path, hashlib.sha256(state_bytes).hexdigest())
    assert [m for m, _ in hub.requests] == ["POST"]  # checked against the hub's answer, not downloaded
    assert json.loads(Path(path + ".json").read_text())["commit"] == COMMIT  # recorded: offline from now on


def test_a_repo_without_safetensors_is_refused(hub, monkeypatch):
    monkeypatch.setattr(
        hub_weights, "_timm_source", lambda name: ("test_vit", "r160_in1k", REPO, "main", "x.safetensors")
    )
    with pytest.raises(DownloadError, match="has no x.safetensors at main .*never a pickle"):
        fetch(lookup(NAME), log=lambda line: None)


def test_weights_download_prints_the_path_sha256_and_pinned_commit(hub, state_bytes, capsys):
    assert main(["weights", "download", NAME]) == 0
    out = capsys.readouterr().out.strip()
    path, sha256 = cached_path(lookup(NAME)), hashlib.sha256(state_bytes).hexdigest()
    assert out == f"{NAME}: {path} (sha256 {sha256}, {REPO} commit {COMMIT})"


@pytest.mark.slow
def test_extract_by_name_equals_the_local_file_and_a_second_run_offline_uses_the_cache(
    hub, state_bytes, tmp_path, monkeypatch, capsys
):
    local = tmp_path / "local.safetensors"
    local.write_bytes(state_bytes)

    def extract(out, weights):
        args = ["extract", "--sample", "--out", str(tmp_path / out), "--model", MODEL, "--weights", weights]
        assert main([*args, "--no-progress"]) == 0
        table = pq.read_table(str(tmp_path / out / "part-00000.parquet"))
        meta = json.loads(table.schema.metadata[b"fastfeat"])
        return np.stack(table.column("pre_logits").to_numpy(zero_copy_only=False)), meta["weights"]

    by_name, weights = extract("by-name", NAME)
    sha256 = hashlib.sha256(state_bytes).hexdigest()
    assert weights == {"source": NAME, "sha256": sha256, "random": False, "repo": REPO, "file": FILE,
                       "revision": COMMIT, "url": f"https://huggingface.co/{REPO}/resolve/{COMMIT}/{FILE}"}  # fmt: skip
    by_file, _ = extract("by-file", str(local))
    assert np.array_equal(by_name, by_file)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # offline
    monkeypatch.setattr(published, "_CHECKED", {})
    asked = len(hub.requests)
    again, weights_again = extract("offline", NAME)
    assert np.array_equal(again, by_name) and weights_again == weights and len(hub.requests) == asked
