"""The whole service SIGKILLed while two ranks of a job stream, restarted on its `state_dir`, the
ranks resuming from their `state_dict()`: every sample of the epoch is served exactly once.

The service runs as a user runs it, `python -m loader serve`, in a child process with its own
local Ray. The child leads a new session; Ray's gcs_server, raylet and helpers join its process
group, and the raylet puts each worker (the actors) in a group of its own within that session.
"The whole service killed" is SIGKILL of every process group of that session at once: nothing
gets to save anything, so the restarted service has only what was on disk before the kill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from loader import RemoteLoader
from loader.ids import make_ids
from loader.state_store import StateStore, job_folder
from tests.helpers import LOADER_TIMEOUT_S, rows_in

JOB = "killed-service"
WORLD = 2
BATCH = 16
# Batches each rank has handed to its trainer when the service is killed: each at another point.
BEFORE_KILL = [3, 5]
START_TIMEOUT_S = 90
GONE_TIMEOUT_S = 30
JOIN_S = 90
POLL_S = 0.05


@dataclasses.dataclass
class Served:
    proc: subprocess.Popen
    address: str
    log: str

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()[-chars:]


def session_processes(sid: int) -> list[tuple[int, int, str, str]]:
    """(pid, pgid, stat, command) of every live process of session `sid` (zombies are dead)."""
    ps = ["ps", "-eo", "pid=,pgid=,sid=,stat=,args="]
    out = subprocess.run(ps, capture_output=True, text=True, timeout=30, check=True).stdout
    found = []
    for line in out.splitlines():
        pid, pgid, psid, stat, *args = line.split(None, 4)
        if int(psid) == sid and not stat.startswith("Z"):
            found.append((int(pid), int(pgid), stat, " ".join(args)[:120]))
    return found


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) == 0


def kill_service(served: Served) -> None:
    """SIGKILL to every process group of the service's session, until none is left (bounded)."""
    sid = served.proc.pid  # start_new_session: the child leads its session and its group
    deadline = time.monotonic() + GONE_TIMEOUT_S
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    while True:
        left = session_processes(sid)
        if not left:
            break
        # Workers sit in groups of their own; one the raylet started a moment ago too.
        for pgid in {pgid for _, pgid, _, _ in left}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes of the killed service still alive: {left}"
        time.sleep(POLL_S)
    served.proc.wait(timeout=GONE_TIMEOUT_S)  # reaps the leader, our child


@contextlib.contextmanager
def serving(config: str, log: str):
    """`loader serve --config CONFIG` on an OS-assigned port; killed with its session at the end."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not a cluster
    with open(log, "a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loader", "serve", "--config", config, "--address", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True, env=env,
        )  # fmt: skip
    served = Served(proc, "", log)
    try:
        lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"loader serve printed nothing within {START_TIMEOUT_S} s:\n{served.log_tail()}")
        assert line.startswith("listening on 127.0.0.1:"), f"{line!r}\n{served.log_tail()}"
        served.address = line.split()[-1]
        yield served
    finally:
        kill_service(served)


def on_every_rank(work) -> list:
    """work(rank) on every rank at once, in threads, as DDP ranks run side by side."""
    results: list = [None] * WORLD
    errors: list = []

    def main(rank: int) -> None:
        try:
            results[rank] = work(rank)
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(rank,), daemon=True) for rank in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
        assert not t.is_alive(), f"a rank did not finish within {JOIN_S} s"
    if errors:
        raise errors[0]
    return results


def loader_for(address: str, rank: int) -> RemoteLoader:
    return RemoteLoader(address, job=JOB, batch_size=BATCH, rank=rank, world_size=WORLD, timeout_s=LOADER_TIMEOUT_S)


def test_service_sigkilled_mid_epoch_resumes_without_loss_or_repeat(tmp_path, mnist_tar):
    shards = mnist_tar["train"]
    config = tmp_path / "service.yaml"
    config.write_text(
        f"shards: {list(shards)!r}\nstate_dir: {str(tmp_path / 'state')!r}\n"
        "default_policy: uniform\nreaders: 1\nnum_cpus: 2\nshuffle_rows: 64\n"
    )
    log = str(tmp_path / "serve.log")

    with serving(str(config), log) as first:
        loaders = [loader_for(first.address, rank) for rank in range(WORLD)]

        def until_kill(rank: int):
            # The iterator stays suspended mid-epoch: its stream is open when the service dies.
            it = iter(loaders[rank])
            taken = [next(it)["_id"].numpy().copy() for _ in range(BEFORE_KILL[rank])]
            return taken, loaders[rank].state_dict(), it

        stopped = on_every_rank(until_kill)
        kill_service(first)
        assert not port_open(first.address), f"{first.address} still accepts connections after the kill"

    # The trainers notice and give up their streams (bounded: the server side is gone).
    def abandon(rank: int) -> None:
        stopped[rank][2].close()
        loaders[rank].close()

    on_every_rank(abandon)
    # The hard case: the epoch was chosen only in part when the service died (choosing runs a few
    # batches ahead of the ranks), so the restarted service both re-serves journaled batches and
    # chooses the rest from rows it reads again, skipping every row the journal shows considered.
    journaled = len(StateStore(tmp_path / "state").read_batches(f"{job_folder(JOB)}/epoch-0.log"))
    handed_out = max(WORLD * (n - 1) + rank for rank, n in enumerate(BEFORE_KILL)) + 1
    assert handed_out <= journaled < rows_in(shards) // BATCH, journaled
    states = [state for _, state, _ in stopped]
    assert [(s["rank"], s["epoch"], s["seq"]) for s in states] == [(r, 0, n) for r, n in enumerate(BEFORE_KILL)]

    with serving(str(config), log) as again:

        def resumed(rank: int):
            with loader_for(again.address, rank) as loader:  # a new loader, as in a restarted trainer
                loader.load_state_dict(states[rank])
                rest = [batch["_id"].numpy().copy() for batch in loader]
                assert loader.state_dict()["epoch"] == 1, "the resumed epoch did not run to its end"
                return rest, loader.stats()

        finished = on_every_rank(resumed)

    per_rank = [taken + rest for (taken, _, _), (rest, _) in zip(stopped, finished)]
    stats = finished[0][1]
    pool = np.concatenate([make_ids(s.index, s.rows) for s in stats.shards])
    assert len(pool) == rows_in(shards)
    served = np.concatenate([ids for batches in per_rank for ids in batches])
    repeated = len(served) - len(np.unique(served))
    assert repeated == 0, f"{repeated} samples served twice across the kill"
    missing = np.setdiff1d(pool, served)
    assert np.array_equal(np.sort(served), np.sort(pool)), f"{len(missing)} samples lost: {missing[:20]}"
    assert len({len(batches) for batches in per_rank}) == 1, [len(b) for b in per_rank]
