"""`loader demo`: the whole story on one machine.

Writes MNIST-1D shards, starts `loader serve` on a local Ray in a child process (as a real
deployment would run it), trains a small MLP through RemoteLoader and reports test accuracy.
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
import torch.nn.functional as F
from tqdm import tqdm

from loader import RemoteLoader
from loader.models import accuracy, mlp
from loader.sources import read_shard
from loader.tensors import to_numpy

START_TIMEOUT_S = 120.0


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


def run(data_dir: str = "data/mnist1d", epochs: int = 40, batch_size: int = 128) -> int:
    started = time.monotonic()
    if not glob.glob(os.path.join(data_dir, "train-*.tar")):
        subprocess.run([sys.executable, "-m", "loader", "make-shards", "mnist1d", "--out", data_dir], check=True)
    x_test, y_test = load_split(sorted(glob.glob(os.path.join(data_dir, "test-*.tar"))))

    print("starting loader serve on a local Ray ...", flush=True)
    service = ServiceProcess(
        ["--shards", os.path.join(data_dir, "train-*.tar"), "--address", "127.0.0.1:0"],
        log_path=os.path.join(data_dir, "serve.log"),
    )
    try:
        print(f"service listening on {service.address}", flush=True)
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = RemoteLoader(service.address, job=f"demo-{os.getpid()}", batch_size=batch_size)
        bar = tqdm(range(epochs), desc="training", unit="epoch")
        for _ in bar:
            for batch in loader:
                losses = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
                (losses * batch["_weight"]).mean().backward()
                opt.step()
                opt.zero_grad()
                loader.report(batch, losses)
            bar.set_postfix(test_acc=f"{accuracy(model, x_test, y_test):.3f}")
        loader.close()
    finally:
        service.stop()
    acc = accuracy(model, x_test, y_test)
    print(f"test accuracy: {acc:.4f} after {epochs} epochs (wall time {time.monotonic() - started:.1f} s)")
    return 0
