"""Batch plans: the curator's choice without payload bytes, gathered by the gateway from the
shard tables, byte for byte what the curator used to encode itself, for every column type."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from loader import codec
from loader.curator import Curator, CuratorSettings, JobSpec, Materialize, Ready
from loader.gather import encode_plan
from loader.ids import make_ids
from loader.job.plan import BatchPlan
from loader.registry import ShardRecord
from loader.tensors import to_arrow

ROWS = 12


def every_column_type(index: int) -> pa.Table:
    rng = np.random.default_rng(index)
    tokens = [list(range(int(n))) for n in rng.integers(0, 6, size=ROWS)]
    vectors = rng.normal(size=(ROWS, 2, 3)).astype(np.float32)
    nested = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 3), 2)
    return pa.table({
        "x": to_arrow(rng.normal(size=(ROWS, 4)).astype(np.float32)),  # fixed_shape_tensor
        "image": to_arrow(rng.integers(0, 256, size=(ROWS, 5, 4, 3), dtype=np.uint8)),
        "vec": nested,  # nested fixed_size_list
        "y": pa.array(rng.integers(0, 10, size=ROWS)),
        "tokens": pa.array(tokens, pa.list_(pa.int32())),
        "text": pa.array([f"row {index}.{i}" * (i % 3) for i in range(ROWS)]),
        "blob": pa.array([bytes([i]) * i for i in range(ROWS)], pa.binary()),
        "meta": pa.array([{"a": i, "b": str(i)} for i in range(ROWS)]),
        codec.ID: pa.array(make_ids(index, ROWS)),
    })  # fmt: skip


@pytest.fixture(params=["as set", "every row big"])
def row_sizes(request, monkeypatch):
    """The gather's paths for big tensor rows (copied run by run, and not copied at all for a
    payload's parts: `loader.gather.Deferred`) taken by every tensor column of the tables here."""
    import loader.gather

    if request.param == "every row big":
        monkeypatch.setattr(loader.gather, "RUN_ROW_BYTES", 1)
        monkeypatch.setattr(loader.gather, "DEFER_ROW_BYTES", 1)
    return request.param


@pytest.mark.parametrize("shuffle_rows", [0, 16])
def test_a_gathered_plan_is_byte_identical_to_the_curators_own_encoding(shuffle_rows, row_sizes) -> None:
    spec = JobSpec(job="j", batch_size=5, world_size=1, policy="uniform", seed=3)
    curator = Curator(spec, CuratorSettings(shuffle_rows=shuffle_rows, ready_batches=4))
    shards = {i: every_column_type(i) for i in range(3)}
    curator.start_epoch(0, [ShardRecord(index=i, uri=f"mem://{i}", rows=ROWS) for i in shards])
    checked = 0
    for index, table in shards.items():
        assert curator.add_shard(0, index, table) == ""
    curator.finish_reading(0)
    pool = pa.concat_tables(shards.values())
    position = {int(i): n for n, i in enumerate(pool.column(codec.ID).to_numpy())}
    while (candidates := curator.draw(0)) is not None:
        # What the curator encoded before plans: the drawn rows (uniform keeps them all), weight 1,
        # here taken by Arrow from all shards at once.
        rows = pool.take(pa.array([position[int(i)] for i in candidates.ids])).combine_chunks()
        before = codec.encode(rows.append_column(codec.WEIGHT, pa.array(np.ones(candidates.num_rows, np.float32))))
        curator.select(0, candidates)
        plan = curator.epochs[0].ledger.lookup(0, checked).payload
        assert isinstance(plan, BatchPlan) and plan.rows == candidates.num_rows
        assert encode_plan(plan, shards).equals(before)
        checked += 1
    assert checked == 3 * ROWS // 5 + 1  # the tail batch too


def test_an_acknowledged_batch_plans_again_from_its_ids() -> None:
    spec = JobSpec(job="j", batch_size=4, world_size=1, policy="uniform", seed=1)
    curator = Curator(spec, CuratorSettings(shuffle_rows=0, ready_batches=4))
    shards = {i: every_column_type(i) for i in range(2)}
    curator.start_epoch(0, [ShardRecord(index=i, uri=f"mem://{i}", rows=ROWS) for i in shards])
    for index, table in shards.items():
        curator.add_shard(0, index, table)
    first = curator.lookup(0, 0, 0)
    assert isinstance(first, Ready)
    curator.ack(0, 0, 0)
    again = curator.lookup(0, 0, 0)
    assert isinstance(again, Materialize)
    plan = curator.plan(again)
    assert plan.ids.tolist() == first.payload.ids.tolist()
    assert encode_plan(plan, shards).equals(encode_plan(first.payload, shards))
    # With its URIs, as the curator actor hands it to the gateway.
    named = plan.with_uris({0: "a.tar", 1: "b.tar", 7: "unused.tar"})
    assert dict(named.uris) == {s: ("a.tar", "b.tar")[s] for s in plan.shards()}


def test_a_plan_without_a_schema_takes_its_first_shards() -> None:
    shards = {i: every_column_type(i) for i in range(2)}
    ids = np.concatenate([make_ids(1, 3), make_ids(0, 2)])
    plan = BatchPlan(ids, np.full(5, 0.5, np.float32), None)
    table = codec.decode(encode_plan(plan, shards))
    assert table.column(codec.ID).to_pylist() == ids.tolist()
    assert table.schema.names[:-1] == shards[0].schema.names and table.column(codec.WEIGHT).to_pylist() == [0.5] * 5


def test_rows_that_alternate_between_shards_gather_the_same_as_row_by_row(row_sizes) -> None:
    """A batch drawn from a merged buffer table interleaves shards: gathered shard by shard and
    put back in order, it must equal the run-by-run gather."""
    from loader.gather import gather_rows, groups_by_id

    shards = {i: every_column_type(i) for i in range(3)}
    rng = np.random.default_rng(5)
    ids = rng.permutation(np.concatenate([make_ids(i, ROWS) for i in shards]))[:20]
    plan = BatchPlan(ids, np.linspace(0.5, 2.0, 20, dtype=np.float32), shards[0].schema)
    row_by_row = gather_rows(plan.schema, groups_by_id(ids, shards))
    expected = codec.encode(row_by_row.append_column(codec.WEIGHT, pa.array(plan.weights)))
    assert encode_plan(plan, shards).equals(expected)
    assert codec.decode(encode_plan(plan, shards)).column(codec.ID).to_pylist() == ids.tolist()
