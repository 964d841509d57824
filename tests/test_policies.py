"""Unit tests for the selection policies and what they are built from: importance weights,
scores, InfoBatch pruning, options and the super-batch arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.errors import ConfigError
from loader.selection.infobatch import prune
from loader.selection.options import SelectionOptions, keep_count, parse_options, super_batch_size
from loader.selection.policies import POLICIES, make_policy
from loader.selection.scores import easy_reference, fill_missing, learnability
from loader.selection.selectors import SELECTORS
from loader.selection.weights import importance_weights


def choose(policy_name: str, k: int, *, ref=None, learner=None, seed=0, progress=None, **options):
    policy = make_policy(policy_name, SelectionOptions(**options))
    n = len(ref if ref is not None else learner)
    return policy.select(
        k, ref_loss=ref, learner_loss=learner, n=n, rng=np.random.default_rng(seed), progress=progress
    )


# -- importance weights -----------------------------------------------------------------------


def test_importance_weights_undo_the_sampling_distribution() -> None:
    probs = np.array([0.5, 0.25, 0.125, 0.125])
    w = importance_weights(probs, np.array([0, 1, 3]))
    assert w.dtype == np.float32
    assert w.mean() == pytest.approx(1.0)
    # w ∝ 1 / p: the unlikely pick counts 4 times as much as the likely one.
    np.testing.assert_allclose(w * probs[[0, 1, 3]], (w * probs[[0, 1, 3]])[0], rtol=1e-6)
    assert w[2] == pytest.approx(4 * w[0])


def test_importance_weights_stay_positive_and_finite_at_the_extremes() -> None:
    probs = np.array([1.0 - 1e-300, 1e-300, 0.0, 0.0])
    probs /= probs.sum()
    w = importance_weights(probs, np.array([0, 1, 2]))
    assert np.isfinite(w).all() and (w > 0).all()
    assert w.mean() == pytest.approx(1.0)
    # p = 0 (a fill-in) is weighed like the smallest positive p, not infinitely.
    assert w[2] == w[1]


def test_importance_weights_of_a_uniform_draw_are_one() -> None:
    np.testing.assert_array_equal(importance_weights(np.full(8, 1 / 8), np.array([5, 2, 7])), 1.0)


@pytest.mark.parametrize(
    "probs, indices", [(np.array([0.5, np.nan]), np.array([0])), (np.array([0.5, 0.5]), np.array([2]))]
)
def test_importance_weights_reject_bad_input(probs, indices) -> None:
    with pytest.raises(ValueError):
        importance_weights(probs, indices)


# -- scores -----------------------------------------------------------------------------------


def test_scores() -> None:
    np.testing.assert_array_equal(learnability([3.0, 1.0], [1.0, 1.5]), [2.0, -0.5])
    np.testing.assert_array_equal(easy_reference([0.5, 2.0]), [-0.5, -2.0])
    with pytest.raises(ValueError, match="shape"):
        learnability([1.0, 2.0], [1.0])


def test_fill_missing() -> None:
    values = np.array([1.0, np.nan, 3.0, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(fill_missing(values, 2.0), [1.0, 2.0, 3.0, 2.0])
    np.testing.assert_array_equal(fill_missing(values, np.nan), [1.0, 0.0, 3.0, 0.0])
    np.testing.assert_array_equal(fill_missing(values, [9.0, 8.0, 7.0, np.nan]), [1.0, 8.0, 3.0, 0.0])


# -- weights served by each policy ------------------------------------------------------------


def test_stochastic_policy_weights_are_normalised_importance_weights() -> None:
    rng = np.random.default_rng(5)
    ref, learner = rng.gamma(2.0, size=200), rng.gamma(2.0, size=200)
    for selector in ("softmax", "power", "rank"):
        picks, weights = choose("learnability", 40, ref=ref, learner=learner, selector=selector, beta=2.0)
        assert weights.dtype == np.float32 and weights.shape == (40,)
        assert np.isfinite(weights).all() and (weights > 0).all()
        assert weights.mean() == pytest.approx(1.0, rel=1e-5)
        assert weights.std() > 0.01, selector  # not secretly all ones


def test_topk_and_uniform_weigh_one() -> None:
    rng = np.random.default_rng(6)
    ref, learner = rng.gamma(2.0, size=50), rng.gamma(2.0, size=50)
    for name in ("learnability", "easy_reference"):
        _, weights = choose(name, 10, ref=ref, learner=learner, selector="topk")
        np.testing.assert_array_equal(weights, 1.0)
    picks, weights = choose("uniform", 10, ref=ref)
    np.testing.assert_array_equal(picks, np.arange(10))
    np.testing.assert_array_equal(weights, 1.0)


# -- what each policy prefers -----------------------------------------------------------------

# 5 learnable (learner still wrong, reference right), 5 noisy (both wrong), 10 already learnt.
LEARNER = np.array([2.0] * 5 + [3.0] * 5 + [0.1] * 10)
REFERENCE = np.array([0.1] * 5 + [2.9] * 5 + [0.1] * 10)
LEARNABLE, NOISY = set(range(5)), set(range(5, 10))


def test_learnability_prefers_learnable_over_noisy() -> None:
    picks, _ = choose("learnability", 5, ref=REFERENCE, learner=LEARNER, selector="topk")
    assert set(picks.tolist()) == LEARNABLE
    # Highest learner loss alone would have taken the noisy ones: the test can tell the two apart.
    assert set(np.argsort(-LEARNER)[:5].tolist()) == NOISY

    counts = np.zeros(len(LEARNER))
    for seed in range(200):
        picks, _ = choose("learnability", 5, ref=REFERENCE, learner=LEARNER, selector="softmax", beta=2.0, seed=seed)
        counts[picks] += 1
    assert counts[:5].sum() > 3 * counts[5:10].sum()


def test_easy_reference_picks_the_lowest_reference_losses() -> None:
    ref = np.random.default_rng(7).permutation(30).astype(np.float64)
    picks, weights = choose("easy_reference", 6, ref=ref, selector="topk")
    assert sorted(ref[picks].tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    np.testing.assert_array_equal(weights, 1.0)


# -- InfoBatch (`loss`) -----------------------------------------------------------------------

HIGH, LOW = 6, 14
LOSSES = np.r_[np.full(HIGH, 5.0), np.full(LOW, 0.5)]  # mean 1.85: the first six are above it


def test_prune_drops_only_below_mean_and_rescales_the_kept_ones() -> None:
    keep, weights = prune(LOSSES, 0.75, np.random.default_rng(8))
    assert keep[:HIGH].all()
    assert not keep[HIGH:].all()
    np.testing.assert_array_equal(weights[:HIGH], 1.0)
    np.testing.assert_array_equal(weights[HIGH:][keep[HIGH:]], 4.0)
    np.testing.assert_array_equal(weights[HIGH:][~keep[HIGH:]], 1.0)
    keep, weights = prune(LOSSES, 0.0, np.random.default_rng(8))
    assert keep.all() and (weights == 1.0).all()


def test_loss_keeps_every_above_mean_sample_when_the_batch_has_room() -> None:
    for seed in range(50):
        picks, weights = choose("loss", 14, learner=LOSSES, prune_ratio=0.9, seed=seed)
        assert set(range(HIGH)) <= set(picks.tolist())
        assert len(set(picks.tolist())) == 14
        high = picks < HIGH
        np.testing.assert_array_equal(weights[high], 1.0)
        # Below-mean picks are kept ones (10) or fill-ins from the pruned (1).
        assert set(np.round(weights[~high], 4).tolist()) <= {10.0, 1.0}


def test_loss_serves_only_kept_samples_and_rescales_them() -> None:
    counts, weighted = np.zeros(len(LOSSES)), np.zeros(len(LOSSES))
    for seed in range(1000):
        picks, weights = choose("loss", 3, learner=LOSSES, prune_ratio=0.5, seed=seed)
        np.testing.assert_array_equal(weights[picks < HIGH], 1.0)
        # Enough are always kept (at least the six above the mean), so no fill-ins: rescaled.
        np.testing.assert_array_equal(weights[picks >= HIGH], 2.0)
        counts[picks] += 1
        weighted[picks] += weights
    # Low-loss samples are served about half as often, and the weight makes up for it: per
    # sample, the expected weight served is about the same in both groups (unbiased gradient).
    assert counts[HIGH:].mean() < 0.75 * counts[:HIGH].mean()
    assert weighted[HIGH:].mean() == pytest.approx(weighted[:HIGH].mean(), rel=0.15)


def test_loss_stops_pruning_after_the_anneal_fraction() -> None:
    before, after = np.zeros(len(LOSSES)), np.zeros(len(LOSSES))
    for seed in range(500):
        picks, _ = choose("loss", 4, learner=LOSSES, prune_ratio=0.8, anneal_fraction=0.8, progress=0.79, seed=seed)
        before[picks] += 1
        picks, weights = choose(
            "loss", 4, learner=LOSSES, prune_ratio=0.8, anneal_fraction=0.8, progress=0.8, seed=seed
        )
        np.testing.assert_array_equal(weights, 1.0)
        after[picks] += 1
    assert before[HIGH:].mean() < 0.5 * before[:HIGH].mean()
    # Uniform: every sample 500 * 4 / 20 = 100 times, give or take sampling noise.
    assert np.abs(after - 100).max() < 40, after


# -- every policy -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 60),
    k_fraction=st.floats(0, 1),
    selector=st.sampled_from(sorted(SELECTORS)),
    beta=st.floats(0, 20),
    progress=st.one_of(st.none(), st.floats(0, 1)),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_policy_returns_k_distinct_candidates(name, n, k_fraction, selector, beta, progress, seed) -> None:
    rng = np.random.default_rng(seed)
    k = round(k_fraction * n)
    # Ties are common in practice (fallback losses), so draw from few distinct values sometimes.
    ref = rng.gamma(2.0, size=n) if seed % 2 else rng.integers(0, 3, size=n).astype(np.float64)
    learner = rng.gamma(2.0, size=n).astype(np.float32)
    policy = make_policy(name, SelectionOptions(selector=selector, beta=beta))
    picks, weights = policy.select(k, ref_loss=ref, learner_loss=learner, n=n, rng=rng, progress=progress)
    assert picks.dtype == np.int64 and picks.shape == (k,)
    assert len(np.unique(picks)) == k and ((picks >= 0) & (picks < n)).all()
    assert weights.dtype == np.float32 and weights.shape == (k,)
    assert np.isfinite(weights).all() and (weights > 0).all()


def test_policy_registry() -> None:
    assert sorted(POLICIES) == ["easy_reference", "learnability", "loss", "uniform"]
    flags = {name: (make_policy(name).needs_reference, make_policy(name).needs_learner) for name in POLICIES}
    assert flags == {
        "uniform": (False, False),
        "loss": (False, True),
        "learnability": (True, True),
        "easy_reference": (True, False),
    }
    with pytest.raises(ValueError, match="unknown policy 'best'; known: easy_reference, learnability, loss, uniform"):
        make_policy("best")
    with pytest.raises(ValueError, match="unknown selector"):
        make_policy("learnability", SelectionOptions(selector="best"))


def test_super_batch_per_policy() -> None:
    options = SelectionOptions(keep_ratio=0.25)
    assert make_policy("uniform", options).super_batch(32) == 32
    assert make_policy("uniform", options).options.keep_ratio == 1.0
    for name in ("loss", "learnability", "easy_reference"):
        assert make_policy(name, options).super_batch(32) == 128


def test_missing_or_misshapen_losses_are_value_errors() -> None:
    policy = make_policy("learnability")
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="needs ref_loss"):
        policy.select(1, ref_loss=None, learner_loss=np.zeros(3), n=3, rng=rng, progress=None)
    with pytest.raises(ValueError, match=r"learner_loss has shape \(2,\)"):
        policy.select(1, ref_loss=np.zeros(3), learner_loss=np.zeros(2), n=3, rng=rng, progress=None)
    with pytest.raises(ValueError, match="k=4 of n=3"):
        make_policy("uniform").select(4, ref_loss=None, learner_loss=None, n=3, rng=rng, progress=None)


# -- options ----------------------------------------------------------------------------------


def test_parse_options_accepts_strings_and_native_values() -> None:
    strings = {
        "keep_ratio": "0.5",
        "selector": "softmax",
        "beta": "2",
        "prune_ratio": "0",
        "anneal_fraction": "1",
        "learner_loss": "snapshot",
        "learner": "my_pkg.models:make_net",
        "learner_kwargs": '{"width": 64}',
    }
    native = {
        **strings,
        **{"keep_ratio": 0.5, "beta": 2, "prune_ratio": 0.0, "anneal_fraction": 1, "learner_kwargs": {"width": 64}},
    }
    expected = SelectionOptions(0.5, "softmax", 2.0, "snapshot", 0.0, 1.0, "my_pkg.models:make_net", '{"width": 64}')
    assert parse_options(strings) == expected
    assert parse_options(native) == expected
    assert parse_options({}) == SelectionOptions()


def test_parse_options_starts_from_base() -> None:
    base = SelectionOptions(keep_ratio=0.5, selector="rank", learner_loss="snapshot", learner="m:f")
    assert parse_options({"beta": "3"}, base=base) == SelectionOptions(
        keep_ratio=0.5, selector="rank", beta=3.0, learner_loss="snapshot", learner="m:f"
    )


@pytest.mark.parametrize(
    "values, key, problem",
    [
        ({"keep_ration": 0.2}, "selection.keep_ration", "known: keep_ratio, selector"),
        ({"keep_ratio": "0"}, "selection.keep_ratio", "(0, 1]"),
        ({"keep_ratio": 1.5}, "selection.keep_ratio", "(0, 1]"),
        ({"keep_ratio": "nan"}, "selection.keep_ratio", "(0, 1]"),
        ({"keep_ratio": "a fifth"}, "selection.keep_ratio", "expected a number"),
        ({"keep_ratio": True}, "selection.keep_ratio", "expected a number"),
        ({"keep_ratio": None}, "selection.keep_ratio", "expected a number"),
        ({"beta": "-1"}, "selection.beta", ">= 0"),
        ({"beta": "inf"}, "selection.beta", "finite"),
        ({"selector": "greedy"}, "selection.selector", "known: power, rank, softmax, topk"),
        ({"selector": 3}, "selection.selector", "expected a string"),
        ({"learner_loss": "oracle"}, "selection.learner_loss", "feedback, snapshot"),
        ({"prune_ratio": "1"}, "selection.prune_ratio", "[0, 1)"),
        ({"prune_ratio": -0.1}, "selection.prune_ratio", "[0, 1)"),
        ({"anneal_fraction": "0"}, "selection.anneal_fraction", "(0, 1]"),
        ({"learner_kwargs": "{width: 64}"}, "selection.learner_kwargs", "not valid JSON"),
        ({"learner_kwargs": "[1, 2]"}, "selection.learner_kwargs", "JSON object"),
        ({"learner_kwargs": {"f": object()}}, "selection.learner_kwargs", "JSON"),
        ({"learner": "my_pkg.models.make_net"}, "selection.learner", "module:function"),
        ({"learner_loss": "snapshot"}, "selection.learner", "needs a learner"),
    ],
)
def test_parse_options_names_the_key_in_every_error(values, key, problem) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_options(values)
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_parse_options_reads_whole_numbers_and_padded_names_from_strings() -> None:
    # Hello carries every option as a string.
    options = parse_options({"memory_size": "64", "max_clusters": "8.0", "chunk": 4.0, "bandit": " ucb "})
    assert (options.memory_size, options.max_clusters, options.chunk, options.bandit) == (64, 8, 4, "ucb")
    assert all(isinstance(n, int) for n in (options.memory_size, options.max_clusters, options.chunk))
    for values, problem in (({"chunk": "2.5"}, "whole number"), ({"chunk": True}, "expected a number"),
                            ({"memory_size": "0"}, ">= 1"), ({"eta": "nan"}, "finite")):  # fmt: skip
        with pytest.raises(ConfigError) as caught:
            parse_options(values, key="options")
        assert caught.value.key == f"options.{next(iter(values))}" and problem in caught.value.problem
        assert "\n" not in str(caught.value)  # one line, not pydantic's report


def test_parse_options_uses_the_given_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_options({"beta": "-1"}, key="jobs.a.selection")
    assert caught.value.key == "jobs.a.selection.beta"
    with pytest.raises(ConfigError) as caught:
        parse_options(["beta"], key="selection")  # type: ignore[arg-type]
    assert caught.value.key == "selection"


@pytest.mark.parametrize(
    "batch_size, keep_ratio, expected", [(32, 0.2, 160), (32, 1.0, 32), (10, 0.3, 33), (1, 0.9, 1), (7, 0.5, 14)]
)
def test_super_batch_size(batch_size, keep_ratio, expected) -> None:
    assert super_batch_size(batch_size, keep_ratio) == expected


@pytest.mark.parametrize(
    "n, super_batch, batch_size, expected",
    [
        (160, 160, 32, 32),  # a full super-batch
        (80, 160, 32, 16),  # the tail of an epoch keeps the same ratio
        (2, 160, 32, 1),  # never nothing
        (0, 160, 32, 0),
        (33, 33, 10, 10),
        (5, 5, 8, 5),  # never more than there are
        (3, 4, 4, 3),  # uniform: the tail is served whole
    ],
)
def test_keep_count(n, super_batch, batch_size, expected) -> None:
    assert keep_count(n, super_batch, batch_size) == expected


def test_batch_arithmetic_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        super_batch_size(0, 0.5)
    with pytest.raises(ValueError):
        super_batch_size(8, 0.0)
    with pytest.raises(ValueError):
        keep_count(-1, 4, 4)
