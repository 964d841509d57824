"""Unit tests for `loader.selection.rewards.ClusterReward`: the cluster bandit's reward."""

from __future__ import annotations

import numpy as np
import pytest

from loader.selection.bandit import reward_from_feedback
from loader.selection.rewards import ClusterReward

REF = 0.2  # the reference's loss on every learnable sample below


def _observe(reward: ClusterReward, rng: np.random.Generator, levels: dict[int, float], ref: float = REF, n: int = 30):
    """One selection: n candidates per cluster, learner loss around its level, reference `ref`."""
    ids = np.repeat(list(levels), n)
    learner = np.repeat(list(levels.values()), n) + 0.03 * rng.normal(size=len(ids))
    reward.observe_candidates(ids, learner, np.full(len(ids), ref))


def test_a_cluster_being_forgotten_earns_more_than_a_flat_one_at_the_same_loss() -> None:
    """Cluster 0 stays at loss 0.8; cluster 1 was learnt (0.25) and its loss climbs back to 0.8;
    cluster 2 stays learnt. At the end 0 and 1 have the same loss, and the same gain."""
    reward, rng = ClusterReward(), np.random.default_rng(0)
    for _ in range(150):  # one bandit update per selection, as the Selector does with feedback
        _observe(reward, rng, {0: 0.8, 1: 0.25, 2: 0.25})
        _, before = reward.take()
    assert before[1] == pytest.approx(before[2], abs=0.02)  # learnt and flat: only its small gain
    for level in np.linspace(0.25, 0.8, 60):
        _observe(reward, rng, {0: 0.8, 1: level, 2: 0.25})
        arms, rewards = reward.take()
    np.testing.assert_array_equal(arms, [0, 1, 2])
    assert reward.trends[1] > 0.1 and abs(reward.trends[0]) < 0.02
    assert rewards[1] > 1.2 * rewards[0] > 1.2 * rewards[2]
    estimates = reward.estimates()
    assert estimates[1] > 1.2 * estimates[0] > 1.2 * estimates[2]
    # The rise is the one thing between them: the same gain now, plus the trend of its loss.
    assert rewards[1] - rewards[0] == pytest.approx(reward.trends[1], abs=0.03)


def test_a_loss_that_falls_earns_nothing_beyond_its_gain() -> None:
    reward, without_rise = ClusterReward(), ClusterReward(rise_weight=0.0)
    for r in (reward, without_rise):
        rng = np.random.default_rng(1)
        for level in np.linspace(2.0, 0.8, 100):
            _observe(r, rng, {0: level})
    assert reward.trends[0] < -0.05
    assert reward.estimates()[0] == without_rise.estimates()[0] == pytest.approx(0.8 - REF, abs=0.15)
    np.testing.assert_array_equal(reward.take()[1], without_rise.take()[1])


def test_reported_losses_that_come_back_higher_count_as_a_rise() -> None:
    """Feedback mode: stored losses stay put until re-reported, so the level barely moves; the
    re-reported samples' own change (new − previous) is the evidence."""
    reward, rng = ClusterReward(), np.random.default_rng(2)
    for _ in range(50):
        _observe(reward, rng, {0: 0.6, 1: 0.6})
    reward.take()
    for _ in range(10):
        _observe(reward, rng, {0: 0.6, 1: 0.6})
        previous = np.full(8, 0.3)
        reward.observe_reports(np.repeat([0, 1], 8), np.concatenate([previous, previous]),
                               np.concatenate([previous + 0.4, previous - 0.1]))  # fmt: skip
    _, rewards = reward.take()
    assert rewards[0] > rewards[1] * 1.3
    # Never reported before (NaN) is no evidence of change; nor is a sample without a cluster.
    other = ClusterReward()
    other.observe_reports(np.array([0, -1]), np.array([np.nan, 0.1]), np.array([5.0, 5.0]))
    assert other.num_clusters == 0


def test_noise_cluster_gets_less_than_a_learnable_one_though_its_survivors_look_better() -> None:
    """Cluster 0: learnable (reference 0.3, learner 1.2). Cluster 1: label noise, learner ≈
    reference, both high, except a lucky 5% the reference happens to fit. Top-k by learnability
    keeps the lucky ones, so the old reward over survivors ranks the noise first."""
    rng = np.random.default_rng(3)
    n = 400
    clusters = np.repeat([0, 1], n)
    ref = np.concatenate([np.full(n, 0.3), 2.3 + 0.3 * rng.normal(size=n)])
    learner = np.concatenate([1.2 + 0.1 * rng.normal(size=n), 2.3 + 0.3 * rng.normal(size=n)])
    lucky = n + np.arange(0, n, 20)
    ref[lucky] = 0.1
    score = learner - ref
    survivors = np.argsort(-score)[: n // 4]
    arms, old = reward_from_feedback(clusters[survivors], learner[survivors], ref[survivors])
    assert arms.tolist() == [0, 1] and old[1] > old[0]  # the bias the new reward removes

    reward = ClusterReward()
    reward.observe_candidates(clusters, learner, ref)
    reward.observe_reports(clusters[survivors], learner[survivors], learner[survivors])  # nothing changed
    arms, rewards = reward.take()
    assert arms.tolist() == [0, 1] and rewards[0] > 2 * rewards[1]


def test_noise_with_a_wide_spread_ranks_below_a_learnt_cluster() -> None:
    """Random labels on inputs both models are confidently wrong on: L and R high and spread
    wide, so L − R > 0 for a good part of them. Counted per sample with a hinge (max(L − R, 0)),
    that tail would outrank a cluster that is merely learnt; soft-clipped and signed it does not."""
    rng = np.random.default_rng(7)
    n = 500
    noise_learner, noise_ref = 8 + 4 * rng.normal(size=n), 10 + 5 * rng.normal(size=n)
    assert np.maximum(noise_learner - noise_ref, 0).mean() > 1.0  # what a hinge would credit it
    learnt = 0.1 + 0.02 * rng.normal(size=n)
    reward = ClusterReward()
    reward.observe_candidates(np.repeat([0, 1], n), np.concatenate([noise_learner, learnt + 0.05]),
                              np.concatenate([noise_ref, learnt]))  # fmt: skip
    _, rewards = reward.take()
    assert rewards[0] < -0.1 < 0 < rewards[1]
    # Bounded: a sample counts at most ±scale, so one cluster's outliers cannot swamp the rest.
    assert rewards.min() >= -1.0


def test_a_rising_loss_on_what_the_reference_cannot_fit_is_not_forgetting() -> None:
    """A learner growing confidently wrong on noise inputs: its loss rises, but stays below the
    reference's (which is worse still): no gain, so the rise earns nothing."""
    reward, rng = ClusterReward(), np.random.default_rng(4)
    for level in np.linspace(2.3, 5.0, 120):
        _observe(reward, rng, {0: level}, ref=8.0)
        _observe(reward, rng, {1: 0.5})
    assert reward.trends[0] > 0.5
    arms, rewards = reward.take()
    assert rewards[0] == pytest.approx(-1.0, abs=0.01)  # its (soft-clipped) gain alone: L − R ≈ −4
    assert rewards[1] == pytest.approx(np.tanh(0.3), abs=0.02)


def test_clusters_never_observed_start_optimistic() -> None:
    reward, rng = ClusterReward(), np.random.default_rng(5)
    assert reward.estimates(3).tolist() == [0.0, 0.0, 0.0]
    _observe(reward, rng, {0: 0.5, 3: 1.5})
    estimates = reward.estimates(6)
    best = estimates[3]
    assert best == pytest.approx(np.tanh(1.3), abs=0.02) and estimates[0] < best
    np.testing.assert_array_equal(estimates[[1, 2, 4, 5]], best)
    np.testing.assert_array_equal(reward.estimates(), estimates[:4])
    # Only clusters with candidates get a reward for the bandit.
    assert reward.take()[0].tolist() == [0, 3]


def test_take_uses_each_candidate_once() -> None:
    reward, rng = ClusterReward(), np.random.default_rng(6)
    _observe(reward, rng, {0: 1.0, 1: 1.0})
    _observe(reward, rng, {1: 3.0})
    arms, rewards = reward.take()
    assert arms.tolist() == [0, 1]
    # Cluster 1's reward is the mean gain of both selections' candidates (60 of them), not the
    # last one's, plus its rise (its loss went from 1 to 3).
    assert reward.trends[1] > 0
    assert rewards[1] == pytest.approx((np.tanh(0.8) + np.tanh(2.8)) / 2 + reward.trends[1], abs=0.03)
    assert reward.take()[0].tolist() == []
    _observe(reward, rng, {1: 1.0})
    assert reward.take()[0].tolist() == [1]


def test_unknown_losses_and_unclustered_samples_are_left_out() -> None:
    reward = ClusterReward()
    reward.observe_candidates(np.array([0, 0, -1, 2]), np.array([1.0, np.nan, 9.0, np.inf]), np.zeros(4))
    arms, rewards = reward.take()
    assert arms.tolist() == [0] and rewards == pytest.approx([np.tanh(1.0)])
    assert reward.num_clusters == 1
    reward.observe_candidates(np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    assert reward.num_clusters == 1


def _drive(reward: ClusterReward, steps: range) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for i in steps:
        rng = np.random.default_rng([11, i])
        k = 2 + i // 3
        ids = rng.integers(-1, k, 50)
        learner = rng.gamma(2.0, size=50)
        learner[rng.random(50) < 0.1] = np.nan
        reward.observe_candidates(ids, learner, rng.gamma(1.0, size=50))
        previous = rng.gamma(2.0, size=10)
        previous[rng.random(10) < 0.3] = np.nan
        reward.observe_reports(rng.integers(0, k, 10), previous, rng.gamma(2.0, size=10))
        out.append((*reward.take(), reward.estimates()))
    return out


def test_state_round_trip_continues_identically(tmp_path) -> None:
    straight = ClusterReward(fast=0.2, slow=0.05, rise_weight=2.0)
    expected = _drive(straight, range(12))
    before = ClusterReward(fast=0.2, slow=0.05, rise_weight=2.0)
    _drive(before, range(5))
    np.savez(tmp_path / "r.npz", **before.get_state())
    with np.load(tmp_path / "r.npz", allow_pickle=False) as saved:
        state = dict(saved)
    assert all(v.ndim <= 1 for v in state.values())
    after = ClusterReward(fast=0.2, slow=0.05, rise_weight=2.0)
    after.reset(state)
    for got, want in zip(_drive(after, range(5, 12)), expected[5:]):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w, strict=True)
    for key, value in straight.get_state().items():
        np.testing.assert_array_equal(after.get_state()[key], value, strict=True)
    after.reset()
    assert after.num_clusters == 0 and after.estimates().shape == (0,)


def test_bad_arguments_and_mismatched_states_are_rejected() -> None:
    with pytest.raises(ValueError):
        ClusterReward(fast=0.01, slow=0.1)
    with pytest.raises(ValueError):
        ClusterReward(rise_weight=-1.0)
    reward = ClusterReward()
    with pytest.raises(ValueError):
        reward.observe_candidates(np.array([0, 1]), np.array([1.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        reward.observe_candidates(np.array([0.5]), np.array([1.0]), np.array([1.0]))
    _observe(reward, np.random.default_rng(0), {0: 1.0})
    with pytest.raises(ValueError, match="fast"):
        ClusterReward(fast=0.5).reset(reward.get_state())
    broken = {**reward.get_state(), "gain": np.zeros(3)}
    with pytest.raises(ValueError, match="inconsistent"):
        ClusterReward().reset(broken)
