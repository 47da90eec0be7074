"""Typed exceptions for user mistakes.

Library code raises a subclass of :class:`PdjaxError` whose message is one line naming the problem and
the fix; the CLI prints ``error: <message>`` and exits with status 2, never a traceback.
"""

from __future__ import annotations


class PdjaxError(Exception):
    """Base class of every error caused by a user's input (files, names, shapes, options)."""


class ConfigError(PdjaxError):
    """An invalid or unsupported model / run configuration."""


class OutputError(ConfigError):
    """An output path (``--out``, ``--npy``, ...) that cannot be created or written."""


class CheckpointError(PdjaxError):
    """A missing, truncated, mismatched or otherwise unreadable checkpoint."""


class DataError(PdjaxError):
    """A missing or malformed dataset or image."""


class UnsafePickleError(DataError):
    """A pickle asked to build or call something outside the allowed payload; it was never executed."""


class UnknownNameError(PdjaxError):
    """An unknown preset name (trigger, target, method, ...); the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid):
        valid = sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")
        self.kind, self.name, self.valid = kind, name, valid
