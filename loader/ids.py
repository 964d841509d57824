"""Sample identity: `_id = (shard_index << 32) | row_in_shard`.

The shard index is assigned once when a shard enters the registry, so an id names the same sample
across epochs, jobs and restarts.
"""

from __future__ import annotations

import numpy as np

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1
MAX_SHARDS = 1 << 31  # ids stay non-negative int64


def make_ids(shard_index: int, rows: int) -> np.ndarray:
    if not 0 <= shard_index < MAX_SHARDS:
        raise ValueError(f"shard index {shard_index} out of range [0, {MAX_SHARDS})")
    if not 0 <= rows <= ROW_MASK + 1:
        raise ValueError(f"a shard holds at most {ROW_MASK + 1} rows, got {rows}")
    return (np.int64(shard_index) << ROW_BITS) | np.arange(rows, dtype=np.int64)


def shard_of(ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64) >> ROW_BITS


def row_of(ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64) & ROW_MASK
