"""The curator of one job: epochs, selection, the batch ledger, per-rank cursors and feedback.

No Ray here. Each epoch's shards flow into an EpochAssembler that cuts super-batches of
B / keep_ratio candidates; the job's policy keeps B of each (all of them under `uniform`).

Global batch g of an epoch goes to rank g % world_size as that rank's sequence number
g // world_size. The ledger keeps every served batch's ids and weights for the epoch, so a trainer
resuming from an older `state_dict` gets the very same batches again; encoded payloads are kept
only until the rank acknowledges them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from loader import codec
from loader.epoch import Candidates, ClusteredShuffleBuffer, EpochAssembler, ShuffleBuffer
from loader.ids import shard_of
from loader.pool import PoolIndex, UnknownSamples
from loader.registry import ShardRecord
from loader.selection.bandit import get_bandit, reward_from_feedback
from loader.selection.diversity import EmbeddingMemory
from loader.selection.options import SelectionOptions, keep_count
from loader.selection.policies import make_policy
from loader.selection.scores import fill_missing
from loader.sources.schema import conform, mismatch_reason


@dataclasses.dataclass(frozen=True)
class JobSpec:
    job: str
    batch_size: int
    world_size: int
    policy: str
    seed: int
    options: SelectionOptions = SelectionOptions()
    # Planned epochs (0: unknown); lets a policy anneal near the end of training.
    total_epochs: int = 0

    def conflict(self, other: "JobSpec") -> str:
        """Why `other` cannot join this job, or '' if it can."""
        for field in ("batch_size", "world_size", "policy", "seed", "options", "total_epochs"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"job {self.job!r} runs with {field}={mine!r}, got {field}={theirs!r}"
        return ""


@dataclasses.dataclass(frozen=True)
class CuratorSettings:
    shuffle_rows: int = 4096
    ready_batches: int = 16
    keep_epochs: int = 2
    # How often what selection has learned is written to the state folder (journals: per batch).
    checkpoint_s: float = 30.0


@dataclasses.dataclass
class Ready:
    seq: int
    rows: int
    payload: bytes


@dataclasses.dataclass
class Pending:
    pass


@dataclasses.dataclass
class EndOfEpoch:
    batches: int


@dataclasses.dataclass
class Materialize:
    """An acknowledged batch is wanted again: its rows must be re-read from these ids."""

    seq: int
    ids: np.ndarray
    weights: np.ndarray


@dataclasses.dataclass
class Failed:
    message: str


Lookup = Ready | Pending | EndOfEpoch | Materialize | Failed


@dataclasses.dataclass
class EpochRun:
    assembler: EpochAssembler
    rng: np.random.Generator
    ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    weights: list[np.ndarray] = dataclasses.field(default_factory=list)
    payloads: dict[int, bytes] = dataclasses.field(default_factory=dict)
    # Highest global batch index any rank has asked for; drives read-ahead.
    wanted: int = -1
    ended_ranks: set[int] = dataclasses.field(default_factory=set)
    # Per rank: the highest acknowledged sequence number (payloads up to it are dropped).
    acked: dict[int, int] = dataclasses.field(default_factory=dict)
    error: str = ""
    # Super-batches taken for selection but not selected yet (snapshot mode awaits a scorer).
    selecting: int = 0
    # A run restored from a journal: sorted ids already considered, which reading must skip.
    skip: np.ndarray | None = None
    started: bool = True


# Called with (epoch, candidate ids, kept ids, weights) for every batch before it can be served.
Journal = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]


class Curator:
    def __init__(
        self, spec: JobSpec, settings: CuratorSettings = CuratorSettings(), journal: Journal | None = None
    ) -> None:
        self.spec, self.settings, self.journal = spec, settings, journal
        self.policy = make_policy(spec.policy, spec.options)
        self.super_batch = self.policy.super_batch(spec.batch_size)
        # Snapshot mode gets learner losses from a scorer, asynchronously, per super-batch.
        self.needs_snapshot = self.policy.needs_learner and spec.options.learner_loss == "snapshot"
        options = spec.options
        self.needs_scores = self.policy.needs_reference or options.needs_embeddings
        self.pool = PoolIndex()
        # Bandit over clusters of reference embeddings (arms), and a memory of served embeddings.
        self.clusters = self.bandit = self.memory = None
        if options.bandit != "none":
            from loader.selection.clusters import OnlineClusters  # scikit-learn: only when used

            # Warm start with up to 8 clusters (as OnlineClusters does), never more than the cap.
            init = min(8, options.max_clusters)
            self.clusters = OnlineClusters(max_clusters=options.max_clusters, init_clusters=init, seed=spec.seed)
            self.bandit = get_bandit(options.bandit)(gamma=options.gamma, eta=options.eta, seed=spec.seed)
        if options.diversity > 0:
            self.memory = EmbeddingMemory(options.memory_size)
        self.served_per_cluster = np.zeros(0, np.int64)
        self.schema: pa.Schema | None = None
        self.epochs: dict[int, EpochRun] = {}
        self.batches_served = 0
        self.samples_served = 0
        self.samples_considered = 0
        self.selection_seconds = 0.0
        self.selections = 0

    # -- reading side ---------------------------------------------------------------------------

    def start_epoch(self, epoch: int, shards: list[ShardRecord]) -> list[ShardRecord]:
        """Creates the epoch (or goes on with one restored from its journal) and returns its
        shards in the order to read them."""
        run = self.epochs.get(epoch)
        if run is not None and run.started:
            raise RuntimeError(f"epoch {epoch} already started")
        if run is None:
            run = self.epochs[epoch] = self._new_run(epoch)
        run.started = True
        self._forget_old_epochs(epoch)
        order = [shards[i] for i in self._shard_rng(epoch).permutation(len(shards))]
        if run.skip is None:
            return order
        # Shards whose every row was considered before the restart need no second read.
        done = np.bincount(shard_of(run.skip), minlength=max((s.index for s in shards), default=0) + 1)
        return [s for s in order if not (s.rows and done[s.index] >= s.rows)]

    def restore_epoch(self, epoch: int, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Rebuilds an epoch from its journal (candidates, kept ids, weights per batch): those
        batches are served again from their ids, and reading skips every candidate in them."""
        run = self._new_run(epoch)
        run.started = False
        for _, kept, weights in batches:
            run.ids.append(kept)
            run.weights.append(weights)
        considered = [c for c, _, _ in batches]
        run.skip = np.sort(np.concatenate(considered)) if considered else np.zeros(0, np.int64)
        run.assembler.emitted = len(batches)
        self.epochs[epoch] = run

    def _new_run(self, epoch: int) -> EpochRun:
        rng = np.random.default_rng(np.random.SeedSequence([self.spec.seed, epoch, 1]))
        assembler = EpochAssembler(
            self.super_batch, self.spec.world_size, self.settings.shuffle_rows, int(rng.integers(2**63)),
            buffer=self._buffer,
        )  # fmt: skip
        return EpochRun(assembler, np.random.default_rng(rng.integers(2**63)))

    def _shard_rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.spec.seed, epoch, 0]))

    def _buffer(self, rng: np.random.Generator) -> ShuffleBuffer | ClusteredShuffleBuffer:
        if self.bandit is None:
            return ShuffleBuffer(rng)
        # Late-bound: restore_state replaces the pool and the bandit objects.
        return ClusteredShuffleBuffer(rng, lambda ids: self.pool.cluster_of(ids),
                                      lambda k, counts: self.bandit.quotas(k, counts))  # fmt: skip

    def add_shard(
        self, epoch: int, index: int, table: pa.Table, scores: tuple[np.ndarray, np.ndarray] | None = None
    ) -> str:
        """Adds one shard's rows (and its reference scores); returns why the shard must be
        quarantined, or ''."""
        if self.schema is None:
            self.schema = table.schema
        elif not table.schema.equals(self.schema):
            reason = mismatch_reason(table.schema, self.schema)
            if reason:
                return reason
            table = conform(table, self.schema)  # the same columns in another order
        if self.needs_scores and scores is None and not self.pool.has_scores(index):
            return "no reference scores for this shard"
        run = self.epochs[epoch]
        self.pool.ensure_shard(index, table.num_rows)
        if scores is not None and not self.pool.has_scores(index):
            self.pool.set_scores(index, *scores)
            # Ids restored from a checkpoint stay: re-assigning would move them and the centroids.
            if self.clusters is not None and not self.pool.has_clusters(index):
                self.pool.set_clusters(index, self.clusters.assign(scores[1]))
        if run.skip is not None and len(run.skip):
            table = table.filter(pa.array(~np.isin(table.column(codec.ID).to_numpy(), run.skip)))
        run.assembler.add(table)
        if not self.needs_snapshot:
            self.collect(epoch)
        return ""

    def finish_reading(self, epoch: int) -> None:
        self.epochs[epoch].assembler.finish()
        if not self.needs_snapshot:
            self.collect(epoch)

    def fail_epoch(self, epoch: int, message: str) -> None:
        self.epochs[epoch].error = message

    def wants_more(self, epoch: int) -> bool:
        run = self.epochs[epoch]
        return len(run.ids) <= run.wanted + self.settings.ready_batches * self.spec.world_size

    def take_candidates(self, epoch: int) -> list[Candidates]:
        """Super-batches ready for selection, in order; each must go through `select`. Their rows
        stay in the shuffle buffer's tables until `select` copies the kept ones."""
        run = self.epochs[epoch]
        candidates = run.assembler.pop_ready()
        run.selecting += len(candidates)
        return candidates

    def collect(self, epoch: int) -> None:
        for candidates in self.take_candidates(epoch):
            self.select(epoch, candidates)

    def select(self, epoch: int, candidates: Candidates, learner_loss: np.ndarray | None = None) -> None:
        """Keeps the policy's choice of `candidates` as the epoch's next batch; the rest of the
        super-batch is not served this epoch. `learner_loss` is per candidate, in their order."""
        started = time.perf_counter()
        run = self.epochs[epoch]
        run.selecting -= 1
        ids = candidates.ids
        ref_loss = self.pool.reference_loss(ids) if self.policy.needs_reference else None
        if self.policy.needs_learner and learner_loss is None:
            learner_loss = fill_missing(self.pool.learner_loss(ids), self.pool.unseen_learner_loss())
        progress = epoch / self.spec.total_epochs if self.spec.total_epochs else None
        k = keep_count(len(ids), self.super_batch, self.spec.batch_size)
        embeddings = self.pool.embedding(ids) if self.memory is not None else None
        picks, weights = self.policy.select(
            k, ref_loss=ref_loss, learner_loss=learner_loss, n=len(ids), rng=run.rng, progress=progress,
            embeddings=embeddings, memory=self.memory,
        )  # fmt: skip
        # Rows leave in candidate order, each copied once, straight from the shard tables.
        order = np.argsort(picks, kind="stable")
        picks, weights = picks[order], np.asarray(weights)[order]
        table = candidates.take(picks)
        kept = ids[picks]
        if self.memory is not None:
            self.memory.add(embeddings[picks])
        if self.clusters is not None:
            served = np.bincount(self.pool.cluster_of(kept), minlength=self.clusters.num_clusters)
            self.served_per_cluster = _add_padded(self.served_per_cluster, served)
        self.selection_seconds += time.perf_counter() - started
        self.selections += 1
        if self.journal is not None:
            self.journal(epoch, ids, kept, weights)
        run.payloads[len(run.ids)] = codec.encode(table.append_column(codec.WEIGHT, pa.array(weights)))
        run.ids.append(kept)
        run.weights.append(weights)
        self.samples_considered += len(ids)

    # -- serving side ---------------------------------------------------------------------------

    def lookup(self, rank: int, epoch: int, seq: int) -> Lookup:
        run = self.epochs.get(epoch)
        if run is None:
            return Failed(f"epoch {epoch} of job {self.spec.job!r} is no longer kept")
        if run.error:
            return Failed(run.error)
        g = seq * self.spec.world_size + rank
        run.wanted = max(run.wanted, g)
        if g < len(run.ids):
            payload = run.payloads.get(g)
            if payload is None:
                return Materialize(seq, run.ids[g], run.weights[g])
            return Ready(seq, len(run.ids[g]), payload)
        if run.assembler.exhausted and run.selecting == 0:
            run.ended_ranks.add(rank)
            return EndOfEpoch(len(run.ids) // self.spec.world_size)
        return Pending()

    def served(self, rows: int) -> None:
        self.batches_served += 1
        self.samples_served += rows

    def ack(self, rank: int, epoch: int, seq: int) -> None:
        run = self.epochs.get(epoch)
        if run is None:
            return
        w = self.spec.world_size
        first = run.acked.get(rank, -1) + 1
        for s in range(first, seq + 1):
            run.payloads.pop(s * w + rank, None)
        run.acked[rank] = max(seq, first - 1)

    def feedback(self, ids: np.ndarray, losses: np.ndarray) -> str:
        """Stores reported losses; returns why they were rejected, or ''. Rejection changes nothing."""
        try:
            self.pool.record_losses(ids, losses)
        except (ValueError, UnknownSamples) as exc:
            return str(exc)
        if self.bandit is not None:
            ids = np.asarray(ids, dtype=np.int64)
            clusters = self.pool.cluster_of(ids)
            known = clusters >= 0
            if known.any():
                self.bandit.update(*reward_from_feedback(clusters[known], np.asarray(losses)[known],
                                                         self.pool.reference_loss(ids[known])))  # fmt: skip
        return ""

    def rebuild(self, tables: list[pa.Table], weights: np.ndarray) -> bytes:
        return codec.encode(pa.concat_tables(tables).append_column(codec.WEIGHT, pa.array(weights)))

    def _forget_old_epochs(self, newest: int) -> None:
        for epoch in [e for e in self.epochs if e <= newest - self.settings.keep_epochs]:
            del self.epochs[epoch]

    def stats(self) -> dict:
        return {
            "job": self.spec.job,
            "policy": self.spec.policy,
            "world_size": self.spec.world_size,
            "batch_size": self.spec.batch_size,
            "epoch": max(self.epochs, default=0),
            "batches_served": self.batches_served,
            "samples_served": self.samples_served,
            "feedback_samples": self.pool.feedback_samples,
            "samples_considered": self.samples_considered,
            "selection_seconds": self.selection_seconds,
            "selections": self.selections,
            "unacked_batches": sum(len(run.payloads) for run in self.epochs.values()),
            "options": {k: str(v) for k, v in dataclasses.asdict(self.spec.options).items()},
            "clusters": self.cluster_stats(),
        }

    def get_state(self) -> dict[str, np.ndarray]:
        """What selection has learned, as flat numpy arrays: learner losses, cluster ids and
        centroids, bandit, memory, counters. Epoch ledgers are not here: journals keep those."""
        parts = {"pool": self.pool.get_state()}
        for name in ("clusters", "bandit", "memory"):
            if getattr(self, name) is not None:
                parts[name] = getattr(self, name).get_state()
        state = {f"{part}.{key}": value for part, values in parts.items() for key, value in values.items()}
        state["served_per_cluster"] = self.served_per_cluster.copy()
        for name in ("batches_served", "samples_served", "samples_considered", "selections"):
            state[name] = np.array(getattr(self, name), np.int64)
        state["selection_seconds"] = np.array(self.selection_seconds, np.float64)
        return state

    def restore_state(self, state: dict[str, np.ndarray]) -> None:
        """The inverse of get_state, into a curator built from the same JobSpec."""
        parts: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            part, _, name = key.partition(".")
            if name:
                parts.setdefault(part, {})[name] = value
        self.pool = PoolIndex.from_state(parts["pool"])
        if self.clusters is not None and "clusters" in parts:
            self.clusters = type(self.clusters).from_state(parts["clusters"])
        if self.bandit is not None and "bandit" in parts:
            self.bandit = type(self.bandit).from_state(parts["bandit"])
        if self.memory is not None and "memory" in parts:
            self.memory = EmbeddingMemory.from_state(parts["memory"])
        self.served_per_cluster = np.asarray(state["served_per_cluster"], np.int64)
        for name in ("batches_served", "samples_served", "samples_considered", "selections"):
            setattr(self, name, int(state[name]))
        self.selection_seconds = float(state["selection_seconds"])

    def cluster_stats(self) -> list[dict]:
        """Per cluster: pool members, bandit weight, its reward estimate, batches' samples served."""
        if self.clusters is None:
            return []
        sizes, ref_loss = self.pool.cluster_sizes()
        k = max(len(sizes), self.bandit.num_arms, len(self.served_per_cluster))
        weights, rewards = _pad(self.bandit.weights, k), _pad(self.bandit.reward_estimates, k)
        sizes, ref_loss, served = _pad(sizes, k), _pad(ref_loss, k), _pad(self.served_per_cluster, k)
        return [
            {"id": c, "size": int(sizes[c]), "weight": float(weights[c]), "reward": float(rewards[c]),
             "served": int(served[c]), "reference_loss": float(ref_loss[c])}
            for c in range(k)
        ]  # fmt: skip


def _pad(values: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.asarray(values).dtype if len(values) else np.float64)
    out[: len(values)] = values
    return out


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = max(len(a), len(b))
    return _pad(a, n) + _pad(b, n)

