"""How remote and pipe: shards are fetched: the read cache, retries, timeouts, whether pipe: runs.

Each value comes from the service config's `remote` keys when the service set them
(`configure`, in every process that reads shards), else from the environment
(`LOADER_REMOTE_<KEY>`, for tools run without a config), else the default below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

from loader.errors import ConfigError

ENV_PREFIX = "LOADER_REMOTE_"


@dataclasses.dataclass(frozen=True)
class RemoteSettings:
    # Folder of the read cache; None: $XDG_CACHE_HOME/loader/remote-shards (~/.cache/...).
    cache_dir: str | None = None
    # The cache's bound, MiB; least recently used files go first.
    cache_mb: float = 10 * 1024
    # Attempts per fetch, the first included, while errors are transient.
    attempts: int = 5
    # First wait between attempts, doubled each time up to backoff_max_s (plus up to 25% jitter).
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    # Connect and per-read socket timeout.
    timeout_s: float = 30.0
    # pipe:COMMAND shards run COMMAND in a shell on the service, so they are off by default.
    allow_pipe: bool = False

    @classmethod
    def from_env(cls, **given) -> RemoteSettings:
        """Settings with `given` values, the others from LOADER_REMOTE_<KEY> or the default."""
        values = {}
        for field in dataclasses.fields(cls):
            if given.get(field.name) is not None:
                values[field.name] = given[field.name]
                continue
            name = ENV_PREFIX + field.name.upper()
            raw = os.environ.get(name)
            if raw is None or raw == "":
                continue
            try:
                values[field.name] = _parse(field.name, raw)
            except ValueError:
                raise ConfigError(name, f"expected {field.type}, got {raw!r}") from None
        settings = cls(**values)
        if settings.attempts < 1:
            raise ConfigError("remote.attempts", f"expected at least 1, got {settings.attempts}")
        return settings


def _parse(name: str, raw: str):
    if name == "cache_dir":
        return raw
    if name == "allow_pipe":
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(raw)
        return raw.lower() in ("1", "true", "yes")
    if name == "attempts":
        return int(raw)
    return float(raw)


_configured: RemoteSettings | None = None


def configure(settings: RemoteSettings | None) -> None:
    """Makes `settings` this process's (None: back to the environment's)."""
    global _configured
    _configured = settings


def current() -> RemoteSettings:
    return _configured if _configured is not None else RemoteSettings.from_env()


@contextlib.contextmanager
def using(settings: RemoteSettings) -> Iterator[None]:
    """`settings` for the block only: for a process that hosts more than one service's reads
    (a driver, a test), where `configure` would outlive the service."""
    global _configured
    before, _configured = _configured, settings
    try:
        yield
    finally:
        _configured = before
