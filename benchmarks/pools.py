"""The redundant, imbalanced pool of the curation benchmark (`--pool mixed`).

Built from the clean MNIST-1D train split, at the same size as the plain pool, so that the clean
holdout (the reference's data) and the test split stay exactly those of the plain pool:

- `duplicates` of the pool (half by default) are near-copies of `bases` samples (a few hundred):
  each copy is its base plus Gaussian jitter and keeps its base's label, as a scraped duplicate
  keeps its caption;
- `noise_inputs` of it (a tenth) are pure noise: Gaussian inputs with the real inputs' mean and
  spread per position, and uniformly random labels;
- the rest are distinct samples.

Bases and distinct samples have their labels corrupted at `label_noise` (a base's copies inherit
its label, corrupted or not), so the real-input part carries the same 30% noise as the plain pool.
Every row carries its flags as extra columns, which the service streams like any other column:
`duplicate` (1 for every copy but the first of its base), `noise_input`, `noisy` (label
corrupted; 0 for noise inputs, whose labels are random by construction) and `group` (the base a
copy belongs to, -1 otherwise). Rows are shuffled before sharding, so every shard mixes all kinds.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from loader.sources import read_shard
from loader.sources.writers import write_parquet
from loader.tensors import to_numpy

NUM_CLASSES = 10
FLAGS = ("duplicate", "noise_input", "noisy", "group")


@dataclasses.dataclass
class MixedPool:
    paths: list[str]
    # Per shard path: flag name -> int64 per row, in row order.
    flags: dict[str, dict[str, np.ndarray]]

    def composition(self) -> dict[str, int]:
        merged = {name: np.concatenate([f[name] for f in self.flags.values()]) for name in FLAGS}
        copies = merged["group"] >= 0
        return {
            "rows": len(merged["group"]),
            "duplicate_groups": int(len(np.unique(merged["group"][copies]))),
            "rows_in_duplicate_groups": int(copies.sum()),
            "duplicates": int(merged["duplicate"].sum()),
            "noise_inputs": int(merged["noise_input"].sum()),
            "distinct": int((~copies & (merged["noise_input"] == 0)).sum()),
            "labels_corrupted": int(merged["noisy"].sum()),
        }


def corrupt(labels: np.ndarray, p: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels with a fraction p moved to another class, uniformly among the other nine."""
    flip = rng.random(len(labels)) < p
    shifted = (labels + rng.integers(1, NUM_CLASSES, size=len(labels))) % NUM_CLASSES
    return np.where(flip, shifted, labels).astype(np.int64), flip.astype(np.int64)


def make_mixed_pool(
    out_dir: str,
    clean_train: list[str],
    shards: int,
    *,
    label_noise: float,
    duplicates: float = 0.5,
    bases: int = 320,
    jitter: float = 0.1,
    noise_inputs: float = 0.1,
    seed: int = 0,
) -> MixedPool:
    """Writes the mixed pool as `shards` Parquet files from the clean train shards' rows."""
    xs, ys = [], []
    for path in clean_train:
        table = read_shard(path)
        xs.append(to_numpy(table.column("x")).astype(np.float32))
        ys.append(to_numpy(table.column("y")).astype(np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    n = len(x)
    n_copies, n_noise = round(duplicates * n), round(noise_inputs * n)
    n_distinct = n - n_copies - n_noise
    if not 0 < bases <= n_copies or n_distinct < 0 or bases + n_distinct > n:
        raise SystemExit(f"a pool of {n} cannot hold {n_copies} copies of {bases} bases and {n_noise} noise inputs")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    base_rows, distinct_rows = order[:bases], order[bases : bases + n_distinct]

    # Labels are corrupted before copying, so that copies of a corrupted base agree with it.
    base_y, base_flip = corrupt(y[base_rows], label_noise, rng)
    distinct_y, distinct_flip = corrupt(y[distinct_rows], label_noise, rng)
    group = np.arange(n_copies) % bases  # every base gets n_copies // bases copies, a few one more
    spread = x.std(axis=0)
    copies_x = x[base_rows][group] + rng.normal(size=(n_copies, x.shape[1])).astype(np.float32) * jitter * spread
    noise_x = (x.mean(axis=0) + rng.normal(size=(n_noise, x.shape[1])) * spread).astype(np.float32)

    first = np.zeros(n_copies, bool)
    first[np.unique(group, return_index=True)[1]] = True
    columns = {
        "x": np.concatenate([copies_x, noise_x, x[distinct_rows]]),
        "y": np.concatenate([base_y[group], rng.integers(0, NUM_CLASSES, n_noise), distinct_y]),
        "duplicate": np.concatenate([~first, np.zeros(n_noise + n_distinct, bool)]).astype(np.int64),
        "noise_input": np.repeat(np.array([0, 1, 0], np.int64), [n_copies, n_noise, n_distinct]),
        "noisy": np.concatenate([base_flip[group], np.zeros(n_noise, np.int64), distinct_flip]),
        "group": np.concatenate([group, np.full(n_noise + n_distinct, -1)]).astype(np.int64),
    }
    shuffled = rng.permutation(n)
    os.makedirs(out_dir, exist_ok=True)
    pool = MixedPool([], {})
    for index, part in enumerate(np.array_split(shuffled, shards)):
        path = os.path.join(out_dir, f"train-{index:06d}.parquet")
        write_parquet(path, {name: values[part] for name, values in columns.items()})
        pool.paths.append(path)
        pool.flags[path] = {name: columns[name][part] for name in FLAGS}
    return pool
