"""A refreshed reference swapped into a running service (`loader set-reference`): the pool is
rescored in the background, the budget and every curator then use the new losses while
embeddings and clusters stay, a restart keeps the new reference and its saved scores, and bad
weights are refused with the reason, changing nothing."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

from loader import RemoteLoader
from loader.cli import main as cli
from loader.client.admin import ServiceCallError, fetch_stats, set_reference
from loader.ids import make_ids
from loader.reference import train_reference
from loader.scoring import ModelSpec, build_model, inputs_from_table, learner_losses
from loader.sources import read_shard
from tests.helpers import LOADER_TIMEOUT_S, blob_pool

BUDGET, BATCH, ROWS, SHARDS = 300, 16, 128, 4
MLP = "loader.models:mlp"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Shards, the starting reference and a refreshed one that scores them differently."""
    root = tmp_path_factory.mktemp("refresh")
    paths, weights = blob_pool(root, seed=5, shards=SHARDS, reference_epochs=5)
    refreshed = str(root / "refreshed.pt")  # trained on one shard only, for one epoch
    train_reference(ModelSpec(MLP), paths[:1], refreshed, epochs=1, progress=False)
    return paths, weights, refreshed


def losses_of(weights: str, path: str) -> np.ndarray:
    model = build_model(ModelSpec(MLP, weights=weights))
    return learner_losses(model, *inputs_from_table(read_shard(path), "x", "y"))


def wait_rescored(address: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while (stats := fetch_stats(address)).rescore_pending:
        assert time.monotonic() < deadline, f"{stats.rescore_pending} shards not rescored within {timeout_s} s"
        time.sleep(0.05)
    return stats


def wait_admitted(address: str, rows: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        budget = fetch_stats(address).budget
        if budget.kept_samples + budget.pruned_near_duplicate + budget.pruned_low_value == rows:
            return
        assert time.monotonic() < deadline, f"the starting pool was not admitted within {timeout_s} s"
        time.sleep(0.05)


def start(serve, paths, weights, state_dir):
    return serve(paths, max_samples=BUDGET, shuffle_rows=ROWS, ready_batches=1, state_dir=state_dir,
                 reference={"factory": MLP, "weights": weights})  # fmt: skip


def test_a_new_reference_rescores_the_pool_keeps_embeddings_and_survives_a_restart(serve, pool, tmp_path, capsys):
    paths, weights, refreshed = pool
    state_dir = str(tmp_path / "state")
    service = start(serve, paths, weights, state_dir)
    wait_admitted(service.address, SHARDS * ROWS)
    loader = RemoteLoader(service.address, job="refresh", batch_size=BATCH, stream=True, policy="learnability",
                          timeout_s=LOADER_TIMEOUT_S)  # fmt: skip
    it = iter(loader)
    for _ in range(3):
        next(it)
    budget = service.pipeline.actors()["budget"][0]
    before = ray.get(budget.state.remote())

    assert cli(["set-reference", "--address", service.address, refreshed]) == 0
    assert "rescoring 4 shards" in capsys.readouterr().out
    stats = wait_rescored(service.address)
    assert stats.reference_weights == refreshed

    new = {i: losses_of(refreshed, p) for i, p in enumerate(paths)}
    old = {i: losses_of(weights, p) for i, p in enumerate(paths)}
    assert not np.allclose(new[0], old[0], atol=1e-3), "the two references must score differently"
    after = ray.get(budget.state.remote())
    expected = -np.concatenate([new[i] for i in range(SHARDS)])
    every = np.concatenate([make_ids(i, ROWS) for i in range(SHARDS)])
    np.testing.assert_allclose(after["value"], expected[np.searchsorted(every, after["ids"])], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(after["ids"], before["ids"])
    np.testing.assert_array_equal(after["embeddings"], before["embeddings"])
    np.testing.assert_array_equal(after["cluster"], before["cluster"])

    # The running stream's next pass reads each shard again and takes its new losses.
    curator = service.pipeline.curator("refresh")
    for _ in range(2 * BUDGET // BATCH + 4):
        next(it)
    kept = after["ids"]
    used = ray.get(curator.reference_loss.remote(kept))
    np.testing.assert_allclose(used, -expected[np.searchsorted(every, kept)], rtol=1e-3, atol=1e-3)
    loader.close()
    service.stop()

    # A restart (same config, naming the old weights) scores with the new reference from its
    # saved scores: nothing is scored again.
    again = start(serve, paths, weights, state_dir)
    assert fetch_stats(again.address).reference_weights == refreshed
    with RemoteLoader(again.address, job="after", batch_size=BATCH, stream=True, policy="learnability",
                      max_steps=5, timeout_s=LOADER_TIMEOUT_S) as later:  # fmt: skip
        assert len(list(later)) == 5
    assert fetch_stats(again.address).reference_scored_samples == 0


def test_weights_that_do_not_fit_are_refused_and_change_nothing(serve, pool, tmp_path):
    paths, weights, _ = pool
    service = start(serve, paths, weights, str(tmp_path / "state"))
    missing = str(tmp_path / "gone.pt")
    with pytest.raises(ServiceCallError) as refused:
        set_reference(service.address, missing)
    assert refused.value.code == "INVALID_ARGUMENT" and missing in refused.value.details
    wrong = str(tmp_path / "wrong.pt")
    torch.save(build_model(ModelSpec(MLP, kwargs=(("hidden", 8),))).state_dict(), wrong)
    with pytest.raises(ServiceCallError) as refused:
        set_reference(service.address, wrong)
    assert refused.value.code == "INVALID_ARGUMENT" and "shape" in refused.value.details
    assert fetch_stats(service.address).reference_weights == weights

    plain = serve(paths)  # no reference in its config: nothing to replace
    with pytest.raises(ServiceCallError) as refused:
        set_reference(plain.address, weights)
    assert refused.value.code == "FAILED_PRECONDITION" and "reference" in refused.value.details
