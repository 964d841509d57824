"""Turns one epoch's stream of shard tables into a global sequence of batches.

Global batch g goes to rank g % world_size. Every row added is emitted exactly once and every rank
gets the same number of batches: while shards are still arriving only full batches leave, and a
reserve of world_size * batch_size rows is held back so the tail can be split evenly across ranks
once the epoch's size is known.

Buffers hand out `Candidates`: the ids of the rows drawn, with the rows themselves left where
they are until a policy has chosen which to keep, so only kept rows are ever copied.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import pyarrow as pa

from loader.codec import ID
from loader.gather import Group, gather_rows
from loader.selection.quota import ClusterBuffer


class Candidates:
    """Rows drawn from a buffer, grouped by the table they sit in: ids now, rows on `take`."""

    def __init__(self, schema: pa.Schema, ids: np.ndarray, groups: list[Group]) -> None:
        self.schema, self.ids, self._groups = schema, ids, groups
        self._ends = np.cumsum([len(rows) for _, rows in groups], dtype=np.int64)

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    def take(self, picks: np.ndarray | None = None) -> pa.Table:
        """The rows at `picks` (ascending positions into `ids`; all rows when None), one copy."""
        if picks is None:
            return gather_rows(self.schema, self._groups)
        picks = np.asarray(picks, dtype=np.int64)
        if len(picks) > 1 and (np.diff(picks) <= 0).any():
            raise ValueError("picks must be strictly increasing")
        if len(picks) and not 0 <= picks[0] <= picks[-1] < len(self.ids):
            raise IndexError(f"picks outside 0..{len(self.ids) - 1}")
        bounds = np.searchsorted(picks, self._ends)
        groups, lo, start = [], 0, 0
        for (table, rows), hi, end in zip(self._groups, bounds.tolist(), self._ends.tolist()):
            if hi > lo:
                groups.append((table, rows[picks[lo:hi] - start]))
            lo, start = hi, end
        return gather_rows(self.schema, groups)


class _Rows:
    """The tables a buffer holds, with every row addressed by its position in the stream of rows
    added. A table is released once all its rows are drawn, so memory follows what is waiting.

    Rows drawn at random leave a few waiting rows in many old tables, and each would hold its
    whole table. So when old tables hold too much besides their waiting rows, or too many are held
    (each costs a draw one more gather), the waiting rows of all but the newest are copied into
    one merged table (rows keep their positions) and those tables are released.
    """

    # Old tables may hold this many times the bytes of their waiting rows, plus `slack_bytes`,
    # before a merge. Loose on purpose: a table that a reader also caches costs no memory of its
    # own (both hold the same object-store buffers), while its merged copy would; and a merge
    # copies every waiting row of the old tables.
    HELD_PER_WAITING = 4

    def __init__(self, max_tables: int, slack_bytes: int) -> None:
        self._max_tables, self._slack_bytes = max_tables, slack_bytes
        self.schema: pa.Schema | None = None
        self._starts = np.zeros(0, np.int64)  # first position of every table added, by key
        self._tables: dict[int, pa.Table] = {}
        self._ids: dict[int, np.ndarray] = {}
        self._left: dict[int, int] = {}
        self._held = 0  # rows of every held table, merged included
        self._next = 0
        # Rows of tables with keys below `_merged_below`, still waiting at the last merge: row i
        # of `_merged` is the row at position `_merged_positions[i]` (sorted).
        self._merged: pa.Table | None = None
        self._merged_ids = np.zeros(0, np.int64)
        self._merged_positions = np.zeros(0, np.int64)
        self._merged_left = 0
        self._merged_below = 0

    @property
    def held_rows(self) -> int:
        return self._held

    def add(self, table: pa.Table) -> np.ndarray:
        """Positions of the table's rows."""
        n = table.num_rows
        self.schema = table.schema
        key = len(self._starts)
        self._starts = np.append(self._starts, self._next)
        self._tables[key], self._left[key] = table, n
        self._ids[key] = np.asarray(table.column(ID).to_numpy(), np.int64)
        self._held += n
        self._next += n
        return np.arange(self._next - n, self._next, dtype=np.int64)

    def take(self, positions: np.ndarray) -> Candidates:
        """Candidates for `positions` (each drawn once), grouped by table, oldest first, each
        group in the order given: a stable sort by owner."""
        owners = np.searchsorted(self._starts, positions, side="right") - 1
        order = np.argsort(owners, kind="stable")
        positions, owners = positions[order], owners[order]
        parts: list[tuple[Group, np.ndarray]] = []
        merged = int(np.searchsorted(owners, self._merged_below))
        if merged:
            parts.append(self._merged_rows(positions[:merged]))
            self._merged_left -= merged
            if not self._merged_left:
                self._held -= self._merged.num_rows
                self._merged, self._merged_positions, self._merged_ids = None, np.zeros(0, np.int64), np.zeros(0, np.int64)
        keys, firsts = np.unique(owners[merged:], return_index=True)
        ends = np.append(firsts[1:], len(owners) - merged) + merged
        for key, first, end in zip(keys.tolist(), (firsts + merged).tolist(), ends.tolist()):
            parts.append(self._table_rows(key, positions[first:end]))
            self._left[key] -= end - first
            if not self._left[key]:
                self._release(key)
        assert self.schema is not None
        return Candidates(self.schema, _ids_of(parts), [group for group, _ in parts])

    def _merged_rows(self, positions: np.ndarray) -> tuple[Group, np.ndarray]:
        """The merged table's rows at `positions` (sorted), and their ids."""
        assert self._merged is not None
        rows = np.searchsorted(self._merged_positions, positions)
        return (self._merged, rows), self._merged_ids[rows]

    def _table_rows(self, key: int, positions: np.ndarray) -> tuple[Group, np.ndarray]:
        """Table `key`'s rows at `positions`, and their ids."""
        rows = positions - self._starts[key]
        return (self._tables[key], rows), self._ids[key][rows]

    def merge_if_due(self, waiting: Callable[[], np.ndarray]) -> None:
        """Merges the old tables' waiting rows if they hold too much; `waiting` lists every
        position still waiting."""
        if len(self._tables) < 2:
            return
        newest = len(self._starts) - 1
        old = [t for k, t in self._tables.items() if k != newest]
        counts = [self._left[k] for k in self._tables if k != newest]
        if self._merged is not None:
            old.append(self._merged)
            counts.append(self._merged_left)
        held = sum(t.nbytes for t in old)
        left = sum(t.nbytes * n / t.num_rows for t, n in zip(old, counts))
        if len(self._tables) > self._max_tables or held > self.HELD_PER_WAITING * left + self._slack_bytes:
            self._merge(newest, waiting())

    def _release(self, key: int) -> None:
        self._held -= self._tables.pop(key).num_rows
        del self._ids[key], self._left[key]

    def _merge(self, newest: int, waiting: np.ndarray) -> None:
        """Copies the waiting rows of every table older than `newest` into one merged table."""
        cutoff = int(self._starts[newest])
        waiting = np.sort(waiting[waiting < cutoff])
        owners = np.searchsorted(self._starts, waiting, side="right") - 1
        parts: list[tuple[Group, np.ndarray]] = []
        merged = int(np.searchsorted(owners, self._merged_below))
        if merged:
            parts.append(self._merged_rows(waiting[:merged]))
            self._held -= self._merged.num_rows
        for key in [k for k in sorted(self._tables) if k < newest]:
            lo, hi = np.searchsorted(waiting, [self._starts[key], self._starts[key] + self._tables[key].num_rows])
            if hi > lo:
                parts.append(self._table_rows(key, waiting[lo:hi]))
            self._release(key)
        assert self.schema is not None
        self._merged = gather_rows(self.schema, [group for group, _ in parts]) if parts else None
        self._merged_ids = _ids_of(parts)
        self._merged_positions = waiting
        self._merged_left = len(waiting)
        self._merged_below = newest
        self._held += len(waiting)


def _ids_of(parts: list[tuple[Group, np.ndarray]]) -> np.ndarray:
    return np.concatenate([ids for _, ids in parts]) if parts else np.zeros(0, np.int64)


class ShuffleBuffer:
    """Rows waiting to be drawn, sampled uniformly without replacement."""

    # Tables held before their waiting rows are merged: a draw gathers from each one it touches.
    _MAX_TABLES = 64
    _SLACK_BYTES = 256 << 20

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._store = _Rows(self._MAX_TABLES, self._SLACK_BYTES)
        # Positions waiting, in the order they were added, less those drawn.
        self._alive = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._alive)

    def held_rows(self) -> int:
        """Rows in the tables held: those waiting, and the drawn rows of tables not released."""
        return self._store.held_rows

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._alive = np.concatenate([self._alive, self._store.add(table)])
            self._store.merge_if_due(lambda: self._alive)

    def draw(self, k: int) -> Candidates:
        n = len(self._alive)
        if k > n:
            raise ValueError(f"cannot draw {k} rows from a buffer of {n}")
        if self._store.schema is None:
            return Candidates(pa.schema([]), np.zeros(0, np.int64), [])
        picks = self._rng.choice(n, size=k, replace=False)
        positions = self._alive[picks]
        keep = np.ones(n, dtype=bool)
        keep[picks] = False
        self._alive = self._alive[keep]
        return self._store.take(positions)


class Arms(Protocol):
    """What a clustered draw asks of its owner (a Selector): each row's cluster, and how many
    rows each cluster gives to a draw."""

    def cluster_of(self, ids: np.ndarray) -> np.ndarray: ...

    def quotas(self, k: int, counts: np.ndarray) -> np.ndarray: ...


class ClusteredShuffleBuffer:
    """Rows waiting per cluster; a draw takes each cluster's quota (a bandit's choice) at random.

    A cluster the bandit draws less often than its rows arrive keeps a few rows of many old
    tables waiting, so tables are merged sooner here than in `ShuffleBuffer`.
    """

    _MAX_TABLES = 8
    _SLACK_BYTES = 256 << 20

    def __init__(self, rng: np.random.Generator, arms: Arms) -> None:
        self._rng, self._arms = rng, arms
        self._rows = ClusterBuffer()
        self._store = _Rows(self._MAX_TABLES, self._SLACK_BYTES)

    def __len__(self) -> int:
        return len(self._rows)

    def held_rows(self) -> int:
        """Rows in the tables held: those waiting, and the drawn rows of tables not released."""
        return self._store.held_rows

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        clusters = self._arms.cluster_of(table.column(ID).to_numpy())
        self._rows.add(clusters, self._store.add(table))
        self._store.merge_if_due(self._rows.waiting)

    def draw(self, k: int) -> Candidates:
        if k > len(self):
            raise ValueError(f"cannot draw {k} rows from a buffer of {len(self)}")
        if self._store.schema is None:
            return Candidates(pa.schema([]), np.zeros(0, np.int64), [])
        positions = self._rows.draw(self._arms.quotas(k, self._rows.counts()), self._rng)
        if len(positions) != k:
            raise RuntimeError(f"quotas gave {len(positions)} rows for a draw of {k}")
        return self._store.take(positions)


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
    """Cuts one epoch's rows into super-batches, one at a time, as they are asked for.

    Shard tables wait in the order they were added and enter the shuffle buffer only when the
    next draw needs more rows. So every draw sees the same buffer whatever was read ahead: the
    sequence of draws is a function of the tables' order and the seed, not of timing.
    """

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
        self._waiting: collections.deque[pa.Table] = collections.deque()
        self._waiting_rows = 0
        self._finished = False
        self._tail: collections.deque[int] | None = None
        self.emitted = 0

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def exhausted(self) -> bool:
        return self._finished and not self._waiting and len(self._buffer) == 0

    def buffered_rows(self) -> int:
        return len(self._buffer)

    @property
    def starving(self) -> bool:
        """The next super-batch needs rows that have not been added (and more may come)."""
        return not self._finished and not self._waiting and len(self._buffer) < self.batch_size + self._hold

    def waiting_rows(self) -> int:
        """Rows added but not yet in the shuffle buffer: how far reading is ahead."""
        return self._waiting_rows

    def add(self, table: pa.Table) -> None:
        if self._finished:
            raise RuntimeError("rows added after the epoch's last shard")
        if table.num_rows:
            self._waiting.append(table)
            self._waiting_rows += table.num_rows

    def finish(self) -> None:
        self._finished = True

    def next(self) -> Candidates | None:
        """The next super-batch, or None: it needs rows not added yet, or the epoch is done."""
        while self._tail is None:
            if len(self._buffer) >= self.batch_size + self._hold:
                return self._draw(self.batch_size)
            if self._waiting:
                table = self._waiting.popleft()
                self._waiting_rows -= table.num_rows
                self._buffer.add(table)
            elif not self._finished:
                return None
            else:
                # The epoch's size is known: cut the rest so every rank gets as many batches.
                self._tail = collections.deque(tail_sizes(len(self._buffer), self.emitted, self.batch_size, self.world_size))
        return self._draw(self._tail.popleft()) if self._tail else None

    def _draw(self, size: int) -> Candidates:
        self.emitted += 1
        return self._buffer.draw(size)

    def pop_ready(self) -> list[Candidates]:
        """Every super-batch the rows added so far make."""
        out = []
        while (candidates := self.next()) is not None:
            out.append(candidates)
        return out
