"""Small helpers shared by integration tests."""

from __future__ import annotations

import io
import tarfile
import threading

import numpy as np

from loader import RemoteLoader
from loader.sources import read_shard


# What tests give RemoteLoader as `timeout_s`: its default (300 s) equals pytest's own limit, so a
# hang would end without the loader's error.
LOADER_TIMEOUT_S = 60


def raw_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    """A tar of exactly these members, in this order: for shards no writer of ours would make."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def rows_in(paths) -> int:
    return sum(read_shard(p).num_rows for p in paths)


def epoch_ids(loader: RemoteLoader) -> list[np.ndarray]:
    """One epoch from `loader`, as the id arrays of its batches."""
    return [batch["_id"].numpy().copy() for batch in loader]


def in_rank_threads(world_size: int, rank_main, timeout_s: float = 120) -> list:
    """rank_main(rank) for every rank at once (threads, as DDP ranks run side by side); their
    results by rank. The first exception a rank raised is raised here."""
    results: list = [None] * world_size
    errors: list = []

    def run(rank: int) -> None:
        try:
            results[rank] = rank_main(rank)
        except Exception as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
        assert not t.is_alive(), f"a rank did not finish within {timeout_s:g} s"
    if errors:
        raise errors[0]
    return results


def run_ranks(address: str, job: str, world_size: int, batch_size: int, **kwargs) -> list[list[np.ndarray]]:
    """One epoch on every rank at once."""
    # A stalled stream fails with the loader's own error well before the join gives up.
    kwargs.setdefault("timeout_s", LOADER_TIMEOUT_S)

    def rank_main(rank: int) -> list[np.ndarray]:
        with RemoteLoader(address, job=job, batch_size=batch_size, rank=rank, world_size=world_size, **kwargs) as loader:
            return epoch_ids(loader)

    return in_rank_threads(world_size, rank_main)


def blobs(rng: np.random.Generator, centroids: np.ndarray, rows: int) -> dict[str, np.ndarray]:
    """Gaussian clusters, one per class: easy enough that a small reference model is right on
    nearly every clean sample, so label noise shows up plainly in its loss."""
    y = rng.integers(0, len(centroids), size=rows)
    x = (centroids[y] + rng.normal(size=(rows, centroids.shape[1]))).astype(np.float32)
    return {"x": x, "y": y.astype(np.int64)}


def blob_pool(root, seed: int, shards: int, reference_epochs: int, rows: int = 128) -> tuple[list[str], str]:
    """Parquet shards of Gaussian blobs and an MLP reference trained on a clean holdout of the
    same distribution: (shard paths, reference weights path)."""
    from loader.reference import train_reference
    from loader.scoring import ModelSpec
    from loader.sources.writers import write_parquet

    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(10, 40)).astype(np.float32) * 2
    paths = []
    for i in range(shards):
        paths.append(str(root / f"train-{i:06d}.parquet"))
        write_parquet(paths[-1], blobs(rng, centroids, rows))
    holdout = str(root / "holdout.parquet")
    write_parquet(holdout, blobs(rng, centroids, 256))
    weights = str(root / "ref.pt")
    train_reference(ModelSpec("loader.models:mlp"), [holdout], weights, epochs=reference_epochs, progress=False)
    return paths, weights
