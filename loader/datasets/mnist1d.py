"""MNIST-1D as train / holdout / test shards, with optional seeded label noise.

The holdout split keeps clean labels so that a curation policy can be scored against
ground truth; `noisy` marks the corrupted train rows for the same reason.
"""

from __future__ import annotations

import os
import random

import numpy as np
from tqdm import tqdm

from loader.errors import ConfigError
from loader.sources.writers import write_parquet, write_tar

NUM_CLASSES = 10
_FORMATS = ("tar", "parquet")


def _generate(samples: int, seed: int) -> dict[str, np.ndarray]:
    # Imported here: mnist1d pulls in scipy (about a second), which most users of
    # loader.datasets never need.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = samples
    args.seed = seed
    # make_dataset reseeds the global numpy and `random` generators; put them back so
    # that building shards does not change the caller's random streams.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        return make_dataset(args)  # never get_dataset: it downloads and writes a pickle
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _corrupt(labels: np.ndarray, p: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    flip = rng.random(len(labels)) < p
    # A shift of 1..9 classes always lands on a different class, uniformly among them.
    shifted = (labels + rng.integers(1, NUM_CLASSES, size=len(labels))) % NUM_CLASSES
    return np.where(flip, shifted, labels).astype(np.int64), flip.astype(np.int64)


def _check(shards: int, label_noise: float, fmt: str, samples: int, holdout_fraction: float) -> None:
    if shards < 1:
        raise ConfigError("shards", f"must be at least 1, got {shards}")
    if not 0.0 <= label_noise <= 1.0:
        raise ConfigError("label_noise", f"must be in [0, 1], got {label_noise}")
    if fmt not in _FORMATS:
        raise ConfigError("fmt", f"must be 'tar' or 'parquet', got {fmt!r}")
    if samples < 1:
        raise ConfigError("samples", f"must be at least 1, got {samples}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError("holdout_fraction", f"must be in [0, 1), got {holdout_fraction}")


def make_shards(
    out_dir: str,
    shards: int = 10,
    label_noise: float = 0.0,
    fmt: str = "tar",
    seed: int = 0,
    samples: int = 5000,
    holdout_fraction: float = 0.2,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Write MNIST-1D shards into `out_dir`; returns split name -> shard paths in order."""
    _check(shards, label_noise, fmt, samples, holdout_fraction)
    data = _generate(samples, seed)
    x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int64)
    n_holdout = int(round(len(x) * holdout_fraction))
    n_train = len(x) - n_holdout
    train_y, train_noisy = _corrupt(y[:n_train], label_noise, np.random.default_rng(seed))
    x_test, y_test = np.asarray(data["x_test"], np.float32), np.asarray(data["y_test"], np.int64)

    splits = {
        "train": (x[:n_train], train_y, train_noisy, shards),
        "holdout": (x[n_train:], y[n_train:], np.zeros(n_holdout, np.int64), max(1, shards // 5)),
        "test": (x_test, y_test, np.zeros(len(x_test), np.int64), max(1, shards // 5)),
    }
    for split, (xs, _, _, files) in splits.items():
        if len(xs) < files:
            raise ConfigError("samples", f"{samples} samples give {split} only {len(xs)} rows for {files} shards")

    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, list[str]] = {split: [] for split in splits}
    total = sum(files for *_, files in splits.values())
    with tqdm(total=total, desc="mnist1d shards", unit="file", disable=not progress) as bar:
        for split, (xs, ys, noisy, files) in splits.items():
            for index, rows in enumerate(np.array_split(np.arange(len(xs)), files)):
                path = os.path.join(out_dir, f"{split}-{index:06d}.{fmt}")
                _write(path, fmt, xs[rows], ys[rows], noisy[rows])
                written[split].append(path)
                bar.update(1)
    return written


def _write(path: str, fmt: str, x: np.ndarray, y: np.ndarray, noisy: np.ndarray) -> None:
    if fmt == "parquet":
        write_parquet(path, {"x": x, "y": y, "noisy": noisy})
    else:
        write_tar(path, ({"x": x[i], "y": int(y[i]), "noisy": int(noisy[i])} for i in range(len(x))))
