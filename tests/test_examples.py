"""The examples run as a user runs them: a child process each, on a few steps."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_lifelong_example_streams_through_every_stage_within_its_budget():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lifelong.py"), "--steps", "4", "--budget", "600"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("after stage")]
    assert len(lines) == 5, done.stdout
    # Every later stage adds 1,200 samples to a pool of 600: the budget holds after each.
    assert all("pool 600/600" in line for line in lines[1:]), lines
    joined = [line for line in done.stdout.splitlines() if line.startswith("stage ") and "shard" in line]
    assert len(joined) == 4 and all(line.count(" ok") == 2 for line in joined), joined
