"""Unit tests for sample ids (`loader.ids`) and the pool's per-sample metadata (`loader.pool`)."""

from __future__ import annotations

import numpy as np
import pytest

from loader.ids import MAX_SHARDS, ROW_BITS, ROW_MASK, make_ids, row_of, shard_of
from loader.pool import PoolIndex, UnknownSamples
from loader.selection.scores import fill_missing


@pytest.mark.parametrize("shard_index", [0, 1, 12345, MAX_SHARDS - 1])
def test_ids_round_trip(shard_index: int) -> None:
    ids = make_ids(shard_index, 7)
    assert ids.dtype == np.int64
    assert (ids >= 0).all()
    np.testing.assert_array_equal(shard_of(ids), np.full(7, shard_index))
    np.testing.assert_array_equal(row_of(ids), np.arange(7))
    assert len(np.unique(ids)) == 7


def test_largest_id_stays_non_negative_and_unpacks() -> None:
    # Building a full 2**32-row shard would take 32 GiB, so pack the corner by hand.
    top = np.array([((MAX_SHARDS - 1) << ROW_BITS) | ROW_MASK], dtype=np.int64)
    assert top[0] == np.iinfo(np.int64).max
    assert shard_of(top)[0] == MAX_SHARDS - 1
    assert row_of(top)[0] == ROW_MASK


def test_ids_of_neighbouring_shards_never_collide() -> None:
    a, b = make_ids(3, 1000), make_ids(4, 1000)
    assert not set(a.tolist()) & set(b.tolist())


def test_empty_shard_has_no_ids() -> None:
    assert make_ids(2, 0).shape == (0,)


@pytest.mark.parametrize(
    "shard_index, rows, needle",
    [(-1, 3, "shard index"), (MAX_SHARDS, 3, "shard index"), (0, -1, "rows"), (0, ROW_MASK + 2, "rows")],
)
def test_make_ids_range_errors(shard_index: int, rows: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_ids(shard_index, rows)


def pool() -> PoolIndex:
    p = PoolIndex()
    p.ensure_shard(0, 5)
    p.ensure_shard(3, 2)
    return p


def test_record_and_read_losses() -> None:
    p = pool()
    assert len(p) == 7
    ids = np.array([make_ids(0, 5)[1], make_ids(3, 2)[0]])
    p.record_losses(ids, np.array([0.5, 2.0]))
    assert p.feedback_samples == 2
    everything = np.concatenate([make_ids(0, 5), make_ids(3, 2)])
    expected = np.full(7, np.nan, np.float32)
    expected[1], expected[5] = 0.5, 2.0
    np.testing.assert_array_equal(p.learner_loss(everything), expected)
    # A later report replaces the earlier one.
    p.record_losses(ids[:1], np.array([0.25]))
    assert p.learner_loss(ids[:1])[0] == np.float32(0.25)
    assert p.feedback_samples == 3


def test_learner_loss_keeps_the_order_asked_for() -> None:
    p = pool()
    ids = np.array([make_ids(3, 2)[1], make_ids(0, 5)[4], make_ids(3, 2)[0]])
    p.record_losses(ids, np.array([3.0, 1.0, 2.0]))
    np.testing.assert_array_equal(p.learner_loss(ids[::-1]), [2.0, 1.0, 3.0])


def test_ensure_shard_keeps_losses_unless_its_length_changes() -> None:
    p = pool()
    ids = make_ids(0, 5)[:1]
    p.record_losses(ids, np.array([1.0]))
    p.ensure_shard(0, 5)
    assert p.learner_loss(ids)[0] == 1.0
    p.ensure_shard(0, 6)
    assert np.isnan(p.learner_loss(ids)[0])


@pytest.mark.parametrize(
    "bad_id",
    [
        int(make_ids(1, 1)[0]),  # shard never added
        int(make_ids(3, 3)[2]),  # row 2 of a 2-row shard
        int(make_ids(MAX_SHARDS - 1, 1)[0]),
    ],
)
def test_unknown_samples_are_named_and_change_nothing(bad_id: int) -> None:
    p = pool()
    good = make_ids(0, 5)[:2]
    ids = np.concatenate([good, [bad_id]])
    with pytest.raises(UnknownSamples, match=f"sample id {bad_id} "):
        p.record_losses(ids, np.ones(3))
    assert p.feedback_samples == 0
    assert np.isnan(p.learner_loss(good)).all()


def test_check_ids_names_the_offender_among_many() -> None:
    p = pool()
    ids = np.concatenate([make_ids(0, 5), make_ids(3, 4)])  # rows 2 and 3 of shard 3 do not exist
    with pytest.raises(UnknownSamples, match=f"sample id {int(make_ids(3, 3)[2])} "):
        p.check_ids(ids)
    p.check_ids(make_ids(3, 2))


@pytest.mark.parametrize("bad_loss", [np.nan, np.inf, -np.inf])
def test_non_finite_losses_are_rejected(bad_loss: float) -> None:
    p = pool()
    ids = make_ids(0, 3)
    with pytest.raises(ValueError, match="finite"):
        p.record_losses(ids, np.array([1.0, bad_loss, 2.0]))
    assert p.feedback_samples == 0
    assert np.isnan(p.learner_loss(ids)).all()


@pytest.mark.parametrize(
    "ids, losses",
    [
        (make_ids(0, 3), np.ones(2)),
        (make_ids(0, 4).reshape(2, 2), np.ones((2, 2))),
    ],
)
def test_shape_mismatch_is_rejected(ids, losses) -> None:
    p = pool()
    with pytest.raises(ValueError, match="1-d of equal length"):
        p.record_losses(ids, losses)
    assert p.feedback_samples == 0
    assert np.isnan(p.learner_loss(make_ids(0, 5))).all()


def test_unknown_samples_is_a_value_error() -> None:
    # Callers catch ValueError for every rejected report.
    assert issubclass(UnknownSamples, ValueError)


def test_unseen_fallback_follows_first_reports_not_later_ones():
    """A sample never reported is assumed as hard as samples were when first reported; later,
    lower losses of already-trained samples must not make unseen samples look learned."""
    from loader.pool import PoolIndex

    pool = PoolIndex()
    pool.ensure_shard(0, 4)
    ids = make_ids(0, 4)
    assert np.isnan(pool.unseen_learner_loss())
    pool.record_losses(ids[:2], np.array([2.0, 2.0], np.float32))
    assert pool.unseen_learner_loss() == pytest.approx(2.0)
    for _ in range(20):  # the learner fits the two samples it was served
        pool.record_losses(ids[:2], np.array([0.01, 0.01], np.float32))
    assert pool.unseen_learner_loss() == pytest.approx(2.0)
    pool.record_losses(ids[2:3], np.array([1.0], np.float32))  # a first report moves it
    assert 1.0 < pool.unseen_learner_loss() < 2.0


def clustered_pool() -> tuple[PoolIndex, np.ndarray]:
    """Shard 0 in clusters 0 and 1, shard 1 not clustered (its scores have not arrived)."""
    p = PoolIndex()
    p.ensure_shard(0, 6)
    p.ensure_shard(1, 2)
    p.set_clusters(0, np.array([0, 0, 0, 1, 1, 1]))
    return p, np.concatenate([make_ids(0, 6), make_ids(1, 2)])


def test_the_fallback_is_the_clusters_average_of_first_reports() -> None:
    p, ids = clustered_pool()
    assert np.isnan(p.fallback_learner_loss(ids)).all()  # nothing reported yet
    p.record_losses(ids[[0, 1]], np.array([1.0, 3.0]))  # cluster 0 only
    fallback = p.fallback_learner_loss(ids)
    assert fallback.dtype == np.float32 and fallback.shape == (8,)
    np.testing.assert_allclose(fallback[:3], 2.0)
    # Cluster 1 has no report, shard 1 no clusters: both take the pool's value.
    np.testing.assert_allclose(fallback[3:], p.unseen_learner_loss())
    p.record_losses(ids[[3]], np.array([5.0]))
    np.testing.assert_allclose(p.fallback_learner_loss(ids[[2, 4]]), [2.0, 5.0])


def test_a_clusters_fallback_ignores_repeated_reports_and_follows_new_first_ones() -> None:
    p, ids = clustered_pool()
    p.record_losses(ids[[0]], np.array([2.0]))
    for _ in range(20):  # the learner fits the sample it keeps being served
        p.record_losses(ids[[0]], np.array([0.01]))
    assert p.fallback_learner_loss(ids[[1]])[0] == pytest.approx(2.0)
    p.record_losses(ids[[1]], np.array([1.0]))  # a newer first report moves it, by the smoothing
    assert p.fallback_learner_loss(ids[[2]])[0] == pytest.approx((0.9 * 0.1 * 2.0 + 0.1 * 1.0) / (0.9 * 0.1 + 0.1))
    # Two samples first reported together count as two.
    p.record_losses(ids[[3, 4, 5]], np.array([1.0, 1.0, 4.0]))
    assert p.fallback_learner_loss(ids[[3]])[0] == pytest.approx(2.0)


def test_the_fallback_survives_a_restart_and_old_states_still_load() -> None:
    p, ids = clustered_pool()
    p.record_losses(ids[[0, 3, 6]], np.array([1.0, 4.0, 2.0]))
    state = p.get_state()
    assert "reported" not in state
    restored = PoolIndex()
    restored.reset(state)
    np.testing.assert_array_equal(restored.fallback_learner_loss(ids), p.fallback_learner_loss(ids))
    # A state saved before the per-cluster averages existed, with the per-sample report counts
    # that were kept then: it loads, and the pool's value stands in for every cluster.
    old = {k: v for k, v in state.items() if not k.startswith("cluster_loss")}
    old["reported"] = np.ones(len(state["learner_loss"]), np.uint32)
    restored = PoolIndex()
    restored.reset(old)
    np.testing.assert_array_equal(restored.learner_loss(ids), p.learner_loss(ids))
    np.testing.assert_allclose(restored.fallback_learner_loss(ids), p.unseen_learner_loss())


def test_fill_missing_takes_one_fallback_per_value_and_refuses_a_misfit() -> None:
    p, ids = clustered_pool()
    p.record_losses(ids[[0, 3]], np.array([1.0, 4.0]))
    filled = fill_missing(p.learner_loss(ids[[0, 1, 4]]), p.fallback_learner_loss(ids[[0, 1, 4]]))
    np.testing.assert_allclose(filled, [1.0, 1.0, 4.0])
    with pytest.raises(ValueError, match="fallback has shape"):
        fill_missing(np.array([np.nan, 1.0, np.nan]), np.array([1.0, 2.0]))
