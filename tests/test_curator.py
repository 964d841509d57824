"""Unit tests for the pure `Curator`: the ledger, per-rank sequence numbers, acks and feedback."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from loader import codec
from loader.curator import (
    Curator,
    CuratorSettings,
    EndOfEpoch,
    Failed,
    JobSpec,
    Materialize,
    Pending,
    Ready,
)
from loader.gather import encode_plan
from loader.ids import make_ids, row_of, shard_of
from loader.registry import ShardRecord
from loader.selection.options import SelectionOptions

SPEC = JobSpec(job="j", batch_size=4, world_size=2, policy="uniform", seed=1)
# No shuffle reserve beyond world_size * batch_size = 8 rows: a batch leaves once 12 rows wait.
SETTINGS = CuratorSettings(shuffle_rows=0, ready_batches=2, select_ahead=2)


def shard(index: int, rows: int) -> pa.Table:
    """A shard as `read_with_ids` returns it: the source's columns, then `_id`."""
    ids = make_ids(index, rows)
    x = (shard_of(ids) * 1000 + row_of(ids)).astype(np.float64)
    return pa.table({"x": x}).append_column(codec.ID, pa.array(ids))


def records(n: int) -> list[ShardRecord]:
    return [ShardRecord(index=i, uri=f"mem://shard-{i}", rows=10) for i in range(n)]


def curator_with(rows_per_shard: list[int], finish: bool = False, epoch: int = 0) -> Curator:
    curator = Curator(SPEC, SETTINGS)
    curator.start_epoch(epoch, records(len(rows_per_shard)))
    for i, rows in enumerate(rows_per_shard):
        assert curator.add_shard(epoch, i, shard(i, rows)) == ""
    if finish:
        curator.finish_reading(epoch)
    return curator


def decoded(result: Ready) -> pa.Table:
    """The batch a gateway would send for `result`: its plan gathered from the shards."""
    assert isinstance(result, Ready), result
    plan = result.payload
    # shard() derives each value from the id, so any table long enough holds the same rows.
    tables = {index: shard(index, 1024) for index in plan.shards()}
    table = codec.decode(encode_plan(plan, tables))
    assert table.num_rows == result.rows
    return table


def test_pending_until_enough_rows() -> None:
    curator = curator_with([10])
    assert curator.lookup(0, 0, 0) == Pending()
    assert curator.lookup(1, 0, 0) == Pending()


def test_ready_batches_follow_global_order() -> None:
    # 20 rows: three full batches leave (20 -> 8 held back), g = 0, 1, 2.
    curator = curator_with([10, 10])
    run = curator.epochs[0]
    # Nothing is chosen before a rank asks; the first request chooses as far as rows allow.
    assert len(run.ledger) == 0
    curator.lookup(0, 0, 0)
    assert len(run.ledger) == 3
    for rank, seq in [(0, 0), (1, 0), (0, 1)]:
        result = curator.lookup(rank, 0, seq)
        table = decoded(result)
        assert result.seq == seq and result.rows == 4
        assert table.column_names == ["x", codec.ID, codec.WEIGHT]
        ids = table.column(codec.ID).to_numpy()
        np.testing.assert_array_equal(ids, run.ledger.ids[seq * SPEC.world_size + rank])
        np.testing.assert_array_equal(table.column("x").to_numpy(), shard_of(ids) * 1000 + row_of(ids))
        weights = table.column(codec.WEIGHT).to_numpy()
        assert weights.dtype == np.float32
        np.testing.assert_array_equal(weights, np.ones(4, np.float32))
    # g = 3 is not assembled yet.
    assert curator.lookup(1, 0, 1) == Pending()


def test_end_of_epoch_gives_every_rank_the_same_count() -> None:
    curator = curator_with([10, 10], finish=True)
    per_rank: dict[int, list[Ready]] = {0: [], 1: []}
    for rank in (0, 1):
        seq = 0
        while isinstance(result := curator.lookup(rank, 0, seq), Ready):
            per_rank[rank].append(result)
            seq += 1
        assert result == EndOfEpoch(batches=3)
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    # 20 rows: three full batches, then 8 rows over three tail batches (3, 3, 2): g = 3, 4, 5.
    assert [r.rows for r in per_rank[0]] == [4, 4, 3]
    assert [r.rows for r in per_rank[1]] == [4, 3, 2]
    all_ids = np.concatenate([decoded(r).column(codec.ID).to_numpy() for rs in per_rank.values() for r in rs])
    np.testing.assert_array_equal(np.sort(all_ids), np.concatenate([make_ids(0, 10), make_ids(1, 10)]))
    # Asking past the end again keeps answering EndOfEpoch, not Pending.
    assert curator.lookup(0, 0, 7) == EndOfEpoch(batches=3)


def test_ack_drops_payload_and_a_later_lookup_materializes_the_same_batch() -> None:
    curator = curator_with([10, 10], finish=True)
    first = curator.lookup(0, 0, 0)
    first_table = decoded(first)
    curator.ack(0, 0, 0)
    again = curator.lookup(0, 0, 0)
    assert isinstance(again, Materialize)
    assert again.seq == 0
    np.testing.assert_array_equal(again.ids, first_table.column(codec.ID).to_numpy())
    np.testing.assert_array_equal(again.weights, first_table.column(codec.WEIGHT).to_numpy())
    # Rank 0's ack leaves rank 1's batch, and rank 0's later ones, in place.
    assert isinstance(curator.lookup(1, 0, 0), Ready)
    assert isinstance(curator.lookup(0, 0, 1), Ready)


def test_ack_covers_every_earlier_sequence_of_that_rank() -> None:
    curator = curator_with([10, 10], finish=True)
    assert isinstance(curator.lookup(1, 0, 2), Ready)  # chooses the epoch's batches
    curator.ack(1, 0, 1)
    assert isinstance(curator.lookup(1, 0, 0), Materialize)
    assert isinstance(curator.lookup(1, 0, 1), Materialize)
    assert isinstance(curator.lookup(1, 0, 2), Ready)
    # An older ack arriving late must not move the mark backwards.
    curator.ack(1, 0, 0)
    assert curator.epochs[0].ledger.acked[1] == 1


def test_rebuilt_payload_matches_the_original() -> None:
    curator = curator_with([10, 10], finish=True)
    first = curator.lookup(1, 0, 1)
    original = decoded(first)
    curator.ack(1, 0, 1)
    wanted = curator.lookup(1, 0, 1)
    assert isinstance(wanted, Materialize)
    again = Ready(wanted.seq, len(wanted.ids), curator.plan(wanted))
    assert decoded(again).equals(original)
    tables = {index: shard(index, 10) for index in again.payload.shards()}
    assert encode_plan(again.payload, tables).equals(encode_plan(first.payload, tables))


def test_schema_mismatch_is_refused_and_adds_nothing() -> None:
    curator = curator_with([10])
    run = curator.epochs[0]
    waiting_before, buffered_before = run.assembler.waiting_rows(), run.assembler.buffered_rows()
    ids = make_ids(5, 10)
    bad = pa.table({"x": pa.array(np.arange(10, dtype=np.int64)), codec.ID: pa.array(ids)})
    reason = curator.add_shard(0, 5, bad)
    assert "schema" in reason
    assert reason == "schema differs from the pool's: column 'x' is int64, the pool's is float64"
    assert run.assembler.waiting_rows() == waiting_before
    assert run.assembler.buffered_rows() == buffered_before
    # The refused shard's samples never entered the pool either.
    assert curator.feedback(ids[:1], np.ones(1, np.float32)) != ""


def test_feedback_is_validated_before_anything_changes() -> None:
    curator = curator_with([10, 10])
    known = make_ids(0, 3)
    unknown_shard = make_ids(7, 1)
    past_end = np.array([make_ids(1, 11)[10]])
    bad_calls = [
        (np.concatenate([known, unknown_shard]), np.ones(4, np.float32), str(int(unknown_shard[0]))),
        (np.concatenate([known, past_end]), np.ones(4, np.float32), str(int(past_end[0]))),
        (known, np.array([1.0, np.nan, 2.0], np.float32), "finite"),
        (known, np.array([1.0, np.inf, 2.0], np.float32), "finite"),
        (known, np.ones(2, np.float32), "equal length"),
    ]
    for ids, losses, needle in bad_calls:
        message = curator.feedback(ids, losses)
        assert needle in message, message
        assert curator.stats()["feedback_samples"] == 0
        assert np.isnan(curator.pool.learner_loss(known)).all()

    assert curator.feedback(known, np.array([0.5, 1.5, 2.5], np.float32)) == ""
    assert curator.stats()["feedback_samples"] == 3
    np.testing.assert_array_equal(curator.pool.learner_loss(known), [0.5, 1.5, 2.5])


@pytest.mark.parametrize(
    "field, value",
    [("batch_size", 8), ("world_size", 4), ("policy", "loss"), ("seed", 2)],
)
def test_job_spec_conflict_names_the_field(field, value) -> None:
    other = JobSpec(**{**SPEC.__dict__, field: value})
    message = SPEC.conflict(other)
    assert f"{field}={getattr(SPEC, field)!r}" in message
    assert f"{field}={value!r}" in message
    assert "'j'" in message


def test_job_spec_without_conflict() -> None:
    assert SPEC.conflict(JobSpec("j", 4, 2, "uniform", 1)) == ""
    # The job name is the key that brought them together, not a setting to agree on.
    assert SPEC.conflict(JobSpec("other", 4, 2, "uniform", 1)) == ""


def test_reading_pauses_when_waiting_rows_run_ahead_and_choosing_is_on_demand() -> None:
    curator = Curator(SPEC, SETTINGS)
    curator.start_epoch(0, records(3))
    assert curator.wants_more(0)
    for i in range(3):
        curator.add_shard(0, i, shard(i, 10))
    # 30 rows wait, more than ready_batches * world_size super-batches of 4 = 16 rows, and none is
    # chosen while nobody asks.
    run = curator.epochs[0]
    assert run.assembler.waiting_rows() == 30
    assert len(run.ledger) == 0
    assert not curator.wants_more(0)
    # A request for g = 2 chooses up to select_ahead (2) batches per rank beyond it, which takes
    # the waiting rows into the shuffle buffer: reading may go on.
    curator.lookup(0, 0, 1)
    assert len(run.ledger) == 5  # 30 rows, 8 held back for the tail: five full batches
    assert run.assembler.waiting_rows() == 0
    assert curator.wants_more(0)


def test_choosing_stops_at_the_request_window() -> None:
    curator = Curator(SPEC, CuratorSettings(shuffle_rows=0, ready_batches=2, select_ahead=1))
    curator.start_epoch(0, records(5))
    for i in range(5):
        curator.add_shard(0, i, shard(i, 10))
    curator.lookup(0, 0, 0)  # g = 0, and one batch per rank beyond: g = 0..2
    assert len(curator.epochs[0].ledger) == 3
    curator.lookup(1, 0, 1)  # g = 3: up to g = 5
    assert len(curator.epochs[0].ledger) == 6


def test_start_epoch_permutes_shards_per_seed_and_epoch() -> None:
    shards = records(10)

    def order(seed: int, epoch: int) -> list[int]:
        curator = Curator(JobSpec("j", 4, 2, "uniform", seed), SETTINGS)
        return [r.index for r in curator.start_epoch(epoch, shards)]

    first = order(1, 0)
    assert sorted(first) == list(range(10))
    assert first == order(1, 0)
    assert first != list(range(10))
    assert first != order(1, 1)
    assert first != order(2, 0)


def test_epoch_cannot_start_twice() -> None:
    curator = curator_with([10])
    with pytest.raises(RuntimeError):
        curator.start_epoch(0, records(1))


def test_old_epochs_are_forgotten() -> None:
    curator = Curator(SPEC, SETTINGS)  # keep_epochs = 2
    for epoch in range(3):
        curator.start_epoch(epoch, records(1))
    result = curator.lookup(0, 0, 0)
    assert isinstance(result, Failed)
    assert "epoch 0" in result.message
    assert curator.lookup(0, 1, 0) == Pending()
    assert curator.lookup(0, 2, 0) == Pending()
    curator.ack(0, 0, 0)  # an ack for a forgotten epoch is harmless
    assert curator.stats()["epoch"] == 2


def test_an_epoch_started_early_forgets_old_epochs_only_once_claimed() -> None:
    curator = Curator(SPEC, SETTINGS)  # keep_epochs = 2
    for epoch in range(2):
        curator.start_epoch(epoch, records(1))
    curator.start_epoch(2, records(1), early=True)
    assert curator.lookup(0, 0, 0) == Pending()  # a lagging rank still reads epoch 0
    assert curator.stats()["epoch"] == 1  # no rank is in epoch 2 yet
    curator.claim_epoch(2)
    assert isinstance(curator.lookup(0, 0, 0), Failed)
    assert curator.stats()["epoch"] == 2


def test_failed_epoch_fails_lookups() -> None:
    curator = curator_with([10, 10])
    curator.fail_epoch(0, "all shards quarantined")
    assert curator.lookup(0, 0, 0) == Failed("all shards quarantined")


def test_served_counts_batches_and_samples() -> None:
    curator = Curator(SPEC, SETTINGS)
    curator.served(4)
    curator.served(3)
    stats = curator.stats()
    assert (stats["batches_served"], stats["samples_served"]) == (2, 7)


def _epoch_ids(curator: Curator, epoch: int) -> list[np.ndarray]:
    """Every batch plan's ids of an epoch whose reading is finished, rank by rank in turn."""
    batches, seq = [], 0
    while True:
        results = [curator.lookup(rank, epoch, seq) for rank in range(SPEC.world_size)]
        if any(isinstance(r, EndOfEpoch) for r in results):
            return batches
        for result in results:
            assert isinstance(result, Ready), result
            assert result.payload.schema.equals(curator.schema)  # the pool's columns, not the buffer's
            batches.append(result.payload.ids)
        seq += 1


def test_outside_snapshot_mode_buffers_hold_ids_and_an_unchanged_shard_is_added_again() -> None:
    curator = curator_with([10, 7, 9], finish=True)
    first = _epoch_ids(curator, 0)
    assert all(curator.holds_rows(i) for i in range(3)) and curator.rows_held(1) == 7
    order = curator.start_epoch(1, records(3))
    for record in order:  # the files unchanged: no table needed
        assert curator.add_again(1, record.index) == ""
    curator.finish_reading(1)
    second = _epoch_ids(curator, 1)
    assert sorted(np.concatenate(first)) == sorted(np.concatenate(second)) == sorted(
        np.concatenate([make_ids(i, n) for i, n in enumerate([10, 7, 9])])
    )
    assert [list(b) for b in first] != [list(b) for b in second]  # a new epoch's order
    # What the buffers hold is the ids alone, copied out of the shard's memory.
    kept = curator._kept[0]
    assert kept.column_names == [codec.ID]
    curator.forget_rows(0)
    assert not curator.holds_rows(0)


def test_snapshot_mode_buffers_hold_whole_tables() -> None:
    options = SelectionOptions(learner_loss="snapshot", learner="loader.models:mlp")
    spec = JobSpec(job="s", batch_size=4, world_size=1, policy="loss", seed=1, options=options)
    curator = Curator(spec, SETTINGS)
    assert curator.needs_snapshot
    curator.start_epoch(0, records(1))
    assert curator.add_shard(0, 0, shard(0, 10)) == ""
    assert not curator.holds_rows(0)
    curator.finish_reading(0)
    candidates = curator.draw(0)
    assert candidates is not None and "x" in candidates.take().column_names  # the scorer's inputs
