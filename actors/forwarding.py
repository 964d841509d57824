"""How gateway processes other than the first reach the one Pipeline (config `gateways: N`).

The Pipeline lives in the `loader serve` process, which owns every actor (a curator owned by a
gateway process would die with it). A Ray actor cannot call into that process, so the process
fetches calls instead: a gateway posts each call to a `MailboxActor`, the serving process's
`Forwarding` task takes them off it, runs them on the Pipeline and posts the answers back.

Only the control path goes this way: opening and closing a trainer stream, stats, AddShards,
SetReference, PushWeights. Batches do not: a forwarded gateway asks the job's curator for plans
and gathers them from the readers' shard tables itself, exactly as the first gateway does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import ray
from ray.exceptions import RayActorError

from actors.gather import ShardTables
from actors.job import JobHandle
from actors.runtime import ProcessInfo

log = logging.getLogger("loader.forwarding")

# The Pipeline methods a forwarded gateway may call, besides opening and closing streams.
FORWARDED = ("ready", "stats", "add_shards", "set_reference", "push_weights")


@ray.remote(num_cpus=0)
class MailboxActor(ProcessInfo):
    """Calls waiting for the serving process, and the futures their callers wait on."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()

    async def call(self, method: str, args: tuple) -> tuple[bool, object]:
        """(True, result) or (False, the exception raised), once the serving process answers."""
        call_id = next(self._ids)
        future = self._waiting[call_id] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((call_id, method, args))
        try:
            return await future
        finally:
            self._waiting.pop(call_id, None)

    async def next_calls(self) -> list[tuple[int, str, tuple]]:
        """Every call posted so far, waiting for the first one when there is none."""
        calls = [await self._queue.get()]
        while not self._queue.empty():
            calls.append(self._queue.get_nowait())
        return calls

    def answer(self, call_id: int, ok: bool, value: object) -> None:
        future = self._waiting.get(call_id)
        if future is not None and not future.done():
            future.set_result((ok, value))


class RemoteStream:
    """A trainer stream of a forwarded gateway, as the Pipeline's job handles keep it."""

    def __init__(self, gateway, key: int, rank: int, epoch: int) -> None:
        self.gateway, self.key, self.rank, self.epoch = gateway, key, rank, epoch

    def superseded(self, message: str) -> None:
        self.gateway.superseded.remote(self.key, message)


class Forwarding:
    """The serving process's side: runs the calls gateways post, on its own event loop."""

    def __init__(self, pipeline, mailbox) -> None:
        self._pipeline, self._mailbox = pipeline, mailbox
        self.gateways: list = []  # GatewayActor handles, by index
        # (gateway index, its key) -> (job name, the stream as the job's handle keeps it)
        self._streams: dict[tuple[int, int], tuple[str, RemoteStream]] = {}
        self._task: asyncio.Task | None = None
        self._calls: set[asyncio.Task] = set()

    def start(self) -> None:
        """Starts answering on the running event loop (once; later calls do nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def watch(self, index: int) -> None:
        """Closes gateway `index`'s streams once it stops or dies: a dead gateway never closes
        them itself, and they would count as trainers and keep their jobs from going idle."""
        task = asyncio.ensure_future(self._close_when_gone(index))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _close_when_gone(self, index: int) -> None:
        try:
            await self.gateways[index].until_stopped.remote()
        except RayActorError:
            log.warning("gateway process %d died; closing its trainer streams", index)
        for gateway, key in [k for k in self._streams if k[0] == index]:
            self._close(gateway, key)

    def _close(self, gateway: int, key: int) -> None:
        job, stream = self._streams.pop((gateway, key), (None, None))
        handle = self._pipeline.known_job(job) if job is not None else None
        if handle is not None:
            self._pipeline.close_stream(handle, stream)

    def stop(self) -> None:
        for task in (self._task, *self._calls):
            if task is not None:
                task.cancel()
        self._task = None

    async def _serve(self) -> None:
        while True:
            try:
                calls = await self._mailbox.next_calls.remote()
            except RayActorError:  # the mailbox is gone: the gateways are being stopped
                log.warning("the gateways' mailbox died; forwarded gateways cannot open streams any more")
                return
            for call in calls:
                # Each on its own: a slow stats call must not hold up a trainer's Hello.
                task = asyncio.ensure_future(self._run(*call))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)

    async def _run(self, call_id: int, method: str, args: tuple) -> None:
        try:
            result = (True, await self._dispatch(method, args))
        except Exception as exc:  # the caller raises it, as if the Pipeline were its own
            result = (False, exc)
        self._mailbox.answer.remote(call_id, *result)

    async def _dispatch(self, method: str, args: tuple):
        pipeline = self._pipeline
        if method == "open_stream":
            spec, rank, epoch, gateway, key = args
            stream = RemoteStream(self.gateways[gateway], key, rank, epoch)
            handle = await pipeline.open_stream(spec, stream)
            self._streams[gateway, key] = (spec.job, stream)
            return handle.spec, handle.actor
        if method == "close_stream":
            _, gateway, key = args
            self._close(gateway, key)
            return None
        if method not in FORWARDED:
            raise ValueError(f"{method!r} is not a call gateways may forward")
        return await getattr(pipeline, method)(*args)


class ForwardedPipeline:
    """What a forwarded gateway sees as its pipeline: the methods the first gateway calls on the
    Pipeline, answered by it through the mailbox; batches are gathered here."""

    def __init__(self, mailbox, index: int, readers: list, table_bytes: int, remote) -> None:
        self._mailbox, self._index = mailbox, index
        self._tables = ShardTables(readers, table_bytes, remote)
        self._streams: dict[int, object] = {}
        self._keys = itertools.count()

    async def _call(self, method: str, *args):
        ok, value = await self._mailbox.call.remote(method, args)
        if not ok:
            raise value
        return value

    async def open_stream(self, spec, stream) -> JobHandle:
        key = next(self._keys)
        self._streams[key] = stream
        stream.forwarding_key = key
        try:
            known_spec, curator = await self._call("open_stream", spec, stream.rank, stream.epoch, self._index, key)
        except BaseException:
            del self._streams[key]
            raise
        return JobHandle(known_spec, curator, self._tables)

    def close_stream(self, handle: JobHandle, stream) -> None:
        key = getattr(stream, "forwarding_key", None)
        if self._streams.pop(key, None) is not None:
            # Not awaited: it runs also when the stream's RPC was cancelled.
            self._mailbox.call.remote("close_stream", (handle.spec.job, self._index, key))

    def superseded(self, key: int, message: str) -> None:
        stream = self._streams.get(key)
        if stream is not None:
            stream.superseded(message)

    async def ready(self) -> None:
        await self._call("ready")

    async def stats(self, job: str = "") -> dict:
        return await self._call("stats", job)

    async def add_shards(self, patterns: list[str]):
        return await self._call("add_shards", patterns)

    async def set_reference(self, weights: str):
        return await self._call("set_reference", weights)

    async def push_weights(self, job: str, weights: bytes, step: int) -> int:
        return await self._call("push_weights", job, weights, step)
