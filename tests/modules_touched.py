"""A pytest plugin that checks a test run imported every module of fastfeat/ and kernels/ in its own process.

The fast loop (docs/testing.md) must still touch every module:

    PYTHONPATH=tests python -m pytest -q -m "not slow" -p modules_touched

At the end of the session it lists the modules no test imported (modules imported only by a subprocess
do not count) and turns a passing run into a failing one (exit 1) if there are any.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"fastfeat": os.path.join(ROOT, "fastfeat"), "fastfeat.kernels": os.path.join(ROOT, "kernels")}


def all_modules() -> set[str]:
    names = set()
    for package, folder in PACKAGES.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, folder)
            prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
            if prefix.startswith("fastfeat.kernels") and package == "fastfeat":
                continue  # fastfeat/kernels is not a folder; kernels/ is listed under its own name
            for f in filenames:
                if f.endswith(".py") and f != "__main__.py":  # `python -m fastfeat`: a three-line shim over cli.main
                    names.add(prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}")
    return names


def pytest_sessionfinish(session, exitstatus):
    missing = sorted(all_modules() - set(sys.modules))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter is not None else print
    if missing:
        write(f"modules_touched: {len(missing)} module(s) no test imported: {', '.join(missing)}")
        if exitstatus == 0:
            session.exitstatus = 1
    else:
        write(f"modules_touched: every one of the {len(all_modules())} modules of fastfeat/ and kernels/ was imported")
