"""Trainers killed at random points (SIGKILL: no goodbye to the server) resume from their last
checkpoint and lose and repeat nothing; the server lets go of their streams."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from loader import RemoteLoader
from tests.helpers import LOADER_TIMEOUT_S, rows_in

POLL_S = 0.05

# (where it dies, at which step) for successive runs of one trainer; the last run finishes.
KILLS = [("received", 2), ("reported", 0), ("received", 1), ("reported", 1), ("received", 0)]


@pytest.fixture(scope="module")
def service(serve, mnist_tar):
    return serve(mnist_tar["train"], shuffle_rows=64, ready_batches=2)


def run_trainer(address: str, job: str, log, die_at: int, where: str, policy: str) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "tests.trainer_process", address, job, str(log), str(die_at), where, policy],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode in (0, -9), done.stderr[-2000:]
    return done.returncode


def trainers_connected(address: str) -> int:
    with RemoteLoader(address, job="probe", batch_size=1, timeout_s=LOADER_TIMEOUT_S) as probe:
        return probe.stats().trainers_connected


def wait_for_no_trainers(address: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (connected := trainers_connected(address)) != 0:
        assert time.monotonic() < deadline, f"{connected} dead trainers still hold streams after {timeout_s} s"
        time.sleep(POLL_S)


@pytest.mark.parametrize("policy", ["uniform", "loss"])
def test_killed_trainers_resume_without_loss_or_repeat(service, mnist_tar, tmp_path, policy):
    job, log = f"killed-{policy}", tmp_path / "trained.jsonl"
    for where, step in KILLS:
        assert run_trainer(service.address, job, log, step, where, policy) == -9
        wait_for_no_trainers(service.address)
    assert run_trainer(service.address, job, log, -1, "never", policy) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    ids = np.concatenate([line["ids"] for line in lines])
    assert len(ids) == len(np.unique(ids)), "a batch was trained on twice"
    if policy == "uniform":
        assert len(ids) == rows_in(mnist_tar["train"]), "a batch was lost"
    seqs = [line["state"]["seq"] for line in lines]
    assert seqs == list(range(1, len(lines) + 1))
    # The job's served count includes batches re-sent after each kill; its feedback holds every
    # report that reached the server before a kill and after resumes.
    with RemoteLoader(service.address, job=job, batch_size=32, timeout_s=LOADER_TIMEOUT_S) as probe:
        stats = probe.stats()
    mine = [j for j in stats.jobs if j.job == job][0]
    assert mine.batches_served >= len(lines)
