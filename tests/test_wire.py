"""Batch responses framed by the gateway parse as the TrainResponse protobuf would build them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from loader import codec
from loader.gateway.wire import batch_response, serialize_train_response
from loader.v1 import loader_pb2 as pb


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 5 << 20])
def test_framed_batch_parses_as_the_built_message(size: int) -> None:
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    wire = batch_response(3, 2**40 + 7, 256, pa.py_buffer(payload))
    expected = pb.TrainResponse(batch=pb.Batch(epoch=3, seq=2**40 + 7, rows=256, arrow_ipc=payload))
    assert pb.TrainResponse.FromString(wire) == expected
    # The batch field's key and length appear twice: a few bytes more than protobuf would write.
    assert expected.ByteSize() <= len(wire) <= expected.ByteSize() + 8


def test_framed_batch_carries_an_encoded_table() -> None:
    table = pa.table({codec.ID: pa.array(np.arange(5, dtype=np.int64)), "y": pa.array(np.arange(5) * 2)})
    wire = batch_response(0, 0, 5, codec.encode(table))
    assert codec.decode(pb.TrainResponse.FromString(wire).batch.arrow_ipc).equals(table)


def test_serializer_passes_framed_bytes_and_serializes_messages() -> None:
    status = pb.TrainResponse(status=pb.Status(code=pb.Status.READY))
    assert serialize_train_response(status) == status.SerializeToString()
    framed = batch_response(0, 1, 0, b"")
    assert serialize_train_response(framed) is framed


def test_a_payload_in_parts_frames_as_its_concatenation() -> None:
    rng = np.random.default_rng(0)
    parts = [b"head", pa.py_buffer(rng.bytes(300)), rng.integers(0, 256, (2, 100), dtype=np.uint8), b""]
    joined = b"".join(parts)
    assert batch_response(1, 2, 3, parts) == batch_response(1, 2, 3, pa.py_buffer(joined))
    assert pb.TrainResponse.FromString(batch_response(1, 2, 3, parts)).batch.arrow_ipc == joined
    assert pb.TrainResponse.FromString(batch_response(1, 2, 3, [])).batch.arrow_ipc == b""
