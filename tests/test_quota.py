"""Unit tests for `loader.selection.quota`: the per-cluster candidate buffer."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.selection.quota import ClusterBuffer, distinct_picks


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
    """ClusterBuffer's swap-remove in plain Python, one cluster at a time: each cluster's picks
    (`distinct_picks`, as the buffer draws them) are taken, and the holes they leave below the
    new end are filled, in the order picked, by the rows of the tail that were not picked, in
    their order."""
    wanted = np.flatnonzero(quotas).tolist()
    picks = distinct_picks(np.array([len(held[c]) for c in wanted], np.int64), quotas[wanted], rng).tolist()
    out: list[int] = []
    for c in wanted:
        rows, k = held[c], int(quotas[c])
        mine, picks = picks[:k], picks[k:]
        out += [rows[p] for p in mine]
        keep = len(rows) - k
        survivors = [rows[j] for j in range(keep, len(rows)) if j not in mine]
        for hole, row in zip([p for p in mine if p < keep], survivors):
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
        layout = [buffer.rows_in(c).tolist() if c < len(counts) else [] for c in range(len(held))]
        assert layout == held
        more = feed.integers(0, len(sizes), size=int(feed.integers(0, 20)))
        new_rows = np.arange(len(more)) + 1000 * (i + 1)
        buffer.add(more, new_rows)
        for c, r in zip(more.tolist(), new_rows.tolist()):
            held[c].append(r)


@pytest.mark.parametrize("n, k", [(6, 1), (6, 3), (6, 4), (5, 5)])  # sparse, at the edge, dense, all
def test_distinct_picks_makes_every_ordered_choice_equally_likely(n, k) -> None:
    rng = np.random.default_rng(n * 10 + k)
    draws = 30 * 360
    # A second group beside it: groups must not disturb each other.
    picks = np.stack([distinct_picks(np.array([n, 4]), np.array([k, 2]), rng) for _ in range(draws)])
    mine, other = picks[:, :k], picks[:, k:]
    assert (np.sort(mine, axis=1)[:, 1:] != np.sort(mine, axis=1)[:, :-1]).all() and (mine < n).all()
    assert (other[:, 0] != other[:, 1]).all() and (other < 4).all()
    # Every ordered k-tuple of distinct positions, counted.
    codes = (mine * n ** np.arange(k)).sum(axis=1)
    counts = np.bincount(codes, minlength=n**k)
    possible = math.perm(n, k)
    assert np.count_nonzero(counts) == possible
    expected = draws / possible
    assert (np.abs(counts[counts > 0] - expected) < 5 * np.sqrt(expected)).all(), counts


def test_clusters_growing_and_draining_lose_nothing_and_keep_the_store_bounded() -> None:
    """Many clusters growing and draining in turn: rows never repeat or vanish, and the shared
    store stays within a small multiple of what its clusters ever held at once (a cluster keeps
    its room once it had it, as an array would; what moving clusters leave behind is reused)."""
    rng = np.random.default_rng(7)
    buffer, everything, drawn = ClusterBuffer(), [], []
    peak = np.zeros(50, np.int64)
    next_row = 0
    for _ in range(150):
        more = int(rng.integers(0, 400))
        clusters = rng.integers(0, 50, size=more)
        rows = np.arange(next_row, next_row + more)
        next_row += more
        buffer.add(clusters, rows)
        everything += rows.tolist()
        counts = buffer.counts()
        peak[: len(counts)] = np.maximum(peak[: len(counts)], counts)
        # Mostly small draws, so clusters keep growing and move often; now and then one drains.
        fractions = np.where(rng.random(len(counts)) < 0.05, 1.0, 0.3 * rng.random(len(counts)))
        drawn += buffer.draw(np.floor(fractions * counts).astype(np.int64), rng).tolist()
        assert len(buffer._store) <= 4 * np.maximum(2 * peak, 16).sum() + 64
    rest = buffer.draw(buffer.counts(), rng).tolist()
    assert sorted(drawn + rest) == everything and len(buffer) == 0
