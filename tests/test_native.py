"""The triton backend's choice between the AOT kernel library (kernels/native.py) and JIT, on CPU.

The library itself is tested by ctest (CMakeLists.txt); these check the Python side: where it is looked
for, that it can be switched off, and that a library built from other kernel sources is refused (a
subprocess: the test session's Triton runs the interpreter, whose kernels have no compiled form to hash).
"""

from __future__ import annotations

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
