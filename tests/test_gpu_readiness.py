"""GPU readiness (issue 14), proved on a CPU as far as a CPU can.

No GPU has run this code yet.  Each test here stands for a defect that would have broken or silently
changed a GPU run, checked where a CPU can see it:

* the device a run uses is made current in every thread that launches work, and ``--devices`` workers
  each see only their own GPU (the launcher's environment, and torch.cuda replaced by a recorder);
* the GPU decoder is built with the CPU decoder's chroma upsampling (the built DALI graph's arguments);
* GPU faults inside the decoder fail the run instead of becoming bad-image rows (real DALI messages);
* the Triton version floor is checked when the kernels are imported;
* ``benchmarks/gpu_check.py`` imports and plans with torch, triton and torchvision only, and its
  ``--dry-run`` runs every step end to end under the Triton interpreter.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import fastfeat.launch as launch
from fastfeat.backends.base import Backend
from fastfeat.backends.plan import Op
from fastfeat.forward import Forward
from fastfeat.models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.py")
# The dry run's kernels run fp16 against an fp32 torch reference: the fp16 tolerance of the agreement step.
TOLERANCES_FP16 = 3e-3


# -- 1. the device of a run, and the --devices workers ------------------------------------------------------
def _capture_workers(monkeypatch, device_count: int) -> list[tuple[list[str], dict]]:
    started = []

    class Proc:  # what launch.supervise uses of a Popen: a worker that exits 0 at once
        def __init__(self, argv, env):
            started.append((argv, env))
            self.pid, self.returncode = len(started), None

        def wait(self, timeout=None):
            self.returncode = 0
            return 0

        def poll(self):
            return self.returncode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: device_count)
    monkeypatch.setattr(launch.subprocess, "Popen", lambda argv, env, **kw: Proc(argv, env))
    return started


def test_each_worker_sees_only_its_gpu(monkeypatch):
    """Triton launches on the *current* device: a worker told --device cuda:3 on a machine where it sees
    every GPU would launch on GPU 0 with GPU-3 pointers.  Each worker must see its GPU alone, as cuda:0."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    started = _capture_workers(monkeypatch, 4)
    argv = ["extract", "src", "--out", "o", "--devices", "1,3", "--batch-size", "8"]
    assert launch.launch_per_device("1,3", argv) == 0
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["1", "3"]
    for index, (args, _) in enumerate(started):
        assert args[args.index("--device") + 1] == "cuda:0"
        assert args[args.index("--shard-index") + 1] == str(index) and args[args.index("--num-shards") + 1] == "2"
        assert "--devices" not in args
        assert int(args[args.index("--threads") + 1]) == max(1, launch.available_cpus() // 2)


def test_worker_gpu_counts_within_the_visible_ones(monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=4,5,6,7 this process's GPU 1 is the machine's GPU 5 (or a UUID)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,GPU-8e1a,7")
    started = _capture_workers(monkeypatch, 4)
    launch.launch_per_device("1,2", ["extract", "src", "--out", "o", "--threads", "3"])
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["5", "GPU-8e1a"]
    assert all(args.count("--threads") == 1 and args[args.index("--threads") + 1] == "3" for args, _ in started)
    with pytest.raises(ValueError, match="not among CUDA_VISIBLE_DEVICES"):
        launch.worker_env(4, {"CUDA_VISIBLE_DEVICES": "4,5"})


class _FakeCuda:
    """torch.cuda's per-thread current device and stream, events and synchronisation, on a CPU."""

    def __init__(self):
        self.local = threading.local()
        self.set_calls: list[tuple[str, int]] = []
        self.device_wide_syncs = 0

    def current(self) -> tuple[int | None, object]:
        return getattr(self.local, "device", None), getattr(self.local, "stream", None)

    def install(self, monkeypatch) -> None:
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = device

        class StreamContext:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                self.saved = getattr(fake.local, "stream", None)
                fake.local.stream = self.stream

            def __exit__(self, *exc):
                fake.local.stream = self.saved

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self, stream=None):
                assert stream is fake.local.stream, "an event recorded on another stream than the stage's"
                self.t = time.perf_counter()

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        def set_device(device):
            index = torch.cuda._utils._get_device_index(device)  # torch's own check: "cuda" has no index
            fake.set_calls.append((threading.current_thread().name, index))
            fake.local.device = index

        def current_device():
            return getattr(fake.local, "device", None) or 0

        def synchronize(device=None):
            fake.device_wide_syncs += 1

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", StreamContext)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        monkeypatch.setattr(torch.cuda, "current_device", current_device)
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)


class _RecordingNet(Backend):
    """A 'cuda:1' backend that computes on the CPU and records the thread's current device and stream."""

    name = "recording"

    def __init__(self, fake: _FakeCuda, weight: torch.Tensor, device: torch.device):
        super().__init__(get_model("caffenet"), {}, device, torch.float32)
        self.fake, self.weight, self.seen = fake, weight, []

    def prepare(self, images_nhwc):
        self.seen.append(("prepare", *self.fake.current()))
        return images_nhwc.flatten(1)

    def plan(self, names):
        def fc(x):
            self.seen.append(("forward", *self.fake.current()))
            time.sleep(0.01)  # a measurable forward time
            return x @ self.weight

        return [Op("fc8", "fc", ("fc8",), fc)]


@pytest.mark.parametrize("device, current", [("cuda:1", 1), ("cuda", 2)])
def test_forward_runs_on_the_runs_device_and_its_own_stream(monkeypatch, device, current):
    """The runner calls the forward stage from its own thread: the device must be made current there
    (not once in the main thread), the work must run on the stage's stream, and no device-wide
    synchronize may serialise it with the decoder; stage times come from events on that stream.
    ``--device cuda`` (no index) is the constructing thread's current device, which the other thread
    must be told explicitly (torch.cuda.set_device refuses "cuda")."""
    fake = _FakeCuda()
    fake.install(monkeypatch)
    torch.cuda.set_device(current)  # the main thread's current device (what make_current did there)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(2 * 2 * 3, 5, generator=gen)
    net = _RecordingNet(fake, weight, torch.device(device))
    stage = Forward(net, ["fc8"], "float32")
    images = torch.randn(4, 2, 2, 3, generator=gen)
    busy = {"h2d": 0.0, "forward": 0.0, "d2h": 0.0}
    out = {}
    worker = threading.Thread(target=lambda: out.update(stage(images, [0, 2, 3], busy)), name="forward-thread")
    worker.start()
    worker.join()
    np.testing.assert_allclose(out["fc8"], (images.flatten(1) @ weight)[[0, 2, 3]].numpy(), rtol=1e-6)
    assert ("forward-thread", current) in fake.set_calls
    assert net.seen == [("prepare", current, stage.stream), ("forward", current, stage.stream)]
    assert stage.stream.device == torch.device("cuda", current)
    assert fake.device_wide_syncs == 0
    assert busy["forward"] >= 0.01 and busy["h2d"] >= 0 and busy["d2h"] >= 0


def test_make_current_takes_devices_with_and_without_an_index(monkeypatch):
    """``--device cuda`` and ``auto`` resolve to a device without an index: the run must not fail on it."""
    from fastfeat.runtime import make_current

    fake = _FakeCuda()
    fake.install(monkeypatch)
    make_current(torch.device("cuda"))
    make_current(torch.device("cuda", 3))
    make_current(torch.device("cpu"))
    assert [index for _, index in fake.set_calls] == [0, 3]


def test_decoder_works_on_its_own_stream(monkeypatch):
    """The copy out of DALI and the mean subtraction run on the decoder's stream, which is complete when
    the batch is handed over: on the thread's default stream they would queue behind the forward pass."""
    pytest.importorskip("nvidia.dali")
    fake = _FakeCuda()
    decoder = _decoder(mean_image=np.full((227, 227, 3), 100.0, np.float32))  # built on the CPU, before the fake
    fake.install(monkeypatch)
    synced = []

    class Stream(torch.cuda.Stream):
        def synchronize(self):
            synced.append(fake.current()[1])

    decoder.stream = Stream(torch.device("cuda", 0))
    seen = []
    run = decoder._run
    monkeypatch.setattr(decoder, "_run", lambda *a, **k: seen.append(fake.current()[1]) or run(*a, **k))
    batch, bad, _ = decoder.decode([_jpeg(1), _jpeg(2)], [(64, 48), (64, 48)])
    assert not bad and batch.shape == (2, 227, 227, 3)
    assert seen == [decoder.stream] and synced == [None]  # decoded on its stream, synchronised after it


def test_kernel_launchers_switch_to_their_inputs_device(monkeypatch):
    """Every launcher launches inside ``on_tensor_device(x)``, which is torch.cuda.device(x.device)."""
    from fastfeat import kernels
    from fastfeat.kernels import conv, gemm, launch_args, lrn, pool

    ok, why = kernels.backend_available()
    if not ok:
        pytest.skip(why)

    class FakeCudaTensor:
        device = torch.device("cuda", 2)

    ctx = launch_args.on_tensor_device(FakeCudaTensor())
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 2
    entered = []

    real = launch_args.on_tensor_device

    def recorder(t):
        entered.append(t)
        return real(t)  # a CPU tensor here: nothing to switch

    # The one-call launchers switch through launch_args.run_on_device; a module that imports the switch
    # itself (lrn's fitted launcher, pool_rows) is patched where it looks it up.
    for module in (launch_args, conv, gemm, lrn, pool):
        if hasattr(module, "on_tensor_device"):
            monkeypatch.setattr(module, "on_tensor_device", recorder)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 5, 8, generator=gen)
    kernels.conv2d_nhwc(x, kernels.pack_conv_weight(torch.randn(4, 8, 3, 3, generator=gen)), None, kernel_size=3)
    kernels.maxpool2d_nhwc(x, kernel_size=3, stride=2)
    kernels.lrn_nhwc(x)
    a = torch.randn(2, 8, generator=gen)
    kernels.linear(a, kernels.pack_linear_weight(torch.randn(3, 8, generator=gen)), split_k=2)
    assert [t.shape for t in entered] == [x.shape, x.shape, x.shape, a.shape]


# -- 3. the GPU decoder's options ------------------------------------------------------------------------------
def _decoder(device: str = "cpu", **kw):
    from fastfeat.decode import Decoder

    return Decoder(get_model("caffenet").preprocess, 2, torch.device(device), 1, **kw)


def _op_arguments(spec_text: str) -> dict[str, str]:
    """The ``Arguments:`` block of a DALI OpSpec's text ("name: value" lines)."""
    args, inside = {}, False
    for line in spec_text.splitlines():
        if line.strip() == "Arguments:":
            inside = True
        elif inside and re.match(r"^\s{4}\S", line) and ":" in line:
            key, value = line.strip().split(":", 1)
            args[key] = value.strip()
        elif inside and not line.startswith(" "):
            inside = False
    return args


def test_gpu_decoder_uses_the_cpu_decoders_chroma_upsampling():
    """DALI's mixed decoder defaults to jpeg_fancy_upsampling=False: chroma-subsampled JPEGs (nearly all
    photos) would decode to other pixels on a GPU than on a CPU.  The GPU pipeline is built here (its
    graph, which needs no GPU) and its decoder's arguments read back."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import backend as dali

    from fastfeat.decode import decoder_options

    options = decoder_options(on_gpu=True)
    assert options == {"jpeg_fancy_upsampling": True, "hw_decoder_load": 0.0}
    assert decoder_options(on_gpu=False) == {}
    schema = dali.GetSchema("decoders__Image")
    assert all(schema.HasArgument(name) for name in options), "an argument this DALI does not know"
    assert schema.GetArgumentDefaultValueString("jpeg_fancy_upsampling") == "False"  # why it must be set

    decoder = _decoder()
    decoder.device = torch.device("cuda", 1)  # _define reads only the device: the GPU pipeline's graph
    pipe = decoder._define()
    pipe._build_graph()
    assert pipe.device_id == 1
    (image_op,) = [op for op in pipe._ops if "decoders__Image" in str(op.spec)]
    args = _op_arguments(str(image_op.spec))
    assert args["device"] == "mixed"
    assert args["jpeg_fancy_upsampling"] == "True"
    assert float(args["hw_decoder_load"]) == 0.0


# -- 4. GPU faults are not bad images --------------------------------------------------------------------------
def _jpeg(seed: int = 0) -> np.ndarray:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((48, 64, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _dali_failure(decoder, sample: np.ndarray) -> str:
    """The text of the RuntimeError DALI raises for a batch holding ``sample``."""
    from fastfeat.decode import geometry

    pipe = decoder.raw_pipe = decoder._build()  # taken for the raw pipe: DALI's error comes back as raised
    with pytest.raises(RuntimeError) as info:
        decoder._run([_jpeg(), sample], [geometry(decoder.pre, 64, 48)] * 2, pipe=pipe, dims=[(48, 64)] * 2)
    assert info.type is RuntimeError  # compare DALI's text, not SampleError's summary of it
    return str(info.value)


def test_decoder_failures_are_classified_by_status():
    """Bad data (a truncated JPEG, a text file) is the image's fault; allocator, execution, internal and
    CUDA failures of nvImageCodec or nvJPEG, and CUDA runtime errors, are the machine's."""
    pytest.importorskip("nvidia.dali")
    from fastfeat.decode import _is_sample_error

    decoder = _decoder()
    good = _jpeg()
    truncated = _dali_failure(decoder, good[: len(good) // 3])
    not_an_image = _dali_failure(decoder, np.frombuffer(b"this is not an image\n" * 20, np.uint8))
    assert "Failed to decode sample" in truncated and "nvImageCodec failure: '#4'" in not_an_image
    for real in (truncated, not_an_image):
        assert _is_sample_error(real, raw=False)
        assert not _is_sample_error(real, raw=True)  # the raw pipeline decodes nothing
    # The same operator failing for the machine's reasons, as DALI would word it on a GPU:
    for status in (5, 6, 8, 15, 17, 20, 21):  # allocator, execution, internal, CUDA call (nvimgcodec.h)
        assert not _is_sample_error(not_an_image.replace("'#4'", f"'#{status}'"), raw=False), status
    for status in (3, 13, 19):  # bad code stream, incomplete bit stream
        assert _is_sample_error(not_an_image.replace("'#4'", f"'#{status}'"), raw=False), status
    for text in ("nvJPEG error: NVJPEG_STATUS_EXECUTION_FAILED", "NVJPEG_STATUS_ALLOCATOR_FAILURE",
                 "CUDA runtime API error cudaErrorIllegalAddress (700)", "an illegal memory access was encountered"):  # fmt: skip
        assert not _is_sample_error(truncated + "\n" + text, raw=False), text
    assert _is_sample_error(truncated + "\nNVJPEG_STATUS_BAD_JPEG", raw=False)
    assert not _is_sample_error("Error in MIXED operator `nvidia.dali.fn.resize`: Failed to decode sample", False)


def test_a_gpu_fault_in_the_decoder_fails_the_run():
    """``decode`` must raise, not return the batch's images as bad rows, when DALI fails for the machine."""
    pytest.importorskip("nvidia.dali")
    decoder = _decoder()
    good = _jpeg()
    text_file = np.frombuffer(b"this is not an image\n" * 20, np.uint8)
    batch, bad, _ = decoder.decode([good, text_file], [(64, 48), (64, 48)])  # a real bad image: a row error
    assert list(bad) == [1] and batch is not None and batch[0].abs().sum() > 0
    message = _dali_failure(decoder, text_file).replace("'#4'", "'#6'")  # EXECUTION_FAILED

    def fails(exc):
        def run():
            raise exc

        return run

    for exc, kind in ((RuntimeError(message), RuntimeError), (MemoryError("std::bad_alloc"), MemoryError)):
        decoder.pipe.run = fails(exc)
        with pytest.raises(kind) as info:
            decoder.decode([good, good], [(64, 48), (64, 48)])
        assert type(info.value).__name__ != "SampleError"


# -- 5. the Triton version floor ---------------------------------------------------------------------------------
def test_triton_floor_is_checked_and_stated():
    from fastfeat.kernels.versions import MIN_TRITON, triton_too_old

    assert triton_too_old("3.3.1") is not None and "tl.gather" in triton_too_old("3.3.1")
    assert "older than 3.4" in triton_too_old("3.2.0")
    for ok in ("3.4.0", "3.8.0", "3.8.0+git1234abcd", "3.10.1", "4.0.0"):
        assert triton_too_old(ok) is None, ok
    assert triton_too_old("unknown") is not None
    installed = importlib.metadata.version("triton")
    assert triton_too_old(installed) is None
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["project"]["dependencies"]
    floors = {m.group(1): m.group(2) for r in requires if (m := re.match(r"(torch|triton)>=([\d.]+)", r))}
    assert tuple(int(p) for p in floors["triton"].split("."))[:2] == MIN_TRITON
    # torch >= 2.8: the first torch built against triton 3.4; it also has the dynamo option profile sets.
    assert tuple(int(p) for p in floors["torch"].split("."))[:2] >= (2, 8)
    assert hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit")


@pytest.mark.slow
def test_old_triton_is_refused_when_the_kernels_are_imported():
    """With an older Triton the kernels do not import, and the triton backend says why in one line."""
    code = (
        "import triton; triton.__version__ = '3.3.0'\n"
        "import torch\n"
        "from fastfeat.backends import unavailable_reason\n"
        "print(unavailable_reason('triton', torch.device('cpu')))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cannot be imported (triton 3.3.0 is older than 3.4" in proc.stdout


@pytest.mark.slow
def test_compiled_kernels_cache_their_tuning_and_do_not_specialise_the_buckets():
    """Outside the interpreter (where Triton ignores it): autotune results go to Triton's disk cache, and the
    bucket arguments, read only by the autotuner, do not multiply the compiled variants."""
    code = (
        "import json\n"
        "from fastfeat.kernels import conv, gemm\n"
        "out = {}\n"
        "for k in (conv._conv2d_nhwc_kernel, gemm._linear_kernel):\n"
        "    out[k.base_fn.__name__] = [k.cache_results, sorted(p.name for p in k.fn.params if p.do_not_specialize)]\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "_conv2d_nhwc_kernel": [True, ["BATCH_BUCKET", "M_BUCKET"]],
        "_linear_kernel": [True, ["M_BUCKET"]],
    }


# -- 6 and 9. the GPU check on CPU ---------------------------------------------------------------------------------
BLOCKER = r"""
import importlib.machinery, runpy, sys
ALLOWED, BLOCKED = set(sys.argv[1].split(",")), tuple(sys.argv[2].split(","))
attempts = []
path_find_spec = importlib.machinery.PathFinder.find_spec

def find_spec(name, path=None, target=None):
    # Every package outside the GPU machine's set is absent, for `import` and importlib.util.find_spec alike.
    top = name.split(".")[0]
    stdlib = top in sys.stdlib_module_names or top.startswith("_sysconfigdata")  # the latter: sysconfig's data
    if any(name == b or name.startswith(b + ".") for b in BLOCKED) or not (top in ALLOWED or stdlib):
        attempts.append(name)
        return None
    return path_find_spec(name, path, target)

importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)
# Not installed either: the device machine runs fastfeat from the checkout (benchmarks/checkout.py).
editable = lambda f: getattr(f, "__module__", type(f).__module__).startswith("__editable__")
sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
sys.path_importer_cache.clear()
for name in [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]:
    del sys.modules[name]
sys.argv = sys.argv[3:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("HIDDEN-IMPORTS:" + ",".join(sorted(set(attempts))), file=sys.stderr)
"""


def _gpu_machine_modules() -> set[str]:
    """Top-level module names of torch, triton and torchvision and everything they require: what the
    device machine has.  fastfeat itself comes from the checkout; the check's own benchmarks/ modules too."""
    from importlib.metadata import PackageNotFoundError, distribution, packages_distributions

    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    todo, dists = ["torch", "triton", "torchvision"], set()
    while todo:
        name = norm(todo.pop())
        if name in dists:
            continue
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        dists.add(name)
        for req in requires:
            if "extra ==" in req.split(";", 1)[-1] and ";" in req:
                continue
            todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    tops = {top for top, owners in packages_distributions().items() if any(norm(d) in dists for d in owners)}
    return tops | {"fastfeat", "checkout", "results", "gpu_check"}


def _run_hidden(args: list[str], tmp_path, timeout: int) -> subprocess.CompletedProcess:
    blocked = "nvidia.dali,pyarrow,pytest,_pytest,skimage,sklearn,matplotlib,polars,duckdb,safetensors,tqdm"
    cmd = [sys.executable, "-c", BLOCKER, ",".join(sorted(_gpu_machine_modules())), blocked, GPU_CHECK, *args]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


@pytest.mark.slow
def test_gpu_check_runs_with_torch_triton_and_torchvision_only(tmp_path):
    """The device machine has torch, triton and torchvision (and what they require), no DALI, no pyarrow,
    perhaps no pytest, and fastfeat only as a checkout.  With every other package hidden and fastfeat's
    installation too, the check imports everything it uses (--plan) and runs its network steps; the
    steps that need pytest or DALI say they were skipped, and why."""
    proc = _run_hidden(["--dry-run", "--plan"], tmp_path, 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert plan["available"] == {"pytest": False, "nvidia.dali": False, "triton": plan["available"]["triton"]}
    hidden = {h.strip() for h in proc.stderr.rsplit("HIDDEN-IMPORTS:", 1)[1].split(",")}
    assert not {h for h in hidden if h.split(".")[0] == "pyarrow"}, hidden  # not even looked for

    out = tmp_path / "out"
    args = ["--dry-run", "--out", str(out), "--steps", "tests,agreement,forward,decode", "--models", "caffenet"]
    proc = _run_hidden([*args, "--batch-sizes", "1"], tmp_path, 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["tests"]["status"] == "skipped" and "pytest" in steps["tests"]["reason"]
    assert steps["decode"]["status"] == "skipped" and "nvidia.dali" in steps["decode"]["reason"]
    assert steps["agreement"]["status"] == "done" and len(steps["agreement"]["results"]) == 2
    assert steps["forward"]["img_per_s"]["caffenet triton b1"] > 0


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    """Every step of the check, in the GPU run's order, on the CPU: the Triton interpreter, 1/8-width
    networks, batch 2 and 1, the pytest phase on three tests, the CPU decoder.  A crash in the script
    itself shows here, not in the GPU's 15 minutes."""
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, GPU_CHECK, "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["tests", "agreement", "layers", "forward", "roofline", "decode", "compile"]
    assert "aborted" not in report and "current" not in report
    assert steps["tests"]["counts"] == {"passed": 3} and not steps["tests"]["capped"]
    agree = steps["agreement"]["results"]
    assert [(r["model"], r["precision"]) for r in agree] == [
        ("caffenet", "fp16"), ("caffenet", "fp32"), ("alexnet", "fp16"), ("alexnet", "fp32")
    ]  # fmt: skip
    assert all(r["ok"] and r["worst"] in r["rel_err"] and "fc8" in r["rel_err"] for r in agree)
    profiles = steps["layers"]["results"]
    assert {(p["model"], p["backend"], p["batch_size"]) for p in profiles} == {
        (f"{m}-dry", b, n) for m in ("caffenet", "alexnet") for b in ("torch", "triton") for n in (1, 2)
    }
    assert len(steps["forward"]["img_per_s"]) == 8 and all(v > 0 for v in steps["forward"]["img_per_s"].values())
    rows = steps["roofline"]["rows"]  # the dry run: caffenet-dry at batch 1, every conv, pool and fc layer
    assert {r["layer"] for r in rows} == {"conv1", "pool1+norm1", "conv2", "pool2+norm2", "conv3", "conv4", "conv5",
                                          "pool5", "fc6", "fc7", "fc8"}  # fmt: skip
    assert {r["provider"] for r in rows if r["layer"] == "conv1"} == {"torch", "triton", "triton-s2d"}
    pool_providers = {"torch", "triton", "triton-rows", "triton-rows-halo"}
    assert {r["provider"] for r in rows if r["layer"] == "pool1+norm1"} == pool_providers
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["rel_err_vs_torch"] < TOLERANCES_FP16 for r in rows if r["provider"].startswith("triton"))
    assert steps["decode"]["cpu_img_per_s"] > 0 and "no CUDA" in steps["decode"]["mixed"]
    assert steps["compile"]["status"] == "skipped"
    assert set(report["targets"]) == {
        f"{m} triton b{n} vs torch eager" for m in ("caffenet", "alexnet") for n in (1, 2)
    }
    print(f"gpu_check --dry-run: {seconds:.0f} s (report: {report['seconds']} s)")


@pytest.mark.slow
def test_gpu_check_e2e_step_dry_run(tmp_path):
    """Issue 26's step on the CPU: a 24-image corpus in parallel writers, decode-only per CPU decoder,
    forward-only (torch), a whole extract to Parquet with its stage breakdown, relu7 of the torchvision
    decoder against DALI's (both CPU here)."""
    out = tmp_path / "out"
    args = ["--dry-run", "--steps", "e2e", "--out", str(out), "--e2e-dir", str(tmp_path / "e2e")]
    proc = subprocess.run([sys.executable, GPU_CHECK, *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    step = json.loads((out / "gpu_check.json").read_text())["steps"]["e2e"]
    assert step["status"] == "done" and step["corpus"]["images"] == 24
    assert step["decode_only"]["torchvision cpu"]["img_per_s"] > 0
    assert step["forward_only"]["torch"]["img_per_s"] > 0
    (run,) = step["extract"].values()
    assert run["rows_written"] == 24 and run["errors"] == 0 and run["stage_busy_s"]["decode"] > 0
    assert len(list((tmp_path / "e2e" / "out-torch").glob("part-*.parquet"))) == 1
    relu7 = step["relu7_decode_difference"]
    if "dali cpu" == relu7["reference"]:
        assert relu7["torchvision cpu"]["relu7_rel_p50"] < 0.01 and relu7["torchvision cpu"]["pixel_levels_max"] <= 1.01


@pytest.mark.slow
def test_gpu_check_paths_step_dry_run(tmp_path):
    """Issue 26's other paths on the CPU, each once: extract, --augment 10crop, probe --engine torch, serve
    at saturation against extract (Ray is left to tests/test_ray.py in a dry run)."""
    out = tmp_path / "out"
    args = ["--dry-run", "--steps", "paths", "--out", str(out), "--budget-s", "400"]
    proc = subprocess.run([sys.executable, GPU_CHECK, *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    step = json.loads((out / "gpu_check.json").read_text())["steps"]["paths"]
    assert step["status"] == "done", step
    units = step["units"]
    assert units["extract"]["summary"]["rows_written"] == 40
    assert units["augment 10crop"]["summary"]["rows_written"] == 40
    assert units["probe torch"]["rc"] == 0 and units["serve vs extract"]["rc"] == 0
    assert units["serve vs extract"]["summary"]["serve_saturation_img_per_s"]["p50"] > 0
    assert units["ray 1 gpu actor"].startswith("skipped")


@pytest.mark.slow
def test_gpu_check_graphs_step_dry_run_without_out(tmp_path):
    """Issue 24's step on the CPU: triton (JIT) and torch, each without and with (emulated) graphs, host
    time, the padded short batch against its unpadded rows; no --out: a temp dir, printed, and its JSON
    written as the step goes (gpu_check.json and gpu_check_graphs.json)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    args = ["--dry-run", "--steps", "graphs", "--models", "caffenet", "--budget-s", "600"]
    proc = subprocess.run([sys.executable, GPU_CHECK, *args], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    written = re.search(r"no --out \(or \$OUT\): writing (\S+)", proc.stdout).group(1)
    assert written.startswith(str(tmp_path)) and not os.path.exists(
        os.path.join(ROOT, "benchmarks", "results", "gpu_check_graphs.json")
    )
    step = json.loads(open(written).read())["steps"]["graphs"]
    assert step["status"] == "done" and step["capture"].startswith("emulated")
    assert set(step["img_per_s"]) == {f"caffenet {k} b2" for k in
                                      ("triton jit", "triton jit graphs", "torch", "torch graphs")}  # fmt: skip
    assert all(v > 0 for v in step["img_per_s"].values())
    assert set(step["host_ms"]) == {"caffenet triton jit b2", "caffenet torch b2"}
    stats = step["graph_stats"]["caffenet triton jit graphs b2"]
    assert stats["captures"] == 1 and stats["capture_failures"] == 0 and stats["replays"] >= 2
    assert all(tap["bit_identical"] for tap in step["padding"]["caffenet triton b1 in bucket 2"].values())
    assert any("native" in note for note in step["notes"])
    own = json.loads(open(os.path.join(os.path.dirname(written), "gpu_check_graphs.json")).read())
    assert own["graphs"]["img_per_s"] == step["img_per_s"]


@pytest.mark.slow
def test_gpu_check_caps_the_tests_and_keeps_what_ran(tmp_path):
    """The tests phase ends at its cap, with the outcomes so far kept, and the run goes on."""
    out = tmp_path / "out"
    args = ["--dry-run", "--out", str(out), "--steps", "tests,decode", "--tests-cap-s", "15"]
    slow = "tests/kernels/test_conv.py::test_real_layers_fp16"  # minutes under the interpreter
    code = _WITH_TESTS.format(tests=repr((DRY_FAST, slow)), path=GPU_CHECK)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    tests = steps["tests"]
    assert tests["capped"] and tests["exit_code"] is None and tests["counts"].get("passed", 0) >= 1
    assert tests["seconds"] < 30 and steps["decode"]["status"] == "done"


DRY_FAST = "tests/kernels/test_gemm.py::test_relu_applied"
# Runs gpu_check.main with its dry-run test list replaced (the module is the script, imported by path).
_WITH_TESTS = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("gpu_check", {path!r})
gc = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gc
spec.loader.exec_module(gc)
gc.DRY_TESTS = {tests}
sys.exit(gc.main(sys.argv[1:]))
"""


def test_gpu_check_watchdog_ends_the_run_and_keeps_the_results(tmp_path, monkeypatch):
    """A unit that overruns (a torch.compile cannot be interrupted) is ended at budget + grace; the JSON
    keeps everything saved so far and says why the run ended."""
    spec = importlib.util.spec_from_file_location("gpu_check_watchdog", GPU_CHECK)
    gc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gc)  # dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts benchmarks/ first: undone after the test
    spec.loader.exec_module(gc)
    exits, fired = [], threading.Event()
    monkeypatch.setattr(gc.os, "_exit", lambda code: (exits.append(code), fired.set()))
    report = gc.Report([str(tmp_path / "gpu_check.json")], {"steps": {"layers": {"status": "running"}}})
    report.save()
    report.data["steps"]["layers"]["half-written"] = True  # not saved: the watchdog must not need it
    gc.start_watchdog(report, gc.Budget(0.1), grace_s=0.1)
    assert fired.wait(10)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert exits == [gc.EXIT_ABORTED] and saved["aborted"].startswith("watchdog")
    assert saved["steps"] == {"layers": {"status": "running"}}
