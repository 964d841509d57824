"""ShardReader actors: decode one shard per call into an Arrow table with sample ids."""

from __future__ import annotations

import ray

from loader.reader import ReadResult, read_with_ids
from loader.shard_cache import ShardCache


@ray.remote(num_cpus=0.25, max_restarts=-1)
class ShardReaderActor:
    def __init__(self, cache_bytes: int = 0) -> None:
        self._cache = ShardCache(cache_bytes)

    def read(self, uri: str, index: int) -> ReadResult:
        result = self._cache.get(uri, index)
        if result is None:
            result = read_with_ids(uri, index)
            self._cache.put(result)
        return result
