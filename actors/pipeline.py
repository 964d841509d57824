"""Builds and holds the actor graph: one registry, a pool of shard readers, a curator per job.

The gateway talks to this object only; every method that reaches an actor returns something to
`await`, so the gateway's event loop never blocks on Ray.
"""

from __future__ import annotations

import asyncio
import logging
import numpy as np
import ray

from actors.curator import CuratorActor
from actors.reader import ShardReaderActor
from actors.registry import RegistryActor
from actors.runtime import ensure_ray
from loader.config import ServiceConfig
from loader.curator import CuratorSettings, JobSpec
from loader.errors import ConfigError
from loader.registry import ShardRecord
from loader.sources import expand

log = logging.getLogger("loader.pipeline")


class JobConflict(ValueError):
    pass


class Pipeline:
    def __init__(self, config: ServiceConfig) -> None:
        ensure_ray(config.ray_address, config.num_cpus)
        self.config = config
        self._settings = CuratorSettings(shuffle_rows=config.shuffle_rows, ready_batches=config.ready_batches)
        self._registry = RegistryActor.remote()
        self._readers = [ShardReaderActor.remote() for _ in range(config.readers)]
        self._jobs: dict[str, tuple[JobSpec, object]] = {}
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
        curator = CuratorActor.remote(spec, self._settings, self._registry, self._readers, self.config.prefetch_shards)
        self._jobs[spec.job] = (spec, curator)
        return curator

    @staticmethod
    def next_batch(curator, rank: int, epoch: int, seq: int):
        return curator.next_batch.remote(rank, epoch, seq)

    @staticmethod
    def ack(curator, rank: int, epoch: int, seq: int) -> None:
        curator.ack.remote(rank, epoch, seq)

    @staticmethod
    def feedback(curator, ids: np.ndarray, losses: np.ndarray):
        return curator.feedback.remote(ids, losses)

    async def stats(self, job: str = "") -> dict:
        curators = [c for name, (_, c) in self._jobs.items() if not job or name == job]
        jobs = await asyncio.gather(*(c.stats.remote() for c in curators))
        return {"shards": await self._registry.records.remote(), "jobs": list(jobs)}

    def shutdown(self) -> None:
        for _, curator in self._jobs.values():
            ray.kill(curator)
        for actor in [*self._readers, self._registry]:
            ray.kill(actor)
        self._jobs.clear()
