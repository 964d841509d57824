"""Lifelong benchmark: one trainer streams while a task sequence arrives as shards.

MNIST-1D in 5 stages of 2 classes each ({0,1}, {2,3}, ..., {8,9}). Each stage's rows carry label
noise (`label_noise` of them moved uniformly to one of the other nine classes) and near-duplicates
(`duplicates` of the stage's rows are jittered copies of `bases` of its samples, each copy keeping
its base's label, right or wrong). Every run gets the same pool budget (`budget_fraction` of all
rows that ever arrive), the same model, optimiser, batch size and the same trainer steps per stage;
only how the pool is kept and how batches are drawn from it differ:

- `fifo`: uniform passes over the pool, the oldest rows evicted at the budget;
- `class_reservoir`: GDumb's greedy class-balanced memory (on the labels the trainer sees, noisy
  ones included), uniform passes over it;
- `cluster_reservoir`: the same balancer on clusters of the reference's embeddings (the
  embeddings the service clusters), no labels;
- `curated`: the service: a stream job with `learnability+bandit+diversity` on a service with
  `max_samples` = the budget and the reference model; stage 0's shards are the service's starting
  pool, each later stage's shards are added with `loader.client.admin.add_shards` when the stage
  starts, and the trainer reports per-sample losses;
- `curated_no_bandit`: the same with `learnability+diversity`;
- `pruned_uniform`: the same service and budget, but the stream job `uniform`: what the pool
  budget's pruning does without any selection of batches (not one of the issue's five runs).

The first three run in this process without a service (same model, optimiser, batch size, steps,
budget and seeds); each curated run starts its own in-process service (Pipeline +
BackgroundGateway on one local Ray) and stops it afterwards.

The reference model is trained with `loader.reference.train_reference` on a clean holdout:
`--reference first` on stage 0's holdout only, which is what a lifelong deployment has at start;
`--reference refresh` (default) starts so too, and each later stage brings its holdout: a reference
trained on the holdouts of every stage so far is swapped into the running service with
`loader.client.admin.set_reference` before the stage's shards are added (embeddings, and so
clusters and `cluster_reservoir`, stay those of stage 0's reference); `--reference all` on every
stage's holdout from the start, an upper bound that reality does not offer.

    python benchmarks/lifelong.py --quick --json benchmarks/results/lifelong-quick.json
    python benchmarks/lifelong.py --json benchmarks/results/lifelong.json
    python benchmarks/lifelong.py --quick --reference all --name lifelong-quick-refall
    python benchmarks/lifelong.py --quick --reference first --name lifelong-quick-first
    python benchmarks/lifelong.py --quick --runs curated --curated-options keep_ratio=0.5 diversity=1
    python benchmarks/lifelong.py --quick --runs curated,curated_no_bandit --push-every 5 \
        --curated-options learner_loss=snapshot learner=loader.models:cnn1d

`--embedding input` has the service (`columns.embedding: x`) and `cluster_reservoir` compare the
inputs themselves instead of the reference's body (see docs/decisions.md, "Which embeddings").
`--curated-policy` replaces the policy of `curated` (`curated_no_bandit` runs it without
`+bandit`, and without a `bandit` key in `--curated-options`). `--quick` (100 steps per stage)
runs all 5 runs x 3 seeds in about 6 minutes on 2 CPU cores; the default is 400 steps per stage.

Measured after every stage: test accuracy (10-way, class-incremental) on each task seen so far,
their mean, forgetting (mean over earlier tasks of the best accuracy so far minus the current) and
backward transfer (mean over earlier tasks of the current accuracy minus the accuracy right after
that task's stage); what the pool holds (per task, label noise, copies) and what was served. For
the curated runs also: seconds from each `add_shards` returning to the first sample of those
shards reaching the trainer, and the PSS of every process of the service (this one, which also
trains, and the Ray actors, from `Pipeline.processes()` and /proc/PID/smaps_rollup).
`python benchmarks/lifelong_report.py PATH.json` redraws the table and the PNG from a JSON file.
"""

from __future__ import annotations

import actors  # noqa: F401  (must precede anything that imports ray: keeps a local Ray on loopback)

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time

import numpy as np
import ray
import torch
import torch.nn.functional as F

import lifelong_report
from actors.pipeline import Pipeline
from actors.runtime import ensure_ray, shutdown
from loader.client import RemoteLoader
from loader.client.admin import add_shards, fetch_stats, set_reference
from loader.config import from_mapping
from loader.datasets.mnist1d import _generate
from loader.gateway.server import BackgroundGateway
from loader.ids import make_ids, row_of, shard_of
from loader.models import accuracy
from loader.reference import train_reference
from loader.scoring import ModelSpec, build_model, reference_scores
from loader.selection.clusters import OnlineClusters
from loader.sources.writers import write_parquet
from pools import corrupt

STAGES, CLASSES_PER_STAGE = 5, 2
RUNS = ("fifo", "class_reservoir", "cluster_reservoir", "curated", "curated_no_bandit", "pruned_uniform")
SERVICE_RUNS = ("curated", "curated_no_bandit", "pruned_uniform")
BUDGET_FIELDS = ("kept_samples", "pruned_near_duplicate", "pruned_low_value", "clusters")


@dataclasses.dataclass
class Settings:
    seeds: int = 3
    steps_per_stage: int = 400
    # MNIST-1D samples generated (80% train, 20% test): about 800 train rows per class.
    samples: int = 10000
    data_seed: int = 0
    # Of each stage's real rows, kept aside with clean labels for the reference (never streamed).
    holdout_fraction: float = 0.15
    label_noise: float = 0.2
    duplicates: float = 0.3  # share of a stage's streamed rows that are jittered copies
    bases: int = 8  # samples per stage that the copies are made of
    jitter: float = 0.05  # of a copy, in standard deviations of the inputs per position
    budget_fraction: float = 0.4  # pool budget, of all rows that ever arrive
    shards_per_stage: int = 4
    model: str = "cnn1d"
    reference_model: str = "cnn1d"
    reference_epochs: int = 40
    reference: str = "refresh"
    # What clusters, diversity and the budget compare: "reference" (the reference's body) or
    # "input" (the model input itself, as the service's `columns.embedding: x`).
    embedding: str = "input"
    batch_size: int = 64
    lr: float = 1e-3
    curated_policy: str = "learnability+bandit+diversity"
    # The service's limits: small, as every run on this 2-core machine shares the CPUs, except the
    # shuffle buffer: at the service's default it holds the whole pool (256 rows, a shard or two,
    # made every batch one or two tasks: uniform over the pruned pool 0.25 against 0.56).
    shuffle_rows: int = 4096
    ready_batches: int = 1
    prefetch_shards: int = 1
    prefetch: int = 2  # RemoteLoader credits
    # Curated runs push the learner's weights every this many steps (0: never). Only useful with
    # `--curated-options learner_loss=snapshot learner=loader.models:cnn1d`.
    push_every: int = 0
    max_clusters: int = 32  # cluster_reservoir's cap, as the service's default `max_clusters`
    torch_threads: int = 1
    runs: tuple[str, ...] = RUNS


QUICK = dict(steps_per_stage=100)


# -- data -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stream:
    """Every row that ever arrives, in arrival order (stage by stage), with what it is."""

    x: np.ndarray  # float32 [n, 40]
    y: np.ndarray  # the label served (corrupted for `noisy` rows)
    noisy: np.ndarray  # bool
    duplicate: np.ndarray  # bool: a jittered copy of a base
    task: np.ndarray  # stage the row arrives in
    shards: list[list[str]]  # per stage
    positions: dict[str, np.ndarray]  # per shard file name, the stream position of each of its rows
    holdout: list[list[str]]  # per stage, clean holdout shards
    test: list[tuple[torch.Tensor, torch.Tensor]]  # per task, test inputs and labels

    def stage_rows(self, stage: int) -> np.ndarray:
        return np.flatnonzero(self.task == stage)


def build_stream(s: Settings, out_dir: str) -> Stream:
    data = _generate(s.samples, s.data_seed)
    x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int64)
    x_test, y_test = np.asarray(data["x_test"], np.float32), np.asarray(data["y_test"], np.int64)
    rng = np.random.default_rng(s.data_seed)
    spread = x.std(axis=0)
    parts: list[dict[str, np.ndarray]] = []
    holdout: list[list[str]] = []
    for stage in range(STAGES):
        classes = np.arange(CLASSES_PER_STAGE) + CLASSES_PER_STAGE * stage
        rows = rng.permutation(np.flatnonzero(np.isin(y, classes)))
        n_hold = round(s.holdout_fraction * len(rows))
        hold, distinct = rows[:n_hold], rows[n_hold:]
        path = os.path.join(out_dir, f"holdout-{stage}.parquet")
        write_parquet(path, {"x": x[hold], "y": y[hold]})
        holdout.append([path])
        # Labels are corrupted before copying, so a copy repeats its base's label, right or wrong.
        labels, flip = corrupt(y[distinct], s.label_noise, rng)
        n_copies = round(s.duplicates / (1 - s.duplicates) * len(distinct))
        bases = rng.choice(len(distinct), size=s.bases, replace=False)
        of = bases[np.arange(n_copies) % s.bases]
        copies = x[distinct][of] + rng.normal(size=(n_copies, x.shape[1])).astype(np.float32) * s.jitter * spread
        order = rng.permutation(len(distinct) + n_copies)  # copies mixed into every shard
        parts.append({
            "x": np.concatenate([x[distinct], copies])[order],
            "y": np.concatenate([labels, labels[of]])[order],
            "noisy": np.concatenate([flip, flip[of]])[order].astype(bool),
            "duplicate": np.repeat([False, True], [len(distinct), n_copies])[order],
        })  # fmt: skip
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    task = np.repeat(np.arange(STAGES), [len(p["y"]) for p in parts])
    stream = Stream(**cols, task=task, shards=[], positions={}, holdout=holdout, test=[])
    for stage in range(STAGES):
        paths = []
        for i, rows in enumerate(np.array_split(stream.stage_rows(stage), s.shards_per_stage)):
            path = os.path.join(out_dir, f"stage{stage}-{i:03d}.parquet")
            # `pos` lets the trainer tell what it was served; the service streams it like any column.
            write_parquet(path, {"x": stream.x[rows], "y": stream.y[rows], "pos": rows.astype(np.int64)})
            stream.positions[os.path.basename(path)] = rows
            paths.append(path)
        stream.shards.append(paths)
        mine = np.isin(y_test, np.arange(CLASSES_PER_STAGE) + CLASSES_PER_STAGE * stage)
        stream.test.append((torch.from_numpy(x_test[mine]), torch.from_numpy(y_test[mine])))
    return stream


def composition(stream: Stream, positions: np.ndarray) -> dict:
    """What a set of stream rows holds: rows per task, shares of noisy labels and of copies."""
    positions = np.asarray(positions, np.int64)
    n = len(positions)
    return {
        "rows": n,
        "per_task": np.bincount(stream.task[positions], minlength=STAGES).tolist(),
        # By the label the trainer sees: a curated pick can starve one class of a task.
        "per_label": np.bincount(stream.y[positions], minlength=STAGES * CLASSES_PER_STAGE).tolist(),
        "noisy": float(stream.noisy[positions].mean()) if n else float("nan"),
        "duplicate": float(stream.duplicate[positions].mean()) if n else float("nan"),
    }


# -- the reference --------------------------------------------------------------------------------


def make_reference(s: Settings, stream: Stream, out_dir: str) -> tuple[dict, str, np.ndarray]:
    """Trains the reference on the holdout `--reference` names: (metrics, weights path, embeddings
    of every stream row)."""
    holdout = [p for stage in stream.holdout for p in stage] if s.reference == "all" else stream.holdout[0]
    weights = os.path.join(out_dir, "reference.pt")
    spec = ModelSpec(f"loader.models:{s.reference_model}")
    metrics = train_reference(spec, holdout, weights, epochs=s.reference_epochs, progress=False)
    model = build_model(dataclasses.replace(spec, weights=weights))
    metrics["test_accuracy_per_task"] = [accuracy(model, *t) for t in stream.test]
    _, embeddings = reference_scores(model, torch.from_numpy(stream.x), torch.from_numpy(stream.y))
    print(
        f"reference ({s.reference}): {metrics['samples']} holdout rows, {metrics['seconds']:.1f} s, test accuracy per "
        f"task {' '.join(f'{a:.2f}' for a in metrics['test_accuracy_per_task'])}",
        flush=True,
    )
    return metrics, weights, embeddings


def refreshed_references(s: Settings, stream: Stream, first: str, out_dir: str) -> list[str]:
    """Per stage, the reference a refresh swaps in when the stage starts: stage 0's is `first`,
    stage k's is trained on the clean holdouts of stages 0..k (once, shared by every run)."""
    paths = [first]
    for stage in range(1, STAGES):
        holdout = [p for part in stream.holdout[: stage + 1] for p in part]
        paths.append(os.path.join(out_dir, f"reference-stage{stage}.pt"))
        spec = ModelSpec(f"loader.models:{s.reference_model}")
        metrics = train_reference(spec, holdout, paths[-1], epochs=s.reference_epochs, progress=False)
        model = build_model(dataclasses.replace(spec, weights=paths[-1]))
        accs = " ".join(f"{accuracy(model, *t):.2f}" for t in stream.test)
        print(f"refreshed reference for stage {stage}: {metrics['samples']} holdout rows, {metrics['seconds']:.1f} s, "
              f"test accuracy per task {accs}", flush=True)  # fmt: skip
    return paths


# -- in-process memories --------------------------------------------------------------------------


class FifoMemory:
    """The newest `budget` rows."""

    def __init__(self, budget: int) -> None:
        self.budget, self._rows = budget, np.zeros(0, np.int64)

    def arrive(self, rows: np.ndarray, keys: np.ndarray | None = None) -> None:
        self._rows = np.concatenate([self._rows, rows])[-self.budget :]

    def rows(self) -> np.ndarray:
        return self._rows


class BalancedMemory:
    """GDumb's greedy balancer over any key (a label, a cluster id): while full, a row whose key
    holds fewer than budget / keys seen replaces a random row of the largest key's."""

    def __init__(self, budget: int, rng: np.random.Generator) -> None:
        self.budget, self._rng = budget, rng
        self._members: dict[int, list[int]] = {}
        self._size = 0

    def arrive(self, rows: np.ndarray, keys: np.ndarray) -> None:
        for row, key in zip(rows.tolist(), keys.tolist()):
            members = self._members.setdefault(key, [])
            if self._size < self.budget:
                members.append(row)
                self._size += 1
            elif len(members) < self.budget // len(self._members):
                largest = self._members[max(self._members, key=lambda k: len(self._members[k]))]
                at = int(self._rng.integers(len(largest)))
                largest[at] = largest[-1]  # swap-remove: order within a key does not matter
                largest.pop()
                members.append(row)

    def rows(self) -> np.ndarray:
        return np.sort(np.fromiter((r for m in self._members.values() for r in m), np.int64))


class InProcess:
    """Batches of uniform passes over an in-process memory; a new pass starts when data arrives."""

    def __init__(self, name: str, stream: Stream, s: Settings, seed: int, budget: int, embeddings: np.ndarray) -> None:
        self.stream, self.s, self.name = stream, s, name
        self._rng = np.random.default_rng(seed)
        self._memory = FifoMemory(budget) if name == "fifo" else BalancedMemory(budget, np.random.default_rng(seed))
        # cluster_reservoir: the service's clusterer, on the reference's embeddings, stage by stage.
        self._clusters = OnlineClusters(max_clusters=s.max_clusters, seed=seed) if name == "cluster_reservoir" else None
        self._embeddings = embeddings
        self._order = np.zeros(0, np.int64)
        self.x, self.y = torch.from_numpy(stream.x), torch.from_numpy(stream.y)

    def begin(self, stage: int) -> None:
        # A stage arrives shard by shard, each shard's rows in order, as the service's budget
        # takes them in (and clusters them: one `assign` per shard).
        for path in self.stream.shards[stage]:
            rows = self.stream.positions[os.path.basename(path)]
            keys = self._clusters.assign(self._embeddings[rows]) if self._clusters is not None else self.stream.y[rows]
            self._memory.arrive(rows, keys)
        self._order = np.zeros(0, np.int64)

    def next(self):
        if len(self._order) < self.s.batch_size:
            self._order = self._rng.permutation(self._memory.rows())
        picks, self._order = self._order[: self.s.batch_size], self._order[self.s.batch_size :]
        return self.x[picks], self.y[picks], picks

    def report(self, losses: torch.Tensor, model, step: int) -> None:
        pass

    def end(self, stage: int) -> dict:
        return {"pool": composition(self.stream, self._memory.rows())}

    def close(self) -> None:
        pass


# -- the service ----------------------------------------------------------------------------------


@contextlib.contextmanager
def lifelong_service(s: Settings, shards: list[str], weights: str, budget: int):
    """One Pipeline + gateway in this process with the pool budget and the reference; yields the
    address and the pipeline."""
    config = from_mapping({
        "shards": shards, "address": "127.0.0.1:0", "num_cpus": 2, "shuffle_rows": s.shuffle_rows,
        "ready_batches": s.ready_batches, "prefetch_shards": s.prefetch_shards, "max_samples": budget,
        "reference": {"factory": f"loader.models:{s.reference_model}", "weights": weights}, "log_level": "WARNING",
        **({"columns": {"input": "x", "label": "y", "embedding": "x"}} if s.embedding == "input" else {}),
    })  # fmt: skip
    pipeline = Pipeline(config)
    gateway = BackgroundGateway(pipeline, config)
    try:
        yield gateway.start(), pipeline
    finally:
        gateway.stop()
        pipeline.shutdown()


def pss_mib(pids: dict[str, int]) -> dict[str, float]:
    """Proportional set size of each process, MiB (a process gone meanwhile is left out)."""
    out = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                kib = next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
        out[name] = kib / 1024
    return out


class Served:
    """Batches of a stream job on the service; stages after the first are added as they start."""

    def __init__(
        self, name: str, address: str, pipeline, stream: Stream, s: Settings, seed: int, options: dict,
        references: list[str] | None = None,
    ) -> None:  # fmt: skip
        self.name, self.address, self.pipeline, self.stream, self.s = name, address, pipeline, stream, s
        self._references = references  # per stage, the reference swapped in as it starts
        policy = s.curated_policy if name == "curated" else s.curated_policy.replace("+bandit", "")
        if name == "pruned_uniform":
            policy, options = "uniform", {}
        if name == "curated_no_bandit":
            options = {k: v for k, v in options.items() if k != "bandit"}
        self.policy, self.options = policy, options
        self.loader = RemoteLoader(
            address, job=f"{name}-seed{seed}", batch_size=s.batch_size, stream=True, policy=policy, options=options,
            seed=seed, prefetch=s.prefetch, max_steps=STAGES * s.steps_per_stage,
        )  # fmt: skip
        self._it = iter(self.loader)
        self._batch = None
        self._started = time.perf_counter()
        self.first_batch_s: float | None = None
        # index -> stream positions of its rows, for the shards the service knows.
        self._rows_of: dict[int, np.ndarray] = {}
        self._waiting: tuple[set[int], float, int] | None = None
        self.arrivals: list[dict] = []

    def begin(self, stage: int) -> None:
        if stage == 0:  # the starting pool: the service was created with these shards
            for shard in fetch_stats(self.address).shards:
                self._rows_of[shard.index] = self.stream.positions[os.path.basename(shard.uri)]
            return
        set_s = None
        if self._references is not None:  # the stage's holdout brought a refreshed reference
            t0 = time.perf_counter()
            set_reference(self.address, self._references[stage])
            set_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        infos = add_shards(self.address, self.stream.shards[stage])
        returned = time.perf_counter()
        refused = [f"{i.uri}: {i.state} {i.reason}" for i in infos if i.state != "ok"]
        if refused:
            raise RuntimeError(f"stage {stage}: shards refused: {refused}")
        for info in infos:
            self._rows_of[info.index] = self.stream.positions[os.path.basename(info.uri)]
        self._waiting = ({i.index for i in infos}, returned, 0)
        self.arrivals.append({"stage": stage, "add_shards_s": returned - t0, "served_after_s": None, "batches": None,
                              "set_reference_s": set_s})  # fmt: skip

    def next(self):
        self._batch = batch = next(self._it)
        now = time.perf_counter()
        if self.first_batch_s is None:
            self.first_batch_s = now - self._started
        if self._waiting is not None:
            indices, returned, batches = self._waiting
            self._waiting = (indices, returned, batches + 1)
            if np.isin(shard_of(batch["_id"].numpy()), list(indices)).any():
                self.arrivals[-1].update(served_after_s=now - returned, batches=batches + 1)
                self._waiting = None
        return batch["x"], batch["y"], batch["pos"].numpy()

    def report(self, losses: torch.Tensor, model, step: int) -> None:
        self.loader.report(self._batch, losses)
        if self.s.push_every and (step == 1 or step % self.s.push_every == 0):
            self.loader.push_weights(model, step=step)

    def end(self, stage: int) -> dict:
        budget = self._settled()
        kept = self._kept_positions()
        pss = pss_mib(self.pipeline.processes())
        return {
            "pool": composition(self.stream, kept),
            "budget": {k: getattr(budget, k) for k in BUDGET_FIELDS},
            "pss_mib": pss,
        }  # fmt: skip

    def _settled(self, timeout_s: float = 60.0):
        """The budget's stats once it has taken in every row added so far (the starting pool is
        admitted in the background)."""
        rows = sum(len(r) for r in self._rows_of.values())
        deadline = time.monotonic() + timeout_s
        while True:
            budget = fetch_stats(self.address).budget
            if budget.kept_samples + budget.pruned_near_duplicate + budget.pruned_low_value >= rows:
                return budget
            if time.monotonic() > deadline:
                print(f"{self.name}: the budget took in fewer than {rows} rows within {timeout_s} s", flush=True)
                return budget
            time.sleep(0.05)

    def _kept_positions(self) -> np.ndarray:
        """Stream positions of the rows the budget keeps: every row added, less those it pruned."""
        pruned = ray.get(self.pipeline.actors()["budget"][0].pruned.remote())
        ids = np.concatenate([make_ids(index, len(rows)) for index, rows in self._rows_of.items()])
        kept = ids[~np.isin(ids, pruned)]
        return np.concatenate([self._rows_of[i][row_of(kept[shard_of(kept) == i])] for i in self._rows_of])

    def close(self) -> None:
        self._it.close()
        self.loader.close()


# -- the trainer ----------------------------------------------------------------------------------


def train_stages(s: Settings, source, stream: Stream, seed: int) -> dict:
    """Trains `steps_per_stage` batches per stage from `source`, evaluating after each stage."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec(f"loader.models:{s.model}")).train()
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    per_stage, stages, step = [], [], 0
    for stage in range(STAGES):
        source.begin(stage)
        rows_served = []
        t0 = time.perf_counter()
        waited = 0.0  # in source.next(): the trainer waiting for its batch
        for _ in range(s.steps_per_stage):
            t1 = time.perf_counter()
            x, y, pos = source.next()
            waited += time.perf_counter() - t1
            losses = F.cross_entropy(model(x), y, reduction="none")
            # No `_weight`: top-k serves weight 1, and the in-process runs have none.
            losses.mean().backward()
            opt.step()
            opt.zero_grad()
            step += 1
            source.report(losses, model, step)
            rows_served.append(pos)
        seconds = time.perf_counter() - t0
        per_stage.append([accuracy(model, *stream.test[t]) for t in range(stage + 1)])
        served = composition(stream, np.concatenate(rows_served))
        stages.append({"seconds": seconds, "batch_wait_seconds": waited, "served": served, **source.end(stage)})
    return {"per_stage": per_stage, "stages": stages}


def summary(per_stage: list[list[float]]) -> dict:
    """Average accuracy, forgetting and backward transfer after each stage (None at stage 0)."""
    average, forgetting, transfer = [], [], []
    for s, accs in enumerate(per_stage):
        average.append(float(np.mean(accs)))
        if s == 0:
            forgetting.append(None)
            transfer.append(None)
            continue
        best = [max(per_stage[l][j] for l in range(j, s)) for j in range(s)]
        forgetting.append(float(np.mean([best[j] - accs[j] for j in range(s)])))
        transfer.append(float(np.mean([accs[j] - per_stage[j][j] for j in range(s)])))
    return {"average_accuracy": average, "forgetting": forgetting, "backward_transfer": transfer}


def run_one(
    name: str, s: Settings, stream: Stream, seed: int, budget: int, weights: str, embeddings, options,
    references: list[str] | None = None,
) -> dict:  # fmt: skip
    t0 = time.perf_counter()
    if name not in SERVICE_RUNS:
        result = train_stages(s, InProcess(name, stream, s, seed, budget, embeddings), stream, seed)
        extra = {}
    else:
        with lifelong_service(s, stream.shards[0], weights, budget) as (address, pipeline):
            source = Served(name, address, pipeline, stream, s, seed, options, references)
            try:
                result = train_stages(s, source, stream, seed)
            finally:
                source.close()
        extra = {"policy": source.policy, "options": source.options, "arrivals": source.arrivals,
                 "first_batch_s": source.first_batch_s}  # fmt: skip
    metrics = summary(result["per_stage"])
    wall = time.perf_counter() - t0
    print(
        f"{name:18s} seed {seed}: average accuracy per stage {' '.join(f'{a:.3f}' for a in metrics['average_accuracy'])}; "
        f"final forgetting {metrics['forgetting'][-1]:.3f} bwt {metrics['backward_transfer'][-1]:.3f}; {wall:.1f} s",
        flush=True,
    )
    for arrival in extra.get("arrivals", []):
        print(f"    stage {arrival['stage']}: add_shards {arrival['add_shards_s']:.2f} s, first new sample served "
              f"after {arrival['served_after_s']} s ({arrival['batches']} batches)", flush=True)  # fmt: skip
    return {"name": name, "seed": seed, **result, **metrics, **extra, "wall_seconds": wall}


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s, options = settings_from(args)
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(s.torch_threads)
    os.makedirs(args.out_dir, exist_ok=True)
    command = " ".join(["python benchmarks/lifelong.py", *(sys.argv[1:] if argv is None else argv)])
    name = args.name or ("lifelong-quick" if args.quick else "lifelong")

    with tempfile.TemporaryDirectory(prefix="lifelong-") as data_dir:
        t0 = time.perf_counter()
        stream = build_stream(s, data_dir)
        seen = len(stream.y)
        budget = round(s.budget_fraction * seen)
        print(f"data: {seen} rows in {STAGES} stages ({np.bincount(stream.task).tolist()}), budget {budget}; "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
        reference, weights, embeddings = make_reference(s, stream, data_dir)
        refreshing = s.reference == "refresh" and any(r in SERVICE_RUNS for r in s.runs)
        references = refreshed_references(s, stream, weights, data_dir) if refreshing else None
        if s.embedding == "input":  # cluster_reservoir clusters what the service does
            embeddings = stream.x.reshape(len(stream.x), -1)
        ensure_ray(None, num_cpus=2)
        results = []
        try:
            for seed in range(s.seeds):
                for run in s.runs:
                    results.append(run_one(run, s, stream, seed, budget, weights, embeddings, options, references))
        finally:
            shutdown()

    setup = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, no GPU, {platform.platform()}",
        "torch": torch.__version__,
        "command": command,
        "rows_per_stage": np.bincount(stream.task).tolist(),
        "holdout_rows": reference["samples"],
        "test_rows_per_task": [len(t[1]) for t in stream.test],
        "budget": budget,
        "rows_seen": seen,
        "stage_composition": [composition(stream, stream.stage_rows(t)) for t in range(STAGES)],
        "reference": reference,
        "curated_options": options,
        "wall_seconds": time.perf_counter() - started,
    }
    payload = {
        # Exactly these keys per run; everything else about a run is under `details`.
        "runs": [{"name": r["name"], "seed": r["seed"], "average_accuracy": r["average_accuracy"][-1],
                  "forgetting": r["forgetting"][-1], "backward_transfer": r["backward_transfer"][-1],
                  "per_stage": r["per_stage"]} for r in results],  # fmt: skip
        "details": results,
        "settings": dataclasses.asdict(s),
        "setup": setup,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)
    print(lifelong_report.write(payload, args.out_dir, name))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['steps_per_stage']} steps per stage: all runs x 3 seeds in < 10 min on 2 cores")
    p.add_argument("--json", metavar="PATH", help="write the per-run figures as JSON")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the PNG and the markdown table go")
    p.add_argument("--name", help="file name stem of the outputs (default lifelong or lifelong-quick)")
    p.add_argument("--runs", help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--reference", choices=("refresh", "first", "all", "none"),
                   help="the reference's clean holdout: stage 0's, refreshed with each stage's as it starts "
                        "(default), stage 0's only, every stage's from the start (upper bound), none")
    p.add_argument("--curated-options", nargs="*", default=[], metavar="KEY=VALUE",
                   help="selection options of the curated runs' stream jobs (service defaults otherwise)")  # fmt: skip
    for field in dataclasses.fields(Settings):
        if field.name in ("runs", "reference"):
            continue
        default = getattr(d, field.name)
        p.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), dest=field.name, help=f"default {default}")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> tuple[Settings, dict]:
    values = dict(QUICK) if args.quick else {}
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name, None)
        if value is not None and field.name != "runs":
            values[field.name] = value
    if args.runs:
        values["runs"] = tuple(dict.fromkeys(args.runs.split(",")))
        unknown = [r for r in values["runs"] if r not in RUNS]
        if unknown:
            raise SystemExit(f"unknown runs {', '.join(unknown)}; known: {', '.join(RUNS)}")
    options = {}
    for item in args.curated_options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--curated-options takes KEY=VALUE, got {item!r}")
        options[key] = value
    s = Settings(**values)
    if s.seeds < 1 or s.steps_per_stage < 1:
        raise SystemExit("--seeds and --steps-per-stage must be positive")
    if s.embedding not in ("reference", "input"):
        raise SystemExit(f"--embedding takes reference or input, got {s.embedding!r}")
    if s.reference == "none":
        raise SystemExit(
            "--reference none is not implemented yet: cluster_reservoir and the curated runs need a "
            "reference model's embeddings (and the service's max_samples needs its scores)"
        )
    if "+bandit" not in s.curated_policy and "curated_no_bandit" in s.runs:
        print(f"note: --curated-policy {s.curated_policy!r} has no +bandit; curated_no_bandit runs the same policy")
    return s, options


if __name__ == "__main__":
    sys.exit(main())
