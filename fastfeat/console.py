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
# What the image decoders print themselves, by its form: libjpeg(-turbo)'s warnings (jerror.h, JWRN_*),
# libpng's, libtiff's ("TIFFReadDirectory: Warning, ..."), and nvImageCodec's log lines, "[WARNING]
# [jpeg_parser] ..." (its colour codes removed first).  fd 2 is the whole process's: a line of another
# form was written meanwhile by another thread (a library's log, a warning of the forward pass) and is
# passed on to the real stderr, never blamed on the image being decoded.
DECODER_LINE = re.compile(
    r"^(?:Corrupt JPEG data\b|Premature end of JPEG file|Invalid SOS parameters for sequential JPEG"
    r"|Inconsistent progression sequence|Unknown Adobe color transform|Application transferred too (?:few|many)"
    r"|Warning: (?:unknown JFIF revision|thumbnail image size)|libpng (?:warning|error):|TIFF\w*: "
    r"|\[(?:WARNING|WARN|ERROR|FATAL)\] \[[\w .:/-]+\] )"
)


@contextlib.contextmanager
def captured_native_stderr():
    """Collect what native code (DALI's libjpeg, nvImageCodec) writes to file descriptor 2 meanwhile.

    Decoder warnings such as "Corrupt JPEG data: 517 extraneous bytes before marker 0xd9" are
    printed by C code straight to fd 2: they would break the progress bar and could not be told
    apart by image.  Python's own writes go through ``sys.stderr``; ``console()`` gives the code
    that must keep printing meanwhile (the progress bar) a stream that bypasses the capture.
    Yields a list that holds, once the block ends, the decoder's messages written meanwhile (lines of
    the forms of ``DECODER_LINE``, ANSI codes removed) joined into one string, "" if none.  Every other
    line written to fd 2 meanwhile (by any thread) is passed on to the real stderr (``console()``).
    """
    out: list[str] = []
    with _native_stderr_lock, tempfile.TemporaryFile() as tmp:
        stream = console()  # first opened (if it is) under the lock, before fd 2 is redirected: the real stderr
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            decoder, others = split_decoder_lines(tmp.read().decode("utf-8", errors="replace"))
            out.append(" ".join(decoder)[:500])
            if others:
                stream.write("".join(line + "\n" for line in others))
                stream.flush()


def split_decoder_lines(text: str) -> tuple[list[str], list[str]]:
    """(the decoder's messages, every other line) of captured fd-2 text; the decoder's without ANSI codes."""
    decoder, others = [], []
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).strip()
        if not line:
            continue
        if DECODER_LINE.match(line):
            decoder.append(line)
        else:
            others.append(raw)  # passed on as written
    return decoder, others


_console = None


def console():
    """A text stream on a duplicate of the original stderr: unaffected by ``captured_native_stderr``."""
    global _console
    if _console is None:
        _console = os.fdopen(os.dup(2), "w", buffering=1)
    return _console
