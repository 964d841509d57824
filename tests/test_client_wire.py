"""`loader.client.wire`: Train responses read without copying the payload, exactly as protobuf would."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from google.protobuf.message import DecodeError

from loader.client.wire import BatchView, parse_train_response
from loader.gateway.wire import batch_response
from loader.v1 import loader_pb2 as pb


def _same_as_protobuf(data: bytes) -> None:
    expected = pb.TrainResponse.FromString(data)
    got = parse_train_response(data)
    if isinstance(got, BatchView):
        assert expected.WhichOneof("kind") == "batch"
        b = expected.batch
        assert (got.epoch, got.seq, got.rows) == (b.epoch, b.seq, b.rows)
        assert bytes(got.arrow_ipc) == b.arrow_ipc
    else:
        assert got == expected


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 1 << 20])
@pytest.mark.parametrize("epoch, seq, rows", [(0, 0, 0), (3, 7, 32), (2**64 - 1, 2**63, 2**32 - 1)])
def test_gateway_batches_parse_as_protobuf_parses_them(size, epoch, seq, rows) -> None:
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    data = batch_response(epoch, seq, rows, pa.py_buffer(payload))
    _same_as_protobuf(data)
    view = parse_train_response(data)
    assert isinstance(view, BatchView)
    # The payload is a view of the received bytes, not a copy.
    assert view.arrow_ipc.obj is data


def _field(number: int, kind: int, body: bytes) -> bytes:
    from loader.gateway.wire import _varint

    key = _varint(number << 3 | kind)
    return key + (_varint(len(body)) + body if kind == 2 else body)


@pytest.mark.parametrize("data", [
    pb.TrainResponse(batch=pb.Batch(epoch=1, seq=2, rows=3, arrow_ipc=b"abc")).SerializeToString(),
    pb.TrainResponse(batch=pb.Batch()).SerializeToString(),  # a batch with every field default
    pb.TrainResponse(status=pb.Status(code=pb.Status.END_OF_EPOCH, epoch=4, batches=9)).SerializeToString(),
    b"",  # no oneof set
    # Two occurrences of `batch` merge; the later payload and seq win.
    _field(1, 2, _field(4, 2, b"old") + _field(2, 0, b"\x05")) + _field(1, 2, _field(4, 2, b"new") + _field(2, 0, b"\x06")),
    # A batch, then a status: the oneof's last member wins.
    _field(1, 2, _field(4, 2, b"x")) + pb.TrainResponse(status=pb.Status(epoch=1)).SerializeToString(),
    # An unknown field inside the batch, and rows wider than 32 bits.
    _field(1, 2, _field(9, 0, b"\x01") + _field(4, 2, b"p")),
    _field(1, 2, _field(3, 0, b"\xff\xff\xff\xff\x1f")),
])  # fmt: skip
def test_any_train_response_parses_as_protobuf_parses_it(data) -> None:
    _same_as_protobuf(data)


@pytest.mark.parametrize("data", [
    b"\x0a",                      # a length that never comes
    b"\x0a\x05\x22\x10abc",       # a payload longer than its batch
    b"\x0a\x02\x22",              # a payload field cut short
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint that never ends
])  # fmt: skip
def test_malformed_responses_fail_as_protobuf_fails(data) -> None:
    with pytest.raises(DecodeError):
        pb.TrainResponse.FromString(data)
    with pytest.raises(DecodeError):
        parse_train_response(data)
