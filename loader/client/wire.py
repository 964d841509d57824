"""Train responses parsed without copying their payload.

Protobuf copies a `bytes` field when it parses a message and again when the field is read, which
for a 5 MB batch costs the trainer about 5 ms of CPU per batch. A batch response is read here by
walking its wire format: the small fields are decoded, and `arrow_ipc` becomes a view of the bytes
gRPC received. Anything other than a well-formed batch (a status, an unexpected field type) goes
to protobuf's parser, which also reports malformed input as it always has.
"""

from __future__ import annotations

import dataclasses

from loader.v1 import loader_pb2 as pb

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_BATCH = pb.TrainResponse.DESCRIPTOR.fields_by_name["batch"].number
_SCALARS = {pb.Batch.DESCRIPTOR.fields_by_name[name].number: name for name in ("epoch", "seq", "rows")}
_PAYLOAD = pb.Batch.DESCRIPTOR.fields_by_name["arrow_ipc"].number


@dataclasses.dataclass(frozen=True)
class BatchView:
    """A `Batch` whose `arrow_ipc` is a memoryview of the received message."""

    epoch: int = 0
    seq: int = 0
    rows: int = 0
    arrow_ipc: memoryview = memoryview(b"")


class _Malformed(Exception):
    pass


def parse_train_response(data: bytes) -> pb.TrainResponse | BatchView:
    """Train's response deserializer: a BatchView for a batch, a TrainResponse otherwise."""
    try:
        return _batch(memoryview(data))
    except _Malformed:
        return pb.TrainResponse.FromString(data)


def _batch(data: memoryview) -> BatchView:
    fields = {"epoch": 0, "seq": 0, "rows": 0, "arrow_ipc": data[:0]}
    at, seen = 0, False
    while at < len(data):
        field, kind, at = _key(data, at)
        if field != _BATCH or kind != _LEN:
            raise _Malformed  # a status, or something protobuf should judge
        size, at = _varint(data, at)
        end = at + size
        if end > len(data):
            raise _Malformed
        # Occurrences of a message field merge: later scalars and bytes replace earlier ones.
        _merge_batch(data[at:end], fields)
        at, seen = end, True
    if not seen:
        raise _Malformed  # an empty message: no oneof set
    return BatchView(**fields)


def _merge_batch(data: memoryview, fields: dict) -> None:
    at = 0
    while at < len(data):
        field, kind, at = _key(data, at)
        if field in _SCALARS and kind == _VARINT:
            value, at = _varint(data, at)
            # uint32 `rows` keeps the low 32 bits, as protobuf does.
            fields[_SCALARS[field]] = value & 0xFFFFFFFF if _SCALARS[field] == "rows" else value
        elif field == _PAYLOAD and kind == _LEN:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise _Malformed
            fields["arrow_ipc"] = data[at : at + size]
            at += size
        else:
            raise _Malformed  # unknown fields or wire types: protobuf knows the rules


def _key(data: memoryview, at: int) -> tuple[int, int, int]:
    key, at = _varint(data, at)
    return key >> 3, key & 7, at


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise _Malformed
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, at
        shift += 7
