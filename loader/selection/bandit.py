"""Cluster quotas: a bandit over clusters decides how much of each super-batch each cluster gets.

Each cluster id is an arm. Both bandits turn a per-arm score into the mixture

    π = (1 − γ) · softmax(η · score) + γ / K        over the K arms that have candidates,

so every such arm keeps at least γ/K of the super-batch (exploration never stops, which matters
because what is worth learning moves as the learner trains), and π is turned into integer quotas
by largest remainders. `Exp3Arms` scores arms by importance-weighted rewards as Online Data Mixing
does; `UcbArms` by an upper confidence bound on the mean reward.

Rewards come from `loader.selection.rewards.ClusterReward` (the learnability every scored
candidate of a cluster still offers, plus a term for a cluster whose loss is rising again; the
Selector gives one update per feedback). `reward_from_feedback` (the mean learnability of the
reported samples alone) is the former reward, kept for comparison: reported samples are the
survivors of selection, so it judged a cluster by its best members. Losses have no fixed scale,
so every bandit first normalises each update's per-arm rewards by running statistics
(`_RewardScale`) to [−1, 1]; η then reads as "nats of preference per unit of normalised reward",
the same for every dataset and loss.

New arms start optimistic, so a newly opened cluster is tried soon: EXP3 gives it the best
observed arm's score until its first reward, UCB scores an arm never observed at least as high as
the best observed one.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["ArmPolicy", "BANDITS", "Exp3Arms", "UcbArms", "apportion", "get_bandit", "reward_from_feedback"]


class ArmPolicy(Protocol):
    def probabilities(self, available: npt.ArrayLike) -> np.ndarray: ...
    def update(self, arm_ids: npt.ArrayLike, rewards: npt.ArrayLike) -> None: ...
    def quotas(self, total: int, available_counts: npt.ArrayLike) -> np.ndarray: ...
    @property
    def weights(self) -> np.ndarray: ...
    def get_state(self) -> dict[str, np.ndarray]: ...
    def reset(self, state: dict[str, np.ndarray] | None = None) -> None: ...


def reward_from_feedback(
    cluster_ids: npt.ArrayLike, learner_loss: npt.ArrayLike, ref_loss: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """(arms: int64 ids in increasing order, rewards: float64 mean learnability of each).

    The bandit's former reward, over reported (i.e. selected) samples only; the Selector now
    uses `loader.selection.rewards.ClusterReward`, which sees every candidate.

    Learnability is learner loss − reference loss (see `scores.learnability`): a cluster pays when
    its samples are still unlearnt but learnable. Samples with a NaN or infinite loss are left out;
    an arm appears only if one of its samples is left.
    """
    ids = np.asarray(cluster_ids)
    learner = np.asarray(learner_loss, np.float64)
    ref = np.asarray(ref_loss, np.float64)
    if ids.ndim != 1 or learner.shape != ids.shape or ref.shape != ids.shape:
        raise ValueError(f"need 1-d arrays of one length, got {ids.shape}, {learner.shape}, {ref.shape}")
    ids = _arm_ids(ids, "cluster_ids")
    ok = np.isfinite(learner) & np.isfinite(ref)
    ids, gain = ids[ok], (learner - ref)[ok]
    if len(ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    n = np.bincount(ids)
    total = np.bincount(ids, weights=gain)
    arms = np.flatnonzero(n)
    return arms.astype(np.int64), total[arms] / n[arms]


def apportion(total: int, p: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """int64 shares of `total` proportional to p, by largest remainders, share i never above cap[i].

    What a capped arm cannot take is shared again among the arms with room left, in proportion to
    their p; ties in remainders go to the lower position. Sums to min(total, sum(cap)).
    """
    p = np.asarray(p, np.float64)
    cap = np.asarray(cap, np.int64)
    share = np.zeros(len(p), np.int64)
    left = min(int(total), int(cap.sum()))
    # Each pass either places everything or fills at least one arm, so at most len(p) passes.
    while left > 0:
        room = cap - share
        open_ = room > 0
        w = np.where(open_, p, 0.0)
        if not w.sum() > 0:
            w = open_.astype(np.float64)
        ideal = left * w / w.sum()
        base = np.floor(ideal).astype(np.int64)
        frac = ideal - base
        extra = left - int(base.sum())
        if extra > 0:
            base[np.argsort(-frac, kind="stable")[:extra]] += 1
        elif extra < 0:  # rounding pushed a floor over; take back from the smallest remainders
            base[np.argsort(np.where(base > 0, frac, np.inf), kind="stable")[:-extra]] -= 1
        give = np.minimum(base, room)
        share += give
        left -= int(give.sum())
    return share


class _RewardScale:
    """Running mean and spread of raw per-arm rewards (bias-corrected exponential averages).

    normalise(r) = clip((r − mean) / (2 · std), −1, 1). Centred, because with importance weights
    a common offset would not cancel: every arm's reward is divided by its own π, so a positive
    offset would favour rarely drawn arms and a negative one starve them. Two spreads to the clip
    keeps ordinary rewards out of it.
    """

    def __init__(self, decay: float = 0.99) -> None:
        self.decay = float(decay)
        self.reset()

    def reset(self, state: dict[str, np.ndarray] | None = None) -> None:
        """No rewards seen (state None) or as saved by `get_state`, for the same decay."""
        self.m1 = self.m2 = self.weight = 0.0
        if state is not None:
            _check_arguments(state, {"scale_decay": self.decay})
            self.m1, self.m2, self.weight = (float(state[k]) for k in ("scale_m1", "scale_m2", "scale_weight"))

    def normalise(self, rewards: np.ndarray) -> np.ndarray:
        d = self.decay
        self.m1 = d * self.m1 + (1 - d) * float(rewards.mean())
        self.m2 = d * self.m2 + (1 - d) * float((rewards * rewards).mean())
        self.weight = d * self.weight + (1 - d)
        mean = self.m1 / self.weight
        std = math.sqrt(max(self.m2 / self.weight - mean * mean, 0.0))
        # No spread yet (one arm, one update): nothing to tell arms apart by.
        if not std > 1e-12 * max(1.0, abs(mean)):
            return np.zeros_like(rewards)
        return np.clip((rewards - mean) / (2 * std), -1.0, 1.0)

    def get_state(self) -> dict[str, np.ndarray]:
        return {
            "scale_decay": np.array(self.decay, np.float64),
            "scale_m1": np.array(self.m1, np.float64),
            "scale_m2": np.array(self.m2, np.float64),
            "scale_weight": np.array(self.weight, np.float64),
        }


class _SoftmaxArms:
    """π from per-arm scores, quotas from π, and the bookkeeping both bandits share.

    Arms are ids 0..A-1; any id a call names beyond A is added on the spot.
    """

    def __init__(self, gamma: float, eta: float, seed: int) -> None:
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be finite and >= 0, got {eta!r}")
        self.gamma = float(gamma)
        self.eta = float(eta)
        # Both bandits here are deterministic (no random generator, so none in the state); kept
        # so every bandit is built the same way.
        self.seed = int(seed)
        self._scale = _RewardScale()
        # Each bandit's constructor ends with reset(), once its own arguments are set.

    def reset(self, state: dict[str, np.ndarray] | None = None) -> None:
        """No arms (state None) or as saved by `get_state`, for a bandit built with the same
        arguments (which the state repeats, and which are checked: scores learned under one η
        or smoothing mean something else under another)."""
        if state is not None:
            _check_arguments(state, self._arguments())
        self._scale.reset(state)
        # π relative to uniform (K · π_i) when arm i was last drawn; NaN: never drawn.
        self._last_share = np.zeros(0) if state is None else np.array(state["last_share"], np.float64)
        self._reset_arms(state)

    def get_state(self) -> dict[str, np.ndarray]:
        return {
            **self._arguments(),
            "last_share": self._last_share.copy(),
            **self._scale.get_state(),
            **self._arm_state(),
        }

    @property
    def num_arms(self) -> int:
        return len(self._last_share)

    @property
    def weights(self) -> np.ndarray:
        """π over every arm known, as if all had candidates."""
        return self._pi(np.arange(self.num_arms))

    @property
    def reward_estimates(self) -> np.ndarray:
        """Each arm's score before the softmax (EXP3: R̂; UCB: mean plus bonus), for stats."""
        return self._scores(np.arange(self.num_arms))

    def probabilities(self, available: npt.ArrayLike) -> np.ndarray:
        """π over the available arms, aligned with the argument.

        A bool mask (position = arm id) gives π over its True arms and 0 elsewhere; distinct arm
        ids give π for those arms in that order. All zeros when no arm is available.
        """
        mask, ids = self._available(available)
        pi = self._pi(ids)
        if mask is None:
            return pi
        out = np.zeros(len(mask))
        out[ids] = pi
        return out

    def quotas(self, total: int, available_counts: npt.ArrayLike) -> np.ndarray:
        """int64 [len(available_counts)]: how many candidates to draw from each arm.

        Largest-remainder rounding of total·π over the arms with candidates, never more than an
        arm has, the excess shared among arms with candidates left; sums to
        min(total, sum(available_counts)). Counts as a draw: the π used here is what later
        rewards of these arms are importance-weighted by.
        """
        if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 0:
            raise ValueError(f"total must be a non-negative integer, got {total!r}")
        counts = np.asarray(available_counts)
        if (
            counts.ndim != 1
            or (counts.size and not np.issubdtype(counts.dtype, np.integer))
            or (counts < 0).any()
        ):
            raise ValueError("available_counts must be a 1-d array of non-negative integers")
        counts = counts.astype(np.int64)
        self._grow(len(counts))
        ids = np.flatnonzero(counts > 0)
        pi = self._pi(ids)
        self._last_share[ids] = pi * len(ids)
        out = np.zeros(len(counts), np.int64)
        out[ids] = apportion(total, pi, counts[ids])
        return out

    def update(self, arm_ids: npt.ArrayLike, rewards: npt.ArrayLike) -> None:
        """Learns from rewards, per sample or per arm: either way reduced to one mean per arm
        first, so one call is one observation of each arm it names."""
        arms = np.asarray(arm_ids)
        r = np.asarray(rewards, np.float64)
        if arms.ndim != 1 or r.shape != arms.shape:
            raise ValueError(f"arm_ids and rewards must be 1-d of one length, got {arms.shape} and {r.shape}")
        if not np.isfinite(r).all():
            raise ValueError("rewards must be finite")
        if len(arms) == 0:
            return
        arms = _arm_ids(arms, "arm_ids")
        self._grow(int(arms.max()) + 1)
        ids, inverse = np.unique(arms, return_inverse=True)
        mean = np.bincount(inverse, weights=r) / np.bincount(inverse)
        self._learn(ids, self._scale.normalise(mean))

    def _pi(self, ids: np.ndarray) -> np.ndarray:
        k = len(ids)
        if k == 0:
            return np.zeros(0)
        z = self.eta * self._scores(ids)
        soft = np.exp(z - z.max())
        return (1 - self.gamma) * soft / soft.sum() + self.gamma / k

    def _available(self, available: npt.ArrayLike) -> tuple[np.ndarray | None, np.ndarray]:
        a = np.asarray(available)
        if a.ndim != 1:
            raise ValueError(f"available must be 1-d, got shape {a.shape}")
        if a.dtype == np.bool_:
            self._grow(len(a))
            return a, np.flatnonzero(a)
        ids = _arm_ids(a, "available")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("available names an arm twice")
        if len(ids):
            self._grow(int(ids.max()) + 1)
        return None, ids

    def _grow(self, n: int) -> None:
        extra = n - self.num_arms
        if extra > 0:
            self._last_share = np.concatenate([self._last_share, np.full(extra, np.nan)])
            self._add_arms(extra)

    def _arguments(self) -> dict[str, np.ndarray]:
        """The constructor's arguments, as the state stores them; bandits add their own."""
        return {
            "gamma": np.array(self.gamma, np.float64),
            "eta": np.array(self.eta, np.float64),
            "seed": np.array(self.seed, np.int64),
        }

    # Per bandit:
    def _reset_arms(self, state: dict[str, np.ndarray] | None) -> None:
        raise NotImplementedError

    def _arm_state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _scores(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _learn(self, ids: np.ndarray, rewards: np.ndarray) -> None:
        raise NotImplementedError

    def _add_arms(self, extra: int) -> None:
        raise NotImplementedError


class Exp3Arms(_SoftmaxArms):
    """EXP3 as in Online Data Mixing: score R̂_i ← α·R̂_i + (1 − α)·r_i / (K·π_i).

    π_i is arm i's probability in its last draw (`quotas`) and K the number of arms in that draw;
    dividing by K·π_i instead of π_i alone measures the importance weight relative to a uniform
    draw, so under uniform π R̂ is just the smoothed reward and η keeps the meaning given above.
    A rarely drawn arm that pays is boosted (up to 1/γ times), which is how EXP3 explores.
    α = `smoothing` forgets old rewards, since what a cluster is worth changes during training.
    New arms start optimistic, at the best R̂ of the arms observed so far (0 while there are
    none), so a newly opened cluster gets a large share of its first draws and is tried at once.
    The optimism lasts until the arm's first reward: that update starts from the mean R̂ of the
    observed arms instead (neither favoured nor starved, where every arm used to start), so an
    arm is judged on what it earns, and a tiny cluster that is rarely drawn does not keep a share
    it never earned. (Starting at the mean alone, as before, left a new cluster at an average
    share, which under a concentrated π meant it was barely drawn.)
    """

    def __init__(self, gamma: float = 0.1, eta: float = 1.0, seed: int = 0, smoothing: float = 0.9) -> None:
        super().__init__(gamma, eta, seed)
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = float(smoothing)
        self.reset()

    def _scores(self, ids: np.ndarray) -> np.ndarray:
        return self._value[ids]

    def _learn(self, ids: np.ndarray, rewards: np.ndarray) -> None:
        share = self._last_share[ids]
        # Never drawn (rewards before any quotas): its π now is the best guess.
        unknown = np.isnan(share)
        if unknown.any():
            share[unknown] = self.weights[ids[unknown]] * self.num_arms
        fresh = self._fresh[ids] > 0
        if fresh.any():  # a first reward: the optimistic start gives way to the neutral one
            self._value[ids[fresh]] = self._start(np.mean)
            self._fresh[ids] = 0.0
        a = self.smoothing
        self._value[ids] = a * self._value[ids] + (1 - a) * rewards / share

    def _start(self, reduce) -> float:
        observed = self._value[self._fresh == 0]
        return float(reduce(observed)) if len(observed) else 0.0

    def _add_arms(self, extra: int) -> None:
        self._value = np.concatenate([self._value, np.full(extra, self._start(np.max))])
        self._fresh = np.concatenate([self._fresh, np.ones(extra)])

    def _arguments(self) -> dict[str, np.ndarray]:
        return {**super()._arguments(), "smoothing": np.array(self.smoothing, np.float64)}

    def _reset_arms(self, state: dict[str, np.ndarray] | None) -> None:
        self._value = np.zeros(0) if state is None else np.array(state["value"], np.float64)
        # 1: no reward yet. A state saved before this was kept has every arm observed.
        fresh = None if state is None else state.get("fresh")
        self._fresh = np.zeros(len(self._value)) if fresh is None else np.array(fresh, np.float64)
        if self._fresh.shape != self._value.shape:
            raise ValueError("inconsistent bandit state: per-arm arrays differ in length")

    def _arm_state(self) -> dict[str, np.ndarray]:
        return {"value": self._value.copy(), "fresh": self._fresh.copy()}


class UcbArms(_SoftmaxArms):
    """Discounted UCB: score_i = mean_i + c · sqrt(2 · ln(1 + N) / n_i).

    mean_i is the average normalised reward of arm i and n_i its number of observations, both
    discounted by `discount` at every update for every arm, so an arm not heard from for a while
    regains its bonus and is tried again (rewards drift as the learner trains); N = Σ n_i. An arm
    never observed has mean 0 (the normalised centre) and n_i floored at `_MIN_COUNT`, which makes
    its bonus large, and its score is never below the best observed arm's: untried clusters are
    tried first. No importance weights: a mean estimated from the arm's own observations is not
    biased by how often it is drawn.
    """

    _MIN_COUNT = 1e-2

    def __init__(
        self,
        gamma: float = 0.1,
        eta: float = 1.0,
        seed: int = 0,
        exploration: float = 1.0,
        discount: float = 0.99,
    ) -> None:
        super().__init__(gamma, eta, seed)
        if not (math.isfinite(exploration) and exploration >= 0):
            raise ValueError(f"exploration must be finite and >= 0, got {exploration!r}")
        if not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {discount!r}")
        self.exploration = float(exploration)
        self.discount = float(discount)
        self.reset()

    def _scores(self, ids: np.ndarray) -> np.ndarray:
        n = self._count[ids]
        mean = np.divide(self._sum[ids], n, out=np.zeros(len(ids)), where=n > 0)
        total = self._count.sum()
        scores = mean + self.exploration * np.sqrt(2 * np.log1p(total) / np.maximum(n, self._MIN_COUNT))
        # Never observed: at least the best observed arm's score (the floored count makes that so
        # in all but corner cases; this makes it so always).
        fresh = n == 0
        if fresh.any() and not fresh.all():
            scores[fresh] = np.maximum(scores[fresh], scores[~fresh].max())
        return scores

    def _learn(self, ids: np.ndarray, rewards: np.ndarray) -> None:
        self._sum *= self.discount
        self._count *= self.discount
        self._sum[ids] += rewards
        self._count[ids] += 1

    def _add_arms(self, extra: int) -> None:
        self._sum = np.concatenate([self._sum, np.zeros(extra)])
        self._count = np.concatenate([self._count, np.zeros(extra)])

    def _arguments(self) -> dict[str, np.ndarray]:
        return {
            **super()._arguments(),
            "exploration": np.array(self.exploration, np.float64),
            "discount": np.array(self.discount, np.float64),
        }

    def _reset_arms(self, state: dict[str, np.ndarray] | None) -> None:
        self._sum = np.zeros(0) if state is None else np.array(state["sum"], np.float64)
        self._count = np.zeros(0) if state is None else np.array(state["count"], np.float64)

    def _arm_state(self) -> dict[str, np.ndarray]:
        return {"sum": self._sum.copy(), "count": self._count.copy()}


BANDITS: dict[str, type[Exp3Arms] | type[UcbArms]] = {"exp3": Exp3Arms, "ucb": UcbArms}


def get_bandit(name: str) -> type[Exp3Arms] | type[UcbArms]:
    try:
        return BANDITS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown bandit {name!r}; known: {', '.join(sorted(BANDITS))}") from None


def _check_arguments(state: dict[str, np.ndarray], arguments: dict[str, object]) -> None:
    for key, value in arguments.items():
        if not np.array_equal(state[key], value):
            raise ValueError(f"state saved with {key}={state[key]}, this bandit has {value}")


def _arm_ids(ids: np.ndarray, name: str) -> np.ndarray:
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    if (ids < 0).any():
        raise ValueError(f"{name} must be >= 0")
    return ids
