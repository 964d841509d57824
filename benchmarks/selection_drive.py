"""Drives one job's pure Curator through epochs the way the curator actor does, and times each part
of every full-size batch: the quota draw, `select`, the Arrow IPC encode, and the feedback report.

The driver calls `draw` and `select` itself after each shard, as the curator actor's chooser does
in snapshot mode (a request's `lookup` does the same in feedback mode). Passing no learner losses to
`select` makes it read reported losses from the pool: feedback mode's exact computation (and what
snapshot mode does before the first weight push). Passing losses is snapshot mode's computation.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from loader.gather import encode_plan
from loader.curator import Curator, CuratorSettings, JobSpec
from loader.selection.options import SelectionOptions
from loader.selection.policies import resolve

from mlp_timing import MLP_KWARGS
from selection_pool import Payloads, PoolBuild, fill_pool

SHUFFLE_ROWS = 4096  # the service's default


@dataclasses.dataclass(frozen=True)
class Setting:
    batch_size: int = 256
    keep_ratio: float = 0.2
    dim: int = 64
    memory: int = 1024
    clusters: int = 32
    pool: int = 100_000
    shard_rows: int = 10_000
    diversity: bool = True
    # Multiplies every loss (reference, reported, snapshot): the spread of learnability scores
    # against the diversity weight (0.5), which decides how many candidates top-k can rule out
    # before the memory product. 0 makes every score equal.
    score_spread: float = 1.0

    @property
    def policy(self) -> str:
        return "learnability+bandit+diversity" if self.diversity else "learnability+bandit"

    def spec(self, seed: int) -> JobSpec:
        values = {
            "keep_ratio": self.keep_ratio,
            "memory_size": self.memory,
            # The job's own OnlineClusters needs max_clusters >= its 8 initial clusters; fill_pool
            # replaces it with one of exactly `clusters` anyway.
            "max_clusters": max(self.clusters, 8),
            "learner_loss": "snapshot",
            "learner": "loader.models:mlp",
            "learner_kwargs": MLP_KWARGS,
        }
        options = resolve(self.policy, values, "options", SelectionOptions())
        return JobSpec(job="bench", batch_size=self.batch_size, world_size=1, policy=self.policy, seed=seed,
                       options=options)  # fmt: skip


PARTS = ("draw", "select", "encode", "feedback")


@dataclasses.dataclass
class Timings:
    """Seconds per full-size batch, one entry per batch and part, as wall time and as CPU time of
    this process. On a shared machine CPU time is the steadier measure of single-threaded work:
    it leaves out the time the process waited for a core."""

    wall: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {p: [] for p in PARTS})
    cpu: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {p: [] for p in PARTS})
    intake_seconds: float = 0.0  # add_shard (shuffle-buffer intake), wall, all batches
    batches_emitted: int = 0  # full-size and tail

    def extend(self, other: "Timings") -> None:
        for clock in ("wall", "cpu"):
            for part in PARTS:
                getattr(self, clock)[part].extend(getattr(other, clock)[part])
        self.intake_seconds += other.intake_seconds
        self.batches_emitted += other.batches_emitted

    @property
    def count(self) -> int:
        return len(self.wall["select"])


class Driver:
    def __init__(self, setting: Setting, seed: int = 0) -> None:
        self.setting = setting
        self.curator = Curator(setting.spec(seed), CuratorSettings(shuffle_rows=SHUFFLE_ROWS, ready_batches=1 << 30))
        self.build: PoolBuild = fill_pool(self.curator, setting.pool, setting.shard_rows, setting.dim,
                                          setting.clusters, seed, setting.score_spread)  # fmt: skip
        self.payloads = Payloads(seed + 1)
        self.rng = np.random.default_rng(seed + 2)
        self.epoch = -1
        self.queue: collections.deque = collections.deque()
        self.super_batch = self.curator.selector.super_batch

    def run(self, batches: int, snapshot: bool = False) -> Timings:
        """Reads shards (starting epochs as needed) until `batches` full-size batches are timed."""
        out = Timings()
        while out.count < batches:
            if not self.queue:
                if self.epoch >= 0:
                    self.curator.finish_reading(self.epoch)
                    self._select_ready(out, snapshot)
                self.epoch += 1
                self.queue.extend(self.curator.start_epoch(self.epoch, self.build.records))
                continue
            shard = self.queue.popleft()
            table = self.payloads.table(shard.index, shard.rows)
            started = time.perf_counter()
            reason = self.curator.add_shard(self.epoch, shard.index, table)
            out.intake_seconds += time.perf_counter() - started
            if reason:
                raise RuntimeError(f"shard {shard.index} refused: {reason}")
            self._select_ready(out, snapshot)
        return out

    def _select_ready(self, out: Timings, snapshot: bool) -> None:
        curator, epoch = self.curator, self.epoch
        while True:
            wall, cpu = time.perf_counter(), time.process_time()
            table = curator.draw(epoch)
            draw_wall, draw_cpu = time.perf_counter() - wall, time.process_time() - cpu
            if table is None:
                break
            rows = table.num_rows
            losses = self._losses(rows) if snapshot else None
            before = curator.selector.seconds
            wall, cpu = time.perf_counter(), time.process_time()
            curator.select(epoch, table, losses)
            call_wall, call_cpu = time.perf_counter() - wall, time.process_time() - cpu
            select_wall = curator.selector.seconds - before
            ledger = curator.epochs[epoch].ledger
            seq, kept = len(ledger) - 1, ledger.ids[-1]
            # The curator no longer encodes (it emits a batch plan; the gateway gathers and
            # encodes, loader.gather.encode_plan): what it would cost there, timed on this batch's
            # rows, is reported apart as `encode` and is not part of select.
            plan = ledger.lookup(0, seq).payload
            tables = {s: self.payloads.table(s, self.build.records[s].rows) for s in plan.shards()}
            cpu = time.process_time()
            encode_plan(plan, tables)
            encode_cpu = time.process_time() - cpu
            call_cpu += encode_cpu  # select's share below is call_cpu - encode_cpu, as before
            curator.ack(0, epoch, seq)  # a trainer's ack frees the payload
            reported = self._losses(len(kept))
            wall, cpu = time.perf_counter(), time.process_time()
            reason = curator.feedback(kept, reported)
            feedback_wall, feedback_cpu = time.perf_counter() - wall, time.process_time() - cpu
            if reason:
                raise RuntimeError(f"feedback refused: {reason}")
            out.batches_emitted += 1
            if rows != self.super_batch:  # an epoch's short tail batches are left out
                continue
            for clock, values in (
                ("wall", (draw_wall, select_wall, call_wall - select_wall, feedback_wall)),
                ("cpu", (draw_cpu, max(call_cpu - encode_cpu, 0.0), encode_cpu, feedback_cpu)),
            ):
                for part, value in zip(PARTS, values):
                    getattr(out, clock)[part].append(value)

    def _losses(self, n: int) -> np.ndarray:
        return (self.setting.score_spread * self.rng.gamma(2.0, 0.5, size=n)).astype(np.float32)
