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
    return _normalise(_checked_rows(embeddings, name))


def _checked_rows(embeddings: npt.ArrayLike, name: str) -> np.ndarray:
    """float32 or float16 [n, d], finite; not normalised yet. float16 (the pool's embeddings) is
    left as it is: converting costs more than the rest of the check (0.13 ms for 1,160 x 64), and
    `_diverse_topk` converts only the rows that may be chosen."""
    x = np.asarray(embeddings)
    if x.dtype != np.float16:
        x = x.astype(np.float32, copy=False)
    if x.ndim != 2:
        raise ValueError(f"{name} must be two-dimensional [n, d], got shape {x.shape}")
    if not _finite(x):
        raise ValueError(f"{name} contain NaN or infinity")
    return x


def _finite(x: np.ndarray) -> bool:
    if x.dtype == np.float16:
        # An all-ones exponent is infinity or NaN; on the bits, a tenth of np.isfinite's time.
        exponent = np.uint16(0x7C00)
        return not ((x.view(np.uint16) & exponent) == exponent).any()
    return bool(np.isfinite(x).all())


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows of finite `x` as float32, scaled to unit length. Row by row: a row comes out the same
    whatever other rows are normalised with it, so rows may be normalised a few at a time."""
    x = x.astype(np.float32, copy=False)
    # np.linalg.norm's own computation for real rows, without its conj() copy.
    norms = np.sqrt(np.add.reduce(x * x, axis=1, keepdims=True))
    zero = norms[:, 0] == 0
    if not zero.any():
        return x / norms
    # Zero rows stay zero instead of turning into NaN (so does a row so small that its squares
    # underflow: its norm is 0 too).
    out = x / np.where(norms > 0, norms, np.float32(1))
    out[zero] = 0
    return out


def _similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 [len(a), len(b)]: a @ b.T. NumPy hands a product with one row or one column to
    BLAS's gemv, whose rounding differs from gemm's, so a one-row side is doubled and the copy
    dropped: the rounding of a pair then depends less on how many rows it was computed with.
    (gemm's kernels for small products may still round a pair a step differently; that is the
    noise benchmarks/selection_difference.py measures.)"""
    if len(a) == 1:
        return (np.concatenate([a, a]) @ b.T)[:1]
    if len(b) == 1:
        return (a @ np.concatenate([b, b]).T)[:, :1]
    return a @ b.T


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
        self._count = len(rows)
        # Where the next row goes; once full, also the oldest row. Saved, so that every row goes
        # back where it sat: BLAS may round a row's products a step differently by its place in
        # the block it computes, and a restored memory must score candidates bit for bit as the
        # one saved. (A state saved without it had its oldest row first.)
        self._head = int(state.get("head", len(rows))) % self.size if state is not None else 0
        if len(rows) < self.size and self._head != len(rows):  # a memory not full yet fills from 0
            raise ValueError(f"inconsistent state: {len(rows)} rows of {self.size} but the next goes to {self._head}")
        if len(rows):
            # Stored oldest first and already unit length: written back as they are, since
            # normalising again could move them by a rounding step.
            oldest = (self._head - len(rows)) % self.size  # 0 while not full, else the head
            self._rows[(oldest + np.arange(len(rows))) % self.size] = rows
        # An upper bound on the length of every row held (what `add` writes is unit length, what
        # a state brings is measured): `_lower_bounds` sizes its rounding margin with it.
        self._longest = max(1.0, float(np.sqrt(np.einsum("ij,ij->i", rows, rows).max()))) if len(rows) else 1.0

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
        oldest = (self._head - self._count) % self.size
        return self._rows[(oldest + np.arange(self._count)) % self.size]

    def max_similarity(self, candidates: npt.ArrayLike) -> np.ndarray:
        """float32 [n]: each candidate's largest cosine similarity to a remembered row.

        -1 (the smallest cosine there is, so the identity of max) for every candidate while the
        memory is empty. Similarities may be negative; `select_diverse` does not reward that.
        """
        return self._max_similarity_unit(self._prepare(candidates, "candidates"))

    def _max_similarity_unit(self, x: np.ndarray) -> np.ndarray:
        """`max_similarity` of rows already unit float32 of the memory's dim (`select_diverse`
        normalised them once; normalising again could move them by a rounding step)."""
        if self._count == 0:
            return np.full(len(x), -1.0, np.float32)
        assert self._rows is not None
        # Row order does not matter for a max, so the unfilled tail is simply left out. Memory
        # rows first: [memory, n] and a max over axis 0 is the faster layout for BLAS and the
        # reduction (each entry is the same dot product either way).
        return _similarities(self._rows[: self._count], x).max(axis=0)

    def _lower_bounds(self, x: np.ndarray, probes: int) -> np.ndarray | None:
        """float32 [n]: for each unit row of `x`, a value no larger than its `_max_similarity_unit`
        as computed (rounding included), from about `probes` of the remembered rows; None when the
        memory holds too few rows for that to be much cheaper than the real thing.

        The probes are every (count // probes)-th row of the ring: spread over every batch still
        remembered. Their largest similarity is a similarity to the memory, so no larger than the
        largest; the margin covers the two products rounding differently: each computes a dot
        product of length d to within about d * 2^-24 * |x| * |row| (|x| <= 1, |row| <=
        `_longest`), and the margin is twice the difference that allows, plus a little for the
        subtraction's own rounding.
        """
        if self._count < 2 * probes:
            return None
        assert self._rows is not None
        d = self._rows.shape[1]
        probe = self._rows[: self._count : self._count // probes]
        margin = self._longest * (2.5e-7 * d + 1e-6)
        return _similarities(probe, x).max(axis=0) - np.float32(margin)

    def get_state(self) -> dict[str, np.ndarray]:
        # dim -1: not fixed yet. Plain arrays only, so that np.savez can store the state.
        return {
            "size": np.array(self.size, np.int64),
            "dim": np.array(self.dim or -1, np.int64),
            "rows": self.contents(),
            "head": np.array(self._head, np.int64),
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

    With `topk`, only the candidates that can still make a step's chunk are compared with the
    memory and the batch (see `_diverse_topk`); indices and probs are those of the steps above.
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
    # Every row is checked; `_diverse_topk` normalises only the candidates that may be chosen,
    # which gives the same rows: normalising is row by row.
    x = _checked_rows(embeddings, "embeddings")
    if len(x) != n:
        raise ValueError(f"{n} scores but {len(x)} embeddings")
    if memory is not None and memory.dim is not None and n and x.shape[1] != memory.dim:
        raise ValueError(f"embeddings have dimension {x.shape[1]}, the memory holds {memory.dim}")
    s = s.astype(np.float64, copy=False)
    # NaN scores: the plain loop below lets topk reject them as it does.
    if selector is topk and k > 0 and not np.isnan(s).any():
        return _diverse_topk(s, x, int(k), memory, float(lam), int(chunk))

    e = _normalise(x)
    nearest = memory._max_similarity_unit(e) if memory is not None else np.full(n, -1.0, np.float32)
    left = np.ones(n, dtype=bool)
    chosen: list[np.ndarray] = []
    probs = np.zeros(n)
    taken = 0
    while True:
        remaining = np.flatnonzero(left)
        step = selector(
            s[remaining] - lam * np.maximum(nearest[remaining], 0.0), min(chunk, k - taken), beta, rng
        )
        # Candidates not chosen yet.
        scale = (n - taken) / n if n else 0.0
        picked = remaining[step.indices]
        probs[picked] = step.probs[step.indices] * scale
        chosen.append(picked)
        taken += len(picked)
        left[picked] = False
        if taken >= k:
            # Everyone not chosen keeps the probability of the last step.
            rest = ~np.isin(remaining, picked)
            probs[remaining[rest]] = step.probs[rest] * scale
            break
        np.maximum(nearest, _similarities(e, e[picked]).max(axis=1), out=nearest)

    indices = np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)
    total = probs.sum()
    return Selection(indices, probs / total if total > 0 else _uniform(n))


# Memory rows `_diverse_topk` probes every candidate with, for a bound on its penalty.
_PROBES = 64
# Candidates `_diverse_topk` compares at least at a time once the first k are: one BLAS call's
# worth (fewer would add calls, more would compare candidates no step can choose).
_EVALUATE_BLOCK = 64


def _diverse_topk(
    s: np.ndarray, x: np.ndarray, k: int, memory: EmbeddingMemory | None, lam: float, chunk: int
) -> Selection:
    """`select_diverse` with `topk` (k >= 1, no NaN score), comparing as few candidates as it can.

    A penalty only lowers a score. So each candidate's score, lowered by the penalty a few probed
    memory rows already give it (`EmbeddingMemory._lower_bounds`), bounds its penalised score from
    above. Candidates are compared with the whole memory and the batch in order of that bound, a
    block at a time, and a step takes its chunk once the chunk's lowest penalised score beats
    the bound of every candidate not compared yet: none of them could enter the chunk or tie
    with it. So each step chooses what topk over every candidate would, the tie order included,
    and most candidates are never compared with the whole memory (most of the cost: at the
    benchmark's setting about 300 of 1280 are). probs are topk's: uniform in every step.
    """
    n = len(s)
    # Candidates that k others beat even after the largest penalty possible are never chosen,
    # and are left out from the start (ties stay in).
    floor = s - lam * _penalty_bound(x.shape[1], memory)
    kept = np.flatnonzero(~(s < np.partition(floor, n - k)[n - k]))
    unit = _normalise(x[kept])
    lower = memory._lower_bounds(unit, _PROBES) if memory is not None else None
    # Computed as the penalty is below (float32 lam * similarity): rounding is monotonic, so a
    # smaller similarity still gives a penalty no larger.
    upper = s[kept] if lower is None else s[kept] - lam * np.maximum(lower, 0.0)
    # The order candidates are compared in (`kept` ascends, so ties keep position order).
    by_bound = np.argsort(-upper, kind="stable")
    bound = upper[by_bound]  # bound[j]: no candidate from the j-th on has a penalised score above it
    # Candidates in comparison order; the first `compared` have been compared.
    order, e = kept[by_bound], unit[by_bound]
    score = s[order]
    m = len(order)
    nearest = np.empty(m, np.float32)  # largest similarity to the memory and the batch so far
    open_ = np.zeros(m, bool)  # compared and not chosen
    compared = 0
    batch = np.empty((k, e.shape[1]), np.float32)  # unit embeddings of the chosen, in choosing order
    chosen: list[np.ndarray] = []
    taken = 0
    probs = np.zeros(n)
    while True:
        c = min(chunk, k - taken)
        while True:
            live = np.flatnonzero(open_[:compared])
            if len(live) >= c:
                penalised = score[live] - lam * np.maximum(nearest[live], 0.0)
                top = _top(penalised, order[live], c)
                if compared == m or penalised[top[-1]] > bound[compared]:
                    break
            # The first k are always compared (at least k candidates reach the last step's
            # lowest chosen penalised score, so the k best bounds do), then a block at a time,
            # growing with what was compared: when the bounds are loose (equal scores) nearly
            # every candidate is, and a few large products cost less than many small ones.
            block = max(_EVALUATE_BLOCK, compared // 4) if compared else k
            stop = min(m, compared + max(block, c - len(live)))
            rows = e[compared:stop]
            near = memory._max_similarity_unit(rows) if memory is not None else np.full(len(rows), -1.0, np.float32)
            if taken:
                np.maximum(near, _similarities(batch[:taken], rows).max(axis=0), out=near)
            nearest[compared:stop], open_[compared:stop] = near, True
            compared = stop
        pick = live[top]
        picked = order[pick]
        # What topk's uniform probs give each of the n - taken candidates left in this step.
        scale = (n - taken) / n
        probs[picked] = (1.0 / (n - taken)) * scale
        chosen.append(picked)
        batch[taken : taken + c] = e[pick]
        taken += c
        open_[pick] = False
        if taken >= k:
            # Everyone not chosen keeps the probability of the last step.
            rest = np.ones(n, dtype=bool)
            rest[np.concatenate(chosen)] = False
            probs[rest] = (1.0 / (n - taken + c)) * scale
            break
        # Only the open rows can be chosen later. [chunk, open] and a max over axis 0: a max
        # along short rows is slow in numpy.
        live = np.flatnonzero(open_[:compared])
        nearest[live] = np.maximum(nearest[live], _similarities(e[pick], e[live]).max(axis=0))
    indices = np.concatenate(chosen).astype(np.int64)
    total = probs.sum()
    return Selection(indices, probs / total if total > 0 else _uniform(n))


def _top(values: np.ndarray, positions: np.ndarray, c: int) -> np.ndarray:
    """Indices of the c largest `values` (1 <= c <= len), largest first, ties to the smaller
    position: topk's order over the candidates at `positions`."""
    if c < len(values):
        # A partition instead of sorting them all. It leaves out an arbitrary few of the values
        # equal to the c-th largest when more tie with it than fit: then those taken must be
        # the first by position.
        part = np.argpartition(values, len(values) - c)[len(values) - c :]
        kth = values[part].min()
        if np.count_nonzero(values >= kth) > c:
            above = np.flatnonzero(values > kth)
            tied = np.flatnonzero(values == kth)
            part = np.concatenate([above, tied[np.argsort(positions[tied], kind="stable")[: c - len(above)]]])
    else:
        part = np.arange(len(values))
    return part[np.lexsort((positions[part], -values[part]))]


def _penalty_bound(dim: int, memory: EmbeddingMemory | None) -> float:
    """An upper bound on max(0, similarity) for `select_diverse`'s candidates (unit rows): 1, plus
    float32 rounding (about dim ulps), times the longest memory row (`EmbeddingMemory._longest`:
    `reset` writes rows back as they were stored)."""
    longest = memory._longest if memory is not None else 1.0
    return longest * (1.0 + 1e-3 + dim * 2.4e-7)


def _uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n) if n else np.zeros(0)
