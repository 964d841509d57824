"""The trainer side of the throughput benchmark, in its own process (as a trainer would be).

    python benchmarks/throughput_consumer.py '{"mode": "remote", ...}'

Modes: `bare` (the bare-gRPC client), `remote` (RemoteLoader epochs), `torch` (DataLoader
epochs), `webdataset` (webdataset.WebDataset in a DataLoader), `train` (trainer steps on one of those sources, or on batches held in memory).
Prints one JSON line with the figures.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import bare_grpc
from baselines import time_epochs, torch_loader, webdataset_loader
from loader import RemoteLoader
from train_steps import endless, train


def remote_loader(spec: dict) -> RemoteLoader:
    loader = RemoteLoader(spec["address"], job=spec["job"], batch_size=spec["batch_size"], policy=spec["policy"],
                          options=spec.get("options") or {}, prefetch=spec.get("prefetch", 4), timeout_s=300,
                          rank=spec.get("rank", 0), world_size=spec.get("world_size", 1))  # fmt: skip
    if spec.get("first_epoch"):  # go on with a job another consumer started (profiling runs)
        loader.load_state_dict({**loader.state_dict(), "epoch": spec["first_epoch"], "seq": 0})
    return loader


def feedback(loader: RemoteLoader, rng: np.random.Generator):
    """Per-sample losses for curated jobs: the policy selects on them. Random here, since only
    delivery is measured; the train mode reports the model's real losses."""

    def report(batch: dict) -> None:
        loader.report(batch, rng.random(len(batch["_id"]), dtype=np.float32))

    return report


def remote_epochs(spec: dict) -> list[dict]:
    loader = remote_loader(spec)
    report = feedback(loader, np.random.default_rng(0)) if spec.get("report") else None

    def epoch(_):
        for batch in loader:
            if report is not None:
                report(batch)
            yield batch

    try:
        return time_epochs(epoch, spec["epochs"])
    finally:
        loader.close()


def torch_epochs(spec: dict) -> list[dict]:
    loader = torch_loader(spec["paths"], spec["batch_size"], spec.get("workers", 2), spec.get("in_worker_batches", False))
    it = lambda _: iter(loader)  # noqa: E731  (each iter() is the next epoch of the persistent workers)
    return time_epochs(it, spec["epochs"])


def webdataset_epochs(spec: dict) -> list[dict]:
    loader = webdataset_loader(spec["paths"], spec["batch_size"], spec.get("workers", 2), spec.get("shuffle", 1000))
    it = lambda _: ({"x": x, "y": y} for x, y in loader)  # noqa: E731
    return time_epochs(it, spec["epochs"])


def in_memory(spec: dict):
    """The trainer's ceiling: the same batches already decoded, no loader at all."""
    from baselines import shard_columns

    columns = shard_columns(spec["paths"][0])
    b = spec["batch_size"]
    batch = {name: torch.from_numpy(np.array(values[:b])) for name, values in columns.items()}
    while True:
        yield batch


def train_source(spec: dict) -> dict:
    # One intra-op thread: this machine has 2 cores shared with other jobs, and two OpenMP threads
    # that spin at every barrier made a step up to 20x slower whenever another process ran.
    torch.set_num_threads(1)
    source = spec["source"]
    report = None
    loader = None
    if source == "remote":
        loader = remote_loader(spec)
        batches = endless(lambda _: iter(loader))
        report = loader.report
    elif source == "torch":
        dataloader = torch_loader(spec["paths"], spec["batch_size"], spec.get("workers", 2))
        batches = endless(lambda _: iter(dataloader))
    else:
        batches = in_memory(spec)
    try:
        return train(spec["sample"], batches, spec["warmup"], spec["steps"], report=report)
    finally:
        if loader is not None:
            batches.close()  # ends the open epoch's stream before the channel closes
            loader.close()


def main(spec: dict) -> dict:
    mode = spec["mode"]
    if mode == "bare":
        return bare_grpc.consume(spec["address"], spec["count"])
    if mode == "remote":
        return {"epochs": remote_epochs(spec)}
    if mode == "torch":
        return {"epochs": torch_epochs(spec)}
    if mode == "webdataset":
        return {"epochs": webdataset_epochs(spec)}
    if mode == "train":
        return train_source(spec)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
