"""The process-wide stderr: native code's writes to fd 2 captured (``captured_native_stderr``), and a
stream that bypasses the capture (``console()``).  Imports neither torch nor DALI, so code that only
prints (the Ray driver, the server) does not load them."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_native_stderr_lock = threading.Lock()  # one capture at a time: fd 2 is process-wide


@contextlib.contextmanager
def captured_native_stderr():
    """Collect what native code (DALI's libjpeg, nvImageCodec) writes to file descriptor 2 meanwhile.

    Decoder warnings such as "Corrupt JPEG data: 517 extraneous bytes before marker 0xd9" are
    printed by C code straight to fd 2: they would break the progress bar and could not be told
    apart by image.  Python's own writes go through ``sys.stderr``; ``console()`` gives the code
    that must keep printing meanwhile (the progress bar) a stream that bypasses the capture.
    Yields a list that holds the captured text (ANSI codes removed) once the block ends.
    """
    out: list[str] = []
    with _native_stderr_lock, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = _ANSI.sub("", tmp.read().decode("utf-8", errors="replace"))
            out.append(" ".join(line.strip() for line in text.splitlines() if line.strip())[:500])


_console = None


def console():
    """A text stream on a duplicate of the original stderr: unaffected by ``captured_native_stderr``."""
    global _console
    if _console is None:
        _console = os.fdopen(os.dup(2), "w", buffering=1)
    return _console
