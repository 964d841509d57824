"""Choosing k of n candidates from scores (higher = more wanted).

`topk` is deterministic. The stochastic selectors turn scores into a distribution p and draw k
distinct candidates from it with Gumbel-top-k: the k largest of log p + Gumbel noise are a draw
without replacement from p (Stochastic Batch Acquisition). Sampling instead of taking the top k
keeps some diversity in the batch and lets importance weights undo the bias it introduces.

Everything is computed in log space, so a very cold beta neither overflows nor collapses the
distribution to zeros. For `softmax` and `power` a score of -inf means "never, unless there is
nothing else" (p = 0) and +inf means "always first"; `rank` only sees the order, so to it they are
just the last and the first rank.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

__all__ = ["Selection", "Selector", "SELECTORS", "get_selector", "power", "rank", "softmax", "topk"]

# Where a finite score's log weight bottoms out. Overflowing to -inf would make an unlikely
# candidate impossible, and then it would rank with the -inf scores instead of above them; a
# quarter of the float range leaves room to normalise without overflowing again.
_LOG_FLOOR = -np.finfo(np.float64).max / 4
# In units of the score spread: keeps the lowest candidate's probability above zero without
# letting it matter much.
_POWER_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # int64 [k], distinct positions into the candidates, in drawing order
    probs: np.ndarray  # float64 [n], the distribution the choice was drawn from (sums to 1)


Selector = Callable[[np.ndarray, int, float, np.random.Generator], Selection]


def topk(scores: np.ndarray, k: int, beta: float, rng: np.random.Generator) -> Selection:
    """The k highest scores, highest first; ties go to the earlier candidate.

    `probs` is uniform: a deterministic choice is no sample from anything, and uniform probs make
    every importance weight 1, which is what an unweighted top-k batch should carry.
    """
    s = _check(scores, k, beta)
    # Stable sort on the negation keeps the tie rule simple and reproducible.
    order = np.argsort(-s, kind="stable")[:k]
    return Selection(order.astype(np.int64), _uniform(len(s)))


def softmax(scores: np.ndarray, k: int, beta: float, rng: np.random.Generator) -> Selection:
    """p ∝ exp(beta * s)."""
    s = _check(scores, k, beta)
    if beta == 0:
        return _draw(np.zeros(len(s)), k, rng)
    finite = np.isfinite(s)
    top = s[finite].max() if finite.any() else 0.0
    # Shifting before scaling: beta * s alone overflows to +inf for large scores or cold beta,
    # which would read as "always first".
    with np.errstate(over="ignore"):
        return _draw(np.where(finite, np.maximum((s - top) * beta, _LOG_FLOOR), s), k, rng)


def power(scores: np.ndarray, k: int, beta: float, rng: np.random.Generator) -> Selection:
    """p ∝ (s - min(s) + eps) ** beta, with s measured in units of its spread.

    Scores are shifted because power sampling is defined for positive scores and losses or
    learnability can be negative. Dividing by the spread makes p independent of the scale of the
    scores, so eps means the same everywhere. -inf scores are left out of the minimum and get
    p = 0.
    """
    s = _check(scores, k, beta)
    if beta == 0:
        return _draw(np.zeros(len(s)), k, rng)
    finite = np.isfinite(s)
    if not finite.any():
        # Only infinities: _draw already knows what +inf and -inf mean.
        return _draw(s, k, rng)
    # Halves, because hi - lo can overflow for scores near the float range.
    lo, hi = s[finite].min() / 2, s[finite].max() / 2
    spread = hi - lo if hi > lo else 1.0
    unit = np.where(finite, (s / 2 - lo) / spread, 0.0)
    logw = np.where(finite, np.maximum(beta * np.log(unit + _POWER_EPS), _LOG_FLOOR), s)
    return _draw(logw, k, rng)


def rank(scores: np.ndarray, k: int, beta: float, rng: np.random.Generator) -> Selection:
    """p ∝ rank ** -beta, rank 1 = highest score; tied scores share their average rank.

    Depends only on the order of the scores, so it is immune to outliers and to their scale.
    """
    s = _check(scores, k, beta)
    if beta == 0:
        return _draw(np.zeros(len(s)), k, rng)
    return _draw(np.maximum(-beta * np.log(_average_ranks(s)), _LOG_FLOOR), k, rng)


SELECTORS: dict[str, Selector] = {"topk": topk, "softmax": softmax, "power": power, "rank": rank}


def get_selector(name: str) -> Selector:
    try:
        return SELECTORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(sorted(SELECTORS))}") from None


def _check(scores: np.ndarray, k: int, beta: float) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        raise ValueError(f"scores must be floating point, got {s.dtype}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain NaN at positions {np.flatnonzero(np.isnan(s))[:8].tolist()}")
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 0 <= k <= len(s):
        raise ValueError(f"cannot choose k={k} of n={len(s)} candidates")
    if not (np.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be finite and >= 0, got {beta!r}")
    return s.astype(np.float64, copy=False)


def _uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n) if n else np.zeros(0)


def _log_normalise(logw: np.ndarray) -> np.ndarray:
    """log p from unnormalised log weights that may hold ±inf."""
    n = len(logw)
    if n == 0:
        return logw
    top = logw.max()
    if top == np.inf:
        # Infinite weights swamp every finite one; share the mass among them.
        logw = np.where(logw == np.inf, 0.0, -np.inf)
        top = 0.0
    elif top == -np.inf:
        # Nothing has any weight: no candidate is preferred over another.
        return np.full(n, -np.log(n))
    shifted = logw - top
    return shifted - np.log(np.exp(shifted).sum())


def _draw(logw: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
    logp = _log_normalise(logw)
    probs = np.exp(logp)
    probs /= probs.sum() if len(probs) else 1.0
    gumbel = rng.gumbel(size=len(logp))
    possible = np.isfinite(logp)
    keys = np.where(possible, logp + gumbel, -np.inf)
    m = int(possible.sum())
    if m >= k:
        chosen = _largest(keys, k)
    else:
        # Fewer candidates with p > 0 than asked for: all of them, then the rest uniformly from
        # the impossible ones (argpartition over -inf ties would always take the same ones).
        rest = _largest(np.where(possible, -np.inf, gumbel), k - m)
        chosen = np.concatenate([_largest(keys, m), rest])
    return Selection(chosen.astype(np.int64), probs)


def _largest(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest keys, largest first."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k < len(keys):
        part = np.argpartition(-keys, k - 1)[:k]
    else:
        part = np.arange(len(keys))
    return part[np.argsort(-keys[part], kind="stable")]


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks by descending score, ties sharing the mean of the ranks they span."""
    n = len(s)
    if n == 0:
        return np.zeros(0)
    order = np.argsort(-s, kind="stable")
    ordered = s[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group_rank = starts + (sizes + 1) / 2.0
    ranks = np.empty(n)
    ranks[order] = np.repeat(group_rank, sizes)
    return ranks
