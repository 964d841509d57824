"""The curator of one job: its epochs, each a shard order, an assembler and a ledger, and the
job's Selector. No Ray here.

Each epoch's shards are added in the order `start_epoch` gave (the actor consumes reads in that
order, however they finish), wait in the epoch's assembler, and are cut into super-batches of
B / keep_ratio candidates only when a batch is wanted: `lookup` of a batch that is not chosen yet
chooses up to `select_ahead` batches beyond it for that rank. Reading runs ahead; choosing does
not, so a batch is chosen with the learner losses of the moment it is asked for.

A stream job's epochs are passes over the living pool, one after another: shards added to the
pool while a pass runs join it (the actor reads them next), and a pass leaves out the rows the
previous one served last (`EpochRun.recent`), so a sample is not served twice within that window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from loader import codec
from loader.epoch import Candidates, ClusteredShuffleBuffer, EpochAssembler, ShuffleBuffer
from loader.ids import shard_of
from loader.job.plan import BatchPlan
from loader.job.ledger import NO_SNAPSHOT, EndOfEpoch, Failed, Ledger, Lookup, Materialize, Pending, Ready
from loader.job.spec import CuratorSettings, JobSpec
from loader.registry import ShardRecord
from loader.selection.selector import Selector
from loader.sources.schema import conform, mismatch_reason

__all__ = [
    "Curator", "CuratorSettings", "EndOfEpoch", "EpochRun", "Failed", "JobSpec", "Lookup", "Materialize",
    "Pending", "Ready",
]  # fmt: skip


@dataclasses.dataclass
class EpochRun:
    assembler: EpochAssembler
    ledger: Ledger
    # The policy's random choices in this epoch.
    rng: np.random.Generator
    # A run restored from a journal: sorted ids already considered, which reading must skip.
    skip: np.ndarray | None = None
    # A stream job's pass: sorted ids the previous pass served last, left out of this one so no
    # sample comes again within `repeat_window` rows.
    recent: np.ndarray | None = None
    started: bool = True
    # Started before any rank asked for it (`start_epoch(early=True)`), until one does.
    early: bool = False
    # A super-batch drawn and awaiting its learner losses (snapshot mode): at most one at a time.
    drawn: Candidates | None = None


# Called with (epoch, candidate ids, kept ids, weights) for every batch before it can be served.
Journal = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]


class Curator:
    def __init__(
        self, spec: JobSpec, settings: CuratorSettings = CuratorSettings(), journal: Journal | None = None
    ) -> None:
        self.spec, self.settings, self.journal = spec, settings, journal
        self.selector = Selector(spec.policy, spec.options, spec.batch_size, spec.seed)
        self.schema: pa.Schema | None = None
        self.epochs: dict[int, EpochRun] = {}
        # Shard index -> what the buffers hold of its rows, kept for the next epochs (see `_kept_rows`).
        self._kept: dict[int, pa.Table] = {}
        # Sample ids the pool budget pruned (sorted): never served from the moment they are known.
        self.pruned = np.zeros(0, np.int64)
        self.batches_served = 0
        self.samples_served = 0
        self.samples_considered = 0
        # Snapshot mode: per served batch, the trainer steps between the snapshot that chose it
        # and the newest snapshot when it was asked for (how stale its learner losses were).
        self.newest_snapshot = NO_SNAPSHOT
        self.staleness_sum = 0
        self.staleness_max = 0
        self.staleness_batches = 0

    @property
    def pool(self):
        return self.selector.pool

    @property
    def needs_snapshot(self) -> bool:
        return self.selector.needs_snapshot

    @property
    def needs_scores(self) -> bool:
        return self.selector.needs_scores

    # -- reading side ---------------------------------------------------------------------------

    def start_epoch(self, epoch: int, shards: list[ShardRecord], early: bool = False) -> list[ShardRecord]:
        """Creates the epoch (or goes on with one restored from its journal) and returns its
        shards in the order to read them, which is the order they must be added in. Epochs
        older than `keep_epochs` are forgotten then, or, for an epoch started `early` (before any
        rank asked for it), only once one does (`claim_epoch`): a lagging rank may still read one."""
        run = self.epochs.get(epoch)
        if run is not None and run.started:
            raise RuntimeError(f"epoch {epoch} already started")
        if run is None:
            run = self.epochs[epoch] = self._new_run(epoch)
        run.started = True
        if self.spec.stream:
            run.recent = self._recent(epoch)
        run.early = early
        if not early:
            self._forget_old_epochs(epoch)
        order = [shards[i] for i in self._shard_rng(epoch).permutation(len(shards))]
        # Shards none of whose rows is left (all considered before a restart, or all pruned) need
        # no read.
        gone = np.concatenate([run.skip if run.skip is not None else np.zeros(0, np.int64), self.pruned])
        if not len(gone):
            return order
        done = np.bincount(shard_of(np.unique(gone)), minlength=max((s.index for s in shards), default=0) + 1)
        return [s for s in order if not (s.rows and s.index < len(done) and done[s.index] >= s.rows)]

    def restore_epoch(self, epoch: int, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Rebuilds an epoch from its journal (candidates, kept ids, weights per batch): those
        batches are served again from their ids, and reading skips every candidate in them."""
        run = self._new_run(epoch)
        run.started = False
        for _, kept, weights in batches:
            run.ledger.append(kept, weights, None)
        considered = [c for c, _, _ in batches]
        run.skip = np.sort(np.concatenate(considered)) if considered else np.zeros(0, np.int64)
        run.assembler.emitted = len(batches)
        self.epochs[epoch] = run

    def _recent(self, epoch: int) -> np.ndarray | None:
        """The ids the previous pass served last: the newest `shuffle_rows`, at most half the pass.
        A sample served in that pass is then served again only after at least that many rows."""
        previous = self.epochs.get(epoch - 1)
        if previous is None:
            return None
        rows = sum(len(ids) for ids in previous.ledger.ids)
        return np.sort(previous.ledger.newest_ids(min(self.settings.shuffle_rows, rows // 2)))

    def _new_run(self, epoch: int) -> EpochRun:
        rng = np.random.default_rng(np.random.SeedSequence([self.spec.seed, epoch, 1]))
        assembler = EpochAssembler(
            self.selector.super_batch, self.spec.world_size, self.settings.shuffle_rows, int(rng.integers(2**63)),
            buffer=self._buffer,
        )  # fmt: skip
        return EpochRun(assembler, Ledger(self.spec.world_size), np.random.default_rng(rng.integers(2**63)))

    def _shard_rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.spec.seed, epoch, 0]))

    def _buffer(self, rng: np.random.Generator) -> ShuffleBuffer | ClusteredShuffleBuffer:
        if self.selector.draws_by_cluster:
            return ClusteredShuffleBuffer(rng, self.selector)
        return ShuffleBuffer(rng)

    def add_shard(
        self, epoch: int, index: int, table: pa.Table, scores: tuple[np.ndarray, np.ndarray] | None = None
    ) -> str:
        """Adds one shard's rows (and its reference scores), in the epoch's order; returns why the
        shard must be quarantined, or ''."""
        if self.schema is None:
            self.schema = table.schema
        elif not table.schema.equals(self.schema):
            reason = mismatch_reason(table.schema, self.schema)
            if reason:
                return reason
            table = conform(table, self.schema)  # the same columns in another order
        reason = self.selector.add_shard(index, table.num_rows, scores)
        if reason:
            return reason
        table = self._kept_rows(index, table)
        self._add_rows(epoch, table)
        return ""

    def _kept_rows(self, index: int, table: pa.Table) -> pa.Table:
        """What an epoch's buffer holds of a shard's rows. In snapshot mode the whole table: the
        scorer's forward pass takes the candidates' inputs. Otherwise the ids alone, copied (a
        plan names ids; the gateway gathers the rows): the curator then pins none of a shard's
        object-store memory, and keeps the ids for the next epochs, which add them again without
        reading the shard (`add_again`) while the file is unchanged."""
        if self.needs_snapshot:
            return table
        ids = pa.table({codec.ID: pa.array(np.array(table.column(codec.ID).to_numpy(), np.int64))})
        self._kept[index] = ids
        return ids

    def holds_rows(self, index: int) -> bool:
        """Whether `add_again` can add the shard's rows without its table."""
        return index in self._kept

    def rows_held(self, index: int) -> int:
        return self._kept[index].num_rows

    def add_again(self, epoch: int, index: int) -> str:
        """Adds the rows of a shard whose file is unchanged since `add_shard` took it, as that did."""
        table = self._kept[index]
        reason = self.selector.add_shard(index, table.num_rows, None)
        if reason:
            return reason
        self._add_rows(epoch, table)
        return ""

    def forget_rows(self, index: int) -> None:
        """The shard is quarantined or changed: its rows are read anew, if ever."""
        self._kept.pop(index, None)

    def _add_rows(self, epoch: int, table: pa.Table) -> None:
        run = self.epochs[epoch]
        for leave_out in (run.skip, run.recent, self.pruned):
            if leave_out is not None and len(leave_out):
                table = table.filter(pa.array(~np.isin(table.column(codec.ID).to_numpy(), leave_out)))
        run.assembler.add(table)

    def finish_reading(self, epoch: int) -> None:
        self.epochs[epoch].assembler.finish()

    def reading_finished(self, epoch: int) -> bool:
        run = self.epochs.get(epoch)
        return run is not None and run.assembler.finished

    def prune(self, ids: np.ndarray) -> None:
        """The pool budget pruned `ids`: no batch chosen from now on holds one."""
        self.pruned = np.union1d(self.pruned, np.asarray(ids, np.int64))

    def starving(self, epoch: int) -> bool:
        """Whether the epoch's next super-batch needs rows not read yet."""
        return self.epochs[epoch].assembler.starving

    def fail_epoch(self, epoch: int, message: str) -> None:
        self.epochs[epoch].ledger.error = message

    def wants_more(self, epoch: int) -> bool:
        """Whether reading should go on: rows waiting to be drawn cover fewer than `ready_batches`
        super-batches per rank."""
        run = self.epochs[epoch]
        ahead = self.settings.ready_batches * self.spec.world_size * self.selector.super_batch
        return run.assembler.waiting_rows() < ahead

    # -- choosing --------------------------------------------------------------------------------

    def progress(self, epoch: int) -> tuple:
        """What reading and choosing wait on; it changes whenever either may go on."""
        run = self.epochs.get(epoch)
        if run is None:
            return ()
        ledger = run.ledger
        return len(ledger), ledger.wanted, ledger.closed, ledger.error, run.assembler.waiting_rows()

    def choosing_due(self, epoch: int) -> bool:
        """Whether a rank's window wants a batch that is not chosen yet."""
        run = self.epochs[epoch]
        ahead = self.settings.select_ahead * self.spec.world_size
        return not run.ledger.closed and len(run.ledger) <= run.ledger.wanted + ahead

    def draw(self, epoch: int) -> Candidates | None:
        """The super-batch to choose the epoch's next batch from, or None: it needs rows not read
        yet, or there is none left (then the epoch's ledger is closed). Snapshot mode: give it to
        `select` with the learner losses of its rows."""
        run = self.epochs[epoch]
        if run.drawn is None:
            run.drawn = run.assembler.next()
            if run.drawn is None and run.assembler.exhausted:
                run.ledger.closed = True
        return run.drawn

    def choose(self, epoch: int) -> None:
        """Chooses batches while the ranks' windows want them and rows are there (not in snapshot
        mode, whose learner losses come from a scorer: the actor draws and selects)."""
        if self.needs_snapshot:
            return
        while self.choosing_due(epoch) and (candidates := self.draw(epoch)) is not None:
            self.select(epoch, candidates)

    def select(
        self, epoch: int, candidates: Candidates, learner_loss: np.ndarray | None = None,
        snapshot_step: int = NO_SNAPSHOT,
    ) -> None:  # fmt: skip
        """Keeps the Selector's choice of the drawn `candidates` as the epoch's next batch; the
        rest of the super-batch is not served this epoch. `learner_loss` is per candidate."""
        run = self.epochs[epoch]
        if candidates is not run.drawn:
            raise RuntimeError("select() takes the super-batch that draw() gave")
        run.drawn = None
        progress = epoch / self.spec.total_epochs if self.spec.total_epochs else None
        allowed = np.flatnonzero(~np.isin(candidates.ids, self.pruned))  # pruned while buffered
        if not len(allowed) and self.spec.stream:
            # A stream's ranks need not get as many batches per pass; an epoch job's must, so
            # there the (rare) empty batch is served.
            self.samples_considered += len(candidates.ids)
            return
        if len(allowed) == len(candidates.ids):
            chosen = self.selector.select(candidates.ids, learner_loss, run.rng, progress)
        else:
            losses = None if learner_loss is None else np.asarray(learner_loss)[allowed]
            chosen = self.selector.select(candidates.ids[allowed], losses, run.rng, progress)
            chosen = dataclasses.replace(chosen, picks=allowed[chosen.picks])
        if self.journal is not None:
            self.journal(epoch, candidates.ids, chosen.kept, chosen.weights)
        # A plan, not a payload: the gateway gathers the rows from the shards (loader.job.plan).
        plan = BatchPlan(chosen.kept, chosen.weights, self.schema)  # the pool's columns, not the buffer's
        run.ledger.append(chosen.kept, chosen.weights, plan, snapshot_step)
        self.samples_considered += len(candidates.ids)

    # -- serving side ---------------------------------------------------------------------------

    def lookup(self, rank: int, epoch: int, seq: int) -> Lookup:
        run = self.epochs.get(epoch)
        if run is None:
            return Failed(f"epoch {epoch} of job {self.spec.job!r} is no longer kept")
        run.ledger.ask(rank, seq)
        if not run.ledger.error:
            self.choose(epoch)
        return run.ledger.lookup(rank, seq)

    def served(self, rows: int, epoch: int | None = None, g: int | None = None) -> None:
        """Counts a batch handed to a trainer; with its place, also how stale its losses were."""
        self.batches_served += 1
        self.samples_served += rows
        run = self.epochs.get(epoch) if epoch is not None else None
        if run is None or g is None or g >= len(run.ledger):
            return
        step = run.ledger.snapshot_step(g)
        if step != NO_SNAPSHOT and self.newest_snapshot != NO_SNAPSHOT:
            stale = max(0, self.newest_snapshot - step)
            self.staleness_sum += stale
            self.staleness_max = max(self.staleness_max, stale)
            self.staleness_batches += 1

    def snapshot_pushed(self, step: int) -> None:
        self.newest_snapshot = max(self.newest_snapshot, step)

    def ack(self, rank: int, epoch: int, seq: int) -> None:
        run = self.epochs.get(epoch)
        if run is not None:
            run.ledger.ack(rank, seq)

    def feedback(self, ids: np.ndarray, losses: np.ndarray) -> str:
        """Stores reported losses; returns why they were rejected, or ''. Rejection changes nothing."""
        return self.selector.feedback(ids, losses)

    def plan(self, wanted: Materialize) -> BatchPlan:
        """The plan of a batch whose plan is no longer kept (acknowledged, or from before a
        restart): the ledger's ids and weights are all it takes. Its schema is None while no
        shard has been read (after a restart): the rows' own shards tell it then."""
        return BatchPlan(wanted.ids, wanted.weights, self.schema)

    def claim_epoch(self, epoch: int) -> None:
        """A rank asked for an epoch started early: it counts as started from now on."""
        self.epochs[epoch].early = False
        self._forget_old_epochs(epoch)

    def _forget_old_epochs(self, newest: int) -> None:
        for epoch in [e for e in self.epochs if e <= newest - self.settings.keep_epochs]:
            del self.epochs[epoch]

    def stats(self) -> dict:
        stale = self.staleness_batches
        return {
            "job": self.spec.job,
            "policy": self.spec.policy,
            "world_size": self.spec.world_size,
            "batch_size": self.spec.batch_size,
            "epoch": max((e for e, run in self.epochs.items() if not run.early), default=0),
            "batches_served": self.batches_served,
            "samples_served": self.samples_served,
            "feedback_samples": self.pool.feedback_samples,
            "samples_considered": self.samples_considered,
            "selection_seconds": self.selector.seconds,
            "selections": self.selector.selections,
            "unacked_batches": sum(run.ledger.unacked for run in self.epochs.values()),
            "options": {k: str(v) for k, v in dataclasses.asdict(self.spec.options).items()},
            "clusters": self.selector.cluster_stats(),
            "snapshot_staleness_mean": self.staleness_sum / stale if stale else 0.0,
            "snapshot_staleness_max": self.staleness_max,
            "snapshot_staleness_batches": stale,
        }

    # -- state -----------------------------------------------------------------------------------

    _COUNTERS = ("batches_served", "samples_served", "samples_considered")

    def get_state(self) -> dict[str, np.ndarray]:
        """What selection has learned, as flat numpy arrays: the Selector's state and counters.
        Epoch ledgers are not here: journals keep those."""
        state = self.selector.get_state()
        for name in self._COUNTERS:
            state[name] = np.array(getattr(self, name), np.int64)
        return state

    def restore_state(self, state: dict[str, np.ndarray]) -> None:
        """The inverse of get_state, into a curator built from the same JobSpec."""
        self.selector.reset(state)
        for name in self._COUNTERS:
            setattr(self, name, int(state[name]))
