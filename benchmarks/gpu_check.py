"""The GPU check: one script for a lent CUDA machine, certain to end inside its time budget.

Steps, the most valuable first.  Every step checks the budget before each unit of work (one model at
one batch size, say) and writes the JSON after it, so a run cut short keeps everything it measured:

1. tests      the kernel tests and the triton-backend tests on the GPU: pytest in a subprocess with
              FASTFEAT_AUTOTUNE=0 (one config per launch: the tests check numerics, and tuning every
              test shape would take most of the budget), killed at --tests-cap-s with the outcomes so
              far kept; skipped, saying so, where pytest is not installed;
2. agreement  the triton backend against torch eager (cuDNN/cuBLAS, TF32 off) on the GPU, caffenet and
              alexnet, fp32 and bf16, every tap to fc8 against the tests' tolerances (needs no pytest);
              in fp32 also with FASTFEAT_CONV_SPLITK=1 (``splitk``, one config per launch), and for both
              whether image 0 alone (batch 1, where the segmented convs split) gives its row's bits;
3. layers     per-layer times, triton vs torch eager, both networks, each batch size (bf16, CUDA
              events, fastfeat.profile);
4. forward    whole forward pass img/s, torch eager and triton, both networks, each batch size;
4b. roofline  per-kernel table (benchmarks/layer_roofline.py): every conv, pool(+LRN) and fc layer on
              random inputs of its shape, each fastfeat kernel variant (conv1 direct and space-to-depth,
              tap-segmented split-K convs, split-K reduce folded or separate, pool+LRN flat, row-walking, and
              row-walking with fitted channel blocks + LRN halo) against torch eager (cuDNN/cuBLAS) and torch.compile
              (max-autotune), in ms, TFLOP/s or GB/s and share of the roofline, with each output's error
              against torch eager; one row saved to the JSON as soon as it is measured; on its own
              (``--steps roofline``) it fits one 8-minute call;
5. native     the prebuilt AOT kernel library (libfastfeat_kernels.so, CMakeLists.txt): its GPU tests
              (every kernel bit-identical to the JIT-compiled Python kernel, the whole forward against
              torch, the fused split-K reduce bit-identical to the separate one and close to torch),
              fastfeat-layer-bench, then per batch size the bench with both split-K reduces (each fc op
              that splits K timed both ways, and whether the outputs are bit-identical; one row each,
              saved per batch size), and the triton backend's start-up time with and without it;
              skipped, saying why, where the library was not built and carried here (build it on any
              machine, e.g. -DFASTFEAT_AOT_TARGETS=sm90, and carry build/libfastfeat_kernels.so (used
              when kernels/libfastfeat_kernels.so is absent: one copy of the sm_90 library, ~40 MB, fits
              the 64 MiB carry limit, two do not), build/fastfeat-layer-bench, build/native-gen/entries.json);
              never in a dry run (the library needs a GPU);
6. decode     DALI: decode img/s and pixels against the CPU decoder, mixed decoder at hw_decoder_load
              0 (fastfeat's), 0.65 (DALI's default) and 1; only where DALI is installed;
6b. e2e       the whole pipeline (issue 26): a deterministic ImageNet-like corpus (make_corpus.py, --e2e-images,
              20,000; written by 16 processes, part k seeded k), then decode-only img/s per decoder
              (torchvision's decode_jpeg/nvJPEG; DALI at hw_decoder_load 0, 0.65, 1.0 where it imports),
              forward-only img/s (AlexNet to relu7, each backend), ``fastfeat extract`` to Parquet on local
              disk (AlexNet relu6+relu7; triton with CUDA graphs, then torch) with the stage breakdown,
              and relu7 of GPU-decoded against CPU-decoded images (256); on its own it fits one call:
              ``--steps e2e --budget-s 420``.  The dry run: 24 images, the tiny AlexNet, CPU decoders;
6c. paths     the other GPU paths, each once, as the user runs them (subprocesses, each capped): fastfeat
              serve at saturation against extract on the same images (benchmarks/serve_load.py, one
              repeat), fastfeat probe --engine torch on the device, extract --ray with one GPU actor
              (where Ray is installed), extract --augment 10crop; rc, seconds and img/s of each, the
              output's tail when one fails.  Dry run: CPU, 40 images, no Ray (minutes to start here);
7. compile    torch.compile (Inductor, max-autotune): whole forward img/s, then per-layer times; last,
              because it autotunes every conv and GEMM per batch size.

A watchdog ends the process at --budget-s + GRACE_S whatever runs then (a torch.compile call cannot be
interrupted), after writing the JSON with ``aborted`` set: the check cannot overrun its budget.

It runs from a source checkout without installing, on a machine with torch, triton and torchvision
only (no DALI, no pyarrow, perhaps no pytest); tests/test_gpu_readiness.py proves that on CPU by hiding
every other package, and runs ``--dry-run`` (the whole script, Triton interpreter, tiny networks).

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py     # the GPU run: budget 330 s, hard stop at 360 s
    python benchmarks/gpu_check.py --plan                 # what would run; imports only
    python benchmarks/gpu_check.py --dry-run --out DIR    # on CPU: every step end to end, ~50 s

The dry run uses fp16 where the GPU run uses bf16 (the interpreter's bf16 dot is wrong), 1/8-width
networks, batch sizes 2 and 1, three tests, and skips the compile step unless --with-compile.

Writes gpu_check.json to --out (default: $OUT when set, plus benchmarks/results/ on a GPU run) and, on a
GPU run, appends the forward-pass rows to benchmarks/results/results.csv.  Exit status: 0 when nothing
failed, 1 when a test failed, an agreement was out of tolerance or a step raised, 3 when the watchdog
ended the run.

The targets it reports against (issue 3, H200, bf16, batch 256): whole forward >= 1.3x torch eager;
each conv <= 1.1x cuDNN's time; fc layers at least as fast as cuBLAS.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from checkout import make_importable  # noqa: E402

STEPS = ("tests", "agreement", "layers", "forward", "roofline", "graphs", "native", "decode", "e2e", "paths", "compile")
# Steps a dry run leaves out unless --steps names them: they need a GPU.
GPU_ONLY_STEPS = ("native",)
# Steps a dry run runs only when --steps names them: graphs interprets the whole tiny network a dozen
# times (minutes on the 2-core box; tests/test_gpu_readiness.py runs it on its own); e2e spawns the corpus
# writers and a whole extract (its own test too).
DRY_OPT_IN_STEPS = ("graphs", "e2e", "paths")
# The prebuilt native library and benchmark (CMakeLists.txt copies the library next to fastfeat.kernels;
# the benchmark stays in the build directory, beside its own copy of the library).
NATIVE_LIB = os.path.join(ROOT, "kernels", "libfastfeat_kernels.so")
NATIVE_BENCH = os.path.join(ROOT, "build", "fastfeat-layer-bench")
# The benchmark's copy of the library, used when the package's is not there: with the fused split-K family
# the sm_90 library is ~40 MB, so two copies no longer fit the 64 MiB a lent machine's command carries.
NATIVE_BUILD_LIB = os.path.join(ROOT, "build", "libfastfeat_kernels.so")
# Per-unit time caps of the native step, seconds (each JIT-compiles kernels: the start-up time without
# the library, the bit-identity test).
NATIVE_CAPS = {"startup": 150, "kernels": 240, "splitk": 90, "forward": 120, "bench": 90}
MODELS = ("caffenet", "alexnet")
# The watchdog's margin past --budget-s: a unit that starts just before the budget runs out may finish.
GRACE_S = 30
# ‖triton − torch‖ / ‖torch‖ allowed per tap, as tests/test_triton_backend.py (which explains them).
TOLERANCES = {"fp32": 1e-5, "fp16": 3e-3, "bf16": 2e-2}
# Taps compared by the agreement step (those the model has): each stage of the network, fc8 last.
# FASTFEAT_CONV_SPLITK (kernels/conv_splitk.py), not imported here: the agreement step switches it per variant.
SPLITK_ENV = "FASTFEAT_CONV_SPLITK"
AUTOTUNE_ENV = "FASTFEAT_AUTOTUNE"  # fastfeat.kernels.autotune.AUTOTUNE_ENV (not imported here either)
AGREEMENT_TAPS = ("conv1", "pool1", "norm1", "pool2", "relu3", "relu5", "pool5", "relu6", "relu7", "fc8")
# The kernel and triton-backend tests, most valuable first (test_compile_sm90 is CPU-side: CI runs it).
TEST_FILES = (
    "tests/test_triton_backend.py",
    "tests/kernels/test_conv.py",
    "tests/kernels/test_conv_splitk.py",
    "tests/kernels/test_gemm.py",
    "tests/kernels/test_pool_lrn.py",
)
EVENTS_ENV = "GPU_CHECK_EVENTS"  # where the pytest plugin below appends one JSON line per test outcome
EXIT_FAILED, EXIT_ABORTED = 1, 3
DECODE_LOADS = (0.0, 0.65, 1.0)  # hw_decoder_load values the decode step compares (fastfeat's, DALI's, all)

# The dry run: tiny networks (every channel and fc width divided by this, small inputs) under the Triton
# interpreter, so that a crash in this script shows on CPU in about a minute, not on the GPU.
DRY_WIDTH_DIVISOR = 8
DRY_INPUT = {"caffenet": 71, "alexnet": 99}  # the smallest sizes whose pool5 is 2x2 (fc6's NHWC permutation)
DRY_TESTS = (
    "tests/kernels/test_gemm.py::test_relu_applied",
    "tests/kernels/test_conv.py::test_relu_and_bias_are_applied",
    "tests/test_triton_backend.py::test_plan_fuses_but_never_hides_a_requested_layer",
)


# -- the pytest plugin (``-p gpu_check`` in the tests subprocess) ----------------------------------------
def pytest_load_initial_conftests(early_config, parser, args):
    """Before tests/conftest.py imports fastfeat.kernels: in a source checkout it lives in kernels/."""
    make_importable()


def pytest_runtest_logreport(report):
    """Append each test's outcome as it happens, so a run killed at its cap still says what passed."""
    path = os.environ.get(EVENTS_ENV)
    counted = report.when == "call" or (report.when == "setup" and report.outcome != "passed")
    if path and counted:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": report.nodeid, "outcome": report.outcome, "s": report.duration}) + "\n")


# -- settings ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    device: str
    dry_run: bool
    precision: str  # of the timed steps and the 16-bit agreement
    steps: tuple[str, ...]
    models: tuple[str, ...]
    batch_sizes: list[int]
    budget_s: float
    tests_cap_s: float
    tests: tuple[str, ...]
    repeat: int
    warmup: int
    iters: int
    agreement_batch: int
    decode_images: int
    with_compile: bool
    e2e_images: int = 20_000


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=None, help="no unit of work starts after this (330; dry 120)")
    ap.add_argument("--tests-cap-s", type=float, default=None, help="the tests step ends here (100; dry 45)")
    ap.add_argument("--batch-sizes", default=None, help="most valuable first (256,64,1; dry 2,1)")
    ap.add_argument("--steps", default=None, help=f"a subset of {','.join(STEPS)} (default all; a dry run skips "
                    f"{','.join(GPU_ONLY_STEPS + DRY_OPT_IN_STEPS)})")  # fmt: skip
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=None, help="directory for gpu_check.json (default $OUT, and benchmarks/results)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny networks and budget")
    ap.add_argument("--with-compile", action="store_true", help="dry run: run the compile step too (~40 s more)")
    ap.add_argument("--e2e-images", type=int, default=None, help="the e2e step's corpus size (20000; dry 24)")
    ap.add_argument("--e2e-dir", default=None, help="where the e2e step writes its corpus and outputs (a temp dir)")
    ap.add_argument("--plan", action="store_true", help="print what would run, import what it needs, run nothing")
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.steps is None:
        steps = tuple(s for s in STEPS if not (args.dry_run and s in GPU_ONLY_STEPS + DRY_OPT_IN_STEPS))
    else:
        steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if bad := [s for s in steps if s not in STEPS]:
        raise SystemExit(f"gpu_check: unknown step(s) {bad}; choose from {', '.join(STEPS)}")
    if bad := [m for m in models if m not in MODELS]:
        raise SystemExit(f"gpu_check: unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    dry = args.dry_run
    sizes = args.batch_sizes or ("2,1" if dry else "256,64,1")
    try:
        batch_sizes = [int(b) for b in sizes.split(",")]
    except ValueError:
        raise SystemExit(f"gpu_check: --batch-sizes must be integers like 256,64,1, got {sizes!r}") from None
    return Settings(
        device="cpu" if dry else "cuda",
        dry_run=dry,
        # Triton's interpreter multiplies bf16 dot operands as raw bit patterns (tests/triton_interpreter.py
        # patches that for the tests only): the dry run uses fp16, the other 16-bit path, instead.
        precision="fp16" if dry else "bf16",
        steps=steps,
        models=models,
        batch_sizes=batch_sizes,
        # 330 s + GRACE_S: a lent GPU gives 15 minutes for everything, machine start (minutes) included;
        # a 6-minute run leaves room to run it once more (faster then: Triton's caches are warm).
        budget_s=args.budget_s
        if args.budget_s is not None
        else (120 if dry else 330),  # dry: 120 s since the roofline step (~20 s)
        tests_cap_s=args.tests_cap_s if args.tests_cap_s is not None else (45 if dry else 100),
        tests=DRY_TESTS if dry else TEST_FILES,
        repeat=2 if dry else 20,
        warmup=1 if dry else 3,
        iters=2 if dry else 20,
        agreement_batch=2 if dry else 64,  # 64: the layers step reuses the bf16 tuning of this batch bucket
        decode_images=8 if dry else 512,
        with_compile=args.with_compile or not dry,
        e2e_images=args.e2e_images if args.e2e_images is not None else (24 if dry else 20_000),
    )


def register_dry_models(models) -> dict[str, str]:
    """Register the dry run's tiny networks ("caffenet-dry", ...); {model: registered name}."""
    from fastfeat.layers import Conv, Linear
    from fastfeat.models import MODELS as REGISTRY
    from fastfeat.models import get_model, register_model

    names = {}
    for model in models:
        name = f"{model}-dry"
        if name not in REGISTRY:
            spec = get_model(model)
            layers = tuple(
                dataclasses.replace(layer, out=layer.out // DRY_WIDTH_DIVISOR)
                if isinstance(layer, (Conv, Linear))
                else layer
                for layer in spec.layers
            )
            register_model(dataclasses.replace(
                spec, name=name, input_size=DRY_INPUT[model], layers=layers, expected_macs=None, expected_shapes={},
                description=f"{model} with 1/{DRY_WIDTH_DIVISOR} of its widths, for gpu_check --dry-run",
            ))  # fmt: skip
        names[model] = name
    return names


# -- the budget and the report -------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Report:
    """The JSON written after every unit of work; the watchdog writes the last saved state."""

    def __init__(self, paths: list[str], data: dict):
        self.paths, self.data = paths, data
        self.text = ""
        self.lock = threading.Lock()

    def save(self) -> None:
        text = json.dumps(self.data, indent=1, default=str)
        with self.lock:
            self.text = text
            self._write(text)

    def _write(self, text: str) -> None:
        for path in self.paths:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(tmp, path)

    def abort(self, why: str) -> None:
        """From the watchdog thread: the last saved state plus why the run ended."""
        with self.lock:
            data = json.loads(self.text) if self.text else {}
            data["aborted"] = why
            self._write(json.dumps(data, indent=1, default=str))


def start_watchdog(report: Report, budget: Budget, grace_s: float = GRACE_S) -> threading.Timer:
    """End the process at the budget plus ``grace_s``, whatever runs then, keeping the last saved JSON."""

    def fire():
        why = f"watchdog: still running at {budget.elapsed():.0f} s (budget {budget.seconds:.0f} s + {grace_s:g} s)"
        print(f"gpu_check: {why}; partial results kept", flush=True)
        report.abort(why)
        os._exit(EXIT_ABORTED)  # not sys.exit: the main thread may be inside a compile that never returns

    timer = threading.Timer(max(budget.left(), 0) + grace_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def out_of_budget(rec: dict, budget: Budget, unit: str) -> bool:
    if budget.left() > 0:
        return False
    rec.setdefault("skipped", []).append(f"{unit}: out of time budget")
    return True


# -- step 1: tests ---------------------------------------------------------------------------------------
def run_tests(rec: dict, cfg: Settings, budget: Budget) -> None:
    if importlib.util.find_spec("pytest") is None:
        rec.update(status="skipped", reason="pytest is not installed here; the agreement step checks the backend")
        return
    cap = max(min(cfg.tests_cap_s, budget.left()), 1.0)
    events = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    events.close()
    env = {**os.environ, EVENTS_ENV: events.name, "FASTFEAT_AUTOTUNE": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([BENCH, ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check", *cfg.tests]
    rec["command"] = " ".join(cmd[1:])
    log = tempfile.TemporaryFile("w+")
    # Own session: a cap kills pytest and whatever it started, and nothing else.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rec["exit_code"] = proc.wait(timeout=cap)
        rec["capped"] = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rec.update(exit_code=None, capped=True, cap_s=cap)
    with open(events.name, encoding="utf-8") as f:
        outcomes = [json.loads(line) for line in f if line.strip()]
    os.unlink(events.name)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
    rec["counts"] = counts
    rec["failures"] = [o["test"] for o in outcomes if o["outcome"] == "failed"]
    log.seek(0)
    rec["output_tail"] = log.read()[-4000:]
    if rec["failures"] or (rec["exit_code"] not in (0, None)):
        rec["status"] = "failed"
    print(f"tests: {counts} capped={rec['capped']} exit={rec['exit_code']}", flush=True)


# -- step 2: agreement -------------------------------------------------------------------------------------
def agreement(rec: dict, cfg: Settings, budget: Budget, report: Report, names: dict, weights) -> None:
    import torch

    from fastfeat.backends import make_backend
    from fastfeat.models import get_model
    from fastfeat.runtime import PRECISIONS

    dev = torch.device(cfg.device)
    rec["results"] = []
    for model in cfg.models:
        spec = get_model(names[model])
        taps = [t for t in AGREEMENT_TAPS if t in spec.layer_names]
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(cfg.agreement_batch, spec.input_size, spec.input_size, 3, generator=gen)  # N(0,1) images
        for precision in (cfg.precision, "fp32"):
            if out_of_budget(rec, budget, f"{model} {precision}"):
                continue
            dtype = PRECISIONS[precision]
            outs, alone_equal = {}, {}
            # fp32 only: "triton-splitk", the backend with the tap-segmented convs (kernels/conv_splitk.py),
            # one config per launch (numerics only; its fp32 keys are none the timing steps reuse), and for
            # both triton variants whether image 0 alone (batch 1, where segmented convs split) gives the
            # bits of its row in the batch.
            variants = ("triton", "torch") + (("triton-splitk",) if precision == "fp32" else ())
            for variant in variants:  # the torch backend turns TF32 off for fp32 on CUDA
                backend = "torch" if variant == "torch" else "triton"
                splitk = variant == "triton-splitk"
                with _env(SPLITK_ENV, "1" if splitk else "0"), _env(AUTOTUNE_ENV, "0" if splitk else None):
                    net = make_backend(backend, spec, weights(model), dev, dtype)
                    acts = net.forward_intermediates(net.prepare(x), taps)
                    outs[variant] = {t: acts[t].reshape(len(x), -1).double().cpu() for t in taps}
                    if variant != "torch" and precision == "fp32":
                        first = {t: acts[t][0].clone() for t in taps}
                        alone = net.forward_intermediates(net.prepare(x[:1]), taps)
                        alone_equal[variant] = {t: bool(torch.equal(alone[t][0], first[t])) for t in taps}
                del net, acts
            result = {"model": model, "precision": precision, "batch": cfg.agreement_batch}
            for variant in variants[:1] + variants[2:]:
                errors = {t: ((outs[variant][t] - outs["torch"][t]).norm() / outs["torch"][t].norm()).item()
                          for t in taps}  # fmt: skip
                worst = max(errors, key=errors.get)
                ok = errors[worst] <= TOLERANCES[precision]
                if not ok:
                    rec["status"] = "failed"
                verdict = {"rel_err": errors, "worst": worst, "tolerance": TOLERANCES[precision], "ok": ok}
                if variant == "triton":
                    result.update(verdict)
                else:
                    result["splitk"] = verdict
                print(f"agreement {model} {precision} {variant}: worst {worst} {errors[worst]:.2e} "
                      f"({'ok' if ok else 'FAIL'})")  # fmt: skip
            if alone_equal:
                result["row0_batch1_bit_identical"] = alone_equal
                print(f"agreement {model} {precision}: image 0 at batch 1 bit-identical to its row: "
                      f"{ {v: all(e.values()) for v, e in alone_equal.items()} }")  # fmt: skip
            rec["results"].append(result)
            report.save()


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """``name=value`` in the environment for the block (None: left as it is), the old value back afterwards."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


# -- steps 3, 4 and 7: timings -------------------------------------------------------------------------------
def whole_forward(
    spec, backend: str, batch: int, device: str, tensors, precision: str, iters: int, warmup: int
) -> float:
    """img/s of the full forward pass (to fc8) after warm-up (and compilation); CUDA events on a GPU."""
    import torch

    from fastfeat.backends import make_backend
    from fastfeat.runtime import PRECISIONS

    dev = torch.device(device)
    net = make_backend(backend, spec, tensors, dev, PRECISIONS[precision])
    gen = torch.Generator().manual_seed(0)
    x = net.prepare(torch.randn(batch, spec.input_size, spec.input_size, 3, generator=gen).to(dev))
    last = spec.layer_names[-1]
    for _ in range(max(warmup, 1)):  # the first call compiles (and autotunes): never timed
        net.forward_intermediates(x, [last])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            net.forward_intermediates(x, [last])
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            net.forward_intermediates(x, [last])
        seconds = time.perf_counter() - t0
    return batch * iters / seconds


def layers(rec: dict, cfg: Settings, budget: Budget, report: Report, names: dict, backends: tuple) -> None:
    from fastfeat.profile import format_table, profile

    rec.setdefault("results", [])
    for batch in cfg.batch_sizes:
        for model in cfg.models:
            if out_of_budget(rec, budget, f"{model} {'+'.join(backends)} b{batch}"):
                continue
            res = profile(names[model], backends=backends, device=cfg.device, precision=cfg.precision, batch_sizes=[batch],
                          repeat=cfg.repeat, warmup=cfg.warmup, log=lambda m: print(m, flush=True))  # fmt: skip
            rec["results"] += res
            print(format_table(res), flush=True)
            report.save()


def roofline(rec: dict, cfg: Settings, budget: Budget, report: Report, names: dict, weights) -> None:
    """Step 3b: the per-kernel table of benchmarks/layer_roofline.py, rows saved as they come."""
    import torch
    from layer_roofline import format_rows, run_model

    from fastfeat.models import get_model
    from fastfeat.runtime import PRECISIONS

    rows = rec.setdefault("rows", [])
    rec["columns"] = "ms: median per call; tflops / gb_s: achieved; roofline_share: peak-bound time / ms"

    def emit(row: dict) -> None:
        rows.append(row)
        report.save()

    # The dry run proves the step on one tiny network at its smallest batch (the interpreter needs ~15 s).
    batches = [min(cfg.batch_sizes)] if cfg.dry_run else cfg.batch_sizes
    models = cfg.models[:1] if cfg.dry_run else cfg.models
    for batch in batches:
        for model in models:
            if out_of_budget(rec, budget, f"{model} b{batch}"):
                continue
            run_model(get_model(names[model]), batch, PRECISIONS[cfg.precision], torch.device(cfg.device),
                      weights(model), repeat=cfg.repeat if not cfg.dry_run else 1, iters=max(cfg.iters // 4, 1),
                      with_compile=cfg.with_compile, out_of_budget=lambda unit: out_of_budget(rec, budget, unit),
                      emit=emit)  # fmt: skip
    print(format_rows(rows), flush=True)


def forward(rec: dict, cfg: Settings, budget: Budget, report: Report, names: dict, weights, backends: tuple) -> None:
    from fastfeat.models import get_model

    rec.setdefault("img_per_s", {})
    for batch in cfg.batch_sizes:
        for model in cfg.models:
            for backend in backends:
                key = f"{model} {backend} b{batch}"
                if out_of_budget(rec, budget, key):
                    continue
                spec = get_model(names[model])
                ips = whole_forward(spec, backend, batch, cfg.device, weights(model), cfg.precision, cfg.iters,
                                    cfg.warmup)  # fmt: skip
                rec["img_per_s"][key] = ips
                print(f"forward {key}: {ips:,.0f} img/s", flush=True)
                report.save()


def compile_step(rec: dict, cfg: Settings, budget: Budget, report: Report, names: dict, weights) -> None:
    if not cfg.with_compile:
        rec.update(status="skipped", reason="dry run without --with-compile: Inductor's cold C++ build takes ~40 s "
                   "on CPU; the step makes the same whole_forward and profile calls as the forward and layers steps")  # fmt: skip
        return
    forward(rec, cfg, budget, report, names, weights, ("compile",))
    layers(rec, cfg, budget, report, names, ("compile",))


# -- step: graphs (issue 24) ----------------------------------------------------------------------------------
# The host out of the forward pass: img/s at batch 64, 1 and 256 (most valuable first) for triton JIT and
# triton with the AOT library, each without and with CUDA graphs; torch eager and torch with graphs;
# torch.compile reduce-overhead and max-autotune last (they autotune per batch).  bf16, taps relu6,relu7,
# AlexNet and CaffeNet; host ms per forward pass without graphs (benchmarks/host_time.py); and one padded
# short batch against its unpadded run.  Sized for one device call of at most 8 minutes (the budget cuts
# the compile variants first: they come last, batch by batch):
#     python benchmarks/gpu_check.py --steps graphs --budget-s 420      (watchdog at 450 s)
# The record is saved after every unit into gpu_check.json and gpu_check_graphs.json.
GRAPH_TAPS = ("relu6", "relu7")
GRAPH_BATCHES = (64, 1, 256)
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def _emulated_capture(fn, static_input):
    """The dry run's stand-in for a CUDA graph (a CPU has none): replay recomputes into the outputs of the
    'capture', so the step's bucketing, padding and bookkeeping run end to end; its timings mean nothing."""
    outputs = {k: v.clone() for k, v in fn(static_input).items()}

    def replay():
        for k, v in fn(static_input).items():
            outputs[k].copy_(v)

    return replay, outputs


def _images_per_s(run, x, iters: int, warmup: int) -> float:
    import torch

    for _ in range(max(warmup, 1)):  # the first call compiles, autotunes, plans (or captures): never timed
        run(x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run(x)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            run(x)
        seconds = time.perf_counter() - t0
    return x.shape[0] * iters / seconds


def graphs_step(rec: dict, cfg: Settings, budget: Budget, report: Report, names: dict, weights) -> None:
    """See the comment above GRAPH_TAPS.  FASTFEAT_NATIVE (switched per variant) is restored after it."""
    saved = os.environ.get("FASTFEAT_NATIVE")
    try:
        _graphs_units(rec, cfg, budget, report, names, weights)
    finally:
        if saved is None:
            os.environ.pop("FASTFEAT_NATIVE", None)
        else:
            os.environ["FASTFEAT_NATIVE"] = saved
        from fastfeat.kernels import native

        native.reset()


def _graphs_units(rec: dict, cfg: Settings, budget: Budget, report: Report, names: dict, weights) -> None:
    from functools import partial

    import torch
    from host_time import host_ms_per_forward

    from fastfeat.backends import make_backend
    from fastfeat.graphs import GraphForward, cuda_capture
    from fastfeat.kernels import native
    from fastfeat.models import get_model
    from fastfeat.runtime import PRECISIONS, git_sha

    dev = torch.device(cfg.device)
    dtype = PRECISIONS[cfg.precision]
    capture = cuda_capture if dev.type == "cuda" else _emulated_capture
    # The dry run: one batch of 2 (a padded row of 1 in it), two host calls: it only proves the code runs.
    batches = (2,) if cfg.dry_run else GRAPH_BATCHES
    host_calls = 2 if cfg.dry_run else 20
    taps = list(GRAPH_TAPS)
    rec.update(commit=git_sha(), taps=taps, precision=cfg.precision, batches=list(batches), img_per_s={}, host_ms={},
               graph_stats={}, padding={}, notes=[],
               capture="cuda" if dev.type == "cuda" else "emulated (dry run on CPU): bookkeeping only, no timing")  # fmt: skip
    own = Report([os.path.join(os.path.dirname(p), "gpu_check_graphs.json") for p in report.paths], {})

    def save() -> None:
        report.save()
        own.data = {k: report.data.get(k) for k in ("device", "torch", "triton", "capability")} | {"graphs": rec}
        own.save()

    def kernels(source: str) -> str | None:
        """Switch the triton backend's kernels to JIT or the AOT library; why not, or None."""
        os.environ["FASTFEAT_NATIVE"] = "1" if source == "native" else "0"
        native.reset()
        if source == "jit":
            return None
        if dev.type != "cuda":
            return "dry run: the AOT library runs on a GPU only"
        return None if native.library() is not None else native.describe()

    def measure(model: str, batch: int, label: str, net, graphs: bool, host: bool) -> None:
        key = f"{model} {label}{' graphs' if graphs else ''} b{batch}"
        if out_of_budget(rec, budget, key):
            return
        spec = net.spec
        gen = torch.Generator().manual_seed(0)
        x = net.prepare(torch.randn(batch, spec.input_size, spec.input_size, 3, generator=gen))
        if graphs:
            run = GraphForward(partial(net.forward_intermediates, names=taps), batch, capture=capture)
        else:
            run = partial(net.forward_intermediates, names=taps)
        rec["img_per_s"][key] = _images_per_s(run, x, cfg.iters, cfg.warmup)
        if graphs:
            rec["graph_stats"][key] = dict(run.stats, failed=list(run.failed.values()))
        if host:
            rec["host_ms"][key] = host_ms_per_forward(lambda: run(x), dev, calls=host_calls)
        print(f"graphs {key}: {rec['img_per_s'][key]:,.3g} img/s", flush=True)
        save()

    def padding(model: str, net) -> None:
        """A short batch padded to its bucket against the same rows run unpadded (rows never mix)."""
        full = max(batches)
        rows = max(1, full * 3 // 5)
        key = f"{model} triton b{rows} in bucket {full}"
        if full < 2 or out_of_budget(rec, budget, key):
            return
        spec = net.spec
        gen = torch.Generator().manual_seed(3)
        images = torch.randn(full, spec.input_size, spec.input_size, 3, generator=gen)
        run = GraphForward(partial(net.forward_intermediates, names=taps), full, capture=capture)
        run(net.prepare(images))
        short = net.prepare(images[:rows] * 0.5)
        padded = {k: v.float().clone() for k, v in run(short).items()}
        alone = {k: v.float() for k, v in net.forward_intermediates(short, taps).items()}
        rec["padding"][key] = {
            t: {"rel_err": float((padded[t] - alone[t]).norm() / alone[t].norm()),
                "bit_identical": bool(torch.equal(padded[t], alone[t]))}
            for t in taps
        }  # fmt: skip
        save()

    for batch in batches:
        for model in cfg.models:
            spec = get_model(names[model])
            for source in ("jit", "native"):
                why = kernels(source)
                if why is not None:
                    rec["notes"].append(f"triton {source}: {why}")
                    continue
                net = make_backend("triton", spec, weights(model), dev, dtype)
                measure(model, batch, f"triton {source}", net, graphs=True, host=False)
                measure(model, batch, f"triton {source}", net, graphs=False, host=True)
                if source == "jit" and batch == batches[0]:
                    padding(model, net)
                del net
            kernels("jit")
            net = make_backend("torch", spec, weights(model), dev, dtype)
            measure(model, batch, "torch", net, graphs=False, host=True)
            measure(model, batch, "torch", net, graphs=True, host=False)
            del net
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    rec["notes"] = sorted(set(rec["notes"]))
    if cfg.dry_run and not cfg.with_compile:
        rec["notes"].append("compile modes: dry run without --with-compile (Inductor's cold C++ build)")
        save()
        return
    # Batch by batch (64 first), both modes: a run cut short still compares every variant at one batch.
    for batch in batches:
        for model in cfg.models:
            for mode in GRAPH_COMPILE_MODES:
                net = make_backend("compile", get_model(names[model]), weights(model), dev, dtype, compile_mode=mode)
                measure(model, batch, f"compile {mode}", net, graphs=False, host=False)
                del net
                torch._dynamo.reset()
    save()


# -- step 5: native ---------------------------------------------------------------------------------------
def native_step(rec: dict, cfg: Settings, budget: Budget, report: Report) -> None:
    """The prebuilt AOT library on this GPU: its GPU tests, the layer benchmark, start-up times.

    Runs carried binaries and scripts only (no cmake, no compiler needed here): the library is built on
    any machine (``cmake --build build``, sm_80 and sm_90) and travels with the checkout.
    """
    lib = os.environ.get("FASTFEAT_NATIVE_LIB") or next(
        (p for p in (NATIVE_LIB, NATIVE_BUILD_LIB) if os.path.isfile(p)), NATIVE_LIB
    )
    bench = os.environ.get("FASTFEAT_LAYER_BENCH") or NATIVE_BENCH
    if cfg.dry_run:
        rec.update(status="skipped", reason="dry run: the native library runs on a GPU only")
        return
    if not os.path.isfile(lib):
        rec.update(status="skipped", reason=f"no prebuilt library at {lib}: build it (README, Native library) "
                   "and carry kernels/libfastfeat_kernels.so (and build/fastfeat-layer-bench) here")  # fmt: skip
        return
    rec.update(library=lib, results={})
    env = {**os.environ, "FASTFEAT_NATIVE_LIB": lib, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    env.pop("FASTFEAT_AUTOTUNE", None)
    tests = os.path.join(ROOT, "native", "tests")
    entries = os.path.join(os.path.dirname(bench), "native-gen", "entries.json")
    if os.path.isfile(entries):
        env["FASTFEAT_NATIVE_ENTRIES"] = entries

    def run(unit: str, cmd: list, extra_env: dict | None = None) -> dict | None:
        if out_of_budget(rec, budget, unit):
            return None
        cap = max(1.0, min(NATIVE_CAPS[unit.split()[0]], budget.left()))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=cap,
                                  cwd=ROOT)  # fmt: skip
            res = {"exit_code": proc.returncode, "output_tail": (proc.stdout + proc.stderr)[-3000:]}
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            res = {"exit_code": None, "timed_out_s": cap, "output_tail": out[-3000:]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        rec["results"][unit] = res
        if res["exit_code"] not in (0, 77):
            rec["status"] = "failed"
        print(f"native {unit}: exit {res['exit_code']} in {res['seconds']} s", flush=True)
        report.save()
        return res

    # Start-up: process start to the first CaffeNet output, JIT from an empty Triton cache vs the library.
    for label, flag in (("startup aot", "1"), ("startup jit", "0")):
        with tempfile.TemporaryDirectory(prefix="fastfeat-startup-") as cache:
            res = run(label, in_checkout(os.path.join(tests, "startup_time.py")),
                      {"FASTFEAT_NATIVE": flag, "TRITON_CACHE_DIR": cache})  # fmt: skip
        if res and res["exit_code"] == 0:
            res["result"] = json.loads(res["output_tail"].strip().splitlines()[-1])
    run("kernels", in_checkout(os.path.join(tests, "test_gpu_kernels.py")))
    run("splitk test", in_checkout(os.path.join(tests, "test_gpu_splitk.py")))
    run("forward", in_checkout(os.path.join(tests, "test_gpu_forward.py")))
    if os.path.isfile(bench):
        with tempfile.TemporaryDirectory(prefix="fastfeat-bench-") as tmp:
            out = os.path.join(tmp, "bench.json")
            sizes = ",".join(str(b) for b in cfg.batch_sizes)
            res = run("bench", [bench, "--model", "caffenet", "--batch-sizes", sizes, "--precision", cfg.precision,
                                "--repeat", str(cfg.repeat), "--warmup", str(cfg.warmup), "--json", out])  # fmt: skip
            if res and res["exit_code"] == 0 and os.path.isfile(out):
                with open(out) as f:
                    res["profile"] = json.load(f)
        splitk_rows(rec, cfg, report, bench, run)
    else:
        rec["results"]["bench"] = {"skipped": f"no {bench} (carry build/fastfeat-layer-bench with the library)"}


def splitk_rows(rec: dict, cfg: Settings, report: Report, bench: str, run) -> None:
    """The bench with both split-K reduces, one batch size per call: each fc op that splits K timed with the
    separate and the fused reduce, and whether their outputs are bit-identical (the bench exits 1 if not).
    The rows go to ``rec["splitk"]`` and the JSON is saved after each batch size."""
    rows = rec.setdefault("splitk", [])
    for batch in cfg.batch_sizes:
        with tempfile.TemporaryDirectory(prefix="fastfeat-splitk-") as tmp:
            out = os.path.join(tmp, "bench.json")
            res = run(f"splitk b{batch}", [bench, "--model", "caffenet", "--batch-sizes", str(batch), "--precision",
                                           cfg.precision, "--repeat", str(cfg.repeat), "--warmup", str(cfg.warmup),
                                           "--splitk-reduce", "both", "--json", out])  # fmt: skip
            if res is None:
                return
            if os.path.isfile(out):  # written before a mismatch ends the bench with exit 1
                with open(out) as f:
                    for result in json.load(f):
                        rows += [{"model": result["model"], "precision": result["precision"], **row}
                                 for row in result.get("splitk", [])]  # fmt: skip
        report.save()


def in_checkout(script: str) -> list[str]:
    """The command that runs a Python ``script`` with ``fastfeat.kernels`` importable from this checkout.

    The GPU machine runs the source tree uninstalled, where kernels/ is not yet fastfeat.kernels: the
    native scripts failed there with "No module named 'fastfeat.kernels'" (first GPU run, stop 19)."""
    boot = (
        "import runpy, sys; sys.path.insert(0, sys.argv[1]); from checkout import make_importable; "
        "make_importable(); sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [sys.executable, "-c", boot, BENCH, script]


# -- step 6: decode ---------------------------------------------------------------------------------------
def synthetic_jpegs(count: int, seed: int = 0) -> list[tuple[bytes, tuple[int, int]]]:
    """Photo-like JPEGs (smooth colour fields plus grain, 4:2:0 chroma as nearly every photo has)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        w, h = (500, 375) if i % 2 == 0 else (375, 500)
        low = torch.rand(1, 3, 6, 8, generator=gen)
        field = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
        field = field + 0.05 * torch.randn(3, h, w, generator=gen)
        pixels = (field.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="JPEG", quality=90, subsampling="4:2:0")
        out.append((buf.getvalue(), (w, h)))
    return out


def decode(rec: dict, cfg: Settings, budget: Budget, report: Report) -> None:
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        rec.update(status="skipped", reason="nvidia.dali is not installed here: hw_decoder_load and the GPU/CPU "
                   "decode difference stay unmeasured")  # fmt: skip
        return
    import numpy as np
    import torch

    from fastfeat.decode import Decoder
    from fastfeat.models import get_model

    pre = get_model("caffenet").preprocess  # BGR, mean subtracted, std 1: differences are in grey levels
    batch = 64 if not cfg.dry_run else 4
    images = synthetic_jpegs(cfg.decode_images)
    encoded = [np.frombuffer(b, np.uint8) for b, _ in images]
    sizes = [s for _, s in images]

    def run(device: torch.device, load: float) -> tuple[float, torch.Tensor]:
        decoder = Decoder(pre, batch, device, hw_decoder_load=load)
        decoder.decode(encoded[:batch], sizes[:batch])  # warm-up: nvJPEG and DALI allocate on first use
        rows, t0 = [], time.perf_counter()
        for i in range(0, len(encoded), batch):
            out, bad, _ = decoder.decode(encoded[i : i + batch], sizes[i : i + batch])
            if bad:
                raise RuntimeError(f"decode failed on synthetic JPEGs: {bad}")
            rows.append(out.cpu())
        return len(encoded) / (time.perf_counter() - t0), torch.cat(rows)

    rec["settings"] = {"images": len(encoded), "batch": batch, "size": "500x375 and 375x500, q90, 4:2:0"}
    cpu_ips, cpu_pixels = run(torch.device("cpu"), 0.0)
    rec["cpu_img_per_s"] = cpu_ips
    report.save()
    if cfg.device != "cuda":
        rec["mixed"] = "not measured: no CUDA device (dry run)"
        return
    rec["mixed"] = {}
    for load in DECODE_LOADS:
        if out_of_budget(rec, budget, f"mixed hw_decoder_load={load}"):
            continue
        ips, pixels = run(torch.device("cuda"), load)
        diff = (pixels - cpu_pixels).abs()
        rec["mixed"][str(load)] = {"img_per_s": ips, "max_abs_vs_cpu": diff.max().item(),
                                   "mean_abs_vs_cpu": diff.mean().item(),
                                   "share_differing_vs_cpu": (diff > 0.5).float().mean().item()}  # fmt: skip
        print(f"decode mixed hw_decoder_load={load}: {rec['mixed'][str(load)]}", flush=True)
        report.save()


# -- step 6b: e2e ------------------------------------------------------------------------------------------
# (decoder, hw_decoder_load): torchvision first (it needs nothing but torchvision), DALI where it imports.
E2E_DECODERS = (("torchvision", 0.0), ("dali", 0.0), ("dali", 0.65), ("dali", 1.0))
E2E_BACKENDS = ("triton", "torch")  # triton: CUDA graphs on (the best path); torch: the baseline
E2E_BATCH = 256
E2E_LAYERS = ["relu6", "relu7"]
E2E_RELU7_IMAGES = 256


def _dali_imports() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def _corpus_part(args: tuple[str, int, int]) -> dict:
    from make_corpus import make_corpus

    out, count, seed = args
    return make_corpus(out, count, seed=seed)


def make_e2e_corpus(root: str, count: int, parts: int) -> dict:
    """``count`` ImageNet-like JPEGs under root/part-k (make_corpus, seed k): the same files for the same
    (count, parts) on any machine with the same source photos; in ``parts`` processes."""
    import multiprocessing

    from make_corpus import source_photos

    per = [count // parts + (k < count % parts) for k in range(parts)]
    jobs = [(os.path.join(root, f"part-{k:02d}"), n, k) for k, n in enumerate(per) if n]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        stats = pool.map(_corpus_part, jobs)
    return {"images": count, "parts": len(jobs), "source_photos": [os.path.basename(p) for p in source_photos()],
            "mean_kb": round(sum(s["mean_kb"] * s["count"] for s in stats) / count, 1)}  # fmt: skip


def _read_corpus(root: str, limit: int | None = None) -> tuple[list, list]:
    """(encoded bytes, upright sizes) of the corpus's files in sorted order, read once into memory."""
    from fastfeat.header import read_image
    from fastfeat.sources import Item

    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".jpg"))[:limit]
    encoded, sizes = [], []
    for p in paths:
        data, size, problem = read_image(Item(p, p, None), 10**9)
        if problem is not None:
            raise RuntimeError(f"e2e corpus: {p}: {problem}")
        encoded.append(data)
        sizes.append(size)
    return encoded, sizes


def _dry_e2e_model() -> str:
    """The dry run's tiny AlexNet with its preprocessing scaled to its input (crop 99, resize 113), so that
    the decoders' output feeds it as a real AlexNet's feeds the real one."""
    from fastfeat.models import MODELS as REGISTRY
    from fastfeat.models import get_model, register_model

    name = "alexnet-e2e-dry"
    if name not in REGISTRY:
        spec = get_model(register_dry_models(("alexnet",))["alexnet"])
        crop = spec.input_size
        pre = dataclasses.replace(spec.preprocess, crop=crop, resize=round(crop * 256 / 224))
        register_model(dataclasses.replace(spec, name=name, preprocess=pre))
    return name


def _make_decoder(name: str, pre, batch: int, device, load: float = 0.0):
    from fastfeat.stages import decoder_class

    kw = {"hw_decoder_load": load} if name == "dali" else {}
    return decoder_class(name)(pre, batch, device, **kw)


def _decode_all(decoder, encoded, sizes, batch: int, keep: bool = False):
    """img/s of decoding every image (bytes in memory) in batches; the rows (on the host) when ``keep``."""
    import torch

    decoder.decode(encoded[:batch], sizes[:batch])  # warm-up: nvJPEG/DALI allocate on first use
    rows, t0 = [], time.perf_counter()
    for i in range(0, len(encoded), batch):
        out, bad, _ = decoder.decode(encoded[i : i + batch], sizes[i : i + batch])
        if bad:
            raise RuntimeError(f"decode failed on corpus JPEGs: {bad}")
        if keep:
            rows.append(out.float().cpu())
    if decoder.device.type == "cuda":
        torch.cuda.synchronize(decoder.device)
    ips = len(encoded) / (time.perf_counter() - t0)
    return ips, (torch.cat(rows) if keep else None)


def e2e_step(rec: dict, cfg: Settings, budget: Budget, report: Report, names: dict, work_dir: str | None) -> None:
    import shutil

    import torch

    from fastfeat.models import get_model
    from fastfeat.weights import load_weights

    model = "alexnet" if not cfg.dry_run else _dry_e2e_model()
    spec = get_model(model)
    pre, dev = spec.preprocess, torch.device(cfg.device)
    batch = E2E_BATCH if not cfg.dry_run else 4
    decoders = [(d, load) for d, load in E2E_DECODERS if d == "torchvision" or _dali_imports()]
    if cfg.device != "cuda":  # DALI's CPU decoder has no hw_decoder_load
        decoders = [(d, load) for d, load in decoders if load == 0.0]
    backends = E2E_BACKENDS if not cfg.dry_run else ("torch",)  # the interpreter would take minutes per batch
    root = work_dir or tempfile.mkdtemp(prefix="gpu_check-e2e-")
    corpus = os.path.join(root, "corpus")
    rec["settings"] = {"model": model, "layers": E2E_LAYERS, "batch": batch, "dir": root,
                       "decoders": [f"{d} {load}" for d, load in decoders], "backends": list(backends),
                       "host_cpus": os.cpu_count()}  # fmt: skip
    t0 = time.perf_counter()
    if os.path.isdir(corpus):
        rec["corpus"] = {"reused": corpus}
    else:
        rec["corpus"] = make_e2e_corpus(corpus, cfg.e2e_images, parts=min(16, os.cpu_count() or 1))
    rec["corpus"]["seconds"] = round(time.perf_counter() - t0, 1)
    report.save()
    encoded, sizes = _read_corpus(corpus)
    rec["decode_only"] = {}
    for name, load in decoders:
        key = f"{name} {dev.type}" + (f" hw_decoder_load={load}" if name == "dali" and dev.type == "cuda" else "")
        if out_of_budget(rec, budget, f"decode {key}"):
            continue
        ips, _ = _decode_all(_make_decoder(name, pre, batch, dev, load), encoded, sizes, batch)
        rec["decode_only"][key] = {"img_per_s": round(ips, 1)}
        print(f"e2e decode-only {key}: {ips:.0f} img/s", flush=True)
        report.save()
    tensors = load_weights(spec, "random:0").tensors
    precision = cfg.precision
    rec["forward_only"] = {}
    for backend in backends:
        if out_of_budget(rec, budget, f"forward {backend}"):
            continue
        rec["forward_only"][backend] = _forward_only(spec, tensors, backend, dev, precision, batch, cfg)
        print(f"e2e forward-only {backend}: {rec['forward_only'][backend]}", flush=True)
        report.save()
    rec["extract"] = {}
    if importlib.util.find_spec("pyarrow") is None:
        rec["extract"] = "skipped: pyarrow is not installed here (the Parquet sink needs it)"
        backends = ()
    else:
        from fastfeat.extractor import Extractor
    decoder_for_extract = "dali" if _dali_imports() and dev.type == "cuda" else "torchvision"
    for backend in backends:
        key = f"{backend} {decoder_for_extract}"
        if out_of_budget(rec, budget, f"extract {key}"):
            continue
        out = os.path.join(root, f"out-{backend}")
        shutil.rmtree(out, ignore_errors=True)
        ex = Extractor(corpus, out, model=model, weights="random:0", layers=E2E_LAYERS, batch_size=batch,
                       precision=precision, device=cfg.device, backend=backend, shard_size=10_000, progress=False,
                       decoder=decoder_for_extract, cuda_graphs="auto")  # fmt: skip
        summary = ex.run()
        ceiling = rec["decode_only"].get(f"{decoder_for_extract} {dev.type}") or rec["decode_only"].get(
            f"{decoder_for_extract} {dev.type} hw_decoder_load=0.0"
        )
        rec["extract"][key] = {
            k: summary.get(k)
            for k in ("images", "rows_written", "errors", "wall_s", "images_per_s", "startup_s", "stage_busy_s",
                      "thread_wait_s")
        }  # fmt: skip
        rec["extract"][key]["cuda_graphs"] = ex.cuda_graphs
        if ceiling and summary.get("images_per_s"):
            rec["extract"][key]["share_of_decode_ceiling"] = round(summary["images_per_s"] / ceiling["img_per_s"], 3)
        print(f"e2e extract {key}: {rec['extract'][key]}", flush=True)
        report.save()
    if not out_of_budget(rec, budget, "relu7 gpu vs cpu decode"):
        rec["relu7_decode_difference"] = _relu7_difference(spec, tensors, pre, dev, encoded, sizes, cfg)
        print(f"e2e relu7: {rec['relu7_decode_difference']}", flush=True)
        report.save()
    if work_dir is None:
        shutil.rmtree(root, ignore_errors=True)


def _forward_only(spec, tensors, backend: str, dev, precision: str, batch: int, cfg: Settings) -> dict:
    """img/s of the forward stage alone (fastfeat.forward.Forward: to the device, forward, rows back to the
    host; CUDA graphs as extract resolves them) on one random batch."""
    import torch

    from fastfeat.backends import make_backend
    from fastfeat.forward import Forward
    from fastfeat.graphs import resolve_cuda_graphs
    from fastfeat.runtime import PRECISIONS

    graphs = resolve_cuda_graphs("auto", dev, backend)
    net = make_backend(backend, spec, tensors, dev, PRECISIONS[precision])
    fwd = Forward(net, E2E_LAYERS, "float16", 1, "mean", pad_rows=batch, graph_rows=batch if graphs else None)
    import collections

    x = torch.randn(batch, spec.preprocess.crop, spec.preprocess.crop, 3, device=dev)
    good, busy = list(range(batch)), collections.defaultdict(float)  # the host->device->host stage, as extract
    for _ in range(cfg.warmup):
        fwd(x, good, busy)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(cfg.iters):
        fwd(x, good, busy)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"img_per_s": round(batch * cfg.iters / (time.perf_counter() - t0), 1), "cuda_graphs": graphs}


def _relu7_difference(spec, tensors, pre, dev, encoded, sizes, cfg: Settings) -> dict:
    """relu7 (torch backend, fp32) of the same images decoded on the device and on the CPU, relative per
    image: p50 and max, for each device decoder against DALI's CPU path (torchvision's where DALI is
    missing).  The dry run compares the two CPU decoders (torchvision vs DALI) where DALI imports."""
    import torch

    from fastfeat.backends import make_backend

    n = min(E2E_RELU7_IMAGES if not cfg.dry_run else 8, len(encoded))
    enc, siz = encoded[:n], sizes[:n]
    cpu = torch.device("cpu")
    reference_name = "dali" if _dali_imports() else "torchvision"
    _, reference = _decode_all(_make_decoder(reference_name, pre, 64, cpu), enc, siz, 64, keep=True)
    net = make_backend("torch", spec, tensors, dev, torch.float32)

    def relu7(images):
        rows = []
        for i in range(0, len(images), 64):
            x = net.prepare(images[i : i + 64].to(dev))
            rows.append(net.forward_intermediates(x, ["relu7"])["relu7"].flatten(1).float().cpu().clone())
        return torch.cat(rows)

    ref = relu7(reference)
    result = {"images": n, "reference": f"{reference_name} cpu"}
    candidates = ["torchvision"] + (["dali"] if _dali_imports() else [])
    for name in candidates:
        device = dev if dev.type == "cuda" else cpu
        if device.type == "cpu" and name == reference_name:
            continue  # the dry run: only the other CPU decoder is a comparison
        _, images = _decode_all(_make_decoder(name, pre, 64, device), enc, siz, 64, keep=True)
        pixel = (images - reference).abs() * torch.tensor(pre.std)
        rel = (relu7(images) - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)
        result[f"{name} {device.type}"] = {
            "relu7_rel_p50": rel.median().item(), "relu7_rel_max": rel.max().item(),
            "pixel_levels_max": pixel.max().item(), "pixel_levels_mean": pixel.mean().item(),
        }  # fmt: skip
    return result


# -- step 6c: the other GPU paths ---------------------------------------------------------------------------
PATH_UNITS = (
    ("extract", 120),
    ("augment 10crop", 150),
    ("probe torch", 120),
    ("ray 1 gpu actor", 240),
    ("serve vs extract", 240),
)  # fmt: skip  (unit, cap in seconds)


def _fastfeat_cli(*args: str) -> list[str]:
    """``fastfeat ARGS`` from this checkout (the device machine has no installed fastfeat)."""
    boot = (
        "import sys; sys.path.insert(0, sys.argv[1]); from checkout import make_importable; make_importable(); "
        "from fastfeat.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    return [sys.executable, "-c", boot, BENCH, *args]


def paths_step(rec: dict, cfg: Settings, budget: Budget, report: Report, work_dir: str | None) -> None:
    import shutil

    from make_corpus import make_corpus

    root = tempfile.mkdtemp(prefix="gpu_check-paths-", dir=work_dir)
    corpus = os.path.join(root, "corpus")
    count = 40 if cfg.dry_run else 2000
    rec["corpus"] = make_corpus(corpus, count)  # 10 class folders: probe has labels
    batch = "4" if cfg.dry_run else "256"
    common = ["--model", "alexnet", "--weights", "random:0", "--layers", "relu7", "--batch-size", batch,
              "--device", cfg.device, "--no-progress", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    rec["units"] = {}

    def run(unit: str, cmd: list[str], cap: float) -> dict | None:
        if out_of_budget(rec, budget, unit):
            return None
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, min(cap, budget.left())),
                                  cwd=root, env=env)  # fmt: skip
            result = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
            out = proc.stdout
            if proc.returncode != 0:
                result["tail"] = (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()
        except subprocess.TimeoutExpired:
            result, out = {"rc": None, "timed_out": True, "seconds": round(time.perf_counter() - t0, 1)}, ""
        try:
            parsed = json.loads(out[out.index("{") :]) if "{" in out else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            keep = ("images", "rows_written", "errors", "wall_s", "images_per_s", "stage_busy_s", "accuracy",
                    "mean_accuracy", "engine", "device")  # fmt: skip
            result["summary"] = {k: parsed[k] for k in keep if k in parsed}
        rec["units"][unit] = result
        print(f"paths {unit}: {result}", flush=True)
        report.save()
        return result

    caps = dict(PATH_UNITS)
    base = os.path.join(root, "out-base")
    run("extract", _fastfeat_cli("extract", corpus, "--out", base, *common), caps["extract"])
    run("augment 10crop", _fastfeat_cli("extract", corpus, "--out", os.path.join(root, "out-10crop"), *common,
                                        "--augment", "10crop"), caps["augment 10crop"])  # fmt: skip
    # 2: the held-out fifth for choosing C takes one row per class (with 1 the fit set is empty, and the
    # torch engine fails on it: torch.cat of no batches)
    per_class = "2" if cfg.dry_run else "30"
    probe_json = os.path.join(root, "probe.json")
    probe = [
        "probe",
        base,
        "--engine",
        "torch",
        "--device",
        cfg.device,
        "--splits",
        "2",
        "--train-per-class",
        per_class,
    ]
    probed = run("probe torch", _fastfeat_cli(*probe, "--json", probe_json), caps["probe torch"])
    if probed and probed["rc"] == 0 and os.path.isfile(probe_json):
        with open(probe_json) as f:
            got = json.load(f)
        probed["summary"] = {k: got.get(k) for k in ("engine", "device", "mean", "classes", "rows") if k in got}
        report.save()
    if cfg.dry_run:
        rec["units"]["ray 1 gpu actor"] = (
            "skipped: dry run (Ray's start-up takes minutes on a 2-core box; tests/test_ray.py)"
        )
    elif importlib.util.find_spec("ray") is None:
        rec["units"]["ray 1 gpu actor"] = "skipped: ray is not installed here"
    else:
        run("ray 1 gpu actor", _fastfeat_cli("extract", corpus, "--out", os.path.join(root, "out-ray"), *common,
                                             "--ray", "--ray-workers", "1"), caps["ray 1 gpu actor"])  # fmt: skip
    serve_json = os.path.join(root, "serve_load.json")
    serve = in_checkout(os.path.join(BENCH, "serve_load.py"))
    serve += ["--count", "64" if cfg.dry_run else "2048", "--repeats", "1", "--half-seconds", "3" if cfg.dry_run else "10",
              "--json", serve_json]  # fmt: skip
    if run("serve vs extract", serve, caps["serve vs extract"]) and os.path.isfile(serve_json):
        with open(serve_json) as f:
            got = json.load(f)
        rec["units"]["serve vs extract"]["summary"] = {
            k: got.get(k) for k in ("extract_img_per_s", "serve_saturation_img_per_s", "serve_over_extract_p50",
                                    "saturation_latency_ms")
        }  # fmt: skip
        report.save()
    failed = [u for u, r in rec["units"].items() if isinstance(r, dict) and r.get("rc") != 0]
    if failed:
        rec.update(status="failed", failed_units=failed)
    if work_dir is None:
        shutil.rmtree(root, ignore_errors=True)


# -- the plan, and the run ---------------------------------------------------------------------------------
def plan(cfg: Settings, names: dict) -> dict:
    """What would run, after importing everything the steps import (so an import error shows here)."""
    import torch  # noqa: F401
    import triton

    from fastfeat import profile  # noqa: F401
    from fastfeat.backends import get_backend

    for backend in ("torch", "triton", "compile"):
        get_backend(backend)
    from fastfeat.kernels import conv, gemm, lrn, pool  # noqa: F401

    units = {
        "tests": list(cfg.tests),
        "agreement": [f"{m} {p} b{cfg.agreement_batch}" for m in cfg.models for p in (cfg.precision, "fp32")],
        "layers": [f"{m} torch+triton b{b}" for b in cfg.batch_sizes for m in cfg.models],
        "roofline": [
            f"{m} b{b}"
            for b in ([min(cfg.batch_sizes)] if cfg.dry_run else cfg.batch_sizes)
            for m in (cfg.models[:1] if cfg.dry_run else cfg.models)
        ],
        "forward": [f"{m} {k} b{b}" for b in cfg.batch_sizes for m in cfg.models for k in ("torch", "triton")],
        "graphs": [
            f"{m} {k} b{b}"
            for b in ((2,) if cfg.dry_run else GRAPH_BATCHES)
            for m in cfg.models
            for k in ("triton jit", "triton native", "torch")
        ]
        + [f"compile {mode}" for mode in GRAPH_COMPILE_MODES],
        "native": ["startup aot", "startup jit", "kernels", "splitk test", "forward", "bench"]
        + [f"splitk b{b}" for b in cfg.batch_sizes],
        "decode": [f"cpu, mixed hw_decoder_load={load}" for load in DECODE_LOADS],
        "compile": [f"{m} compile b{b}" for b in cfg.batch_sizes for m in cfg.models],
        "paths": [u for u, _ in PATH_UNITS],
        "e2e": [f"corpus {cfg.e2e_images}"]
        + [f"decode {d}" for d, _ in E2E_DECODERS]
        + [f"forward {b}" for b in E2E_BACKENDS]
        + [f"extract {b}" for b in E2E_BACKENDS]
        + ["relu7 gpu vs cpu decode"],
    }
    return {
        "settings": dataclasses.asdict(cfg),
        "models": names,
        "steps": {s: units[s] for s in cfg.steps},
        "available": {
            "pytest": importlib.util.find_spec("pytest") is not None,
            "nvidia.dali": importlib.util.find_spec("nvidia") is not None
            and importlib.util.find_spec("nvidia.dali") is not None,
            "triton": triton.__version__,
        },
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = settings_from(args)
    if cfg.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    budget = Budget(cfg.budget_s)
    make_importable()
    import torch

    if not cfg.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; this script is for a GPU machine (or use --dry-run)")
    names = register_dry_models(cfg.models) if cfg.dry_run else {m: m for m in cfg.models}
    if args.plan:
        print(json.dumps(plan(cfg, names), indent=1, default=str))
        return 0

    import triton

    from fastfeat.models import get_model
    from fastfeat.runtime import device_name
    from fastfeat.weights import load_weights

    out_dir = args.out or os.environ.get("OUT")
    paths = [os.path.join(out_dir, "gpu_check.json")] if out_dir else []
    if not cfg.dry_run:
        paths.append(os.path.join(BENCH, "results", "gpu_check.json"))
    if not paths:  # a dry run never writes benchmarks/results
        paths = [os.path.join(tempfile.mkdtemp(prefix="gpu_check-dry-"), "gpu_check.json")]
        print(f"gpu_check: no --out (or $OUT): writing {paths[0]}", flush=True)
    dev = torch.device(cfg.device)
    report = Report(paths, {
        "dry_run": cfg.dry_run, "device": device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
        "capability": list(torch.cuda.get_device_capability(dev)) if dev.type == "cuda" else None,
        "budget_s": cfg.budget_s, "settings": dataclasses.asdict(cfg), "steps": {},
    })  # fmt: skip
    report.save()
    start_watchdog(report, budget)

    cache: dict = {}

    def weights(model: str):
        if model not in cache:  # random He weights (fastfeat.weights); loaded once per network
            cache[model] = load_weights(get_model(names[model]), "random:0").tensors
        return cache[model]

    work = {
        "tests": lambda rec: run_tests(rec, cfg, budget),
        "agreement": lambda rec: agreement(rec, cfg, budget, report, names, weights),
        "layers": lambda rec: layers(rec, cfg, budget, report, names, ("torch", "triton")),
        "roofline": lambda rec: roofline(rec, cfg, budget, report, names, weights),
        "forward": lambda rec: forward(rec, cfg, budget, report, names, weights, ("torch", "triton")),
        "graphs": lambda rec: graphs_step(rec, cfg, budget, report, names, weights),
        "native": lambda rec: native_step(rec, cfg, budget, report),
        "decode": lambda rec: decode(rec, cfg, budget, report),
        "paths": lambda rec: paths_step(rec, cfg, budget, report, args.e2e_dir),
        "e2e": lambda rec: e2e_step(rec, cfg, budget, report, names, args.e2e_dir),
        "compile": lambda rec: compile_step(rec, cfg, budget, report, names, weights),
    }
    for step in cfg.steps:
        rec = report.data["steps"][step] = {"status": "running", "started_s": round(budget.elapsed(), 1)}
        report.data["current"] = step
        report.save()
        print(f"== {step} ({budget.elapsed():.0f} s of {cfg.budget_s:.0f})", flush=True)
        try:
            work[step](rec)
        except Exception:
            rec.update(status="error", error=traceback.format_exc()[-4000:])
            print(rec["error"], flush=True)
        if rec["status"] == "running":
            rec["status"] = "done"
        rec["seconds"] = round(budget.elapsed() - rec["started_s"], 1)
        report.save()
    report.data.pop("current", None)
    report.data["targets"] = targets(report.data["steps"])
    report.data["seconds"] = round(budget.elapsed(), 1)
    report.save()
    if not cfg.dry_run:
        append_results(report.data["steps"].get("forward", {}), device_name(dev), cfg.precision)
    failed = [s for s, r in report.data["steps"].items() if r["status"] in ("failed", "error")]
    print(json.dumps(report.data["targets"], indent=1))
    print(f"gpu_check done in {budget.elapsed():.0f} s; failed steps: {failed or 'none'}")
    return EXIT_FAILED if failed else 0


def targets(steps: dict) -> dict:
    """Triton vs torch eager, whole forward, at the largest batch measured (the target is at 256)."""
    ips = steps.get("forward", {}).get("img_per_s", {})
    out = {}
    for key, value in ips.items():
        model, backend, batch = key.split()
        eager = ips.get(f"{model} torch {batch}")
        if backend != "torch" and eager:
            out[f"{model} {backend} {batch} vs torch eager"] = value / eager
    return out


def append_results(rec: dict, device: str, precision: str) -> None:
    from results import append

    rows = []
    for key, ips in rec.get("img_per_s", {}).items():
        model, backend, batch = key.split()
        rows.append({"kernel": f"{model}_forward", "provider": backend, "shape": f"{model} full", "dtype": precision,
                     "batch": int(batch[1:]), "metric": "img/s", "p20": "", "p50": round(ips, 1), "p80": "",
                     "device": device})  # fmt: skip
    if rows:
        append(rows)


if __name__ == "__main__":
    sys.exit(main())
