"""The shard registry as a Ray actor: one source of truth for every curator and the gateway."""

from __future__ import annotations

import logging
import os

import ray

from loader.registry import ShardRecord, ShardRegistry

log = logging.getLogger("loader.registry")


@ray.remote(num_cpus=0, max_restarts=-1)
class RegistryActor:
    def __init__(self) -> None:
        self._registry = ShardRegistry()

    def add(self, uris: list[str]) -> list[ShardRecord]:
        """Registers URIs; a local file that does not exist is quarantined at once, so the
        operator hears of it at start-up rather than in the first epoch."""
        for record in self._registry.add(uris):
            if record.state == "pending" and "://" not in record.uri and not os.path.exists(record.uri):
                self.quarantine(record.index, "not found")
        return self._registry.records_of(uris)

    def mark_read(self, index: int, rows: int) -> None:
        self._registry.mark_read(index, rows)

    def quarantine(self, index: int, reason: str) -> None:
        record = self._registry.records()[index]
        if record.state != "quarantined":
            log.error("quarantined shard %s: %s", record.uri, reason)
        self._registry.quarantine(index, reason)

    def readable(self) -> list[ShardRecord]:
        return self._registry.readable()

    def records(self) -> list[ShardRecord]:
        return self._registry.records()
