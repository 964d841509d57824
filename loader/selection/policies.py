"""The policy registry: name -> policy. A policy chooses which candidates of a super-batch to serve.

The caller (the curator) gathers a super-batch of `super_batch(B)` shuffled candidates, looks up
the losses the policy `needs_*` (NaN already filled), and calls `select` with k from `keep_count`.
Policies are pure numpy and hold no per-job state besides their options, so one policy object can
serve every epoch and every rank of a job.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import numpy as np

from loader.selection.diversity import EmbeddingMemory, select_diverse
from loader.selection.infobatch import prune
from loader.selection.options import SelectionOptions, parse_options, split_policy, super_batch_size
from loader.selection.scores import easy_reference, learnability
from loader.selection.selectors import get_selector
from loader.selection.weights import importance_weights

__all__ = ["POLICIES", "Policy", "make_policy"]


class Policy(Protocol):
    name: str
    needs_reference: bool  # needs per-sample reference losses
    needs_learner: bool  # needs per-sample learner losses
    options: SelectionOptions

    def super_batch(self, batch_size: int) -> int: ...

    def select(
        self,
        k: int,
        *,
        ref_loss: np.ndarray | None,
        learner_loss: np.ndarray | None,
        n: int,
        rng: np.random.Generator,
        progress: float | None,
        embeddings: np.ndarray | None = None,
        memory: EmbeddingMemory | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(indices: k distinct int64 positions into the n candidates, weights: float32 [k], > 0).

        progress: fraction of training done, None when the trainer has not said.
        embeddings, memory: candidates' unit embeddings and the job's memory of served ones;
        policies with `diversity` > 0 lower scores by similarity to both.
        """
        ...


class _Base:
    name: str
    needs_reference: bool = False
    needs_learner: bool = False

    def __init__(self, options: SelectionOptions = SelectionOptions()) -> None:
        self.options = options

    def super_batch(self, batch_size: int) -> int:
        return super_batch_size(batch_size, self.options.keep_ratio)

    def _losses(self, k: int, n: int, ref_loss: np.ndarray | None, learner_loss: np.ndarray | None) -> None:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n:
            raise ValueError(f"policy {self.name!r}: cannot choose k={k!r} of n={n} candidates")
        for needed, loss, what in (
            (self.needs_reference, ref_loss, "ref_loss"),
            (self.needs_learner, learner_loss, "learner_loss"),
        ):
            if not needed:
                continue
            if loss is None:
                raise ValueError(f"policy {self.name!r} needs {what}")
            if np.shape(loss) != (n,):
                raise ValueError(f"policy {self.name!r}: {what} has shape {np.shape(loss)}, expected ({n},)")


class Uniform(_Base):
    """Serves the shuffled stream as it comes; every sample weighs 1.

    Always keep ratio 1, whatever the options say: subsampling a shuffled stream uniformly would
    only waste reads, and the delivery guarantee of `uniform` is that every sample is served.
    """

    name = "uniform"

    def __init__(self, options: SelectionOptions = SelectionOptions()) -> None:
        super().__init__(dataclasses.replace(options, keep_ratio=1.0))

    def select(
        self,
        k: int,
        *,
        ref_loss: np.ndarray | None = None,
        learner_loss: np.ndarray | None = None,
        n: int,
        rng: np.random.Generator,
        progress: float | None = None,
        embeddings: np.ndarray | None = None,
        memory: EmbeddingMemory | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        self._losses(k, n, ref_loss, learner_loss)
        # Candidates arrive shuffled, so the first k are a uniform choice already.
        return np.arange(k, dtype=np.int64), np.ones(k, dtype=np.float32)


class Loss(_Base):
    """InfoBatch: randomly prune below-mean-loss candidates, choose k uniformly among the rest.

    Choosing uniformly among the kept is what makes InfoBatch's rescale right: a kept below-mean
    sample is served (1 - r) times as often as an above-mean one, and its weight 1/(1 - r) makes
    up for exactly that. Pruned candidates are served only when too few were kept (weight 1).
    From `anneal_fraction` of training on, pruning stops and the choice is plain uniform, as in
    InfoBatch, so the last epochs see unbiased gradients.
    """

    name = "loss"
    needs_learner = True

    def select(
        self,
        k: int,
        *,
        ref_loss: np.ndarray | None = None,
        learner_loss: np.ndarray | None,
        n: int,
        rng: np.random.Generator,
        progress: float | None = None,
        embeddings: np.ndarray | None = None,
        memory: EmbeddingMemory | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        self._losses(k, n, ref_loss, learner_loss)
        if progress is not None and progress >= self.options.anneal_fraction:
            return rng.choice(n, size=k, replace=False).astype(np.int64), np.ones(k, dtype=np.float32)
        keep, weights = prune(np.asarray(learner_loss), self.options.prune_ratio, rng)
        kept = np.flatnonzero(keep)
        if len(kept) >= k:
            chosen = rng.choice(kept, size=k, replace=False)
        else:
            # prune() gives dropped candidates weight 1 already, which is what a fill-in carries.
            fill = rng.choice(np.flatnonzero(~keep), size=k - len(kept), replace=False)
            chosen = np.concatenate([kept, fill])
        return chosen.astype(np.int64), weights[chosen]


class _Scored(_Base):
    """Scores every candidate, then lets the configured selector choose."""

    def __init__(self, options: SelectionOptions = SelectionOptions()) -> None:
        super().__init__(options)
        # Fail at job start, not at the first batch.
        self._selector = get_selector(options.selector)

    def _scores(self, ref_loss: np.ndarray | None, learner_loss: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def select(
        self,
        k: int,
        *,
        ref_loss: np.ndarray | None,
        learner_loss: np.ndarray | None,
        n: int,
        rng: np.random.Generator,
        progress: float | None = None,
        embeddings: np.ndarray | None = None,
        memory: EmbeddingMemory | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        self._losses(k, n, ref_loss, learner_loss)
        scores = self._scores(ref_loss, learner_loss)
        if self.options.diversity > 0:
            if embeddings is None:
                raise ValueError(f"policy {self.name!r} with diversity needs embeddings")
            o = self.options
            choice = select_diverse(scores, embeddings, k, memory, o.diversity, o.chunk, self._selector, o.beta, rng)
        else:
            choice = self._selector(scores, k, self.options.beta, rng)
        if self.options.selector == "topk":
            return choice.indices, np.ones(k, dtype=np.float32)
        return choice.indices, importance_weights(choice.probs, choice.indices)


class Learnability(_Scored):
    """RHO-LOSS / JEST: prefer what the learner gets wrong but a reference model gets right."""

    name = "learnability"
    needs_reference = True
    needs_learner = True

    def _scores(self, ref_loss: np.ndarray | None, learner_loss: np.ndarray | None) -> np.ndarray:
        assert ref_loss is not None and learner_loss is not None
        return learnability(learner_loss, ref_loss)


class EasyReference(_Scored):
    """Prefer what a reference model finds easy: cheap filtering of noisy or off-topic data."""

    name = "easy_reference"
    needs_reference = True

    def _scores(self, ref_loss: np.ndarray | None, learner_loss: np.ndarray | None) -> np.ndarray:
        assert ref_loss is not None
        return easy_reference(ref_loss)


POLICIES: dict[str, Callable[[SelectionOptions], Policy]] = {
    "uniform": Uniform,
    "loss": Loss,
    "learnability": Learnability,
    "easy_reference": EasyReference,
}


def make_policy(name: str, options: SelectionOptions = SelectionOptions()) -> Policy:
    """The policy `name`; a composite name ("learnability+bandit") must come with options that
    `split_policy` resolved (see `resolve`)."""
    base, _ = split_policy(name)
    try:
        factory = POLICIES[base]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return factory(options)


def resolve(name: str, values: dict, key: str, base: SelectionOptions) -> SelectionOptions:
    """Options of a job that asked for policy `name` with `values`: a composite name's features
    switch their options on unless `values` sets them. Raises ValueError / ConfigError (the
    latter naming `key.option`, from the options schema in loader.selection.options)."""
    policy, feature_defaults = split_policy(name)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(sorted(POLICIES))}")
    options = parse_options({**feature_defaults, **values}, key=key, base=base)
    if options.needs_embeddings and policy in ("uniform",):
        raise ValueError(f"policy {name!r}: bandit and diversity need a scored policy, not {policy!r}")
    return options
