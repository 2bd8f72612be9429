"""The triton backend's choice between the AOT kernel library (kernels/native.py) and JIT, on CPU.

The library itself is tested by ctest (CMakeLists.txt); these check the Python side: where it is looked
for, that it can be switched off, and that a library built from other kernel sources is refused (a
subprocess: the test session's Triton runs the interpreter, whose kernels have no compiled form to hash).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from fastfeat.kernels import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT = os.path.join(ROOT, "build", native.LIB_NAME)


@pytest.fixture
def fresh(monkeypatch):
    native.reset()
    yield monkeypatch
    native.reset()


def test_missing_library_means_jit(fresh, tmp_path):
    fresh.setenv(native.ENV_LIB, str(tmp_path / native.LIB_NAME))
    assert native.library() is None
    assert native.describe().startswith("JIT (no AOT library: no libfastfeat_kernels.so")
    assert native.stats()["library"] is None


def test_disabled_by_environment(fresh):
    fresh.setenv(native.ENV_ENABLE, "0")
    assert native.library() is None
    assert "disabled by FASTFEAT_NATIVE=0" in native.describe()


def test_cpu_tensors_never_reach_the_library(fresh):
    torch = pytest.importorskip("torch")
    x = torch.zeros(1, 8, 8, 3)
    assert not native.lrn(x, torch.empty_like(x), size=5, alpha=1e-4, beta=0.75, k=1.0)
    assert not native._state.resolved  # not even looked for


_PROBE = """
import json, sys
from fastfeat.kernels import native
if sys.argv[1] == "stale":
    native.kernel_hash = lambda: "0000000000000000"
lib = native.library()
print(json.dumps({"loaded": lib is not None, "describe": native.describe()}))
"""


@pytest.mark.skipif(not os.path.isfile(BUILT), reason="the native library is not built (cmake --build build)")
@pytest.mark.parametrize("case", ["current", "stale"])
def test_built_library_is_used_only_when_current(case):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", native.ENV_ENABLE)}
    env.update({native.ENV_LIB: BUILT, "PYTHONPATH": ROOT})
    proc = subprocess.run([sys.executable, "-c", _PROBE, case], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if case == "current":
        assert out["loaded"] and out["describe"].startswith(f"AOT library {BUILT}"), out
    else:
        assert not out["loaded"] and "built from other kernel sources" in out["describe"], out


class _FakeLibrary:
    """What ``refusal`` reads of an opened library: its ABI, build line and kernel hash."""

    def __init__(self, abi=native.ABI_VERSION, triton="3.6.0", kernel_hash="abcd"):
        self.abi, self.info, self.hash = abi, f"fastfeat kernels (triton {triton}): alexnet; bf16; sm90", kernel_hash

    def fastfeat_abi_version(self):
        return self.abi

    def fastfeat_build_info(self):
        return self.info.encode()

    def fastfeat_kernel_hash(self):
        return self.hash.encode()


def test_library_for_another_triton_is_refused_with_the_rebuild_recipe():
    why = native.refusal(_FakeLibrary(triton="3.8.0"), "/x/lib.so", triton_version="3.6.0", current_hash=lambda: "abcd")
    assert why is not None and "\n" not in why
    assert "built for triton 3.8.0, this process runs triton 3.6.0" in why
    assert "pip install --no-deps --target DIR triton==3.6.0" in why
    assert "-DFASTFEAT_AOT_TARGETS=sm90" in why and "docs/native.md" in why


def test_library_for_this_triton_and_these_sources_is_accepted():
    lib = _FakeLibrary(triton="3.6.0", kernel_hash="abcd")
    assert native.refusal(lib, "/x/lib.so", triton_version="3.6.0", current_hash=lambda: "abcd") is None
    stale = native.refusal(lib, "/x/lib.so", triton_version="3.6.0", current_hash=lambda: "ffff")
    assert "other kernel sources" in stale
    assert "ABI version 99" in native.refusal(_FakeLibrary(abi=99), "/x/lib.so", triton_version="3.6.0")


def test_build_line_names_its_triton():
    assert native.built_triton("fastfeat kernels (triton 3.6.0): caffenet; bf16; sm90; 3 entries") == "3.6.0"
    assert native.built_triton("something else") is None


def test_runtime_does_not_import_the_aot_build_tool():
    """native.py reads the kernel list from kernels/kernel_list.py, not from aot.py (the build tool, which
    imports the launchers, which import native.py: the cycle issue 21 cut)."""
    code = "import sys; from fastfeat.kernels import native; print('fastfeat.kernels.aot' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


# -- the split-K reduces (fastfeat_gemm_desc.split_k_reduce; FASTFEAT_NATIVE_SPLITK_REDUCE) -------------
ENTRIES = os.path.join(ROOT, "build", "native-gen", "entries.json")
needs_library = pytest.mark.skipif(
    not (os.path.isfile(BUILT) and os.path.isfile(ENTRIES)),
    reason="the native library is not built (cmake --build build)",
)
# CaffeNet's fc6 (ReLU fused) and fc8 (N = 1000: rows padded to 1008), as the forward plan launches them.
FC6 = dict(n=4096, k=9216, stride=4096, relu=1)
FC8 = dict(n=1000, k=4096, stride=1008, relu=0)
SM90, SM90_SMS, BF16 = 90, 132, 2


def test_split_k_reduce_switch(fresh):
    fresh.delenv(native.ENV_SPLIT_K_REDUCE, raising=False)
    assert native.split_k_reduce() == "separate" == native.DEFAULT_SPLIT_K_REDUCE
    fresh.setenv(native.ENV_SPLIT_K_REDUCE, "fused")
    assert native.split_k_reduce() == "fused"
    fresh.setenv(native.ENV_SPLIT_K_REDUCE, "atomic")
    with pytest.raises(
        ValueError, match="FASTFEAT_NATIVE_SPLITK_REDUCE must be one of separate, fused, got 'atomic'"
    ) as e:
        native.split_k_reduce()
    assert "\n" not in str(e.value)


def test_bad_split_k_reduce_is_refused_when_a_gemm_is_planned(fresh):
    """A bad value is an error at planning time even where no library would run (here: CPU tensors)."""
    torch = pytest.importorskip("torch")
    from fastfeat.kernels import linear, pack_linear_weight

    fresh.setenv(native.ENV_SPLIT_K_REDUCE, "both")
    with pytest.raises(ValueError, match="FASTFEAT_NATIVE_SPLITK_REDUCE"):
        linear(torch.zeros(1, 32), pack_linear_weight(torch.zeros(16, 32)))


def test_generator_families_follow_the_c_enum():
    """native/generate.py FAMILIES (read from its source: importing it would unset TRITON_INTERPRET) is the
    C enum ff_family's order, and every family has its key, grid, batch argument and kernel module."""
    import ast
    import re

    tree = ast.parse(open(os.path.join(ROOT, "native", "generate.py")).read())
    consts = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
              if isinstance(t, ast.Name)}  # fmt: skip
    families = ast.literal_eval(consts["FAMILIES"])
    assert families["_linear_splitk_fused_kernel"] == "linear_fused"
    header = open(os.path.join(ROOT, "native", "ff_internal.h")).read()
    enum = re.search(r"enum ff_family \{([^}]*)\}", header).group(1)
    assert [f.strip() for f in enum.split(",")][:-1] == [f"FF_{f.upper()}" for f in families.values()]
    for table in ("KEY_FIELDS", "GRIDS"):
        assert set(ast.literal_eval(consts[table])) == set(families.values()), table
    for table in ("KERNEL_MODULES", "BATCH_ARGS"):
        assert set(ast.literal_eval(consts[table])) == set(families), table
    assert "SPLIT_K" in ast.literal_eval(consts["KEY_FIELDS"])["linear_fused"]  # exact: the code depends on it
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    assert re.search(r"foreach\(family ([a-z_ ]+)\)", cmake).group(1).split() == list(families.values())
    from fastfeat.kernels.kernel_list import KERNELS

    assert {name for _, name in KERNELS} == set(families)


def _split_k(m: int, n: int, k: int, monkeypatch) -> int:
    """The JIT launcher's split on SM90_SMS SMs (gemm._pick_split_k and plan_linear's chunk rounding)."""
    import triton

    from fastfeat.kernels import gemm

    monkeypatch.setattr(gemm, "sm_count", lambda device: SM90_SMS)
    splits = gemm._pick_split_k(m, n, k, None)
    chunk = triton.cdiv(triton.cdiv(k, splits), gemm.SPLIT_K_GRANULE) * gemm.SPLIT_K_GRANULE
    return triton.cdiv(k, chunk)


@needs_library
@pytest.mark.parametrize("layer", [FC6, FC8], ids=["fc6", "fc8"])
@pytest.mark.parametrize("batch", [1, 256, 2048])
def test_gemm_plan_of_each_split_k_reduce(layer, batch, monkeypatch):
    """Both reduces' plans and workspaces (no GPU: fastfeat_gemm_plan for sm_90 with 132 SMs): separate is
    two launches on split_k * m * n fp32 partials; fused one launch on the partials plus an int32 counter per
    16x16 tile at a 16-byte aligned offset, looked up in the ``linear_fused`` family with the exact split."""
    from fastfeat.kernels.gemm import ARRIVAL_TILE

    lib = native.load(BUILT)
    listing = json.load(open(ENTRIES))["entries"]
    n, k = layer["n"], layer["k"]
    splits = _split_k(batch, n, k, monkeypatch)
    plans = {}
    for form, code in native.SPLIT_K_REDUCE_CODES.items():
        d = native.GemmDesc(batch, n, k, layer["stride"], layer["stride"], layer["relu"], 1, 0, code)
        plans[form] = plan = native.Plan()
        assert lib.fastfeat_gemm_plan(SM90, SM90_SMS, BF16, d, ctypes.byref(plan)) == native.OK, form
        assert plan.split_k == splits, form
    sep, fused = plans["separate"], plans["fused"]
    # fc6 at 2048 rows makes enough tiles to fill the GPU; fc8's 8 column tiles still split K there.
    assert (splits == 1) == (layer is FC6 and batch == 2048)
    if splits == 1:  # one launch, no workspace, whichever reduce
        for plan in (sep, fused):
            assert (plan.num_launches, plan.workspace_bytes, plan.counter_bytes) == (1, 0, 0)
            assert listing[plan.entry[0]]["kernel"] == "_linear_kernel"
        return
    partials = splits * batch * n * 4
    counters = -(-batch // ARRIVAL_TILE) * -(-n // ARRIVAL_TILE) * 4
    assert (sep.num_launches, sep.workspace_bytes, sep.counter_bytes) == (2, partials, 0)
    assert [listing[e]["kernel"] for e in sep.entry] == ["_linear_kernel", "_splitk_reduce_kernel"]
    assert (fused.num_launches, fused.entry[1], fused.counter_bytes) == (1, -1, counters)
    assert fused.workspace_bytes == -(-partials // 16) * 16 + counters
    entry = listing[fused.entry[0]]
    assert (entry["family"], entry["kernel"], entry["dtype"], entry["target"]) == (
        "linear_fused", "_linear_splitk_fused_kernel", "bf16", "sm90"
    )  # fmt: skip
    assert entry["key"]["SPLIT_K"] == splits and entry["key"]["APPLY_RELU"] == layer["relu"]
    assert min(entry["tile"]["BLOCK_M"], entry["tile"]["BLOCK_N"]) >= ARRIVAL_TILE
    # The same tile as the separate form's GEMM: the same partials, so the same bits.
    assert entry["config"] == listing[sep.entry[0]]["config"]


@needs_library
def test_fused_family_is_built_for_every_dtype_and_target():
    doc = json.load(open(ENTRIES))
    assert "linear_fused" in doc["key_fields"]
    built = {(e["dtype"], e["target"]) for e in doc["entries"] if e["family"] == "linear_fused"}
    assert built == {(d, t) for d in doc["built"]["dtypes"] for t in doc["built"]["targets"]}


@needs_library
def test_bad_split_k_reduce_value_is_refused_by_the_library():
    lib = native.load(BUILT)
    plan = native.Plan()
    d = native.GemmDesc(1, 4096, 9216, 4096, 4096, 1, 1, 0, 2)
    assert lib.fastfeat_gemm_plan(SM90, SM90_SMS, BF16, d, ctypes.byref(plan)) == 1  # invalid argument
