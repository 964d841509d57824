"""Unit tests for `loader.selection.diversity`: the memory of served embeddings and diverse selection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.selection.diversity import EmbeddingMemory, select_diverse, unit_rows
from loader.selection.selectors import SELECTORS, topk


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return unit_rows(rng.normal(size=(n, d)))


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 12), blocks=st.lists(st.integers(0, 15), max_size=8))
def test_memory_evicts_oldest_first(size, blocks) -> None:
    memory = EmbeddingMemory(size)
    added: list[np.ndarray] = []
    label = 0
    for n in blocks:
        # Distinct directions, so every row is recognisable after normalisation.
        rows = np.zeros((n, 3), np.float32)
        rows[:, 0] = 1.0
        rows[:, 1] = np.arange(label, label + n)
        label += n
        memory.add(rows)
        added.extend(unit_rows(rows))
    expected = np.array(added[-size:] if added else np.zeros((0, 3)), np.float32).reshape(-1, 3)
    assert len(memory) == len(expected)
    if len(expected):
        np.testing.assert_array_equal(memory.contents(), expected)


def test_max_similarity_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    memory = EmbeddingMemory(50, dim=16)
    candidates = rng.normal(size=(40, 16)) * rng.uniform(0.1, 10, size=(40, 1))
    np.testing.assert_array_equal(memory.max_similarity(candidates), np.full(40, -1.0, np.float32))
    remembered = rng.normal(size=(130, 16))
    for block in np.array_split(remembered, 7):
        memory.add(block)
    got = memory.max_similarity(candidates)
    last = remembered[-50:]
    expected = np.array(
        [max(c @ m / (np.linalg.norm(c) * np.linalg.norm(m)) for m in last) for c in candidates]
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_memory_state_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(1)
    memory = EmbeddingMemory(20)
    memory.add(rng.normal(size=(33, 8)))
    np.savez(tmp_path / "m.npz", **memory.get_state())
    with np.load(tmp_path / "m.npz") as saved:
        restored = EmbeddingMemory(20)
        restored.reset(dict(saved))
    np.testing.assert_array_equal(restored.contents(), memory.contents())
    more = rng.normal(size=(7, 8))
    memory.add(more)
    restored.add(more)
    np.testing.assert_array_equal(restored.contents(), memory.contents())
    empty = EmbeddingMemory(5)
    empty.reset(EmbeddingMemory(5).get_state())
    assert len(empty) == 0


def test_a_restored_memory_keeps_its_rows_where_they_sat_and_refuses_a_bad_head() -> None:
    rng = np.random.default_rng(2)
    memory = EmbeddingMemory(8)
    memory.add(rng.normal(size=(13, 4)))  # full, the ring's head past its start
    restored = EmbeddingMemory(8)
    restored.reset(memory.get_state())
    np.testing.assert_array_equal(restored._rows, memory._rows)  # the same places, not oldest first
    older = {k: v for k, v in memory.get_state().items() if k != "head"}  # saved before the head was
    restored.reset(older)
    np.testing.assert_array_equal(restored.contents(), memory.contents())
    partial = EmbeddingMemory(8)
    partial.add(rng.normal(size=(3, 4)))
    with pytest.raises(ValueError, match="3 rows of 8 but the next goes to 5"):
        EmbeddingMemory(8).reset({**partial.get_state(), "head": np.array(5)})


@pytest.mark.parametrize("name", sorted(SELECTORS))
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 60),
    k_fraction=st.floats(0, 1),
    chunk=st.integers(1, 20),
    lam=st.floats(0, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_select_diverse_returns_k_distinct(name, n, k_fraction, chunk, lam, seed) -> None:
    rng = np.random.default_rng(seed)
    k = round(k_fraction * n)
    emb = rng.normal(size=(n, 6))
    if n:
        emb[: n // 3] = emb[0]  # many exact copies
    memory = EmbeddingMemory(10)
    memory.add(rng.normal(size=(4, 6)))
    choice = select_diverse(rng.normal(size=n), emb, k, memory, lam, chunk, SELECTORS[name], 2.0, rng)
    assert choice.indices.dtype == np.int64 and choice.indices.shape == (k,)
    assert len(np.unique(choice.indices)) == k
    assert ((choice.indices >= 0) & (choice.indices < n)).all()
    assert choice.probs.shape == (n,) and (choice.probs >= 0).all()
    if n:
        assert choice.probs.sum() == pytest.approx(1.0)


def test_remembered_duplicates_lose_to_equal_scored_alternatives() -> None:
    rng = np.random.default_rng(2)
    seen = _unit(rng, 8, 32)
    memory = EmbeddingMemory(16)
    memory.add(seen)
    fresh = _unit(rng, 8, 32)
    emb = np.empty((16, 32), np.float32)
    emb[0::2], emb[1::2] = seen, fresh  # duplicates first in every tie
    scores = np.ones(16)
    choice = select_diverse(scores, emb, 8, memory, 0.5, 4, topk, 1.0, rng)
    np.testing.assert_array_equal(np.sort(choice.indices), np.arange(1, 16, 2))
    # Without the penalty, ties go to the earlier candidates: the duplicates.
    plain = select_diverse(scores, emb, 8, memory, 0.0, 4, topk, 1.0, rng)
    np.testing.assert_array_equal(plain.indices, np.arange(8))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 80), k_fraction=st.floats(0, 1), chunk=st.integers(1, 30), seed=st.integers(0, 2**32 - 1)
)
def test_lambda_zero_is_the_plain_selector(n, k_fraction, chunk, seed) -> None:
    rng = np.random.default_rng(seed)
    k = round(k_fraction * n)
    scores = rng.integers(0, 5, size=n).astype(np.float64)  # ties included
    memory = EmbeddingMemory(8)
    memory.add(rng.normal(size=(8, 4)))
    choice = select_diverse(scores, rng.normal(size=(n, 4)), k, memory, 0.0, chunk, topk, 1.0, rng)
    np.testing.assert_array_equal(choice.indices, topk(scores, k, 1.0, rng).indices)


def test_chunked_selection_keeps_copies_apart() -> None:
    rng = np.random.default_rng(3)
    base = _unit(rng, 4, 16)
    copies = np.repeat(base, 3, axis=0)  # 4 embeddings, 3 copies each, top scores
    others = _unit(rng, 20, 16)
    emb = np.vstack([copies, others])
    scores = np.concatenate([np.full(12, 1.0), np.full(20, 0.9)])
    choice = select_diverse(scores, emb, 8, None, 1.0, 1, topk, 1.0, rng)
    chosen_copies = choice.indices[choice.indices < 12] // 3
    assert len(chosen_copies) == 4 and len(set(chosen_copies.tolist())) == 4
    # One chunk for the whole batch cannot see the copies, and takes them all.
    blind = select_diverse(scores, emb, 8, None, 1.0, 8, topk, 1.0, rng)
    assert (blind.indices < 12).all()


def test_stochastic_probs_are_comparable_across_chunks() -> None:
    rng = np.random.default_rng(4)
    n = 40
    emb = np.eye(n)  # orthogonal: the penalty is 0 everywhere, every step is uniform
    choice = select_diverse(np.zeros(n), emb, 20, None, 1.0, 5, SELECTORS["softmax"], 1.0, rng)
    np.testing.assert_allclose(choice.probs, np.full(n, 1 / n))


def test_bad_arguments_are_rejected() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        select_diverse(np.zeros(3), np.ones((3, 2)), 4, None, 1.0, 2, topk, 1.0, rng)
    with pytest.raises(ValueError):
        select_diverse(np.zeros(3), np.ones((2, 2)), 2, None, 1.0, 2, topk, 1.0, rng)
    with pytest.raises(ValueError):
        select_diverse(np.zeros(3), np.ones((3, 2)), 2, None, 1.0, 0, topk, 1.0, rng)
    memory = EmbeddingMemory(4)
    memory.add(np.ones((1, 5)))
    with pytest.raises(ValueError):
        memory.add(np.ones((1, 6)))
    with pytest.raises(ValueError):
        memory.add(np.array([[np.nan, 1.0]]))


# -- the top-k path compares few candidates, and chooses what the plain loop does -----------------


def _plain_topk(scores, k, beta, rng):
    """topk, but not the same object: `select_diverse` then runs its plain loop, which compares
    every candidate with the memory and the batch at every step (the reference)."""
    return topk(scores, k, beta, rng)


def _memory_of(rows: np.ndarray, size: int) -> EmbeddingMemory:
    """A memory holding `rows` as they are (restored from a state: not normalised)."""
    memory = EmbeddingMemory(size)
    memory.reset({"size": np.array(size), "dim": np.array(rows.shape[1]), "rows": rows.astype(np.float32)})
    return memory


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 400),
    k_fraction=st.floats(0, 1),
    chunk=st.integers(1, 40),
    lam=st.sampled_from([0.05, 0.5, 1.0, 2.0, 50.0]),
    remembered=st.integers(0, 300),
    kind=st.sampled_from(["continuous", "one_hot", "copies", "long_rows"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_topk_path_chooses_what_the_plain_loop_chooses(n, k_fraction, chunk, lam, remembered, kind, seed) -> None:
    rng = np.random.default_rng(seed)
    # Mostly k well below n: then most candidates are left to the blocks after the first k, where
    # the bounds decide.
    k = round(k_fraction**2 * n)
    d = 8
    if kind == "one_hot":
        # Every similarity is exactly 0 or 1 and scores tie in threes: ties everywhere, and no
        # rounding for the two paths to differ in.
        emb = np.eye(d)[rng.integers(0, d, size=n)]
        scores = rng.integers(0, 3, size=n).astype(np.float64)
        rows = np.eye(d)[rng.integers(0, d, size=remembered)]
    else:
        emb = rng.normal(size=(n, d))
        scores = rng.normal(size=n)
        rows = unit_rows(rng.normal(size=(remembered, d)))
        if kind == "copies":
            emb[: n // 2] = emb[0]
            scores[: n // 2] = scores[0]
        if kind == "long_rows" and remembered:
            rows = rows * rng.uniform(0.5, 3.0, size=(remembered, 1))  # restored, not unit
    memory = _memory_of(rows, 256) if remembered <= 256 else _memory_of(rows[-256:], 256)
    got = select_diverse(scores, emb, k, memory, lam, chunk, topk, 1.0, rng)
    want = select_diverse(scores, emb, k, memory, lam, chunk, _plain_topk, 1.0, rng)
    if kind == "copies":
        # The two paths compute a pair's similarity in products of other shapes, and BLAS may
        # round one pair a step differently by where it sits in the block its kernel computes:
        # then which of two exact copies wins their tie can differ. Copies are interchangeable,
        # so the same candidates means the same scores and embeddings, in the same order.
        np.testing.assert_array_equal(scores[got.indices], scores[want.indices])
        np.testing.assert_array_equal(emb[got.indices], emb[want.indices])
        np.testing.assert_array_equal(got.probs[got.indices], want.probs[want.indices])
        np.testing.assert_array_equal(np.sort(got.probs), np.sort(want.probs))
        return
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.probs, want.probs)


def test_topk_path_leaves_most_candidates_out_of_the_memory_product() -> None:
    rng = np.random.default_rng(5)
    n, k, d = 1000, 100, 16
    directions = unit_rows(rng.normal(size=(8, d)))
    emb = directions[rng.integers(0, 8, size=n)] + 0.05 * rng.normal(size=(n, d))
    memory = EmbeddingMemory(512)
    memory.add(directions[rng.integers(0, 8, size=512)] + 0.05 * rng.normal(size=(512, d)))
    scores = rng.normal(size=n)
    compared: list[int] = []
    full = memory._max_similarity_unit
    memory._max_similarity_unit = lambda rows: (compared.append(len(rows)), full(rows))[1]
    got = select_diverse(scores, emb, k, memory, 0.5, 20, topk, 1.0, rng)
    del memory._max_similarity_unit
    # Every candidate is about as close to the memory as every other: the probes see it, and
    # only a little more than k need the whole memory.
    assert k <= sum(compared) < 2 * k
    want = select_diverse(scores, emb, k, memory, 0.5, 20, _plain_topk, 1.0, rng)
    np.testing.assert_array_equal(got.indices, want.indices)


@settings(max_examples=40, deadline=None)
@given(remembered=st.integers(1, 400), scale=st.floats(0.1, 5.0), d=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_lower_bounds_never_exceed_the_max_similarity(remembered, scale, d, seed) -> None:
    rng = np.random.default_rng(seed)
    memory = _memory_of(rng.normal(size=(remembered, d)) * scale, 400)
    candidates = unit_rows(rng.normal(size=(50, d)))
    lower = memory._lower_bounds(candidates, 16)
    if remembered < 32:
        assert lower is None  # too few rows for probing to pay
        return
    assert lower is not None and lower.dtype == np.float32
    assert (lower <= memory._max_similarity_unit(candidates)).all()
    # A bound, but not a vacuous one: within rounding of the probed rows' own maximum.
    probed = (memory.contents()[:: remembered // 16] @ candidates.T).max(axis=0)
    assert np.allclose(lower, probed, atol=1e-3 * scale)


def test_normalising_matches_unit_length_rows_of_linalg_norm() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    x[4] = 0
    x[9] = 1e-30  # squares underflow: a zero norm, so a zero row
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    got = unit_rows(x)
    np.testing.assert_array_equal(got, expected)
    assert not got[4].any() and not got[9].any()
    np.testing.assert_array_equal(unit_rows(x[10:]), expected[10:])  # no zero row: the plain division


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(-3, 3), min_size=1, max_size=40), c_fraction=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_top_is_topk_order_over_positions(values, c_fraction, seed) -> None:
    from loader.selection.diversity import _top

    rng = np.random.default_rng(seed)
    v = np.array(values, np.float64)
    positions = rng.permutation(10 * len(v))[: len(v)]
    c = max(1, round(c_fraction * len(v)))
    # topk's rule: value descending, ties to the smaller position.
    expected = np.lexsort((positions, -v))[:c]
    np.testing.assert_array_equal(_top(v, positions, c), expected)


def test_topk_path_compares_a_candidate_whose_bound_ties_the_chunk() -> None:
    # B (position 0) scores 0 and is unlike the memory: penalised score 0. A (position 1) scores
    # 1 and repeats the memory: 1 - 1 = 0. The tie goes to B, the earlier candidate, although A's
    # bound (its score) is higher and A is compared first: B's bound, 0, only ties A's penalised
    # score, so B must be compared before the step may choose.
    memory = EmbeddingMemory(4)
    memory.add(np.array([[1.0, 0.0]]))
    emb = np.array([[0.0, 1.0], [1.0, 0.0]])
    scores = np.array([0.0, 1.0])
    got = select_diverse(scores, emb, 1, memory, 1.0, 1, topk, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(got.indices, [0])
    np.testing.assert_array_equal(got.indices, select_diverse(scores, emb, 1, memory, 1.0, 1, _plain_topk, 1.0, None).indices)


def test_restored_long_memory_rows_penalise_beyond_one() -> None:
    # A memory row of length 3 (restored from a state written as it was) penalises a candidate
    # along it by 3 * lam. Ruling candidates out by a penalty of at most lam would drop B, the one
    # that wins: -0.5 against 1 - 3 = -2 for each A.
    memory = _memory_of(np.array([[3.0, 0.0]]), 4)
    emb = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]])
    scores = np.array([1.0, 1.0, 1.0, 1.0, -0.5])
    got = select_diverse(scores, emb, 1, memory, 1.0, 1, topk, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(got.indices, [4])
