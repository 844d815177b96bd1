"""The typed errors rtagger raises.

Every error a user can cause (bad file, bad checkpoint, bad stream message) is a subclass of
:class:`RtaggerError`, so callers can catch one type and report ``str(err)``, which always
names the offending input and the reason.
"""

from __future__ import annotations


class RtaggerError(Exception):
    """Base class of every error rtagger raises on purpose."""


class AudioError(RtaggerError):
    """Audio could not be decoded or is unusable (empty, truncated, not audio, NaN...)."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class CheckpointError(RtaggerError):
    """A checkpoint file is missing, corrupt, or does not match the code that loads it."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"checkpoint {path}: {reason}")


class ConfigError(RtaggerError, ValueError):
    """A setting is out of range or inconsistent (hop larger than the window, ...)."""


class EngineUnavailable(RtaggerError):
    """An inference engine was asked for but its package or device is missing."""
