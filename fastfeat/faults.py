"""Why an image could not be read: a reason of its own (recorded, the run goes on) or the storage's
(retried with backoff; if it persists the run stops and a rerun picks the image up).

Imports nothing heavy: the read stage runs without torch or DALI.

An image's own reasons are its ``cause`` in the error table (errors.parquet): :data:`MISSING` (no such
file, key, tar member data or Parquet row), :data:`NOT_IMAGE` (not a recognised image, empty, a folder),
:data:`CORRUPT` (truncated, a damaged header or container, failed or warned decoding), :data:`TOO_LARGE`
(over the file size limit or ``--max-pixels``), :data:`UNSAFE` (a tar member path refused at listing).
Everything else is the storage's or the setup's: transient failures (HTTP 5xx/429/SlowDown, timeouts,
connection resets, EIO/ESTALE/EAGAIN...) are retried (:func:`is_transient`); the rest (permission denied,
an unknown error) is not retried; either way the image is never recorded as bad (:class:`ReadFault`).
"""

from __future__ import annotations

import errno
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

MISSING, NOT_IMAGE, CORRUPT, TOO_LARGE, UNSAFE = "missing", "not_image", "corrupt", "too_large", "unsafe"
CAUSES = (MISSING, NOT_IMAGE, CORRUPT, TOO_LARGE, UNSAFE)
DEFAULT_READ_RETRIES = 8  # with the default backoff: 46-92 s of waiting before a read is given up

# errno values of a passing fault: an NFS server that went away (ESTALE, EIO), a busy or interrupted call,
# and every network error an OS reports for a socket.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO", "ESTALE", "EAGAIN", "EWOULDBLOCK", "EINTR", "EBUSY", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED",
        "ECONNABORTED", "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH", "EPIPE", "ENOTCONN",
        "EREMOTEIO", "ENOLINK", "ECOMM", "EPROTO", "ENOBUFS",
    )
    if hasattr(errno, name)
)  # fmt: skip
# What pyarrow's S3/GCS/HDFS clients say of a passing fault (their OSErrors carry no errno).
_TRANSIENT_TEXT = re.compile(
    r"HTTP status (?:5\d\d|429)|HTTP response code:? ?(?:5\d\d|429)|SLOW_DOWN|SlowDown|THROTTL|Throttl|"
    r"NETWORK_CONNECTION|REQUEST_TIME_?OUT|RequestTimeout|SERVICE_UNAVAILABLE|ServiceUnavailable|"
    r"INTERNAL_FAILURE|InternalError|curlCode|[Cc]onnection (?:reset|refused|aborted|closed)|timed out|[Tt]imeout|"
    r"[Cc]ouldn't connect|Broken pipe|Temporary failure|temporarily unavailable|Stale file handle|"
    r"Input/output error|Resource busy|Too Many Requests"
)
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP})


class Problem(NamedTuple):
    """Why one image has no row (or, kept despite it, a warning): the stage that found it, a message naming
    the file, and its cause (one of :data:`CAUSES`)."""

    stage: str
    message: str
    cause: str


class ImageUnreadable(OSError):
    """An image that cannot be read for a reason of its own: ``cause`` is one of :data:`CAUSES`."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause

    def __reduce__(self):  # picklable (Ray): OSError's own reduce would lose ``cause``
        return (type(self), (str(self), self.cause))


class ReadFault(OSError):
    """An image could not be read for a reason that is not its own (the storage, the network, the setup),
    after ``attempts`` tries: never an error record; the runner stops the run without committing its shard."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts

    def __reduce__(self):
        return (type(self), (str(self), self.attempts))


def image_cause(exc: BaseException) -> str | None:
    """The image's own cause of a read failure, or None when the failure is not the image's."""
    if isinstance(exc, ImageUnreadable):
        return exc.cause
    if isinstance(exc, FileNotFoundError) or getattr(exc, "errno", None) in _MISSING_ERRNOS:
        return MISSING
    if isinstance(exc, IsADirectoryError) or getattr(exc, "errno", None) == errno.EISDIR:
        return NOT_IMAGE
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a read failure that is not the image's may pass: worth retrying."""
    if isinstance(exc, (TimeoutError, ConnectionError, InterruptedError, BlockingIOError)):
        return True
    if getattr(exc, "errno", None) in _TRANSIENT_ERRNOS:
        return True
    return bool(_TRANSIENT_TEXT.search(str(exc)))


def sleep(seconds: float) -> None:
    """The backoff's sleep (module-level, so that a test can replace it and never wait)."""
    time.sleep(seconds)


@dataclass(frozen=True)
class Backoff:
    """Bounded exponential backoff with jitter: the k-th retry (k = 0, 1, ...) waits between half and all
    of ``min(cap_s, base_s * 2**k)`` ("equal jitter": readers that failed together do not retry together)."""

    base_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, retry: int, rng: random.Random) -> float:
        full = min(self.cap_s, self.base_s * (2.0**retry))
        return full / 2 + rng.uniform(0.0, full / 2)


DEFAULT_BACKOFF = Backoff()


def with_retries(
    read: Callable[[], bytes], retries: int, backoff: Backoff | None = None, rng: random.Random | None = None,
    sleep_fn: Callable[[float], None] | None = None,
) -> bytes:  # fmt: skip
    """``read()``, retried up to ``retries`` times while it fails transiently.  An image's own failure is
    raised as it is; any other raises :class:`ReadFault` (at once when it is not transient)."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        attempt += 1
        try:
            return read()
        except OSError as exc:
            if image_cause(exc) is not None:
                raise
            if not is_transient(exc) or attempt > retries:
                tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                raise ReadFault(f"{exc.strerror or exc} ({tries})", attempt) from exc
            (sleep_fn or sleep)((backoff or DEFAULT_BACKOFF).delay(attempt - 1, rng))
