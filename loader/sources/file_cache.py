"""The local read cache of remote shards: whole files in one folder, shared by every process on
the machine, bounded in size; the least recently used files (by mtime, which each hit refreshes)
are removed when it grows past its bound. A file larger than the whole bound is served from a
temporary copy removed after the read."""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import urllib.parse
from collections.abc import Callable, Iterator

from loader.files import atomic_file, make_dirs
from loader.sources import remote_settings


class FileCache:
    """Whole remote files under `folder`, at most `max_bytes` of them, least recently used out."""

    def __init__(self, folder: str, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    @classmethod
    def current(cls) -> FileCache:
        """The cache of this process's settings (loader.sources.remote_settings)."""
        settings = remote_settings.current()
        folder = settings.cache_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loader", "remote-shards"
        )
        return cls(folder, int(settings.cache_mb * (1 << 20)))

    def path(self, uri: str) -> str:
        # The suffix only helps a person browsing the folder; readers go by the URI.
        ext = posixpath.splitext(urllib.parse.urlsplit(uri).path)[1].lower()[:16]
        return os.path.join(self.folder, hashlib.sha256(uri.encode()).hexdigest()[:40] + ext)

    def lookup(self, uri: str) -> str | None:
        """The cached copy's path (marked as just used), or None."""
        path = self.path(uri)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def files(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of each cached file, oldest first."""
        entries = []
        try:
            with os.scandir(self.folder) as it:
                for entry in it:
                    if entry.name.startswith(".") or not entry.is_file():
                        continue  # temporary files of downloads in progress
                    with contextlib.suppress(FileNotFoundError):
                        stat = entry.stat()
                        entries.append((stat.st_mtime, stat.st_size, entry.path))
        except FileNotFoundError:
            return []
        return sorted(entries)

    def bytes(self) -> int:
        return sum(size for _, size, _ in self.files())

    def evict(self, keep: str | None = None) -> None:
        """Removes the least recently used files until the cache is within its bound."""
        entries = self.files()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            total -= size

    @contextlib.contextmanager
    def local_copy(self, uri: str, fetch: Callable[[str], None]) -> Iterator[str]:
        """A local path holding `uri`'s bytes for the block: the cached copy, or one `fetch(tmp)`
        writes; one larger than the whole bound is removed after the block."""
        path = self.lookup(uri)
        if path is None:
            path = self.path(uri)
            make_dirs(self.folder)
            with atomic_file(path) as tmp:
                fetch(tmp)
            if os.path.getsize(path) > self.max_bytes:
                try:
                    yield path
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                return
            self.evict(keep=path)
        yield path
