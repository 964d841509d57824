"""`loader.gather`: rows of several tables into one single-chunk table, whatever the column types."""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pyarrow as pa
import pytest

from actors.gather import ShardTables
from loader import codec
from loader.errors import ShardError
from loader.gateway.wire import batch_response
from loader.gather import encode_plan, encode_plan_parts, gather_by_id, gather_rows
from loader.ids import make_ids
from loader.job.plan import BatchPlan
from loader.tensors import to_arrow
from loader.v1 import loader_pb2 as pb


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


def _images(offset: int, rows: int) -> pa.Table:
    """A shard of big tensor rows (4 KiB each, the gateway's no-copy size) and small ones."""
    n = np.arange(offset, offset + rows)
    return pa.table({
        "image": to_arrow(np.broadcast_to(n[:, None, None], (rows, 64, 64)).astype(np.uint8)),
        "label": pa.array(n, pa.int64()),
        "_id": pa.array(make_ids(offset // 100, rows)),
    })  # fmt: skip


@pytest.mark.parametrize("ids", [
    lambda: np.concatenate([make_ids(1, 3), make_ids(0, 2)]),      # runs
    lambda: np.stack([make_ids(0, 4), make_ids(1, 4)], 1).ravel(),  # shards alternating
])  # fmt: skip
def test_rows_the_tables_lack_raise_on_every_gather_path(ids) -> None:
    """Tensor columns are taken without numpy's own bounds checks (mode="clip"), once the batch
    was checked: a row past a table's end must still raise, never give the last row."""
    tables = {0: _images(0, 4), 1: _images(100, 2)}  # shard 1 rewritten with fewer rows
    plan = BatchPlan(ids(), np.ones(len(ids()), np.float32), tables[0].schema)
    for gather in (lambda: gather_by_id(plan.schema, plan.ids, tables), lambda: encode_plan(plan, tables)):
        with pytest.raises(IndexError):
            gather()


def test_big_tensor_rows_reach_the_payload_parts_without_a_copy() -> None:
    tables = {0: _images(0, 4), 1: _images(100, 4)}
    ids = np.stack([make_ids(0, 4), make_ids(1, 4)], 1).ravel()[::-1].copy()
    plan = BatchPlan(ids, np.linspace(0, 1, 8, dtype=np.float32), tables[0].schema)
    parts = encode_plan_parts(plan, tables)
    # The same bytes as the table the gather copies...
    table = gather_by_id(plan.schema, ids, tables)
    expected = codec.encode(table.append_column(codec.WEIGHT, pa.array(plan.weights)))
    assert pa.py_buffer(b"".join(parts)).equals(expected)
    assert codec.decode(b"".join(parts)).column("image").chunk(0).to_numpy_ndarray()[:, 0, 0].tolist() == \
        [100 * (i % 2 == 0) + 3 - i // 2 for i in range(8)]  # fmt: skip
    # ...while the image rows are views of the shard tables' own memory.
    images = {s: t.column("image").chunk(0).to_numpy_ndarray() for s, t in tables.items()}
    rows = [p for p in parts if isinstance(p, np.ndarray)]
    assert len(rows) == 8
    assert all(any(np.shares_memory(r, image) for image in images.values()) for r in rows)


class _Reader:
    """A shard reader actor's `read.remote(uri, index)`, answered from `tables` by URI."""

    def __init__(self, tables: dict) -> None:
        self.tables, self.reads = tables, []
        self.read = self

    async def remote(self, uri: str, index: int):
        self.reads.append(uri)
        ref = asyncio.get_running_loop().create_future()
        ref.set_result(types.SimpleNamespace(table=self.tables[uri]))
        return types.SimpleNamespace(error="", ref=ref)


def _payload(shard_tables: ShardTables, plan: BatchPlan) -> pa.Table:
    parts = asyncio.run(shard_tables.payload(plan))
    wire = batch_response(0, 0, plan.rows, parts)
    return codec.decode(pb.TrainResponse.FromString(wire).batch.arrow_ipc)


def test_shard_tables_keep_what_batches_need_and_read_a_rewritten_shard_again(tmp_path) -> None:
    path = str(tmp_path / "a.tar")
    with open(path, "wb") as f:
        f.write(b"old")
    reader = _Reader({path: _images(0, 4)})
    shard_tables = ShardTables([reader], 1 << 30)
    ids = make_ids(0, 4)[::-1].copy()
    plan = BatchPlan(ids, np.ones(4, np.float32), _images(0, 4).schema).with_uris({0: path})
    assert _payload(shard_tables, plan).column("label").to_pylist() == [3, 2, 1, 0]
    (entry,) = shard_tables._tables.values()
    source = entry.source
    assert source is not None and source.view(0) is source.view(0)  # views built once
    assert _payload(shard_tables, plan).column("label").to_pylist() == [3, 2, 1, 0]
    assert reader.reads == [path] and entry.source is source  # the same table, views and all

    # Rewritten in place (another size): read again, and gathered from the new table.
    reader.tables[path] = _images(0, 4).set_column(1, "label", pa.array([10, 11, 12, 13]))
    with open(path, "wb") as f:
        f.write(b"rewritten")
    assert _payload(shard_tables, plan).column("label").to_pylist() == [13, 12, 11, 10]
    assert reader.reads == [path, path]

    # Rewritten with fewer rows than the plan names: the batch fails, naming the shard.
    reader.tables[path] = _images(0, 2)
    with open(path, "wb") as f:
        f.write(b"rewritten again")
    with pytest.raises(ShardError, match="no longer match"):
        _payload(shard_tables, plan)
