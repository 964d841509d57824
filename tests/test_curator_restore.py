"""A curator rebuilt from its journal and checkpoint goes on with the epoch it was in: batches
already selected come back by id, and no row is considered twice."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from loader import codec
from loader.curator import Curator, CuratorSettings, EndOfEpoch, JobSpec, Materialize, Pending, Ready
from loader.ids import make_ids
from loader.registry import ShardRecord
from loader.selection.options import SelectionOptions
from loader.state_store import StateStore

ROWS = 40
SHARDS = 6


def shard(index: int) -> pa.Table:
    ids = make_ids(index, ROWS)
    return pa.table({"x": ids.astype(np.float64)}).append_column(codec.ID, pa.array(ids))


def records() -> list[ShardRecord]:
    return [ShardRecord(index=i, uri=f"mem://{i}", rows=ROWS) for i in range(SHARDS)]


def scores(index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(index)
    return rng.random(ROWS).astype(np.float32), rng.normal(size=(ROWS, 8)).astype(np.float32)


SPECS = {
    "uniform": JobSpec(job="j", batch_size=8, world_size=2, policy="uniform", seed=3),
    "learnability+bandit+diversity": JobSpec(
        job="j", batch_size=8, world_size=2, policy="learnability", seed=3,
        options=SelectionOptions(keep_ratio=0.5, bandit="exp3", diversity=0.5),
    ),  # fmt: skip
}


def new_curator(spec: JobSpec, store: StateStore) -> Curator:
    def journal(epoch, considered, kept, weights):
        store.append_batch(f"epoch-{epoch}.log", considered, kept, weights)

    return Curator(spec, CuratorSettings(shuffle_rows=0, ready_batches=1), journal=journal)


def feed(curator: Curator, order: list[ShardRecord], upto: int | None = None) -> None:
    for record in order[:upto]:
        assert curator.add_shard(0, record.index, shard(record.index), scores(record.index)) == ""
    # Batches are chosen when asked for: a request far ahead chooses all that the rows allow.
    assert isinstance(curator.lookup(0, 0, 1 << 20), Pending)


def served_ids(curator: Curator, start: int = 0) -> list[np.ndarray]:
    """Every batch of epoch 0 from global batch `start` on, re-reading acknowledged ones by id."""
    out, seq = [], start // 2
    while True:
        done = 0
        for rank in (0, 1):
            result = curator.lookup(rank, 0, seq)
            if isinstance(result, EndOfEpoch):
                done += 1
            elif isinstance(result, Materialize):
                out.append(result.ids)
            else:
                assert isinstance(result, Ready), result
                out.append(result.payload.ids)  # the plan's ids: what the gateway gathers
        if done == 2:
            return out
        assert done == 0, "ranks ended at different sequence numbers"
        seq += 1


@pytest.mark.parametrize("policy", SPECS)
def test_an_epoch_cut_by_a_restart_considers_every_row_once(tmp_path, policy) -> None:
    spec = SPECS[policy]
    store = StateStore(tmp_path)
    before = new_curator(spec, store)
    order = before.start_epoch(0, records())
    feed(before, order, upto=3)
    before.feedback(before.epochs[0].ledger.ids[0], np.ones(len(before.epochs[0].ledger.ids[0]), np.float32))
    selected_before = len(before.epochs[0].ledger.ids)
    assert selected_before > 0
    state = before.get_state()

    after = new_curator(spec, store)
    after.restore_state(state)
    after.restore_epoch(0, store.read_batches("epoch-0.log"))
    remaining = after.start_epoch(0, records())
    assert {r.index for r in remaining} == {r.index for r in order}  # none was read to its end
    feed(after, remaining)
    after.finish_reading(0)

    batches = served_ids(after)
    ids = np.concatenate(batches)
    assert len(np.unique(ids)) == len(ids), "a sample was served twice in the epoch"
    np.testing.assert_array_equal(np.concatenate(batches[:selected_before]), np.concatenate(before.epochs[0].ledger.ids))
    considered = np.concatenate([c for c, _, _ in store.read_batches("epoch-0.log")])
    assert sorted(considered) == sorted(make_ids(i, ROWS)[r] for i in range(SHARDS) for r in range(ROWS))
    if policy == "uniform":
        assert len(ids) == SHARDS * ROWS
    assert after.pool.feedback_samples == before.pool.feedback_samples > 0


def test_restored_state_keeps_cluster_ids_and_bandit_weights(tmp_path) -> None:
    spec = SPECS["learnability+bandit+diversity"]
    store = StateStore(tmp_path)
    before = new_curator(spec, store)
    feed(before, before.start_epoch(0, records()))
    served = np.concatenate(before.epochs[0].ledger.ids)
    before.feedback(served, np.linspace(0, 3, len(served)).astype(np.float32))

    after = new_curator(spec, store)
    after.restore_state(before.get_state())
    everything = np.concatenate([make_ids(i, ROWS) for i in range(SHARDS)])
    np.testing.assert_array_equal(after.pool.cluster_of(everything), before.pool.cluster_of(everything))
    np.testing.assert_allclose(after.selector.bandit.weights, before.selector.bandit.weights)
    np.testing.assert_array_equal(after.selector.memory.contents(), before.selector.memory.contents())
    without_ref_loss = [{k: v for k, v in c.items() if k != "reference_loss"} for c in before.selector.cluster_stats()]
    assert [{k: v for k, v in c.items() if k != "reference_loss"} for c in after.selector.cluster_stats()] == without_ref_loss
    # Scores arriving again after the restart must not re-cluster the shard.
    after.start_epoch(1, records())
    feed_epoch = after.add_shard(1, 0, shard(0), scores(0))
    assert feed_epoch == ""
    np.testing.assert_array_equal(after.pool.cluster_of(make_ids(0, ROWS)), before.pool.cluster_of(make_ids(0, ROWS)))


def test_a_fully_read_shard_is_not_read_again_after_a_restart(tmp_path) -> None:
    spec = SPECS["uniform"]
    store = StateStore(tmp_path)
    before = new_curator(spec, store)
    order = before.start_epoch(0, records())
    feed(before, order)
    before.finish_reading(0)
    served_ids(before)  # the whole epoch was selected (and journalled)

    after = new_curator(spec, store)
    after.restore_epoch(0, store.read_batches("epoch-0.log"))
    assert after.start_epoch(0, records()) == []
    after.finish_reading(0)
    assert len(np.concatenate(served_ids(after))) == SHARDS * ROWS


@pytest.mark.parametrize("max_clusters", [1, 3, 8])
def test_a_small_cluster_cap_is_a_valid_job(tmp_path, max_clusters) -> None:
    spec = JobSpec(job="j", batch_size=8, world_size=1, policy="learnability", seed=0,
                   options=SelectionOptions(keep_ratio=0.5, bandit="exp3", max_clusters=max_clusters))  # fmt: skip
    curator = Curator(spec, CuratorSettings(shuffle_rows=0, ready_batches=1))
    curator.start_epoch(0, records())
    assert curator.add_shard(0, 0, shard(0), scores(0)) == ""
    assert 1 <= curator.selector.clusters.num_clusters <= max_clusters
