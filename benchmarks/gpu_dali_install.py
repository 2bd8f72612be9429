"""Bring NVIDIA DALI onto the device machine, which cannot reach a package index: wheels downloaded here,
split into parts small enough for one device call each, carried over consecutive calls (a warm machine
keeps ignored files between calls), reassembled, verified and installed there.

    # here (a machine with an index): download the wheels, write the parts and their manifest
    python benchmarks/gpu_dali_install.py prepare --parts out/dali-parts
    # there, one call per part (docs/gpu.md, "DALI on the device machine", lists the exact calls):
    python benchmarks/gpu_dali_install.py status --parts out/dali-parts
    # there, once every part has arrived: check, reassemble, install, import
    python benchmarks/gpu_dali_install.py install --parts out/dali-parts --target out/dali-site

``prepare`` writes ``manifest.json`` (each wheel's name, size and sha256; each part's size and sha256; the
whole stream's sha256) and ``part-NNN`` files of at most --part-mib MiB (default 54: the working tree,
~4 MiB, travels with each call, and a call carries 64 MiB in all).  ``install`` refuses a missing or
damaged part by name, reassembles the stream, checks every wheel's sha256, runs
``pip install --no-index --no-deps --target TARGET`` and imports the module (``--import``, default
``nvidia.dali``) with PYTHONPATH=TARGET in a fresh interpreter; it prints one JSON line and writes it to
$OUT/dali_install.json when $OUT is set.

The wheel set (``WHEELS``) was resolved with ``pip install --dry-run --report`` for Python 3.12 on
manylinux x86_64: DALI 2.4.0 for CUDA 13 and what it requires, less what the device machine already has
(numpy, packaging, typing_extensions: a copy in TARGET would shadow the installed one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

# pip requirement -> why it is here.  numpy, packaging, typing_extensions, wheel: present on the device machine.
WHEELS = {
    "nvidia-dali-cuda130==2.4.0": "DALI itself (189 MiB)",
    "nvidia-nvimgcodec-cu13==0.9.0.20": "DALI's image decoders (nvImageCodec)",
    "nvidia-nvjpeg==13.3.2.43": "nvImageCodec's nvJPEG extension",
    "nvidia-nvjpeg2k-cu13==0.11.0.51": "nvimgcodec[all]: JPEG 2000",
    "nvidia-nvtiff-cu13==0.8.0.82": "nvimgcodec[all]: TIFF",
    "nvidia-libnvcomp-cu13==5.3.0.16": "DALI's compression operators",
    "astunparse==1.6.3": "DALI (pure Python)",
    "gast==0.7.0": "DALI (pure Python)",
    "six==1.17.0": "astunparse (pure Python)",
    "makefun==1.16.0": "DALI (pure Python)",
    "nvtx==0.2.17": "DALI",
    "optree==0.20.0": "DALI",
    "libcst==1.9.0": "DALI",
    "PyYAML==6.0.4": "libcst",
}
PLATFORM = ["--python-version", "3.12", "--only-binary=:all:", "--implementation", "cp"]
PLATFORM += ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"]
MANIFEST = "manifest.json"
MIB = 1 << 20


class PartsError(RuntimeError):
    """A part is missing or damaged, or a wheel's checksum does not match: one line, names what."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def split_wheels(wheels: list[str], parts_dir: str, part_bytes: int) -> dict:
    """Concatenate ``wheels`` into one stream cut into parts of at most ``part_bytes``; write the parts and
    the manifest into ``parts_dir`` and return the manifest."""
    if part_bytes < 1:
        raise ValueError(f"part size must be at least 1 byte, got {part_bytes}")
    os.makedirs(parts_dir, exist_ok=True)
    files = [{"name": os.path.basename(w), "bytes": os.path.getsize(w), "sha256": sha256_file(w)} for w in wheels]
    whole, parts = hashlib.sha256(), []
    part, part_hash, written = None, None, 0

    def close():
        if part is not None:
            part.close()
            parts.append({"name": os.path.basename(part.name), "bytes": written, "sha256": part_hash.hexdigest()})

    for w in wheels:
        with open(w, "rb") as f:
            while block := f.read(min(MIB, part_bytes)):
                while block:
                    if part is None or written == part_bytes:
                        close()
                        part = open(os.path.join(parts_dir, f"part-{len(parts):03d}"), "wb")
                        part_hash, written = hashlib.sha256(), 0
                    take = block[: part_bytes - written]
                    part.write(take)
                    part_hash.update(take)
                    whole.update(take)
                    written += len(take)
                    block = block[len(take) :]
    close()
    manifest = {"wheels": files, "parts": parts, "sha256": whole.hexdigest(), "part_bytes": part_bytes}
    with open(os.path.join(parts_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def part_status(parts_dir: str) -> dict:
    """{"present": [...], "missing": [...], "damaged": [...]} of the manifest's parts in ``parts_dir``."""
    manifest = _manifest(parts_dir)
    status = {"present": [], "missing": [], "damaged": []}
    for p in manifest["parts"]:
        path = os.path.join(parts_dir, p["name"])
        if not os.path.isfile(path):
            status["missing"].append(p["name"])
        elif os.path.getsize(path) != p["bytes"] or sha256_file(path) != p["sha256"]:
            status["damaged"].append(p["name"])
        else:
            status["present"].append(p["name"])
    return status


def reassemble(parts_dir: str, wheel_dir: str) -> list[str]:
    """Check every part, rebuild the wheels into ``wheel_dir`` and check each one's sha256; their paths."""
    manifest = _manifest(parts_dir)
    status = part_status(parts_dir)
    if status["missing"] or status["damaged"]:
        raise PartsError(f"parts missing: {status['missing'] or 'none'}; damaged: {status['damaged'] or 'none'}")
    os.makedirs(wheel_dir, exist_ok=True)
    streams = (open(os.path.join(parts_dir, p["name"]), "rb") for p in manifest["parts"])
    current = next(streams, None)
    whole, paths = hashlib.sha256(), []
    for w in manifest["wheels"]:
        path, left = os.path.join(wheel_dir, w["name"]), w["bytes"]
        with open(path, "wb") as out:
            while left:
                if current is None:
                    raise PartsError(f"the parts end before {w['name']} does")
                block = current.read(min(left, MIB))
                if not block:
                    current.close()
                    current = next(streams, None)
                    continue
                out.write(block)
                whole.update(block)
                left -= len(block)
        if sha256_file(path) != w["sha256"]:
            raise PartsError(f"{w['name']}: sha256 differs from the manifest")
        paths.append(path)
    if current is not None:
        current.close()
    if whole.hexdigest() != manifest["sha256"]:
        raise PartsError("the reassembled stream's sha256 differs from the manifest")
    return paths


def install(parts_dir: str, target: str, module: str = "nvidia.dali") -> dict:
    """reassemble, pip install --no-index --no-deps --target, import ``module`` there; a result dict."""
    with tempfile.TemporaryDirectory(prefix="dali-wheels-") as wheel_dir:
        wheels = reassemble(parts_dir, wheel_dir)
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target", target]
        proc = subprocess.run([*cmd, *wheels], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"installed": False, "stage": "pip", "error": proc.stderr[-2000:]}
    code = f"import {module} as m; print(getattr(m, '__version__', 'unknown'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"installed": True, "imported": False, "error": proc.stderr[-2000:]}
    return {"installed": True, "imported": True, "module": module, "version": proc.stdout.strip(), "target": target,
            "wheels": [os.path.basename(w) for w in wheels]}  # fmt: skip


def download(wheel_dir: str) -> list[str]:
    """pip download --no-deps of WHEELS for the device machine's Python and platform (the pip cache helps)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", wheel_dir, *PLATFORM, *WHEELS]
    subprocess.run(cmd, check=True)
    names = sorted(os.listdir(wheel_dir))
    # DALI first: the big wheel fills whole parts, the small ones share the last.
    return sorted((os.path.join(wheel_dir, n) for n in names if n.endswith(".whl")),
                  key=lambda p: (not os.path.basename(p).startswith("nvidia_dali"), p))  # fmt: skip


def _manifest(parts_dir: str) -> dict:
    path = os.path.join(parts_dir, MANIFEST)
    if not os.path.isfile(path):
        raise PartsError(f"{path}: no manifest (carry it with every call)")
    with open(path) as f:
        return json.load(f)


def _emit(result: dict) -> None:
    line = json.dumps(result)
    print(line)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "dali_install.json"), "w") as f:
            f.write(line + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: download the wheels, write the parts and the manifest")
    p.add_argument("--parts", default="out/dali-parts")
    p.add_argument("--wheels", default=None, help="use these downloaded wheels (a folder) instead of pip download")
    p.add_argument("--part-mib", type=float, default=54)
    s = sub.add_parser("status", help="which parts have arrived, intact")
    s.add_argument("--parts", default="out/dali-parts")
    i = sub.add_parser("install", help="there: check, reassemble, pip install --target, import")
    i.add_argument("--parts", default="out/dali-parts")
    i.add_argument("--target", default="out/dali-site")
    i.add_argument("--import", dest="module", default="nvidia.dali")
    args = ap.parse_args(argv)
    try:
        if args.command == "prepare":
            if args.wheels:
                wheels = sorted(os.path.join(args.wheels, n) for n in os.listdir(args.wheels) if n.endswith(".whl"))
                manifest = split_wheels(wheels, args.parts, int(args.part_mib * MIB))
            else:
                with tempfile.TemporaryDirectory(prefix="dali-download-") as d:
                    manifest = split_wheels(download(d), args.parts, int(args.part_mib * MIB))
            _emit({"parts": [p["name"] for p in manifest["parts"]], "wheels": len(manifest["wheels"]),
                   "bytes": sum(w["bytes"] for w in manifest["wheels"])})  # fmt: skip
        elif args.command == "status":
            _emit(part_status(args.parts))
        else:
            result = install(args.parts, args.target, args.module)
            _emit(result)
            return 0 if result.get("imported") else 1
    except PartsError as exc:
        print(f"gpu_dali_install: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
