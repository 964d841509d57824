"""A refreshed reference model swapped into the running service: the scorers take the new
weights, every curator learns that its reference losses are now old, and the whole pool is
rescored in the background, shard by shard, so that curators reading a shard later find its new
losses ready and the pool budget compares kept samples by them.

Serving never waits for the rescoring: a shard not rescored yet serves with its old losses. Only
the losses change; embeddings (and so clusters, centroids, the budget's geometry and the
diversity memory) stay those of the model the service started with. The weights path in use is
kept in `state_dir` (`reference.json`), so a restarted service scores with it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("loader.refresh")

REFERENCE_FILE = "reference.json"


class Rescoring:
    """The background pass over the pool after a new reference; a newer reference restarts it."""

    def __init__(self, readers: list, scorers: Callable[[], list], budget=None) -> None:
        self._readers, self._scorers, self._budget = readers, scorers, budget
        self._task: asyncio.Task | None = None
        self.pending = 0  # shards of the running pass not rescored yet

    def restart(self, records: list) -> None:
        """Rescores `records` (the readable shards) from the first, cancelling a pass under way."""
        if self._task is not None:
            self._task.cancel()
        self.pending = len(records)  # set now: a caller that polls it never sees a pass not begun
        self._task = asyncio.get_running_loop().create_task(self._rescore(records))

    async def wait(self, timeout_s: float) -> None:
        """Until the running pass ends (for tests and benchmarks)."""
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)

    async def _rescore(self, records: list) -> None:
        for record in records:
            try:
                await self._rescore_one(record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the curator that reads the shard next scores it, or quarantines it
                log.warning("rescoring %s with the new reference failed: %r", record.uri, exc)
            self.pending -= 1
        log.info("the pool is rescored with the new reference (%d shards)", len(records))

    async def _rescore_one(self, record) -> None:
        reader = self._readers[record.index % len(self._readers)]  # where the curators read it too
        shard = await reader.read.remote(record.uri, record.index)
        if shard.error:
            return
        scorers = self._scorers()
        ref_loss, _ = await scorers[record.index % len(scorers)].score.remote(shard.ref)
        if self._budget is not None:
            await self._budget.revalue.remote(record.index, ref_loss)
