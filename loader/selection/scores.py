"""Per-sample scores (higher = more wanted to train on now)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["easy_reference", "fill_missing", "learnability"]


def learnability(learner_loss: npt.ArrayLike, ref_loss: npt.ArrayLike) -> np.ndarray:
    """Learner loss minus reference loss (RHO-LOSS's reducible loss, JEST's learnability).

    High when the learner has not learnt a sample that a model trained on clean holdout data finds
    easy: learnable and not yet learnt. Noisy or ambiguous samples have a high reference loss too,
    so unlike plain high-loss selection this does not chase label noise.
    """
    learner = _floats(learner_loss, "learner_loss")
    ref = _floats(ref_loss, "ref_loss")
    if learner.shape != ref.shape:
        raise ValueError(f"learner_loss and ref_loss differ in shape: {learner.shape} vs {ref.shape}")
    return learner - ref


def easy_reference(ref_loss: npt.ArrayLike) -> np.ndarray:
    """Minus the reference loss: prefer what a clean reference model finds easy (likely clean)."""
    return -_floats(ref_loss, "ref_loss")


def fill_missing(values: npt.ArrayLike, fallback: npt.ArrayLike) -> np.ndarray:
    """`values` with NaN replaced by `fallback` (a scalar or one per value).

    A NaN fallback (nothing known at all, e.g. before any feedback) becomes 0, so that scores stay
    comparable and selectors, which reject NaN, can run.
    """
    v = _floats(values, "values")
    fb = np.asarray(fallback, dtype=np.float64)
    if fb.ndim and fb.shape != v.shape:  # broadcasting would hide a fallback for other ids
        raise ValueError(f"fallback has shape {fb.shape}, values {v.shape}: expected a scalar or one per value")
    fb = np.where(np.isnan(fb), 0.0, fb)
    return np.where(np.isnan(v), fb, v)


def _floats(values: npt.ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a
