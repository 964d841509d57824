"""One resume test for every stateful stage: save -> restore -> continue equals an uninterrupted run.

Each stage is an adapter: `build()` makes the object as the service does, `step(obj, i)` feeds it
the i-th input (seeded by i alone, so a resumed run gets the same inputs) and returns what the call
gave back, and `observe(obj)` returns what the object exposes. The state goes through np.savez and
np.load(allow_pickle=False) on the way, as state_dir files do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from loader.ids import make_ids
from loader.job.ledger import NO_SNAPSHOT, EndOfEpoch, Failed, Ledger, Materialize, Pending, Ready
from loader.pool import PoolIndex
from loader.selection.bandit import Exp3Arms, UcbArms
from loader.selection.clusters import OnlineClusters
from loader.selection.diversity import EmbeddingMemory
from loader.selection.options import SelectionOptions
from loader.selection.policies import resolve
from loader.selection.rewards import ClusterReward
from loader.selection.selector import Selector

N = 8  # steps of a run
SHARDS, ROWS, DIM = 4, 48, 8  # shard i arrives at step i
Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Stage:
    build: Callable[[], Any]
    step: Callable[[Any, int], Arrays]
    observe: Callable[[Any], Arrays]
    # State that is not a function of the inputs (wall-clock time), left out of the comparisons.
    volatile: tuple[str, ...] = ()


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([20240611, *key])


_CENTRES = _rng(0).normal(size=(6, DIM))


def _blobs(rng: np.random.Generator, rows: int, groups: int) -> np.ndarray:
    return _CENTRES[rng.integers(0, groups, rows)] + 0.1 * rng.normal(size=(rows, DIM))


def _scores(shard: int) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(1, shard)
    return rng.gamma(2.0, size=ROWS).astype(np.float32), _blobs(rng, ROWS, 2 + shard)


def _pool_ids(shards: int) -> np.ndarray:
    return np.concatenate([make_ids(s, ROWS) for s in range(shards)])


# -- PoolIndex -------------------------------------------------------------------------------------


def _pool_step(pool: PoolIndex, i: int) -> Arrays:
    if i < SHARDS:
        pool.ensure_shard(i, ROWS)
        pool.set_scores(i, *_scores(i))
        if i != 1:  # one shard stays unclustered: which ones are is state too
            pool.set_clusters(i, _rng(2, i).integers(0, 3 + i, ROWS))
    rng = _rng(3, i)
    # Drawn with repeats: the newest of a sample's losses in one report wins.
    report = rng.choice(_pool_ids(min(i + 1, SHARDS)), size=30)
    pool.record_losses(report, rng.gamma(2.0, size=len(report)).astype(np.float32))
    return {}


def _pool_observe(pool: PoolIndex) -> Arrays:
    ids = _pool_ids(len(pool) // ROWS)
    return {
        "learner_loss": pool.learner_loss(ids),
        "fallback": pool.fallback_learner_loss(ids),
        "cluster": pool.cluster_of(ids),
        "cluster_sizes": pool.cluster_sizes()[0],
        "unseen": np.array(pool.unseen_learner_loss()),
        "feedback_samples": np.array(pool.feedback_samples),
    }


# -- OnlineClusters --------------------------------------------------------------------------------

_PROBE = _rng(4).normal(size=(64, DIM))


def _clusters_step(clusters: OnlineClusters, i: int) -> Arrays:
    # New groups appear over the run, so clusters open after the warm start too.
    return {"assign": clusters.assign(_blobs(_rng(5, i), 70, min(6, 2 + i)))}


def _clusters_observe(clusters: OnlineClusters) -> Arrays:
    predict = clusters.predict(_PROBE) if clusters.num_clusters else np.zeros(0, np.int32)
    return {"predict": predict, "centroids": clusters.centroids, "counts": clusters.counts,
            "threshold": np.array(clusters.threshold)}  # fmt: skip


# -- bandits ---------------------------------------------------------------------------------------


def _bandit_step(arms: Exp3Arms | UcbArms, i: int) -> Arrays:
    rng = _rng(6, i)
    k = 3 + i // 2  # arms appear as clusters open
    quotas = arms.quotas(20, rng.integers(0, 10, k))
    arms.update(rng.integers(0, k, 15), rng.normal(size=15))
    return {"quotas": quotas}


def _bandit_observe(arms: Exp3Arms | UcbArms) -> Arrays:
    return {"weights": arms.weights, "reward_estimates": arms.reward_estimates,
            "probabilities": arms.probabilities(np.arange(arms.num_arms) % 2 == 0)}  # fmt: skip


# -- ClusterReward ---------------------------------------------------------------------------------


def _reward_step(reward: ClusterReward, i: int) -> Arrays:
    rng = _rng(10, i)
    k = 3 + i // 2  # clusters appear as they open; -1: a sample of a shard not clustered
    learner = rng.gamma(2.0, size=40)
    learner[rng.random(40) < 0.1] = np.nan  # nothing known of it yet
    reward.observe_candidates(rng.integers(-1, k, 40), learner, rng.gamma(1.5, size=40))
    if i % 3 == 2:  # no report between two selections: the next reward covers both
        return {}
    previous = rng.gamma(2.0, size=12)
    previous[rng.random(12) < 0.3] = np.nan  # first reports
    reward.observe_reports(rng.integers(0, k, 12), previous, rng.gamma(2.0, size=12))
    arms, rewards = reward.take()
    return {"arms": arms, "rewards": rewards}


def _reward_observe(reward: ClusterReward) -> Arrays:
    return {"estimates": reward.estimates(8), "trends": reward.trends}


# -- EmbeddingMemory -------------------------------------------------------------------------------


def _memory_step(memory: EmbeddingMemory, i: int) -> Arrays:
    rng = _rng(7, i)
    memory.add(rng.normal(size=(int(rng.integers(0, 12)) if i != 3 else 20, DIM)))  # step 3 overfills it
    return {}


def _memory_observe(memory: EmbeddingMemory) -> Arrays:
    return {"contents": memory.contents(), "similarity": memory.max_similarity(_PROBE),
            "len": np.array(len(memory)), "dim": np.array(memory.dim or -1)}  # fmt: skip


# -- Ledger ----------------------------------------------------------------------------------------


def _lookup_outcome(found) -> np.ndarray:
    # Payloads are not state: a batch restored without one is Materialize where it was Ready,
    # and both are the same batch (seq and rows) to a trainer.
    if isinstance(found, Ready):
        return np.array([0, found.seq, found.rows])
    if isinstance(found, Materialize):
        return np.array([0, found.seq, len(found.ids)])
    if isinstance(found, Pending):
        return np.array([1])
    if isinstance(found, EndOfEpoch):
        return np.array([2, found.batches])
    assert isinstance(found, Failed), found
    return np.array([3])


def _ledger_step(ledger: Ledger, i: int) -> Arrays:
    rng = _rng(8, i)
    if i < N - 2:
        rows = int(rng.integers(1, 6))
        ledger.append(rng.integers(0, 1 << 40, rows), rng.random(rows), b"payload %d" % i, i if i % 2 else NO_SNAPSHOT)
    elif i == N - 2:
        ledger.closed = True
    rank, seq = i % 2, i // 2 + (i % 3 == 0)  # sometimes ahead of what is chosen: Pending
    found = ledger.lookup(rank, seq)
    if seq:
        ledger.ack(rank, seq - 1)
    return {"lookup": _lookup_outcome(found)}


def _ledger_observe(ledger: Ledger) -> Arrays:
    return {
        "rows": np.array([len(ids) for ids in ledger.ids]),
        "ids": np.concatenate([*ledger.ids, np.zeros(0, np.int64)]),
        "weights": np.concatenate([*ledger.weights, np.zeros(0, np.float32)]),
        "snapshot_steps": np.array([ledger.snapshot_step(g) for g in range(len(ledger))]),
        "steps_of": np.array([ledger.steps_of(rank) for rank in range(ledger.world_size)]),
        "wanted": np.array(ledger.wanted),
        "closed": np.array(ledger.closed),
    }


# -- Selector --------------------------------------------------------------------------------------


def _selector_stage(policy: str, **options: object) -> Stage:
    resolved = resolve(policy, dict(options), "selection", SelectionOptions(keep_ratio=0.5, max_clusters=6))

    def step(selector: Selector, i: int) -> Arrays:
        # Every step offers the shards read so far, as a restarted service reads them again:
        # reference scores are not state, the scorers keep them.
        for shard in range(min(i + 1, SHARDS)):
            assert selector.add_shard(shard, ROWS, _scores(shard)) == ""
        rng = _rng(9, i)
        ids = rng.choice(_pool_ids(min(i + 1, SHARDS)), size=selector.super_batch, replace=False)
        out = {}
        if selector.draws_by_cluster:
            out["quotas"] = selector.quotas(selector.super_batch, np.bincount(selector.cluster_of(ids)))
        chosen = selector.select(ids, None, rng, progress=i / N)
        losses = rng.gamma(2.0, size=len(chosen.kept)).astype(np.float32)
        assert selector.feedback(chosen.kept, losses) == ""
        return {**out, "picks": chosen.picks, "kept": chosen.kept, "weights": chosen.weights}

    def observe(selector: Selector) -> Arrays:
        ids = _pool_ids(SHARDS)
        known = ids[: len(selector.pool)]  # shards arrive in index order
        stats = selector.cluster_stats()
        return {
            "learner_loss": selector.pool.learner_loss(known),
            "cluster": selector.cluster_of(known),
            "selections": np.array(selector.selections),
            **{key: np.array([c[key] for c in stats]) for key in ("size", "weight", "reward", "served")},
        }

    return Stage(lambda: Selector(policy, resolved, 12, 3), step, observe, volatile=("selection_seconds",))


STAGES = {
    "pool": Stage(PoolIndex, _pool_step, _pool_observe),
    "clusters": Stage(lambda: OnlineClusters(max_clusters=10, init_clusters=3, batch_size=32, seed=5),
                      _clusters_step, _clusters_observe),  # fmt: skip
    "exp3": Stage(lambda: Exp3Arms(gamma=0.2, eta=2.0, seed=3), _bandit_step, _bandit_observe),
    "ucb": Stage(lambda: UcbArms(gamma=0.2, eta=2.0, seed=3, discount=0.9), _bandit_step, _bandit_observe),
    "reward": Stage(lambda: ClusterReward(fast=0.2, slow=0.05), _reward_step, _reward_observe),
    "memory": Stage(lambda: EmbeddingMemory(16), _memory_step, _memory_observe),
    "ledger": Stage(lambda: Ledger(world_size=2), _ledger_step, _ledger_observe),
    "selector-uniform": _selector_stage("uniform"),
    "selector-learnability+bandit+diversity": _selector_stage(
        "learnability+bandit+diversity", selector="softmax", beta=2.0
    ),
    "selector-easy_reference+ucb": _selector_stage("easy_reference", bandit="ucb", selector="rank"),
}


def _run(stage: Stage, obj: Any, steps: range) -> list[Arrays]:
    return [{**stage.step(obj, i), **stage.observe(obj)} for i in steps]


def _assert_same(got: Arrays, expected: Arrays, what: str, leave_out: tuple[str, ...] = ()) -> None:
    assert got.keys() == expected.keys(), what
    for key in expected.keys() - set(leave_out):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{what}: {key}", strict=True)


def _saved_and_loaded(state: Arrays, path) -> Arrays:
    np.savez(path, **state)
    with np.load(path, allow_pickle=False) as saved:
        return dict(saved)


@pytest.mark.parametrize("name", STAGES)
def test_save_restore_continue_equals_an_uninterrupted_run(name: str, tmp_path) -> None:
    stage = STAGES[name]
    straight = stage.build()
    expected = _run(stage, straight, range(N))
    for k in (0, 1, N // 2, N - 1):
        before = stage.build()
        _run(stage, before, range(k))
        state = _saved_and_loaded(before.get_state(), tmp_path / f"{k}.npz")
        after = stage.build()
        after.reset(state)
        _assert_same(after.get_state(), state, f"{name}: state restored after {k} steps")
        for i, observed in enumerate(_run(stage, after, range(k, N)), k):
            _assert_same(observed, expected[i], f"{name}: step {i} after a restore at {k}")
        _assert_same(after.get_state(), straight.get_state(), f"{name}: state at the end, restored at {k}",
                     stage.volatile)  # fmt: skip

    # reset() without a state is a new object: it runs as the first run did.
    used = stage.build()
    _run(stage, used, range(N // 2))
    used.reset()
    _assert_same(used.get_state(), stage.build().get_state(), f"{name}: reset()", stage.volatile)
    for i, observed in enumerate(_run(stage, used, range(N))):
        _assert_same(observed, expected[i], f"{name}: step {i} after reset()")
