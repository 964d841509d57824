"""The pool budget (`max_samples`): it holds after the start and after every addition, near-copies
go first, pruned samples are never served again, and a restart keeps the same budget state."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray

from loader import RemoteLoader
from loader.client.admin import add_shards
from loader.sources import read_shard
from loader.sources.writers import write_parquet
from loader.tensors import to_numpy
from tests.helpers import LOADER_TIMEOUT_S, blob_pool

BUDGET, BATCH, PREFETCH = 300, 16, 2


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return blob_pool(tmp_path_factory.mktemp("budget"), seed=3, shards=4, reference_epochs=5)


def near_copies(source: str, path: str, seed: int) -> str:
    """A shard of near-copies of `source`'s rows (tiny jitter), as scraped duplicates are."""
    table = read_shard(source)
    x = to_numpy(table.column("x")).astype(np.float32)
    jitter = np.random.default_rng(seed).normal(scale=1e-3, size=x.shape).astype(np.float32)
    write_parquet(path, {"x": x + jitter, "y": table.column("y").to_numpy()})
    return path


def budget_of(service):
    return service.pipeline.actors()["budget"][0]


def settled(service, rows: int, timeout_s: float = 60.0):
    """The budget's stats once it has taken in `rows` samples in all (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with RemoteLoader(service.address, job="probe", batch_size=1) as probe:
            budget = probe.stats().budget
        seen = budget.kept_samples + budget.pruned_near_duplicate + budget.pruned_low_value
        if seen == rows:
            return budget
        assert time.monotonic() < deadline, f"the budget took in {seen} of {rows} samples within {timeout_s} s"
        time.sleep(0.05)


def serve_pool(serve, paths, weights, state_dir):
    return serve(paths, max_samples=BUDGET, shuffle_rows=128, ready_batches=1, state_dir=state_dir,
                 reference={"factory": "loader.models:mlp", "weights": weights})  # fmt: skip


def test_the_budget_holds_prunes_copies_first_and_pruned_samples_are_never_served(serve, pool, tmp_path):
    paths, weights = pool
    state_dir = str(tmp_path / "state")
    service = serve_pool(serve, paths, weights, state_dir)
    budget = settled(service, 4 * 128)  # the starting pool, admitted in the background
    assert budget.kept_samples == BUDGET and budget.max_samples == BUDGET

    loader = RemoteLoader(service.address, job="lifelong", batch_size=BATCH, stream=True, prefetch=PREFETCH,
                          timeout_s=LOADER_TIMEOUT_S)  # fmt: skip
    it = iter(loader)
    for _ in range(3):
        next(it)
    copies = [near_copies(paths[i], str(tmp_path / f"copies-{i}.parquet"), seed=i) for i in range(2)]
    for n, path in enumerate(copies, start=1):
        (shard,) = add_shards(service.address, [path])
        assert shard.state == "ok"
        after = settled(service, (4 + n) * 128)
        assert after.kept_samples == BUDGET, f"after addition {n} the pool holds {after.kept_samples}"
    assert after.pruned_near_duplicate >= 128, "each copy or its original should have gone as a near-duplicate"
    pruned = ray.get(budget_of(service).pruned.remote())
    for _ in range(PREFETCH):  # chosen before the last pruning, possibly
        next(it)
    served = np.concatenate([next(it)["_id"].numpy() for _ in range(40)])
    it.close()
    loader.close()
    assert not np.isin(served, pruned).any(), "a pruned sample was served"

    state = ray.get(budget_of(service).stats.remote()), pruned
    kept = ray.get(budget_of(service).state.remote())
    service.stop()
    again = serve_pool(serve, paths + copies, weights, state_dir)
    try:
        restored = ray.get(budget_of(again).stats.remote()), ray.get(budget_of(again).pruned.remote())
        assert restored[0] == state[0]
        np.testing.assert_array_equal(restored[1], state[1])
        again_kept = ray.get(budget_of(again).state.remote())  # kept ids, clusters and centroids
        assert again_kept.keys() == kept.keys()
        for name, values in kept.items():
            np.testing.assert_array_equal(again_kept[name], values, err_msg=name)
        with RemoteLoader(again.address, job="after-restart", batch_size=BATCH, stream=True, max_steps=40,
                          timeout_s=LOADER_TIMEOUT_S) as fresh:  # fmt: skip
            served = np.concatenate([batch["_id"].numpy() for batch in fresh])
        assert not np.isin(served, pruned).any(), "a pruned sample was served after the restart"
        assert len(np.unique(served)) <= BUDGET
    finally:
        again.stop()


def test_embeddings_come_from_the_embedding_column_when_one_is_named(ray_session, pool, tmp_path):
    from actors.scorer import ScorerActor
    from loader.reader import read_with_ids
    from loader.scoring import ModelSpec

    paths, weights = pool
    reference = ModelSpec("loader.models:mlp", weights=weights)
    shard = read_with_ids(paths[0], 0)
    x = to_numpy(shard.table.column("x"))
    by_body = ScorerActor.remote(reference, "x", "y", str(tmp_path / "a"))
    by_column = ScorerActor.remote(reference, "x", "y", str(tmp_path / "b"), embedding_column="x")
    (loss_a, body), (loss_b, column) = ray.get([by_body.score.remote(shard), by_column.score.remote(shard)])
    np.testing.assert_array_equal(loss_a, loss_b)  # the reference loss is the model's either way
    np.testing.assert_array_equal(column, x)
    assert body.shape != column.shape or not np.array_equal(body, column)
    missing = ScorerActor.remote(reference, "x", "y", None, embedding_column="nope")
    with pytest.raises(ray.exceptions.RayTaskError, match="embedding column 'nope' is not in the shard"):
        ray.get(missing.score.remote(shard))
    for actor in (by_body, by_column, missing):
        ray.kill(actor)
