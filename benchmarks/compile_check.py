"""Ahead-of-time compile check of every fastfeat.kernels Triton kernel for A100 (sm_80) and H100/H200 (sm_90).

Needs no GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
compiler (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) on the CPU with the ptxas that triton bundles. It catches
what the CPU interpreter never sees: ops or layouts the GPU backend rejects, register spills, and
configs whose shared memory does not fit the device.

What is compiled: the exact launches the triton backend makes. ``TritonNet.plan`` runs over empty CPU
tensors with each kernel replaced by a recorder, for CaffeNet and AlexNet, for three plans (only the
last layer requested: conv+ReLU, pool(+LRN), fc+ReLU fused; every layer requested: plain conv, pool,
stand-alone LRN, fc without ReLU; the convs requested: ReLU+pool(+LRN) fused) at batch 1, 256 and 2048
in bf16, plus fp16 and fp32 for one CaffeNet launch per kernel shape family (``REPRESENTATIVE``). Each
launch is specialised exactly as ``JITFunction.run`` would (constexprs, ints equal to 1 folded to
constexprs, 16-divisibility of ints and pointers). An autotuned launch is compiled for every config its
``early_config_prune`` keeps on the target when shared memory is unlimited (the GEMM's M-bucket family,
the conv's channel-slab and register rules; ``--all-configs``: every config), and each is marked with
whether the hook keeps it at the target's real limit. The split-K choice uses each target's SM count
(A100: 108, H100/H200: 132). Identical (kernel, specialisation, config, target) combinations compile
once; launches that differ only in the epilogue switches APPLY_RELU / HAS_BIAS compile once, with both
on (``--exhaustive`` compiles each setting), and SPLIT_K > 1 values of the GEMM, which only tests
SPLIT_K == 1, compile once.

Reported per (kernel, config, target): compile success, registers per thread (ptxas -v), spill bytes
(stores + loads), shared memory (the compiled kernel's metadata), and flags:

* ``FAIL``: the compiler raised (the reason is printed; the full text is in the JSON);
* ``SMEM>LIMIT``: shared memory above the device limit (A100: 163 KiB, H100/H200: 227 KiB) although
  the prune hook keeps the config: it would fail to launch;
* ``SPILL``: ptxas spilled registers in a config the prune hook keeps;
* ``smem>limit(pruned)``, ``spill(pruned)``, ``pruned``: the hook drops the config on that target;
* ``spill(minor)``: at most MINOR_SPILL_BYTES spilled with registers to spare (ptxas's own choice);
* ``regs-at-cap``: 255 registers per thread, no spill.

FAIL, SMEM>LIMIT and SPILL are problems: the exit status is then 1 (0 when clean, 77 when triton cannot
compile for a GPU target on this machine).

This script is the command line: it records the backend's launches (``record_model_launches``: the part
that needs fastfeat's models and backends), prints the table and writes the JSON. The checker itself
(targets, recorder, specialisation, pruning, compiling, flags) is ``fastfeat.kernels.aot``, which reaches
Triton's private APIs only through ``fastfeat.kernels.triton_compat`` (it names the Triton versions it
was checked against; another version draws a warning).

    python benchmarks/compile_check.py --jobs 2 --json out.json   # 429 compiles, 2-8 min on 2 cores
    python benchmarks/compile_check.py --quick              # first kept config per specialisation
    python benchmarks/compile_check.py --representative --targets sm90   # the CI subset (~6 s)
    python benchmarks/compile_check.py --all-configs --jobs 2    # also the pruned configs (~6 min)
    python benchmarks/compile_check.py --dry-run            # count the compiles only
    python benchmarks/compile_check.py --kernels _linear_splitk_fused_kernel --jobs 2   # one kernel's compiles

Same machine code before and after a change of the kernel sources (a refactor that should not change
what compiles): ``--ptx-digest`` records per job the sha256 of its PTX without debug information
(``aot.normalise_ptx``: no ``.loc``/``.file`` lines, DWARF sections or comments), ``--compare-digests
BEFORE.json`` compares this run's digests with those of an earlier ``--ptx-digest --json`` run (jobs
matched by kernel, target, config, signature, constexprs and attributes) and lists the jobs whose digest
changed with their registers, spills and shared memory before and after; exit status 1 if any changed
or a job is on one side only. ``--compare-digests A.json B.json`` compares two such files, compiling
nothing. ``--ptx-dir DIR`` keeps each job's normalised PTX for a diff.

    python benchmarks/compile_check.py --quick --jobs 2 --ptx-digest --json before.json
    python benchmarks/compile_check.py --quick --jobs 2 --ptx-digest --json after.json --compare-digests before.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkout import make_importable  # noqa: E402

make_importable()  # fastfeat.kernels from this checkout when fastfeat is not installed
# Imports neither triton nor torch: TRITON_INTERPRET is settled in main() before anything imports triton.
from fastfeat.kernels import aot  # noqa: E402


def record_model_launches(model: str, dtype_name: str, batches, targets) -> dict[str, list[tuple[str, tuple]]]:
    """{target: [(label, launch)]} for three plans of ``model`` at each batch size.

    Plans: only the last layer requested (everything fused), every layer requested (nothing fused:
    plain conv, pool, stand-alone LRN, fc without ReLU), and the convs plus the last layer (conv
    without ReLU, then ReLU + pool (+ LRN) in one kernel).
    """
    import torch

    from fastfeat.backends.triton_backend import TritonNet
    from fastfeat.models import get_model

    dtype = getattr(torch, aot.DTYPES[dtype_name])
    spec = get_model(model)
    tensors = {k: torch.empty(shape) for k, shape in spec.param_shapes().items()}  # never read
    with aot.recording(aot.TARGETS[targets[0]].sm_count):
        net = TritonNet(spec, tensors, torch.device("cpu"), dtype)
    convs = [layer.name for layer in spec.layers if layer.kind == "conv"]
    plans = ([spec.layer_names[-1]], spec.layer_names, convs + [spec.layer_names[-1]])
    out: dict[str, list] = {t: [] for t in targets}
    for target in targets:
        for batch in batches:
            # Both split-K reduces: "separate" is what the AOT library ships, "fused" the JIT default
            # (identical conv/pool launches of the second pass compile once: build_jobs deduplicates).
            for names, reduce in itertools.product(plans, ("separate", "fused")):
                x = torch.empty((batch, spec.input_size, spec.input_size, 3), dtype=dtype)  # never read
                with aot.recording(aot.TARGETS[target].sm_count, reduce) as sink, torch.inference_mode():
                    for op in net.plan(names):
                        if op.run is torch.relu:  # an un-fused ReLU is a torch op, not a kernel: skip the work
                            continue
                        start = len(sink)
                        x = op.run(x)
                        out[target] += [(aot.label(model, op.name, dtype_name, batch), c) for c in sink[start:]]
    out_variants = record_variant_launches(spec, model, dtype, dtype_name, batches, targets)
    for target in targets:
        out[target] += out_variants[target]
    return out


def record_variant_launches(spec, model: str, dtype, dtype_name: str, batches, targets) -> dict[str, list]:
    """{target: [(label, launch)]} of the kernel variants the backend does not launch by default: the
    row-walking pool(+LRN) for every pool layer (ReLU fused, LRN fused where it follows), labelled
    "<model>/<pool>[+<norm>] rows <dtype> b<batch>" (with the LRN: one block of every channel) and
    "... rows-halo ..." (with the LRN: fitted channel blocks plus a halo); the fitted stand-alone LRN of
    every LRN layer, "<model>/<norm> fitted <dtype> b<batch>"; the space-to-depth conv of eligible convs
    runs the tap-loop kernel, labelled "<model>/<conv> s2d <dtype> b<batch>"; a conv that segments its K
    (kernels/conv_splitk.py) runs the segmented kernel, labelled "<model>/<conv> splitk <dtype> b<batch>"."""
    import torch

    from fastfeat.kernels import LRNParams, conv2d_nhwc, pack_conv_weight
    from fastfeat.kernels.conv_s2d import conv2d_nhwc_s2d, pack_conv_weight_s2d, s2d_eligible
    from fastfeat.kernels.lrn import lrn_nhwc_fitted
    from fastfeat.kernels.pool_rows import maxpool2d_nhwc_rows
    from fastfeat.layers import LRN, Conv, MaxPool

    shapes = spec.input_shapes()
    out: dict[str, list] = {t: [] for t in targets}
    for target in targets:
        for batch in batches:
            for i, layer in enumerate(spec.layers):
                c, h, w = shapes[layer.name] if len(shapes[layer.name]) == 3 else (0, 0, 0)
                x = torch.empty((batch, h, w, c), dtype=dtype)
                runs = []  # (op label, launcher)
                if isinstance(layer, MaxPool):
                    norm = spec.layers[i + 1] if i + 1 < len(spec.layers) else None
                    norm = norm if isinstance(norm, LRN) else None
                    lrn = None if norm is None else LRNParams(norm.size, norm.alpha, norm.beta, norm.k)
                    geo = dict(kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad, ceil_mode=layer.ceil)
                    name = layer.name if norm is None else f"{layer.name}+{norm.name}"
                    runs.append((f"{name} rows", lambda x=x, lrn=lrn, geo=geo: maxpool2d_nhwc_rows(
                        x, relu=True, lrn=lrn, lrn_halo=False, **geo)))  # fmt: skip
                    if lrn is not None:
                        runs.append((f"{name} rows-halo", lambda x=x, lrn=lrn, geo=geo: maxpool2d_nhwc_rows(
                            x, relu=True, lrn=lrn, lrn_halo=True, **geo)))  # fmt: skip
                elif isinstance(layer, LRN):
                    runs.append((f"{layer.name} fitted", lambda x=x, n=layer: lrn_nhwc_fitted(
                        x, size=n.size, alpha=n.alpha, beta=n.beta, k=n.k)))  # fmt: skip
                elif isinstance(layer, Conv) and s2d_eligible(c, layer.groups, layer.kernel, layer.stride):
                    weight = torch.empty((layer.out, c, layer.kernel, layer.kernel), dtype=dtype)
                    packed = pack_conv_weight_s2d(weight, stride=layer.stride)
                    bias = torch.empty((layer.out,), dtype=torch.float32)
                    runs.append((f"{layer.name} s2d", lambda x=x, layer=layer, packed=packed, bias=bias: conv2d_nhwc_s2d(
                        x, packed, bias, kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad,
                        relu=True)))  # fmt: skip
                elif isinstance(layer, Conv):
                    weight = torch.empty((layer.out, c // layer.groups, layer.kernel, layer.kernel), dtype=dtype)
                    packed = pack_conv_weight(weight, groups=layer.groups)
                    bias = torch.empty((layer.out,), dtype=torch.float32)
                    runs.append((f"{layer.name} splitk", lambda x=x, layer=layer, packed=packed, bias=bias: conv2d_nhwc(
                        x, packed, bias, kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad,
                        groups=layer.groups, relu=True, k_split=True)))  # fmt: skip
                for op, run in runs:
                    with aot.recording(aot.TARGETS[target].sm_count) as sink, torch.inference_mode():
                        run()
                    if op.endswith(" splitk") and not any(
                        launch[1] == "_conv2d_nhwc_segmented_kernel" for launch in sink
                    ):
                        continue  # the layer does not segment: the plain kernel, recorded already
                    out[target] += [(aot.label(model, op, dtype_name, batch), c) for c in sink]
    return out


# -- reporting ---------------------------------------------------------------------------------
def _kib(n) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def print_table(jobs: list[dict], verbose: bool) -> None:
    """One row per (kernel, dtype, config, target), worst case over its specialisations; every job with -v."""
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        key = (job["kernel"], aot.job_dtype(job), job["config"], job["target"])
        groups.setdefault(key if not verbose else key + (id(job),), []).append(job)
    header = (
        f"{'kernel':<22} {'dtype':<5} {'config':<24} {'target':<6} {'ok':>5} {'regs':>5} {'spill':>6} {'smemKiB':>8}"
        "  flags"
    )
    print(header)
    print("-" * len(header))
    for key in sorted(groups, key=lambda k: k[:4]):
        rows = groups[key]
        ok = [r for r in rows if r["ok"]]
        regs = max((r["n_regs"] or 0 for r in ok), default=None)
        spill = max((r["n_spills"] for r in ok), default=None)
        smem = max((r["shared_bytes"] for r in ok), default=None)
        flags = sorted({f for r in rows for f in r["flags"]})
        first = rows[0]
        print(
            f"{first['kernel']:<22} {key[1]:<5} {first['config']:<24} {first['target']:<6} {len(ok):>2}/{len(rows):<2} "
            f"{'-' if regs is None else regs:>5} {'-' if spill is None else spill:>6} {_kib(smem):>8}  {' '.join(flags)}"
        )
        if verbose:
            print(f"    {', '.join(first['launches'])}")
    for job in jobs:
        if not job["ok"]:
            print(f"FAIL {job['kernel']} [{job['config']}] {job['target']}: {job['reason']}")
            print(f"     launches: {', '.join(job['launches'][:4])}{' ...' if len(job['launches']) > 4 else ''}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=list(aot.TARGETS), choices=list(aot.TARGETS))
    ap.add_argument("--models", nargs="+", default=["caffenet", "alexnet"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 256, 2048],
                    help="batch sizes (1: the M=1 specialisation and split-K; 2048: SPLIT_K=1 in fc6 and fc7)")  # fmt: skip
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(aot.DTYPES))
    ap.add_argument("--extra-dtypes", nargs="*", default=["fp16", "fp32"], choices=list(aot.DTYPES),
                    help="also compiled, every config, for the representative CaffeNet launches")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="one config (the first kept) per specialisation and target")
    ap.add_argument("--representative", action="store_true",
                    help="only the CI subset: one launch per kernel shape family, first kept config, bf16")  # fmt: skip
    ap.add_argument("--exhaustive", action="store_true",
                    help=f"do not merge launches that differ only in {', '.join(aot.MERGED_FLAGS)}")  # fmt: skip
    ap.add_argument("--all-configs", action="store_true",
                    help="compile every config of the lists, also those the prune hooks drop (marked pruned)")  # fmt: skip
    ap.add_argument("--kernels", nargs="+", metavar="NAME",
                    help="compile only these kernels (e.g. _linear_splitk_fused_kernel); default every one")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="count the compiles per kernel and target, compile none")
    ap.add_argument("--jobs", type=int, default=1, help="compiler processes (default 1)")
    ap.add_argument("--json", help="write every result to this path")
    ap.add_argument("--verbose", "-v", action="store_true", help="one row per specialisation, with its layers")
    ap.add_argument("--ptx-digest", action="store_true",
                    help="record per job the sha256 of its PTX without debug information (ptx_sha256 in the JSON)")  # fmt: skip
    ap.add_argument("--ptx-dir", help="also write each job's normalised PTX to this folder (implies --ptx-digest)")
    ap.add_argument("--compare-digests", nargs="+", metavar="JSON",
                    help="BEFORE.json: compare this run's digests with it (implies --ptx-digest); "
                         "A.json B.json: compare two files, compile nothing")  # fmt: skip
    args = ap.parse_args(argv)
    if args.compare_digests and len(args.compare_digests) > 2:
        ap.error("--compare-digests takes BEFORE.json, or two files A.json B.json")
    if args.compare_digests and len(args.compare_digests) == 2:
        before, after = (read_jobs(path) for path in args.compare_digests)
        return report_digests(before, after, *args.compare_digests)
    args.ptx_digest = args.ptx_digest or bool(args.ptx_dir) or bool(args.compare_digests)

    started = time.perf_counter()
    # Before triton is imported: with TRITON_INTERPRET=1, @triton.jit builds interpreter functions (which
    # cannot be compiled) and the autotune factories return their one interpreter config.
    if os.environ.pop("TRITON_INTERPRET", None) == "1" and "triton" in sys.modules:
        raise SystemExit("triton was imported with TRITON_INTERPRET=1; the compile check needs the compiled kernels")
    cache_dir = tempfile.mkdtemp(prefix="fastfeat-compile-check-")  # keeps ~/.triton/cache clean
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        return run_check(args, cache_dir, started)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def run_check(args, cache_dir: str, started: float) -> int:
    why = aot.preflight(args.targets)
    if why:
        print(why)
        return aot.EXIT_UNAVAILABLE

    if args.ptx_digest:  # which checkout's kernels these digests are of
        print(f"kernel sources: {os.path.dirname(os.path.abspath(aot.__file__))}", flush=True)
    launches: dict[str, list] = {t: [] for t in args.targets}

    def record(model, dtype, batches, representative=False):
        for target, items in record_model_launches(model, dtype, batches, args.targets).items():
            launches[target] += aot.select_representative(items, dtype) if representative else items

    if args.representative:
        record("caffenet", "bf16", aot.REPRESENTATIVE_BATCHES, representative=True)
    else:
        for model in args.models:
            for dtype in args.dtypes:
                record(model, dtype, args.batches)
        for dtype in [d for d in args.extra_dtypes if d not in args.dtypes]:
            record("caffenet", dtype, aot.REPRESENTATIVE_BATCHES, representative=True)
    jobs = aot.build_jobs(launches, args.targets, args.quick or args.representative, args.exhaustive, args.all_configs)
    if args.kernels:
        if unknown := sorted(set(args.kernels) - {job["kernel"] for job in jobs}):
            raise SystemExit(f"compile_check: no launch of {', '.join(unknown)} in this selection")
        jobs = [job for job in jobs if job["kernel"] in args.kernels]
    print(f"{sum(len(v) for v in launches.values())} launches -> {len(jobs)} distinct compiles", flush=True)
    if args.dry_run:
        for (kernel, target), n in sorted(aot.count_compiles(jobs).items()):
            print(f"  {kernel:<22} {target}: {n}")
        return 0

    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
    aot.compile_jobs(jobs, args.jobs, cache_dir, ptx_digest=args.ptx_digest, ptx_dir=args.ptx_dir)
    print_table(jobs, args.verbose)
    summary = aot.summarise(jobs, time.perf_counter() - started)
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(aot.to_json(jobs, summary), f, indent=1, default=str)
    status = 1 if summary["problems"] else 0
    if args.compare_digests:
        # Compared as read back from JSON, like the earlier run's jobs (attrs keyed by argument index).
        after = json.loads(json.dumps(aot.to_json(jobs, summary)["jobs"], default=str))
        status = max(
            status, report_digests(read_jobs(args.compare_digests[0]), after, args.compare_digests[0], "this run")
        )
    return status


def read_jobs(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["jobs"]


def _numbers(job: dict) -> str:
    return f"regs {job.get('n_regs')} spill {job.get('n_spills')} smem {job.get('shared_bytes')}"


def report_digests(before: list[dict], after: list[dict], before_name: str, after_name: str) -> int:
    """Print which jobs' PTX digests differ between two checks; 0 when every job matches, else 1."""
    result = aot.compare_digests(before, after)
    print(
        f"PTX digests, {before_name} -> {after_name}: {result['compared']} jobs compared, {result['identical']} "
        f"identical, {len(result['changed'])} changed, {len(result['only_before'])} only before, "
        f"{len(result['only_after'])} only after, {len(result['undigested'])} without a digest"
    )
    for old, new in result["changed"]:
        print(f"  changed {old['kernel']} [{old['config']}] {old['target']}: {_numbers(old)} -> {_numbers(new)}")
        print(f"     launches: {', '.join(old['launches'][:3])}{' ...' if len(old['launches']) > 3 else ''}")
    for side in ("only_before", "only_after"):
        for job in result[side]:
            print(f"  {side.replace('_', ' ')}: {job['kernel']} [{job['config']}] {job['target']}")
    clean = not (result["changed"] or result["only_before"] or result["only_after"] or result["undigested"])
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
