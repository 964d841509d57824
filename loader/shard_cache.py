"""Decoded shards kept in memory, least recently used first out, within a byte budget.

Curated policies read every shard each epoch but serve only a keep-ratio of it, so decoding
dominates a small pool's epoch; a pool that fits the budget is decoded once.
"""

from __future__ import annotations

import collections
import os

from loader.reader import ReadResult


class ShardCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: collections.OrderedDict[tuple, ReadResult] = collections.OrderedDict()

    @staticmethod
    def identity(uri: str, index: int) -> tuple | None:
        """The cache key of the file as it is now; None when it cannot be stat'ed."""
        # A rewritten file must not be served from the cache: size and mtime are part of the key.
        try:
            stat = os.stat(uri)
        except OSError:
            return None
        return (uri, index, stat.st_size, stat.st_mtime_ns)

    def get(self, uri: str, index: int) -> ReadResult | None:
        key = self.identity(uri, index)
        result = self._entries.get(key) if key is not None else None
        if result is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return result

    def put(self, result: ReadResult, before: tuple | None = None) -> None:
        """Keeps a successful read. `before` is the file's `identity` taken before reading: a file
        rewritten or truncated while it was read is not cached, lest its new identity serve what
        the old bytes decoded to."""
        if result.table is None:
            return
        size = result.table.nbytes
        key = self.identity(result.uri, result.index)
        if key is None or size > self.max_bytes or key in self._entries:
            return
        if before is not None and before != key:
            return
        self._entries[key] = result
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.table.nbytes
