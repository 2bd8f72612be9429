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
