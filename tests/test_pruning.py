"""Unit tests for `loader.selection.pruning`: cluster-wise permanent pruning to a pool budget."""

from __future__ import annotations

import io

import numpy as np
import pytest

from loader.selection import pruning
from loader.selection.pruning import LOW_VALUE, NEAR_DUPLICATE, PoolBudget, prune_cluster, split_budget

D = 16


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _blob(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float = 0.05) -> np.ndarray:
    return (centre + spread * rng.normal(size=(n, len(centre)))).astype(np.float32)


# -- split_budget ----------------------------------------------------------------------------------


def _water_level(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Reference: the largest level L with sum(min(size, L)) <= budget, found by scanning; the
    samples left over go one each to the clusters above L, lowest ids first."""
    level = 0
    while np.minimum(sizes, level + 1).sum() <= budget and level < sizes.max(initial=0):
        level += 1
    quotas = np.minimum(sizes, level)
    above = np.flatnonzero(sizes > level)
    quotas[above[: budget - quotas.sum()]] += 1
    return quotas


def test_split_budget_is_water_filling_over_random_sizes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, 60, size=rng.integers(1, 12))
        sizes[rng.random(len(sizes)) < 0.2] = 0
        budget = int(rng.integers(0, sizes.sum() + 20))
        quotas = split_budget(sizes, budget)
        assert quotas.dtype == np.int64
        assert quotas.sum() == min(budget, sizes.sum())
        assert (quotas >= 0).all() and (quotas <= sizes).all()
        np.testing.assert_array_equal(quotas, _water_level(sizes, budget))
        cut = quotas < sizes
        if cut.any():
            level = quotas[cut].min()
            # Clusters that are cut get an equal share (one apart at most) ...
            assert quotas[cut].max() - level <= 1
            # ... and every cluster not cut fits within that share: it keeps all its members.
            assert (sizes[~cut] <= level + 1).all()


def test_split_budget_small_clusters_give_their_excess_to_the_others() -> None:
    # Share 5 each; cluster 1 needs 1, so 19 go to the three others: 6 each and the odd one to
    # the lowest id.
    np.testing.assert_array_equal(split_budget(np.array([10, 1, 10, 10]), 20), [7, 1, 6, 6])
    np.testing.assert_array_equal(split_budget(np.array([3, 3, 3]), 7), [3, 2, 2])
    np.testing.assert_array_equal(split_budget(np.array([4, 0, 9]), 100), [4, 0, 9])
    np.testing.assert_array_equal(split_budget(np.array([4, 9]), 0), [0, 0])
    assert split_budget(np.zeros(0, np.int64), 5).shape == (0,)


@pytest.mark.parametrize(
    "sizes, budget, match",
    [([3, -1], 2, "sizes"), ([[3]], 2, "sizes"), ([1.5], 2, "sizes"), ([3], -1, "budget"), ([3], 2.0, "budget")],
)
def test_split_budget_rejects_bad_arguments(sizes: list, budget: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_budget(np.array(sizes), budget)  # type: ignore[arg-type]


# -- prune_cluster ---------------------------------------------------------------------------------


def test_near_duplicates_go_before_low_value_members() -> None:
    rng = np.random.default_rng(1)
    distinct = _unit(rng.normal(size=(10, D)))
    # Three copies of point 0 and two of point 1, all more valuable than most distinct points:
    # they still go first, and the most valuable of each group (its leader) stays.
    x = np.vstack([distinct, distinct[[0, 0, 0, 1, 1]]])
    value = np.concatenate([np.linspace(0.0, 0.9, 10), [0.95, 0.99, 0.97, 0.98, 0.96]])
    value[0], value[1] = 0.1, 0.2  # lower than their copies: a copy leads its group
    ids = np.arange(100, 115)
    kept, dropped, reasons = prune_cluster(ids, x, value, keep=10)
    assert set(dropped.tolist()) == {100, 110, 112, 101, 114}
    assert (reasons == NEAR_DUPLICATE).all() and reasons.dtype.kind == "U"
    assert 111 in kept and 113 in kept  # the most valuable copy of each group
    np.testing.assert_array_equal(kept, np.setdiff1d(ids, dropped))  # input order
    # Two more to drop: the two least valuable of what is left, least valuable first.
    kept, dropped, reasons = prune_cluster(ids, x, value, keep=8)
    assert reasons.tolist() == [NEAR_DUPLICATE] * 5 + [LOW_VALUE] * 2
    assert dropped[5:].tolist() == [102, 103]  # values 0.2 and 0.3 (101 and 100 went as copies)


def test_when_fewer_must_go_than_are_duplicates_the_most_similar_go_first() -> None:
    base = np.eye(D)[0]
    side = np.eye(D)[1]
    # Cosine similarity of each to `base`: 1.0 (a copy), 0.99 and 0.96, all above 0.95.
    angles = np.arccos([1.0, 0.99, 0.96])
    x = np.vstack([base, *[np.cos(a) * base + np.sin(a) * side for a in angles], np.eye(D)[2]])
    value = np.array([1.0, 0.1, 0.2, 0.3, 0.0])
    kept, dropped, reasons = prune_cluster(np.arange(5), x, value, keep=3)
    assert dropped.tolist() == [1, 2] and (reasons == NEAR_DUPLICATE).all()
    # Low value does not jump the queue: id 4 (value 0) stays while duplicates remain.
    assert kept.tolist() == [0, 3, 4]


def test_duplicates_are_judged_against_leaders_only() -> None:
    # a~b and b~c (cos 15 deg = 0.966) but not a~c (cos 30 deg = 0.866): b is a duplicate of a;
    # c is not, since its only near neighbour b is no leader. It stays even though it is the
    # least valuable: it is not a duplicate of anything kept.
    x = np.array([[np.cos(t), np.sin(t)] for t in np.radians([0.0, 15.0, 30.0])])
    value = np.array([3.0, 2.0, 1.0])
    kept, dropped, reasons = prune_cluster([7, 8, 9], x, value, keep=2)
    assert kept.tolist() == [7, 9] and dropped.tolist() == [8] and reasons.tolist() == [NEAR_DUPLICATE]
    kept, dropped, reasons = prune_cluster([7, 8, 9], x, value, keep=1)
    assert dropped.tolist() == [8, 9] and reasons.tolist() == [NEAR_DUPLICATE, LOW_VALUE]


def test_low_value_ties_are_broken_by_id_and_a_cluster_within_quota_is_untouched() -> None:
    x = np.eye(4)
    kept, dropped, reasons = prune_cluster([5, 3, 9, 1], x, np.zeros(4), keep=2)
    assert dropped.tolist() == [9, 5] and (reasons == LOW_VALUE).all()  # larger id first
    kept, dropped, _ = prune_cluster([5, 3], np.vstack([x[0], x[0]]), [1.0, 2.0], keep=2)
    assert kept.tolist() == [5, 3] and len(dropped) == 0  # copies, but nothing has to go


def _reference_leaders(ids: np.ndarray, x: np.ndarray, value: np.ndarray, threshold: float) -> np.ndarray:
    """The leader rule written out pair by pair in float64: the duplicates' positions. (The
    module compares with the threshold less a slack for float32 rounding; so does this.)"""
    threshold -= pruning._SLACK
    x = _unit(x.astype(np.float64))
    order = sorted(range(len(ids)), key=lambda p: (-value[p], ids[p]))
    leaders: list[int] = []
    duplicates = []
    for p in order:
        if any(float(x[p] @ x[q]) >= threshold for q in leaders):
            duplicates.append(p)
        else:
            leaders.append(p)
    return np.array(sorted(duplicates), np.intp)


def test_blocked_duplicate_pass_matches_the_rule_written_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small blocks and leader chunks, so that duplicates fall within blocks, across blocks and
    # across chunks; low dimension, so that there are many chains.
    monkeypatch.setattr(pruning, "_BLOCK", 16)
    monkeypatch.setattr(pruning, "_LEADER_CHUNK", 8)
    rng = np.random.default_rng(2)
    n, threshold = 300, 0.9
    x = rng.normal(size=(n, 3))
    x[rng.integers(0, n, 40)] = x[rng.integers(0, n, 40)]  # exact copies too
    value = rng.integers(0, 5, n).astype(np.float64)  # many ties: the id decides
    ids = rng.permutation(10 * n)[:n]
    sims = _unit(x) @ _unit(x).T
    # No pair that float32 rounding could tip over the (slackened) threshold.
    assert not (np.abs(sims - (threshold - pruning._SLACK)) < 1e-6).any()
    expected = _reference_leaders(ids, x, value, threshold)
    assert 30 < len(expected) < n - 30
    leaders = n - len(expected)
    kept, dropped, reasons = prune_cluster(ids, x, value, keep=leaders, dup_threshold=threshold)
    assert set(dropped.tolist()) == set(ids[expected].tolist()) and (reasons == NEAR_DUPLICATE).all()
    # Kept members are pairwise below the threshold.
    k = _unit(x[np.isin(ids, kept)])
    assert (k @ k.T - 2 * np.eye(len(k))).max() < threshold
    # Five more: the five lowest-ranked leaders, worst first.
    rest = [p for p in sorted(range(n), key=lambda p: (value[p], -ids[p])) if p not in set(expected)]
    _, dropped, reasons = prune_cluster(ids, x, value, keep=leaders - 5, dup_threshold=threshold)
    assert dropped[-5:].tolist() == ids[rest[:5]].tolist() and (reasons[-5:] == LOW_VALUE).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ids": [0, 0, 1]}, "ids contain duplicates"),
        ({"ids": [0.0, 1.0, 2.0]}, "ids must be integers"),
        ({"embeddings": np.ones((2, 2))}, "rows"),
        ({"embeddings": np.array([[1.0, np.nan]] * 3)}, "embeddings contain NaN"),
        ({"value": [1.0, 2.0]}, r"value must have shape \(3,\)"),
        ({"value": [1.0, np.inf, 0.0]}, "value contain NaN"),
        ({"keep": -1}, "keep"),
        ({"dup_threshold": 1.5}, "dup_threshold"),
        ({"dup_threshold": float("nan")}, "dup_threshold"),
    ],
)
def test_prune_cluster_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    arguments = {"ids": [0, 1, 2], "embeddings": np.eye(3), "value": [1.0, 2.0, 3.0], "keep": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        prune_cluster(**arguments)


# -- PoolBudget ------------------------------------------------------------------------------------


def _stream(seed: int, shards: int, size: int, groups: int = 6) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Shards of blob samples with fresh ids; about one sample in ten is an exact copy of an
    earlier one in its shard, so both reasons occur."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, D))
    out = []
    for s in range(shards):
        x = np.vstack([_blob(rng, centres[g], 1, spread=0.3) for g in rng.integers(0, groups, size)])
        copies = rng.random(size) < 0.1
        x[copies] = x[rng.integers(0, size, copies.sum())]
        out.append((np.arange(s * size, (s + 1) * size) * 3 + 1, x, rng.random(size)))
    return out


def test_admits_stay_within_budget_and_prune_each_id_once() -> None:
    budget = PoolBudget(max_samples=120, max_clusters=6)
    admitted: list[int] = []
    pruned: list[int] = []
    reasons: set[str] = set()
    for ids, x, value in _stream(3, 6, 80):
        out = budget.admit(ids, x, value)
        assert out.ids.dtype == np.int64 and len(out.reasons) == len(out.ids)
        admitted += ids.tolist()
        pruned += out.ids.tolist()
        reasons |= set(out.reasons.tolist())
        kept = budget.kept_ids
        assert len(budget) == len(kept) <= 120
        assert (np.diff(kept) > 0).all()
        assert not np.isin(out.ids, kept).any()
        assert budget.cluster_sizes().sum() == len(budget)
        # Nothing is lost or made up: every admitted id is kept or was pruned exactly once.
        assert sorted(pruned + kept.tolist()) == sorted(admitted)
    assert len(set(pruned)) == len(pruned)
    assert len(budget) == 120 and reasons == {NEAR_DUPLICATE, LOW_VALUE}


def test_a_rare_cluster_survives_a_flood_of_a_big_one() -> None:
    rng = np.random.default_rng(4)
    big, rare = rng.normal(size=D), rng.normal(size=D)
    budget = PoolBudget(max_samples=100, max_clusters=4)
    # The rare cluster's samples are the least valuable of all: pruning on value alone would
    # remove them first. Its share of the budget (25) is more than it holds, so it keeps them all.
    budget.admit(np.arange(100), np.vstack([_blob(rng, big, 90), _blob(rng, rare, 10)]),
                 np.concatenate([0.5 + 0.5 * rng.random(90), 0.1 * rng.random(10)]))  # fmt: skip
    rare_ids = np.arange(90, 100)
    for s in range(1, 6):
        budget.admit(np.arange(100 * s, 100 * s + 100), _blob(rng, big, 100), 0.5 + 0.5 * rng.random(100))
        assert np.isin(rare_ids, budget.kept_ids).all()
        assert len(budget) == 100


def test_update_value_changes_what_is_pruned_and_ignores_unknown_ids() -> None:
    budget = PoolBudget(max_samples=10, max_clusters=1)
    x = np.eye(D)[:10] + 0.0
    budget.admit(np.arange(10), x, np.arange(10.0))
    budget.update_value([0, 1, 999], [100.0, 50.0, -5.0])  # 999 was never admitted
    out = budget.admit([10, 11], np.eye(D)[10:12], [5.5, 5.6])
    # Lowest values now: 2 and 3 (0 and 1 were raised).
    assert sorted(out.ids.tolist()) == [2, 3] and (out.reasons == LOW_VALUE).all()
    budget.update_value([2], [1000.0])  # pruned: ignored
    assert 2 not in budget.kept_ids
    with pytest.raises(ValueError, match="value must have shape"):
        budget.update_value([0, 1], [1.0])


def _same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_restored_budget_continues_like_an_uninterrupted_one() -> None:
    stream = _stream(5, 6, 60)
    whole = PoolBudget(max_samples=100, max_clusters=6, seed=3)
    expected = [whole.admit(*shard) for shard in stream]

    first = PoolBudget(max_samples=100, max_clusters=6, seed=3)
    for shard in stream[:3]:
        first.admit(*shard)
    saved = io.BytesIO()
    np.savez(saved, **first.get_state())  # flat numpy arrays only
    saved.seek(0)
    with np.load(saved) as loaded:
        state = dict(loaded)
    assert any(key.startswith("clusters.") for key in state)
    resumed = PoolBudget(max_samples=100, max_clusters=6, seed=3)
    resumed.reset(state)
    _same_state(resumed.get_state(), first.get_state())
    for shard, want in zip(stream[3:], expected[3:]):
        got = resumed.admit(*shard)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.reasons, want.reasons)
    assert sum(len(p) for p in expected[3:]) > 0
    _same_state(resumed.get_state(), whole.get_state())
    resumed.reset()  # None: empty, as built
    assert len(resumed) == 0 and len(resumed.cluster_sizes()) == 0


@pytest.mark.parametrize(
    "other", [{"max_samples": 99}, {"max_clusters": 5}, {"seed": 4}, {"dup_threshold": 0.9}]
)
def test_reset_refuses_a_state_saved_with_other_arguments(other: dict) -> None:
    saved = PoolBudget(max_samples=100, max_clusters=6, seed=3)
    saved.admit(*_stream(6, 1, 30)[0])
    budget = PoolBudget(**{"max_samples": 100, "max_clusters": 6, "seed": 3, **other})
    (key,) = other
    with pytest.raises(ValueError, match=key):
        budget.reset(saved.get_state())


def test_state_size_is_bounded_by_the_budget_not_by_what_was_admitted() -> None:
    budget = PoolBudget(max_samples=100, max_clusters=6)
    sizes = {}
    for i, shard in enumerate(_stream(7, 20, 50), start=1):
        budget.admit(*shard)
        if i * 50 in (200, 1000):  # 2x and 10x the budget admitted
            sizes[i * 50] = sum(v.nbytes for v in budget.get_state().values())
    # Per kept sample: id, unit float32 embedding, value, cluster id; the clusterer may have
    # opened more clusters in between, each a float64 centroid and count.
    assert sizes[1000] <= sizes[200] + 6 * (D + 1) * 8
    assert sizes[1000] < 100 * (8 + 4 * D + 8 + 4) + 6 * (D + 1) * 8 + 1024


@pytest.mark.parametrize(
    "change, match",
    [
        ({"ids": np.arange(5, 35)}, "ids already kept"),
        ({"ids": np.zeros(30, np.int64)}, "ids contain duplicates"),
        ({"ids": np.arange(30.0) + 100}, "ids must be integers"),
        ({"x": np.ones((30, D + 1))}, "dimension"),
        ({"x": np.ones((29, D))}, "rows"),
        ({"x": np.full((30, D), np.nan)}, "embeddings contain NaN"),
        ({"value": np.full(30, np.nan)}, "value contain NaN"),
        ({"value": np.ones((30, 1))}, "value must have shape"),
    ],
)
def test_admit_rejects_bad_input_and_changes_nothing(change: dict, match: str) -> None:
    ids, x, value = _stream(8, 1, 30)[0]
    budget = PoolBudget(max_samples=40, max_clusters=4)
    budget.admit(ids, x, value)
    before = budget.get_state()
    bad = {"ids": ids + 1000, "x": x, "value": value, **change}
    with pytest.raises(ValueError, match=match):
        budget.admit(bad["ids"], bad["x"], bad["value"])
    _same_state(budget.get_state(), before)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_samples": 0}, "max_samples"), ({"max_clusters": 0}, "max_clusters"),
     ({"seed": 1.5}, "seed"), ({"dup_threshold": 0.0}, "dup_threshold")],
)  # fmt: skip
def test_pool_budget_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PoolBudget(**{"max_samples": 10, **kwargs})


def test_a_refused_state_leaves_the_pool_as_it_was() -> None:
    budget = PoolBudget(max_samples=100, max_clusters=6, seed=3)
    budget.admit(*_stream(6, 1, 30)[0])
    before = budget.get_state()
    broken = {**before, "value": before["value"][:-1]}
    with pytest.raises(ValueError, match="inconsistent state"):
        budget.reset(broken)
    _same_state(budget.get_state(), before)
