"""Unit tests for `loader.selection.selectors`: choosing k of n candidates from scores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.selection.selectors import SELECTORS, get_selector

STOCHASTIC = sorted(name for name in SELECTORS if name != "topk")
# Cold enough that Gumbel noise cannot reorder scores that are one rank apart (see below).
COLD = 1e4

score = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([0.0, 1.0, -np.inf]),  # ties and impossible candidates
)


@pytest.mark.parametrize("name", sorted(SELECTORS))
@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(score, min_size=1, max_size=40),
    k_fraction=st.floats(0, 1),
    beta=st.floats(0, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_selector_properties(name: str, values: list[float], k_fraction: float, beta: float, seed: int) -> None:
    select = SELECTORS[name]
    scores = np.array(values, dtype=np.float64)
    n = len(scores)
    k = round(k_fraction * n)

    choice = select(scores, k, beta, np.random.default_rng(seed))
    assert choice.indices.dtype == np.int64 and choice.indices.shape == (k,)
    assert len(np.unique(choice.indices)) == k
    assert ((choice.indices >= 0) & (choice.indices < n)).all()
    assert choice.probs.dtype == np.float64 and choice.probs.shape == (n,)
    assert (choice.probs >= 0).all()
    assert choice.probs.sum() == pytest.approx(1.0)
    again = select(scores, k, beta, np.random.default_rng(seed))
    np.testing.assert_array_equal(again.indices, choice.indices)

    uniform = select(scores, k, 0.0, np.random.default_rng(seed))
    assert (uniform.probs == uniform.probs[0]).all()
    assert uniform.probs[0] == pytest.approx(1 / n)

    if name == "topk":
        np.testing.assert_array_equal(np.sort(scores[choice.indices]), np.sort(scores)[n - k :])

    # Ranks as scores: distinct and one apart, so a cold selector has no excuse to miss the top k.
    spaced = np.argsort(np.argsort(scores, kind="stable"), kind="stable").astype(np.float64)
    cold = select(spaced, k, COLD, np.random.default_rng(seed))
    assert set(spaced[cold.indices].astype(int).tolist()) == set(range(n - k, n))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_beta_zero_chooses_every_candidate_equally_often(name: str) -> None:
    n, k, draws = 10, 3, 1500
    scores = np.random.default_rng(1).normal(size=n) * 3
    rng = np.random.default_rng(2)
    counts = np.zeros(n)
    for _ in range(draws):
        counts[SELECTORS[name](scores, k, 0.0, rng).indices] += 1
    p = k / n
    expected, variance = draws * p, draws * p * (1 - p)
    # About chi-square with n - 1 degrees of freedom; the bound is ~6 standard deviations out.
    statistic = ((counts - expected) ** 2 / variance).sum()
    assert statistic < (n - 1) + 6 * np.sqrt(2 * (n - 1)), counts


@pytest.mark.parametrize("name", STOCHASTIC)
def test_higher_scores_are_chosen_more_often(name: str) -> None:
    n, k, draws = 8, 2, 1000
    scores = np.linspace(0.0, 3.0, n)
    order = np.random.default_rng(3).permutation(n)  # positions must not matter
    rng = np.random.default_rng(4)
    counts = np.zeros(n)
    for _ in range(draws):
        counts[SELECTORS[name](scores[order], k, 1.0, rng).indices] += 1
    by_score = np.empty(n)
    by_score[order] = counts
    noise = 3 * np.sqrt(by_score + 1)
    assert (np.diff(by_score) > -noise[1:]).all(), by_score
    assert by_score[-1] > 2 * by_score[0], by_score
    assert by_score[n // 2 :].sum() > 2 * by_score[: n // 2].sum(), by_score


@pytest.mark.parametrize("name", STOCHASTIC)
def test_tied_scores_are_equally_likely(name: str) -> None:
    probs = SELECTORS[name](np.array([1.0, 0.0, 1.0, 2.0, 1.0]), 2, 1.0, np.random.default_rng(0)).probs
    assert probs[0] == probs[2] == probs[4]
    assert probs[3] > probs[0] > probs[1]


@pytest.mark.parametrize("name", ["softmax", "power"])
def test_minus_infinity_has_probability_zero_and_comes_last(name: str) -> None:
    scores = np.array([0.0, -np.inf, 1.0, -np.inf, 2.0])
    for seed in range(50):
        choice = SELECTORS[name](scores, 3, 1.0, np.random.default_rng(seed))
        assert choice.probs[[1, 3]].tolist() == [0.0, 0.0]
        assert sorted(choice.indices.tolist()) == [0, 2, 4]
    # Asked for more than have p > 0: the impossible ones fill in, each of them sometimes.
    filled = {int(SELECTORS[name](scores, 4, 1.0, np.random.default_rng(s)).indices[-1]) for s in range(50)}
    assert filled == {1, 3}


@pytest.mark.parametrize("name", ["softmax", "power"])
def test_infinite_scores(name: str) -> None:
    rng = np.random.default_rng(0)
    nothing = SELECTORS[name](np.full(4, -np.inf), 2, 1.0, rng)
    np.testing.assert_allclose(nothing.probs, 0.25)
    first = SELECTORS[name](np.array([0.0, np.inf, 5.0]), 1, 1.0, rng)
    assert first.indices.tolist() == [1]


def test_huge_scores_do_not_overflow_into_a_false_favourite() -> None:
    # beta * s alone would be +inf for both 1e308 and 1.7e308, making them equally "certain".
    scores = np.array([1e308, -1e308, 0.0, 1.7e308])
    for name in SELECTORS:
        for seed in range(20):
            choice = SELECTORS[name](scores, 1, 1e3, np.random.default_rng(seed))
            assert np.isfinite(choice.probs).all() and choice.probs.sum() == pytest.approx(1.0)
            assert choice.indices.tolist() == [3], name


def test_float32_scores_are_accepted() -> None:
    choice = SELECTORS["softmax"](np.arange(5, dtype=np.float32), 2, 1.0, np.random.default_rng(0))
    assert choice.probs.dtype == np.float64


@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.parametrize(
    "scores, k, beta, message",
    [
        (np.array([0.0, np.nan, 1.0]), 1, 1.0, "NaN"),
        (np.array([0.0, 1.0]), 3, 1.0, "k=3 of n=2"),
        (np.array([0.0, 1.0]), -1, 1.0, "k=-1"),
        (np.array([0, 1]), 1, 1.0, "floating point"),
        (np.array([0.0, 1.0]), 1, -1.0, "beta"),
        (np.array([0.0, 1.0]), 1, np.inf, "beta"),
        (np.zeros((2, 2)), 1, 1.0, "one-dimensional"),
    ],
)
def test_bad_input_is_a_value_error(name: str, scores: np.ndarray, k: int, beta: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SELECTORS[name](scores, k, beta, np.random.default_rng(0))


def test_get_selector() -> None:
    assert get_selector("rank") is SELECTORS["rank"]
    with pytest.raises(ValueError, match="unknown selector 'greedy'; known: power, rank, softmax, topk"):
        get_selector("greedy")
