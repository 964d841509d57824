"""Batch order is a function of (pool, seed, epoch, reported losses), not of read timing; and in
snapshot mode batches are chosen when asked for, so their learner losses are fresh."""

from __future__ import annotations

import numpy as np
import pytest

from loader import RemoteLoader
from loader.models import mlp
from loader.sources.writers import write_parquet
from tests.helpers import LOADER_TIMEOUT_S, blobs, epoch_ids

# Shard sizes far apart: with several readers, a small shard read after a big one finishes first.
SHARD_ROWS = [6000, 40, 3000, 40, 40, 1500, 40, 6000]


@pytest.fixture(scope="module")
def uneven_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(10, 40)).astype(np.float32) * 2
    paths = []
    for i, rows in enumerate(SHARD_ROWS):
        paths.append(str(root / f"train-{i:06d}.parquet"))
        write_parquet(paths[-1], blobs(rng, centroids, rows))
    return paths


def batches(address: str, job: str, seed: int, epochs: int = 1, **kwargs) -> list[list[np.ndarray]]:
    with RemoteLoader(address, job=job, batch_size=64, seed=seed, timeout_s=LOADER_TIMEOUT_S, **kwargs) as loader:
        return [epoch_ids(loader) for _ in range(epochs)]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_same_seed_same_batches_whatever_the_reads_do(serve, uneven_pool, tmp_path):
    settings = {"shuffle_rows": 256, "readers": 4, "prefetch_shards": 4, "state_dir": str(tmp_path / "state")}
    svc = serve(uneven_pool, **settings)
    first = batches(svc.address, "seed-7-a", seed=7, epochs=2)
    second = batches(svc.address, "seed-7-b", seed=7, epochs=2)
    other = batches(svc.address, "seed-8", seed=8)
    total = sum(SHARD_ROWS)
    assert sum(len(b) for b in first[0]) == total
    for epoch in range(2):
        assert same(first[epoch], second[epoch]), f"epoch {epoch}: two jobs with seed 7 got different batches"
    assert not same(first[1], first[0]), "epoch 1 repeated epoch 0's order"
    assert not same(other[0], first[0]), "another seed gave the same order"

    # A restarted service (same state_dir: the same shard indices) gives a new job the same order.
    svc.stop()
    again = serve(uneven_pool, **settings)
    assert same(batches(again.address, "seed-7-c", seed=7)[0], first[0])


def test_snapshot_batches_are_chosen_with_fresh_losses(serve, uneven_pool):
    svc = serve(uneven_pool[:3], shuffle_rows=256)
    prefetch = 2
    options = {"keep_ratio": 0.25, "learner_loss": "snapshot", "learner": "loader.models:mlp"}
    model = mlp()
    with RemoteLoader(svc.address, job="fresh", batch_size=32, policy="loss", options=options, prefetch=prefetch,
                      timeout_s=LOADER_TIMEOUT_S) as loader:  # fmt: skip
        steps = 0
        # A trainer pushing its weights after every step (the first batches, chosen before any
        # snapshot, use reported losses and are not counted).
        for _ in loader:
            steps += 1
            loader.push_weights(model, step=steps)
            if steps == 40:
                break
        job = loader.stats().jobs[0]
    assert job.weights_step == 40
    assert job.snapshot_staleness_batches >= 30
    # Each batch's losses come from a snapshot at most prefetch + 1 steps older than the trainer
    # when it asked for the batch.
    assert job.snapshot_staleness_max <= prefetch + 1, job
    assert job.snapshot_staleness_mean <= job.snapshot_staleness_max
