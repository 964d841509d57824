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
