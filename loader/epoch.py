"""Turns one epoch's stream of shard tables into a global sequence of batches.

Global batch g goes to rank g % world_size. Every row added is emitted exactly once and every rank
gets the same number of batches: while shards are still arriving only full batches leave, and a
reserve of world_size * batch_size rows is held back so the tail can be split evenly across ranks
once the epoch's size is known.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa


class ShuffleBuffer:
    """Rows waiting to be drawn, sampled uniformly without replacement.

    Drawing swaps removed positions out of an index array, so a draw costs O(batch) and the table
    is only rebuilt when new rows arrive.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._table: pa.Table | None = None
        self._alive = np.empty(0, dtype=np.int64)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def __len__(self) -> int:
        return len(self._alive) + self._pending_rows

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows

    def _compact(self) -> None:
        parts = [] if self._table is None else [self._table.take(self._alive)]
        self._table = pa.concat_tables(parts + self._pending).combine_chunks()
        self._alive = np.arange(self._table.num_rows, dtype=np.int64)
        self._pending, self._pending_rows = [], 0

    def draw(self, k: int) -> pa.Table:
        if self._pending:
            self._compact()
        if k > len(self._alive):
            raise ValueError(f"cannot draw {k} rows from a buffer of {len(self._alive)}")
        n = len(self._alive)
        picks = self._rng.choice(n, size=k, replace=False)
        rows = self._alive[picks]
        keep = np.ones(n, dtype=bool)
        keep[picks] = False
        self._alive = self._alive[keep]
        return self._table.take(rows)


def tail_sizes(remaining: int, emitted: int, batch_size: int, world_size: int) -> list[int]:
    """Sizes of the last batches so the epoch's batch count is a multiple of world_size.

    The tail is spread as evenly as possible; sizes never exceed batch_size.
    """
    if remaining == 0 and emitted % world_size == 0:
        return []
    total = math.ceil((emitted + math.ceil(remaining / batch_size)) / world_size) * world_size
    count = total - emitted
    base, extra = divmod(remaining, count)
    return [base + 1 if i < extra else base for i in range(count)]


class EpochAssembler:
    def __init__(self, batch_size: int, world_size: int, shuffle_rows: int, seed: int) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be positive")
        self.batch_size, self.world_size = batch_size, world_size
        self._hold = max(shuffle_rows, batch_size * world_size)
        self._buffer = ShuffleBuffer(np.random.default_rng(seed))
        self._finished = False
        self.emitted = 0
        self.rows_in = 0

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def exhausted(self) -> bool:
        return self._finished and len(self._buffer) == 0

    def buffered_rows(self) -> int:
        return len(self._buffer)

    def add(self, table: pa.Table) -> None:
        if self._finished:
            raise RuntimeError("rows added after the epoch's last shard")
        self._buffer.add(table)
        self.rows_in += table.num_rows

    def finish(self) -> None:
        self._finished = True

    def pop_ready(self) -> list[pa.Table]:
        out = []
        if not self._finished:
            while len(self._buffer) >= self.batch_size + self._hold:
                out.append(self._buffer.draw(self.batch_size))
        else:
            sizes = tail_sizes(len(self._buffer), self.emitted, self.batch_size, self.world_size)
            for size in sizes:
                out.append(self._buffer.draw(size))
        self.emitted += len(out)
        return out
