"""Unit tests for `loader.codec`: batches survive the wire intact and reach torch without a copy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from loader import codec, tensors

N = 6


def batch() -> pa.Table:
    n = N
    images = np.arange(n * 6, dtype=np.float32).reshape(n, 3, 2) / 7
    return pa.table(
        {
            "image": tensors.to_arrow(images),
            codec.ID: pa.array(np.arange(n, dtype=np.int64) + (5 << 32)),
            "caption": pa.array([f"sample {i}" for i in range(n)]),
        }
    )


def address_range(payload: bytes) -> tuple[int, int]:
    start = np.frombuffer(payload, np.uint8).ctypes.data
    return start, start + len(payload)


def test_round_trip() -> None:
    table = batch()
    payload = codec.encode(table)
    # A buffer, not bytes: Ray moves it between processes without pickling it.
    assert isinstance(payload, pa.Buffer)
    back = codec.decode(payload)
    assert back.equals(table)
    assert isinstance(back.schema.field("image").type, pa.FixedShapeTensorType)


def test_round_trip_of_an_empty_batch() -> None:
    # Tail batches can be empty when an epoch has fewer rows than ranks. (Sliced: pyarrow cannot
    # build a tensor array from an empty ndarray.)
    table = batch().slice(0, 0)
    back = codec.decode(codec.encode(table))
    assert back.num_rows == 0 and back.schema.equals(table.schema)
    out = codec.to_torch(back)
    assert out["image"].shape == (0, 3, 2)
    assert out[codec.ID].shape == (0,)
    assert out["caption"] == []


def test_to_numpy_shapes_and_dtypes() -> None:
    out = codec.to_numpy(codec.decode(codec.encode(batch())))
    assert out["image"].shape == (N, 3, 2) and out["image"].dtype == np.float32
    assert out[codec.ID].shape == (N,) and out[codec.ID].dtype == np.int64
    assert out["caption"] == [f"sample {i}" for i in range(N)]


def test_to_torch_values_shapes_and_dtypes() -> None:
    table = batch()
    out = codec.to_torch(codec.decode(codec.encode(table)))
    assert set(out) == {"image", codec.ID, "caption"}
    image, ids = out["image"], out[codec.ID]
    assert isinstance(image, torch.Tensor) and isinstance(ids, torch.Tensor)
    assert image.shape == (N, 3, 2) and image.dtype == torch.float32
    assert ids.shape == (N,) and ids.dtype == torch.int64
    np.testing.assert_array_equal(image.numpy(), np.arange(N * 6, dtype=np.float32).reshape(N, 3, 2) / 7)
    np.testing.assert_array_equal(ids.numpy(), np.arange(N) + (5 << 32))
    # Strings stay a list, as DataLoader's default collate leaves them.
    assert out["caption"] == [f"sample {i}" for i in range(N)]


def test_to_torch_shares_the_payload_memory() -> None:
    payload = codec.encode(batch())
    start, end = address_range(payload)
    out = codec.to_torch(codec.decode(payload))
    for name in ("image", codec.ID):
        tensor = out[name]
        first = tensor.data_ptr()
        last = first + tensor.numel() * tensor.element_size()
        assert start <= first and last <= end, f"{name} was copied out of the payload"


def test_to_torch_does_not_warn_about_read_only_arrays(recwarn) -> None:
    codec.to_torch(codec.decode(codec.encode(batch())))
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_decode_rejects_garbage() -> None:
    with pytest.raises(pa.ArrowInvalid):
        codec.decode(b"not an arrow stream")
