"""benchmarks/gpu_dali_install.py on the CPU with small fake wheels: split into parts, status, a missing or
damaged part refused by name, reassembly byte-identical, pip install --no-index --target and the import."""

import base64
import hashlib
import os
import sys
import zipfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import gpu_dali_install as gdi  # noqa: E402


def _fake_wheel(folder, name: str, payload: bytes) -> str:
    """A minimal valid wheel of a module ``name`` whose ``DATA`` is ``payload``'s length."""
    dist = f"{name}-0.1.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = '0.1'\nDATA = {len(payload)}\n".encode(),
        f"{name}/blob.bin": payload,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = os.path.join(folder, f"{name}-0.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # stored: the payload keeps its size
        for p, data in files.items():
            z.writestr(p, data)
    return path


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    payload = os.urandom(150_000)
    return [_fake_wheel(str(folder), "fakebig", payload), _fake_wheel(str(folder), "fakesmall", os.urandom(900))]


def test_split_status_reassemble_install_import(wheels, tmp_path):
    parts = tmp_path / "parts"
    manifest = gdi.split_wheels(wheels, str(parts), 40_000)
    total = sum(os.path.getsize(w) for w in wheels)
    assert len(manifest["parts"]) == -(-total // 40_000) and all(p["bytes"] <= 40_000 for p in manifest["parts"])
    assert gdi.part_status(str(parts)) == {"present": [p["name"] for p in manifest["parts"]], "missing": [],
                                           "damaged": []}  # fmt: skip
    rebuilt = gdi.reassemble(str(parts), str(tmp_path / "rebuilt"))
    assert [open(a, "rb").read() for a in rebuilt] == [open(w, "rb").read() for w in wheels]
    result = gdi.install(str(parts), str(tmp_path / "site"), module="fakebig")
    assert result["imported"] and result["version"] == "0.1", result
    assert (tmp_path / "site" / "fakesmall" / "__init__.py").is_file()


def test_missing_and_damaged_parts_are_refused_by_name(wheels, tmp_path, capsys):
    parts = tmp_path / "parts"
    gdi.split_wheels(wheels, str(parts), 40_000)
    (parts / "part-001").unlink()
    with open(parts / "part-002", "r+b") as f:
        f.write(b"\x00")
    status = gdi.part_status(str(parts))
    assert status["missing"] == ["part-001"] and status["damaged"] == ["part-002"]
    with pytest.raises(gdi.PartsError, match="missing: \\['part-001'\\]; damaged: \\['part-002'\\]"):
        gdi.reassemble(str(parts), str(tmp_path / "rebuilt"))
    assert gdi.main(["install", "--parts", str(parts), "--target", str(tmp_path / "site")]) == 2
    assert "part-001" in capsys.readouterr().err and not (tmp_path / "site").exists()


def test_a_wheel_whose_checksum_differs_is_refused(wheels, tmp_path):
    parts = tmp_path / "parts"
    manifest = gdi.split_wheels(wheels, str(parts), 40_000)
    manifest["wheels"][1]["sha256"] = "0" * 64  # the parts are intact, the wheel is not what was meant
    (parts / gdi.MANIFEST).write_text(__import__("json").dumps(manifest))
    with pytest.raises(gdi.PartsError, match="fakesmall-0.1-py3-none-any.whl: sha256 differs"):
        gdi.reassemble(str(parts), str(tmp_path / "rebuilt"))


def test_prepare_from_a_folder_and_status_cli(wheels, tmp_path, capsys):
    parts = tmp_path / "parts"
    folder = os.path.dirname(wheels[0])
    assert gdi.main(["prepare", "--wheels", folder, "--parts", str(parts), "--part-mib", "0.05"]) == 0
    assert '"wheels": 2' in capsys.readouterr().out
    assert gdi.main(["status", "--parts", str(parts)]) == 0
    assert '"missing": []' in capsys.readouterr().out
