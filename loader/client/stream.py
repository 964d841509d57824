"""One Train stream as the trainer sees it: a request queue in, decoded responses out.

gRPC's sync client consumes the request iterator on its own thread; a second thread reads the
responses and decodes batches, so decoding overlaps with the training step.
"""

from __future__ import annotations

import queue
import threading

import grpc
import numpy as np

from loader import codec
from loader.client.wire import BatchView, parse_train_response
from loader.v1 import loader_pb2 as pb

TRAIN_METHOD = "/loader.v1.Loader/Train"

_CLOSE = object()


class StreamTimeout(TimeoutError):
    pass


def train_method(channel):
    """The Train call of `channel`, its batches parsed without copying their payload."""
    return channel.stream_stream(
        TRAIN_METHOD, request_serializer=pb.TrainRequest.SerializeToString, response_deserializer=parse_train_response
    )


class TrainStream:
    def __init__(self, train, hello: pb.Hello, credits: int, metadata: tuple, feedback: list) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses: queue.SimpleQueue = queue.SimpleQueue()
        self._requests_done = threading.Event()
        self._over = threading.Event()
        self._requests.put(pb.TrainRequest(hello=hello))
        for ids, losses in feedback:  # reported while no stream was open
            self.report(ids, losses)
        self._requests.put(pb.TrainRequest(credit=pb.Credit(batches=credits)))
        self._call = train(self._request_iter(), metadata=metadata)
        self._pump = threading.Thread(target=self._read_responses, name="loader-stream", daemon=True)
        self._pump.start()

    def _request_iter(self):
        try:
            while True:
                item = self._requests.get()
                if item is _CLOSE:
                    return
                if isinstance(item, tuple):
                    yield self._coalesce(item)
                else:
                    yield item
        finally:
            self._requests_done.set()

    def _coalesce(self, first: tuple) -> pb.TrainRequest:
        """Merges the feedback queued right now into one message: fewer, larger messages."""
        ids, losses = [first[0]], [first[1]]
        held = []
        while True:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                ids.append(item[0])
                losses.append(item[1])
            else:
                held.append(item)
                break
        for item in held:  # keep order for what was not feedback
            self._requests.put(item)
        feedback = pb.Feedback(
            ids=np.concatenate(ids).astype("<i8", copy=False).tobytes(),
            losses=np.concatenate(losses).astype("<f4", copy=False).tobytes(),
        )
        return pb.TrainRequest(feedback=feedback)

    def _read_responses(self) -> None:
        final = ("closed", None, None)
        try:
            for response in self._call:
                if isinstance(response, BatchView):  # the tensors keep the received bytes alive
                    self._responses.put(("batch", response.seq, codec.to_torch(codec.decode(response.arrow_ipc))))
                elif response.WhichOneof("kind") == "batch":
                    batch = response.batch
                    self._responses.put(("batch", batch.seq, codec.to_torch(codec.decode(batch.arrow_ipc))))
                else:
                    self._responses.put(("status", response.status, None))
        except grpc.RpcError as exc:
            final = ("error", exc, None)
        except Exception as exc:  # a batch that does not decode: the trainer sees why, not a hang
            self._call.cancel()
            final = ("error", exc, None)
        finally:
            # Set before the last message is queued, so whoever takes that message finds them set.
            # Nothing more can be sent once the RPC is over, so close() need not wait for the
            # request iterator (gRPC stops pulling from it, e.g. after UNAUTHENTICATED).
            self._over.set()
            self._requests_done.set()
            self._responses.put(final)

    def next(self, timeout_s: float):
        """The next (kind, value, batch); after the RPC's last message, ("closed", None, None) at once."""
        if self._over.is_set():
            try:
                return self._responses.get_nowait()
            except queue.Empty:
                return ("closed", None, None)
        try:
            return self._responses.get(timeout=timeout_s)
        except queue.Empty:
            raise StreamTimeout(f"no message from the loader service within {timeout_s:g} s") from None

    def ack(self, epoch: int, seq: int) -> None:
        self._requests.put(pb.TrainRequest(ack=pb.Ack(epoch=epoch, seq=seq)))
        self._requests.put(pb.TrainRequest(credit=pb.Credit(batches=1)))

    def report(self, ids: np.ndarray, losses: np.ndarray) -> None:
        self._requests.put((ids, losses))

    def close(self, timeout_s: float) -> bool:
        """Half-closes after everything queued is sent (or the RPC ended); True if that happened
        within the time."""
        self._requests.put(_CLOSE)
        return self._requests_done.wait(timeout_s)

    def cancel(self) -> None:
        self._call.cancel()
        self._pump.join(timeout=5)
