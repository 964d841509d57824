"""One trainer's Train stream: Hello, then credits bound how many batches may be in flight.

The handler is an async generator. A side task reads the trainer's messages (credits, acks,
feedback); anything it rejects becomes an `Abort` that the generator raises as the RPC's status,
so a bad message ends the stream with a clear code and changes no state.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

import grpc
import numpy as np

from loader.curator import EndOfEpoch, Failed, JobSpec, Ready
from loader.errors import ConfigError, ShardError
from loader.gateway.wire import batch_response
from loader.scoring import resolve_factory
from loader.selection.options import SelectionOptions
from loader.selection.policies import resolve
from loader.v1 import loader_pb2 as pb

log = logging.getLogger("loader.gateway")

MAX_CREDIT = 1024
# Batch plans asked of the curator per call, at most (as many as the stream has credits for).
PLANS_PER_CALL = 8
# Far above any data-parallel job; a Hello with 2**32 - 1 ranks would have the curator plan an
# epoch tail of billions of batches.
MAX_WORLD_SIZE = 1 << 16
# After END_OF_EPOCH the trainer may still send feedback before it closes its side.
DRAIN_TIMEOUT_S = 60.0


@dataclasses.dataclass
class Abort(Exception):
    code: grpc.StatusCode
    message: str


def job_spec(hello: pb.Hello, default_policy: str, defaults: SelectionOptions) -> JobSpec:
    if not hello.job:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "Hello.job must name the job")
    if not 1 <= hello.world_size <= MAX_WORLD_SIZE:
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Hello.world_size must be 1..{MAX_WORLD_SIZE}, got {hello.world_size}",
        )
    if hello.rank >= hello.world_size:
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"Hello.rank must be below world_size {hello.world_size}, got {hello.rank}"
        )
    if hello.batch_size < 1:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"Hello.batch_size must be at least 1, got {hello.batch_size}")
    policy = hello.policy or default_policy
    try:
        options = resolve(policy, dict(hello.options), key="options", base=defaults)
    except ConfigError as exc:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"Hello.{exc}") from None
    except ValueError as exc:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    if options.learner_loss == "snapshot":
        try:
            resolve_factory(options.learner, key="options.learner")
        except ConfigError as exc:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"Hello.{exc}") from None
    if hello.stream and hello.total_epochs:
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Hello.total_epochs must be 0 for a stream job (it has no last epoch), got {hello.total_epochs}",
        )
    return JobSpec(
        hello.job, hello.batch_size, hello.world_size, policy, hello.seed, options, hello.total_epochs, hello.stream
    )


def decode_feedback(feedback: pb.Feedback) -> tuple[np.ndarray, np.ndarray]:
    if len(feedback.ids) % 8 or len(feedback.losses) % 4:
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Feedback.ids must be int64 and losses float32 arrays, got {len(feedback.ids)} and "
            f"{len(feedback.losses)} bytes",
        )
    ids = np.frombuffer(feedback.ids, dtype="<i8")
    losses = np.frombuffer(feedback.losses, dtype="<f4")
    if len(ids) != len(losses):
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"Feedback has {len(ids)} ids but {len(losses)} losses"
        )
    if not np.isfinite(losses).all():
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "Feedback.losses holds NaN or infinite values")
    return ids, losses


class TrainSession:
    def __init__(self, spec: JobSpec, hello: pb.Hello) -> None:
        self.spec = spec
        self.rank, self.epoch = hello.rank, hello.epoch
        self.job = None  # the pipeline's JobHandle, once the stream is open (`open`)
        # This stream sends batches first_seq, first_seq + 1, ...; only those can be acknowledged.
        self.first_seq = self.next_seq = hello.next_seq
        self.credits = 0
        # Acks ride on the next `next_batches` call (no call of their own); whatever is left
        # when the stream ends goes in one `ack` call.
        self.acked = self.acked_sent = -1
        # Lookups fetched ahead, not sent yet: batch plans this stream's credits will take.
        self.ahead: collections.deque = collections.deque()
        self.changed = asyncio.Event()
        self.abort: Abort | None = None
        self.reader_done = False

    async def open(self, pipeline) -> None:
        """Registers this stream with its job (JobConflict, ConfigError, ValueError as
        `Pipeline.open_stream` raises them)."""
        self.job = await pipeline.open_stream(self.spec, self)

    def superseded(self, message: str) -> None:
        """A newer stream of the same job and rank opened, on this gateway or another."""
        self.stop(Abort(grpc.StatusCode.ABORTED, message))

    def stop(self, abort: Abort) -> None:
        if self.abort is None:
            self.abort = abort
        self.changed.set()

    async def read_requests(self, requests) -> None:
        pending_feedback: set[asyncio.Task] = set()
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "credit":
                    self._credit(request.credit)
                elif kind == "ack":
                    self._ack(request.ack)
                elif kind == "feedback":
                    ids, losses = decode_feedback(request.feedback)
                    task = asyncio.ensure_future(self._feedback(ids, losses))
                    pending_feedback.add(task)
                    task.add_done_callback(pending_feedback.discard)
                elif kind == "hello":
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "a second Hello on the same stream")
                else:
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "an empty TrainRequest")
            if pending_feedback:
                await asyncio.gather(*pending_feedback)
        except Abort as abort:
            self.stop(abort)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: nothing more will come
            log.debug("trainer stream of job %s rank %d ended: %r", self.spec.job, self.rank, exc)
        finally:
            self.reader_done = True
            self.changed.set()

    def _credit(self, credit: pb.Credit) -> None:
        if not 1 <= credit.batches <= MAX_CREDIT:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"Credit.batches must be 1..{MAX_CREDIT}, got {credit.batches}")
        self.credits += credit.batches
        self.changed.set()

    def _ack(self, ack: pb.Ack) -> None:
        # Hello.next_seq may be anything; were acks up to it allowed, one ack could have the
        # curator walk billions of sequence numbers.
        if ack.epoch != self.epoch or not self.first_seq <= ack.seq < self.next_seq:
            last = self.next_seq - 1
            sent = f"batches {self.first_seq}..{last}" if last >= self.first_seq else "no batch"
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Ack for epoch {ack.epoch} batch {ack.seq}, which this stream never sent "
                f"(it has sent {sent} of epoch {self.epoch})",
            )
        self.acked = max(self.acked, ack.seq)

    def flush_acks(self) -> None:
        if self.acked > self.acked_sent:
            self.job.ack(self.rank, self.epoch, self.acked)
            self.acked_sent = self.acked

    async def _feedback(self, ids: np.ndarray, losses: np.ndarray) -> None:
        problem = await self.job.feedback(ids, losses)
        if problem:
            self.stop(Abort(grpc.StatusCode.INVALID_ARGUMENT, f"Feedback rejected: {problem}"))

    async def wait(self, awaitable=None):
        """Waits for `awaitable` (or for any change when None), raising the session's Abort first."""
        task = None if awaitable is None else asyncio.ensure_future(awaitable)
        try:
            while True:
                if self.abort is not None:
                    raise self.abort
                if task is not None and task.done():
                    return task.result()
                self.changed.clear()
                changed = asyncio.ensure_future(self.changed.wait())
                try:
                    waiters = [changed] if task is None else [changed, task]
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if task is None:
                    return None
        finally:
            # Also when the RPC is cancelled while waiting: a pending helper would outlive the stream.
            if task is not None and not task.done():
                task.cancel()

    async def batches(self):
        """Yields TrainResponses until this rank's share of the epoch has been sent."""
        while True:
            while self.credits <= 0:
                if self.reader_done:
                    return  # the trainer closed its side: no credit can come any more
                await self.wait()
            if not self.ahead:
                acked = self.acked if self.acked > self.acked_sent else -1
                self.acked_sent = max(self.acked, self.acked_sent)
                # As many plans as the credits allow, in one call (they are a few hundred bytes
                # each; the curator keeps every one until acked, so none is lost if we stop).
                count = max(1, min(self.credits, PLANS_PER_CALL))
                self.ahead.extend(await self.wait(self.job.next_batches(self.rank, self.epoch, self.next_seq, count, acked)))
            result = self.ahead.popleft()
            if isinstance(result, Failed):
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION, result.message)
            if isinstance(result, EndOfEpoch):
                yield pb.TrainResponse(
                    status=pb.Status(code=pb.Status.END_OF_EPOCH, epoch=self.epoch, batches=result.batches)
                )
                return
            assert isinstance(result, Ready)
            try:
                payload = await self.wait(self.job.payload(result.payload))
            except ShardError as exc:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot serve batch {result.seq}: {exc}") from None
            self.credits -= 1
            self.next_seq += 1
            yield batch_response(self.epoch, result.seq, result.rows, payload)
