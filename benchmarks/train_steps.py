"""End-to-end trainer for the throughput benchmark: steps per second of one model on one batch source.

The same model, optimiser and batch size whatever feeds it; only the iterator differs. Warm-up
steps are run first and not timed (allocator, worker start-up, the service's first epoch).
"""

from __future__ import annotations

import itertools
import time

import torch
import torch.nn.functional as F

from loader.models import cnn, cnn1d


def make_model(sample: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return cnn1d(length=40) if sample == "small" else cnn(in_channels=3)


def model_input(sample: str, x: torch.Tensor) -> torch.Tensor:
    # Images travel as uint8 (4x fewer bytes); the model scales them, as a trainer would.
    return x.float().div_(255.0) if sample == "large" else x


def endless(batches_of_epoch):
    """Epoch after epoch, as a training loop over several epochs sees them."""
    for epoch in itertools.count():
        yield from batches_of_epoch(epoch)


def train(sample: str, batches, warmup: int, steps: int, report=None) -> dict:
    """Trains on `batches` (an endless iterator of dicts with `x`, `y`, maybe `_weight`);
    `report(batch, losses)` is called after each step when given. A source that fails mid-run
    ends it: the figures cover the steps done, and `error` says why."""
    model = make_model(sample)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    compute = 0.0
    started = None
    done = 0
    error = None
    try:
        for step, batch in enumerate(batches):
            if step == warmup:
                started, compute = time.perf_counter(), 0.0
            if step == warmup + steps:
                break
            t0 = time.perf_counter()
            losses = F.cross_entropy(model(model_input(sample, batch["x"])), batch["y"], reduction="none")
            weight = batch.get("_weight")
            (losses if weight is None else losses * weight).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            compute += time.perf_counter() - t0
            if report is not None:
                report(batch, losses)
            done = step + 1 - warmup
    except Exception as exc:  # noqa: BLE001  (recorded in the results rather than losing the run)
        error = f"{type(exc).__name__}: {exc}"[:500]
    if started is None or done <= 0:
        return {"steps": 0, "seconds": 0.0, "steps_per_s": None, "compute_s": 0.0, "wait_fraction": None, "error": error}
    seconds = time.perf_counter() - started
    return {"steps": done, "seconds": seconds, "steps_per_s": done / seconds, "compute_s": compute,
            "wait_fraction": 1 - compute / seconds, "error": error}  # fmt: skip
