"""The error classes a user sees.  Importing this module imports nothing heavy.

Two kinds of failure, told apart by class (``fastfeat.cli.main``):

* :class:`FastfeatError` and its subclasses: something the user can fix (a bad flag, a missing file,
  a foreign output directory, a damaged manifest).  One line, exit code 2, nothing written.
* anything else (a ``ValueError`` from pyarrow or numpy, a ``TypeError``...): a bug in fastfeat.  The
  traceback is printed, with a line saying it is a bug; exit code 1.

``FastfeatError`` derives from ``ValueError`` so that callers of the Python API that catch
``ValueError`` for bad arguments keep working; the CLI, though, never takes a plain ``ValueError`` for
the user's mistake.  Code that calls a library whose ``ValueError`` does mean bad input (Pillow on a
file, ``int()`` on a flag) turns it into a ``FastfeatError`` right there.
"""

from __future__ import annotations


class FastfeatError(ValueError):
    """Something the user can fix: reported as one line, exit code 2 (base of every such error)."""


class ConfigError(FastfeatError):
    """A bad argument or environment: reported as one line, exit code 2, nothing written."""


class DownloadError(ConfigError):
    """Published weights that could not be fetched or checked: one line naming the URL to fetch by
    hand and the exact path to save it as (a ValueError: the CLI prints it, exit code 2).  Defined here,
    not in fastfeat.published, so that fastfeat.hub_weights raises it without importing published."""


class ExtractFailed(RuntimeError):
    """A run that ended but must not look like a success (no row written, too many errors): exit code 1.

    ``summary`` is the run's summary (also in OUT/summary.json); finished shards are kept."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class ReadStopped(RuntimeError):
    """Images could not be read for a reason that is not theirs (storage, network, permissions) even after
    retries: the run stopped without committing the shard that holds them and recorded none as failed.
    One line, exit code 1; finished shards are kept and the same command resumes.  ``images``: how many."""

    def __init__(self, message: str, images: int):
        super().__init__(message)
        self.images = images

    def __reduce__(self):  # picklable with its fields (a Ray worker raises it to the driver)
        return (type(self), (str(self), self.images))
