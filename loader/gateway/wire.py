"""Batch responses serialized around their payload, so a batch is copied once on its way to gRPC.

Building `TrainResponse(batch=Batch(arrow_ipc=payload))` and serializing it copies the payload
twice (into the message, then into the wire bytes), after it was already turned into bytes.
Protobuf merges repeated occurrences of a message field when parsing, so the small fields are
serialized by protobuf and only `arrow_ipc` is framed here: the concatenation parses as one
`TrainResponse` with every field set.
"""

from __future__ import annotations

import grpc

from loader.v1 import loader_pb2 as pb

_LENGTH_DELIMITED = 2
_BATCH_FIELD = pb.TrainResponse.DESCRIPTOR.fields_by_name["batch"].number
_PAYLOAD_FIELD = pb.Batch.DESCRIPTOR.fields_by_name["arrow_ipc"].number
TRAIN_METHOD = "/loader.v1.Loader/Train"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _key(field: int) -> bytes:
    return _varint(field << 3 | _LENGTH_DELIMITED)


_INNER_KEY, _OUTER_KEY = _key(_PAYLOAD_FIELD), _key(_BATCH_FIELD)


def batch_response(epoch: int, seq: int, rows: int, payload) -> bytes:
    """The serialized `TrainResponse` of one batch; `payload` is any buffer (bytes, pa.Buffer) or
    a list of buffers it is the concatenation of (`loader.codec.encode_parts`): then this join
    is the payload's only copy, where encoding it into one buffer first would copy it twice."""
    head = pb.TrainResponse(batch=pb.Batch(epoch=epoch, seq=seq, rows=rows)).SerializeToString()
    if isinstance(payload, list):
        size = sum(memoryview(part).nbytes for part in payload)
        parts = payload
    else:
        size = memoryview(payload).nbytes
        parts = [payload]
    inner = _INNER_KEY + _varint(size)
    outer = _OUTER_KEY + _varint(len(inner) + size)
    return b"".join([head, outer, inner, *parts])


def serialize_train_response(response) -> bytes:
    """Train's response serializer: bytes are responses `batch_response` already serialized."""
    return response if isinstance(response, bytes) else response.SerializeToString()


class PreSerializedBatches(grpc.aio.ServerInterceptor):
    """Lets the Train handler yield `batch_response` bytes next to ordinary messages (the
    generated registration would hand bytes to `TrainResponse.SerializeToString`)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != TRAIN_METHOD:
            return handler
        return handler._replace(response_serializer=serialize_train_response)
