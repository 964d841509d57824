"""Decoded shards kept in memory, least recently used first out, within a byte budget.

Curated policies read every shard each epoch but serve only a keep-ratio of it, so decoding
dominates a small pool's epoch; a pool that fits the budget is decoded once. The cache holds
whatever stands for a decoded shard (the readers keep an object-store reference to it) and
counts the bytes it is told that value pins.
"""

from __future__ import annotations

import collections
import os
from typing import Generic, TypeVar

from loader.sources.pipe import is_pipe
from loader.sources.remote import cached_path, is_remote

V = TypeVar("V")


class ShardCache(Generic[V]):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: collections.OrderedDict[tuple, tuple[V, int]] = collections.OrderedDict()

    @staticmethod
    def identity(uri: str, index: int) -> tuple | None:
        """The cache key of the file as it is now; None when it cannot be stat'ed."""
        # A rewritten file must not be served from the cache: size and mtime are part of the key.
        # A remote (or pipe:) shard is keyed by its copy in the read cache (loader.sources.remote): taken as
        # immutable, it is decoded again only once that copy is evicted.
        path = uri
        if is_remote(uri) or is_pipe(uri):
            path = cached_path(uri)
            if path is None:
                return None
        try:
            stat = os.stat(path)
        except OSError:
            return None
        if path is not uri:  # each hit touches the copy's mtime; a new download is a new inode
            return (uri, index, stat.st_size, stat.st_ino)
        return (uri, index, stat.st_size, stat.st_mtime_ns)

    def get(self, uri: str, index: int) -> V | None:
        key = self.identity(uri, index)
        entry = self._entries.get(key) if key is not None else None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, uri: str, index: int, value: V, nbytes: int, before: tuple | None = None) -> bool:
        """Keeps `value`, which pins `nbytes`, for shard `index` at `uri`; True if it was kept.
        `before` is the file's `identity` taken before reading: a file rewritten or truncated
        while it was read is not cached, lest its new identity serve what the old bytes decoded
        to. Values evicted are dropped, which is what frees what they pin."""
        key = self.identity(uri, index)
        if key is None or nbytes > self.max_bytes or key in self._entries:
            return False
        if before is not None and before != key:
            return False
        self._entries[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        return True
