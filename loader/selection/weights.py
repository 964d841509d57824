"""Importance weights that let a trainer undo the bias of a stochastic selection."""

from __future__ import annotations

import numpy as np

__all__ = ["importance_weights"]


def importance_weights(probs: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """w_i = 1 / (n * p_i) for the chosen candidates, normalised to mean 1 (float32, > 0, finite).

    When a trainer should multiply its per-sample loss by the served `_weight`:

    - After a stochastic selector (`softmax`, `power`, `rank`): candidate i was drawn with
      probability p_i instead of 1/n, so the plain mean loss over-counts what was likely to be
      drawn. Multiplying each loss by w_i makes the batch gradient an (approximately) unbiased
      estimate of the gradient over all n candidates, which is what uniform sampling would have
      estimated. Approximate, because k are drawn without replacement and 1/(n p_i) is the
      with-replacement correction; for k much smaller than n the two agree. Normalising to mean 1
      keeps the loss scale, and so the learning rate, unchanged.
    - After `topk` or `uniform` every weight is 1, so multiplying is harmless and changes nothing.
      Top-k has no sampling distribution to correct for: its bias is the point of curating.
    - After InfoBatch pruning (policy `loss`) the weight is InfoBatch's rescale, 1/(1 - r) for
      kept low-loss samples, which keeps the expected gradient of the low-loss group as if none
      had been pruned.

    A trainer that wants the curated batch to steer training harder (as RHO-LOSS and JEST do) may
    ignore the weight; it matters when the trainer wants the full-data objective, only faster.

    Candidates chosen with p_i == 0 (possible only when k exceeds the number of candidates with
    positive probability) are weighed as if they had the smallest positive probability, so that
    no weight is infinite.
    """
    p = np.asarray(probs, dtype=np.float64)
    idx = np.asarray(indices)
    if p.ndim != 1 or idx.ndim != 1:
        raise ValueError(f"probs and indices must be one-dimensional, got shapes {p.shape} and {idx.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    if len(idx) == 0:
        return np.zeros(0, dtype=np.float32)
    if not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= len(p):
        raise ValueError(f"indices must be integers in [0, {len(p)})")
    positive = p[p > 0]
    if len(positive) == 0:
        return np.ones(len(idx), dtype=np.float32)
    chosen = np.maximum(p[idx], positive.min())
    # In log space and relative to the largest weight: 1 / (n * p) overflows for tiny p, and the
    # constant 1/n cancels in the normalisation anyway.
    log_w = -np.log(chosen)
    w = np.exp(log_w - log_w.max())
    w /= w.mean()
    # Weights that far below the others underflow in float32; a trainer must never see 0.
    return np.maximum(w, np.finfo(np.float32).tiny).astype(np.float32)
