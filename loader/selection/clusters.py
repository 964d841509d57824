"""Online clusters of reference embeddings: the bandit's arms.

Cosine geometry: embeddings are cast to float32 and scaled to unit length (`unit_rows`) before
anything else, so a cluster groups samples by direction and distances are chord distances in
[0, 2]. Centroids are means of unit vectors and so lie inside the sphere; distances to them are
plain Euclidean, as k-means defines them.

The centroids are updated with scikit-learn's `MiniBatchKMeans.partial_fit`. Two things the caller
relies on are not what that class does by itself, and are arranged here:

- Stable ids. A sample's cluster id is cached in the pool and must keep meaning the same centroid,
  across calls and restarts. MiniBatchKMeans's random reassignment of small clusters would move a
  centroid elsewhere under the same id, so it is switched off (`reassignment_ratio=0`); ids only
  ever grow by appending.
- Growth. MiniBatchKMeans has a fixed number of clusters. A larger one is built with the current
  centroids as `init` and primed with one `partial_fit` on the centroids themselves, weighted by
  their member counts: each centroid is its own nearest point, so it stays put and its count is
  restored, and the per-centroid learning rate (1 / members) goes on where it was. The same
  rebuild restores a saved state. New centroids start with count 0, so their first members
  replace the seed point instead of being averaged with it.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import numpy.typing as npt
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import ThreadpoolController

from loader.selection.diversity import unit_rows

__all__ = ["OnlineClusters"]

# Auto threshold for opening a cluster, in multiples of the median distance of a sample to its
# nearest centroid. Embeddings are high-dimensional, where distances to a centroid concentrate
# around their median; 2.5 medians out is a different group rather than a cluster's tail.
_FIRST_DISTANCE = 0.5  # between unit vectors: cosine similarity below 0.875
_AUTO_FACTOR = 2.5
# The warm start measures that median on a fit of up to `max_clusters` centroids, with at least
# this many samples each: an in-sample spread of fewer members per centroid is biased low.
_SCALE_MEMBERS = 20

_threadpools: ThreadpoolController | None = None


def _single_threaded() -> contextlib.AbstractContextManager[object]:
    """Limits BLAS and OpenMP to one thread for a block.

    The products here are small (a batch against at most `max_clusters` centroids), so threads do
    not pay; worse, the OpenMP threads of MiniBatchKMeans and the OpenBLAS threads of numpy's own
    products busy-wait against each other between calls, which measured 10-100x slower on a busy
    machine. MiniBatchKMeans limits BLAS itself for the same reason, but not OpenMP.
    """
    global _threadpools
    if _threadpools is None:
        # Created after sklearn is imported, so that it sees the OpenMP runtime sklearn loaded.
        _threadpools = ThreadpoolController()
    return _threadpools.limit(limits=1)


class OnlineClusters:
    """Online mini-batch k-means over unit embeddings, with stable ids 0..K-1 that only grow.

    - The first `assign` warm-starts: a full MiniBatchKMeans fit of `init_clusters` clusters on
      that call's embeddings, which should hold at least `init_clusters` distinct points (a
      shard's worth, say). With fewer distinct points each becomes a cluster of its own. When
      those embeddings hold groups far from all of the fit's centroids, the warm start opens a
      cluster per group as later calls do (below), then fits again: it may end with more than
      `init_clusters`, up to `max_clusters`.
    - Later calls first open clusters for points farther than `new_cluster_distance` from every
      centroid, one per far-away group: a centroid near the farthest point (the mean of the
      points it would take over), then one near the farthest point still too far, and so on
      while the cap `max_clusters` allows. Then the centroids are updated with `partial_fit` in
      steps of `batch_size`.
    - `new_cluster_distance=None` means `_AUTO_FACTOR` times the median point-to-nearest-centroid
      distance seen so far (a count-weighted mean of each call's median, measured after opening
      clusters and before updating the centroids). The warm start's median is measured on a fit
      of as many clusters as the cap allows (at most one per `_SCALE_MEMBERS` points), so that
      it is a cluster's spread even when `init_clusters` is too few for the groups present.
      Until a median is known, `_FIRST_DISTANCE` stands in.
    """

    def __init__(
        self,
        max_clusters: int = 32,
        init_clusters: int = 8,
        new_cluster_distance: float | None = None,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("max_clusters", max_clusters),
            ("init_clusters", init_clusters),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if init_clusters > max_clusters:
            raise ValueError(f"init_clusters ({init_clusters}) exceeds max_clusters ({max_clusters})")
        if new_cluster_distance is not None and not (
            math.isfinite(new_cluster_distance) and new_cluster_distance > 0
        ):
            raise ValueError(
                f"new_cluster_distance must be positive and finite or None, got {new_cluster_distance!r}"
            )
        self.max_clusters = int(max_clusters)
        self.init_clusters = int(init_clusters)
        self.new_cluster_distance = None if new_cluster_distance is None else float(new_cluster_distance)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.reset()

    def reset(self, state: dict[str, np.ndarray] | None = None) -> None:
        """No clusters (state None) or as saved by `get_state`, for clusters built with the same
        arguments (which the state repeats, and which are checked: centroids and counts fitted
        under one cap or batch size do not continue under another)."""
        # float64 for the model: member counts stay exact past 2**24 samples. Predictions use a
        # float32 copy, like the embeddings.
        self._centroids = np.zeros((0, 0))
        self._centroids32 = np.zeros((0, 0), np.float32)
        self._counts = np.zeros(0)
        self._model: MiniBatchKMeans | None = None
        self._median_sum = 0.0
        self._median_weight = 0.0
        if state is None:
            return
        for key, value in self._arguments().items():
            if not np.array_equal(state[key], value, equal_nan=True):
                raise ValueError(f"state saved with {key}={state[key]}, these clusters have {value}")
        centroids = np.asarray(state["centroids"], np.float64)
        counts = np.asarray(state["counts"], np.float64)
        if centroids.ndim != 2 or counts.shape != (len(centroids),) or len(centroids) > self.max_clusters:
            raise ValueError(f"inconsistent state: centroids {centroids.shape}, counts {counts.shape}")
        self._median_sum = float(state["median_sum"])
        self._median_weight = float(state["median_weight"])
        # No random generator to save: every MiniBatchKMeans here gets the integer seed, and with
        # reassignment off and array inits, partial_fit draws no random numbers.
        if len(centroids):
            with _single_threaded():
                self._rebuild(centroids, counts)

    @property
    def num_clusters(self) -> int:
        return len(self._centroids)

    @property
    def centroids(self) -> np.ndarray:
        """float32 [K, d], row i the centroid of cluster id i (a copy)."""
        return self._centroids32.copy()

    @property
    def counts(self) -> np.ndarray:
        """float64 [K]: samples each centroid has absorbed (its inverse learning rate)."""
        return self._counts.copy()

    @property
    def threshold(self) -> float:
        """The distance beyond which a point opens a cluster now (inf: none would)."""
        if self.new_cluster_distance is not None:
            return self.new_cluster_distance
        if self._median_weight == 0:
            # Nothing measured yet (the first points were few and each got its own centroid): a
            # fixed distance between unit vectors stands in, so later points can still open
            # clusters instead of all joining those first few.
            return _FIRST_DISTANCE
        return _AUTO_FACTOR * self._median_sum / self._median_weight

    def assign(self, embeddings: npt.ArrayLike) -> np.ndarray:
        """int32 [n] cluster ids, after opening clusters for far points and updating centroids.

        The ids are the nearest centroids after the update, so `predict` right afterwards agrees.
        """
        x = self._prepare(embeddings)
        if len(x) == 0:
            return np.zeros(0, np.int32)
        with _single_threaded():
            if self._model is None:
                self._warm_start(x)
            else:
                _, dist = _nearest(x, self._centroids32)
                dist = self._open(x, dist)
                self._record(dist)
                self._update(x)
            return _nearest(x, self._centroids32)[0]

    def predict(self, embeddings: npt.ArrayLike) -> np.ndarray:
        """int32 [n] ids of the nearest centroids; changes nothing."""
        if self._model is None:
            raise RuntimeError("no clusters yet: assign() some embeddings first")
        x = self._prepare(embeddings)
        with _single_threaded():
            return _nearest(x, self._centroids32)[0]

    def get_state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume, as plain numpy arrays (np.savez can store it)."""
        return {
            **self._arguments(),
            "centroids": self._centroids.copy(),
            "counts": self._counts.copy(),
            "median_sum": np.array(self._median_sum, np.float64),
            "median_weight": np.array(self._median_weight, np.float64),
        }

    def _arguments(self) -> dict[str, np.ndarray]:
        return {
            "max_clusters": np.array(self.max_clusters, np.int64),
            "init_clusters": np.array(self.init_clusters, np.int64),
            # NaN: automatic.
            "new_cluster_distance": np.array(
                np.nan if self.new_cluster_distance is None else self.new_cluster_distance, np.float64
            ),
            "batch_size": np.array(self.batch_size, np.int64),
            "seed": np.array(self.seed, np.int64),
        }

    def _prepare(self, embeddings: npt.ArrayLike) -> np.ndarray:
        x = unit_rows(embeddings)
        if self._model is not None and len(x) and x.shape[1] != self._centroids.shape[1]:
            raise ValueError(
                f"embeddings have dimension {x.shape[1]}, the clusters {self._centroids.shape[1]}"
            )
        return x

    def _warm_start(self, x: np.ndarray) -> None:
        distinct, multiplicity = np.unique(x, axis=0, return_counts=True)
        k = min(self.init_clusters, len(distinct))
        # The median that scales "far" is measured on the finest fit the cap allows, not on the
        # `k` centroids kept: when the data holds more groups than k, each of those centroids
        # lies between several groups, the median is then the distance between groups, and 2.5
        # times it is beyond every sample, so no cluster would ever open (measured: 20 groups
        # warm-started with 8 gave a threshold of 2.0 where the farthest sample was at 0.98).
        fine = min(self.max_clusters, len(distinct) // _SCALE_MEMBERS)
        if fine > k:
            self._record(_nearest(x, self._fit(x, distinct, multiplicity, fine)[0].astype(np.float32))[1])
        centroids, counts = self._fit(x, distinct, multiplicity, k)
        if fine <= k and len(distinct) > k:
            # In-sample distances, but the only ones there are. With a centroid on every distinct
            # point they would all be 0, and a threshold of 0 would open a cluster per point.
            self._record(_nearest(x, centroids.astype(np.float32))[1])
        # More far-apart groups than k: the k centroids would sit between groups and, once every
        # group opened a cluster of its own, stay there with no members but this call's. So the
        # warm start opens those clusters itself, drops the centroids left without members, and
        # fits again from the rest (no id is handed out yet, so none has to stay).
        seeds, _ = self._seeds(x, _nearest(x, centroids.astype(np.float32))[1], self.max_clusters - k)
        if seeds:
            start = np.vstack([centroids, np.asarray(seeds, np.float64)])
            start = start[np.unique(_nearest(x, start.astype(np.float32))[0])]
            centroids, counts = self._fit(x, distinct, multiplicity, len(start), init=start)
        self._rebuild(centroids, counts)

    def _fit(
        self, x: np.ndarray, distinct: np.ndarray, multiplicity: np.ndarray, k: int, init: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(centroids, member counts) of `k` clusters of x: a centroid per point if there are k."""
        if k >= len(distinct):
            return distinct.astype(np.float64), multiplicity.astype(np.float64)
        x64 = x.astype(np.float64)
        fit = MiniBatchKMeans(
            n_clusters=k, init="k-means++" if init is None else init, n_init=3 if init is None else 1,
            batch_size=self.batch_size, random_state=self.seed,
        ).fit(x64)  # fmt: skip
        counts = np.bincount(_nearest(x64, fit.cluster_centers_)[0], minlength=k).astype(np.float64)
        return fit.cluster_centers_, counts

    def _open(self, x: np.ndarray, dist: np.ndarray) -> np.ndarray:
        """Opens clusters for far points; returns each point's distance to its nearest centroid."""
        seeds, dist = self._seeds(x, dist, self.max_clusters - self.num_clusters)
        if seeds:
            self._rebuild(
                np.vstack([self._centroids, np.asarray(seeds, np.float64)]),
                np.concatenate([self._counts, np.zeros(len(seeds))]),
            )
        return dist

    def _seeds(self, x: np.ndarray, dist: np.ndarray, room: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Up to `room` new centroids, one per group of points farther than the threshold from
        every centroid, and each point's distance to its nearest centroid with them."""
        threshold = self.threshold
        seeds: list[np.ndarray] = []
        far = dist > threshold
        while len(seeds) < room and far.any():
            point = x[int(np.argmax(np.where(far, dist, -np.inf)))]
            # The farthest point is on its group's edge, where the group's far side can be more
            # than the threshold away and would open a second cluster; the mean of the points that
            # the edge point takes over is nearer the group's middle.
            to_point = _distances(x, point)
            centre = x[to_point < dist].mean(axis=0)
            seeds.append(centre)
            # Every point, not only the far ones: the distances feed the median too. The edge
            # point counts as covered even if its group is wide, so it is not picked again.
            dist = np.minimum(dist, np.minimum(to_point, _distances(x, centre)))
            far = dist > threshold
        return seeds, dist

    def _record(self, dist: np.ndarray) -> None:
        self._median_sum += float(np.median(dist)) * len(dist)
        self._median_weight += len(dist)

    def _update(self, x: np.ndarray) -> None:
        assert self._model is not None
        x64 = x.astype(np.float64)
        for start in range(0, len(x64), self.batch_size):
            step = x64[start : start + self.batch_size]
            # Counted here from the same centroids partial_fit assigns with (ties aside), rather
            # than read from MiniBatchKMeans's private counts.
            self._counts += np.bincount(
                _nearest(step, self._model.cluster_centers_)[0], minlength=self.num_clusters
            )
            self._model.partial_fit(step)
        self._set_centroids(self._model.cluster_centers_)

    def _rebuild(self, centroids: np.ndarray, counts: np.ndarray) -> None:
        model = MiniBatchKMeans(
            n_clusters=len(centroids),
            init=centroids,
            n_init=1,
            batch_size=self.batch_size,
            reassignment_ratio=0.0,
            compute_labels=False,
            random_state=self.seed,
        )
        model.partial_fit(centroids, sample_weight=counts)
        # The priming step computes c * w / w, which can be off by a rounding step.
        model.cluster_centers_[...] = centroids
        self._model = model
        self._counts = np.asarray(counts, np.float64).copy()
        self._set_centroids(model.cluster_centers_)

    def _set_centroids(self, centroids: np.ndarray) -> None:
        self._centroids = np.array(centroids, np.float64)
        self._centroids32 = self._centroids.astype(np.float32)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 id of the nearest centroid, Euclidean distance to it) per row of x."""
    if len(centroids) == 0:
        return np.zeros(len(x), np.int32), np.full(len(x), np.inf, x.dtype)
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one matrix product for all pairs.
    d2 = (centroids * centroids).sum(axis=1)[None, :] - 2.0 * (x @ centroids.T)
    ids = np.argmin(d2, axis=1)
    best = d2[np.arange(len(x)), ids] + (x * x).sum(axis=1)
    return ids.astype(np.int32), np.sqrt(np.maximum(best, 0.0))


def _distances(x: np.ndarray, point: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(((x - point) ** 2).sum(axis=1), 0.0))
