"""A service restarted on the same `state_dir` goes on where it stopped: shard indices, reference
scores, clusters, bandit weights, learner losses and the epoch in progress all survive."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from loader import RemoteLoader
from tests.helpers import LOADER_TIMEOUT_S, blob_pool, rows_in

POLL_S = 0.05
CURATED = dict(policy="learnability+bandit+diversity", options={"keep_ratio": 0.5, "max_clusters": 8})


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return blob_pool(tmp_path_factory.mktemp("restart"), seed=7, shards=6, reference_epochs=5)


@pytest.fixture
def restartable(serve, pool, tmp_path):
    """Starts the service on one state_dir; call it again after `stop` for the restarted one."""
    paths, weights = pool
    reference = {"factory": "loader.models:mlp", "weights": weights}

    started = []

    def start():
        started.append(serve(paths, shuffle_rows=256, ready_batches=1, reference=reference,
                             state_dir=str(tmp_path / "state")))  # fmt: skip
        return started[-1]

    yield start
    for service in started:  # each holds CPU shares of the 2-CPU test Ray until stopped
        service.stop()


def take(loader: RemoteLoader, batches: int, report: bool = False) -> list[np.ndarray]:
    out = []
    for batch in loader:
        out.append(batch["_id"].numpy().copy())
        if report:
            loader.report(batch, np.linspace(0.5, 2.5, len(out[-1])).astype(np.float32))
        if len(out) == batches:
            break
    return out


def job_stats(address: str, job: str, feedback_samples: int = 0, timeout_s: float = 30.0):
    """The job's stats once at least `feedback_samples` reported losses have arrived (bounded)."""
    deadline = time.monotonic() + timeout_s
    with RemoteLoader(address, job=job, batch_size=1, timeout_s=LOADER_TIMEOUT_S) as probe:
        while True:
            stats = probe.stats()
            jobs = [j for j in stats.jobs if j.job == job]
            if jobs and jobs[0].feedback_samples >= feedback_samples:
                return stats, jobs[0]
            got = jobs[0].feedback_samples if jobs else None
            assert time.monotonic() < deadline, f"job {job!r}: {got} of {feedback_samples} losses within {timeout_s} s"
            time.sleep(POLL_S)


def test_uniform_epoch_survives_a_restart_without_loss_or_repeat(restartable, pool):
    service = restartable()
    loader = RemoteLoader(service.address, job="plain", batch_size=32, timeout_s=LOADER_TIMEOUT_S)
    first = take(loader, 7)
    state = loader.state_dict()
    loader.close()
    service.stop()

    again = restartable()
    loader = RemoteLoader(again.address, job="plain", batch_size=32, timeout_s=LOADER_TIMEOUT_S)
    loader.load_state_dict(state)
    rest = [batch["_id"].numpy().copy() for batch in loader]
    loader.close()
    ids = np.concatenate(first + rest)
    assert len(ids) == rows_in(pool[0]) and len(np.unique(ids)) == len(ids)


def test_scores_clusters_and_bandit_survive_a_restart(restartable, pool):
    service = restartable()
    loader = RemoteLoader(service.address, job="curated", batch_size=16, timeout_s=LOADER_TIMEOUT_S, **CURATED)
    first = take(loader, 6, report=True)
    state = loader.state_dict()
    loader.close()
    reported = sum(len(b) for b in first)
    stats, before = job_stats(service.address, "curated", reported)
    scored_before = stats.reference_scored_samples
    assert scored_before > 0 and len(before.clusters) >= 2
    service.stop()

    again = restartable()
    loader = RemoteLoader(again.address, job="curated", batch_size=16, timeout_s=LOADER_TIMEOUT_S, **CURATED)
    loader.load_state_dict(state)
    rest = [batch["_id"].numpy().copy() for batch in loader]
    loader.close()
    stats, after = job_stats(again.address, "curated", reported)
    # Nothing scored twice: the restarted scorers found the scored shards' scores in state_dir.
    assert scored_before + stats.reference_scored_samples == rows_in(pool[0])
    assert after.feedback_samples >= reported
    # Reading runs only as far ahead as choosing needs, so the restarted service reads the shards
    # the first one had not reached: clusters keep every member they had and only gain. Clusters
    # re-learned from scratch would move members between them.
    sizes = {c.id: c.size for c in before.clusters}
    grown = {c.id: c.size for c in after.clusters}
    assert sizes.keys() <= grown.keys()
    assert all(grown[c] >= sizes[c] for c in sizes), f"clusters lost members across the restart: {sizes} -> {grown}"
    assert sum(grown.values()) == rows_in(pool[0])
    # No losses were reported after the restart, so the bandit stands where it stood (unless a
    # shard read after the restart opened a cluster: a new arm takes its share).
    if len(after.clusters) == len(before.clusters):
        np.testing.assert_allclose([c.weight for c in after.clusters], [c.weight for c in before.clusters], atol=1e-9)
    ids = np.concatenate(first + rest)
    assert len(np.unique(ids)) == len(ids), "a sample was served twice in the epoch across the restart"


def test_a_restarted_service_refuses_a_job_name_with_other_settings(restartable):
    service = restartable()
    take(RemoteLoader(service.address, job="fixed", batch_size=8, timeout_s=LOADER_TIMEOUT_S), 1)
    service.stop()
    again = restartable()
    with pytest.raises(grpc.RpcError) as caught:
        take(RemoteLoader(again.address, job="fixed", batch_size=16, timeout_s=LOADER_TIMEOUT_S), 1)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "batch_size=8" in caught.value.details()


def test_frequent_checkpoints_run_alongside_serving_and_feedback(serve, pool, tmp_path):
    paths, weights = pool
    state = tmp_path / "frequent"
    service = serve(paths, shuffle_rows=256, ready_batches=1, state_dir=str(state), checkpoint_s=0.01,
                    reference={"factory": "loader.models:mlp", "weights": weights})  # fmt: skip
    loader = RemoteLoader(service.address, job="often", batch_size=16, timeout_s=60, **CURATED)
    served = 0
    for batch in loader:  # every report is a chance for a periodic checkpoint
        loader.report(batch, np.ones(len(batch["_id"]), np.float32))
        served += len(batch["_id"])
    loader.close()
    assert served == pytest.approx(rows_in(paths) * 0.5, abs=16)
    assert list(state.glob("jobs/often-*/soft.npz")), "no checkpoint was written"
    service.stop()
