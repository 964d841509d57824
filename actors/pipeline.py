"""Builds and holds the actor graph: one registry, a pool of shard readers, a curator per job.

The gateway talks to this object and to the `JobHandle`s it gives out, never to an actor; every
method that reaches an actor returns something to `await`, so the gateway's event loop never
blocks on Ray.
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

from actors.arrivals import Arrivals
from actors.budget import BudgetActor
from actors.curator import CuratorActor
from actors.gateways import Gateways
from actors.gather import ShardTables
from actors.job import JobHandle
from actors.reader import ShardReaderActor
from actors.refresh import REFERENCE_FILE, Rescoring
from actors.registry import RegistryActor
from actors.runtime import ensure_ray
from actors.routing import learner_scorer
from actors.scorer import ScorerActor
from loader.config import ServiceConfig
from loader.curator import CuratorSettings, JobSpec
from loader.errors import ConfigError, JobConflict, ShardError
from loader.registry import ShardRecord
from loader.scoring import ModelSpec, build_model
from loader.selection.options import SelectionOptions
from loader.selection.policies import make_policy
from loader.sources import expand, remote_settings
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
        # The model that gives reference losses: the config's, or the one `set_reference` put in
        # place before a restart (kept in state_dir).
        self._loss_reference = self._saved_reference()
        self._settings = CuratorSettings(
            shuffle_rows=config.shuffle_rows, ready_batches=config.ready_batches, select_ahead=config.select_ahead,
            checkpoint_s=config.checkpoint_s,
        )
        self._registry = RegistryActor.remote(self.state_dir)
        # Remote-shard settings: the config's `remote` keys over LOADER_REMOTE_*, for every reader
        # and for what this process reads itself (remote globs, the first shard), scoped to this
        # pipeline's calls since the process may outlive it.
        self._remote = remote = config.remote.settings()
        placed = ShardReaderActor.options(resources=dict(config.reader_resources)) if config.reader_resources else ShardReaderActor
        self._readers = [placed.remote(config.reader_cache_mb << 20, remote) for _ in range(config.readers)]
        # The gateway's side of the data plane: batch plans gathered from shard tables it maps.
        self._table_bytes = max(config.reader_cache_mb, 64) << 20
        self._tables = ShardTables(self._readers, self._table_bytes, remote)
        # Gateway processes beyond the caller's (config `gateways`), started by the first gateway.
        self._gateways: Gateways | None = None
        # Scorers start with the first job that needs them: a uniform-only service never pays for
        # a model (and its worker process).
        self._scorers: list = []
        self._jobs: dict[str, JobHandle] = {}
        self._budget = None
        if config.max_samples is not None:
            self._budget = BudgetActor.remote(self.state_dir, config.max_samples, config.selection.max_clusters)
            self._start_scorers()  # every shard is scored when it joins the pool
        self._arrivals = Arrivals(self._registry, self._readers, lambda: self._scorers, self._budget, self._pruned)
        self._rescoring = Rescoring(self._readers, lambda: self._scorers, self._budget)
        try:
            with remote_settings.using(remote):
                uris = expand(list(config.shards))
        except ShardError as exc:  # a remote listing that failed
            raise ConfigError("shards", str(exc)) from None
        if not uris:
            raise ConfigError("shards", f"{list(config.shards)} matched no files")
        records = ray.get(self._registry.add.remote(uris))
        if all(r.state == "quarantined" for r in records):
            raise ConfigError("shards", f"none of the {len(records)} shards matched by {list(config.shards)} exists")
        if config.reference is not None:
            self._check_model_columns(records)

    def _check_model_columns(self, records: list[ShardRecord]) -> None:
        """Stops the start, naming the key, when the reference cannot take the pool's input or
        label column (a string, a variable-length list ...), judged on the first readable shard.
        Read here, not by a reader actor: readers may not be placed yet (their nodes still coming
        up), and the start must not wait for them. Later shards of another schema are quarantined."""
        from loader.scoring import check_model_column
        from loader.sources import read_shard

        for record in records:
            if record.state == "quarantined":
                continue
            try:
                with remote_settings.using(self._remote):
                    schema = read_shard(record.uri).schema
            except Exception:  # the curators quarantine it with its reason, as always
                continue
            for name, key, label in ((self.config.input_column, "columns.input", False),
                                     (self.config.label_column, "columns.label", True)):  # fmt: skip
                if name not in schema.names:
                    raise ConfigError(key, f"column {name!r} is not in {record.uri} (it has {', '.join(schema.names)})")
                check_model_column(schema, name, key, label)
            return

    async def add_shards(self, patterns: list[str]) -> list[ShardRecord]:
        """Registers shards while the service runs; the passes of running stream jobs take them in."""
        with remote_settings.using(self._remote):
            uris = expand(patterns)
        if not uris:
            raise ConfigError("uris", f"{patterns} matched no files")
        records = await self._arrivals.admit(await self._registry.add.remote(uris))
        streams = [handle for handle in self._jobs.values() if handle.spec.stream]
        await asyncio.gather(*(handle.shards_added() for handle in streams))
        return records

    async def admit_pool(self) -> None:
        """Brings the shards the service started with within the pool budget (if there is one),
        in the background: serving starts at once and pruned samples stop being served as soon
        as they are pruned."""
        await self._arrivals.admit_pool()

    def _saved_reference(self) -> ModelSpec | None:
        saved = self._store.load_json(REFERENCE_FILE)
        if saved is None or self.config.reference is None:
            return self.config.reference
        spec = dataclasses.replace(self.config.reference, weights=saved["weights"])
        try:
            build_model(spec)
        except Exception as exc:  # the file went: score with the config's, and say so
            log.warning("the reference set before the restart (%s) does not load (%s); using the config's",
                        saved["weights"], exc)  # fmt: skip
            return self.config.reference
        log.info("reference losses from %s (set with set-reference before this start)", saved["weights"])
        return spec

    async def set_reference(self, weights: str) -> tuple[str, int]:
        """Swaps a refreshed reference (the config's factory and kwargs, new weights) into the
        running scorers and rescores the pool in the background; returns the new reference's
        fingerprint and the shards to rescore. ConfigError (key "weights") if it does not load."""
        if self.config.reference is None:
            raise JobConflict("this service has no reference model (`reference` in its config) to replace")
        spec = dataclasses.replace(self.config.reference, weights=os.path.abspath(os.path.expanduser(weights)))
        if not os.path.isfile(spec.weights):
            raise ConfigError("weights", f"{spec.weights} is not a file the service can read")
        try:  # in a thread: loading a model must not stall the gateway's event loop
            await asyncio.to_thread(build_model, spec)
        except ConfigError as exc:
            raise ConfigError("weights", str(exc)) from None
        self._loss_reference = spec
        fingerprint = spec.fingerprint()
        await asyncio.gather(*(scorer.set_reference.remote(spec) for scorer in self._scorers))
        self._store.save_json(REFERENCE_FILE, {"weights": spec.weights, "fingerprint": fingerprint})
        await asyncio.gather(*(handle.reference_replaced() for handle in self._jobs.values()))
        records = await self._registry.readable.remote()
        if self._scorers:  # no scorer yet: the first one starts with this reference
            self._rescoring.restart(records)
        log.info("reference replaced by %s; rescoring %d shards in the background", spec.weights, len(records))
        return fingerprint, len(records) if self._scorers else 0

    async def rescored(self, timeout_s: float = 300.0) -> None:
        """Waits until the pool is rescored with the newest reference (for tests and benchmarks)."""
        await self._rescoring.wait(timeout_s)

    async def _pruned(self, ids: np.ndarray) -> None:
        await asyncio.gather(*(handle.prune(ids) for handle in self._jobs.values()))

    def job(self, spec: JobSpec) -> JobHandle:
        """The job `spec.job`, its curator created on first use; JobConflict if the spec disagrees."""
        known = self._jobs.get(spec.job)
        if known is not None:
            reason = known.spec.conflict(spec)
            if reason:
                raise JobConflict(reason)
            return known
        saved = self._store.load_json(f"{job_folder(spec.job)}/spec.json")
        if saved is not None:
            reason = _spec_from_json(saved).conflict(spec)
            if reason:
                raise JobConflict(f"{reason} (as saved in {self.state_dir}; use another job name)")
        policy = make_policy(spec.policy, spec.options)
        needs_reference = policy.needs_reference and spec.options.irreducible_loss == "reference"
        needs_scores = needs_reference or spec.options.needs_embeddings
        if needs_reference and self.config.reference is None:
            raise JobConflict(
                f"policy {spec.policy!r} needs a reference model; set `reference` in the service config "
                f"(or the option irreducible_loss=learner_best)"
            )
        if needs_scores and self.config.reference is None and self.config.embedding_column is None:
            raise JobConflict(
                f"policy {spec.policy!r} needs embeddings: set `reference` or `columns.embedding` in the service config"
            )
        # Learner losses come from a scorer in snapshot mode only; feedback mode takes the losses
        # trainers report, and a policy without a reference model then needs no scorer at all.
        if needs_scores or (policy.needs_learner and spec.options.learner_loss == "snapshot"):
            self._start_scorers()
        curator = CuratorActor.remote(
            spec, self._settings, self._registry, self._readers, self._scorers, self.config.prefetch_shards,
            self.state_dir, self._budget,
        )  # fmt: skip
        self._store.save_json(f"{job_folder(spec.job)}/spec.json", dataclasses.asdict(spec))
        handle = self._jobs[spec.job] = JobHandle(spec, curator, self._tables)
        return handle

    async def open_stream(self, spec: JobSpec, stream) -> JobHandle:
        """Registers a trainer stream (`rank`, `epoch`, `superseded(message)`) with the job
        `spec.job` and returns the job; a stream the rank had before is told it is superseded,
        on whichever gateway it is. JobConflict (or ConfigError / ValueError for options no
        policy takes) as `job` and `JobHandle.open_stream` raise them."""
        handle = self.job(spec)
        previous = handle.open_stream(stream.rank, stream.epoch, stream, self.epochs_kept)
        if previous is not None:
            previous.superseded(f"superseded by a newer stream for job {spec.job!r} rank {stream.rank}")
        return handle

    def close_stream(self, handle: JobHandle, stream) -> None:
        handle.close_stream(stream.rank, stream)

    def known_job(self, job: str) -> JobHandle | None:
        return self._jobs.get(job)

    async def start_gateways(self, address: str, count: int, requires_token: bool) -> list[str]:
        """Starts `count` more gateway processes on `address` (see actors/gateways.py); returns
        their bound addresses. Called on the event loop of the first gateway, which then answers
        their control calls."""
        if self._gateways is None:
            self._gateways = Gateways(self, self.config, self._readers, self._table_bytes, self._remote)
        return await self._gateways.start(address, count, requires_token)

    async def stop_gateways(self) -> None:
        if self._gateways is not None:
            gateways, self._gateways = self._gateways, None
            await gateways.stop()

    @property
    def trainers_connected(self) -> int:
        return sum(handle.streams for handle in self._jobs.values())

    async def release_idle(self, now: float | None = None) -> list[str]:
        """Checkpoints and stops the curators of jobs idle for `job_idle_s`; returns their names.
        A later Hello starts a new curator, which restores the job from state_dir."""
        now = time.monotonic() if now is None else now
        idle = [job for job, handle in self._jobs.items()
                if handle.idle_since is not None and handle.idle_for(now) >= self.config.job_idle_s]  # fmt: skip
        released = []
        for job in idle:
            handle = self._jobs[job]
            try:
                await handle.checkpoint()
            except Exception as exc:  # its journals still hold every batch
                log.warning("job %s: checkpoint before release failed: %r", job, exc)
            if handle.streams or self._jobs.get(job) is not handle:  # a trainer came back meanwhile
                continue
            del self._jobs[job]
            released.append(job)
            ray.kill(handle.actor, no_restart=True)
            for scorer in self._scorers:
                scorer.drop_learner.remote(job)
            log.info("job %s idle for %.0f s: curator released (state kept)", job, self.config.job_idle_s)
        return released

    async def ready(self) -> None:
        """Returns once every actor started so far answers (each is placed and constructed)."""
        await asyncio.gather(*(actor.process.remote() for group in self.actors().values() for actor in group))

    def actors(self) -> dict[str, list]:
        """Handles of the running actors by role (for operators' tooling and fault tests)."""
        return {
            "registry": [self._registry], "readers": list(self._readers), "scorers": list(self._scorers),
            "curators": [handle.actor for handle in self._jobs.values()],
            "budget": [self._budget] if self._budget is not None else [],
            "gateways": self._gateways.actors if self._gateways is not None else [],
        }  # fmt: skip

    def curator(self, job: str):
        """The job's curator actor (for fault tests and operators' tooling)."""
        return self._jobs[job].actor

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
        return await self._jobs[job].cluster_of(ids)

    def _start_scorers(self) -> None:
        if self._scorers:
            return
        config = self.config
        gpus = config.scorer_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
        self._scorers = [
            ScorerActor.options(num_gpus=gpus, resources=dict(config.scorer_resources)).remote(
                config.reference, config.input_column, config.label_column, self.state_dir, config.embedding_column,
                self._loss_reference,
            )
            for _ in range(config.scorers)
        ]

    async def push_weights(self, job: str, weights: bytes, step: int) -> int:
        """Hands a trainer's snapshot to the scorer that computes the job's learner losses."""
        known = self._jobs.get(job)
        if known is None:
            raise JobConflict(f"unknown job {job!r}: open its Train stream first")
        spec = known.spec
        if spec.options.learner_loss != "snapshot":
            raise JobConflict(f"job {job!r} takes learner losses from {spec.options.learner_loss}, not snapshots")
        learner = ModelSpec.from_mapping(
            {"factory": spec.options.learner, "kwargs": json.loads(spec.options.learner_kwargs)}, key="options.learner"
        )
        scorer = learner_scorer(self._scorers, job)
        await scorer.set_learner.remote(job, learner, weights, step)
        await known.snapshot_pushed(step)
        return step

    async def stats(self, job: str = "") -> dict:
        # Handles taken now: a job released while this awaits is still reported as it was.
        handles = [handle for name, handle in self._jobs.items() if not job or name == job]
        jobs = await asyncio.gather(*(handle.stats() for handle in handles))
        scorers = await asyncio.gather(*(s.stats.remote() for s in self._scorers))
        for handle, info in zip(handles, jobs):
            name = handle.spec.job
            info["weight_pushes"], info["weights_step"] = handle.pushes, handle.weights_step
            costs = [s["learner"][name] for s in scorers if name in s["learner"]]
            info["learner_scored_samples"] = sum(c[0] for c in costs)
            info["learner_scoring_seconds"] = sum(c[1] for c in costs)
        return {
            "shards": await self._registry.records.remote(),
            "jobs": list(jobs),
            "reference_scored_samples": sum(s["reference_samples"] for s in scorers),
            "reference_scoring_seconds": sum(s["reference_seconds"] for s in scorers),
            "reference_weights": self._loss_reference.weights or "" if self._loss_reference is not None else "",
            "rescore_pending": self._rescoring.pending,
            "scorer_devices": [s["device"] for s in scorers],
            "budget": await self._budget.stats.remote() if self._budget is not None else None,
            "trainers_connected": self.trainers_connected,
        }

    def shutdown(self, checkpoint_timeout_s: float = 30.0) -> None:
        """Saves every job's selection state, then stops the actors."""
        if self._gateways is not None:  # stopped first: nothing may open a stream meanwhile
            self._gateways.kill()
            self._gateways = None
        curators = [handle.actor for handle in self._jobs.values()]
        try:
            ray.get([c.checkpoint.remote() for c in curators], timeout=checkpoint_timeout_s)
        except Exception as exc:  # stopping must go on; the journals still hold every batch
            log.warning("could not checkpoint every job before stopping: %r", exc)
        for curator in curators:
            ray.kill(curator, no_restart=True)
        for actor in [*self._readers, *self._scorers, self._registry, *([self._budget] if self._budget else [])]:
            ray.kill(actor, no_restart=True)
        self._jobs.clear()
        if self._owns_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _spec_from_json(saved: dict) -> JobSpec:
    return JobSpec(**{**saved, "options": SelectionOptions(**saved["options"])})
