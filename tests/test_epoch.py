"""Unit and property tests for `loader.epoch`: no Ray, no gRPC, pure numpy/pyarrow."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from loader.epoch import Candidates, EpochAssembler, ShuffleBuffer, tail_sizes
from loader.ids import make_ids, row_of, shard_of

MAX_SHARDS = 12


def shard_table(index: int, rows: int) -> pa.Table:
    ids = make_ids(index, rows)
    # `x` is derived from the id so a row split across columns (wrong take/concat) shows up.
    return pa.table({"x": pa.array(ids * 3 + 1), "_id": pa.array(ids)})


def materialize(drawn: list[Candidates]) -> list[pa.Table]:
    """Every candidate's row; the ids a buffer reports must be those of the rows it holds."""
    tables = [c.take() for c in drawn]
    for c, t in zip(drawn, tables):
        np.testing.assert_array_equal(t.column("_id").to_numpy(), c.ids)
    return tables


def run_epoch(shard_rows, batch_size, world_size, shuffle_rows, seed, pops):
    """Feeds one epoch, calling pop_ready after the shards `pops` marks; checks per-call invariants."""
    assembler = EpochAssembler(batch_size, world_size, shuffle_rows, seed)
    hold = max(shuffle_rows, batch_size * world_size)
    early: list[pa.Table] = []
    for i, rows in enumerate(shard_rows):
        assembler.add(shard_table(i, rows))
        if pops[i]:
            early += materialize(assembler.pop_ready())
            # Anything left that could still form a batch beyond the reserve should have gone out.
            assert assembler.buffered_rows() < batch_size + hold
            assert not assembler.exhausted
    early += materialize(assembler.pop_ready())
    assert assembler.buffered_rows() < batch_size + hold
    assert not assembler.finished
    assembler.finish()
    tail = materialize(assembler.pop_ready())
    return assembler, early, tail


def ids_of(batches: list[pa.Table]) -> list[np.ndarray]:
    return [b.column("_id").to_numpy() for b in batches]


epoch_cases = st.fixed_dictionaries(
    {
        "shard_rows": st.lists(st.integers(0, 300), min_size=0, max_size=MAX_SHARDS),
        "batch_size": st.integers(1, 64),
        "world_size": st.integers(1, 8),
        "shuffle_rows": st.integers(0, 500),
        "seed": st.integers(0, 2**32 - 1),
        "pops": st.lists(st.booleans(), min_size=MAX_SHARDS, max_size=MAX_SHARDS),
    }
)


@settings(max_examples=60, deadline=None)
@given(case=epoch_cases)
def test_epoch_properties(case) -> None:
    B, W = case["batch_size"], case["world_size"]
    total = sum(case["shard_rows"])
    assembler, early, tail = run_epoch(**case)
    batches = early + tail

    expected = np.concatenate([make_ids(i, r) for i, r in enumerate(case["shard_rows"])] or [np.empty(0, np.int64)])
    if batches:
        everything = pa.concat_tables(batches)
        emitted = everything.column("_id").to_numpy()
        np.testing.assert_array_equal(everything.column("x").to_numpy(), emitted * 3 + 1)
    else:
        emitted = np.empty(0, np.int64)
    np.testing.assert_array_equal(np.sort(emitted), np.sort(expected))  # each id exactly once

    assert all(b.num_rows <= B for b in batches)
    assert all(b.num_rows == B for b in early)

    n = len(batches)
    assert n % W == 0
    # Fewest batches that fit the rows and keep ranks even: no rank waits on a needless batch.
    assert n == math.ceil(math.ceil(total / B) / W) * W
    # The tail is spread evenly, never one big batch and a scrap.
    if tail:
        sizes = [b.num_rows for b in tail]
        assert max(sizes) - min(sizes) <= 1
    # An empty batch appears only where the rows cannot cover every rank's slots: fewer rows than
    # batches (total < world_size, or batch_size 1 with total not a multiple of world_size).
    empties = sum(b.num_rows == 0 for b in batches)
    assert empties == max(0, n - total)
    if total >= W and B >= 2:
        assert empties == 0

    assert sum(b.num_rows for b in batches) == total
    assert assembler.emitted == n
    assert assembler.exhausted
    assert assembler.pop_ready() == []
    assert assembler.emitted == n


# Fewer examples: each one runs the epoch twice, and batch_size 1 over thousands of rows is slow.
@settings(max_examples=20, deadline=None)
@given(case=epoch_cases)
def test_same_seed_and_calls_give_the_same_batches(case) -> None:
    # A resumed trainer relies on getting the very same batches again.
    _, early, tail = run_epoch(**case)
    _, early2, tail2 = run_epoch(**case)
    first, again = ids_of(early + tail), ids_of(early2 + tail2)
    assert len(first) == len(again)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    remaining=st.integers(0, 2000),
    emitted=st.integers(0, 50),
    batch_size=st.integers(1, 64),
    world_size=st.integers(1, 8),
)
def test_tail_sizes_properties(remaining, emitted, batch_size, world_size) -> None:
    sizes = tail_sizes(remaining, emitted, batch_size, world_size)
    assert sum(sizes) == remaining
    assert (emitted + len(sizes)) % world_size == 0
    assert all(0 <= s <= batch_size for s in sizes)
    if sizes:
        assert max(sizes) - min(sizes) <= 1
        # Minimal: one batch fewer would not fit or would break the multiple of world_size.
        assert math.ceil(remaining / batch_size) > len(sizes) - world_size


@pytest.mark.parametrize(
    "remaining, emitted, batch_size, world_size, expected",
    [
        (0, 4, 8, 2, []),
        (0, 0, 8, 2, []),
        (16, 0, 8, 2, [8, 8]),
        # 10 rows fit one batch, but rank 1 needs one too.
        (10, 0, 8, 2, [5, 5]),
        # Fewer rows than ranks: someone gets an empty batch rather than a row being served twice.
        (3, 0, 8, 4, [1, 1, 1, 0]),
        # One batch already out: three more make four, 17 rows spread 6/6/5.
        (17, 1, 8, 2, [6, 6, 5]),
        (24, 2, 8, 2, [6, 6, 6, 6]),
        (5, 0, 8, 1, [5]),
    ],
)
def test_tail_sizes_examples(remaining, emitted, batch_size, world_size, expected) -> None:
    assert tail_sizes(remaining, emitted, batch_size, world_size) == expected


def flat_order(seed: int) -> np.ndarray:
    _, early, tail = run_epoch([100] * 5, 16, 2, 200, seed, [True] * MAX_SHARDS)
    return np.concatenate(ids_of(early + tail))


def test_same_seed_same_order_different_seed_different_order() -> None:
    np.testing.assert_array_equal(flat_order(7), flat_order(7))
    a, b = flat_order(7), flat_order(8)
    assert sorted(a) == sorted(b)
    assert not np.array_equal(a, b)


def test_shuffle_mixes_shards_within_the_buffer() -> None:
    # With the whole epoch buffered, the first batch should not be the first shard's rows in order.
    _, early, tail = run_epoch([50] * 4, 16, 1, 1000, 3, [False] * MAX_SHARDS)
    assert early == []
    first = tail[0].column("_id").to_numpy()
    assert len(np.unique(shard_of(first))) > 1
    assert not np.array_equal(row_of(first), np.arange(16))


def test_nothing_leaves_before_the_reserve_is_exceeded() -> None:
    # Reserve is world_size * batch_size = 8 rows; a batch leaves only once 8 + 4 rows wait.
    assembler = EpochAssembler(batch_size=4, world_size=2, shuffle_rows=0, seed=0)
    assembler.add(shard_table(0, 11))
    assert assembler.pop_ready() == []
    assembler.add(shard_table(1, 1))
    out = assembler.pop_ready()
    assert [b.num_rows for b in out] == [4]
    assert assembler.buffered_rows() == 8


def test_shuffle_rows_enlarges_the_reserve() -> None:
    assembler = EpochAssembler(batch_size=4, world_size=1, shuffle_rows=20, seed=0)
    assembler.add(shard_table(0, 23))
    assert assembler.pop_ready() == []
    assembler.add(shard_table(1, 1))
    assert [b.num_rows for b in assembler.pop_ready()] == [4]


def test_add_after_finish_is_refused() -> None:
    assembler = EpochAssembler(4, 1, 0, 0)
    assembler.finish()
    with pytest.raises(RuntimeError):
        assembler.add(shard_table(0, 3))
    assert assembler.waiting_rows() == 0


@pytest.mark.parametrize("batch_size, world_size", [(0, 1), (1, 0), (-1, 2)])
def test_non_positive_sizes_are_refused(batch_size, world_size) -> None:
    with pytest.raises(ValueError):
        EpochAssembler(batch_size, world_size, 0, 0)


def test_empty_epoch_ends_at_once() -> None:
    assembler = EpochAssembler(4, 3, 0, 0)
    assembler.add(shard_table(0, 0))
    assert not assembler.exhausted
    assembler.finish()
    assert assembler.pop_ready() == []
    assert assembler.exhausted


def test_shuffle_buffer_draws_without_replacement() -> None:
    buffer = ShuffleBuffer(np.random.default_rng(0))
    buffer.add(shard_table(0, 10))
    buffer.add(shard_table(1, 0))
    assert len(buffer) == 10
    first = buffer.draw(4).ids
    # Rows added between draws join the pool without disturbing what is left.
    buffer.add(shard_table(1, 5))
    assert len(buffer) == 11
    rest = buffer.draw(11).take().column("_id").to_numpy()
    assert len(buffer) == 0
    everything = np.concatenate([first, rest])
    np.testing.assert_array_equal(np.sort(everything), np.concatenate([make_ids(0, 10), make_ids(1, 5)]))


def test_shuffle_buffer_refuses_overdraw() -> None:
    buffer = ShuffleBuffer(np.random.default_rng(0))
    buffer.add(shard_table(0, 3))
    with pytest.raises(ValueError, match="cannot draw 4"):
        buffer.draw(4)
    # A refused draw takes nothing.
    assert len(buffer) == 3
    assert buffer.draw(3).num_rows == 3


@settings(max_examples=40, deadline=None)
@given(case=epoch_cases, clusters=st.integers(1, 7), gamma=st.floats(0.05, 1.0))
def test_bandit_quotas_keep_every_row_exactly_once(case, clusters, gamma) -> None:
    """The clustered buffer changes which rows a super-batch holds, never how many or how often."""
    from loader.epoch import ClusteredShuffleBuffer
    from loader.selection.bandit import Exp3Arms

    arms = Exp3Arms(gamma=gamma, eta=4.0)
    arms.update(np.arange(clusters), np.linspace(-1, 1, clusters))  # uneven weights

    class ByRow:  # what a Selector answers: a cluster per row, quotas from the bandit
        def cluster_of(self, ids):
            return (row_of(ids) % clusters).astype(np.int64)

        def quotas(self, k, counts):
            return arms.quotas(k, counts)

    def buffer(rng):
        return ClusteredShuffleBuffer(rng, ByRow())

    B, W = case["batch_size"], case["world_size"]
    assembler = EpochAssembler(B, W, case["shuffle_rows"], case["seed"], buffer=buffer)
    batches = []
    for i, rows in enumerate(case["shard_rows"]):
        assembler.add(shard_table(i, rows))
        batches += materialize(assembler.pop_ready())
    assembler.finish()
    batches += materialize(assembler.pop_ready())
    expected = np.concatenate([make_ids(i, r) for i, r in enumerate(case["shard_rows"])] or [np.empty(0, np.int64)])
    emitted = np.concatenate(ids_of(batches)) if batches else np.empty(0, np.int64)
    np.testing.assert_array_equal(np.sort(emitted), np.sort(expected))
    assert len(batches) % W == 0 and all(b.num_rows <= B for b in batches)
    for b in batches:  # columns stay aligned through the per-table takes
        np.testing.assert_array_equal(b.column("x").to_numpy(), b.column("_id").to_numpy() * 3 + 1)


class EagerShuffleBuffer(ShuffleBuffer):
    _MAX_TABLES = 1  # merges the old tables' waiting rows on every add


def _small(ids: np.ndarray) -> np.ndarray:
    return shard_of(ids) * 1000 + row_of(ids)  # exact in float32


def _mixed_table(index: int, rows: int) -> pa.Table:
    from loader.tensors import to_arrow

    ids = make_ids(index, rows)
    return pa.table({
        "x": to_arrow(np.repeat(_small(ids)[:, None], 4, axis=1).reshape(rows, 2, 2).astype(np.float32)),
        "name": pa.array([f"s{i}" for i in ids.tolist()]),
        "_id": pa.array(ids),
    })  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(
    shard_rows=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    draws=st.lists(st.integers(0, 30), min_size=1, max_size=20),
    seed=st.integers(0, 2**32 - 1),
)
def test_merging_old_tables_never_changes_a_draw(shard_rows, draws, seed) -> None:
    """Merging copies waiting rows but keeps their positions: the same seed draws the same rows."""
    lazy, eager = ShuffleBuffer(np.random.default_rng(seed)), EagerShuffleBuffer(np.random.default_rng(seed))
    shards = iter(enumerate(shard_rows))
    for k in draws:
        added = next(shards, None)
        if added is not None:
            for buffer in (lazy, eager):
                buffer.add(_mixed_table(*added))
        k = min(k, len(lazy))
        a, b = lazy.draw(k), eager.draw(k)
        np.testing.assert_array_equal(a.ids, b.ids)
        ta, tb = a.take(), b.take()
        assert ta.equals(tb)
        if not ta.num_rows:
            continue
        ids = ta.column("_id").to_numpy()
        np.testing.assert_array_equal(ta.column("name").to_pylist(), [f"s{i}" for i in ids.tolist()])
        x = ta.column("x").chunk(0).to_numpy_ndarray()
        np.testing.assert_array_equal(x.reshape(len(ids), 4), np.repeat(_small(ids)[:, None], 4, axis=1))


def test_candidates_copy_only_the_rows_picked() -> None:
    buffer = ShuffleBuffer(np.random.default_rng(1))
    for i in range(3):
        buffer.add(_mixed_table(i, 10))
    drawn = buffer.draw(25)
    picks = np.array([0, 3, 4, 17, 24])
    kept = drawn.take(picks)
    np.testing.assert_array_equal(kept.column("_id").to_numpy(), drawn.ids[picks])
    assert all(column.num_chunks == 1 for column in kept.columns)  # the trainer maps it zero-copy
    assert drawn.take(np.zeros(0, np.int64)).num_rows == 0
    with pytest.raises(ValueError, match="increasing"):
        drawn.take(np.array([3, 1]))
    with pytest.raises(IndexError):
        drawn.take(np.array([25]))


class TightShuffleBuffer(ShuffleBuffer):
    _MAX_TABLES = 1000  # only the memory bound merges
    _SLACK_BYTES = 0


def test_merges_bound_what_old_tables_hold() -> None:
    buffer, unbounded = TightShuffleBuffer(np.random.default_rng(0)), ShuffleBuffer(np.random.default_rng(0))
    worst = 0
    for i in range(60):
        for b in (buffer, unbounded):
            b.add(shard_table(i, 1000))
            while len(b) > 300:
                b.draw(64)
        # Random draws leave stragglers in old tables, each pinning 1000 rows. At an add the old
        # tables wait on at most 300 rows, so a merge keeps them to 4 x 300; then the new table.
        assert buffer.held_rows() <= 4 * 300 + 1000
        worst = max(worst, unbounded.held_rows())
    assert worst > 4 * 300 + 1000  # so the bound above did something
    for b in (buffer, unbounded):
        b.draw(len(b))
        assert b.held_rows() == 0
