"""`loader demo`: the whole story on one machine.

Writes MNIST-1D shards with 30% of the training labels corrupted, trains a reference model on
the clean holdout, starts `loader serve` on a local Ray in a child process (as a deployment would
run it), then trains the same MLP twice through RemoteLoader for the same number of steps: once
on uniform batches, once on curated ones (learnability: learner loss minus reference loss), and
prints both test accuracies and the speed-up.
"""

from __future__ import annotations

import glob
import os
import queue
import subprocess
import sys
import threading
import time

import torch
import yaml

from loader.models import mlp
from loader.reference import train_reference
from loader.scoring import ModelSpec
from loader.sources import read_shard
from loader.tensors import to_numpy
from loader.training import Curve, train

START_TIMEOUT_S = 120.0
LABEL_NOISE = 0.3
REFERENCE = "loader.models:cnn1d"


def load_split(paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for path in paths:
        table = read_shard(path)
        xs.append(torch.from_numpy(to_numpy(table.column("x")).copy()))
        ys.append(torch.from_numpy(to_numpy(table.column("y")).copy()))
    return torch.cat(xs), torch.cat(ys)


class ServiceProcess:
    """`loader serve` in a child process; `address` is what it printed as `listening on`."""

    def __init__(self, args: list[str], log_path: str) -> None:
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loader", "serve", *args],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout] + [lines.put(None)],
                         daemon=True).start()  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise TimeoutError(f"loader serve did not start within {START_TIMEOUT_S:g} s; see {log_path}")
            if line is None:
                raise RuntimeError(f"loader serve exited with {self.proc.wait()}; see {log_path}")
            if line.startswith("listening on "):
                self.address = line.split()[-1]
                return

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _shards(data_dir: str) -> None:
    if not glob.glob(os.path.join(data_dir, "train-*.tar")):
        subprocess.run(
            [sys.executable, "-m", "loader", "make-shards", "mnist1d", "--out", data_dir,
             "--label-noise", str(LABEL_NOISE)],
            check=True,
        )  # fmt: skip


def _reference(data_dir: str) -> str:
    weights = os.path.join(data_dir, "reference.pt")
    if not os.path.exists(weights):
        holdout = sorted(glob.glob(os.path.join(data_dir, "holdout-*.tar")))
        metrics = train_reference(ModelSpec(REFERENCE), holdout, weights, epochs=60)
        print(f"reference {REFERENCE} on {metrics['samples']} clean holdout samples: "
              f"accuracy {metrics['holdout_accuracy']:.3f} ({metrics['seconds']:.1f} s)")  # fmt: skip
    return weights


def run(data_dir: str = "data/mnist1d", steps: int = 1000, batch_size: int = 64, keep_ratio: float = 0.2) -> int:
    started = time.monotonic()
    _shards(data_dir)
    weights = _reference(data_dir)
    test = load_split(sorted(glob.glob(os.path.join(data_dir, "test-*.tar"))))
    config = os.path.join(data_dir, "service.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"shards": os.path.join(data_dir, "train-*.tar"), "address": "127.0.0.1:0",
                        "shuffle_rows": 4096, "reference": {"factory": REFERENCE, "weights": weights}}, f)  # fmt: skip

    print("starting loader serve on a local Ray ...", flush=True)
    service = ServiceProcess(["--config", config], log_path=os.path.join(data_dir, "serve.log"))
    try:
        print(f"service listening on {service.address}", flush=True)
        common = dict(make_model=mlp, test=test, steps=steps, batch_size=batch_size, eval_every=50)
        tag = os.getpid()
        uniform = train(service.address, f"demo-uniform-{tag}", **common)
        print(_summary("uniform", uniform), flush=True)
        curated = train(service.address, f"demo-learnability-{tag}", policy="learnability",
                        options={"keep_ratio": keep_ratio}, **common)  # fmt: skip
        print(_summary(f"learnability (keep {keep_ratio:g})", curated), flush=True)
    finally:
        service.stop()

    target = uniform.best
    reached = curated.steps_to(target)
    uniform_steps = uniform.steps_to(target)
    if reached is None:
        verdict = f"curated never reached uniform's best ({target:.3f}) within {steps} steps"
    else:
        verdict = f"curated reached uniform's best ({target:.3f}) in {reached} steps vs {uniform_steps}: " \
                  f"{uniform_steps / reached:.1f}x fewer steps"  # fmt: skip
    print(f"\ntest accuracy after {steps} steps: uniform {uniform.final:.4f}, curated {curated.final:.4f}")
    print(verdict)
    print(f"demo wall time {time.monotonic() - started:.1f} s")
    return 0


def _summary(name: str, curve: Curve) -> str:
    return (f"{name:>24}: final test accuracy {curve.final:.4f}, best {curve.best:.4f}, "
            f"{curve.epochs} full epochs, trainer {curve.trainer_seconds:.1f} s, wall {curve.wall_seconds:.1f} s")  # fmt: skip
