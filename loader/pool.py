"""Columnar per-sample metadata of the pool: one small numpy block per shard, no Python objects.

Payloads stream through the service and are never kept here; only what selection needs.
"""

from __future__ import annotations

import numpy as np

from loader.ids import row_of, shard_of


UNSEEN_LOSS_SMOOTHING = 0.1  # weight of each report's first-time losses in the moving averages


class UnknownSamples(ValueError):
    pass


class PoolIndex:
    def __init__(self) -> None:
        self.reset()

    def reset(self, state: dict[str, np.ndarray] | None = None) -> None:
        """Empty (state None) or as saved by `get_state`. Reference scores and embeddings are not
        state (the scorers keep them), so they are gone either way until `set_scores` again.

        A state written by an older version may hold "reported" (per-sample report counts,
        never read) and lack the per-cluster averages: both are fine."""
        # shard index -> learner loss per row (NaN: never reported)
        self._learner_loss: dict[int, np.ndarray] = {}
        # shard index -> the lowest learner loss ever reported per row (NaN: never reported): how
        # far the learner once got on the sample, a reference-free irreducible loss
        self._best_loss: dict[int, np.ndarray] = {}
        # shard index -> reference loss per row and embedding rows (float16 halves their memory;
        # cosine similarities and rankings do not need more precision)
        self._ref_loss: dict[int, np.ndarray] = {}
        self._embedding: dict[int, np.ndarray] = {}
        # Shards whose reference losses came from a reference since replaced: they serve until
        # the shard is read again and `set_scores` brings the new ones.
        self._stale: set[int] = set()
        # shard index -> cluster id per row (-1: not clustered)
        self._cluster: dict[int, np.ndarray] = {}
        self.feedback_samples = 0
        # The fallback learner loss of a sample never reported: a moving average of the losses
        # samples had when first reported, i.e. of samples the learner had not trained on. (The
        # mean over all reports falls towards 0 as the learner fits what it was served, which made
        # unseen samples look learned and stopped them being selected.)
        self._unseen_loss = float("nan")
        # The same moving average per cluster id, as a sum and a count of first-time losses, both
        # decayed by (1 - UNSEEN_LOSS_SMOOTHING) at each report that reaches the cluster: their
        # ratio weighs every sample alike within a report and recent reports more.
        self._cluster_loss_sum = np.zeros(0)
        self._cluster_loss_count = np.zeros(0)
        if state is None:
            return
        bounds = np.concatenate([[0], np.cumsum(state["rows"])])
        if bounds[-1] != len(state["learner_loss"]) or len(state["cluster"]) != bounds[-1]:
            raise ValueError(f"inconsistent pool state: {bounds[-1]} rows but {len(state['learner_loss'])} losses")
        for i, shard in enumerate(state["shards"].tolist()):
            part = slice(bounds[i], bounds[i + 1])
            self._learner_loss[shard] = state["learner_loss"][part].astype(np.float32)
            # A state saved before best losses were kept: the latest loss is the best known.
            best = state["best_loss"][part] if "best_loss" in state else state["learner_loss"][part]
            self._best_loss[shard] = best.astype(np.float32)
            if state["clustered"][i]:
                self._cluster[shard] = state["cluster"][part].astype(np.int32)
        self._unseen_loss = float(state["unseen_loss"])
        self._cluster_loss_sum = np.array(state.get("cluster_loss_sum", np.zeros(0)), np.float64)
        self._cluster_loss_count = np.array(state.get("cluster_loss_count", np.zeros(0)), np.float64)
        if self._cluster_loss_sum.shape != self._cluster_loss_count.shape:
            raise ValueError("inconsistent pool state: per-cluster loss sums and counts differ in length")
        self.feedback_samples = int(state["feedback_samples"])

    def ensure_shard(self, shard_index: int, rows: int) -> None:
        if shard_index not in self._learner_loss or len(self._learner_loss[shard_index]) != rows:
            self._learner_loss[shard_index] = np.full(rows, np.nan, dtype=np.float32)
            self._best_loss[shard_index] = np.full(rows, np.nan, dtype=np.float32)

    def __len__(self) -> int:
        return sum(len(v) for v in self._learner_loss.values())

    def check_ids(self, ids: np.ndarray) -> None:
        """Raises UnknownSamples naming the first id the pool does not hold."""
        ids = np.asarray(ids)
        for shard, at, rows in _by_shard(ids):
            block = self._learner_loss.get(shard)
            if block is None or (rows >= len(block)).any():
                bad = ids[at][0] if block is None else ids[at][rows >= len(block)][0]
                raise UnknownSamples(f"sample id {int(bad)} is not in the pool")

    def has_scores(self, shard_index: int) -> bool:
        """Whether the shard has reference scores from the current reference."""
        return shard_index in self._ref_loss and shard_index not in self._stale

    def reference_replaced(self) -> None:
        """Every shard's reference losses are from the old reference from now on (embeddings
        and clusters stay: they come from the model the service started with)."""
        self._stale = set(self._ref_loss)

    def set_scores(self, shard_index: int, ref_loss: np.ndarray, embedding: np.ndarray) -> None:
        rows = len(self._learner_loss[shard_index])
        if len(ref_loss) != rows or len(embedding) != rows:
            raise ValueError(f"shard {shard_index} has {rows} rows, got {len(ref_loss)} scores")
        self._ref_loss[shard_index] = np.asarray(ref_loss, dtype=np.float32)
        self._stale.discard(shard_index)
        self._embedding[shard_index] = np.asarray(embedding, dtype=np.float16)

    def has_clusters(self, shard_index: int) -> bool:
        return shard_index in self._cluster

    def set_clusters(self, shard_index: int, clusters: np.ndarray) -> None:
        self._cluster[shard_index] = np.asarray(clusters, dtype=np.int32)

    def cluster_of(self, ids: np.ndarray) -> np.ndarray:
        """Cluster id per sample; -1 for samples of shards not clustered (yet)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(len(ids), -1, dtype=np.int32)
        for shard, at, rows in _by_shard(ids):
            if shard in self._cluster:
                out[at] = self._cluster[shard][rows]
        return out

    def cluster_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Members per cluster id and their mean reference loss."""
        if not self._cluster:
            return np.zeros(0, np.int64), np.zeros(0)
        ids = np.concatenate(list(self._cluster.values()))
        sizes = np.bincount(ids[ids >= 0])
        # After a restart, reference scores return shard by shard as shards are read again.
        scored = [s for s in self._cluster if s in self._ref_loss]
        if not scored:
            return sizes, np.zeros(len(sizes))
        ids = np.concatenate([self._cluster[s] for s in scored])
        ref = np.concatenate([self._ref_loss[s] for s in scored])
        ok = ids >= 0
        counts = np.bincount(ids[ok], minlength=len(sizes))
        sums = np.bincount(ids[ok], weights=ref[ok], minlength=len(sizes))
        return sizes, np.divide(sums, counts, out=np.zeros(len(sizes)), where=counts > 0)

    def reference_loss(self, ids: np.ndarray) -> np.ndarray:
        return self._gather(self._ref_loss, ids)

    def embedding(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        first = self._embedding[int(shard_of(ids[0]))]
        out = np.empty((len(ids), first.shape[1]), dtype=first.dtype)
        for shard, at, rows in _by_shard(ids):
            out[at] = self._embedding[shard][rows]
        return out

    def unseen_learner_loss(self) -> float:
        return self._unseen_loss

    def fallback_learner_loss(self, ids: np.ndarray) -> np.ndarray:
        """float32 per id: the loss to assume for a sample never reported. Its cluster's moving
        average of first-time losses, or, for a sample without a cluster or of a cluster none of
        whose samples has been reported, `unseen_learner_loss()` (NaN before any report)."""
        clusters = self.cluster_of(ids)
        out = np.full(len(clusters), self._unseen_loss, dtype=np.float32)
        count = self._cluster_loss_count
        known = (clusters >= 0) & (clusters < len(count))
        known[known] = count[clusters[known]] > 0
        out[known] = self._cluster_loss_sum[clusters[known]] / count[clusters[known]]
        return out

    def record_losses(self, ids: np.ndarray, losses: np.ndarray) -> None:
        """Stores each sample's latest learner loss; validates everything before changing anything."""
        ids = np.asarray(ids, dtype=np.int64)
        losses = np.asarray(losses, dtype=np.float32)
        if ids.shape != losses.shape or ids.ndim != 1:
            raise ValueError(f"ids and losses must be 1-d of equal length, got {ids.shape} and {losses.shape}")
        if not np.isfinite(losses).all():
            raise ValueError("losses must be finite (got NaN or infinity)")
        self.check_ids(ids)
        reported = len(ids)
        if len(np.unique(ids)) != len(ids):  # coalesced reports may name a sample twice: newest wins
            last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]
            ids, losses = ids[last], losses[last]
        first_clusters, first_losses = [], []
        for shard, at, where in _by_shard(ids):
            block, mine = self._learner_loss[shard], losses[at]
            first = np.isnan(block[where])
            if first.any():
                fresh = float(mine[first].mean())
                a = UNSEEN_LOSS_SMOOTHING
                self._unseen_loss = fresh if np.isnan(self._unseen_loss) else (1 - a) * self._unseen_loss + a * fresh
                if shard in self._cluster:
                    first_clusters.append(self._cluster[shard][where[first]])
                    first_losses.append(mine[first])
            block[where] = mine
            best = self._best_loss[shard]
            best[where] = np.fmin(best[where], mine)  # fmin: NaN (never reported) gives way
        if first_clusters:
            self._add_cluster_losses(np.concatenate(first_clusters), np.concatenate(first_losses))
        self.feedback_samples += reported

    def _add_cluster_losses(self, clusters: np.ndarray, losses: np.ndarray) -> None:
        ok = clusters >= 0
        clusters, losses = clusters[ok], losses[ok]
        if not len(clusters):
            return
        k = max(len(self._cluster_loss_sum), int(clusters.max()) + 1)
        sums = np.bincount(clusters, weights=losses, minlength=k)
        counts = np.bincount(clusters, minlength=k).astype(np.float64)
        decay = np.where(counts > 0, 1 - UNSEEN_LOSS_SMOOTHING, 1.0)
        # A cluster's first report decays nothing but zeros, so it sets the average outright.
        self._cluster_loss_sum = _padded(self._cluster_loss_sum, k) * decay + UNSEEN_LOSS_SMOOTHING * sums
        self._cluster_loss_count = _padded(self._cluster_loss_count, k) * decay + UNSEEN_LOSS_SMOOTHING * counts

    def learner_loss(self, ids: np.ndarray) -> np.ndarray:
        return self._gather(self._learner_loss, ids)

    def best_learner_loss(self, ids: np.ndarray) -> np.ndarray:
        """float32 per id: the lowest loss ever reported for it (NaN: never reported)."""
        return self._gather(self._best_loss, ids)

    @staticmethod
    def _gather(columns: dict[int, np.ndarray], ids: np.ndarray, fill=np.nan, dtype=np.float32) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(len(ids), fill, dtype=dtype)
        for shard, at, rows in _by_shard(ids):
            out[at] = columns[shard][rows]
        return out

    def get_state(self) -> dict[str, np.ndarray]:
        """Learner losses and cluster ids as flat arrays (np.savez can store them). Reference
        scores are left out: the scorers keep those, once per shard, for every job."""
        shards = sorted(self._learner_loss)
        blank = np.zeros(0, np.int32)
        return {
            "shards": np.array(shards, np.int64),
            "rows": np.array([len(self._learner_loss[s]) for s in shards], np.int64),
            "learner_loss": np.concatenate([self._learner_loss[s] for s in shards] or [np.zeros(0, np.float32)]),
            "best_loss": np.concatenate([self._best_loss[s] for s in shards] or [np.zeros(0, np.float32)]),
            "clustered": np.array([s in self._cluster for s in shards], bool),
            "cluster": np.concatenate([self._cluster.get(s, np.full(len(self._learner_loss[s]), -1, np.int32))
                                       for s in shards] or [blank]),  # fmt: skip
            "unseen_loss": np.array(self._unseen_loss, np.float64),
            "cluster_loss_sum": self._cluster_loss_sum.copy(),
            "cluster_loss_count": self._cluster_loss_count.copy(),
            "feedback_samples": np.array(self.feedback_samples, np.int64),
        }


def _padded(values: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    out[: len(values)] = values
    return out


def _by_shard(ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(shard, positions in ids, rows) per shard the ids name, shards ascending, positions ascending.

    One stable sort instead of a comparison over every id per shard: a super-batch drawn late in
    a long epoch spans a dozen shards or more, and every pool lookup of a batch goes through here.
    """
    shards, rows = shard_of(ids), row_of(ids)
    if not len(shards):
        return []
    if shards[0] == shards[-1] and (shards == shards[0]).all():
        return [(int(shards[0]), np.arange(len(shards)), rows)]
    order = np.argsort(shards, kind="stable")
    ordered = shards[order]
    cuts = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist(), len(order)]
    return [(int(ordered[a]), order[a:b], rows[order[a:b]]) for a, b in zip(cuts[:-1], cuts[1:])]
