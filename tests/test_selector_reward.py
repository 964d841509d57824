"""The Selector's cluster bandit learns from `ClusterReward`: every candidate is evidence."""

from __future__ import annotations

import numpy as np
import pytest

from loader.ids import make_ids
from loader.selection.bandit import reward_from_feedback
from loader.selection.options import SelectionOptions
from loader.selection.policies import resolve
from loader.selection.selector import Selector

SHARDS, ROWS, DIM = 4, 200, 8
CENTRES = np.eye(DIM)[:2] * 3  # group 0 and group 1 lie in directions far apart


def _pool(seed: int):
    """Per shard: (reference loss, embeddings, group, learner loss). Group 0 is learnable
    (reference 0.3, learner 1.2). Group 1 is label noise: learner ≈ reference ≈ 2.3, except a
    lucky 5% that the reference happens to fit (reference 0.1): top-k keeps exactly those."""
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(SHARDS):
        group = rng.integers(0, 2, ROWS)
        embedding = CENTRES[group] + 0.3 * rng.normal(size=(ROWS, DIM))
        ref = np.where(group == 0, 0.3, 2.3 + 0.3 * rng.normal(size=ROWS))
        learner = np.where(group == 0, 1.2 + 0.1 * rng.normal(size=ROWS), 2.3 + 0.3 * rng.normal(size=ROWS))
        lucky = (group == 1) & (rng.random(ROWS) < 0.05)
        ref[lucky] = 0.1
        shards.append((ref.astype(np.float32), embedding.astype(np.float32), group, learner.astype(np.float32)))
    return shards


def _selector(policy: str = "learnability+bandit", **options: object) -> Selector:
    base = SelectionOptions(keep_ratio=0.25, max_clusters=4)
    return Selector(policy, resolve(policy, dict(options), "selection", base), 16, 7)


def _run(selector: Selector, shards, steps: int, report: bool = True, seed: int = 0):
    """Super-batches drawn at random from the pool; each batch chosen and (if report) reported.
    Returns the served ids and what the trainer reported for them."""
    for i, (ref, embedding, _, _) in enumerate(shards):
        assert selector.add_shard(i, ROWS, (ref, embedding)) == ""
    ids = np.concatenate([make_ids(i, ROWS) for i in range(len(shards))])
    learner = np.concatenate([s[3] for s in shards])
    rng = np.random.default_rng(seed)
    served, reported = [], []
    for _ in range(steps):
        candidates = rng.choice(ids, size=selector.super_batch, replace=False)
        selector.quotas(selector.super_batch, np.bincount(selector.cluster_of(candidates)))
        chosen = selector.select(candidates, None, rng, progress=None)
        losses = learner[np.searchsorted(ids, chosen.kept)]
        served.append(chosen.kept)
        reported.append(losses)
        if report:
            assert selector.feedback(chosen.kept, losses) == ""
    return np.concatenate(served), np.concatenate(reported)


def _groups(selector: Selector, shards) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster id: its share of group-1 (noise) members, and its bandit weight."""
    ids = np.concatenate([make_ids(i, ROWS) for i in range(len(shards))])
    clusters = selector.cluster_of(ids)
    group = np.concatenate([s[2] for s in shards])
    k = selector.bandit.num_arms
    noise_share = np.bincount(clusters, weights=group, minlength=k) / np.maximum(np.bincount(clusters, minlength=k), 1)
    return noise_share, selector.bandit.weights


def test_noise_cluster_loses_weight_though_its_survivors_look_best() -> None:
    shards = _pool(0)
    selector = _selector()
    served, losses = _run(selector, shards, 60)
    noise_share, weights = _groups(selector, shards)
    noisy, clean = noise_share > 0.8, noise_share < 0.2
    assert noisy.any() and clean.any(), noise_share
    assert weights[noisy].max() < weights[clean].min(), (noise_share.round(2), weights.round(3))
    # The old reward, over what was served (the survivors), ranks the noise clusters first.
    ref = np.concatenate([s[0] for s in shards])
    everything = np.concatenate([make_ids(i, ROWS) for i in range(SHARDS)])
    arms, old = reward_from_feedback(selector.cluster_of(served), losses, ref[np.searchsorted(everything, served)])
    by_arm = dict(zip(arms.tolist(), old.tolist()))
    assert min(by_arm[c] for c in np.flatnonzero(noisy)) > max(by_arm[c] for c in np.flatnonzero(clean))
    # Stats show the new estimate, in nats: learnable clusters tanh(0.9) ≈ 0.72, noise far less.
    stats = selector.cluster_stats()
    rewards = np.array([c["reward"] for c in stats])
    assert rewards[noisy].max() < 0.4 < 0.6 < rewards[clean].min(), rewards.round(2)


def test_without_feedback_the_bandit_stands_still() -> None:
    """Selections gather evidence; only reports move the bandit (a restarted job that only
    serves keeps its weights), and the next report uses the evidence gathered meanwhile."""
    shards = _pool(1)
    selector = _selector()
    _run(selector, shards, 10)
    weights = selector.bandit.weights.copy()
    estimates = [c["reward"] for c in selector.cluster_stats()]
    _run(selector, shards, 10, report=False, seed=1)
    np.testing.assert_array_equal(selector.bandit.weights, weights)
    assert [c["reward"] for c in selector.cluster_stats()] != estimates
    pending = selector.reward.get_state()["pending_count"]
    assert pending.sum() >= 10 * selector.super_batch * 0.9  # candidates of unclustered shards: none here
    served, losses = _run(selector, shards, 1, seed=2)
    assert not np.array_equal(selector.bandit.weights, weights)
    assert selector.reward.get_state()["pending_count"].sum() == 0


def test_a_rejected_report_changes_nothing() -> None:
    shards = _pool(2)
    selector = _selector()
    _run(selector, shards, 5)
    state = selector.get_state()
    assert "is not in the pool" in selector.feedback(make_ids(99, 2), np.ones(2, np.float32))
    assert "finite" in selector.feedback(make_ids(0, 2), np.array([1.0, np.nan], np.float32))
    assert selector.feedback(make_ids(0, 2), np.ones(3, np.float32)) != ""
    for key, value in selector.get_state().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


@pytest.mark.parametrize("policy, options", [("easy_reference+bandit", {}), ("easy_reference", {"bandit": "ucb"})])
def test_policies_without_learner_losses_still_feed_the_reward(policy, options) -> None:
    shards = _pool(3)
    selector = _selector(policy, **options)
    _run(selector, shards, 30)
    noise_share, weights = _groups(selector, shards)
    rewards = np.array([c["reward"] for c in selector.cluster_stats()])
    assert rewards[noise_share > 0.8].max() < rewards[noise_share < 0.2].min(), rewards.round(2)


def test_a_forgotten_cluster_regains_weight_in_snapshot_mode() -> None:
    """Snapshot mode: fresh learner losses for every candidate. Both groups are learnt (loss ≈
    reference); then group 1's loss climbs back. Its clusters' weight rises above group 0's."""
    shards = _pool(4)
    for ref, _, group, learner in shards:
        ref[:] = 0.3
        learner[:] = 0.35
    selector = _selector(learner_loss="snapshot", learner="loader.models:mlp")
    ids = np.concatenate([make_ids(i, ROWS) for i in range(SHARDS)])
    group = np.concatenate([s[2] for s in shards])
    for i, (ref, embedding, _, _) in enumerate(shards):
        selector.add_shard(i, ROWS, (ref, embedding))
    rng = np.random.default_rng(0)

    def step(level: float) -> None:
        candidates = rng.choice(ids, size=selector.super_batch, replace=False)
        selector.quotas(selector.super_batch, np.bincount(selector.cluster_of(candidates)))
        g = group[np.searchsorted(ids, candidates)]
        fresh = np.where(g == 1, level, 0.35) + 0.02 * rng.normal(size=len(candidates))
        chosen = selector.select(candidates, fresh, rng, progress=None)
        assert selector.feedback(chosen.kept, fresh[chosen.picks].astype(np.float32)) == ""

    for _ in range(60):
        step(0.35)
    noise_share, before = _groups(selector, shards)
    forgotten, kept = noise_share > 0.8, noise_share < 0.2
    assert forgotten.any() and kept.any(), noise_share
    for level in np.linspace(0.35, 1.0, 40):
        step(level)
    _, after = _groups(selector, shards)
    assert after[forgotten].sum() > before[forgotten].sum() + 0.2
    assert after[forgotten].min() > after[kept].max(), (noise_share.round(2), after.round(3))
    assert selector.reward.trends[forgotten].min() > 0.1


def test_a_shard_rewritten_with_another_row_count_needs_its_scores_again() -> None:
    """Scores are per row: those of a shard's old rows do not fit its new ones. Without new
    scores it is refused (quarantined) rather than chosen from; with them it is used."""
    selector = _selector("learnability+bandit+diversity")
    ref, embedding, _, _ = _pool(3)[0]
    assert selector.add_shard(0, ROWS, (ref, embedding)) == ""
    assert selector.pool.has_scores(0) and not selector.pool.has_scores(0, ROWS + 5)
    assert "no reference scores" in selector.add_shard(0, ROWS + 5, None)
    more = len(ref) + 5
    ref2, embedding2 = np.resize(ref, more), np.resize(embedding, (more, DIM))
    assert selector.add_shard(0, more, (ref2, embedding2)) == ""
    ids = make_ids(0, more)
    np.testing.assert_array_equal(selector.pool.reference_loss(ids), ref2)
    assert (selector.pool.cluster_of(ids) >= 0).all()  # assigned again for the new rows
    chosen = selector.select(ids[: selector.super_batch], None, np.random.default_rng(0), progress=None)
    assert len(chosen.kept) == selector.batch_size
