"""Shards that join the pool while the service runs: each is read once on arrival, refused when it
cannot join (unreadable, or another schema than the pool's, with the difference named), and
scored in the background when a job needs reference scores, before any curator asks for them.
With a pool budget, every shard is scored at once and admitted to the budget, and what the budget
prunes is handed to `on_pruned` (which tells every curator) before the call returns.

The caller learns each shard's state when the call returns, so `loader add-shards` can say which
shards joined and why the others did not. Nothing is lost: a refused shard stays in the registry
as quarantined with its reason (a service restart gives it another try).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import numpy as np

from loader.registry import PENDING, ShardRecord
from loader.sources.schema import mismatch_reason

log = logging.getLogger("loader.arrivals")


class Arrivals:
    def __init__(
        self, registry, readers: list, scorers: Callable[[], list], budget=None,
        on_pruned: Callable[[np.ndarray], Awaitable[None]] | None = None,
    ) -> None:  # fmt: skip
        self._registry, self._readers, self._scorers = registry, readers, scorers
        self._budget, self._on_pruned = budget, on_pruned
        self._schema = None

    async def admit_pool(self) -> None:
        """Admits to the budget every readable shard it has not admitted (the shards the service
        started with, or those a restart found unadmitted)."""
        if self._budget is None:
            return
        for record in await self._registry.readable.remote():
            if not await self._budget.admitted.remote(record.index):
                result, ref, error = await self._read(record)
                if not error:  # an unreadable shard is the curators' to quarantine, as always
                    await self._keep_budget(record, ref)

    async def admit(self, records: list[ShardRecord]) -> list[ShardRecord]:
        """Reads every new (pending) shard of `records`; returns the records as they stand after."""
        new = [r for r in records if r.state == PENDING]
        if new:
            await self._pool_schema(exclude={r.index for r in new})
            await asyncio.gather(*(self._admit_one(r) for r in new))
        return await self._registry.records_of.remote([r.uri for r in records])

    async def _read(self, record: ShardRecord):
        """The decoded shard (zero-copy from the object store) and its reference, or an error."""
        reader = self._readers[record.index % len(self._readers)]  # where the curators read it too
        shard = await reader.read.remote(record.uri, record.index)
        if shard.error:
            return None, None, shard.error
        return await shard.ref, shard.ref, ""

    async def _pool_schema(self, exclude: set[int]):
        """The pool's schema: that of its first readable shard in registration order, as curators
        take it. None while no shard was there before this call's."""
        if self._schema is None:
            for record in await self._registry.readable.remote():
                if record.index in exclude:
                    continue
                result, _, error = await self._read(record)
                if not error:
                    self._schema = result.table.schema
                    break
        return self._schema

    async def _admit_one(self, record: ShardRecord) -> None:
        result, ref, error = await self._read(record)
        if not error and self._schema is not None:
            error = mismatch_reason(result.table.schema, self._schema)
        if error:
            await self._registry.quarantine.remote(record.index, error)
            return
        if self._schema is None:
            self._schema = result.table.schema  # the pool had no readable shard: this one sets it
        await self._registry.mark_read.remote(record.index, result.table.num_rows)
        if self._budget is not None:
            await self._keep_budget(record, ref)
            return
        scorers = self._scorers()
        if scorers:  # the scorer keeps the scores; the curators' requests then find them
            scorers[record.index % len(scorers)].score.remote(ref)

    async def _keep_budget(self, record: ShardRecord, ref) -> None:
        scorers = self._scorers()
        try:
            ref_loss, embeddings = await scorers[record.index % len(scorers)].score.remote(ref)
        except Exception as exc:  # rows the reference cannot take: the shard cannot join
            await self._registry.quarantine.remote(record.index, f"reference scoring failed: {exc!r}")
            return
        pruned = await self._budget.admit.remote(record.index, ref_loss, embeddings)
        if len(pruned) and self._on_pruned is not None:
            await self._on_pruned(pruned)
