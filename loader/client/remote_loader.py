"""RemoteLoader: iterate it like a DataLoader; batches come from the loader service."""

from __future__ import annotations

import time

import numpy as np

from loader.client.channel import TLSLike, as_tls, open_channel, resolve_token, token_metadata
from loader.client.stream import StreamTimeout, TrainStream, train_method
from loader.v1 import loader_pb2 as pb
from loader.v1 import loader_pb2_grpc as pb_grpc

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
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or prefetch < 1:
            raise ValueError("batch_size and prefetch must be positive")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be positive or None, got {max_steps}")
        if stream and total_epochs:
            raise ValueError("a stream job has no last epoch: leave total_epochs at 0")
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

    def _one_epoch(self):
        hello = pb.Hello(
            job=self.job, rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
            policy=self.policy, seed=self.seed, epoch=self._epoch, next_seq=self._seq,
            options=self.options, total_epochs=self.total_epochs, stream=self.stream,
        )  # fmt: skip
        stream = TrainStream(self._train, hello, self.prefetch, self._metadata, self._unsent)
        self._unsent = []
        self._stream = stream
        finished = False
        try:
            while True:
                kind, value, batch = stream.next(self.timeout_s)
                if kind == "batch":
                    self._seq = value + 1
                    stream.ack(self._epoch, value)
                    yield batch
                elif kind == "status" and value.code == pb.Status.END_OF_EPOCH:
                    finished = True
                    return
                elif kind == "error":
                    raise value
                elif kind == "closed":
                    raise ConnectionError(f"the loader service closed the stream of job {self.job!r} mid-epoch")
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

    def report(self, batch: dict, losses) -> None:
        """Reports per-sample losses for a served batch. Never blocks on the network."""
        ids = batch["_id"]
        ids = ids.numpy() if hasattr(ids, "numpy") else np.asarray(ids)
        if hasattr(losses, "detach"):
            losses = losses.detach().to("cpu", dtype=_float32()).numpy()
        losses = np.asarray(losses, dtype=np.float32).reshape(-1)
        if len(losses) != len(ids):
            raise ValueError(f"report() got {len(losses)} losses for a batch of {len(ids)} samples")
        if self._stream is not None:
            self._stream.report(ids, losses)
        else:
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

        reply = self._stub.PushWeights(chunks(), metadata=self._metadata, timeout=self.timeout_s)
        return reply.step

    # -- service ---------------------------------------------------------------------------------

    def stats(self) -> pb.Stats:
        return self._stub.GetStats(pb.GetStatsRequest(job=self.job), metadata=self._metadata, timeout=30)

    def close(self) -> None:
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
