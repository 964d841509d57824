"""The readers' decoded-shard cache: LRU within a byte budget, never stale; and the reader actor
handing out one object-store reference per cached shard."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from loader.reader import read_with_ids
from loader.shard_cache import ShardCache
from loader.sources.writers import write_parquet

# Every wait on an actor or object is bounded: a hang fails the test with Ray's GetTimeoutError.
RAY_TIMEOUT_S = 60


def shard(tmp_path, name: str, rows: int, value: float = 0.0) -> str:
    path = str(tmp_path / f"{name}.parquet")
    write_parquet(path, {"x": np.full((rows, 4), value, dtype=np.float32)})
    return path


def keep(cache: ShardCache, result, before=None) -> bool:
    return cache.put(result.uri, result.index, result, result.table.nbytes, before)


def test_hit_after_put_and_lru_eviction_within_budget(tmp_path):
    a, b, c = (read_with_ids(shard(tmp_path, n, 100), i) for i, n in enumerate("abc"))
    cache = ShardCache(max_bytes=int(a.table.nbytes * 2.5))
    for result in (a, b):
        assert keep(cache, result)
    assert cache.get(a.uri, 0) is a  # a is now the most recently used
    assert keep(cache, c)  # over budget: b, the least recently used, goes
    assert cache.get(b.uri, 1) is None
    assert cache.get(a.uri, 0) is a and cache.get(c.uri, 2) is c
    assert cache.bytes <= cache.max_bytes
    assert (cache.hits, cache.misses) == (3, 1)


def test_rewritten_file_is_not_served_from_the_cache(tmp_path):
    path = shard(tmp_path, "a", 10, value=1.0)
    cache = ShardCache(1 << 20)
    keep(cache, read_with_ids(path, 0))
    write_parquet(path, {"x": np.full((20, 4), 2.0, dtype=np.float32)})
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse clocks
    assert cache.get(path, 0) is None


def test_missing_files_and_oversized_shards_are_not_cached(tmp_path):
    cache = ShardCache(max_bytes=10)
    assert not cache.put(str(tmp_path / "missing.parquet"), 0, "value", 1)
    assert not keep(cache, read_with_ids(shard(tmp_path, "big", 100), 1))
    assert cache.bytes == 0 and cache.get(str(tmp_path / "big.parquet"), 1) is None


def test_a_file_changed_while_it_was_read_is_not_cached(tmp_path):
    path = shard(tmp_path, "a", 10, value=1.0)
    cache = ShardCache(1 << 20)
    before = cache.identity(path, 0)
    result = read_with_ids(path, 0)
    with open(path, "r+b") as f:  # truncated after the read, before the result is cached
        f.truncate(100)
    assert not keep(cache, result, before)
    assert cache.bytes == 0 and cache.get(path, 0) is None
    again = read_with_ids(path, 0)
    assert again.table is None and "parquet" in again.error


def test_reader_puts_a_shard_in_the_object_store_once_and_hands_out_its_reference(ray_session, tmp_path):
    import ray

    from actors.reader import ShardReaderActor

    path, missing = shard(tmp_path, "a", 10), str(tmp_path / "missing.parquet")
    # The second caches nothing (no shard fits): each read puts its own object.
    reader, uncached = ShardReaderActor.remote(1 << 20), ShardReaderActor.remote(0)
    try:
        first, again = ray.get([reader.read.remote(path, 3), reader.read.remote(path, 3)], timeout=RAY_TIMEOUT_S)
        assert first.ref is not None and first.ref == again.ref  # cached: the same object
        result = ray.get(first.ref, timeout=RAY_TIMEOUT_S)
        assert (result.index, result.uri, result.table.num_rows, result.error) == (3, path, 10, "")
        lost = ray.get(reader.read.remote(missing, 4), timeout=RAY_TIMEOUT_S)  # errors come back inline, no object
        assert lost.ref is None and lost.error and (lost.index, lost.uri) == (4, missing)
        refs = [ray.get(uncached.read.remote(path, 3), timeout=RAY_TIMEOUT_S).ref for _ in range(2)]
        assert refs[0] != refs[1] and ray.get(refs[1], timeout=RAY_TIMEOUT_S).table.num_rows == 10
    finally:
        for actor in (reader, uncached):
            ray.kill(actor)


def test_a_reader_answers_unchanged_without_a_reference_only_while_the_file_is(ray_session, tmp_path):
    import ray

    from actors.reader import ShardReaderActor

    path = shard(tmp_path, "a", 10)
    # The second caches nothing: it decodes again to answer, and still tells the identity.
    reader, uncached = ShardReaderActor.remote(1 << 20), ShardReaderActor.remote(0)
    try:
        for actor in (reader, uncached):
            first = ray.get(actor.read.remote(path, 3), timeout=RAY_TIMEOUT_S)
            assert first.ref is not None and first.identity == ShardCache.identity(path, 3) and not first.unchanged
            same = ray.get(actor.read.remote(path, 3, first.identity), timeout=RAY_TIMEOUT_S)
            assert same.unchanged and same.ref is None and same.identity == first.identity and not same.error
        stale = ray.get(reader.read.remote(path, 3), timeout=RAY_TIMEOUT_S).identity
        write_parquet(path, {"x": np.ones((12, 4), np.float32)})  # rewritten: another size and mtime
        changed = ray.get(reader.read.remote(path, 3, stale), timeout=RAY_TIMEOUT_S)
        assert not changed.unchanged and changed.ref is not None and changed.identity != stale
        assert ray.get(changed.ref, timeout=RAY_TIMEOUT_S).table.num_rows == 12
        gone = ray.get(reader.read.remote(str(tmp_path / "missing.parquet"), 4, stale), timeout=RAY_TIMEOUT_S)
        assert gone.error and not gone.unchanged
    finally:
        for actor in (reader, uncached):
            ray.kill(actor)


def test_a_reader_names_the_shards_it_caches_unchanged_in_one_call(ray_session, tmp_path):
    import ray

    from actors.reader import ShardReaderActor

    paths = [shard(tmp_path, name, 10) for name in "abc"]
    reader, uncached = ShardReaderActor.remote(1 << 20), ShardReaderActor.remote(0)
    try:
        known = [ray.get(reader.read.remote(p, i), timeout=RAY_TIMEOUT_S).identity for i, p in enumerate(paths)]
        asks = [(p, i, k) for i, (p, k) in enumerate(zip(paths, known))]
        assert ray.get(reader.cached_unchanged.remote(asks), timeout=RAY_TIMEOUT_S) == [0, 1, 2]
        write_parquet(paths[1], {"x": np.ones((12, 4), np.float32)})  # rewritten
        os.remove(paths[2])  # gone
        # Named with an identity it was not read at, or not cached at all: not unchanged.
        other = [(paths[0], 0, (paths[0], 0, 1, 2)), (shard(tmp_path, "d", 3), 3, known[0])]
        assert ray.get(reader.cached_unchanged.remote(asks + other), timeout=RAY_TIMEOUT_S) == [0]
        ray.get(uncached.read.remote(paths[0], 0), timeout=RAY_TIMEOUT_S)
        assert ray.get(uncached.cached_unchanged.remote(asks[:1]), timeout=RAY_TIMEOUT_S) == []
    finally:
        for actor in (reader, uncached):
            ray.kill(actor)


def test_a_shard_dies_with_its_reader_and_the_restarted_reader_puts_it_again(ray_session, tmp_path):
    """The contract the curator's retry rests on: awaiting a dead reader's object raises an
    ObjectLostError (OwnerDiedError), and the restarted reader, its cache empty, reads afresh."""
    import ray
    from ray.exceptions import ObjectLostError

    from actors.reader import ShardReaderActor

    path = shard(tmp_path, "a", 10)
    reader = ShardReaderActor.remote(1 << 20)
    try:
        before = ray.get(reader.read.remote(path, 0), timeout=RAY_TIMEOUT_S)
        ray.kill(reader, no_restart=False)
        deadline = time.monotonic() + 60
        while True:  # borrowers hear of the owner's death asynchronously; until then a copy may serve
            try:
                ray.get(before.ref, timeout=RAY_TIMEOUT_S)
            except ObjectLostError:
                break
            assert time.monotonic() < deadline, "the object outlived its reader"
            time.sleep(0.1)
        after = ray.get(reader.read.remote(path, 0), timeout=RAY_TIMEOUT_S)
        assert after.ref != before.ref and ray.get(after.ref, timeout=RAY_TIMEOUT_S).table.num_rows == 10
    finally:
        ray.kill(reader)
