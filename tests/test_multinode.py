"""Multi-node Ray on one machine (tests/multinode_run.py, in a child process with its own Ray):
health is NOT_SERVING until the actors are up, SERVING after, NOT_SERVING while draining; readers
and scorers run on the nodes whose resources the config names; and a worker node removed
mid-epoch loses and repeats no sample: the epoch completes with every sample exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import numpy as np

from loader.ids import make_ids
from tests.helpers import blob_pool
from tests.multinode_run import RESULT

RUN_TIMEOUT_S = 360
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(command: list[str]) -> subprocess.CompletedProcess:
    """The child in a session of its own, so that on a timeout its whole Ray cluster (head,
    raylets, workers) is killed with it instead of outliving the test."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"multinode_run.py did not end within {RUN_TIMEOUT_S} s:\n{err[-4000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # the cluster's processes, if any are left
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_health_follows_the_actors_they_go_where_the_config_says_and_a_lost_node_loses_nothing(tmp_path):
    paths, weights = blob_pool(tmp_path, seed=11, shards=6, reference_epochs=2)
    command = [sys.executable, os.path.join(ROOT, "tests", "multinode_run.py"), "--state-dir", str(tmp_path / "state"),
               weights, *paths]  # fmt: skip
    done = run_child(command)
    assert done.returncode == 0, done.stderr[-4000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    result = json.loads(line[len(RESULT):])
    assert result["health"] == ["NOT_SERVING", "SERVING", "NOT_SERVING"], result["health"]
    nodes, placed = result["nodes"], result["placed"]
    assert placed["readers"] and set(placed["readers"]) == {nodes["readers"]}, placed
    assert placed["scorers"] == [nodes["scorers"]], placed
    served = np.sort(np.asarray(result["served"], np.int64))
    pool = np.sort(np.concatenate([make_ids(i, 128) for i in range(len(paths))]))
    np.testing.assert_array_equal(served, pool)
