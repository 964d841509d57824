"""The shard registry: which shards the pool holds, their stable indices, and which are quarantined."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

PENDING, OK, QUARANTINED = "pending", "ok", "quarantined"


def missing_at_registration(uri: str) -> bool:
    """Whether a URI can be quarantined as "not found" when it is registered: only a local path
    that does not exist. A remote URI (or any `scheme://`) or a `pipe:` command is found out when
    it is read."""
    return "://" not in uri and not uri.startswith("pipe:") and not os.path.exists(uri)


@dataclasses.dataclass
class ShardRecord:
    index: int
    uri: str
    state: str = PENDING
    reason: str = ""
    rows: int = 0


class ShardRegistry:
    """Assigns each URI an index once; indices are never reused, so sample ids stay stable."""

    def __init__(self) -> None:
        self._records: list[ShardRecord] = []
        self._by_uri: dict[str, int] = {}

    def add(self, uris: Iterable[str]) -> list[ShardRecord]:
        added = []
        for uri in uris:
            if uri in self._by_uri:
                added.append(self._records[self._by_uri[uri]])
                continue
            record = ShardRecord(index=len(self._records), uri=uri)
            self._records.append(record)
            self._by_uri[uri] = record.index
            added.append(record)
        return [dataclasses.replace(r) for r in added]

    def mark_read(self, index: int, rows: int) -> None:
        record = self._records[index]
        if record.state != QUARANTINED:
            record.state, record.rows = OK, rows

    def quarantine(self, index: int, reason: str) -> None:
        record = self._records[index]
        record.state, record.reason, record.rows = QUARANTINED, reason, 0

    def readable(self) -> list[ShardRecord]:
        return [dataclasses.replace(r) for r in self._records if r.state != QUARANTINED]

    def records_of(self, uris: Iterable[str]) -> list[ShardRecord]:
        return [dataclasses.replace(self._records[self._by_uri[u]]) for u in uris]

    def record(self, index: int) -> ShardRecord:
        return dataclasses.replace(self._records[index])

    def records(self) -> list[ShardRecord]:
        return [dataclasses.replace(r) for r in self._records]

    def get_state(self) -> dict:
        return {"records": [dataclasses.asdict(r) for r in self._records]}

    @classmethod
    def from_state(cls, state: dict) -> "ShardRegistry":
        registry = cls()
        for row in state["records"]:
            record = ShardRecord(**row)
            registry._records.append(record)
            registry._by_uri[record.uri] = record.index
        return registry
