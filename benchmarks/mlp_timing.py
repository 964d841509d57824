"""Torch side of the selection-cost benchmark: the trainer's step and the snapshot scorer's forward.

It runs in a spawned child process so that the process timing the curator never loads torch, as
a curator actor does not; the two never run at the same time, so they do not compete for cores.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import Connection

import numpy as np

IN_FEATURES, HIDDEN, CLASSES = 784, 256, 10
# loader.models:mlp with one hidden layer is 784-256-10.
MLP_KWARGS = {"in_features": IN_FEATURES, "hidden": HIDDEN, "classes": CLASSES, "depth": 1}


def _serve(conn: Connection) -> None:
    import torch
    import torch.nn.functional as F

    from loader.models import mlp
    from loader.scoring import inputs_from_table, learner_losses

    from selection_pool import payload_table

    default_threads = torch.get_num_threads()
    conn.send({"default_threads": default_threads, "torch": torch.__version__})
    while True:
        message = conn.recv()
        if message is None:
            return
        kind, threads, rows, repeats, seed = message
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model = mlp(**MLP_KWARGS)
        if kind == "train_step":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            x, y = torch.randn(rows, IN_FEATURES), torch.randint(0, CLASSES, (rows,))

            def once() -> None:
                losses = F.cross_entropy(model(x), y, reduction="none")
                losses.mean().backward()
                opt.step()
                opt.zero_grad()
        else:
            # The scorer's own path: a candidate table as the assembler cuts it, through
            # inputs_from_table and learner_losses (inference mode, eval mode).
            table = payload_table(rows, np.random.default_rng(seed), shard_index=0)

            def once() -> None:
                learner_losses(model, *inputs_from_table(table))

        for _ in range(max(5, repeats // 10)):
            once()
        times = []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            once()
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
        conn.send(times)


class TorchTimer:
    """A child process that times `train_step` (forward, backward, Adam) and `forward` (the
    snapshot scorer's learner_losses) of the 784-256-10 MLP on request."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        info = self._conn.recv()
        self.default_threads: int = info["default_threads"]
        self.torch_version: str = info["torch"]

    def times(self, kind: str, threads: int, rows: int, repeats: int, seed: int = 0) -> list[tuple[float, float]]:
        """(wall, CPU) seconds per call, one pair per repeat (after a few untimed warm-up calls).
        CPU time counts every torch thread, spinning included, so it is wall-like at 1 thread only."""
        self._conn.send((kind, threads, rows, repeats, seed))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)
