"""Candidates waiting to be drawn, kept per cluster so a super-batch can be drawn by quota."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["ClusterBuffer", "distinct_picks"]


class ClusterBuffer:
    """Rows (int64 positions or sample ids) per cluster id, drawn uniformly without replacement.

    Every cluster's rows sit at the front of its own segment of one shared array. A draw picks
    positions at random and fills the holes they leave with survivors from the end of the
    segment (swap-remove), so it costs O(rows drawn), not O(rows held), and nothing is ever
    compacted row by row. One array instead of one per cluster lets a draw be a few numpy calls
    whatever the number of clusters: a super-batch drawn from 32 clusters cost 0.36 ms when each
    cluster was drawn on its own, most of the draw.
    """

    def __init__(self) -> None:
        self._store = np.empty(0, np.int64)  # every segment; what lies past a segment's count is free
        self._base = np.zeros(0, np.int64)  # per cluster: where its segment starts
        self._cap = np.zeros(0, np.int64)  # per cluster: its segment's length
        self._count = np.zeros(0, np.int64)  # per cluster: rows waiting, at the segment's front
        self._end = 0  # segments lie in [0, _end) of the store

    def __len__(self) -> int:
        return int(self._count.sum())

    @property
    def num_clusters(self) -> int:
        """Clusters known so far (ids 0..num_clusters-1), empty ones included."""
        return len(self._count)

    def counts(self) -> np.ndarray:
        """int64 [num_clusters]: rows waiting in each cluster."""
        return self._count.copy()

    def waiting(self) -> np.ndarray:
        """int64: every row waiting, in no particular order."""
        return self._store[_ranges(self._base, self._count)]

    def rows_in(self, cluster: int) -> np.ndarray:
        """The rows waiting in `cluster`, in the order they sit (a copy): the next draws depend on it."""
        start = int(self._base[cluster])
        return self._store[start : start + int(self._count[cluster])].copy()

    def add(self, cluster_ids: npt.ArrayLike, rows: npt.ArrayLike) -> None:
        ids = np.asarray(cluster_ids)
        values = np.asarray(rows)
        if ids.ndim != 1 or values.shape != ids.shape:
            raise ValueError(
                f"cluster_ids and rows must be 1-d of one length, got {ids.shape} and {values.shape}"
            )
        if len(ids) == 0:
            return
        for what, a in (("cluster_ids", ids), ("rows", values)):
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{what} must be integers, got {a.dtype}")
        if ids.min() < 0:
            raise ValueError("cluster_ids must be >= 0")
        ids, values = ids.astype(np.int64), values.astype(np.int64)
        self._grow(int(ids.max()) + 1)
        order = np.argsort(ids, kind="stable")
        sizes = np.bincount(ids, minlength=self.num_clusters)
        ends = np.cumsum(sizes)
        grouped = values[order]
        # One slice copy per cluster present, not per row (adds come once per shard table).
        for c in np.flatnonzero(sizes).tolist():
            self._append(c, grouped[ends[c] - sizes[c] : ends[c]])

    def draw(self, quotas: npt.ArrayLike, rng: np.random.Generator) -> np.ndarray:
        """int64 rows: quotas[c] drawn uniformly from cluster c and removed, grouped by cluster in
        increasing id order. Raises (and draws nothing) if a quota exceeds what its cluster holds."""
        q = np.asarray(quotas)
        if q.ndim != 1 or (q.size and not np.issubdtype(q.dtype, np.integer)) or (q < 0).any():
            raise ValueError("quotas must be a 1-d array of non-negative integers")
        q = q.astype(np.int64)
        have = np.zeros(len(q), np.int64)
        known = min(len(q), self.num_clusters)
        have[:known] = self._count[:known]
        short = np.flatnonzero(q > have)
        if len(short):
            c = int(short[0])
            raise ValueError(f"quota {int(q[c])} for cluster {c}, which holds {int(have[c])}")
        wanted = np.flatnonzero(q)
        if not len(wanted):
            return np.zeros(0, np.int64)
        q, n, base = q[wanted], self._count[wanted], self._base[wanted]
        picks = distinct_picks(n, q, rng)
        # Per pick: where its cluster's picks start among all picks, its cluster's segment start
        # and count after the draw.
        start = np.repeat(np.cumsum(q) - q, q)
        seg, keep = np.repeat(base, q), np.repeat(n - q, q)
        taken = self._store[seg + picks]
        # Holes below the new end are filled, in the order drawn, from the tail [keep, n) minus
        # what was picked there, in its order: per cluster as many rows as there are holes. The
        # tail of a cluster drawing q rows is q long, so it lines up with the cluster's picks.
        low = picks < keep
        survivor = np.ones(len(picks), bool)
        survivor[(start + picks - keep)[~low]] = False
        tail = seg + keep + (np.arange(len(picks)) - start)
        self._store[(seg + picks)[low]] = self._store[tail[survivor]]
        self._count[wanted] = n - q
        return taken

    def _grow(self, n: int) -> None:
        extra = n - self.num_clusters
        if extra > 0:
            self._base = np.concatenate([self._base, np.full(extra, self._end, np.int64)])
            self._cap = np.concatenate([self._cap, np.zeros(extra, np.int64)])
            self._count = np.concatenate([self._count, np.zeros(extra, np.int64)])

    def _append(self, c: int, values: np.ndarray) -> None:
        n = int(self._count[c])
        if n + len(values) > self._cap[c]:
            self._move(c, max(2 * int(self._cap[c]), n + len(values), 16))
        start = int(self._base[c]) + n
        self._store[start : start + len(values)] = values
        self._count[c] = n + len(values)

    def _move(self, c: int, cap: int) -> None:
        """Gives cluster c a segment of `cap` rows at the end of the store; its old segment is
        left behind. Segments only grow, each at least doubling (which keeps appends amortised
        O(rows added)), so what they leave behind is less than what they span now, and the store
        (itself doubled when full) stays within four times the room clusters took."""
        if self._end + cap > len(self._store):
            grown = np.empty(max(2 * len(self._store), self._end + cap, 64), np.int64)
            grown[: self._end] = self._store[: self._end]
            self._store = grown
        n, start = int(self._count[c]), int(self._base[c])
        self._store[self._end : self._end + n] = self._store[start : start + n]
        self._base[c], self._cap[c] = self._end, cap
        self._end += cap


def distinct_picks(n: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int64: for every group g, k[g] distinct positions drawn uniformly from [0, n[g]) in random
    order, the groups' picks one after another (0 <= k[g] <= n[g]).

    Sparse groups draw a stream of positions with replacement and keep the first k that are new:
    sequential sampling without replacement, so every ordered choice is equally likely. Dense
    ones (k > n / 2, where the stream would be long) sort n random keys instead.
    """
    n, k = np.asarray(n, np.int64), np.asarray(k, np.int64)
    out = np.empty(int(k.sum()), np.int64)
    first = np.cumsum(k) - k
    dense = 2 * k > n
    for part, picks in ((~dense & (k > 0), _sparse_picks), (dense, _dense_picks)):
        groups = np.flatnonzero(part)
        if len(groups):
            out[_ranges(first[groups], k[groups])] = picks(n[groups], k[groups], rng)
    return out


def _sparse_picks(n: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`distinct_picks` for groups with 1 <= k <= n / 2: per group a stream of positions drawn with
    replacement, long enough that it rarely holds fewer than k distinct ones (about k + k^2 / n
    draws are needed on average); a group whose stream falls short draws a longer one."""
    out = np.empty(int(k.sum()), np.int64)
    first = np.cumsum(k) - k
    todo, extra = np.arange(len(n)), 1.0
    while len(todo):
        gn, gk = n[todo], k[todo]
        m = gk + np.ceil(extra * (gk * gk / gn + 2 * np.sqrt(gk) + 2)).astype(np.int64)
        starts = np.cumsum(m) - m
        stream = _below(np.repeat(gn, m), rng)
        # A draw is new where no earlier draw of its group named its position: among equal keys
        # (group, position) a stable sort puts the earliest draw first.
        key = np.repeat(np.arange(len(todo), dtype=np.int64) * (int(gn.max()) + 1), m) + stream
        order = np.argsort(key, kind="stable")
        new = np.empty(len(key), bool)
        new[order[0]] = True
        new[order[1:]] = key[order[1:]] != key[order[:-1]]
        seen = np.cumsum(new)  # new draws up to and including each draw, over all groups
        before = seen[starts] - new[starts]  # ... before each group's first draw
        found = np.append(before[1:], seen[-1]) - before
        done = found >= gk
        keep = new & (seen - np.repeat(before, m) <= np.repeat(gk, m)) & np.repeat(done, m)
        out[_ranges(first[todo[done]], gk[done])] = stream[keep]
        todo, extra = todo[~done], 2 * extra
    return out


def _dense_picks(n: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The first k[g] of a random permutation of [0, n[g]) per group, groups one after another."""
    starts = np.repeat(np.cumsum(n) - n, n)
    # group + a random key in [0, 0.5): sorted by group, and within a group by the key (0.5, not
    # 1: the sum of a group and a key just below 1 could round up to the next group).
    order = np.argsort(np.repeat(np.arange(len(n), dtype=np.float64), n) + 0.5 * rng.random(int(n.sum())))
    place = np.arange(len(order)) - starts
    return (order - starts)[place < np.repeat(k, n)]


def _below(high: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniform integer in [0, high[i]) per i. floor(u * high) of a double u in [0, 1): one call
    where `Generator.integers` with an array of bounds costs ~25 ns a value; the bias, about
    high / 2^53, is far below anything a draw of a few thousand rows can show."""
    # min: u * high may round up to high itself for the largest u below 1.
    return np.minimum((rng.random(len(high)) * high).astype(np.int64), high - 1)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int64: start, start + 1, ..., start + length - 1 for every pair, one after another."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lengths)
    return np.arange(total) - np.repeat(ends - lengths, lengths) + np.repeat(np.asarray(starts, np.int64), lengths)
