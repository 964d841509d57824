"""A pool that stays within a sample budget by pruning permanently, cluster by cluster.

A lifelong pool keeps receiving shards; memory and the pool's later selection work grow with
what it holds, so it is capped at `max_samples` and what goes over is dropped for good. Dropping
the globally least valuable samples would let one large, easy cluster crowd out a small, rare
one, which is exactly what a lifelong learner must not forget. So, as Adapt-inf does, the budget
is split across clusters first, and each cluster is pruned within its share:

1. `split_budget`: water-filling. Every cluster gets an equal share; a cluster smaller than its
   share keeps all its members and its unused share goes to the others. The quotas sum to
   min(budget, total) and never exceed a cluster's size. The shares of the clusters that are cut
   differ by at most one sample; the odd samples go to the lowest cluster ids.
2. `prune_cluster`: within a cluster over its quota, near-duplicates go first (as in SemDeDup:
   a copy teaches nothing its original does not), then the least valuable samples.

The duplicate rule ("leader" rule). Members are ranked best first: higher `value`, then lower
id. Walking that order, a member is a *duplicate* if its cosine similarity to some earlier
*leader* (a member that was not itself a duplicate) is >= `dup_threshold`; otherwise it is a
leader. Hence leaders are pairwise below the threshold, and every duplicate has a leader of at
least its own value that is at least that similar to it: pruning duplicates never removes the
last sample of a near-copy group. (SemDeDup's own rule compares with every earlier member, dropped
ones included, so a chain a~b~c loses c although c is not near a; the exact greedy "drop the
most similar member, update, repeat" needs the similarity graph held or recomputed. The leader
rule needs only one pass over blocks, compared with the leaders found so far.) When a cluster
has more duplicates than it must drop, the most similar ones (to their nearest earlier leader) go
first, lowest rank breaking ties; if dropping every duplicate is not enough, the lowest-ranked
remaining members go ("low_value"). A cluster ends exactly at its quota.

`PoolBudget` is the stateful part: it assigns each admitted sample a cluster with its own
`OnlineClusters` (fixed at admission, as the pool caches cluster ids, so ids stay meaningful),
and holds only what it keeps (ids, unit float32 embeddings, values, cluster ids), so its memory
is bounded by `max_samples` between calls; an id it pruned is not remembered, and admitting it
again admits it as new. Its state follows the project's contract: `get_state()` gives flat numpy
arrays, `reset(state=None)` builds it afresh or as saved, one path for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

from loader.selection.diversity import unit_rows

if TYPE_CHECKING:
    from loader.selection.clusters import OnlineClusters

__all__ = ["NEAR_DUPLICATE", "LOW_VALUE", "Pruned", "PoolBudget", "prune_cluster", "split_budget"]

NEAR_DUPLICATE = "near_duplicate"
LOW_VALUE = "low_value"
_REASON_DTYPE = np.dtype("<U14")  # fits both reasons; fixed so that empty results compare alike

# Members per block of the duplicate pass. A block is compared with the leaders found so far in
# float32, [block, _LEADER_CHUNK] products at a time (4 MB), where a full n x n float64
# similarity matrix for a 20k cluster would be 3.2 GB. Measured on 20k distinct members, d=64,
# one thread: 0.6-0.8 s for every block of 256-1024 and chunk of 1024-8192 tried, differences
# within noise; these keep each product at 4 MB.
_BLOCK = 512
_LEADER_CHUNK = 2048
# float32 products of unit vectors carry rounding error of a few ulps per coordinate, so an exact
# copy can score just below 1. Without this slack a threshold of 1.0 could miss exact copies.
_SLACK = 1e-5
# Warm start of the clusterer, as the Selector does: up to 8 clusters, never more than the cap.
_INIT_CLUSTERS = 8

_threadpools: ThreadpoolController | None = None


def _single_threaded_blas() -> contextlib.AbstractContextManager[object]:
    """Limits BLAS to one thread for the duplicate pass.

    Its products are many and mid-sized, where OpenBLAS threads spend their time spinning
    between calls: on 2 shared cores, 20k distinct members took 1.8-13 s with the default
    threads and 0.6-0.8 s with one (the clusterer limits its products for the same reason).
    """
    global _threadpools
    if _threadpools is None:
        _threadpools = ThreadpoolController()
    return _threadpools.limit(limits=1, user_api="blas")


@dataclasses.dataclass(frozen=True, eq=False)
class Pruned:
    """What one `admit` pruned: int64 ids and, for each, why ("near_duplicate" or "low_value").

    Ordered by cluster id, and within a cluster in the order the samples were dropped.
    """

    ids: np.ndarray
    reasons: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def split_budget(sizes: npt.ArrayLike, budget: int) -> np.ndarray:
    """int64 quotas per cluster: `budget` split equally, with a small cluster's unused share
    going to the others (water-filling). Sum = min(budget, sizes.sum()), quota <= size."""
    sizes = _check_int_vector(sizes, "sizes")
    if (sizes < 0).any():
        raise ValueError("sizes must be non-negative")
    budget = _check_count(budget, "budget")
    k = len(sizes)
    if k == 0:
        return np.zeros(0, np.int64)
    if budget >= sizes.sum():
        return sizes.copy()
    # Ascending sizes, ties by cluster id. Walking them, cluster j keeps all its members while its
    # size s fits the equal share of what is left, s <= R // m, i.e. s * m <= R (s integer). That
    # share never shrinks as small clusters are taken out, and sizes grow along the walk, so the
    # first cluster that does not fit marks where every remaining one is cut.
    order = np.argsort(sizes, kind="stable")
    ascending = sizes[order]
    left = budget - np.concatenate([[0], np.cumsum(ascending)[:-1]])
    remaining = k - np.arange(k)
    cut = np.flatnonzero(ascending * remaining > left)
    first = int(cut[0])  # exists: the budget is below the total
    quotas = sizes.copy()
    level, odd = divmod(int(left[first]), int(remaining[first]))
    cut_ids = np.sort(order[first:])
    quotas[cut_ids] = level
    # Each cut cluster holds more than `level`, so one more sample still fits in it.
    quotas[cut_ids[:odd]] += 1
    return quotas


def prune_cluster(
    ids: npt.ArrayLike,
    embeddings: npt.ArrayLike,
    value: npt.ArrayLike,
    keep: int,
    dup_threshold: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prunes one cluster to `keep` members: (kept ids in input order, dropped ids in the order
    dropped, their reasons as a str array). Near-duplicates by the leader rule go first (module
    docstring), then the least valuable (lowest `value`; at equal value the larger id)."""
    ids = _check_ids(ids, "ids")
    x = unit_rows(embeddings, "embeddings")
    if len(x) != len(ids):
        raise ValueError(f"embeddings have {len(x)} rows for {len(ids)} ids")
    value = _check_values(value, len(ids), "value")
    keep = _check_count(keep, "keep")
    dup_threshold = _check_threshold(dup_threshold)
    drop, reasons = _prune_positions(x, value, ids, keep, dup_threshold)
    kept = np.ones(len(ids), bool)
    kept[drop] = False
    return ids[kept], ids[drop], reasons


class PoolBudget:
    """A pool of at most `max_samples` samples, pruned cluster-wise when an admit overflows it.

    Between calls it holds only kept samples: ids, unit float32 embeddings, values and cluster
    ids, plus the clusterer's centroids (at most `max_clusters`). An admit holds its own shard
    on top while it prunes.
    """

    def __init__(
        self, max_samples: int, max_clusters: int = 16, seed: int = 0, dup_threshold: float = 0.95
    ) -> None:
        self.max_samples = _check_count(max_samples, "max_samples")
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer, got {max_samples!r}")
        self.max_clusters = _check_count(max_clusters, "max_clusters")
        if self.max_clusters < 1:
            raise ValueError(f"max_clusters must be a positive integer, got {max_clusters!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.dup_threshold = _check_threshold(dup_threshold)
        self.reset()

    # -- state -----------------------------------------------------------------------------------

    def reset(self, state: dict[str, np.ndarray] | None = None) -> None:
        """Empty (state None) or as saved by `get_state`, for a PoolBudget built with the same
        arguments (which the state repeats, and which are checked: a pool pruned to one budget or
        threshold does not continue under another)."""
        # scikit-learn is imported only by a pool that is built, not by split_budget's users.
        from loader.selection.clusters import OnlineClusters

        if state is not None:
            for key, expected in self._arguments().items():
                if key not in state:
                    raise ValueError(f"state has no {key!r}: not saved by PoolBudget.get_state")
                if not np.array_equal(state[key], expected):
                    raise ValueError(f"state saved with {key}={state[key]}, this PoolBudget has {expected}")
        saved = state or {}
        # Built aside and swapped in at the end, so that a state refused halfway leaves the pool
        # as it was.
        clusters = OnlineClusters(
            max_clusters=self.max_clusters, init_clusters=min(_INIT_CLUSTERS, self.max_clusters), seed=self.seed
        )
        clusters.reset(
            {k.partition(".")[2]: v for k, v in saved.items() if k.startswith("clusters.")} if state else None
        )
        dim = int(saved.get("dim", -1))  # -1: no embeddings seen yet
        ids = np.asarray(saved.get("ids", np.zeros(0, np.int64)), np.int64).copy()
        emb = np.asarray(saved.get("embeddings", np.zeros((0, max(dim, 0)), np.float32)), np.float32).copy()
        value = np.asarray(saved.get("value", np.zeros(0)), np.float64).copy()
        cluster = np.asarray(saved.get("cluster", np.zeros(0, np.int32)), np.int32).copy()
        n = len(ids)
        if (
            ids.ndim != 1
            or n > self.max_samples
            or (n > 1 and not (np.diff(ids) > 0).all())
            or emb.shape != (n, max(dim, 0))
            or value.shape != (n,)
            or cluster.shape != (n,)
            or (n and (cluster.min() < 0 or cluster.max() >= clusters.num_clusters))
        ):
            raise ValueError(
                f"inconsistent state: ids {ids.shape}, embeddings {emb.shape}, "
                f"value {value.shape}, cluster {cluster.shape}"
            )
        self._clusters: OnlineClusters = clusters
        self._dim, self._ids, self._emb, self._value, self._cluster = dim, ids, emb, value, cluster

    def get_state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume, as plain numpy arrays (np.savez can store it)."""
        state = {
            **self._arguments(),
            "dim": np.array(self._dim, np.int64),
            "ids": self._ids.copy(),
            "embeddings": self._emb.copy(),
            "value": self._value.copy(),
            "cluster": self._cluster.copy(),
        }
        state.update({f"clusters.{k}": v for k, v in self._clusters.get_state().items()})
        return state

    def _arguments(self) -> dict[str, np.ndarray]:
        return {
            "max_samples": np.array(self.max_samples, np.int64),
            "max_clusters": np.array(self.max_clusters, np.int64),
            "seed": np.array(self.seed, np.int64),
            "dup_threshold": np.array(self.dup_threshold, np.float64),
        }

    # -- reading ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def kept_ids(self) -> np.ndarray:
        """int64 ids held now, ascending (a copy)."""
        return self._ids.copy()

    def cluster_sizes(self) -> np.ndarray:
        """int64 [K]: kept samples per cluster id, for every cluster the clusterer has opened."""
        return np.bincount(self._cluster, minlength=self._clusters.num_clusters).astype(np.int64)

    # -- changing --------------------------------------------------------------------------------

    def admit(self, ids: npt.ArrayLike, embeddings: npt.ArrayLike, value: npt.ArrayLike) -> Pruned:
        """Adds samples (new ids), then, if the pool holds more than `max_samples`, prunes every
        cluster over its quota (old and new members alike). Returns what was pruned."""
        ids = _check_ids(ids, "ids")
        x = unit_rows(embeddings, "embeddings")
        if len(x) != len(ids):
            raise ValueError(f"embeddings have {len(x)} rows for {len(ids)} ids")
        if len(ids) and x.shape[1] < 1:
            raise ValueError("embeddings must have at least one column")
        if len(ids) and self._dim >= 0 and x.shape[1] != self._dim:
            raise ValueError(f"embeddings have dimension {x.shape[1]}, the pool holds {self._dim}")
        value = _check_values(value, len(ids), "value")
        known = np.isin(ids, self._ids)
        if known.any():
            raise ValueError(f"ids already kept: {ids[known][:5].tolist()}")
        if len(ids) == 0:
            return _empty_pruned()
        # Everything is checked before the clusterer learns from the shard: a refused admit must
        # leave no trace.
        cluster = self._clusters.assign(x)
        self._dim = x.shape[1]
        all_ids = np.concatenate([self._ids, ids])
        order = np.argsort(all_ids, kind="stable")
        self._ids = all_ids[order]
        self._emb = np.concatenate([self._emb.reshape(-1, self._dim), x])[order]
        self._value = np.concatenate([self._value, value])[order]
        self._cluster = np.concatenate([self._cluster, cluster])[order]
        if len(self._ids) <= self.max_samples:
            return _empty_pruned()
        return self._prune()

    def update_value(self, ids: npt.ArrayLike, value: npt.ArrayLike) -> None:
        """Sets the value of kept samples; ids not kept (pruned, or never admitted) are ignored."""
        ids = _check_ids(ids, "ids")
        value = _check_values(value, len(ids), "value")
        if len(self._ids) == 0:
            return
        at = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        found = self._ids[at] == ids
        self._value[at[found]] = value[found]

    def _prune(self) -> Pruned:
        sizes = self.cluster_sizes()
        quotas = split_budget(sizes, self.max_samples)
        by_cluster = np.argsort(self._cluster, kind="stable")
        ends = np.cumsum(sizes)
        drop_parts: list[np.ndarray] = []
        reason_parts: list[np.ndarray] = []
        for c in np.flatnonzero(sizes > quotas):
            members = by_cluster[ends[c] - sizes[c] : ends[c]]
            drop, reasons = _prune_positions(
                self._emb[members], self._value[members], self._ids[members], int(quotas[c]), self.dup_threshold
            )
            drop_parts.append(members[drop])
            reason_parts.append(reasons)
        dropped = np.concatenate(drop_parts)
        pruned = Pruned(ids=self._ids[dropped], reasons=np.concatenate(reason_parts).astype(_REASON_DTYPE))
        keep = np.ones(len(self._ids), bool)
        keep[dropped] = False
        # Fresh arrays, not views of the larger ones, so the memory of the overflow is released.
        self._ids, self._emb = self._ids[keep], self._emb[keep]
        self._value, self._cluster = self._value[keep], self._cluster[keep]
        return pruned


# -- the duplicate pass ----------------------------------------------------------------------------


def _prune_positions(
    x: np.ndarray, value: np.ndarray, ids: np.ndarray, keep: int, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(positions to drop in drop order, their reasons) for one cluster of unit rows x."""
    n = len(ids)
    excess = n - keep
    if excess <= 0:
        return np.zeros(0, np.intp), np.zeros(0, _REASON_DTYPE)
    # Best first: higher value, then lower id. rank[p] is position p's place in that order.
    order = np.lexsort((ids, -value))
    rank = np.empty(n, np.intp)
    rank[order] = np.arange(n)
    with _single_threaded_blas():
        duplicate, similarity = _leaders(x[order], threshold)
    dup_pos = order[duplicate]
    # Most similar first; at equal similarity the lower-ranked one.
    dup_pos = dup_pos[np.lexsort((-rank[dup_pos], -similarity[duplicate]))][:excess]
    dropped = np.zeros(n, bool)
    dropped[dup_pos] = True
    low_pos = order[::-1][~dropped[order[::-1]]][: excess - len(dup_pos)]
    reasons = np.array([NEAR_DUPLICATE] * len(dup_pos) + [LOW_VALUE] * len(low_pos), _REASON_DTYPE)
    return np.concatenate([dup_pos, low_pos]).astype(np.intp), reasons


def _leaders(xs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For unit rows in rank order: (is a duplicate, float32 similarity to the most similar
    earlier leader, -inf where there is none), by the leader rule of the module docstring.

    Block by block: a block's similarities to the leaders of earlier blocks are one product; the
    leaders within the block are then settled in order, but only members that have an earlier
    near neighbour in the block need the sequential step, and those are few unless the block is
    full of copies (then the first block holds their leader and later blocks need no step).
    """
    n, d = xs.shape
    cut = np.float32(threshold - _SLACK)
    duplicate = np.zeros(n, bool)
    similarity = np.full(n, -np.inf, np.float32)
    leaders = np.empty((n, d), np.float32)
    count = 0
    earlier = np.tril(np.ones((_BLOCK, _BLOCK), bool), k=-1)
    for start in range(0, n, _BLOCK):
        block = xs[start : start + _BLOCK]
        b = len(block)
        prior = np.full(b, -np.inf, np.float32)
        for lo in range(0, count, _LEADER_CHUNK):
            np.maximum(prior, (block @ leaders[lo : min(count, lo + _LEADER_CHUNK)].T).max(axis=1), out=prior)
        leader = prior < cut
        inner = block @ block.T
        near = (inner >= cut) & earlier[:b, :b] & leader[None, :]
        # Members with no earlier near neighbour that may be a leader are settled already.
        for i in np.flatnonzero(leader & near.any(axis=1)):
            # Rows before i are final here: either never in question or settled on an earlier pass.
            if (near[i, :i] & leader[:i]).any():
                leader[i] = False
        within = np.where(earlier[:b, :b] & leader[None, :], inner, -np.inf).max(axis=1)
        duplicate[start : start + b] = ~leader
        similarity[start : start + b] = np.maximum(prior, within)
        found = int(leader.sum())
        leaders[count : count + found] = block[leader]
        count += found
    return duplicate, similarity


# -- argument checks -------------------------------------------------------------------------------


def _empty_pruned() -> Pruned:
    return Pruned(ids=np.zeros(0, np.int64), reasons=np.zeros(0, _REASON_DTYPE))


def _check_int_vector(values: npt.ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _check_ids(ids: npt.ArrayLike, name: str) -> np.ndarray:
    a = _check_int_vector(ids, name)
    if len(np.unique(a)) != len(a):
        raise ValueError(f"{name} contain duplicates")
    return a


def _check_values(value: npt.ArrayLike, n: int, name: str) -> np.ndarray:
    a = np.asarray(value)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    if a.size and not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contain NaN or infinity")
    return a


def _check_count(count: int, name: str) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {count!r}")
    return int(count)


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (float, int, np.floating, np.integer)):
        raise ValueError(f"dup_threshold must be a number in (0, 1], got {threshold!r}")
    if not (math.isfinite(threshold) and 0 < threshold <= 1):
        raise ValueError(f"dup_threshold must be in (0, 1], got {threshold!r}")
    return float(threshold)
