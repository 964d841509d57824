"""Unit tests for `loader.selection.clusters`: online clusters with stable ids."""

from __future__ import annotations

import numpy as np
import pytest

from loader.selection.clusters import OnlineClusters

D = 32


def _centres(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(size=(n, D))


def _blob(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float = 0.05) -> np.ndarray:
    # Spread per coordinate; the centres have norm ~sqrt(D), so blobs are tight cones.
    return (centre + spread * rng.normal(size=(n, D))).astype(np.float32)


def _purity(ids: np.ndarray, truth: np.ndarray) -> None:
    """Every true blob maps to clusters of its own: no id is shared by two blobs."""
    for blob in np.unique(truth):
        assert not np.isin(ids[truth == blob], ids[truth != blob]).any(), blob


def test_separated_blobs_get_distinct_stable_ids() -> None:
    rng = np.random.default_rng(0)
    centres = _centres(rng, 4)
    truth = rng.integers(0, 4, size=800)
    x = np.vstack([_blob(rng, centres[t], 1) for t in truth])
    clusters = OnlineClusters(max_clusters=16, init_clusters=4)
    ids = clusters.assign(x)
    assert ids.dtype == np.int32 and clusters.num_clusters == 4
    assert set(ids.tolist()) == {0, 1, 2, 3}
    _purity(ids, truth)
    # A blob keeps its id through later calls and through centroid updates.
    for _ in range(5):
        truth2 = rng.integers(0, 4, size=300)
        x2 = np.vstack([_blob(rng, centres[t], 1) for t in truth2])
        ids2 = clusters.assign(x2)
        mapping = {t: ids[truth == t][0] for t in range(4)}
        np.testing.assert_array_equal(ids2, [mapping[t] for t in truth2])
    np.testing.assert_array_equal(clusters.predict(x), ids)
    assert clusters.num_clusters == 4  # nothing was far


def test_a_far_new_blob_opens_one_cluster() -> None:
    rng = np.random.default_rng(1)
    centres = _centres(rng, 5)
    clusters = OnlineClusters(max_clusters=16, init_clusters=3)
    first = clusters.assign(np.vstack([_blob(rng, centres[i], 200) for i in range(3)]))
    assert clusters.num_clusters == 3
    mixed = np.vstack([_blob(rng, centres[0], 50), _blob(rng, centres[3], 80), _blob(rng, centres[4], 80)])
    ids = clusters.assign(mixed)
    assert clusters.num_clusters == 5  # one per new blob, not one per point
    assert (ids[:50] == first[0]).all()
    assert len(set(ids[50:130].tolist())) == 1 and len(set(ids[130:].tolist())) == 1
    assert set(ids[50:].tolist()) == {3, 4}  # new ids are appended
    # Points near the new centroid land there from now on.
    assert (clusters.predict(_blob(rng, centres[3], 20)) == ids[50]).all()


def test_a_starved_cluster_keeps_its_centroid() -> None:
    # MiniBatchKMeans would by default move a centroid with few members onto other data.
    rng = np.random.default_rng(6)
    centres = _centres(rng, 3)
    clusters = OnlineClusters(max_clusters=8, init_clusters=3)
    ids = clusters.assign(np.vstack([_blob(rng, centres[i], 100) for i in range(3)]))
    before = clusters.centroids
    for _ in range(40):
        clusters.assign(_blob(rng, centres[0], 1024))
    np.testing.assert_array_equal(clusters.centroids[ids[[100, 200]]], before[ids[[100, 200]]])
    probe = np.vstack([_blob(rng, centres[i], 20) for i in range(3)])
    np.testing.assert_array_equal(clusters.predict(probe), np.repeat(ids[[0, 100, 200]], 20))


def test_the_cap_holds() -> None:
    rng = np.random.default_rng(2)
    centres = _centres(rng, 12)
    clusters = OnlineClusters(max_clusters=6, init_clusters=2)
    clusters.assign(np.vstack([_blob(rng, centres[i], 100) for i in range(2)]))
    ids = clusters.assign(np.vstack([_blob(rng, centres[i], 30) for i in range(2, 12)]))
    assert clusters.num_clusters == 6
    assert ids.min() >= 0 and ids.max() == 5


def test_explicit_distance_and_warm_start_with_few_points() -> None:
    rng = np.random.default_rng(3)
    clusters = OnlineClusters(max_clusters=8, init_clusters=4, new_cluster_distance=0.5)
    ids = clusters.assign(rng.normal(size=(2, D)))
    assert clusters.num_clusters == 2 and sorted(ids.tolist()) == [0, 1]
    clusters.assign(rng.normal(size=(1, D)))  # random directions are ~1.4 apart
    assert clusters.num_clusters == 3


def test_unit_geometry_ignores_length() -> None:
    rng = np.random.default_rng(4)
    centres = _centres(rng, 3)
    clusters = OnlineClusters(init_clusters=3)
    x = np.vstack([_blob(rng, centres[i], 100) for i in range(3)])
    ids = clusters.assign(x)
    np.testing.assert_array_equal(clusters.predict(x * rng.uniform(0.01, 100, size=(len(x), 1))), ids)


def test_state_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(5)
    centres = _centres(rng, 6)
    clusters = OnlineClusters(max_clusters=10, init_clusters=3, seed=7)
    clusters.assign(np.vstack([_blob(rng, centres[i], 100) for i in range(3)]))
    clusters.assign(np.vstack([_blob(rng, centres[i], 40) for i in range(6)]))
    np.savez(tmp_path / "c.npz", **clusters.get_state())
    with np.load(tmp_path / "c.npz") as saved:
        restored = OnlineClusters(max_clusters=10, init_clusters=3, seed=7)
        restored.reset(dict(saved))
    probe = rng.normal(size=(2000, D))
    np.testing.assert_array_equal(restored.predict(probe), clusters.predict(probe))
    for key, value in clusters.get_state().items():
        np.testing.assert_array_equal(restored.get_state()[key], value, err_msg=key)
    assert restored.threshold == clusters.threshold
    more = np.vstack([_blob(rng, centres[i], 30) for i in range(6)])
    np.testing.assert_array_equal(restored.assign(more), clusters.assign(more))
    np.testing.assert_allclose(restored.centroids, clusters.centroids, atol=1e-6)
    fresh = OnlineClusters()
    fresh.reset(OnlineClusters().get_state())
    assert fresh.num_clusters == 0


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError):
        OnlineClusters(max_clusters=4, init_clusters=8)
    clusters = OnlineClusters()
    with pytest.raises(RuntimeError):
        clusters.predict(np.ones((1, 4)))
    clusters.assign(np.random.default_rng(0).normal(size=(20, 4)))
    with pytest.raises(ValueError):
        clusters.assign(np.ones((1, 5)))
    with pytest.raises(ValueError):
        clusters.assign(np.array([[np.nan, 0, 0, 0]]))


def _shards(rng: np.random.Generator, centres: np.ndarray, shards: int, rows: int, spread: float):
    for _ in range(shards):
        truth = rng.integers(0, len(centres), size=rows)
        yield truth, centres[truth] + spread * rng.normal(size=(rows, D))


def test_more_groups_than_the_warm_start_open_a_cluster_each() -> None:
    # 20 groups, 8 warm-start clusters: each warm centroid lies between groups. A threshold scaled
    # by the distances to those centroids was beyond every sample, and the count stayed at 8.
    rng = np.random.default_rng(7)
    centres = _centres(rng, 20)
    clusters = OnlineClusters(max_clusters=32, init_clusters=8)
    for truth, x in _shards(rng, centres, 5, 1000, spread=0.3):
        clusters.assign(x)
    assert 20 <= clusters.num_clusters <= 32
    truth, x = next(_shards(rng, centres, 1, 2000, spread=0.3))
    ids = clusters.predict(x)
    _purity(ids, truth)  # one cluster (at least) of its own per group
    assert all(len(set(ids[truth == t].tolist())) == 1 for t in range(20))  # and not split


def test_one_dense_blob_does_not_split_into_more_clusters() -> None:
    rng = np.random.default_rng(8)
    centre = _centres(rng, 1)
    clusters = OnlineClusters(max_clusters=32, init_clusters=8)
    for _, x in _shards(rng, centre, 10, 1000, spread=0.3):
        clusters.assign(x)
    assert clusters.num_clusters == 8
