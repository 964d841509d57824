"""A synthetic registered pool for the selection-cost benchmark, built through the real classes.

Reference losses are random; embeddings are noisy copies of `clusters` random directions, so that
the real OnlineClusters finds about that many clusters (uniformly random unit vectors would all be
nearly orthogonal and give it nothing to separate). Rows of every shard share one payload block
(784 float32 inputs and a label, MNIST-sized), so building a 10^7-sample pool costs memory for its
metadata and embeddings only, which is what the pool index holds in the service too.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa

from loader import codec
from loader.curator import Curator
from loader.ids import make_ids
from loader.registry import ShardRecord
from loader.selection.clusters import OnlineClusters
from loader.tensors import to_arrow

INPUT_FEATURES = 784
# Noise norm around a cluster direction: well inside the ~1.41 chord between two directions.
SPREAD = 0.35
# Shards whose ids OnlineClusters.assign computes (updating centroids as the curator does when
# a shard is first scored); later shards use predict, which is the same nearest-centroid rule
# without the centroid update, and keeps a 10^7-sample build to seconds.
ASSIGNED_SHARDS = 8


@dataclasses.dataclass
class PoolBuild:
    records: list[ShardRecord]
    seconds: float
    clusters_found: int
    clusters_used: int


def unit_directions(k: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((k, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shard_embeddings(rows: int, directions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float16 [rows, d] unit rows near a random choice of `directions` (float16: as the pool keeps them)."""
    dim = directions.shape[1]
    owner = rng.integers(0, len(directions), size=rows)
    x = directions[owner] + rng.standard_normal((rows, dim), dtype=np.float32) * (SPREAD / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def fill_pool(
    curator: Curator, samples: int, shard_rows: int, dim: int, clusters: int, seed: int, loss_scale: float = 1.0
) -> PoolBuild:
    """Registers `samples` rows in shards of `shard_rows` with the curator's pool index: reference
    losses, embeddings and cluster ids, as after every shard has been scored once. The curator's
    clusterer is replaced by one fitted here with `clusters` initial clusters (the job's own would
    start at 8 and open more only for far-away groups)."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    directions = unit_directions(clusters, dim, rng)
    clusterer = OnlineClusters(max_clusters=clusters, init_clusters=clusters, seed=seed)
    pool = curator.pool
    records = []
    for index in range((samples + shard_rows - 1) // shard_rows):
        rows = min(shard_rows, samples - index * shard_rows)
        embedding = shard_embeddings(rows, directions, rng)
        ref_loss = (loss_scale * rng.gamma(2.0, 0.5, size=rows)).astype(np.float32)
        pool.ensure_shard(index, rows)
        pool.set_scores(index, ref_loss, embedding)
        ids = clusterer.assign(embedding) if index < ASSIGNED_SHARDS else clusterer.predict(embedding)
        pool.set_clusters(index, ids)
        records.append(ShardRecord(index=index, uri=f"mem://shard-{index}", state="ready", rows=rows))
    curator.selector.clusters = clusterer
    sizes, _ = pool.cluster_sizes()
    return PoolBuild(records, time.perf_counter() - started, clusterer.num_clusters, int((sizes > 0).sum()))


class Payloads:
    """Shard tables as a reader delivers them (source columns, then `_id`); the input block is
    shared between shards, only the ids differ."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._blocks: dict[int, tuple[pa.Array, pa.Array]] = {}

    def table(self, shard_index: int, rows: int) -> pa.Table:
        if rows not in self._blocks:
            x = self._rng.standard_normal((rows, INPUT_FEATURES), dtype=np.float32)
            self._blocks[rows] = (to_arrow(x), pa.array(self._rng.integers(0, 10, size=rows)))
        x, y = self._blocks[rows]
        return pa.table({"x": x, "y": y, codec.ID: pa.array(make_ids(shard_index, rows))})


def payload_table(rows: int, rng: np.random.Generator, shard_index: int = 0) -> pa.Table:
    """One candidate table of `rows` rows with fresh inputs (the snapshot scorer's input)."""
    return Payloads(int(rng.integers(2**31))).table(shard_index, rows)


def index_bytes(curator: Curator) -> dict[str, int]:
    """Bytes of the pool index's numpy columns, embeddings listed apart, over the rows the pool
    holds: the columns' spare capacity (they grow by doubling) and the garbage rows a rewritten
    shard leaves until compaction are not counted. (PoolIndex has no accessor for its columns;
    reading them here keeps the benchmark from changing it.)"""
    pool = curator.pool
    columns = {"learner_loss": pool._loss, "ref_loss": pool._ref, "cluster": pool._cluster, "embedding": pool._emb}
    return {name: len(pool) * column[0].nbytes for name, column in columns.items()}
