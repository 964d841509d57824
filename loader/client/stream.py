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
# In the request queue: reports are waiting in `TrainStream._pending` (one marker per batch of them).
_FEEDBACK = object()


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
        # Reports not yet handed to gRPC. They wait here rather than in the queue so that, when the
        # RPC breaks, those never sent can be taken back and sent on the next stream.
        self._lock = threading.Lock()
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._taken = False
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
                if item is _FEEDBACK:
                    message = self._take_feedback()
                    if message is not None:
                        yield message
                else:
                    yield item
        finally:
            self._requests_done.set()

    def _take_feedback(self) -> pb.TrainRequest | None:
        """Everything reported since the last Feedback, merged into one message (fewer, larger
        messages); None once the RPC is over, so what is left stays for `take_unsent`."""
        with self._lock:
            if self._over.is_set() or not self._pending:
                return None
            pending, self._pending = self._pending, []
        feedback = pb.Feedback(
            ids=np.concatenate([ids for ids, _ in pending]).astype("<i8", copy=False).tobytes(),
            losses=np.concatenate([losses for _, losses in pending]).astype("<f4", copy=False).tobytes(),
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

    def report(self, ids: np.ndarray, losses: np.ndarray) -> bool:
        """Queues a report; False (nothing queued) once `take_unsent` was called."""
        with self._lock:
            if self._taken:
                return False
            self._pending.append((ids, losses))
            if len(self._pending) == 1:
                self._requests.put(_FEEDBACK)
        return True

    def take_unsent(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The reports never handed to gRPC, for the next stream; later `report`s are refused.
        A report handed over just before the connection broke may be lost, as in any crash."""
        with self._lock:
            self._taken = True
            pending, self._pending = self._pending, []
        return pending

    def close(self, timeout_s: float) -> bool:
        """Half-closes after everything queued is sent (or the RPC ended); True if that happened
        within the time."""
        self._requests.put(_CLOSE)
        return self._requests_done.wait(timeout_s)

    def cancel(self) -> None:
        self._call.cancel()
        self._pump.join(timeout=5)
