"""One trainer process of the load benchmark (see benchmarks/load.py); prints a JSON summary.

    python -m benchmarks.load_trainer ADDRESS JOB MODE SECONDS [SEED [RANK WORLD_SIZE]]

MODE "consume": iterates (epoch after epoch) for SECONDS, reporting a loss per sample.
MODE "stall": takes two batches, then holds its stream open without reading for SECONDS.
MODE "churn": for SECONDS, leaves after a random 1-8 batches and rejoins from its state_dict.
The summary holds batches, samples, seconds and, per epoch, whether every id came once.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np

from loader import RemoteLoader


def consume(loader: RemoteLoader, seconds: float, rng, churn: bool) -> dict:
    started = time.monotonic()
    samples = batches = 0
    epochs: dict[int, list[np.ndarray]] = {}
    while time.monotonic() - started < seconds:
        epoch = loader.state_dict()["epoch"]
        leave_after = int(rng.integers(1, 9)) if churn else None
        taken = 0
        for batch in loader:
            ids = batch["_id"].numpy()
            epochs.setdefault(epoch, []).append(ids.copy())
            loader.report(batch, np.ones(len(ids), np.float32))
            samples, batches, taken = samples + len(ids), batches + 1, taken + 1
            if taken == leave_after or time.monotonic() - started >= seconds:
                break
    elapsed = time.monotonic() - started
    unique = {e: bool(len(np.unique(np.concatenate(b))) == sum(len(x) for x in b)) for e, b in epochs.items()}
    return {"batches": batches, "samples": samples, "seconds": elapsed, "epochs_without_repeats": unique}


def stall(loader: RemoteLoader, seconds: float) -> dict:
    it = iter(loader)
    next(it), next(it)
    # Holding the generator (and its stream) open without reading, the way a trainer stuck in a
    # long evaluation would; Event.wait is the stall itself, not synchronisation.
    threading.Event().wait(seconds)
    it.close()
    return {"batches": 2, "samples": 0, "seconds": seconds, "epochs_without_repeats": {}}


def main(address: str, job: str, mode: str, seconds: float, seed: int = 0, rank: int = 0, world: int = 1) -> None:
    loader = RemoteLoader(address, job=job, batch_size=64, rank=rank, world_size=world, prefetch=4, timeout_s=120)
    rng = np.random.default_rng(seed)
    summary = stall(loader, seconds) if mode == "stall" else consume(loader, seconds, rng, churn=mode == "churn")
    loader.close()
    print(json.dumps({"job": job, "mode": mode, **summary}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), *(int(a) for a in sys.argv[5:]))
