"""Local baselines over the same tar shards: a torch DataLoader with 2 workers, Ray Data, and the
`webdataset` package's own pipeline in a 2-worker DataLoader.

The first two decode shards with the service's own reader (`loader.sources.read_tar`), so they
pay the same decoding cost per shard as the service; they differ in how rows travel to the
trainer. The webdataset baseline is what its users run: its own tar iterator and decoders.
Shuffling matches what a user would write: shard order per epoch, rows within each shard.
"""

from __future__ import annotations

import time
import warnings
import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from loader import codec
from loader.sources import read_tar


def shard_order(count: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def shard_columns(path: str) -> dict[str, np.ndarray]:
    """A shard's numeric columns as numpy arrays (read-only views of the decoded Arrow table)."""
    return {k: v for k, v in codec.to_numpy(read_tar(path)).items() if isinstance(v, np.ndarray)}


class TarShards(IterableDataset):
    """Yields one sample at a time (DataLoader batches and collates them), or, with
    `batch_size`, whole batches already stacked in the worker (use DataLoader(batch_size=None)).

    Shards are split across workers by position in the epoch's shuffled order. The epoch counter
    lives in each worker's copy of the dataset, which persistent workers keep between epochs.
    """

    def __init__(self, paths: list[str], seed: int = 0, batch_size: int | None = None) -> None:
        self.paths, self.seed, self.batch_size = list(paths), seed, batch_size
        self.epoch = -1

    def __iter__(self):
        self.epoch += 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = shard_order(len(self.paths), self.seed, self.epoch)
        rng = np.random.default_rng([self.seed, self.epoch, worker])
        with warnings.catch_warnings():
            # Rows are views of Arrow's read-only buffers; collate copies them into the batch.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for index in order[worker::workers]:
                columns = shard_columns(self.paths[index])
                rows = rng.permutation(len(next(iter(columns.values()))))
                if self.batch_size is None:
                    for r in rows:
                        yield {name: values[r] for name, values in columns.items()}
                else:
                    for start in range(0, len(rows), self.batch_size):
                        take = rows[start : start + self.batch_size]
                        yield {name: torch.from_numpy(values[take]) for name, values in columns.items()}


def torch_loader(paths: list[str], batch_size: int, workers: int = 2, in_worker_batches: bool = False) -> DataLoader:
    if in_worker_batches:
        return DataLoader(TarShards(paths, batch_size=batch_size), batch_size=None, num_workers=workers,
                          persistent_workers=workers > 0)  # fmt: skip
    return DataLoader(TarShards(paths), batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0)


def webdataset_loader(paths: list[str], batch_size: int, workers: int = 2, shuffle: int = 1000) -> DataLoader:
    """`webdataset.WebDataset` as its documentation shows it: shards shuffled and split across the
    DataLoader's workers, a sample shuffle buffer, the default decoders, batches built in the
    workers (`batched`), DataLoader(batch_size=None). Yields (x, y) tuples of batches."""
    import webdataset as wds

    dataset = (
        wds.WebDataset(paths, shardshuffle=len(paths), empty_check=False)
        .shuffle(shuffle)
        .decode()
        .to_tuple("x.npy", "y.cls")
        .batched(batch_size)
    )
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def ray_data_epoch(paths: list[str], batch_size: int, seed: int, epoch: int):
    """One epoch as a Ray Data pipeline: a read task per shard (the service's decoder), then
    `iter_torch_batches`. Ray Data cannot read these shards itself without more packages
    (`read_webdataset` wants `webdataset`), so the read is a map over the shard paths."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one progress report per epoch otherwise
    ray.data.DataContext.get_current().enable_progress_bars = False

    def read(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [shard_columns(str(path)) for path in batch["path"]]
        rng = np.random.default_rng([seed, epoch, zlib.crc32(str(batch["path"][0]).encode())])
        out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        rows = rng.permutation(len(next(iter(out.values()))))
        return {name: values[rows] for name, values in out.items()}

    order = shard_order(len(paths), seed, epoch)
    items = [{"path": paths[i]} for i in order]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(read, batch_size=1)
    return dataset.iter_torch_batches(batch_size=batch_size)


def time_epochs(batches_of_epoch, epochs: int) -> list[dict]:
    """Runs `batches_of_epoch(epoch)` for each epoch, counting samples (length of the first
    column) and timing from the epoch's start to its last batch (wall time, and the CPU time of
    this process, all its threads)."""
    out = []
    for epoch in range(epochs):
        started, cpu = time.perf_counter(), time.process_time()
        first = None
        samples = batches = 0
        for batch in batches_of_epoch(epoch):
            if first is None:
                first = time.perf_counter() - started
            samples += len(next(iter(batch.values())))
            batches += 1
        out.append({"epoch": epoch, "samples": samples, "batches": batches, "seconds": time.perf_counter() - started,
                    "cpu_seconds": time.process_time() - cpu, "first_batch_s": first})  # fmt: skip
    return out
