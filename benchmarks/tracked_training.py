"""`loader.training.train` with two observations added: what kind of sample every served batch
held, and the job's cluster weights at every evaluation.

A separate loop because `train` hands neither its batches nor its loader to the caller. Model,
optimiser, seed, loss, evaluation points and the client settings are the same as there, so runs
through either loop compare.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loader.client import RemoteLoader
from loader.models import accuracy
from loader.training import Curve


@dataclasses.dataclass
class Served:
    """Samples served, and how many of them carried each flag column."""

    samples: int = 0
    flagged: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, batch: dict, flags: tuple[str, ...]) -> None:
        self.samples += len(batch["_id"])
        for name in flags:
            self.flagged[name] = self.flagged.get(name, 0) + int(batch[name].sum())

    def fraction(self, name: str) -> float:
        return self.flagged.get(name, 0) / self.samples if self.samples else float("nan")


@dataclasses.dataclass
class ClusterTrace:
    """The job's clusters at each evaluation step, as GetStats gave them."""

    steps: list[int] = dataclasses.field(default_factory=list)
    # Per step: per cluster (id, size, weight, reward, served).
    clusters: list[list[tuple[int, int, float, float, int]]] = dataclasses.field(default_factory=list)

    def add(self, step: int, loader: RemoteLoader) -> None:
        job = next(j for j in loader.stats().jobs if j.job == loader.job)
        self.steps.append(step)
        self.clusters.append([(c.id, c.size, c.weight, c.reward, c.served) for c in job.clusters])


def train_tracked(
    address: str,
    job: str,
    make_model: Callable[[], nn.Module],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    flags: tuple[str, ...],
    trace_clusters: bool,
    batch_size: int = 64,
    policy: str = "uniform",
    options: dict | None = None,
    eval_every: int = 25,
    lr: float = 1e-3,
    seed: int = 0,
    use_weights: bool = True,
    prefetch: int = 4,
    total_epochs: int = 0,
) -> tuple[Curve, Served, ClusterTrace]:
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve, served, trace = Curve(), Served(), ClusterTrace()
    started = time.perf_counter()
    loader = RemoteLoader(
        address, job=job, batch_size=batch_size, policy=policy, options=options, seed=seed, prefetch=prefetch,
        total_epochs=total_epochs,
    )  # fmt: skip
    step = 0
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
                served.add(batch, flags)
                step += 1
                if step % eval_every == 0 or step == steps:
                    curve.steps.append(step)
                    curve.test_accuracy.append(accuracy(model, *test))
                    if trace_clusters:
                        trace.add(step, loader)
                if step >= steps:
                    break
            else:
                curve.epochs += 1
    finally:
        loader.close()
    curve.wall_seconds = time.perf_counter() - started
    return curve, served, trace
