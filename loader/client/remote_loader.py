"""RemoteLoader: iterate it like a DataLoader; batches come from the loader service."""

from __future__ import annotations

import logging
import math
import threading
import time

import grpc
import numpy as np

from loader.client.channel import TLSLike, as_tls, open_channel, resolve_token, token_metadata
from loader.client.length import batches_per_rank, candidates_per_batch
from loader.client.reconnect import CHANNEL_BACKOFF, RECONNECT_S, TRANSIENT, Outage, status_of
from loader.client.stream import StreamTimeout, TrainStream, train_method
from loader.v1 import loader_pb2 as pb
from loader.v1 import loader_pb2_grpc as pb_grpc

log = logging.getLogger("loader.client")

STATE_KEYS = ("job", "rank", "world_size", "epoch", "seq")


class RemoteLoader:
    """Streams curated batches of `job` from the service at `address`.

    One `for` loop is one epoch. Each batch is a dict of tensors (strings stay lists) with `_id`
    (int64 sample ids) and `_weight` (float32 importance weights). Tensors share memory with the
    received message: no copy per batch.

    `stream=True` makes the job a stream job over a living pool: one `for` loop is an endless
    stream of batches, pass after pass over the pool as it is (shards added meanwhile are served in
    the pass in progress), like an infinite IterableDataset. A sample comes again in a later pass,
    never within the window of rows served just before it. `max_steps` ends a loop once this many
    batches have been served in all (counted across loops and in `state_dict`).

    `len(loader)` is the number of batches this rank gets in the current epoch, as with a
    DataLoader (for a stream job: `max_steps`; without it, TypeError, like an IterableDataset).

    `reconnect_s`: when the service goes away (UNAVAILABLE, or a stream that breaks before its
    epoch ends), the loader reconnects by itself, with exponential backoff, for up to this many
    seconds, says Hello again from its own (epoch, seq) and the loop goes on: no batch lost or
    repeated (given a service restarted on its `state_dir`). Reports made meanwhile are sent on
    the new stream; `push_weights` and `stats` retry likewise. Past it, `ServiceUnreachable`.
    Other errors (a refused token, a bad argument, a job conflict) are raised at once; 0 turns
    reconnecting off. `reconnects` counts the times the loader got the service back.

    `token` (default `$LOADER_TOKEN`) is sent as `authorization: Bearer <token>` on every call.
    `tls`: None for plaintext, True for TLS against the system's roots, or `loader.client.TLS`
    (or a mapping of its fields: `ca`, `cert`, `key`, `server_name`) for a private CA and mutual TLS.
    """

    def __init__(
        self,
        address: str,
        job: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        token: str | None = None,
        *,
        policy: str = "",
        options: dict | None = None,
        total_epochs: int = 0,
        seed: int = 0,
        prefetch: int = 4,
        timeout_s: float = 300.0,
        max_message_bytes: int = 256 * 1024 * 1024,
        tls: TLSLike = None,
        stream: bool = False,
        max_steps: int | None = None,
        reconnect_s: float = RECONNECT_S,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or prefetch < 1:
            raise ValueError("batch_size and prefetch must be positive")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be positive or None, got {max_steps}")
        if stream and total_epochs:
            raise ValueError("a stream job has no last epoch: leave total_epochs at 0")
        if not (reconnect_s >= 0 and math.isfinite(reconnect_s)):
            raise ValueError(f"reconnect_s must be a finite number of seconds >= 0, got {reconnect_s!r}")
        self.reconnect_s = float(reconnect_s)
        self.reconnects = 0
        self._closed = threading.Event()
        self._length: tuple[int, int] | None = None  # (epoch, len) once asked
        self.stream, self.max_steps = stream, max_steps
        self._steps = 0
        self.address, self.job, self.batch_size = address, job, batch_size
        self.rank, self.world_size, self.policy, self.seed = rank, world_size, policy, seed
        self.options = {str(k): str(v) for k, v in (options or {}).items()}
        self.total_epochs = total_epochs
        self._pushes = 0
        self.prefetch, self.timeout_s = prefetch, timeout_s
        tls = as_tls(tls)
        self._metadata = token_metadata(resolve_token(token), address, tls)
        options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
        options += CHANNEL_BACKOFF
        self._channel = open_channel(address, tls, options)
        self._stub = pb_grpc.LoaderStub(self._channel)
        self._train = train_method(self._channel)
        self._epoch = 0
        self._seq = 0
        self._stream: TrainStream | None = None
        self._unsent: list[tuple[np.ndarray, np.ndarray]] = []

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self):
        if not self.stream:
            yield from self._until_max_steps(self._one_epoch())
            return
        empty_since = None
        while not self._done():
            served = self._steps
            yield from self._until_max_steps(self._one_epoch())
            # A pass with no batch: the pool has nothing readable now. Shards may be added, so
            # look again after a while, for at most timeout_s.
            if self._steps > served or self._done():
                empty_since = None
                continue
            empty_since = time.monotonic() if empty_since is None else empty_since
            waited = time.monotonic() - empty_since
            if waited >= self.timeout_s:
                raise TimeoutError(f"stream job {self.job!r}: the pool had no readable sample for {waited:.0f} s")
            time.sleep(min(1.0, self.timeout_s - waited))

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch (for a stream job, `max_steps` in all)."""
        if self.stream:
            if self.max_steps is None:
                raise TypeError("a stream job without max_steps has no len(), like an IterableDataset")
            return self.max_steps
        if self._length is None or self._length[0] != self._epoch:
            self._length = (self._epoch, self._epoch_batches())
        return self._length[1]

    def _epoch_batches(self) -> int:
        """The epoch's batch count per rank, as the service cuts it (loader/epoch.py): every readable
        sample once, in super-batches of round(B / keep_ratio) candidates (B under `uniform`), their
        number rounded up to a multiple of world_size so every rank gets as many."""
        stats = self.stats()
        candidates = candidates_per_batch(stats, self.job, self.policy, self.options, self.batch_size)
        if candidates is None:
            # The job is new and takes the service's default policy or keep_ratio, which only the
            # service knows: a Hello (and no credit) makes the job, and its stats then show them.
            self._unary(self._make_job)
            stats = self.stats()
            candidates = candidates_per_batch(stats, self.job, self.policy, self.options, self.batch_size)
            if candidates is None:
                raise RuntimeError(
                    f"the loader service at {self.address} does not report job {self.job!r} after its Hello"
                )
        pending = [shard.uri for shard in stats.shards if shard.state == "pending"]
        if pending:
            # Shards the service has not read yet, so it does not know their rows: it reads them
            # now, as on `loader add-shards` (its readers keep them for the epoch when they fit).
            request = pb.AddShardsRequest(uris=pending)
            self._unary(lambda: self._stub.AddShards(request, metadata=self._metadata, timeout=self.timeout_s))
            stats = self.stats()
        return batches_per_rank(stats, candidates, self.world_size)

    def _make_job(self) -> None:
        hello = pb.TrainRequest(hello=self._hello())
        responses = self._train(iter([hello]), metadata=self._metadata, timeout=self.timeout_s)
        for _ in responses:  # READY, then the end: no credit was given
            pass

    def _done(self) -> bool:
        return self.max_steps is not None and self._steps >= self.max_steps

    def _until_max_steps(self, batches):
        """Yields from `batches` until max_steps, then closes it at once (ending its stream)."""
        try:
            if self._done():
                return
            for batch in batches:
                self._steps += 1
                yield batch
                if self._done():
                    return
        finally:
            batches.close()

    def _hello(self) -> pb.Hello:
        return pb.Hello(
            job=self.job, rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
            policy=self.policy, seed=self.seed, epoch=self._epoch, next_seq=self._seq,
            options=self.options, total_epochs=self.total_epochs, stream=self.stream,
        )  # fmt: skip

    def _open(self, feedback: list) -> TrainStream:
        """A Train stream from this loader's own (epoch, seq): the first, or after a reconnect."""
        unsent, self._unsent = self._unsent, []
        stream = TrainStream(self._train, self._hello(), self.prefetch, self._metadata, feedback + unsent)
        self._stream = stream
        return stream

    def _one_epoch(self):
        stream = self._open([])
        answered = False  # this stream got a message: it was established
        outage: Outage | None = None
        finished = False
        try:
            while True:
                kind, value, batch = stream.next(self.timeout_s)
                if kind in ("batch", "status"):
                    answered = True
                if kind == "batch":
                    if outage is not None:
                        self._recovered(outage)
                        outage = None
                    self._seq = value + 1
                    stream.ack(self._epoch, value)
                    yield batch
                elif kind == "status" and value.code == pb.Status.END_OF_EPOCH:
                    if outage is not None:
                        self._recovered(outage)
                    finished = True
                    return
                elif kind in ("error", "closed"):  # the RPC is over, mid-epoch
                    transient = kind == "closed" or (isinstance(value, grpc.RpcError) and value.code() in TRANSIENT)
                    if not transient or self.reconnect_s <= 0:
                        if kind == "error":
                            raise value
                        raise ConnectionError(f"the loader service closed the stream of job {self.job!r} mid-epoch")
                    status = status_of(value) if kind == "error" else "OK (the stream ended before its epoch did)"
                    if outage is None:
                        outage = Outage(self)
                        log.warning(
                            "job %r rank %d: lost the loader service at %s (%s) at epoch %d batch %d; "
                            "reconnecting for up to %g s", self.job, self.rank, self.address, status, self._epoch,
                            self._seq, self.reconnect_s,
                        )  # fmt: skip
                    delay = outage.failed(status, attempt=not answered)
                    # Reports the dead stream never sent go on the next one.
                    carried = stream.take_unsent()
                    self._stream = None
                    stream.cancel()
                    self._pause(delay)
                    stream, answered = self._open(carried), False
        finally:
            self._stream = None
            stream.close(timeout_s=10.0)
            if not finished:
                # Left mid-epoch: the server ends the RPC once it has spent the credits still out
                # and taken in every report sent; cancelling at once could lose the last reports.
                _drain(stream, timeout_s=10.0)
                stream.cancel()
            else:
                # The server ends the RPC once our side is closed; wait for that, boundedly.
                stream.next(timeout_s=30.0)
                self._epoch += 1
                self._seq = 0

    def _recovered(self, outage: Outage) -> None:
        self.reconnects += 1
        log.warning(
            "job %r rank %d: the loader service at %s is back after %.1f s; going on from epoch %d batch %d",
            self.job, self.rank, self.address, time.monotonic() - outage.began, self._epoch, self._seq,
        )  # fmt: skip

    def _pause(self, delay: float) -> None:
        """Waits `delay` before the next try, unless close() is called meanwhile."""
        if self._closed.wait(delay):
            raise ConnectionError(f"RemoteLoader of job {self.job!r} closed while reconnecting to {self.address}")

    def _unary(self, call):
        """call() (one RPC), tried again while the service is UNAVAILABLE, for up to reconnect_s."""
        outage = None
        while True:
            try:
                result = call()
            except grpc.RpcError as exc:
                if exc.code() not in TRANSIENT or self.reconnect_s <= 0:
                    raise
                outage = outage or Outage(self)
                self._pause(outage.failed(status_of(exc), attempt=True))
                continue
            if outage is not None:
                self._recovered(outage)
            return result

    def report(self, batch: dict, losses) -> None:
        """Reports per-sample losses for a served batch. Never blocks on the network."""
        ids = batch["_id"]
        ids = ids.numpy() if hasattr(ids, "numpy") else np.asarray(ids)
        if hasattr(losses, "detach"):
            losses = losses.detach().to("cpu", dtype=_float32()).numpy()
        losses = np.asarray(losses, dtype=np.float32).reshape(-1)
        if len(losses) != len(ids):
            raise ValueError(f"report() got {len(losses)} losses for a batch of {len(ids)} samples")
        stream = self._stream
        if stream is None or not stream.report(ids, losses):  # no stream open, or a broken one
            self._unsent.append((ids, losses))

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "job": self.job, "rank": self.rank, "world_size": self.world_size, "epoch": self._epoch, "seq": self._seq,
            "steps": self._steps,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"loader state lacks {', '.join(missing)}")
        for key in ("job", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state is for {key}={state[key]!r}, this loader has {key}={getattr(self, key)!r}")
        self._epoch, self._seq = int(state["epoch"]), int(state["seq"])
        self._length = None
        self._steps = int(state.get("steps", 0))  # absent in states saved before max_steps

    # -- snapshots -------------------------------------------------------------------------------

    def push_weights(self, model, step: int | None = None, chunk_bytes: int = 1 << 20) -> int:
        """Sends the model's weights for snapshot-mode scoring (the job's `learner_loss` option is
        `snapshot`); the service's scorers then compute fresh learner losses with them, so the
        trainer spends no forward passes on selection. Blocks until the scorer has loaded them."""
        import io

        import torch

        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        data = buffer.getbuffer()
        self._pushes += 1
        step = self._pushes if step is None else step

        def chunks():
            for offset in range(0, max(len(data), 1), chunk_bytes):
                first = offset == 0
                yield pb.WeightsChunk(job=self.job if first else "", step=step if first else 0,
                                      data=bytes(data[offset : offset + chunk_bytes]))  # fmt: skip

        # A push the service took before the connection broke is taken again: same weights, same step.
        reply = self._unary(lambda: self._stub.PushWeights(chunks(), metadata=self._metadata, timeout=self.timeout_s))
        return reply.step

    # -- service ---------------------------------------------------------------------------------

    def stats(self) -> pb.Stats:
        request = pb.GetStatsRequest(job=self.job)
        return self._unary(lambda: self._stub.GetStats(request, metadata=self._metadata, timeout=30))

    def close(self) -> None:
        self._closed.set()
        self._channel.close()

    def __enter__(self) -> "RemoteLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drain(stream: TrainStream, timeout_s: float) -> None:
    """Discards what the server still sends until it ends the RPC, for at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            kind, _, _ = stream.next(left)
        except StreamTimeout:
            return
        if kind in ("closed", "error"):
            return


def _float32():
    import torch

    return torch.float32
