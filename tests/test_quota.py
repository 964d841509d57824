"""Unit tests for `loader.selection.quota`: the per-cluster candidate buffer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.selection.quota import ClusterBuffer


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    fractions=st.lists(st.lists(st.floats(0, 1), min_size=8, max_size=8), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_draws_respect_quotas_and_never_repeat(sizes, fractions, seed) -> None:
    rng = np.random.default_rng(seed)
    buffer = ClusterBuffer()
    clusters = np.repeat(np.arange(len(sizes)), sizes)
    rows = rng.permutation(len(clusters)) * 7 + 3  # arbitrary distinct ids
    order = rng.permutation(len(clusters))
    # Added in two shuffled parts, to exercise growing.
    half = len(order) // 2
    buffer.add(clusters[order[:half]], rows[order[:half]])
    buffer.add(clusters[order[half:]], rows[order[half:]])
    cluster_of = np.full(7 * len(rows) + 3, -1)
    cluster_of[rows] = clusters
    # Clusters past the last one added to are unknown to the buffer, not empty.
    np.testing.assert_array_equal(buffer.counts(), np.bincount(clusters))
    seen: set[int] = set()
    for step in fractions:
        counts = buffer.counts()
        quotas = np.floor(np.array(step[: len(counts)]) * counts).astype(np.int64)
        drawn = buffer.draw(quotas, rng)
        assert drawn.dtype == np.int64 and len(drawn) == quotas.sum()
        np.testing.assert_array_equal(np.bincount(cluster_of[drawn], minlength=len(counts)), quotas)
        assert seen.isdisjoint(drawn.tolist()) and len(set(drawn.tolist())) == len(drawn)
        seen.update(drawn.tolist())
        np.testing.assert_array_equal(buffer.counts(), counts - quotas)
        assert len(buffer) == len(rows) - len(seen)
    rest = buffer.draw(buffer.counts(), rng)
    assert len(buffer) == 0
    assert sorted(seen | set(rest.tolist())) == sorted(rows.tolist())
    assert len(seen) + len(rest) == len(rows)


def test_draws_are_uniform_within_a_cluster() -> None:
    rng = np.random.default_rng(0)
    hits = np.zeros(10)
    for _ in range(2000):
        buffer = ClusterBuffer()
        buffer.add(np.zeros(10, np.int64), np.arange(10))
        buffer.draw(np.array([3]), rng)
        hits[buffer.draw(np.array([2]), rng)] += 1  # after a draw has swapped rows around
    expected = 2000 * 2 / 10
    assert (np.abs(hits - expected) < 5 * np.sqrt(expected)).all(), hits


def test_too_large_a_quota_draws_nothing() -> None:
    rng = np.random.default_rng(1)
    buffer = ClusterBuffer()
    buffer.add(np.array([0, 0, 2]), np.array([10, 11, 12]))
    with pytest.raises(ValueError):
        buffer.draw(np.array([1, 0, 2]), rng)
    with pytest.raises(ValueError):
        buffer.draw(np.array([0, 0, 0, 1]), rng)
    assert len(buffer) == 3
    np.testing.assert_array_equal(buffer.counts(), [2, 0, 1])
    assert len(buffer.draw(np.zeros(0, np.int64), rng)) == 0
    with pytest.raises(ValueError):
        buffer.add(np.array([-1]), np.array([5]))


def _reference_draw(held: list[list[int]], quotas: np.ndarray, rng: np.random.Generator) -> list[int]:
    """ClusterBuffer's swap-remove in plain Python: each cluster's picks are taken, and the holes
    they leave below the new end are filled, in the order picked, by the rows of the tail that
    were not picked, in their order."""
    out: list[int] = []
    for c in np.flatnonzero(quotas).tolist():
        rows, k = held[c], int(quotas[c])
        picks = rng.choice(len(rows), size=k, replace=False).tolist()
        out += [rows[p] for p in picks]
        keep = len(rows) - k
        survivors = [rows[j] for j in range(keep, len(rows)) if j not in picks]
        for hole, row in zip([p for p in picks if p < keep], survivors):
            rows[hole] = row
        del rows[keep:]
    return out


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    rounds=st.lists(st.lists(st.floats(0, 1), min_size=6, max_size=6), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_cluster_buffer_draws_and_keeps_rows_as_the_swap_remove_model(sizes, rounds, seed) -> None:
    feed = np.random.default_rng(seed)
    buffer, held = ClusterBuffer(), [[] for _ in sizes]
    clusters = np.repeat(np.arange(len(sizes)), sizes)
    rows = feed.permutation(len(clusters))
    buffer.add(clusters, rows)
    for c, r in zip(clusters.tolist(), rows.tolist()):
        held[c].append(r)
    mine, theirs = np.random.default_rng(seed + 1), np.random.default_rng(seed + 1)
    for i, fractions in enumerate(rounds):
        counts = buffer.counts()
        quotas = np.floor(np.array(fractions[: len(counts)]) * counts).astype(np.int64)
        assert buffer.draw(quotas, mine).tolist() == _reference_draw(held, quotas, theirs)
        # Where every row now sits decides the next draws. (Clusters never added to are unknown.)
        counts = buffer.counts()
        layout = [buffer._rows[c][: counts[c]].tolist() if c < len(counts) else [] for c in range(len(held))]
        assert layout == held
        more = feed.integers(0, len(sizes), size=int(feed.integers(0, 20)))
        new_rows = np.arange(len(more)) + 1000 * (i + 1)
        buffer.add(more, new_rows)
        for c, r in zip(more.tolist(), new_rows.tolist()):
            held[c].append(r)
