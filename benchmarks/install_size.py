"""What each install of fastfeat weighs: a fresh venv per install spec, ``pip install``, ``du``, delete.

    flock /tmp/bench.lock python benchmarks/install_size.py --json benchmarks/results/install_size.json

For each spec (default: ``.``, ``.[serve,ray]``, ``-e .[dev]``, README's development install) it creates
a venv in a temporary folder, installs the checkout into it with that venv's pip, and records the
venv's size on disk (``du -sb``), the install's wall time and the largest installed distributions.
The venvs are deleted afterwards. Wall times depend on the network and on pip's cache (a warm cache
skips the downloads), so the sizes are the figure to quote; the JSON records the pip configuration's
index and cache so a reader can tell which it was.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPECS = [".", ".[serve,ray]", "-e .[dev]"]


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def largest_distributions(venv: Path, top: int) -> list[dict]:
    """Installed distributions by size on disk: their site-packages folders, from each RECORD file."""
    script = (
        "import importlib.metadata as m, json, os\n"
        "out = []\n"
        "for d in m.distributions():\n"
        "    size = 0\n"
        "    for f in d.files or []:\n"
        "        p = d.locate_file(f)\n"
        "        try: size += os.path.getsize(p)\n"
        "        except OSError: pass\n"
        "    out.append((size, d.metadata['Name'], d.version))\n"
        "out.sort(reverse=True)\n"
        f"print(json.dumps([{{'name': n, 'version': v, 'bytes': s}} for s, n, v in out[:{top}]]))\n"
    )
    python = venv / "bin" / "python"
    return json.loads(subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True).stdout)


def measure(spec: str, workdir: Path, top: int) -> dict:
    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    empty = du_bytes(venv)
    args = spec.split()
    start = time.perf_counter()
    # from the checkout's root, so that `.` is the checkout, as in README's commands
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    record = {
        "spec": spec,
        "command": "python3 -m venv .venv && .venv/bin/pip install " + " ".join(shlex.quote(a) for a in args),
        "exit_code": done.returncode,
        "install_s": round(seconds, 1),
        "empty_venv_bytes": empty,
    }
    if done.returncode != 0:
        record["stderr_tail"] = done.stderr[-2000:]
    else:
        record["venv_bytes"] = du_bytes(venv)
        record["venv_gib"] = round(record["venv_bytes"] / 2**30, 2)
        record["largest"] = largest_distributions(venv, top)
    shutil.rmtree(venv)
    return record


def pip_config() -> dict:
    shown = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True).stdout
    return {"config": shown.strip().splitlines(), "cache_dir": cache.strip()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", action="append", help="pip install argument(s) for the checkout, e.g. '.[serve]'")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--top", type=int, default=8, help="largest distributions to list per install")
    args = parser.parse_args()
    records = []
    for spec in args.spec or DEFAULT_SPECS:
        with tempfile.TemporaryDirectory(prefix="fastfeat-install-") as tmp:
            record = measure(spec, Path(tmp), args.top)
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "largest"}), flush=True)
    result = {
        "what": "size on disk (du -sb) of a fresh venv after installing this checkout, per install spec",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "git_sha": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "pip": pip_config(),
        "installs": records,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
