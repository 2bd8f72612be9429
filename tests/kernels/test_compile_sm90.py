"""Ahead-of-time compile of every kernel for sm_90 (H100/H200), bf16, without a GPU.

The interpreter tests never run Triton's compiler, so a kernel can pass them and still fail to build
for a GPU, spill registers or overflow shared memory. This test compiles ONE representative launch per
kernel shape family (conv tap loop, conv flattened loop, GEMM with SPLIT_K == 1 and > 1, the split-K
reduction, max-pool + ReLU + LRN, stand-alone LRN) with its first autotune config that survives the
launch-time pruning on an H100, through ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and
the ptxas that triton bundles.

The checker is ``fastfeat.kernels.aot`` (imported here for its constants; it imports no triton itself).
The compile runs ``benchmarks/compile_check.py --representative`` (its command line) in a subprocess
with TRITON_INTERPRET unset: this pytest process imported triton under the interpreter
(tests/triton_interpreter.py), which turns every ``@triton.jit`` kernel into an interpreter function
that cannot be compiled, and makes the autotune factories return their single interpreter config. The
full check (every config, sm_80 and sm_90, several dtypes) is the script itself; see its docstring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastfeat.kernels import aot

pytestmark = pytest.mark.slow  # compiles the kernels in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "compile_check.py")
# The subprocess takes ~10 s on 2 CPU cores; this only stops a hung compiler from hanging CI.
TIMEOUT_S = 300
# Usable shared memory per block on H100/H200 (the opt-in maximum).
SM90_SMEM_LIMIT = 227 * 1024

CASES = [(template.format(dtype="bf16"), kernel) for template, kernel in aot.REPRESENTATIVE]


@pytest.fixture(scope="module")
def sm90_jobs(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile_sm90") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, SCRIPT, "--representative", "--targets", "sm90", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode == aot.EXIT_UNAVAILABLE:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert out.is_file(), (
        f"compile check wrote no JSON (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    )
    return json.loads(out.read_text())["jobs"]


@pytest.mark.parametrize("label, kernel", CASES, ids=[f"{k}:{label.split('/')[1]}" for label, k in CASES])
def test_compiles_for_sm90(sm90_jobs, label, kernel):
    """Compiles, spills no register, fits H100 shared memory, and is a config the launch would keep."""
    jobs = [j for j in sm90_jobs if j["kernel"] == kernel and label in j["launches"]]
    assert len(jobs) == 1, f"expected one compile of {kernel} for {label}, got {len(jobs)}"
    job = jobs[0]
    assert job["ok"], f"{kernel} [{job['config']}] does not compile for sm_90:\n{job['error']}"
    assert job["n_spills"] == 0, (
        f"{kernel} [{job['config']}] spills {job['n_spills']} bytes ({job['n_regs']} registers)"
    )
    assert job["shared_bytes"] <= SM90_SMEM_LIMIT, (
        f"{kernel} [{job['config']}] needs {job['shared_bytes']} B of shared memory"
    )
    assert not job["pruned"], f"{kernel} [{job['config']}] is not a config the launch keeps"


def test_flattened_and_tap_loops_both_compiled(sm90_jobs):
    """The two conv K-loop shapes are distinct specialisations, both present."""
    loops = {j["constexprs"]["TAP_LOOP"] for j in sm90_jobs if j["kernel"] == "_conv2d_nhwc_kernel"}
    assert loops == {True, False}
    splits = {j["constexprs"]["SPLIT_K"] > 1 for j in sm90_jobs if j["kernel"] == "_linear_kernel"}
    assert splits == {True, False}
