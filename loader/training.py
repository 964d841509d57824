"""A trainer loop over RemoteLoader for a fixed step budget, shared by the demo and benchmarks."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from loader.client import RemoteLoader
from loader.models import accuracy


@dataclasses.dataclass
class Curve:
    steps: list[int] = dataclasses.field(default_factory=list)
    test_accuracy: list[float] = dataclasses.field(default_factory=list)
    # Time in forward, backward and optimiser steps only: the trainer's compute.
    trainer_seconds: float = 0.0
    wall_seconds: float = 0.0
    epochs: int = 0

    @property
    def best(self) -> float:
        return max(self.test_accuracy, default=0.0)

    @property
    def final(self) -> float:
        return self.test_accuracy[-1] if self.test_accuracy else 0.0

    def steps_to(self, target: float) -> int | None:
        return next((s for s, a in zip(self.steps, self.test_accuracy) if a >= target), None)


def train(
    address: str,
    job: str,
    make_model: Callable[[], nn.Module],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    batch_size: int = 64,
    policy: str = "uniform",
    options: dict | None = None,
    eval_every: int = 25,
    lr: float = 1e-3,
    seed: int = 0,
    push_every: int = 0,
    use_weights: bool = True,
    progress: bool = True,
    prefetch: int = 4,
    total_epochs: int = 0,
) -> Curve:
    """Trains `make_model()` for exactly `steps` batches (as many epochs as that takes).

    With `push_every` > 0 the model's weights are pushed every that many steps (snapshot mode).
    `prefetch` is the RemoteLoader's credit: fewer batches in flight means batches selected with a
    fresher snapshot. `total_epochs` lets policies that anneal (InfoBatch's `loss`) know the plan.
    """
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve = Curve()
    started = time.perf_counter()
    loader = RemoteLoader(
        address, job=job, batch_size=batch_size, policy=policy, options=options, seed=seed, prefetch=prefetch,
        total_epochs=total_epochs,
    )  # fmt: skip
    step = 0
    bar = tqdm(total=steps, desc=job, unit="step", disable=not progress, leave=False)
    try:
        while step < steps:
            for batch in loader:
                t0 = time.perf_counter()
                losses = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
                weights = batch["_weight"] if use_weights else torch.ones_like(losses)
                (losses * weights).mean().backward()
                opt.step()
                opt.zero_grad()
                curve.trainer_seconds += time.perf_counter() - t0
                loader.report(batch, losses)
                step += 1
                bar.update()
                if push_every and (step == 1 or step % push_every == 0):
                    loader.push_weights(model, step=step)
                if step % eval_every == 0 or step == steps:
                    curve.steps.append(step)
                    curve.test_accuracy.append(accuracy(model, *test))
                    bar.set_postfix(test_acc=f"{curve.test_accuracy[-1]:.3f}")
                if step >= steps:
                    break
            else:
                curve.epochs += 1
    finally:
        bar.close()
        loader.close()
    curve.wall_seconds = time.perf_counter() - started
    return curve
