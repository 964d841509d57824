"""Diversity: a memory of what was recently served, and batch selection that avoids repeating it.

Geometry is cosine: every embedding is cast to float32 and scaled to unit length, so a dot product
is a cosine similarity. A zero embedding stays zero and is similar (0) to nothing; that is what a
sample without a usable embedding should be.

A FIFO memory of the last m served embeddings (as in UDS) lets the selector lower the score of a
candidate that looks like something the learner has just seen. Within a batch the same holds for
candidates that look like each other, which a single scoring pass cannot see; `select_diverse`
therefore chooses in chunks and re-scores the rest against what it has chosen (JEST's blocked
sampling).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from loader.selection.selectors import Selection, Selector, topk

__all__ = ["EmbeddingMemory", "select_diverse", "unit_rows"]


def unit_rows(embeddings: npt.ArrayLike, name: str = "embeddings") -> np.ndarray:
    """float32 [n, d] rows scaled to unit length; zero rows stay zero. Rejects NaN and infinity."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be two-dimensional [n, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # np.divide's `out` keeps zero rows at zero instead of turning them into NaN.
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class EmbeddingMemory:
    """Ring buffer of the last `size` embeddings added (unit float32), oldest evicted first.

    `dim` may be left out; the first `add` fixes it.
    """

    def __init__(self, size: int, dim: int | None = None) -> None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
            raise ValueError(f"dim must be a positive integer or None, got {dim!r}")
        self.size = int(size)
        self._built_dim = None if dim is None else int(dim)
        self.reset()

    def reset(self, state: dict[str, np.ndarray] | None = None) -> None:
        """Empty (state None) or as saved by `get_state`, for a memory of the same size (and the
        same dim, if it was given: a memory built without one takes the saved one)."""
        dim, rows = self._built_dim, np.zeros((0, 0), np.float32)
        if state is not None:
            saved = int(state["dim"])  # -1: not fixed when saved
            rows = np.asarray(state["rows"], np.float32)
            if int(state["size"]) != self.size or (dim is not None and saved not in (-1, dim)):
                raise ValueError(
                    f"state of a memory of {int(state['size'])} x {saved}, this one is {self.size} x {dim}"
                )
            if len(rows) > self.size or (len(rows) and rows.shape != (len(rows), saved)):
                raise ValueError(f"inconsistent state: {rows.shape} rows for a memory of {self.size} x {saved}")
            dim = saved if saved > 0 else dim
        self._rows: np.ndarray | None = None if dim is None else np.zeros((self.size, dim), np.float32)
        # Stored oldest first and already unit length: written back as they are, since
        # normalising again could move them by a rounding step.
        if len(rows):
            self._rows[: len(rows)] = rows
        self._count = len(rows)
        self._head = len(rows) % self.size  # where the next row goes; once full, also the oldest row

    @property
    def dim(self) -> int | None:
        return None if self._rows is None else self._rows.shape[1]

    def __len__(self) -> int:
        return self._count

    def add(self, embeddings: npt.ArrayLike) -> None:
        x = self._prepare(embeddings)
        if len(x) == 0:
            return
        if self._rows is None:
            self._rows = np.zeros((self.size, x.shape[1]), np.float32)
        # Of a block larger than the memory only its newest rows would survive anyway.
        x = x[-self.size :]
        n = len(x)
        self._rows[(self._head + np.arange(n)) % self.size] = x
        self._head = (self._head + n) % self.size
        self._count = min(self.size, self._count + n)

    def contents(self) -> np.ndarray:
        """The remembered rows, oldest first (a copy)."""
        if self._rows is None:
            return np.zeros((0, 0), np.float32)
        if self._count < self.size:
            return self._rows[: self._count].copy()
        return np.roll(self._rows, -self._head, axis=0)

    def max_similarity(self, candidates: npt.ArrayLike) -> np.ndarray:
        """float32 [n]: each candidate's largest cosine similarity to a remembered row.

        -1 (the smallest cosine there is, so the identity of max) for every candidate while the
        memory is empty. Similarities may be negative; `select_diverse` does not reward that.
        """
        x = self._prepare(candidates, "candidates")
        if self._count == 0:
            return np.full(len(x), -1.0, np.float32)
        assert self._rows is not None
        # Row order does not matter for a max, so the unfilled tail is simply left out.
        return (x @ self._rows[: self._count].T).max(axis=1)

    def get_state(self) -> dict[str, np.ndarray]:
        # dim -1: not fixed yet. Plain arrays only, so that np.savez can store the state.
        return {
            "size": np.array(self.size, np.int64),
            "dim": np.array(self.dim or -1, np.int64),
            "rows": self.contents(),
        }

    def _prepare(self, embeddings: npt.ArrayLike, name: str = "embeddings") -> np.ndarray:
        x = unit_rows(embeddings, name)
        if self.dim is not None and len(x) and x.shape[1] != self.dim:
            raise ValueError(f"{name} have dimension {x.shape[1]}, the memory holds {self.dim}")
        return x


def select_diverse(
    scores: npt.ArrayLike,
    embeddings: npt.ArrayLike,
    k: int,
    memory: EmbeddingMemory | None,
    lam: float,
    chunk: int,
    selector: Selector,
    beta: float,
    rng: np.random.Generator,
) -> Selection:
    """k distinct candidates chosen `chunk` at a time on diversity-penalised scores.

    Each step scores the candidates not yet chosen by
        score - lam * max(0, max cosine similarity to the memory and to the candidates already chosen)
    and lets `selector` (a `SELECTORS` value, with coldness `beta`) pick the next chunk. Negative
    similarity earns nothing: being unlike the rest is not worth more than being unrelated. The
    running max of similarities is kept per candidate, so each step costs one [n, chunk] product.
    Candidates within one chunk are not compared with each other; a smaller chunk trades speed for
    that. The memory is only read; adding the served batch to it is the caller's job.

    `probs` (sums to 1) is meant for `importance_weights` only: a chosen candidate's probability
    in the step that chose it, and every other candidate's in the last step, each multiplied by
    (candidates left in that step) / n so that steps compare (a uniform step gives every candidate
    1/n). With lam = 0 the selector runs once on the plain scores and its own Selection is returned.

    With `topk`, candidates that k others beat even after the largest penalty possible are left
    out of the similarity products (see `_topk_contenders`); indices and probs are the same as
    with all of them in.
    """
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {s.shape}")
    n = len(s)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be finite and >= 0, got {lam!r}")
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n:
        raise ValueError(f"cannot choose k={k!r} of n={n} candidates")
    if lam == 0:
        return selector(s, k, beta, rng)
    e = unit_rows(embeddings)
    if len(e) != n:
        raise ValueError(f"{n} scores but {len(e)} embeddings")
    if memory is not None and memory.dim is not None and n and e.shape[1] != memory.dim:
        raise ValueError(f"embeddings have dimension {e.shape[1]}, the memory holds {memory.dim}")
    s = s.astype(np.float64, copy=False)

    # Top-k only: candidates it can never choose are left out of every product below (the memory
    # product is most of the cost). Other selectors draw from every candidate's probability.
    live = _topk_contenders(s, k, lam * _penalty_bound(e.shape[1], memory)) if selector is topk else None
    where = np.arange(n) if live is None else live  # position in the candidates of each row worked on
    if live is not None:
        e, s = e[live], s[live]
    m = len(s)
    nearest = memory.max_similarity(e) if memory is not None else np.full(m, -1.0, np.float32)
    left = np.ones(m, dtype=bool)
    chosen: list[np.ndarray] = []
    probs = np.zeros(n)
    taken = 0
    while True:
        remaining = np.flatnonzero(left)
        step = selector(
            s[remaining] - lam * np.maximum(nearest[remaining], 0.0), min(chunk, k - taken), beta, rng
        )
        # Candidates not chosen yet, left-out ones included.
        scale = (n - taken) / n if n else 0.0
        picked = remaining[step.indices]
        if live is None:
            probs[picked] = step.probs[step.indices] * scale
        else:
            # What topk's uniform probs give every one of the n - taken candidates in this step.
            probs[where[picked]] = (1.0 / (n - taken)) * scale
        chosen.append(where[picked])
        taken += len(picked)
        left[picked] = False
        if taken >= k:
            # Everyone not chosen keeps the probability of the last step.
            if live is None:
                rest = ~np.isin(remaining, picked)
                probs[remaining[rest]] = step.probs[rest] * scale
            else:
                rest = np.ones(n, dtype=bool)
                rest[np.concatenate(chosen)] = False
                probs[rest] = (1.0 / (n - taken + len(picked))) * scale
            break
        np.maximum(nearest, (e @ e[picked].T).max(axis=1), out=nearest)

    indices = np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)
    total = probs.sum()
    return Selection(indices, probs / total if total > 0 else _uniform(n))


def _penalty_bound(dim: int, memory: EmbeddingMemory | None) -> float:
    """An upper bound on max(0, similarity) for `select_diverse`'s candidates: 1 for unit rows,
    plus float32 rounding (about dim ulps), times the longest memory row (measured, not assumed:
    `reset` writes rows back as they were stored)."""
    longest = 1.0
    if memory is not None and len(memory):
        rows = memory._rows[: len(memory)]
        longest = max(1.0, float(np.sqrt(np.einsum("ij,ij->i", rows, rows).max())))
    return longest * (1.0 + 1e-3 + dim * 2.4e-7)


def _topk_contenders(s: np.ndarray, k: int, max_penalty: float) -> np.ndarray | None:
    """Positions top-k could still choose in `select_diverse`, or None to keep all.

    Penalties only lower scores, by at most `max_penalty`. A candidate scoring below the k-th
    largest of (score - max_penalty) is beaten by k candidates whatever happens, so no step of
    top-k picks it, and leaving it out changes neither the choice nor the tie order of the rest.
    """
    n = len(s)
    if k == 0 or k >= n or np.isnan(s).any():  # NaN: let topk report it as it does
        return None
    floor = s - max_penalty
    kth = np.partition(floor, n - k)[n - k]
    keep = ~(s < kth)
    return None if keep.all() else np.flatnonzero(keep)


def _uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n) if n else np.zeros(0)
