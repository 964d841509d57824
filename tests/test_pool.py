"""Unit tests for sample ids (`loader.ids`) and the pool's per-sample metadata (`loader.pool`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.ids import MAX_SHARDS, ROW_BITS, ROW_MASK, make_ids, row_of, shard_of
from loader.pool import PoolIndex, UnknownSamples
from loader.selection.scores import fill_missing


@pytest.mark.parametrize("shard_index", [0, 1, 12345, MAX_SHARDS - 1])
def test_ids_round_trip(shard_index: int) -> None:
    ids = make_ids(shard_index, 7)
    assert ids.dtype == np.int64
    assert (ids >= 0).all()
    np.testing.assert_array_equal(shard_of(ids), np.full(7, shard_index))
    np.testing.assert_array_equal(row_of(ids), np.arange(7))
    assert len(np.unique(ids)) == 7


def test_largest_id_stays_non_negative_and_unpacks() -> None:
    # Building a full 2**32-row shard would take 32 GiB, so pack the corner by hand.
    top = np.array([((MAX_SHARDS - 1) << ROW_BITS) | ROW_MASK], dtype=np.int64)
    assert top[0] == np.iinfo(np.int64).max
    assert shard_of(top)[0] == MAX_SHARDS - 1
    assert row_of(top)[0] == ROW_MASK


def test_ids_of_neighbouring_shards_never_collide() -> None:
    a, b = make_ids(3, 1000), make_ids(4, 1000)
    assert not set(a.tolist()) & set(b.tolist())


def test_empty_shard_has_no_ids() -> None:
    assert make_ids(2, 0).shape == (0,)


@pytest.mark.parametrize(
    "shard_index, rows, needle",
    [(-1, 3, "shard index"), (MAX_SHARDS, 3, "shard index"), (0, -1, "rows"), (0, ROW_MASK + 2, "rows")],
)
def test_make_ids_range_errors(shard_index: int, rows: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_ids(shard_index, rows)


def pool() -> PoolIndex:
    p = PoolIndex()
    p.ensure_shard(0, 5)
    p.ensure_shard(3, 2)
    return p


def test_record_and_read_losses() -> None:
    p = pool()
    assert len(p) == 7
    ids = np.array([make_ids(0, 5)[1], make_ids(3, 2)[0]])
    p.record_losses(ids, np.array([0.5, 2.0]))
    assert p.feedback_samples == 2
    everything = np.concatenate([make_ids(0, 5), make_ids(3, 2)])
    expected = np.full(7, np.nan, np.float32)
    expected[1], expected[5] = 0.5, 2.0
    np.testing.assert_array_equal(p.learner_loss(everything), expected)
    # A later report replaces the earlier one.
    p.record_losses(ids[:1], np.array([0.25]))
    assert p.learner_loss(ids[:1])[0] == np.float32(0.25)
    assert p.feedback_samples == 3


def test_learner_loss_keeps_the_order_asked_for() -> None:
    p = pool()
    ids = np.array([make_ids(3, 2)[1], make_ids(0, 5)[4], make_ids(3, 2)[0]])
    p.record_losses(ids, np.array([3.0, 1.0, 2.0]))
    np.testing.assert_array_equal(p.learner_loss(ids[::-1]), [2.0, 1.0, 3.0])


def test_ensure_shard_keeps_losses_unless_its_length_changes() -> None:
    p = pool()
    ids = make_ids(0, 5)[:1]
    p.record_losses(ids, np.array([1.0]))
    p.ensure_shard(0, 5)
    assert p.learner_loss(ids)[0] == 1.0
    p.ensure_shard(0, 6)
    assert np.isnan(p.learner_loss(ids)[0])


@pytest.mark.parametrize(
    "bad_id",
    [
        int(make_ids(1, 1)[0]),  # shard never added
        int(make_ids(3, 3)[2]),  # row 2 of a 2-row shard
        int(make_ids(MAX_SHARDS - 1, 1)[0]),
    ],
)
def test_unknown_samples_are_named_and_change_nothing(bad_id: int) -> None:
    p = pool()
    good = make_ids(0, 5)[:2]
    ids = np.concatenate([good, [bad_id]])
    with pytest.raises(UnknownSamples, match=f"sample id {bad_id} "):
        p.record_losses(ids, np.ones(3))
    assert p.feedback_samples == 0
    assert np.isnan(p.learner_loss(good)).all()


def test_check_ids_names_the_offender_among_many() -> None:
    p = pool()
    ids = np.concatenate([make_ids(0, 5), make_ids(3, 4)])  # rows 2 and 3 of shard 3 do not exist
    with pytest.raises(UnknownSamples, match=f"sample id {int(make_ids(3, 3)[2])} "):
        p.check_ids(ids)
    p.check_ids(make_ids(3, 2))


@pytest.mark.parametrize("bad_loss", [np.nan, np.inf, -np.inf])
def test_non_finite_losses_are_rejected(bad_loss: float) -> None:
    p = pool()
    ids = make_ids(0, 3)
    with pytest.raises(ValueError, match="finite"):
        p.record_losses(ids, np.array([1.0, bad_loss, 2.0]))
    assert p.feedback_samples == 0
    assert np.isnan(p.learner_loss(ids)).all()


@pytest.mark.parametrize(
    "ids, losses",
    [
        (make_ids(0, 3), np.ones(2)),
        (make_ids(0, 4).reshape(2, 2), np.ones((2, 2))),
    ],
)
def test_shape_mismatch_is_rejected(ids, losses) -> None:
    p = pool()
    with pytest.raises(ValueError, match="1-d of equal length"):
        p.record_losses(ids, losses)
    assert p.feedback_samples == 0
    assert np.isnan(p.learner_loss(make_ids(0, 5))).all()


def test_unknown_samples_is_a_value_error() -> None:
    # Callers catch ValueError for every rejected report.
    assert issubclass(UnknownSamples, ValueError)


def test_unseen_fallback_follows_first_reports_not_later_ones():
    """A sample never reported is assumed as hard as samples were when first reported; later,
    lower losses of already-trained samples must not make unseen samples look learned."""
    from loader.pool import PoolIndex

    pool = PoolIndex()
    pool.ensure_shard(0, 4)
    ids = make_ids(0, 4)
    assert np.isnan(pool.unseen_learner_loss())
    pool.record_losses(ids[:2], np.array([2.0, 2.0], np.float32))
    assert pool.unseen_learner_loss() == pytest.approx(2.0)
    for _ in range(20):  # the learner fits the two samples it was served
        pool.record_losses(ids[:2], np.array([0.01, 0.01], np.float32))
    assert pool.unseen_learner_loss() == pytest.approx(2.0)
    pool.record_losses(ids[2:3], np.array([1.0], np.float32))  # a first report moves it
    assert 1.0 < pool.unseen_learner_loss() < 2.0


def clustered_pool() -> tuple[PoolIndex, np.ndarray]:
    """Shard 0 in clusters 0 and 1, shard 1 not clustered (its scores have not arrived)."""
    p = PoolIndex()
    p.ensure_shard(0, 6)
    p.ensure_shard(1, 2)
    p.set_clusters(0, np.array([0, 0, 0, 1, 1, 1]))
    return p, np.concatenate([make_ids(0, 6), make_ids(1, 2)])


def test_the_fallback_is_the_clusters_average_of_first_reports() -> None:
    p, ids = clustered_pool()
    assert np.isnan(p.fallback_learner_loss(ids)).all()  # nothing reported yet
    p.record_losses(ids[[0, 1]], np.array([1.0, 3.0]))  # cluster 0 only
    fallback = p.fallback_learner_loss(ids)
    assert fallback.dtype == np.float32 and fallback.shape == (8,)
    np.testing.assert_allclose(fallback[:3], 2.0)
    # Cluster 1 has no report, shard 1 no clusters: both take the pool's value.
    np.testing.assert_allclose(fallback[3:], p.unseen_learner_loss())
    p.record_losses(ids[[3]], np.array([5.0]))
    np.testing.assert_allclose(p.fallback_learner_loss(ids[[2, 4]]), [2.0, 5.0])


def test_a_clusters_fallback_ignores_repeated_reports_and_follows_new_first_ones() -> None:
    p, ids = clustered_pool()
    p.record_losses(ids[[0]], np.array([2.0]))
    for _ in range(20):  # the learner fits the sample it keeps being served
        p.record_losses(ids[[0]], np.array([0.01]))
    assert p.fallback_learner_loss(ids[[1]])[0] == pytest.approx(2.0)
    p.record_losses(ids[[1]], np.array([1.0]))  # a newer first report moves it, by the smoothing
    assert p.fallback_learner_loss(ids[[2]])[0] == pytest.approx((0.9 * 0.1 * 2.0 + 0.1 * 1.0) / (0.9 * 0.1 + 0.1))
    # Two samples first reported together count as two.
    p.record_losses(ids[[3, 4, 5]], np.array([1.0, 1.0, 4.0]))
    assert p.fallback_learner_loss(ids[[3]])[0] == pytest.approx(2.0)


def test_the_fallback_survives_a_restart_and_old_states_still_load() -> None:
    p, ids = clustered_pool()
    p.record_losses(ids[[0, 3, 6]], np.array([1.0, 4.0, 2.0]))
    state = p.get_state()
    assert "reported" not in state
    restored = PoolIndex()
    restored.reset(state)
    np.testing.assert_array_equal(restored.fallback_learner_loss(ids), p.fallback_learner_loss(ids))
    # A state saved before the per-cluster averages existed, with the per-sample report counts
    # that were kept then: it loads, and the pool's value stands in for every cluster.
    old = {k: v for k, v in state.items() if not k.startswith("cluster_loss")}
    old["reported"] = np.ones(len(state["learner_loss"]), np.uint32)
    restored = PoolIndex()
    restored.reset(old)
    np.testing.assert_array_equal(restored.learner_loss(ids), p.learner_loss(ids))
    np.testing.assert_allclose(restored.fallback_learner_loss(ids), p.unseen_learner_loss())


def test_fill_missing_takes_one_fallback_per_value_and_refuses_a_misfit() -> None:
    p, ids = clustered_pool()
    p.record_losses(ids[[0, 3]], np.array([1.0, 4.0]))
    filled = fill_missing(p.learner_loss(ids[[0, 1, 4]]), p.fallback_learner_loss(ids[[0, 1, 4]]))
    np.testing.assert_allclose(filled, [1.0, 1.0, 4.0])
    with pytest.raises(ValueError, match="fallback has shape"):
        fill_missing(np.array([np.nan, 1.0, np.nan]), np.array([1.0, 2.0]))


# -- the flat layout against per-shard arrays --------------------------------------------------


class PerShardPool:
    """What PoolIndex does, kept the plain way: a dict of small arrays per shard. A rewritten
    shard (held with another row count) starts over without losses, scores or clusters."""

    def __init__(self, state: dict[str, np.ndarray] | None = None) -> None:
        self.loss, self.best, self.ref, self.emb, self.cluster = {}, {}, {}, {}, {}
        self.stale: set[int] = set()
        self.unseen, self.sums, self.counts, self.feedback_samples = float("nan"), np.zeros(0), np.zeros(0), 0
        if state is None:
            return
        bounds = np.concatenate([[0], np.cumsum(state["rows"])]).astype(int)
        for i, shard in enumerate(state["shards"].tolist()):
            part = slice(bounds[i], bounds[i + 1])
            self.loss[shard] = state["learner_loss"][part].copy()
            self.best[shard] = (state["best_loss"] if "best_loss" in state else state["learner_loss"])[part].copy()
            if state["clustered"][i]:
                self.cluster[shard] = state["cluster"][part].copy()
        self.unseen = float(state["unseen_loss"])
        self.sums = np.array(state.get("cluster_loss_sum", np.zeros(0)), np.float64)
        self.counts = np.array(state.get("cluster_loss_count", np.zeros(0)), np.float64)
        self.feedback_samples = int(state["feedback_samples"])

    def ensure_shard(self, shard: int, rows: int) -> None:
        if shard in self.loss and len(self.loss[shard]) == rows:
            return
        self.loss[shard] = np.full(rows, np.nan, np.float32)
        self.best[shard] = np.full(rows, np.nan, np.float32)
        for column in (self.ref, self.emb, self.cluster):
            column.pop(shard, None)
        self.stale.discard(shard)

    def set_scores(self, shard: int, ref: np.ndarray, emb: np.ndarray) -> None:
        rows = len(self.loss[shard])
        if len(ref) != rows or len(emb) != rows:
            raise ValueError(f"shard {shard} has {rows} rows, got {len(ref)} scores")
        self.ref[shard], self.emb[shard] = ref.astype(np.float32), emb.astype(np.float16)
        self.stale.discard(shard)

    def set_clusters(self, shard: int, clusters: np.ndarray) -> None:
        rows = len(self.loss[shard])
        if len(clusters) != rows:
            raise ValueError(f"shard {shard} has {rows} rows, got {len(clusters)} cluster ids")
        self.cluster[shard] = clusters.astype(np.int32)

    def has_scores(self, shard: int) -> bool:
        return shard in self.ref and shard not in self.stale

    def reference_replaced(self) -> None:
        self.stale = set(self.ref)

    def _where(self, sample_id: int) -> tuple[int, int]:
        """(shard, row) of an id the pool holds, else the error a dict lookup gives."""
        shard, row = sample_id >> ROW_BITS, sample_id & ROW_MASK
        if shard not in self.loss:
            raise KeyError(shard)
        if row >= len(self.loss[shard]):
            raise IndexError(row)
        return shard, row

    def check_ids(self, ids: np.ndarray) -> None:
        for i in ids.tolist():
            try:
                self._where(i)
            except LookupError:
                raise UnknownSamples(f"sample id {i} is not in the pool") from None

    def lookup(self, column: str, ids: np.ndarray) -> np.ndarray:
        places = [self._where(i) for i in ids.tolist()]
        if column == "ref":
            return np.array([self.ref[s][r] if s in self.ref else np.nan for s, r in places], np.float32)
        if column == "emb":
            for s, _ in places:
                if s not in self.emb:
                    raise KeyError(s)
            return np.array([self.emb[s][r] for s, r in places], np.float16).reshape(len(ids), -1)
        return np.array([getattr(self, column)[s][r] for s, r in places], np.float32)

    def cluster_of(self, ids: np.ndarray) -> np.ndarray:
        out = []
        for i in ids.tolist():
            shard, row = i >> ROW_BITS, i & ROW_MASK
            if shard in self.cluster and row >= len(self.cluster[shard]):
                raise IndexError(row)
            out.append(self.cluster[shard][row] if shard in self.cluster else -1)
        return np.array(out, np.int32)

    def fallback(self, ids: np.ndarray) -> np.ndarray:
        out = []
        for c in self.cluster_of(ids).tolist():
            known = 0 <= c < len(self.counts) and self.counts[c] > 0
            out.append(self.sums[c] / self.counts[c] if known else self.unseen)
        return np.array(out, np.float32)

    def cluster_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.cluster:
            return np.zeros(0, np.int64), np.zeros(0)
        shards = sorted(self.cluster)
        ids = np.concatenate([self.cluster[s] for s in shards])
        sizes = np.bincount(ids[ids >= 0])
        scored = [s for s in shards if s in self.ref]
        if not scored:
            return sizes, np.zeros(len(sizes))
        ids = np.concatenate([self.cluster[s] for s in scored])
        ref = np.concatenate([self.ref[s] for s in scored])
        counts = np.bincount(ids[ids >= 0], minlength=len(sizes))
        sums = np.bincount(ids[ids >= 0], weights=ref[ids >= 0], minlength=len(sizes))
        return sizes, np.divide(sums, counts, out=np.zeros(len(sizes)), where=counts > 0)

    def record_losses(self, ids: np.ndarray, losses: np.ndarray) -> None:
        self.check_ids(ids)
        reports = list(zip(ids.tolist(), losses.astype(np.float32).tolist()))
        if len(set(ids.tolist())) != len(ids):  # the newest of each id, ids ascending
            reports = sorted(dict(reports).items())
        by_shard: dict[int, list[tuple[int, float]]] = {}  # in report order within a shard
        for i, loss in reports:
            by_shard.setdefault(i >> ROW_BITS, []).append((i & ROW_MASK, loss))
        first_clusters, first_losses = [], []
        for shard in sorted(by_shard):
            rows = np.array([r for r, _ in by_shard[shard]])
            mine = np.array([v for _, v in by_shard[shard]], np.float32)
            first = np.isnan(self.loss[shard][rows])
            if first.any():  # one step of the moving average per shard
                fresh = float(mine[first].mean())
                self.unseen = fresh if np.isnan(self.unseen) else 0.9 * self.unseen + 0.1 * fresh
                if shard in self.cluster:
                    first_clusters += self.cluster[shard][rows[first]].tolist()
                    first_losses += mine[first].tolist()
            self.loss[shard][rows] = mine
            self.best[shard][rows] = np.fmin(self.best[shard][rows], mine)
        reached = [(c, v) for c, v in zip(first_clusters, first_losses) if c >= 0]
        if reached:  # each cluster the report's first losses reach takes one step of its average
            k = max(len(self.sums), max(c for c, _ in reached) + 1)
            self.sums = np.concatenate([self.sums, np.zeros(k - len(self.sums))])
            self.counts = np.concatenate([self.counts, np.zeros(k - len(self.counts))])
            added, n = np.zeros(k), np.zeros(k)
            for c, v in reached:
                added[c] += v
                n[c] += 1
            for c in {c for c, _ in reached}:
                self.sums[c] = 0.9 * self.sums[c] + 0.1 * added[c]
                self.counts[c] = 0.9 * self.counts[c] + 0.1 * n[c]
        self.feedback_samples += len(ids)

    def get_state(self) -> dict[str, np.ndarray]:
        shards = sorted(self.loss)
        return {
            "shards": np.array(shards, np.int64),
            "rows": np.array([len(self.loss[s]) for s in shards], np.int64),
            "learner_loss": np.concatenate([self.loss[s] for s in shards] or [np.zeros(0, np.float32)]),
            "best_loss": np.concatenate([self.best[s] for s in shards] or [np.zeros(0, np.float32)]),
            "clustered": np.array([s in self.cluster for s in shards], bool),
            "cluster": np.concatenate([self.cluster.get(s, np.full(len(self.loss[s]), -1, np.int32))
                                       for s in shards] or [np.zeros(0, np.int32)]),  # fmt: skip
            "unseen_loss": np.array(self.unseen, np.float64),
            "cluster_loss_sum": self.sums.copy(),
            "cluster_loss_count": self.counts.copy(),
            "feedback_samples": np.array(self.feedback_samples, np.int64),
        }


def _outcome(call):
    """What a call gave: its value, or its error (IndexError without its message: numpy's differ)."""
    try:
        return "ok", call()
    except IndexError:
        return "error", IndexError
    except (KeyError, ValueError) as exc:
        return "error", (type(exc), str(exc))


def _assert_agree(got, expected, what: str) -> None:
    assert got[0] == expected[0], (what, got, expected)
    if got[0] == "error":
        assert got[1] == expected[1], what
    elif isinstance(expected[1], tuple):
        for a, b in zip(got[1], expected[1]):
            np.testing.assert_array_equal(a, b, err_msg=what, strict=True)
    elif isinstance(expected[1], np.ndarray):
        np.testing.assert_array_equal(got[1], expected[1], err_msg=what, strict=True)
    else:
        assert got[1] == expected[1] or (np.isnan(got[1]) and np.isnan(expected[1])), what


def _assert_same_pool(pool: PoolIndex, model: PerShardPool) -> None:
    assert len(pool) == sum(len(v) for v in model.loss.values())
    assert pool.feedback_samples == model.feedback_samples
    _assert_agree(("ok", pool.unseen_learner_loss()), ("ok", model.unseen), "unseen loss")
    _assert_agree(("ok", pool.cluster_sizes()), ("ok", model.cluster_sizes()), "cluster sizes")
    for shard in [*SHARDS, 5, 41]:
        assert pool.has_scores(shard) == model.has_scores(shard), shard
        assert pool.has_clusters(shard) == (shard in model.cluster), shard


SHARDS = [0, 1, 2, 3, 4, 40]  # 40: past the smallest per-shard table, with a gap before it


def _ids(data, model: PerShardPool, strays: bool, of=None) -> np.ndarray:
    """Ids the pool holds (of the shards `of`, or any) and, with `strays`, any: of shards not in
    the pool, of rows past a shard's end, negative, of the largest shard index."""
    shards = sorted(model.loss if of is None else of)
    held = [(s << ROW_BITS) | r for s in shards for r in range(len(model.loss[s]))]
    one = st.sampled_from(held) if held else st.nothing()
    if strays:
        shard = st.sampled_from([*SHARDS, 5, -1, MAX_SHARDS - 1])
        one = st.one_of(one, st.builds(lambda s, r: (s << ROW_BITS) | r, shard, st.integers(0, 7)))
    if one.is_empty:
        return np.zeros(0, np.int64)
    return np.array(data.draw(st.lists(one, max_size=12)), np.int64)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_flat_layout_agrees_with_per_shard_arrays(data) -> None:
    pool, model = PoolIndex(), PerShardPool()
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["ensure", "ensure", "scores", "scores", "clusters", "clusters",
                                        "replaced", "report", "report", "report", "lookup", "lookup",
                                        "lookup", "state"]))  # fmt: skip
        shard = data.draw(st.sampled_from(SHARDS))
        if op == "ensure":
            rows = data.draw(st.integers(0, 6))
            pool.ensure_shard(shard, rows)
            model.ensure_shard(shard, rows)
        elif op == "scores":
            rows = len(model.loss.get(shard, ())) + data.draw(st.sampled_from([0, 0, 0, 1]))
            ref, emb = rng.gamma(2.0, 1.0, rows).astype(np.float32), rng.standard_normal((rows, 3)).astype(np.float16)
            _assert_agree(_outcome(lambda: pool.set_scores(shard, ref, emb)),
                          _outcome(lambda: model.set_scores(shard, ref, emb)), "set_scores")  # fmt: skip
        elif op == "clusters":
            rows = len(model.loss.get(shard, ())) + data.draw(st.sampled_from([0, 0, 0, -1]))
            clusters = rng.integers(-1, 5, max(rows, 0))
            _assert_agree(_outcome(lambda: pool.set_clusters(shard, clusters)),
                          _outcome(lambda: model.set_clusters(shard, clusters)), "set_clusters")  # fmt: skip
        elif op == "replaced":
            pool.reference_replaced()
            model.reference_replaced()
        elif op == "report":
            ids = _ids(data, model, strays=data.draw(st.sampled_from([False, False, True])))
            if len(ids) and data.draw(st.booleans()):
                ids = np.concatenate([ids, ids[: data.draw(st.integers(1, len(ids)))]])  # coalesced twice
            losses = rng.gamma(2.0, 1.0, len(ids)).astype(np.float32)
            _assert_agree(_outcome(lambda: pool.record_losses(ids, losses)),
                          _outcome(lambda: model.record_losses(ids, losses)), "record_losses")  # fmt: skip
        elif op == "lookup":
            # Ids of scored shards only, at times: an embedding lookup of any other fails.
            of = model.ref if data.draw(st.booleans()) else None
            ids = _ids(data, model, strays=data.draw(st.booleans()), of=of)
            for what, mine, theirs in [
                ("learner_loss", pool.learner_loss, lambda x: model.lookup("loss", x)),
                ("best_learner_loss", pool.best_learner_loss, lambda x: model.lookup("best", x)),
                ("reference_loss", pool.reference_loss, lambda x: model.lookup("ref", x)),
                ("embedding", pool.embedding, lambda x: model.lookup("emb", x)),
                ("cluster_of", pool.cluster_of, model.cluster_of),
                ("fallback_learner_loss", pool.fallback_learner_loss, model.fallback),
                ("check_ids", pool.check_ids, model.check_ids),
            ]:
                if what == "embedding" and not len(ids):
                    continue  # per-shard arrays had no shard to tell the width by
                _assert_agree(_outcome(lambda: mine(ids)), _outcome(lambda: theirs(ids)), what)
        else:
            state = pool.get_state()
            expected = model.get_state()
            assert state.keys() == expected.keys()
            for key in state:
                np.testing.assert_array_equal(state[key], expected[key], err_msg=key, strict=True)
            if data.draw(st.booleans()):  # as saved before best losses and per-cluster averages
                state = {k: v for k, v in state.items() if k != "best_loss" and not k.startswith("cluster_loss")}
            pool, model = PoolIndex(), PerShardPool(state)
            pool.reset(state)
        _assert_same_pool(pool, model)


def test_a_shard_rewritten_over_and_over_keeps_the_columns_bounded() -> None:
    pool = PoolIndex()
    pool.ensure_shard(0, 5000)
    pool.set_scores(0, np.ones(5000, np.float32), np.ones((5000, 4), np.float16))
    for i in range(300):
        pool.ensure_shard(1, 3000 + i % 2)  # rewritten: another row count each time
        pool.set_scores(1, np.full(3000 + i % 2, 2.0, np.float32), np.zeros((3000 + i % 2, 4), np.float16))
        assert len(pool._loss) <= 6 * len(pool) and len(pool._emb) == len(pool._loss)
    np.testing.assert_array_equal(pool.reference_loss(make_ids(0, 5000)), np.ones(5000, np.float32))
    np.testing.assert_array_equal(pool.reference_loss(make_ids(1, 3001)), np.full(3001, 2.0, np.float32))
    assert len(pool) == 8001
