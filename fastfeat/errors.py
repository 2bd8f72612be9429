"""The error classes a user sees.  Importing this module imports nothing heavy."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad argument or environment: reported as one line, exit code 2, nothing written."""


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
