"""Batch plans turned into payloads in the gateway's process (issue 15: the curator plans, the
gateway gathers).

The decoded shard tables come from the readers, whose cache hands out the copy already in Ray's
object store; on the same node `await ref` maps it without copying. Tables are kept here for the
next batches (least recently used out past `max_bytes`), keyed by the shard file's identity
(size and mtime, or the read cache's copy for remote shards), so a rewritten shard is read again.
The gather and the Arrow IPC encode run in a worker thread: numpy and Arrow release the GIL for
the copies, and the gateway's event loop goes on serving other streams meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import pyarrow as pa
from ray.exceptions import ObjectLostError, RayActorError

from actors.routing import shard_reader
from loader.errors import ShardError
from loader.gather import encode_plan
from loader.job.plan import BatchPlan
from loader.shard_cache import ShardCache
from loader.sources import remote_settings
from loader.sources.remote_settings import RemoteSettings

log = logging.getLogger("loader.gather")

READ_ATTEMPTS = 3
# Batches smaller than this are gathered on the event loop: for a 45 KB batch, handing the work to
# a thread and back cost more than the work.
THREAD_BYTES = 1 << 20


class ShardTables:
    def __init__(self, readers: list, max_bytes: int, remote: RemoteSettings | None = None) -> None:
        # `remote`: the service's remote-shard settings, where the read cache of a remote shard is.
        self._readers, self.max_bytes, self._remote = readers, max_bytes, remote
        # identity -> (table, object ref that keeps it in the object store)
        self._tables: collections.OrderedDict[tuple, tuple[pa.Table, object]] = collections.OrderedDict()
        self._bytes = 0
        self.reads = self.hits = 0

    def _cached(self, key: tuple) -> pa.Table | None:
        entry = self._tables.get(key)
        if entry is None:
            return None
        self._tables.move_to_end(key)
        self.hits += 1
        return entry[0]

    def _key(self, index: int, uri: str) -> tuple:
        if self._remote is None:
            return ShardCache.identity(uri, index) or (uri, index, "unstated")
        with remote_settings.using(self._remote):
            return ShardCache.identity(uri, index) or (uri, index, "unstated")

    async def table(self, index: int, uri: str) -> pa.Table:
        key = self._key(index, uri)
        cached = self._cached(key)
        if cached is not None:
            return cached
        self.reads += 1
        for attempt in range(READ_ATTEMPTS):
            try:
                # The same reader the curator reads this shard with: its cache has it.
                shard = await shard_reader(self._readers, index, attempt).read.remote(uri, index)
                if shard.error:
                    raise ShardError(uri, shard.error)
                result = await shard.ref
                self._keep(key, result.table, shard.ref)
                return result.table
            except (RayActorError, ObjectLostError) as exc:
                log.warning("an actor died while the gateway read %s (%s); retrying", uri, exc)
        raise ShardError(uri, f"actors died {READ_ATTEMPTS} times reading it")

    def _keep(self, key: tuple, table: pa.Table, ref) -> None:
        if key in self._tables:
            return
        self._tables[key] = (table, ref)
        self._bytes += table.nbytes
        while self._bytes > self.max_bytes and len(self._tables) > 1:
            _, (old, _) = self._tables.popitem(last=False)
            self._bytes -= old.nbytes

    async def payload(self, plan: BatchPlan) -> pa.Buffer:
        """The plan's Arrow IPC payload; a ShardError when one of its shards cannot be read."""
        uris = dict(plan.uris)
        tables: dict[int, pa.Table] = {}
        missing = []
        for shard in plan.shards():
            table = self._cached(self._key(shard, uris[shard]))
            if table is None:
                missing.append(shard)
            else:
                tables[shard] = table
        if missing:  # only then the tasks and awaits: most batches find every table here
            tables.update(zip(missing, await asyncio.gather(*(self.table(s, uris[s]) for s in missing))))
        row_bytes = sum(t.nbytes / max(t.num_rows, 1) for t in tables.values()) / max(len(tables), 1)
        if row_bytes * plan.rows < THREAD_BYTES:
            return self._encode(plan, tables, uris)  # a thread hand-off would cost more than this
        return await asyncio.to_thread(self._encode, plan, tables, uris)

    @staticmethod
    def _encode(plan: BatchPlan, tables: dict[int, pa.Table], uris: dict[int, str]) -> pa.Buffer:
        try:
            return encode_plan(plan, tables)
        except (IndexError, ValueError, pa.ArrowException) as exc:
            # Rows the plan names that its shards no longer hold: a shard rewritten in place.
            names = ", ".join(uris[s] for s in tables)
            raise ShardError(names, f"the batch's rows no longer match its shards: {exc}") from None
