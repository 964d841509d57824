"""The Selector of one job: what it knows of the pool, and how it chooses a batch from candidates.

It owns the policy, the per-sample metadata (`PoolIndex`: reference scores, reported learner
losses, cluster ids), the clusterer, the bandit whose quotas shape each super-batch draw and the
reward it learns from (`ClusterReward`: every selection's candidates are its evidence, reports
add the change of each re-reported loss, and each feedback is one bandit update), and the memory
of served embeddings. No Ray and no delivery here: epochs and streams both ask it the same
question, `select(candidates, learner_loss) -> (kept ids, weights)`.

State follows the project's one contract: `get_state()` gives flat numpy arrays, and
`reset(state=None)` builds the Selector afresh or, given a state, as it was when it was saved.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from loader.pool import PoolIndex, UnknownSamples
from loader.selection.bandit import get_bandit
from loader.selection.diversity import EmbeddingMemory
from loader.selection.options import SelectionOptions, keep_count
from loader.selection.policies import make_policy
from loader.selection.rewards import ClusterReward
from loader.selection.scores import fill_missing


@dataclasses.dataclass
class Selection:
    """One batch chosen from a super-batch: positions into the candidates (ascending), their ids
    and their weights, in that order."""

    picks: np.ndarray
    kept: np.ndarray
    weights: np.ndarray


class Selector:
    def __init__(self, policy: str, options: SelectionOptions, batch_size: int, seed: int) -> None:
        self.options, self.batch_size, self.seed = options, batch_size, seed
        self.policy = make_policy(policy, options)
        self.super_batch = self.policy.super_batch(batch_size)
        # Snapshot mode gets learner losses from a scorer, asynchronously, per super-batch.
        self.needs_snapshot = self.policy.needs_learner and options.learner_loss == "snapshot"
        self.uses_reference_model = self.policy.needs_reference and options.irreducible_loss == "reference"
        self.needs_scores = self.uses_reference_model or options.needs_embeddings
        self.reset()

    # -- state -----------------------------------------------------------------------------------

    def reset(self, state: dict[str, np.ndarray] | None = None) -> None:
        """Fresh (state None) or as saved by `get_state`, for a Selector built with the same
        arguments. One path, so a restored Selector is built exactly like a new one."""
        parts: dict[str, dict[str, np.ndarray]] = {}
        for key, value in (state or {}).items():
            part, _, name = key.partition(".")
            if name:
                parts.setdefault(part, {})[name] = value
        options = self.options
        # Each part is built as for a new Selector, then reset to its saved part (None: fresh).
        self.pool = PoolIndex()
        self.pool.reset(parts.get("pool"))
        self.clusters = self.bandit = self.reward = self.memory = None
        if options.bandit != "none":
            from loader.selection.clusters import OnlineClusters  # scikit-learn: only when used

            # Warm start with up to 8 clusters (as OnlineClusters does), never more than the cap.
            init = min(8, options.max_clusters)
            self.clusters = OnlineClusters(max_clusters=options.max_clusters, init_clusters=init, seed=self.seed)
            self.clusters.reset(parts.get("clusters"))
            self.bandit = get_bandit(options.bandit)(gamma=options.gamma, eta=options.eta, seed=self.seed)
            self.bandit.reset(parts.get("bandit"))
            # A state saved before the reward had a state of its own has none: it starts fresh.
            self.reward = ClusterReward()
            self.reward.reset(parts.get("reward"))
        if options.diversity > 0:
            self.memory = EmbeddingMemory(options.memory_size)
            self.memory.reset(parts.get("memory"))
        state = state or {}
        self.served_per_cluster = np.asarray(state.get("served_per_cluster", np.zeros(0, np.int64)), np.int64)
        self.selections = int(state.get("selections", 0))
        self.seconds = float(state.get("selection_seconds", 0.0))

    def get_state(self) -> dict[str, np.ndarray]:
        parts = {"pool": self.pool.get_state()}
        for name in ("clusters", "bandit", "reward", "memory"):
            if getattr(self, name) is not None:
                parts[name] = getattr(self, name).get_state()
        state = {f"{part}.{key}": value for part, values in parts.items() for key, value in values.items()}
        # int64 as reset reads it: the running sum turns float when it starts from an empty array.
        state["served_per_cluster"] = self.served_per_cluster.astype(np.int64)
        state["selections"] = np.array(self.selections, np.int64)
        state["selection_seconds"] = np.array(self.seconds, np.float64)
        return state

    # -- what a shard brings ---------------------------------------------------------------------

    def add_shard(self, index: int, rows: int, scores: tuple[np.ndarray, np.ndarray] | None) -> str:
        """Registers a shard's rows and reference scores; why it cannot be used, or ''. Shards
        must come in one fixed order: cluster assignment learns from each shard it sees."""
        if self.needs_scores and scores is None and not self.pool.has_scores(index, rows):
            return "no reference scores for this shard"
        self.pool.ensure_shard(index, rows)
        if scores is not None and not self.pool.has_scores(index):
            self.pool.set_scores(index, *scores)
            # Ids restored from a checkpoint stay: re-assigning would move them and the centroids.
            if self.clusters is not None and not self.pool.has_clusters(index):
                self.pool.set_clusters(index, self.clusters.assign(scores[1]))
        return ""

    # -- the buffer draw: a ClusteredShuffleBuffer asks these ------------------------------------

    @property
    def draws_by_cluster(self) -> bool:
        return self.bandit is not None

    def cluster_of(self, ids: np.ndarray) -> np.ndarray:
        return self.pool.cluster_of(ids)

    def quotas(self, k: int, counts: np.ndarray) -> np.ndarray:
        return self.bandit.quotas(k, counts)

    # -- choosing --------------------------------------------------------------------------------

    def select(
        self, ids: np.ndarray, learner_loss: np.ndarray | None, rng: np.random.Generator, progress: float | None
    ) -> Selection:
        """Chooses the batch from the candidates `ids`. `learner_loss` is per candidate (snapshot
        mode) or None: reported losses, else their cluster's running mean, are used when the policy needs them."""
        started = time.perf_counter()
        ref_loss = self._irreducible(ids) if self.policy.needs_reference else None
        # What is known of each candidate's learner loss: given (snapshot), else its last report,
        # else its cluster's fallback; NaN where nothing is known yet.
        known = learner_loss
        if learner_loss is None and (self.policy.needs_learner or self.reward is not None):
            known = _known_learner_loss(self.pool, ids)
        if self.policy.needs_learner and learner_loss is None:
            learner_loss = fill_missing(known, 0.0)
        # Looked up once: the reward reads it for every candidate, the served counts for the kept.
        clusters = self.pool.cluster_of(ids) if self.clusters is not None or self.reward is not None else None
        if self.reward is not None:
            # Every candidate is evidence for its cluster's reward, survivor or not.
            reference = ref_loss if ref_loss is not None else self._irreducible(ids)
            self.reward.observe_candidates(clusters, known, reference)
        k = keep_count(len(ids), self.super_batch, self.batch_size)
        embeddings = self.pool.embedding(ids) if self.memory is not None else None
        picks, weights = self.policy.select(
            k, ref_loss=ref_loss, learner_loss=learner_loss, n=len(ids), rng=rng, progress=progress,
            embeddings=embeddings, memory=self.memory,
        )  # fmt: skip
        # Rows leave in candidate order, so each is copied once, straight from its shard table.
        order = np.argsort(picks, kind="stable")
        picks, weights = np.asarray(picks)[order], np.asarray(weights, np.float32)[order]
        kept = ids[picks]
        if self.memory is not None:
            self.memory.add(embeddings[picks])
        if self.clusters is not None:
            served = np.bincount(clusters[picks], minlength=self.clusters.num_clusters)
            self.served_per_cluster = _add_padded(self.served_per_cluster, served)
        self.seconds += time.perf_counter() - started
        self.selections += 1
        return Selection(picks, kept, weights)

    def _irreducible(self, ids: np.ndarray) -> np.ndarray:
        """What learnability subtracts from the learner's loss (option `irreducible_loss`): the
        reference model's loss, or the learner's own best (0 for a sample never reported, whose
        whole loss is then taken as learnable)."""
        if self.options.irreducible_loss == "learner_best":
            return fill_missing(self.pool.best_learner_loss(ids), 0.0)
        return self.pool.reference_loss(ids)

    # -- what trainers report --------------------------------------------------------------------

    def feedback(self, ids: np.ndarray, losses: np.ndarray) -> str:
        """Stores reported losses; returns why they were rejected, or ''. Rejection changes nothing.

        With a bandit, each accepted report is one bandit update: the reward of every cluster
        that had candidates since the last one (`ClusterReward.take`), after the report's
        changes of loss (new − previously reported, per re-reported sample) are taken in."""
        try:
            previous = self._previous_losses(ids, losses)
            self.pool.record_losses(ids, losses)
        except (ValueError, UnknownSamples) as exc:
            return str(exc)
        if self.bandit is not None:
            ids = np.asarray(ids, dtype=np.int64)
            self.reward.observe_reports(self.pool.cluster_of(ids), previous, np.asarray(losses, np.float32))
            arms, rewards = self.reward.take()
            if len(arms):
                self.bandit.update(arms, rewards)
        return ""

    def _previous_losses(self, ids: np.ndarray, losses: np.ndarray) -> np.ndarray | None:
        """The losses reported samples had before this report (NaN: none), where a reward needs
        them and the report is well-formed; what is not well-formed `record_losses` rejects."""
        ids, losses = np.asarray(ids), np.asarray(losses)
        if self.reward is None or ids.ndim != 1 or ids.shape != losses.shape or not np.isfinite(losses).all():
            return None
        ids = ids.astype(np.int64)
        self.pool.check_ids(ids)  # UnknownSamples, with the message record_losses would give
        return self.pool.learner_loss(ids)

    def cluster_stats(self) -> list[dict]:
        """Per cluster: pool members, bandit weight, its reward estimate, batches' samples served.

        The reward estimate is `ClusterReward.estimates`: the raw reward in nats, before the bandit
        normalises it (optimistic for a cluster not yet observed)."""
        if self.clusters is None:
            return []
        sizes, ref_loss = self.pool.cluster_sizes()
        k = max(len(sizes), self.bandit.num_arms, self.reward.num_clusters, len(self.served_per_cluster))
        weights, rewards = _pad(self.bandit.weights, k), self.reward.estimates(k)
        sizes, ref_loss, served = _pad(sizes, k), _pad(ref_loss, k), _pad(self.served_per_cluster, k)
        return [
            {"id": c, "size": int(sizes[c]), "weight": float(weights[c]), "reward": float(rewards[c]),
             "served": int(served[c]), "reference_loss": float(ref_loss[c])}
            for c in range(k)
        ]  # fmt: skip


def _known_learner_loss(pool: PoolIndex, ids: np.ndarray) -> np.ndarray:
    """float64 per id: its last reported loss, else its cluster's fallback, else NaN."""
    reported = pool.learner_loss(ids).astype(np.float64)
    return np.where(np.isnan(reported), pool.fallback_learner_loss(ids), reported)


def _pad(values: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.asarray(values).dtype if len(values) else np.float64)
    out[: len(values)] = values
    return out


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = max(len(a), len(b))
    return _pad(a, n) + _pad(b, n)
