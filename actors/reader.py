"""ShardReader actors: decode one shard per call into an Arrow table with sample ids."""

from __future__ import annotations

import ray

from loader.reader import ReadResult, read_with_ids


@ray.remote(num_cpus=0.25, max_restarts=-1)
class ShardReaderActor:
    def read(self, uri: str, index: int) -> ReadResult:
        return read_with_ids(uri, index)
