"""Turns one epoch's stream of shard tables into a global sequence of batches.

Global batch g goes to rank g % world_size. Every row added is emitted exactly once and every rank
gets the same number of batches: while shards are still arriving only full batches leave, and a
reserve of world_size * batch_size rows is held back so the tail can be split evenly across ranks
once the epoch's size is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from loader.codec import ID
from loader.selection.quota import ClusterBuffer


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


class ClusteredShuffleBuffer:
    """Rows waiting per cluster; a draw takes each cluster's quota (a bandit's choice) at random.

    Rows are addressed by their position in the stream of added tables; a table is released once
    all its rows are drawn, so memory follows what is buffered, not what passed through.

    A cluster the bandit draws less often than its rows arrive keeps a few rows of many old
    tables waiting; each would hold its whole table and cost a draw one Arrow `take`. So once more
    than `_MAX_TABLES` tables are held, the rows still waiting in all but the newest are copied into
    one merged table (rows keep their positions) and the old tables are released.
    """

    _MAX_TABLES = 8

    def __init__(
        self,
        rng: np.random.Generator,
        cluster_of: Callable[[np.ndarray], np.ndarray],
        quotas: Callable[[int, np.ndarray], np.ndarray],
    ) -> None:
        self._rng, self._cluster_of, self._quotas = rng, cluster_of, quotas
        self._rows = ClusterBuffer()
        self._starts = np.zeros(0, np.int64)  # first position of every table added, by key
        self._tables: dict[int, pa.Table] = {}
        self._left: dict[int, int] = {}
        self._next = 0
        # Rows of tables with keys below `_merged_below`, still waiting at the last merge: row i
        # of `_merged` is the row at position `_merged_positions[i]` (sorted).
        self._merged: pa.Table | None = None
        self._merged_positions = np.zeros(0, np.int64)
        self._merged_left = 0
        self._merged_below = 0

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, table: pa.Table) -> None:
        n = table.num_rows
        if not n:
            return
        clusters = self._cluster_of(table.column(ID).to_numpy())
        self._rows.add(clusters, np.arange(self._next, self._next + n, dtype=np.int64))
        self._schema = table.schema
        key = len(self._starts)
        self._starts = np.append(self._starts, self._next)
        self._tables[key], self._left[key] = table, n
        self._next += n
        if len(self._tables) > self._MAX_TABLES:
            self._merge(key)

    def draw(self, k: int) -> pa.Table:
        if k > len(self):
            raise ValueError(f"cannot draw {k} rows from a buffer of {len(self)}")
        positions = self._rows.draw(self._quotas(k, self._rows.counts()), self._rng)
        if len(positions) != k:
            raise RuntimeError(f"quotas gave {len(positions)} rows for a draw of {k}")
        # Rows come out grouped by the table they were added in, oldest first, each group in draw
        # order: a stable sort by owner.
        owners = np.searchsorted(self._starts, positions, side="right") - 1
        order = np.argsort(owners, kind="stable")
        positions, owners = positions[order], owners[order]
        parts = []
        merged = int(np.searchsorted(owners, self._merged_below))
        if merged:
            assert self._merged is not None
            rows = np.searchsorted(self._merged_positions, positions[:merged])
            parts.append(self._merged.take(pa.array(rows)))
            self._merged_left -= merged
            if not self._merged_left:
                self._merged, self._merged_positions = None, np.zeros(0, np.int64)
        keys, firsts = np.unique(owners[merged:], return_index=True)
        ends = np.append(firsts[1:], len(owners) - merged) + merged
        for key, first, end in zip(keys.tolist(), (firsts + merged).tolist(), ends.tolist()):
            parts.append(self._tables[key].take(pa.array(positions[first:end] - self._starts[key])))
            self._left[key] -= end - first
            if not self._left[key]:
                del self._tables[key], self._left[key]
        return pa.concat_tables(parts) if parts else self._schema.empty_table()

    def _merge(self, newest: int) -> None:
        """Copies the waiting rows of every table older than `newest` into one merged table."""
        cutoff = int(self._starts[newest])
        waiting = self._rows.waiting()
        waiting = np.sort(waiting[waiting < cutoff])
        owners = np.searchsorted(self._starts, waiting, side="right") - 1
        parts = []
        merged = int(np.searchsorted(owners, self._merged_below))
        if merged:
            assert self._merged is not None
            parts.append(self._merged.take(pa.array(np.searchsorted(self._merged_positions, waiting[:merged]))))
        for key in [k for k in sorted(self._tables) if k < newest]:
            table = self._tables.pop(key)
            del self._left[key]
            lo, hi = np.searchsorted(waiting, [self._starts[key], self._starts[key] + table.num_rows])
            if hi > lo:
                parts.append(table.take(pa.array(waiting[lo:hi] - self._starts[key])))
        # One chunk: a take from a chunked table concatenates all its chunks first, every draw.
        self._merged = pa.concat_tables(parts).combine_chunks() if parts else None
        self._merged_positions = waiting
        self._merged_left = len(waiting)
        self._merged_below = newest


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
    def __init__(
        self,
        batch_size: int,
        world_size: int,
        shuffle_rows: int,
        seed: int,
        buffer: Callable[[np.random.Generator], ShuffleBuffer | ClusteredShuffleBuffer] = ShuffleBuffer,
    ) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be positive")
        self.batch_size, self.world_size = batch_size, world_size
        self._hold = max(shuffle_rows, batch_size * world_size)
        self._buffer = buffer(np.random.default_rng(seed))
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
