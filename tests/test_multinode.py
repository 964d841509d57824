"""Multi-node Ray on one machine (tests/multinode_run.py, in a child process with its own Ray):
health is NOT_SERVING until the actors are up, SERVING after, NOT_SERVING while draining; readers
and scorers run on the nodes whose resources the config names; and a worker node removed
mid-epoch loses and repeats no sample: the epoch completes with every sample exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from loader.ids import make_ids
from tests.helpers import blob_pool
from tests.multinode_run import RESULT

RUN_TIMEOUT_S = 240
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_health_follows_the_actors_they_go_where_the_config_says_and_a_lost_node_loses_nothing(tmp_path):
    paths, weights = blob_pool(tmp_path, seed=11, shards=6, reference_epochs=2)
    command = [sys.executable, os.path.join(ROOT, "tests", "multinode_run.py"), "--state-dir", str(tmp_path / "state"),
               weights, *paths]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
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
