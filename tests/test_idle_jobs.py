"""Jobs nobody trains any more give their curator back; a returning trainer finds its job intact."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import ray
from ray.exceptions import RayActorError

from loader import RemoteLoader
from loader.client.admin import fetch_stats
from tests.helpers import rows_in

IDLE_S = 0.2


@pytest.fixture(scope="module")
def service(serve, mnist_tar):
    return serve(mnist_tar["train"], shuffle_rows=64, job_idle_s=IDLE_S)


def live_jobs(address: str) -> set[str]:
    return {j.job for j in fetch_stats(address).jobs}


def test_an_idle_job_is_released_and_resumes_from_its_state(service, mnist_tar):
    loader = RemoteLoader(service.address, job="idle", batch_size=32)
    first = []
    for batch in loader:
        first.append(batch["_id"].numpy().copy())
        if len(first) == 4:
            break
    state = loader.state_dict()
    loader.close()
    curator = service.pipeline.curator("idle")
    deadline = time.monotonic() + 30
    while "idle" in live_jobs(service.address):
        assert time.monotonic() < deadline, "the idle job was not released within 30 s"
    with pytest.raises(RayActorError):  # ray.kill takes effect asynchronously: bounded retries
        while time.monotonic() < deadline:
            ray.get(curator.stats.remote(), timeout=30)

    again = RemoteLoader(service.address, job="idle", batch_size=32)
    again.load_state_dict(state)
    rest = [batch["_id"].numpy().copy() for batch in again]
    again.close()
    ids = np.concatenate(first + rest)
    assert len(ids) == rows_in(mnist_tar["train"]) and len(np.unique(ids)) == len(ids)


def test_a_job_with_a_connected_trainer_is_never_released(service):
    loader = RemoteLoader(service.address, job="busy", batch_size=32)
    batches = iter(loader)
    next(batches)  # the stream is open; the trainer is simply slow
    far_future = time.monotonic() + 3600
    assert "busy" not in asyncio.run(service.pipeline.release_idle(far_future))
    assert "busy" in live_jobs(service.address)
    assert next(batches)["_id"].numel() == 32  # and it goes on serving
    batches.close()
    loader.close()
