"""Exceptions shared by the loader; each carries the fields a caller needs to report it."""

from __future__ import annotations


class LoaderError(Exception):
    """Base class, so callers can catch everything the loader raises on purpose."""


class ShardError(LoaderError):
    """A shard that cannot be read; the loader quarantines it instead of crashing."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(uri, reason)
        self.uri = uri
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.uri}: {self.reason}"


class ConfigError(LoaderError):
    """An invalid setting; `key` names it the way the user wrote it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}"


class JobConflict(LoaderError, ValueError):
    """A trainer's request does not fit the job as it runs (or the service cannot run it)."""
