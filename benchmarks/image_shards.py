"""Synthetic image shards: WebDataset tars of uint8 3x224x224 arrays (`x`, .npy) and labels (`y`, .cls).

Random pixels: delivery cost does not depend on content, and random bytes defeat any compression
a transport might apply.
"""

from __future__ import annotations

import os

import numpy as np

from loader.sources.writers import write_tar

SHAPE = (3, 224, 224)
CLASSES = 10


def write_image_shards(out_dir: str, shards: int, per_shard: int, seed: int = 0) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(shards):
        images = rng.integers(0, 256, size=(per_shard, *SHAPE), dtype=np.uint8)
        labels = rng.integers(0, CLASSES, size=per_shard)
        path = os.path.join(out_dir, f"images-{index:06d}.tar")
        write_tar(path, ({"x": images[i], "y": int(labels[i])} for i in range(per_shard)))
        paths.append(path)
    return paths
