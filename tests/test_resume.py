"""A trainer that stops mid-epoch and resumes from state_dict() loses and repeats no sample."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from loader import RemoteLoader
from tests.helpers import rows_in

RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from loader import RemoteLoader
    address, state = sys.argv[1], json.loads(sys.argv[2])
    loader = RemoteLoader(address, job=state["job"], batch_size=32, timeout_s=60)
    loader.load_state_dict(state)
    print(json.dumps([b["_id"].tolist() for b in loader]))
    """
)


@pytest.fixture(scope="module")
def service(serve, mnist_tar):
    return serve(mnist_tar["train"], shuffle_rows=64), rows_in(mnist_tar["train"])


def take(loader: RemoteLoader, n: int) -> list[np.ndarray]:
    out = []
    for batch in loader:
        out.append(batch["_id"].numpy().copy())
        if len(out) == n:
            break
    return out


def test_resume_in_a_new_process_loses_and_repeats_nothing(service):
    svc, rows = service
    loader = RemoteLoader(svc.address, job="resume-process", batch_size=32, timeout_s=60, prefetch=4)
    before = take(loader, 5)
    state = loader.state_dict()
    loader.close()
    assert state["seq"] == 5 and state["epoch"] == 0

    done = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, svc.address, json.dumps(state)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    after = [np.array(b) for b in json.loads(done.stdout)]
    ids = np.concatenate(before + after)
    assert len(ids) == rows and len(np.unique(ids)) == rows


def test_resume_from_an_older_state_replays_the_same_batches(service):
    """Batches after the saved state were already acknowledged; they are re-read, not lost."""
    svc, rows = service
    loader = RemoteLoader(svc.address, job="resume-older", batch_size=32, timeout_s=60)
    first = take(loader, 3)
    state = loader.state_dict()
    seen_after_state = take(loader, 4)  # handed over and acknowledged, then the trainer "crashes"
    loader.close()

    again = RemoteLoader(svc.address, job="resume-older", batch_size=32, timeout_s=60)
    again.load_state_dict(state)
    rest = [b["_id"].numpy().copy() for b in again]
    for old, new in zip(seen_after_state, rest):
        np.testing.assert_array_equal(old, new)
    ids = np.concatenate(first + rest)
    assert len(ids) == rows and len(np.unique(ids)) == rows


def test_state_for_another_job_or_rank_is_refused(service):
    svc, _ = service
    loader = RemoteLoader(svc.address, job="a", batch_size=8, timeout_s=60)
    with pytest.raises(ValueError, match="job"):
        loader.load_state_dict({"job": "b", "rank": 0, "world_size": 1, "epoch": 0, "seq": 0})
    with pytest.raises(KeyError, match="seq"):
        loader.load_state_dict({"job": "a", "rank": 0, "world_size": 1, "epoch": 0})
