"""`fastfeat ... | head`: a reader that closes the pipe early stops the command quietly."""

from __future__ import annotations

import subprocess
import sys


def test_a_closed_pipe_ends_quietly():
    # `weights list --json` prints a few KB at once: more than the one line read before closing, and
    # far more once the output is repeated (below), so the write after the close meets a broken pipe.
    code = (
        "import sys, fastfeat.cli as c\n"
        "orig = c._run_weights\n"
        "def many(args):\n"
        "    for _ in range(2000):\n"
        "        orig(args)\n"
        "    return 0\n"
        "c._run_weights = many\n"
        "sys.exit(c.main(['weights', 'list', '--json']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does after its line
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert first.strip() == b"["
    assert err == "", err  # no "fastfeat: error: Broken pipe", no traceback, no "Exception ignored"
    assert proc.returncode == 141
