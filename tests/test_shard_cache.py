"""The readers' decoded-shard cache: LRU within a byte budget, never stale."""

from __future__ import annotations

import os

import numpy as np

from loader.reader import read_with_ids
from loader.shard_cache import ShardCache
from loader.sources.writers import write_parquet


def shard(tmp_path, name: str, rows: int, value: float = 0.0) -> str:
    path = str(tmp_path / f"{name}.parquet")
    write_parquet(path, {"x": np.full((rows, 4), value, dtype=np.float32)})
    return path


def test_hit_after_put_and_lru_eviction_within_budget(tmp_path):
    a, b, c = (read_with_ids(shard(tmp_path, n, 100), i) for i, n in enumerate("abc"))
    cache = ShardCache(max_bytes=int(a.table.nbytes * 2.5))
    for result in (a, b):
        cache.put(result)
    assert cache.get(a.uri, 0) is a  # a is now the most recently used
    cache.put(c)  # over budget: b, the least recently used, goes
    assert cache.get(b.uri, 1) is None
    assert cache.get(a.uri, 0) is a and cache.get(c.uri, 2) is c
    assert cache.bytes <= cache.max_bytes
    assert (cache.hits, cache.misses) == (3, 1)


def test_rewritten_file_is_not_served_from_the_cache(tmp_path):
    path = shard(tmp_path, "a", 10, value=1.0)
    cache = ShardCache(1 << 20)
    cache.put(read_with_ids(path, 0))
    write_parquet(path, {"x": np.full((20, 4), 2.0, dtype=np.float32)})
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse clocks
    assert cache.get(path, 0) is None


def test_errors_and_oversized_shards_are_not_cached(tmp_path):
    cache = ShardCache(max_bytes=10)
    cache.put(read_with_ids(str(tmp_path / "missing.parquet"), 0))
    cache.put(read_with_ids(shard(tmp_path, "big", 100), 1))
    assert cache.bytes == 0 and cache.get(str(tmp_path / "big.parquet"), 1) is None


def test_a_file_changed_while_it_was_read_is_not_cached(tmp_path):
    path = shard(tmp_path, "a", 10, value=1.0)
    cache = ShardCache(1 << 20)
    before = cache.identity(path, 0)
    result = read_with_ids(path, 0)
    with open(path, "r+b") as f:  # truncated after the read, before the result is cached
        f.truncate(100)
    cache.put(result, before)
    assert cache.bytes == 0 and cache.get(path, 0) is None
    again = read_with_ids(path, 0)
    assert again.table is None and "parquet" in again.error
