"""The shard registry as a Ray actor: one source of truth for every curator and the gateway."""

from __future__ import annotations

import logging

import ray

from actors.runtime import ProcessInfo
from loader.registry import PENDING, QUARANTINED, ShardRecord, ShardRegistry, missing_at_registration
from loader.sources.remote import redact
from loader.state_store import StateStore

log = logging.getLogger("loader.registry")

REGISTRY_FILE = "registry.json"


# Every method is safe to repeat, so calls cut off by a crash are retried on the restarted actor,
# which reloads the registry from state_dir.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RegistryActor(ProcessInfo):
    def __init__(self, state_dir: str | None = None) -> None:
        self._store = StateStore(state_dir) if state_dir else None
        saved = self._store.load_json(REGISTRY_FILE) if self._store is not None else None
        if saved is None:
            self._registry = ShardRegistry()
        else:
            # Indices stay (sample ids depend on them); a restart gives quarantined shards another
            # try, since the operator may have fixed them in the meantime.
            for record in saved["records"]:
                if record["state"] == QUARANTINED:
                    record.update(state=PENDING, reason="", rows=0)
            self._registry = ShardRegistry.from_state(saved)

    def _save(self) -> None:
        if self._store is not None:
            self._store.save_json(REGISTRY_FILE, self._registry.get_state())

    def add(self, uris: list[str]) -> list[ShardRecord]:
        """Registers URIs; a local file that does not exist is quarantined at once, so the
        operator hears of it at start-up rather than in the first epoch."""
        for record in self._registry.add(uris):
            if record.state == "pending" and missing_at_registration(record.uri):
                self.quarantine(record.index, "not found")
        self._save()
        return self._registry.records_of(uris)

    def mark_read(self, index: int, rows: int) -> None:
        before = self._registry.record(index)
        self._registry.mark_read(index, rows)
        if (before.state, before.rows) != (self._registry.record(index).state, rows):
            self._save()

    def quarantine(self, index: int, reason: str) -> None:
        record = self._registry.record(index)
        if record.state != QUARANTINED:
            log.error("quarantined shard %s: %s", redact(record.uri), reason)  # a URL's password stays out
        self._registry.quarantine(index, reason)
        self._save()

    def readable(self) -> list[ShardRecord]:
        return self._registry.readable()

    def records(self) -> list[ShardRecord]:
        return self._registry.records()

    def records_of(self, uris: list[str]) -> list[ShardRecord]:
        return self._registry.records_of(uris)
