"""Columnar per-sample metadata of the pool: flat numpy columns over every row, no Python objects.

Payloads stream through the service and are never kept here; only what selection needs.

A sample's row sits at `start[shard] + row` in every per-row column. Selection looks up some
1,200 candidates spread over a dozen shards or more several times per batch, and the feedback
path twice per report, so every lookup is a few vectorised numpy operations over the ids, with
no per-shard loop.
"""

from __future__ import annotations

import numpy as np

from loader.ids import MAX_SHARDS, ROW_BITS, ROW_MASK, row_of, shard_of


UNSEEN_LOSS_SMOOTHING = 0.1  # weight of each report's first-time losses in the moving averages

# Smallest capacities, so that a pool of small shards does not reallocate for each one.
_MIN_ROWS = 1024
_MIN_SHARDS = 16

# Per-row columns and what a blank row holds: never reported, not scored, not clustered.
_ROW_BLANKS = {"_loss": np.nan, "_best": np.nan, "_ref": np.nan, "_cluster": -1, "_emb": 0}
_ROW_DTYPES = {"_loss": np.float32, "_best": np.float32, "_ref": np.float32, "_cluster": np.int32, "_emb": np.float16}
# Per-shard columns, their dtypes and what a shard not in the pool holds.
_SHARD_BLANKS = {
    "_start": (np.int64, -1), "_rows": (np.int64, 0),
    "_clustered": (bool, False), "_scored": (bool, False), "_stale": (bool, False),
}  # fmt: skip


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
        self._clear_layout(0)
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
        bounds = np.concatenate([[0], np.cumsum(state["rows"])]).astype(np.int64)
        if bounds[-1] != len(state["learner_loss"]) or len(state["cluster"]) != bounds[-1]:
            raise ValueError(f"inconsistent pool state: {bounds[-1]} rows but {len(state['learner_loss'])} losses")
        self._load_rows(state, bounds)
        self._unseen_loss = float(state["unseen_loss"])
        self._cluster_loss_sum = np.array(state.get("cluster_loss_sum", np.zeros(0)), np.float64)
        self._cluster_loss_count = np.array(state.get("cluster_loss_count", np.zeros(0)), np.float64)
        if self._cluster_loss_sum.shape != self._cluster_loss_count.shape:
            raise ValueError("inconsistent pool state: per-cluster loss sums and counts differ in length")
        self.feedback_samples = int(state["feedback_samples"])

    def _clear_layout(self, capacity: int) -> None:
        # Per shard index (the registry hands indices out densely, so a table up to the largest
        # one is small): where its rows start (-1: not in the pool), how many it has, and what it
        # was given. `_scored` includes stale shards: their reference losses came from a reference
        # since replaced, and serve until the shard is read again and `set_scores` brings new ones.
        for name, (dtype, blank) in _SHARD_BLANKS.items():
            setattr(self, name, np.full(_MIN_SHARDS, blank, dtype))
        # Per row: learner loss (NaN: never reported); the lowest learner loss ever reported (how
        # far the learner once got on the sample, a reference-free irreducible loss); reference
        # loss (NaN: shard not scored); cluster id (-1: not clustered); embedding (float16 halves
        # its memory; cosine similarities and rankings do not need more precision; its width is
        # set by the first `set_scores`). Rows up to `_end` are used; those a rewritten shard
        # left behind are garbage until the next compaction.
        capacity = max(capacity, _MIN_ROWS)
        for name, blank in _ROW_BLANKS.items():
            shape = (capacity, 0) if name == "_emb" else (capacity,)
            setattr(self, name, np.full(shape, blank, _ROW_DTYPES[name]))
        self._end = 0
        self._live = 0

    def _load_rows(self, state: dict[str, np.ndarray], bounds: np.ndarray) -> None:
        shards, rows, total = np.asarray(state["shards"], np.int64), np.diff(bounds), int(bounds[-1])
        clustered = np.asarray(state["clustered"], bool)
        self._clear_layout(total)
        self._fit_shards(int(shards.max()) + 1 if len(shards) else 0)
        self._start[shards], self._rows[shards], self._clustered[shards] = bounds[:-1], rows, clustered
        self._loss[:total] = state["learner_loss"]
        # A state saved before best losses were kept: the latest loss is the best known.
        self._best[:total] = state["best_loss"] if "best_loss" in state else state["learner_loss"]
        self._cluster[:total] = np.where(np.repeat(clustered, rows), state["cluster"], -1)
        self._end = self._live = total

    # -- layout ----------------------------------------------------------------------------------

    def _holds(self, shard_index: int) -> bool:
        return 0 <= shard_index < len(self._start) and self._start[shard_index] >= 0

    def _span(self, shard_index: int) -> slice:
        """The shard's rows in the per-row columns; KeyError for a shard not in the pool."""
        if not self._holds(shard_index):
            raise KeyError(shard_index)
        start = int(self._start[shard_index])
        return slice(start, start + int(self._rows[shard_index]))

    def _spans(self, shards: np.ndarray) -> np.ndarray:
        """Positions of all rows of `shards` (held ones), shard by shard, each in row order."""
        starts, rows = self._start[shards], self._rows[shards]
        # Entry k is row k - (rows of the shards before it) of its shard.
        return np.repeat(starts - (np.cumsum(rows) - rows), rows) + np.arange(int(rows.sum()))

    def _held_shards(self) -> np.ndarray:
        return np.flatnonzero(self._start >= 0)

    def _fit_shards(self, n: int) -> None:
        if n <= len(self._start):
            return
        more = max(len(self._start), n - len(self._start))  # at least doubles
        for name, (dtype, blank) in _SHARD_BLANKS.items():
            setattr(self, name, np.concatenate([getattr(self, name), np.full(more, blank, dtype)]))

    def _move_rows(self, keep: np.ndarray, capacity: int) -> None:
        """Fresh per-row columns of `capacity` rows, holding the rows at positions `keep` first."""
        for name, blank in _ROW_BLANKS.items():
            old = getattr(self, name)
            new = np.full((capacity, *old.shape[1:]), blank, old.dtype)
            new[: len(keep)] = old[keep]
            setattr(self, name, new)
        self._end = len(keep)

    def _append_rows(self, rows: int) -> int:
        """Where `rows` blank rows now start, at the end (capacity doubles: amortised O(1) a row)."""
        if self._end + rows > len(self._loss):
            self._move_rows(np.arange(self._end), max(2 * len(self._loss), self._end + rows))
        start, self._end = self._end, self._end + rows
        for name, blank in _ROW_BLANKS.items():
            getattr(self, name)[start : self._end] = blank
        return start

    def _drop_shard(self, shard_index: int) -> None:
        if not self._holds(shard_index):
            return
        self._live -= int(self._rows[shard_index])
        for name, (_, blank) in _SHARD_BLANKS.items():
            getattr(self, name)[shard_index] = blank
        # Without compaction a shard rewritten again and again would grow the columns without
        # bound. Compacting once the garbage outgrows the live rows copies no more rows than were
        # made garbage since the last compaction (amortised O(1) a row), and keeps the used rows
        # under twice the live ones, plus the shard being added.
        if self._end - self._live > self._live:
            self._compact()

    def _compact(self) -> None:
        shards = self._held_shards()
        rows = self._rows[shards]
        self._move_rows(self._spans(shards), max(2 * self._live, _MIN_ROWS))
        self._start[shards] = np.cumsum(rows) - rows

    def _fit_width(self, width: int) -> None:
        held = self._emb.shape[1]
        if width == held:
            return
        if held and self._scored.any():
            raise ValueError(f"the pool's embeddings have {held} dimensions, got {width}")
        self._emb = np.zeros((len(self._loss), width), np.float16)

    # -- shards ----------------------------------------------------------------------------------

    def ensure_shard(self, shard_index: int, rows: int) -> None:
        """Adds the shard's rows, blank, unless the pool holds it with this many rows already. A
        shard held with another row count was rewritten: its old rows were other samples, so it
        starts over without losses, reference scores or clusters."""
        if self._holds(shard_index) and self._rows[shard_index] == rows:
            return
        if not 0 <= shard_index < MAX_SHARDS:
            raise ValueError(f"shard index {shard_index} out of range [0, {MAX_SHARDS})")
        rows = int(rows)
        if rows < 0:
            raise ValueError(f"shard {shard_index} cannot have {rows} rows")
        self._drop_shard(shard_index)
        self._fit_shards(shard_index + 1)
        self._start[shard_index] = self._append_rows(rows)
        self._rows[shard_index] = rows
        self._live += rows

    def __len__(self) -> int:
        return self._live

    def has_scores(self, shard_index: int, rows: int | None = None) -> bool:
        """Whether the shard has reference scores from the current reference; with `rows`, for
        a shard of that many rows (read again with another count, it was rewritten, and
        `ensure_shard` will drop its scores)."""
        if rows is not None and (not self._holds(shard_index) or self._rows[shard_index] != rows):
            return False
        return self._holds(shard_index) and bool(self._scored[shard_index] and not self._stale[shard_index])

    def reference_replaced(self) -> None:
        """Every shard's reference losses are from the old reference from now on (embeddings
        and clusters stay: they come from the model the service started with)."""
        self._stale = self._scored.copy()

    def set_scores(self, shard_index: int, ref_loss: np.ndarray, embedding: np.ndarray) -> None:
        span = self._span(shard_index)
        rows = span.stop - span.start
        if len(ref_loss) != rows or len(embedding) != rows:
            raise ValueError(f"shard {shard_index} has {rows} rows, got {len(ref_loss)} scores")
        embedding = np.asarray(embedding, dtype=np.float16)
        if embedding.ndim != 2:
            raise ValueError(f"embeddings must be [rows, dimensions], got shape {embedding.shape}")
        self._fit_width(embedding.shape[1])
        self._ref[span] = np.asarray(ref_loss, dtype=np.float32)
        self._emb[span] = embedding
        self._scored[shard_index], self._stale[shard_index] = True, False

    def has_clusters(self, shard_index: int) -> bool:
        return self._holds(shard_index) and bool(self._clustered[shard_index])

    def set_clusters(self, shard_index: int, clusters: np.ndarray) -> None:
        span = self._span(shard_index)
        clusters = np.asarray(clusters, dtype=np.int32)
        if len(clusters) != span.stop - span.start:
            raise ValueError(f"shard {shard_index} has {span.stop - span.start} rows, got {len(clusters)} cluster ids")
        self._cluster[span] = clusters
        self._clustered[shard_index] = True

    def cluster_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Members per cluster id and their mean reference loss."""
        clustered = np.flatnonzero(self._clustered)
        if not len(clustered):
            return np.zeros(0, np.int64), np.zeros(0)
        ids = self._cluster[self._spans(clustered)]
        sizes = np.bincount(ids[ids >= 0])
        # After a restart, reference scores return shard by shard as shards are read again.
        scored = clustered[self._scored[clustered]]
        if not len(scored):
            return sizes, np.zeros(len(sizes))
        at = self._spans(scored)
        ids, ref = self._cluster[at], self._ref[at]
        ok = ids >= 0
        counts = np.bincount(ids[ok], minlength=len(sizes))
        sums = np.bincount(ids[ok], weights=ref[ok], minlength=len(sizes))
        return sizes, np.divide(sums, counts, out=np.zeros(len(sizes)), where=counts > 0)

    # -- lookups by sample id --------------------------------------------------------------------

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each id's position in the per-row columns, and whether the pool holds it (where it
        does not, the position is meaningless)."""
        shards, rows = shard_of(ids), row_of(ids)
        inside = (shards >= 0) & (shards < len(self._start))
        shards = np.where(inside, shards, 0)  # any entry will do: `inside` masks it out
        return self._start[shards] + rows, inside & (rows < self._rows[shards])

    def _flag(self, flags: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """A per-shard flag for each id; False for shards past the table."""
        shards = shard_of(ids)
        inside = (shards >= 0) & (shards < len(flags))
        return inside & flags[np.where(inside, shards, 0)]

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ids the pool must hold; else, for the first id it does not, the errors a
        dict of per-shard arrays gave: KeyError (shard not in the pool) or IndexError."""
        at, held = self._locate(ids)
        if not held.all():
            raise self._not_held(ids[~held][0])
        return at

    def _not_held(self, sample_id: int) -> LookupError:
        shard, row = int(sample_id) >> ROW_BITS, int(sample_id) & ROW_MASK
        if not self._holds(shard):
            return KeyError(shard)
        return IndexError(f"row {row} is past the end of shard {shard} ({int(self._rows[shard])} rows)")

    def check_ids(self, ids: np.ndarray) -> None:
        """Raises UnknownSamples naming the first id (in the order given) the pool does not hold."""
        self._checked_positions(np.asarray(ids, dtype=np.int64))

    def _checked_positions(self, ids: np.ndarray) -> np.ndarray:
        at, held = self._locate(ids)
        if not held.all():
            raise UnknownSamples(f"sample id {int(ids[~held][0])} is not in the pool")
        return at

    def cluster_of(self, ids: np.ndarray) -> np.ndarray:
        """Cluster id per sample; -1 for samples of shards not clustered (yet)."""
        ids = np.asarray(ids, dtype=np.int64)
        at, held = self._locate(ids)
        if held.all():
            return self._cluster[at]
        # Ids of shards not in the pool, or not clustered, have no cluster; a row past the end
        # of a clustered shard is an error, as it was.
        past_end = ~held & self._flag(self._clustered, ids)
        if past_end.any():
            raise self._not_held(ids[past_end][0])
        out = np.full(len(ids), -1, dtype=np.int32)
        out[held] = self._cluster[at[held]]
        return out

    def reference_loss(self, ids: np.ndarray) -> np.ndarray:
        """float32 per id; NaN for samples of shards not scored (yet). Stale scores serve until
        `set_scores` replaces them."""
        return self._ref[self._positions(np.asarray(ids, dtype=np.int64))]

    def embedding(self, ids: np.ndarray) -> np.ndarray:
        """float16 [len(ids), dimensions]; KeyError for an id of a shard not scored."""
        ids = np.asarray(ids, dtype=np.int64)
        at = self._positions(ids)
        unscored = ~self._scored[shard_of(ids)]
        if unscored.any():
            raise KeyError(int(shard_of(ids[unscored][0])))
        return self._emb[at]

    def learner_loss(self, ids: np.ndarray) -> np.ndarray:
        return self._loss[self._positions(np.asarray(ids, dtype=np.int64))]

    def best_learner_loss(self, ids: np.ndarray) -> np.ndarray:
        """float32 per id: the lowest loss ever reported for it (NaN: never reported)."""
        return self._best[self._positions(np.asarray(ids, dtype=np.int64))]

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

    # -- reports ---------------------------------------------------------------------------------

    def record_losses(self, ids: np.ndarray, losses: np.ndarray) -> None:
        """Stores each sample's latest learner loss; validates everything before changing anything."""
        ids = np.asarray(ids, dtype=np.int64)
        losses = np.asarray(losses, dtype=np.float32)
        if ids.shape != losses.shape or ids.ndim != 1:
            raise ValueError(f"ids and losses must be 1-d of equal length, got {ids.shape} and {losses.shape}")
        if not np.isfinite(losses).all():
            raise ValueError("losses must be finite (got NaN or infinity)")
        at = self._checked_positions(ids)
        reported = len(ids)
        if len(np.unique(ids)) != len(ids):  # coalesced reports may name a sample twice: newest wins
            last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]
            ids, losses, at = ids[last], losses[last], at[last]
        first = np.isnan(self._loss[at])
        if first.any():
            self._learn_first_losses(shard_of(ids[first]), at[first], losses[first])
        self._loss[at] = losses
        self._best[at] = np.fmin(self._best[at], losses)  # fmin: NaN (never reported) gives way
        self.feedback_samples += reported

    def _learn_first_losses(self, shards: np.ndarray, at: np.ndarray, losses: np.ndarray) -> None:
        # The moving average takes one step per shard of the report, shards ascending, as it did
        # when losses were kept per shard: the same reports give the same numbers as before, in
        # checkpoints too. The per-cluster sums then add in that same order.
        order = np.argsort(shards, kind="stable")
        shards, at, losses = shards[order], at[order], losses[order]
        bounds = [0, *(np.flatnonzero(shards[1:] != shards[:-1]) + 1).tolist(), len(losses)]
        a = UNSEEN_LOSS_SMOOTHING
        for i, j in zip(bounds[:-1], bounds[1:]):
            # Bit for bit what float32 `losses[i:j].mean()` gives (same pairwise sum, one
            # correctly rounded division), at a third of its overhead.
            fresh = float(np.add.reduce(losses[i:j]) / (j - i))
            self._unseen_loss = fresh if np.isnan(self._unseen_loss) else (1 - a) * self._unseen_loss + a * fresh
        self._add_cluster_losses(self._cluster[at], losses)  # rows not clustered hold -1

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

    def get_state(self) -> dict[str, np.ndarray]:
        """Learner losses and cluster ids as flat arrays (np.savez can store them), shards
        ascending. Reference scores are left out: the scorers keep those, once per shard, for
        every job."""
        shards = self._held_shards()
        at = self._spans(shards)
        return {
            "shards": shards.astype(np.int64),
            "rows": self._rows[shards],
            "learner_loss": self._loss[at],
            "best_loss": self._best[at],
            "clustered": self._clustered[shards],
            "cluster": self._cluster[at],  # -1 for the rows of shards not clustered
            "unseen_loss": np.array(self._unseen_loss, np.float64),
            "cluster_loss_sum": self._cluster_loss_sum.copy(),
            "cluster_loss_count": self._cluster_loss_count.copy(),
            "feedback_samples": np.array(self.feedback_samples, np.int64),
        }


def _padded(values: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    out[: len(values)] = values
    return out
