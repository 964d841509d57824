"""`loader.gather`: rows of several tables into one single-chunk table, whatever the column types."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from loader.gather import gather_rows
from loader.tensors import to_arrow


def _table(offset: int, rows: int) -> pa.Table:
    n = np.arange(offset, offset + rows)
    return pa.table({
        "image": to_arrow(np.broadcast_to(n[:, None, None], (rows, 3, 2)).astype(np.uint8)),
        "vector": to_arrow(np.stack([n, -n], axis=1).astype(np.float32)),
        "label": pa.array(n, pa.int64()),
        "maybe": pa.array([None if i % 3 == 0 else float(i) for i in n.tolist()], pa.float64()),
        "text": pa.array([f"row {i}" for i in n.tolist()]),
        "tags": pa.array([[i] * (i % 3) for i in n.tolist()], pa.list_(pa.int32())),
    })  # fmt: skip


def _expected(tables: list[pa.Table], groups: list[np.ndarray]) -> pa.Table:
    return pa.concat_tables([t.take(pa.array(rows, pa.int64())) for t, rows in zip(tables, groups)]).combine_chunks()


@pytest.mark.parametrize("picks", [
    [[0, 2, 4], [1]],
    [[], [3, 0, 2]],   # an empty group, rows out of order
    [[4, 4], [0]],     # a row twice
    [[], []],
])  # fmt: skip
def test_gather_matches_arrow_take_for_every_column_type(picks) -> None:
    tables = [_table(0, 5), _table(100, 4)]
    groups = [np.array(p, np.int64) for p in picks]
    got = gather_rows(tables[0].schema, list(zip(tables, groups)))
    assert got.schema == tables[0].schema
    assert got.equals(_expected(tables, groups))
    assert all(column.num_chunks == 1 for column in got.columns)


def test_multi_chunk_and_permuted_tensor_columns_fall_back_to_arrow() -> None:
    chunked = pa.concat_tables([_table(0, 3), _table(10, 3)])  # two chunks per column
    assert chunked.column("label").num_chunks == 2
    permuted_type = pa.fixed_shape_tensor(pa.int32(), (2, 2), permutation=[1, 0])
    storage = pa.array([[i, i + 1, i + 2, i + 3] for i in range(6)], pa.list_(pa.int32(), 4))
    permuted = pa.table({"t": pa.ExtensionArray.from_storage(permuted_type, storage)})
    rows = np.array([5, 1, 3], np.int64)
    for table in (chunked, permuted):
        got = gather_rows(table.schema, [(table, rows)])
        assert got.equals(table.take(pa.array(rows)).combine_chunks())
        assert all(column.num_chunks == 1 for column in got.columns)


def test_tensor_columns_are_copied_out_of_their_sources() -> None:
    source = _table(0, 4)
    got = gather_rows(source.schema, [(source, np.array([1, 2]))])
    image = got.column("image").chunk(0).to_numpy_ndarray()
    np.testing.assert_array_equal(image[:, 0, 0], [1, 2])
    # The output owns new memory: the batch may outlive the shard it came from.
    src = source.column("image").chunk(0).to_numpy_ndarray()
    assert not np.shares_memory(image, src)
