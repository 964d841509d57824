"""A trainer process for fault tests: trains on batches, keeps a log of what it trained on with
the loader state after each step, and kills itself (SIGKILL, no clean-up) at a chosen point.

    python -m tests.trainer_process ADDRESS JOB LOG DIE_AT WHERE [POLICY]

LOG gets one JSON line per trained batch: {"ids": [...], "state": {...}}; a line is the
checkpoint a real trainer would write. A new run resumes from the log's last state.
WHERE: "received" (a batch in hand, not trained on), "reported" (losses queued, maybe unsent),
"never" (run to the end of the epoch).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

from loader import RemoteLoader


def main(address: str, job: str, log_path: str, die_at: int, where: str, policy: str = "uniform") -> None:
    state = None
    if os.path.exists(log_path):
        with open(log_path) as log:
            lines = [json.loads(line) for line in log if line.endswith("\n")]
        state = lines[-1]["state"] if lines else None
    options = {"keep_ratio": "0.5"} if policy != "uniform" else {}
    # Four batches in flight: a kill always leaves credits outstanding.
    loader = RemoteLoader(address, job=job, batch_size=32, prefetch=4, policy=policy, options=options, timeout_s=60)
    if state is not None:
        loader.load_state_dict(state)
    with open(log_path, "a") as log:
        for step, batch in enumerate(loader):
            if step == die_at and where == "received":
                os.kill(os.getpid(), signal.SIGKILL)
            loader.report(batch, np.ones(len(batch["_id"]), np.float32))
            if step == die_at and where == "reported":
                os.kill(os.getpid(), signal.SIGKILL)
            log.write(json.dumps({"ids": batch["_id"].tolist(), "state": loader.state_dict()}) + "\n")
            log.flush()
    loader.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
