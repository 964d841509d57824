from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loader.tensors import is_tensor_like, to_arrow, to_numpy

SHAPES = [(7,), (7, 3), (7, 2, 5)]
DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int8, np.uint8]


def _values(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(shape: tuple[int, ...], dtype: type) -> None:
    values = _values(shape, dtype)
    array = to_arrow(values)
    assert len(array) == shape[0]
    assert is_tensor_like(array.type)
    if len(shape) == 1:
        assert not isinstance(array.type, pa.BaseExtensionType)
    else:
        assert isinstance(array.type, pa.FixedShapeTensorType)
        assert list(array.type.shape) == list(shape[1:])
    back = to_numpy(array)
    assert back.dtype == values.dtype
    np.testing.assert_array_equal(back, values)


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_copy_both_ways(shape: tuple[int, ...]) -> None:
    values = _values(shape, np.float32)
    array = to_arrow(values)
    storage = array.storage.values if isinstance(array, pa.ExtensionArray) else array
    arrow_data = np.frombuffer(storage.buffers()[1], dtype=np.float32)
    assert np.shares_memory(values, arrow_data)
    back = to_numpy(pa.chunked_array([array]))
    assert np.shares_memory(back, values)
    assert back.flags.owndata is False


def test_multiple_chunks_are_combined() -> None:
    a, b = _values((3, 4), np.int32), _values((2, 4), np.int32) + 50
    back = to_numpy(pa.chunked_array([to_arrow(a), to_arrow(b)]))
    np.testing.assert_array_equal(back, np.concatenate([a, b]))
    empty = to_numpy(pa.chunked_array([], type=to_arrow(a).type))
    assert empty.shape == (0, 4)


def test_sliced_tensor_array() -> None:
    values = _values((6, 2, 2), np.float64)
    np.testing.assert_array_equal(to_numpy(to_arrow(values)[2:5]), values[2:5])


def test_non_contiguous_and_big_endian_input() -> None:
    values = _values((6, 4), np.float32)
    np.testing.assert_array_equal(to_numpy(to_arrow(values[:, ::2])), values[:, ::2])
    swapped = values.astype(">f4")
    back = to_numpy(to_arrow(swapped))
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, values)


def test_string_column_is_rejected() -> None:
    with pytest.raises(TypeError, match="string"):
        to_numpy(pa.array(["a", "b"]))
    with pytest.raises(TypeError, match="struct"):
        to_numpy(pa.array([{"a": 1}]))
    assert not is_tensor_like(pa.string())


def test_object_dtype_and_scalar_are_rejected() -> None:
    with pytest.raises(TypeError, match="<U1"):
        to_arrow(np.array([["a"], ["b"]]))
    with pytest.raises(ValueError, match="dimension"):
        to_arrow(np.float32(1.0))


def test_nulls_are_rejected() -> None:
    with pytest.raises(ValueError, match="null"):
        to_numpy(pa.array([1, None, 3], type=pa.int64()))


def _table() -> tuple[pa.Table, dict[str, np.ndarray]]:
    columns = {
        "x": _values((5, 3, 2), np.float32),
        "y": _values((5,), np.int64),
        "z": _values((5, 4), np.uint8),
    }
    return pa.table({name: to_arrow(values) for name, values in columns.items()}), columns


def test_ipc_stream_round_trip() -> None:
    table, columns = _table()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    back = pa.ipc.open_stream(sink.getvalue()).read_all()
    assert back.schema == table.schema
    for name, values in columns.items():
        np.testing.assert_array_equal(to_numpy(back.column(name)), values)


def test_parquet_round_trip(tmp_path) -> None:
    table, columns = _table()
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    back = pq.read_table(path)
    assert isinstance(back.schema.field("x").type, pa.FixedShapeTensorType)
    for name, values in columns.items():
        np.testing.assert_array_equal(to_numpy(back.column(name)), values)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (0, 3, 4)])
def test_zero_rows_keep_their_dtype_and_row_shape(shape: tuple[int, ...]) -> None:
    column = to_arrow(np.zeros(shape, np.uint8))
    assert len(column) == 0
    back = to_numpy(column)
    assert back.shape == shape and back.dtype == np.uint8
