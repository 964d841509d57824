"""ShardReader actors: decode one shard per call into an Arrow table with sample ids."""

from __future__ import annotations

import ray

from loader.reader import ReadResult, read_with_ids
from loader.shard_cache import ShardCache


# Its calls are pure, so Ray may repeat one cut off by a crash on the restarted actor; a shard that
# crashes it every time is given up after a few tries (and then quarantined by the curator).
@ray.remote(num_cpus=0.25, max_restarts=-1, max_task_retries=3)
class ShardReaderActor:
    def __init__(self, cache_bytes: int = 0) -> None:
        self._cache = ShardCache(cache_bytes)

    def read(self, uri: str, index: int) -> ReadResult:
        result = self._cache.get(uri, index)
        if result is None:
            before = self._cache.identity(uri, index)
            result = read_with_ids(uri, index)
            self._cache.put(result, before)
        return result
