"""Unit tests for `loader.selection.bandit`: cluster quotas chosen by a bandit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.selection.bandit import BANDITS, Exp3Arms, UcbArms, apportion, reward_from_feedback

NAMES = sorted(BANDITS)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(
    gamma=st.floats(0.01, 1.0),
    eta=st.floats(0.0, 20.0),
    history=st.lists(
        st.tuples(st.lists(st.integers(0, 11), min_size=1, max_size=8), st.floats(-1e3, 1e3)), max_size=12
    ),
    available=st.lists(st.booleans(), min_size=1, max_size=14),
)
def test_pi_sums_to_one_and_keeps_the_floor(name, gamma, eta, history, available) -> None:
    arms = BANDITS[name](gamma=gamma, eta=eta)
    rng = np.random.default_rng(0)
    for ids, reward in history:
        arms.quotas(32, rng.integers(0, 5, size=12))
        ids = np.array(ids)
        arms.update(ids, reward * rng.normal(size=len(ids)))
    mask = np.array(available)
    pi = arms.probabilities(mask)
    k = int(mask.sum())
    assert pi.shape == mask.shape
    assert (pi[~mask] == 0).all()
    if k:
        assert pi.sum() == pytest.approx(1.0)
        assert (pi[mask] >= gamma / k * (1 - 1e-9)).all()
        by_id = arms.probabilities(np.flatnonzero(mask)[::-1])
        np.testing.assert_allclose(by_id, pi[mask][::-1])
    w = arms.weights
    assert w.sum() == pytest.approx(1.0) and (w >= gamma / len(w) * (1 - 1e-9)).all()


@pytest.mark.parametrize("name", NAMES)
def test_the_arm_that_pays_gains_weight(name) -> None:
    arms = BANDITS[name](gamma=0.1, eta=1.0)
    counts = np.array([100, 100, 100])
    for _ in range(30):
        arms.quotas(30, counts)
        arms.update(np.array([0, 1, 2]), np.array([2.0, 0.5, 0.4]))
    pi = arms.weights
    assert pi[0] > 0.5 and pi[0] > pi[1] > pi[2] - 1e-9
    # When the paying arm stops paying and another starts, weight follows.
    for _ in range(60):
        arms.quotas(30, counts)
        arms.update(np.array([0, 1, 2]), np.array([0.4, 0.5, 2.0]))
    assert arms.weights.argmax() == 2


def test_exp3_importance_weights_a_rarely_drawn_arm_up() -> None:
    arms = Exp3Arms(gamma=0.2, eta=1.0, smoothing=0.0)
    arms.update(np.array([0, 1]), np.array([1.0, 0.0]))  # arm 0 now dominates
    arms.quotas(10, np.array([10, 10]))
    pi = arms.probabilities(np.array([True, True]))
    arms.update(np.array([0, 1]), np.array([0.0, 1.0]))  # same normalised reward, swapped
    # smoothing 0: R̂ is the last normalised reward over (K·π); the rare arm's is larger.
    value = arms.get_state()["value"]
    assert value[1] / value[0] == pytest.approx(-pi[0] / pi[1], rel=1e-6)


def test_per_sample_and_per_arm_rewards_are_the_same_observation() -> None:
    a, b = Exp3Arms(), Exp3Arms()
    a.update(np.array([0, 1, 0, 1, 2]), np.array([1.0, 2.0, 3.0, 0.0, 5.0]))
    b.update(np.array([2, 0, 1]), np.array([5.0, 2.0, 1.0]))
    np.testing.assert_allclose(a.weights, b.weights)


@pytest.mark.parametrize("name", NAMES)
def test_new_arms_join_on_the_fly(name) -> None:
    arms = BANDITS[name]()
    arms.update(np.array([0, 1]), np.array([1.0, 0.0]))
    assert arms.num_arms == 2
    q = arms.quotas(40, np.array([50, 50, 0, 50]))
    assert arms.num_arms == 4 and q[2] == 0 and q.sum() == 40 and (q[[0, 1, 3]] > 0).all()


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(0, 500),
    counts=st.lists(st.integers(0, 60), min_size=1, max_size=16),
    gamma=st.floats(0.0, 1.0),
    rewards=st.lists(st.floats(-5, 5), min_size=16, max_size=16),
)
def test_quotas_sum_and_respect_availability(total, counts, gamma, rewards) -> None:
    arms = Exp3Arms(gamma=gamma, eta=3.0)
    arms.update(np.arange(16), np.array(rewards))
    counts = np.array(counts)
    q = arms.quotas(total, counts)
    assert q.dtype == np.int64 and q.shape == counts.shape
    assert q.sum() == min(total, counts.sum())
    assert (q >= 0).all() and (q <= counts).all()
    assert (q[counts == 0] == 0).all()
    if total >= counts.sum():
        np.testing.assert_array_equal(q, counts)


def test_quotas_follow_pi_by_largest_remainders() -> None:
    np.testing.assert_array_equal(
        apportion(10, np.array([0.55, 0.25, 0.2]), np.array([99, 99, 99])), [6, 2, 2]
    )
    np.testing.assert_array_equal(
        apportion(10, np.array([0.56, 0.27, 0.17]), np.array([99, 99, 99])), [5, 3, 2]
    )
    # (not simply rounding each share, which would give 6 + 3 + 2 = 11)
    # Ties in remainders go to the lower id.
    np.testing.assert_array_equal(apportion(2, np.full(4, 0.25), np.full(4, 9)), [1, 1, 0, 0])


def test_an_empty_or_short_arm_s_share_is_redistributed() -> None:
    arms = Exp3Arms(gamma=1.0)  # uniform π over available arms
    np.testing.assert_array_equal(arms.quotas(30, np.array([100, 0, 100, 100])), [10, 0, 10, 10])
    # Arm 1 can give only 2 of its 10; the 8 left go to the others in proportion (4 each).
    np.testing.assert_array_equal(arms.quotas(40, np.array([100, 2, 100, 100])), [13, 2, 13, 12])
    np.testing.assert_array_equal(arms.quotas(40, np.array([1, 2, 3, 100])), [1, 2, 3, 34])
    np.testing.assert_array_equal(arms.quotas(40, np.zeros(4, np.int64)), [0, 0, 0, 0])


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip(name, tmp_path) -> None:
    arms = BANDITS[name](gamma=0.2, eta=2.0, seed=3)
    rng = np.random.default_rng(1)
    for _ in range(5):
        arms.quotas(20, rng.integers(0, 10, size=6))
        arms.update(rng.integers(0, 6, size=20), rng.normal(size=20))
    np.savez(tmp_path / "s.npz", **arms.get_state())
    with np.load(tmp_path / "s.npz") as saved:
        restored = BANDITS[name](gamma=0.2, eta=2.0, seed=3)
        restored.reset(dict(saved))
    np.testing.assert_array_equal(restored.weights, arms.weights)
    for a in (arms, restored):
        a.quotas(20, np.array([3, 5, 0, 9, 9, 2, 4]))
        a.update(np.array([1, 3, 6]), np.array([0.3, -0.1, 0.8]))
    np.testing.assert_array_equal(restored.weights, arms.weights)
    np.testing.assert_array_equal(restored.quotas(17, np.arange(7)), arms.quotas(17, np.arange(7)))


def test_reward_from_feedback() -> None:
    ids = np.array([3, 0, 3, 3, 5, 0])
    learner = np.array([2.0, 1.0, 4.0, np.nan, 1.5, 3.0])
    ref = np.array([1.0, 0.5, 1.0, 0.0, 2.0, 0.5])
    arms, rewards = reward_from_feedback(ids, learner, ref)
    np.testing.assert_array_equal(arms, [0, 3, 5])
    np.testing.assert_allclose(rewards, [(0.5 + 2.5) / 2, (1.0 + 3.0) / 2, -0.5])
    empty = reward_from_feedback(np.array([1]), np.array([np.nan]), np.array([1.0]))
    assert len(empty[0]) == 0 and len(empty[1]) == 0
    with pytest.raises(ValueError):
        reward_from_feedback(np.array([-1]), np.array([1.0]), np.array([1.0]))


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        Exp3Arms(gamma=1.5)
    with pytest.raises(ValueError):
        UcbArms(discount=0.0)
    arms = Exp3Arms()
    with pytest.raises(ValueError):
        arms.quotas(-1, np.array([1]))
    with pytest.raises(ValueError):
        arms.update(np.array([0]), np.array([np.nan]))
    with pytest.raises(ValueError):
        arms.probabilities(np.array([1, 1]))


@pytest.mark.parametrize("name", NAMES)
def test_a_new_arm_starts_at_or_above_the_best_arm(name) -> None:
    """A newly opened cluster is tried soon: its score is at least the best current arm's, so its
    share of the next draw is at least the best arm's."""
    arms = BANDITS[name](gamma=0.1, eta=4.0)
    for _ in range(20):
        arms.quotas(30, np.array([10, 10, 10]))
        arms.update(np.arange(3), np.array([1.0, 0.2, -0.5]))
    scores = arms.reward_estimates
    assert scores[0] > scores[1] > scores[2]
    arms.quotas(30, np.array([10, 10, 10, 10]))  # arm 3 opens
    scores = arms.reward_estimates
    assert scores[3] >= scores[:3].max()
    pi = arms.weights
    assert pi[3] >= pi[:3].max() - 1e-12
    if name == "exp3":
        assert scores[3] == scores[:3].max()
        # Its first reward ends the optimism: it is judged from the neutral start (the mean of
        # the observed arms), so an arm drawn once (a tiny cluster) keeps no unearned share.
        mean = arms.reward_estimates[:3].mean()
        arms.update(np.array([3]), np.array([0.2]))
        assert arms.reward_estimates[3] < (mean + scores[3]) / 2


def test_exp3_states_saved_before_the_optimistic_start_restore_as_observed() -> None:
    arms = Exp3Arms()
    arms.quotas(10, np.array([5, 5]))
    arms.update(np.array([0, 1]), np.array([1.0, 0.0]))
    state = {k: v for k, v in arms.get_state().items() if k != "fresh"}
    restored = Exp3Arms()
    restored.reset(state)
    np.testing.assert_array_equal(restored.get_state()["fresh"], [0.0, 0.0])
    np.testing.assert_array_equal(restored.weights, arms.weights)
