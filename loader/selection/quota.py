"""Candidates waiting to be drawn, kept per cluster so a super-batch can be drawn by quota."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["ClusterBuffer"]


class ClusterBuffer:
    """Rows (int64 positions or sample ids) per cluster id, drawn uniformly without replacement.

    Each cluster's rows sit at the front of a growable array. A draw picks positions at random
    and fills the holes they leave with survivors from the end of the array (swap-remove), so it
    costs O(rows drawn), not O(rows held), and nothing is ever compacted.
    """

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []  # per cluster; capacity >= count
        self._count = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self._count.sum())

    @property
    def num_clusters(self) -> int:
        """Clusters known so far (ids 0..num_clusters-1), empty ones included."""
        return len(self._rows)

    def counts(self) -> np.ndarray:
        """int64 [num_clusters]: rows waiting in each cluster."""
        return self._count.copy()

    def waiting(self) -> np.ndarray:
        """int64: every row waiting, in no particular order."""
        held = [store[:n] for store, n in zip(self._rows, self._count.tolist()) if n]
        return np.concatenate(held) if held else np.zeros(0, np.int64)

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
        # One slice copy per cluster present, not per row.
        for c in np.flatnonzero(sizes):
            self._append(int(c), grouped[ends[c] - sizes[c] : ends[c]])

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
        # Python ints from one tolist(): a draw visits every cluster, and numpy scalars cost.
        out = [self._take(c, k, rng) for c, k in zip(wanted.tolist(), q[wanted].tolist())]
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _grow(self, n: int) -> None:
        extra = n - self.num_clusters
        if extra > 0:
            self._rows.extend(np.empty(0, np.int64) for _ in range(extra))
            self._count = np.concatenate([self._count, np.zeros(extra, np.int64)])

    def _append(self, c: int, values: np.ndarray) -> None:
        n, store = int(self._count[c]), self._rows[c]
        if n + len(values) > len(store):
            # Doubling keeps appends amortised O(rows added).
            grown = np.empty(max(2 * len(store), n + len(values), 16), np.int64)
            grown[:n] = store[:n]
            self._rows[c] = store = grown
        store[n : n + len(values)] = values
        self._count[c] = n + len(values)

    def _take(self, c: int, k: int, rng: np.random.Generator) -> np.ndarray:
        n, store = int(self._count[c]), self._rows[c]
        picks = rng.choice(n, size=k, replace=False)
        taken = store[picks]
        keep = n - k
        # Holes below the new end are filled, in the order drawn, from the tail [keep, n) minus
        # what was picked there, in its order (as many rows as there are holes).
        low = picks < keep
        if low.any():
            survivors = np.ones(k, dtype=bool)
            survivors[picks[~low] - keep] = False
            store[picks[low]] = store[keep:n][survivors]
        self._count[c] = keep
        return taken
