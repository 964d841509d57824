"""The cluster bandit's reward: what a cluster's candidates still offer, and whether it is coming back.

`ClusterReward` turns per-sample losses into one raw reward per cluster (in nats) for the bandit
(`loader.selection.bandit`), which normalises it (`_RewardScale`) and learns from it.

Why not the reported losses alone. The old reward (`bandit.reward_from_feedback`) was the mean
learnability of the samples trainers reported, i.e. of the top-k survivors of selection. A
cluster was judged by its best members, and a label-noise cluster's best members are exactly the
few whose noise fools the score, so it looked good (BENCHMARKS.md, mixed pool). Here the evidence
is every candidate the Selector scored: at selection time it knows each candidate's learner loss
(snapshot mode: fresh; feedback mode: the sample's last reported loss, else its cluster's
fallback) and reference loss, survivors or not.

Per cluster c, with L and R a candidate's learner and reference loss and τ = `scale`:

    gain_c  = mean over c's candidates of τ · tanh((L − R) / τ)
    level_c = mean over c's candidates of L;  F_c, S_c its fast and slow exponential averages
    D_c     = fast exponential average of (new − previous) loss of c's re-reported samples
    rise_c  = max(F_c − S_c, D_c, 0)
    reward_c = gain_c + rise_weight · min(rise_c, max(gain_c, 0))

- *gain* is the learnability (RHO-LOSS's reducible loss) the cluster's candidates offer on
  average, each sample's soft-clipped to ±τ (1 nat by default). Below τ it is the learnability
  itself; beyond, it counts as ±τ: the mean becomes the net share of candidates that are
  learnable. The clip matters twice. Reference losses of 20+ nats on noise inputs would otherwise
  dominate the bandit's running scale and flatten every difference between the useful clusters.
  And the sign matters: a label-noise cluster, where L and R are both high, has learnability
  spread around or below 0; a hinge (counting only L − R > 0) would keep its positive tail, which
  is what fooled the survivors' reward, and rank it with clusters that are merely learnt. Here it
  nets out near or below 0, and a learnt cluster (L ≈ R) near 0 from above. For losses on another
  scale τ degrades gracefully: far smaller losses give the plain mean learnability, far larger
  ones the net share of learnable candidates.
- *rise* is the evidence that the learner is losing the cluster: its mean loss going up (fast
  average above the slow one), or samples reported again with a higher loss than they had
  (feedback; a paired measurement per sample, so no population shift fakes it). F − S is about
  the trend times the horizon between the two averages, so gain + rise reads as the gain the
  cluster is heading for: a cluster being forgotten earns replay before it is gone. A falling
  loss earns nothing extra (its gain already pays for it; paying for progress would also pay for
  memorising noise).
- *min(rise, max(gain, 0))*: a rise counts only as far as the loss stands above the reference's.
  Loss that rises on what the learner cannot learn anyway (noise inputs the learner grows
  confidently wrong on) is not forgetting, and earns nothing.

Timing. `observe_candidates` (each selection) and `observe_reports` (each feedback) only update
these statistics. The bandit learns at feedback: `take()` gives, for each cluster with candidates
since the previous `take()`, its mean gain over those candidates plus its current rise term. One
reward per cluster per feedback, whether or not any of its samples were served, so a cluster the
policy never picks still gets a (low) reward; and without feedback the bandit does not move
(a restarted job that only serves stands where it stood). Exploration stays with the bandit (its
γ floor), and so does optimism for new clusters (EXP3 starts a new arm at the best observed arm's
score until its first reward, UCB scores a never-observed arm at least as high as the best).

The averages run on each cluster's own clock (one step per observation of the cluster) and are
bias-corrected (value / (1 − (1 − α)^n)), so a new cluster's averages start at its first
observation, not at 0.

State follows the project's contract: `get_state()` gives flat numpy arrays, `reset(state=None)`
builds the object afresh or as it was saved, for one built with the same arguments.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["ClusterReward"]


class ClusterReward:
    """Per-cluster reward from every scored candidate and the trend of each cluster's loss.

    fast, slow: rates (per observation of a cluster) of the fast and slow averages of its mean
    learner loss, 0 < slow < fast <= 1; the fast rate also smooths the reported-loss changes and
    the gain shown by `estimates`. rise_weight: how much a rise counts against the gain. scale:
    τ, the learnability (in the losses' units) at which a sample's contribution levels off.
    """

    # Per-cluster arrays in the state, all of one length (the clusters seen).
    _ARRAYS = ("level_fast", "level_slow", "gain", "delta", "observations", "reports", "pending_sum", "pending_count")

    def __init__(self, fast: float = 0.1, slow: float = 0.01, rise_weight: float = 1.0, scale: float = 1.0) -> None:
        if not (0 < slow < fast <= 1):
            raise ValueError(f"need 0 < slow < fast <= 1, got fast={fast!r}, slow={slow!r}")
        if not (math.isfinite(rise_weight) and rise_weight >= 0):
            raise ValueError(f"rise_weight must be finite and >= 0, got {rise_weight!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale!r}")
        self.fast, self.slow, self.rise_weight, self.scale = float(fast), float(slow), float(rise_weight), float(scale)
        self.reset()

    # -- state -----------------------------------------------------------------------------------

    def _arguments(self) -> dict[str, np.ndarray]:
        return {
            "fast": np.array(self.fast, np.float64),
            "slow": np.array(self.slow, np.float64),
            "rise_weight": np.array(self.rise_weight, np.float64),
            "scale": np.array(self.scale, np.float64),
        }

    def reset(self, state: dict[str, np.ndarray] | None = None) -> None:
        """No clusters seen (state None) or as saved by `get_state`, for an object built with the
        same arguments (checked: averages kept at one rate mean something else at another)."""
        if state is None:
            for name in self._ARRAYS:
                setattr(self, f"_{name}", np.zeros(0))
            return
        for key, value in self._arguments().items():
            if not np.array_equal(state[key], value):
                raise ValueError(f"state saved with {key}={state[key]}, this reward has {value}")
        arrays = {name: np.array(state[name], np.float64) for name in self._ARRAYS}
        if len({a.shape for a in arrays.values()}) != 1 or arrays["gain"].ndim != 1:
            raise ValueError("inconsistent reward state: per-cluster arrays differ in shape")
        for name, value in arrays.items():
            setattr(self, f"_{name}", value)

    def get_state(self) -> dict[str, np.ndarray]:
        return {**self._arguments(), **{name: getattr(self, f"_{name}").copy() for name in self._ARRAYS}}

    @property
    def num_clusters(self) -> int:
        return len(self._gain)

    # -- evidence --------------------------------------------------------------------------------

    def observe_candidates(
        self, cluster_ids: npt.ArrayLike, learner_loss: npt.ArrayLike, ref_loss: npt.ArrayLike
    ) -> None:
        """One selection's candidates: their clusters, learner losses and reference losses.

        Candidates without a cluster (id < 0) or with a NaN or infinite loss are left out (a
        sample nothing is known of yet is no evidence); a cluster none of whose candidates is
        left is not observed."""
        ids, (learner, ref) = _per_sample(cluster_ids, learner_loss, ref_loss)
        if not len(ids):
            return
        self._grow(int(ids.max()) + 1)
        k = self.num_clusters
        n = np.bincount(ids, minlength=k).astype(np.float64)
        seen = np.flatnonzero(n)
        tau = self.scale
        gain = np.bincount(ids, weights=tau * np.tanh((learner - ref) / tau), minlength=k)
        level = np.bincount(ids, weights=learner, minlength=k)[seen] / n[seen]
        self._observations[seen] += 1
        self._level_fast[seen] = _ema(self._level_fast[seen], level, self.fast)
        self._level_slow[seen] = _ema(self._level_slow[seen], level, self.slow)
        self._gain[seen] = _ema(self._gain[seen], gain[seen] / n[seen], self.fast)
        self._pending_sum[seen] += gain[seen]
        self._pending_count[seen] += n[seen]

    def observe_reports(
        self, cluster_ids: npt.ArrayLike, previous_loss: npt.ArrayLike, new_loss: npt.ArrayLike
    ) -> None:
        """Reported losses, each with the loss its sample had before (NaN: never reported, which
        is left out, like samples without a cluster). A cluster's mean change is one observation."""
        ids, (previous, new) = _per_sample(cluster_ids, previous_loss, new_loss)
        if not len(ids):
            return
        self._grow(int(ids.max()) + 1)
        k = self.num_clusters
        n = np.bincount(ids, minlength=k).astype(np.float64)
        seen = np.flatnonzero(n)
        change = np.bincount(ids, weights=new - previous, minlength=k)[seen] / n[seen]
        self._reports[seen] += 1
        self._delta[seen] = _ema(self._delta[seen], change, self.fast)

    # -- rewards ---------------------------------------------------------------------------------

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(arms: int64 cluster ids ascending, rewards: float64 nats) for every cluster with
        candidates since the last call: the mean gain over those candidates plus the rise term.
        Clears what it used, so each candidate counts in one reward."""
        arms = np.flatnonzero(self._pending_count > 0)
        gain = self._pending_sum[arms] / self._pending_count[arms]
        rewards = self._combine(gain, self._rise(arms))
        self._pending_sum[arms] = 0.0
        self._pending_count[arms] = 0.0
        return arms.astype(np.int64), rewards

    def estimates(self, num_clusters: int | None = None) -> np.ndarray:
        """float64 [num_clusters (default: those seen)]: each cluster's current reward, from its
        smoothed gain. A cluster never observed gets the best observed cluster's (0 if none):
        optimistic, as the bandits are about a new arm."""
        k = self.num_clusters if num_clusters is None else int(num_clusters)
        arms = np.arange(min(k, self.num_clusters))
        observed = self._observations[arms] > 0
        known = self._combine(self._smoothed(self._gain[arms], self._observations[arms], self.fast), self._rise(arms))
        out = np.full(k, known[observed].max() if observed.any() else 0.0)
        out[arms[observed]] = known[observed]
        return out

    @property
    def trends(self) -> np.ndarray:
        """F − S per cluster: its mean learner loss's recent change (> 0: rising), 0 if unobserved."""
        return self._level_trend(np.arange(self.num_clusters))

    def _combine(self, gain: np.ndarray, rise: np.ndarray) -> np.ndarray:
        return gain + self.rise_weight * np.minimum(rise, np.maximum(gain, 0.0))

    def _rise(self, arms: np.ndarray) -> np.ndarray:
        delta = self._smoothed(self._delta[arms], self._reports[arms], self.fast)
        return np.maximum(np.maximum(self._level_trend(arms), delta), 0.0)

    def _level_trend(self, arms: np.ndarray) -> np.ndarray:
        n = self._observations[arms]
        fast = self._smoothed(self._level_fast[arms], n, self.fast)
        return fast - self._smoothed(self._level_slow[arms], n, self.slow)

    @staticmethod
    def _smoothed(value: np.ndarray, count: np.ndarray, rate: float) -> np.ndarray:
        """Bias-corrected average: the exponential average as if it had started at its first
        observation (0 where there was none)."""
        weight = 1.0 - (1.0 - rate) ** count
        return np.divide(value, weight, out=np.zeros(len(value)), where=count > 0)

    def _grow(self, n: int) -> None:
        extra = n - self.num_clusters
        if extra > 0:
            for name in self._ARRAYS:
                setattr(self, f"_{name}", np.concatenate([getattr(self, f"_{name}"), np.zeros(extra)]))


def _ema(average: np.ndarray, value: np.ndarray, rate: float) -> np.ndarray:
    return (1.0 - rate) * average + rate * value


def _per_sample(cluster_ids: npt.ArrayLike, *values: npt.ArrayLike) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cluster ids and values, validated, restricted to samples with a cluster and finite values."""
    ids = np.asarray(cluster_ids)
    columns = [np.asarray(v, np.float64) for v in values]
    if ids.ndim != 1 or any(c.shape != ids.shape for c in columns):
        raise ValueError(f"need 1-d arrays of one length, got {ids.shape} and {[c.shape for c in columns]}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"cluster_ids must be integers, got {ids.dtype}")
    ok = ids >= 0
    for c in columns:
        ok &= np.isfinite(c)
    return ids[ok].astype(np.int64), [c[ok] for c in columns]
