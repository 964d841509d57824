"""Batch plans turned into payloads in the gateway's process (issue 15: the curator plans, the
gateway gathers).

The decoded shard tables come from the readers, whose cache hands out the copy already in Ray's
object store; on the same node `await ref` maps it without copying. Tables are kept here for the
next batches (least recently used out past `max_bytes`), keyed by the shard file's identity
(size and mtime, or the read cache's copy for remote shards), so a rewritten shard is read again.
A gather that copies a megabyte or more runs in a worker thread: numpy and Arrow release the GIL
for the copies, and the gateway's event loop goes on serving other streams meanwhile.

With each table is kept what every batch would otherwise work out again: its size, the table
conformed to the plans' schema and the numpy views of its tensor columns (`loader.gather.Source`).
A payload is the list of buffers of its IPC stream (`loader.codec.encode_parts`): the gathered
columns and, for big tensor rows, the rows in the shard tables themselves, copied once, when
`gateway.wire.batch_response` frames them.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import pyarrow as pa
from ray.exceptions import ObjectLostError, RayActorError

from actors.routing import shard_reader
from loader.errors import ShardError
from loader.gather import Source, conformed, encode_plan_parts, plan_schema
from loader.job.plan import BatchPlan
from loader.shard_cache import ShardCache
from loader.sources import remote_settings
from loader.sources.pipe import is_pipe
from loader.sources.remote import is_remote
from loader.sources.remote_settings import RemoteSettings

log = logging.getLogger("loader.gather")

READ_ATTEMPTS = 3
# Batches smaller than this are gathered on the event loop: for a 45 KB batch, handing the work to
# a thread and back cost more than the work.
THREAD_BYTES = 1 << 20


class _Entry:
    """A cached table, the object ref that keeps it in the object store, and what batches need
    of it, worked out once."""

    __slots__ = ("table", "ref", "nbytes", "schema", "source")

    def __init__(self, table: pa.Table, ref) -> None:
        self.table, self.ref = table, ref
        # Table.nbytes walks every buffer: 6 us a table, a tenth of a small batch's gather when
        # it was asked of each of the batch's shards every batch.
        self.nbytes = table.nbytes
        self.schema: pa.Schema | None = None
        self.source: Source | None = None

    def conformed(self, schema: pa.Schema) -> Source:
        """The table conformed to `schema`, as a Source; the same one while the schema is."""
        if self.source is None or not (schema is self.schema or schema.equals(self.schema)):
            # Called on the event loop only; the gather threads use the Source handed to them.
            self.source, self.schema = Source(conformed(self.table, schema)), schema
        return self.source


class ShardTables:
    def __init__(self, readers: list, max_bytes: int, remote: RemoteSettings | None = None) -> None:
        # `remote`: the service's remote-shard settings, where the read cache of a remote shard is.
        self._readers, self.max_bytes, self._remote = readers, max_bytes, remote
        # identity -> entry
        self._tables: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self._bytes = 0
        self.reads = self.hits = 0

    def _cached(self, key: tuple) -> _Entry | None:
        entry = self._tables.get(key)
        if entry is None:
            return None
        self._tables.move_to_end(key)
        self.hits += 1
        return entry

    def _key(self, index: int, uri: str) -> tuple:
        if self._remote is None or not (is_remote(uri) or is_pipe(uri)):
            # A local file's identity is its stat: the remote settings (a context manager, per
            # shard per batch) only say where remote shards' copies are.
            return ShardCache.identity(uri, index) or (uri, index, "unstated")
        with remote_settings.using(self._remote):
            return ShardCache.identity(uri, index) or (uri, index, "unstated")

    async def table(self, index: int, uri: str) -> pa.Table:
        return (await self._entry(index, uri)).table

    async def _entry(self, index: int, uri: str) -> _Entry:
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
                return self._keep(key, result.table, shard.ref)
            except (RayActorError, ObjectLostError) as exc:
                log.warning("an actor died while the gateway read %s (%s); retrying", uri, exc)
        raise ShardError(uri, f"actors died {READ_ATTEMPTS} times reading it")

    def _keep(self, key: tuple, table: pa.Table, ref) -> _Entry:
        entry = self._tables.get(key)
        if entry is not None:
            return entry
        entry = self._tables[key] = _Entry(table, ref)
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes and len(self._tables) > 1:
            _, old = self._tables.popitem(last=False)
            self._bytes -= old.nbytes
        return entry

    async def payload(self, plan: BatchPlan) -> list:
        """The plan's Arrow IPC payload, as the list of buffers it is the concatenation of
        (`loader.codec.encode_parts`); a ShardError when one of its shards cannot be read."""
        uris = dict(plan.uris)
        entries: dict[int, _Entry] = {}
        missing = []
        for shard in plan.shards():
            entry = self._cached(self._key(shard, uris[shard]))
            if entry is None:
                missing.append(shard)
            else:
                entries[shard] = entry
        if missing:  # only then the tasks and awaits: most batches find every table here
            entries.update(zip(missing, await asyncio.gather(*(self._entry(s, uris[s]) for s in missing))))
        schema = plan_schema(plan, {s: e.table for s, e in entries.items()})
        try:
            sources = {s: e.conformed(schema) for s, e in entries.items()}
        except (IndexError, ValueError, pa.ArrowException) as exc:  # as the gather's
            raise self._mismatch(uris, entries, exc) from None
        # What the gather copies, not the batch's size: it leaves big tensor rows in place, and
        # a 4.8 MB batch of images is then Python work, which holds the GIL in a thread as well
        # (1.98 -> 1.80 ms of CPU a batch without the hand-off, gathered in one process).
        row_bytes = sum(source.copied_row_bytes() for source in sources.values()) / max(len(sources), 1)
        if row_bytes * plan.rows < THREAD_BYTES:
            return self._encode(plan, sources, uris)  # a thread hand-off would cost more than this
        return await asyncio.to_thread(self._encode, plan, sources, uris)

    @staticmethod
    def _encode(plan: BatchPlan, sources: dict[int, Source], uris: dict[int, str]) -> list:
        try:
            return encode_plan_parts(plan, sources)
        except (IndexError, ValueError, pa.ArrowException) as exc:
            raise ShardTables._mismatch(uris, sources, exc) from None

    @staticmethod
    def _mismatch(uris: dict[int, str], shards, exc: Exception) -> ShardError:
        # Rows the plan names that its shards no longer hold: a shard rewritten in place.
        names = ", ".join(uris[s] for s in shards)
        return ShardError(names, f"the batch's rows no longer match its shards: {exc}")
