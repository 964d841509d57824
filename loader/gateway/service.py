"""The `loader.v1.Loader` servicer: validates what trainers send and delegates to the pipeline."""

from __future__ import annotations

import asyncio
import logging

import grpc

from loader.errors import ConfigError, JobConflict
from loader.gateway.train import DRAIN_TIMEOUT_S, Abort, TrainSession, job_spec
from loader.v1 import loader_pb2 as pb
from loader.v1 import loader_pb2_grpc as pb_grpc

log = logging.getLogger("loader.gateway")

MAX_WEIGHTS_BYTES = 2 * 1024**3


def shard_info(record) -> pb.ShardInfo:
    return pb.ShardInfo(index=record.index, uri=record.uri, state=record.state, reason=record.reason, rows=record.rows)


class LoaderService(pb_grpc.LoaderServicer):
    def __init__(self, pipeline, config) -> None:
        self.pipeline, self.config = pipeline, config

    async def Train(self, request_iterator, context):
        requests = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(requests.__anext__(), timeout=self.config.hello_timeout_s)
        except asyncio.TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no Hello within {self.config.hello_timeout_s:g} s"
            )
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the first message must be Hello, got {first.WhichOneof('kind')}"
            )
        try:
            spec = job_spec(first.hello, self.config.default_policy, self.config.selection)
            session = TrainSession(spec, first.hello)
            # A stream this rank had before, on this gateway or another, is aborted as superseded.
            await session.open(self.pipeline)
        except Abort as abort:
            await context.abort(abort.code, abort.message)
        except JobConflict as exc:  # another spec under this name, or an epoch too far ahead
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (ConfigError, ValueError) as exc:  # options that parse but that no policy accepts
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Hello: {exc}")
        reader = asyncio.ensure_future(session.read_requests(requests))
        try:
            yield pb.TrainResponse(status=pb.Status(code=pb.Status.READY, epoch=session.epoch, policy=spec.policy))
            async for response in session.batches():
                yield response
            # Feedback for the last batches may still be on its way; the trainer closes its side.
            await asyncio.wait_for(asyncio.shield(reader), timeout=DRAIN_TIMEOUT_S)
            if session.abort is not None:
                raise session.abort
        except Abort as abort:
            await context.abort(abort.code, abort.message)
        except asyncio.TimeoutError:
            log.warning("job %s rank %d did not close its stream after the epoch", spec.job, session.rank)
        finally:
            reader.cancel()
            session.flush_acks()
            self.pipeline.close_stream(session.job, session)

    async def GetStats(self, request, context):
        stats = await self.pipeline.stats(request.job)
        return pb.Stats(
            shards=[shard_info(r) for r in stats["shards"]],
            jobs=[pb.JobInfo(**{**job, "clusters": [pb.ClusterInfo(**c) for c in job["clusters"]]}) for job in stats["jobs"]],
            trainers_connected=stats["trainers_connected"],
            reference_scored_samples=stats["reference_scored_samples"],
            reference_scoring_seconds=stats["reference_scoring_seconds"],
            scorer_devices=stats["scorer_devices"],
            budget=pb.PoolBudget(**stats["budget"]) if stats["budget"] is not None else None,
            reference_weights=stats["reference_weights"],
            rescore_pending=stats["rescore_pending"],
        )

    async def AddShards(self, request, context):
        if not request.uris:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "AddShards.uris is empty")
        try:
            records = await self.pipeline.add_shards(list(request.uris))
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.AddShardsResponse(shards=[shard_info(r) for r in records])

    async def SetReference(self, request, context):
        if not request.weights:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SetReference.weights is empty")
        try:
            fingerprint, shards = await self.pipeline.set_reference(request.weights)
        except ConfigError as exc:  # no such file, or weights that do not fit the model
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except JobConflict as exc:  # the service has no reference to replace
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.SetReferenceResponse(fingerprint=fingerprint, shards_to_rescore=shards)

    async def PushWeights(self, request_iterator, context):
        job, step, parts, size = "", 0, [], 0
        async for chunk in request_iterator:
            if not parts:
                job, step = chunk.job, chunk.step
            size += len(chunk.data)
            if size > MAX_WEIGHTS_BYTES:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"weights over {MAX_WEIGHTS_BYTES} bytes; push a smaller learner"
                )
            parts.append(chunk.data)
        if not job:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first WeightsChunk must name the job")
        try:
            await self.pipeline.push_weights(job, b"".join(parts), step)
        except JobConflict as exc:  # unknown job, or one not in snapshot mode
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:  # the bytes are no state_dict of the learner (raised in the scorer)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot load the pushed weights: {exc}")
        return pb.PushWeightsResponse(bytes_received=size, step=step)
