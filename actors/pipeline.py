"""Builds and holds the actor graph: one registry, a pool of shard readers, a curator per job.

The gateway talks to this object only; every method that reaches an actor returns something to
`await`, so the gateway's event loop never blocks on Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import ray

from actors.curator import CuratorActor
from actors.reader import ShardReaderActor
from actors.registry import RegistryActor
from actors.runtime import ensure_ray
from actors.routing import learner_scorer
from actors.scorer import ScorerActor
from loader.config import ServiceConfig
from loader.curator import CuratorSettings, JobSpec
from loader.errors import ConfigError, JobConflict
from loader.registry import ShardRecord
from loader.scoring import ModelSpec, build_model
from loader.selection.options import SelectionOptions
from loader.selection.policies import make_policy
from loader.sources import expand
from loader.state_store import StateStore, job_folder

log = logging.getLogger("loader.pipeline")


class Pipeline:
    def __init__(self, config: ServiceConfig) -> None:
        if config.reference is not None:
            build_model(config.reference)  # fail at start-up, naming the key, not in a scorer later
        ensure_ray(config.ray_address, config.num_cpus)
        self.config = config
        # Without a state_dir, state still goes to a private folder for this service's lifetime:
        # an actor that Ray restarts rebuilds itself from it. (Across nodes, state_dir must be a
        # volume every node mounts at the same path.)
        self._owns_state = config.state_dir is None
        self.state_dir = tempfile.mkdtemp(prefix="loader-state-") if self._owns_state else os.path.abspath(config.state_dir)
        self._store = StateStore(self.state_dir)
        self._settings = CuratorSettings(
            shuffle_rows=config.shuffle_rows, ready_batches=config.ready_batches, checkpoint_s=config.checkpoint_s
        )
        self._registry = RegistryActor.remote(self.state_dir)
        self._readers = [ShardReaderActor.remote(config.reader_cache_mb << 20) for _ in range(config.readers)]
        # Scorers start with the first job that needs them: a uniform-only service never pays for
        # a model (and its worker process).
        self._scorers: list = []
        self._jobs: dict[str, tuple[JobSpec, object]] = {}
        # Job -> connected trainer streams; job -> when its last stream ended.
        self._streams: dict[str, int] = {}
        self._idle_since: dict[str, float] = {}
        # Job -> (snapshots received, newest step).
        self._pushes: dict[str, tuple[int, int]] = {}
        uris = expand(list(config.shards))
        if not uris:
            raise ConfigError("shards", f"{list(config.shards)} matched no files")
        records = ray.get(self._registry.add.remote(uris))
        if all(r.state == "quarantined" for r in records):
            raise ConfigError("shards", f"none of the {len(records)} shards matched by {list(config.shards)} exists")

    async def add_shards(self, patterns: list[str]) -> list[ShardRecord]:
        uris = expand(patterns)
        if not uris:
            raise ConfigError("uris", f"{patterns} matched no files")
        return await self._registry.add.remote(uris)

    def job(self, spec: JobSpec):
        """The curator of `spec.job`, created on first use; JobConflict if the spec disagrees."""
        known = self._jobs.get(spec.job)
        if known is not None:
            reason = known[0].conflict(spec)
            if reason:
                raise JobConflict(reason)
            return known[1]
        saved = self._store.load_json(f"{job_folder(spec.job)}/spec.json")
        if saved is not None:
            reason = _spec_from_json(saved).conflict(spec)
            if reason:
                raise JobConflict(f"{reason} (as saved in {self.state_dir}; use another job name)")
        policy = make_policy(spec.policy, spec.options)
        needs_scores = policy.needs_reference or spec.options.needs_embeddings
        if needs_scores and self.config.reference is None:
            raise JobConflict(f"policy {spec.policy!r} needs a reference model; set `reference` in the service config")
        # Learner losses come from a scorer in snapshot mode only; feedback mode takes the losses
        # trainers report, and a policy without a reference model then needs no scorer at all.
        if needs_scores or (policy.needs_learner and spec.options.learner_loss == "snapshot"):
            self._start_scorers()
        curator = CuratorActor.remote(
            spec, self._settings, self._registry, self._readers, self._scorers, self.config.prefetch_shards,
            self.state_dir,
        )  # fmt: skip
        self._store.save_json(f"{job_folder(spec.job)}/spec.json", dataclasses.asdict(spec))
        self._jobs[spec.job] = (spec, curator)
        return curator

    def attach(self, job: str) -> None:
        """A trainer stream of `job` began: the job is not idle."""
        self._streams[job] = self._streams.get(job, 0) + 1
        self._idle_since.pop(job, None)

    def detach(self, job: str) -> None:
        self._streams[job] -= 1
        if not self._streams[job]:
            del self._streams[job]
            self._idle_since[job] = time.monotonic()

    async def release_idle(self, now: float | None = None) -> list[str]:
        """Checkpoints and stops the curators of jobs idle for `job_idle_s`; returns their names.
        A later Hello starts a new curator, which restores the job from state_dir."""
        now = time.monotonic() if now is None else now
        idle = [job for job, since in self._idle_since.items()
                if now - since >= self.config.job_idle_s and job in self._jobs]  # fmt: skip
        for job in idle:
            curator = self._jobs[job][1]
            try:
                await curator.checkpoint.remote()
            except Exception as exc:  # its journals still hold every batch
                log.warning("job %s: checkpoint before release failed: %r", job, exc)
            if job in self._streams:  # a trainer came back while we checkpointed
                continue
            del self._jobs[job]
            self._idle_since.pop(job, None)
            ray.kill(curator, no_restart=True)
            for scorer in self._scorers:
                scorer.drop_learner.remote(job)
            log.info("job %s idle for %.0f s: curator released (state kept)", job, self.config.job_idle_s)
        return idle

    def actors(self) -> dict[str, list]:
        """Handles of the running actors by role (for operators' tooling and fault tests)."""
        return {
            "registry": [self._registry], "readers": list(self._readers), "scorers": list(self._scorers),
            "curators": [curator for _, curator in self._jobs.values()],
        }  # fmt: skip

    def curator(self, job: str):
        return self._jobs[job][1]

    @property
    def epochs_kept(self) -> int:
        """Epochs a job's curator keeps; starting a newer one forgets the oldest."""
        return self._settings.keep_epochs

    def processes(self, timeout_s: float = 60.0) -> dict[str, int]:
        """OS process ids of the running actors by name ("CuratorActor-1", ...), this one (the
        gateway's) as "gateway" and, with a Ray this process started, its raylet. Blocks: for
        operators' tooling, not the event loop."""
        handles = [h for group in self.actors().values() for h in group]
        found = ray.get([h.process.remote() for h in handles], timeout=timeout_s)
        seen: dict[str, int] = {}
        out = {"gateway": os.getpid()}
        for kind, pid in found:
            seen[kind] = seen.get(kind, 0) + 1
            out[f"{kind}-{seen[kind]}"] = pid
        node = getattr(ray._private.worker, "_global_node", None)  # None when joined, not started
        for info in node.all_processes.get("raylet", []) if node is not None else []:
            out["raylet"] = info.process.pid
        return out

    async def cluster_of(self, job: str, ids: np.ndarray) -> np.ndarray:
        """The job's cluster id of each sample id (-1: not assigned), for analysis tools."""
        return await self.curator(job).cluster_of.remote(np.asarray(ids, np.int64))

    @staticmethod
    def next_batch(curator, rank: int, epoch: int, seq: int, acked: int = -1):
        return curator.next_batch.remote(rank, epoch, seq, acked)

    @staticmethod
    def ack(curator, rank: int, epoch: int, seq: int) -> None:
        curator.ack.remote(rank, epoch, seq)

    @staticmethod
    def feedback(curator, ids: np.ndarray, losses: np.ndarray):
        return curator.feedback.remote(ids, losses)

    def _start_scorers(self) -> None:
        if self._scorers:
            return
        config = self.config
        gpus = config.scorer_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
        self._scorers = [
            ScorerActor.options(num_gpus=gpus).remote(
                config.reference, config.input_column, config.label_column, self.state_dir
            )
            for _ in range(config.scorers)
        ]

    async def push_weights(self, job: str, weights: bytes, step: int) -> int:
        """Hands a trainer's snapshot to the scorer that computes the job's learner losses."""
        known = self._jobs.get(job)
        if known is None:
            raise JobConflict(f"unknown job {job!r}: open its Train stream first")
        spec = known[0]
        if spec.options.learner_loss != "snapshot":
            raise JobConflict(f"job {job!r} takes learner losses from {spec.options.learner_loss}, not snapshots")
        learner = ModelSpec.from_mapping(
            {"factory": spec.options.learner, "kwargs": json.loads(spec.options.learner_kwargs)}, key="options.learner"
        )
        scorer = learner_scorer(self._scorers, job)
        await scorer.set_learner.remote(job, learner, weights, step)
        count, _ = self._pushes.get(job, (0, 0))
        self._pushes[job] = (count + 1, step)
        return step

    async def stats(self, job: str = "") -> dict:
        names = [name for name in self._jobs if not job or name == job]
        jobs = await asyncio.gather(*(self._jobs[name][1].stats.remote() for name in names))
        scorers = await asyncio.gather(*(s.stats.remote() for s in self._scorers))
        for name, info in zip(names, jobs):
            info["weight_pushes"], info["weights_step"] = self._pushes.get(name, (0, 0))
            costs = [s["learner"][name] for s in scorers if name in s["learner"]]
            info["learner_scored_samples"] = sum(c[0] for c in costs)
            info["learner_scoring_seconds"] = sum(c[1] for c in costs)
        return {
            "shards": await self._registry.records.remote(),
            "jobs": list(jobs),
            "reference_scored_samples": sum(s["reference_samples"] for s in scorers),
            "reference_scoring_seconds": sum(s["reference_seconds"] for s in scorers),
            "scorer_devices": [s["device"] for s in scorers],
        }

    def shutdown(self, checkpoint_timeout_s: float = 30.0) -> None:
        """Saves every job's selection state, then stops the actors."""
        curators = [curator for _, curator in self._jobs.values()]
        try:
            ray.get([c.checkpoint.remote() for c in curators], timeout=checkpoint_timeout_s)
        except Exception as exc:  # stopping must go on; the journals still hold every batch
            log.warning("could not checkpoint every job before stopping: %r", exc)
        for curator in curators:
            ray.kill(curator, no_restart=True)
        for actor in [*self._readers, *self._scorers, self._registry]:
            ray.kill(actor, no_restart=True)
        self._jobs.clear()
        if self._owns_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _spec_from_json(saved: dict) -> JobSpec:
    return JobSpec(**{**saved, "options": SelectionOptions(**saved["options"])})
