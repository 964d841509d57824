"""What every curation benchmark pool shares: the in-process service, the reference model, data
helpers, compute accounting and small summary helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time

import numpy as np
import torch
from torch import nn

from actors.pipeline import Pipeline
from loader.client import RemoteLoader
from loader.config import from_mapping
from loader.gateway.server import BackgroundGateway
from loader.models import accuracy
from loader.reference import train_reference
from loader.scoring import ModelSpec, build_model
from loader.sources import read_shard
from loader.tensors import to_numpy
from loader.training import Curve

LABEL_NOISE = 0.3
# The issue allows a clean holdout of at most this share of the pool.
MAX_HOLDOUT_SHARE = 0.2
# A second, easier level: how much sooner a run gets close to uniform's best.
PARTIAL_TARGET = 0.95

@dataclasses.dataclass(frozen=True)
class Run:
    """One arm of the comparison: a policy, where its learner losses come from, its options."""

    label: str
    policy: str
    learner_loss: str | None
    options: dict


# -- compute accounting ---------------------------------------------------------------------------


def forward_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """Multiply-adds of Linear and Conv1d layers for one sample, times 2.

    Counted per layer because 2 x parameters undercounts a convolution, whose weights are applied
    at every position; activations, pooling and biases are left out (a few percent at most).
    """
    macs = 0

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features
        elif isinstance(module, nn.Conv1d):
            kernel = module.in_channels // module.groups * module.kernel_size[0]
            macs += output.shape[1] * output.shape[2] * kernel

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
    try:
        with torch.inference_mode():
            model.eval()(sample[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return 2 * macs


# -- data -----------------------------------------------------------------------------------------


def load_split(paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for path in paths:
        table = read_shard(path)
        # Copies: Arrow's buffers are read-only and the test set outlives the tables.
        xs.append(torch.from_numpy(to_numpy(table.column("x")).astype(np.float32)))
        ys.append(torch.from_numpy(to_numpy(table.column("y")).astype(np.int64)))
    return torch.cat(xs), torch.cat(ys)


def rows(paths: list[str]) -> int:
    return sum(read_shard(p).num_rows for p in paths)


def reference_model(s, holdout: list[str], out_dir: str, test) -> tuple[dict, str, nn.Module]:
    """Trains the reference on the clean holdout: (metrics, weights path, the loaded model)."""
    weights = os.path.join(out_dir, "reference.pt")
    spec = ModelSpec(f"loader.models:{s.reference_model}")
    metrics = train_reference(spec, holdout, weights, epochs=s.reference_epochs, progress=False)
    model = build_model(dataclasses.replace(spec, weights=weights))
    metrics["test_accuracy"] = accuracy(model, *test)
    print(
        f"reference {s.reference_model}: holdout accuracy {metrics['holdout_accuracy']:.3f}, test accuracy "
        f"{metrics['test_accuracy']:.3f}, trained in {metrics['seconds']:.1f} s",
        flush=True,
    )
    return metrics, weights, model


# -- the service ----------------------------------------------------------------------------------


def job_stats(address: str, job: str):
    with RemoteLoader(address, job=job, batch_size=1) as client:
        stats = client.stats()
    return stats, next(j for j in stats.jobs if j.job == job)


@contextlib.contextmanager
def service(shards: list[str], s, reference_weights: str | None = None):
    """One Pipeline + gateway in this process, on the already running local Ray; yields the
    address and the pipeline."""
    values = {
        "shards": shards,
        "address": "127.0.0.1:0",
        "num_cpus": 2,
        "shuffle_rows": s.shuffle_rows,
        "ready_batches": s.ready_batches,
        "prefetch_shards": s.prefetch_shards,
        "select_ahead": s.select_ahead,
        "log_level": "WARNING",
    }
    if reference_weights:
        values["reference"] = {"factory": f"loader.models:{s.reference_model}", "weights": reference_weights}
    config = from_mapping(values)
    t0 = time.perf_counter()
    pipeline = Pipeline(config)
    gateway = BackgroundGateway(pipeline, config)
    try:
        address = gateway.start()
        print(f"service on {address}, started in {time.perf_counter() - t0:.1f} s", flush=True)
        yield address, pipeline
    finally:
        gateway.stop()
        pipeline.shutdown()


# -- summary --------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curve(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps = np.asarray(curves[0].steps)
    acc = np.asarray([c.test_accuracy for c in curves])
    return steps, acc.mean(0), acc.std(0)


def fmt_sci(x: float) -> str:
    return f"{x:.2e}" if x else "0"


def curve_record(curve: Curve) -> dict:
    return {"steps": curve.steps, "test_accuracy": curve.test_accuracy}
