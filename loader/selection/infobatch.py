"""InfoBatch's soft pruning: skip some of the samples the model already fits well, rescale the rest.

Samples below the mean loss contribute little gradient; dropping a random fraction r of them saves
compute, and scaling the survivors' loss by 1/(1 - r) keeps the expected gradient of that group
unchanged. Random rather than deterministic dropping keeps every sample reachable in later epochs.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["prune"]


def prune(losses: npt.ArrayLike, prune_ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Returns (keep, weights), both [n].

    keep: False for the below-mean samples that were dropped (each with probability prune_ratio).
    weights (float32): 1 / (1 - prune_ratio) for kept below-mean samples, 1 for everything else,
    dropped ones included: a dropped sample served anyway (to fill a batch) is not rescaled.
    """
    loss = np.asarray(losses, dtype=np.float64)
    if loss.ndim != 1:
        raise ValueError(f"losses must be one-dimensional, got shape {loss.shape}")
    if not np.isfinite(loss).all():
        raise ValueError("losses must be finite; fill missing ones before pruning")
    if not 0 <= prune_ratio < 1:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}")
    if len(loss) == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float32)
    below = loss < loss.mean()
    dropped = below & (rng.random(len(loss)) < prune_ratio)
    weights = np.where(below & ~dropped, 1.0 / (1.0 - prune_ratio), 1.0).astype(np.float32)
    return ~dropped, weights
