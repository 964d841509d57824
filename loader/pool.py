"""Columnar per-sample metadata of the pool: one small numpy block per shard, no Python objects.

Payloads stream through the service and are never kept here; only what selection needs.
"""

from __future__ import annotations

import numpy as np

from loader.ids import row_of, shard_of


class UnknownSamples(ValueError):
    pass


class PoolIndex:
    def __init__(self) -> None:
        # shard index -> learner loss per row (NaN: never reported)
        self._learner_loss: dict[int, np.ndarray] = {}
        self._reported: dict[int, np.ndarray] = {}
        self.feedback_samples = 0

    def ensure_shard(self, shard_index: int, rows: int) -> None:
        if shard_index not in self._learner_loss or len(self._learner_loss[shard_index]) != rows:
            self._learner_loss[shard_index] = np.full(rows, np.nan, dtype=np.float32)
            self._reported[shard_index] = np.zeros(rows, dtype=np.uint32)

    def __len__(self) -> int:
        return sum(len(v) for v in self._learner_loss.values())

    def check_ids(self, ids: np.ndarray) -> None:
        """Raises UnknownSamples naming the first id the pool does not hold."""
        shards, rows = shard_of(ids), row_of(ids)
        for shard in np.unique(shards):
            block = self._learner_loss.get(int(shard))
            in_shard = shards == shard
            if block is None or (rows[in_shard] >= len(block)).any():
                bad = ids[in_shard][0] if block is None else ids[in_shard][rows[in_shard] >= len(block)][0]
                raise UnknownSamples(f"sample id {int(bad)} is not in the pool")

    def record_losses(self, ids: np.ndarray, losses: np.ndarray) -> None:
        """Stores each sample's latest learner loss; validates everything before changing anything."""
        ids = np.asarray(ids, dtype=np.int64)
        losses = np.asarray(losses, dtype=np.float32)
        if ids.shape != losses.shape or ids.ndim != 1:
            raise ValueError(f"ids and losses must be 1-d of equal length, got {ids.shape} and {losses.shape}")
        if not np.isfinite(losses).all():
            raise ValueError("losses must be finite (got NaN or infinity)")
        self.check_ids(ids)
        shards, rows = shard_of(ids), row_of(ids)
        for shard in np.unique(shards):
            in_shard = shards == shard
            self._learner_loss[int(shard)][rows[in_shard]] = losses[in_shard]
            self._reported[int(shard)][rows[in_shard]] += 1
        self.feedback_samples += len(ids)

    def learner_loss(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(len(ids), np.nan, dtype=np.float32)
        shards, rows = shard_of(ids), row_of(ids)
        for shard in np.unique(shards):
            in_shard = shards == shard
            out[in_shard] = self._learner_loss[int(shard)][rows[in_shard]]
        return out
