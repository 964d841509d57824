"""Actors killed mid-epoch (by Ray, or their worker process by SIGKILL) are restarted, and the
epoch goes on: under `uniform` every sample arrives exactly once, under a curated policy none
arrives twice."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import ray

from loader import RemoteLoader
from tests.helpers import blob_pool, rows_in

BATCH = 32
BEFORE_KILL = 3


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return blob_pool(tmp_path_factory.mktemp("faults"), seed=11, shards=8, reference_epochs=3)


@pytest.fixture(scope="module")
def service(serve, pool):
    paths, weights = pool
    # One shard in flight and one batch ready ahead: most of the epoch is still unread at the kill.
    return serve(paths, shuffle_rows=128, ready_batches=1, prefetch_shards=1, readers=2,
                 reference={"factory": "loader.models:mlp", "weights": weights})  # fmt: skip


def kill(actor, how: str) -> None:
    if how == "ray.kill":
        ray.kill(actor, no_restart=False)
    else:
        _, pid = ray.get(actor.process.remote(), timeout=30)
        os.kill(pid, signal.SIGKILL)


def victims(service, role: str, job: str) -> list:
    if role == "curator":
        return [service.pipeline.curator(job)]
    return service.pipeline.actors()[role]


CASES = [
    ("uniform", "readers", "ray.kill"),
    ("uniform", "readers", "SIGKILL"),
    ("uniform", "curator", "ray.kill"),
    ("uniform", "curator", "SIGKILL"),
    ("uniform", "registry", "SIGKILL"),
    ("learnability", "readers", "ray.kill"),
    ("learnability", "scorers", "ray.kill"),
    ("learnability", "scorers", "SIGKILL"),
    ("learnability", "curator", "ray.kill"),
    ("learnability", "curator", "SIGKILL"),
]


@pytest.mark.parametrize("policy, role, how", CASES)
def test_an_actor_killed_mid_epoch_loses_and_repeats_nothing(service, pool, policy, role, how):
    job = f"{policy}-{role}-{how}"
    options = {"keep_ratio": 0.5} if policy != "uniform" else {}
    loader = RemoteLoader(service.address, job=job, batch_size=BATCH, policy=policy, options=options, timeout_s=60)
    ids = []
    for batch in loader:
        ids.append(batch["_id"].numpy().copy())
        loader.report(batch, np.ones(len(ids[-1]), np.float32))
        if len(ids) == BEFORE_KILL:
            for actor in victims(service, role, job):
                kill(actor, how)
    loader.close()
    served = np.concatenate(ids)
    assert len(ids) > BEFORE_KILL
    assert len(np.unique(served)) == len(served), "a sample was delivered twice in the epoch"
    rows = rows_in(pool[0])
    if policy == "uniform":
        assert len(served) == rows, f"{rows - len(served)} samples lost"
    else:
        assert len(served) == pytest.approx(rows * 0.5, abs=BATCH)
    # The service is whole again: the next epoch runs to its end, a full one. Uniform serves the
    # whole pool; learnability keeps BATCH of every 2 * BATCH candidates, and the pool is a whole
    # number of such super-batches (1024 rows, 16 of 64), so exactly half of it.
    again = RemoteLoader(service.address, job=job, batch_size=BATCH, policy=policy, options=options, timeout_s=60)
    again.load_state_dict({**loader.state_dict()})
    assert again.state_dict()["epoch"] == 1
    second = np.concatenate([b["_id"].numpy().copy() for b in again])
    again.close()
    assert len(np.unique(second)) == len(second), "a sample was delivered twice in the next epoch"
    assert rows % (2 * BATCH) == 0
    assert len(second) == (rows if policy == "uniform" else rows // 2)
