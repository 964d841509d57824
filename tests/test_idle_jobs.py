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
from tests.helpers import LOADER_TIMEOUT_S, rows_in

IDLE_S = 0.2
WAIT_S = 30
POLL_S = 0.05


@pytest.fixture(scope="module")
def service(serve, mnist_tar):
    return serve(mnist_tar["train"], shuffle_rows=64, job_idle_s=IDLE_S)


def live_jobs(address: str) -> set[str]:
    return {j.job for j in fetch_stats(address).jobs}


def curator_alive(curator) -> bool:
    try:
        ray.get(curator.stats.remote(), timeout=WAIT_S)
    except RayActorError:
        return False
    return True


def test_an_idle_job_is_released_and_resumes_from_its_state(service, mnist_tar):
    loader = RemoteLoader(service.address, job="idle", batch_size=32, timeout_s=LOADER_TIMEOUT_S)
    first = []
    for batch in loader:
        first.append(batch["_id"].numpy().copy())
        if len(first) == 4:
            break
    state = loader.state_dict()
    loader.close()
    curator = service.pipeline.curator("idle")
    deadline = time.monotonic() + WAIT_S
    while "idle" in live_jobs(service.address):
        assert time.monotonic() < deadline, f"the idle job was not released within {WAIT_S} s"
        time.sleep(POLL_S)
    deadline = time.monotonic() + WAIT_S
    while curator_alive(curator):  # ray.kill takes effect asynchronously
        assert time.monotonic() < deadline, f"the released job's curator still answers after {WAIT_S} s"
        time.sleep(POLL_S)

    again = RemoteLoader(service.address, job="idle", batch_size=32, timeout_s=LOADER_TIMEOUT_S)
    again.load_state_dict(state)
    rest = [batch["_id"].numpy().copy() for batch in again]
    again.close()
    ids = np.concatenate(first + rest)
    assert len(ids) == rows_in(mnist_tar["train"]) and len(np.unique(ids)) == len(ids)


def test_a_job_with_a_connected_trainer_is_never_released(service):
    loader = RemoteLoader(service.address, job="busy", batch_size=32, timeout_s=LOADER_TIMEOUT_S)
    batches = iter(loader)
    next(batches)  # the stream is open; the trainer is simply slow
    far_future = time.monotonic() + 3600
    assert "busy" not in asyncio.run(service.pipeline.release_idle(far_future))
    assert "busy" in live_jobs(service.address)
    assert next(batches)["_id"].numel() == 32  # and it goes on serving
    batches.close()
    loader.close()
