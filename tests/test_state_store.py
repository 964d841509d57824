"""StateStore: whole files replaced atomically, journals that survive a write cut short."""

from __future__ import annotations

import numpy as np

from loader.state_store import StateStore, job_folder


def batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    considered = rng.integers(0, 2**40, size=20)
    return considered, considered[:5], rng.random(5).astype(np.float32)


def test_journal_reads_back_every_record_in_order(tmp_path) -> None:
    store = StateStore(tmp_path)
    written = [batch(i) for i in range(4)]
    for record in written:
        store.append_batch("jobs/a/epoch-0.log", *record)
    for got, want in zip(store.read_batches("jobs/a/epoch-0.log"), written, strict=True):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_a_record_cut_short_is_dropped_and_the_rest_kept(tmp_path) -> None:
    store = StateStore(tmp_path)
    for i in range(3):
        store.append_batch("e.log", *batch(i))
    path = tmp_path / "e.log"
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # a crash in the middle of the last append
    assert len(store.read_batches("e.log")) == 2
    corrupted = bytearray(data)
    corrupted[30] ^= 0xFF  # a flipped bit in the first record's body: its CRC fails
    path.write_bytes(bytes(corrupted))
    assert store.read_batches("e.log") == []


def test_arrays_and_json_round_trip_and_leave_no_temporary_files(tmp_path) -> None:
    store = StateStore(tmp_path)
    store.save_arrays("jobs/x/soft.npz", {"a": np.arange(5), "b": np.array(2.5)})
    store.save_arrays("jobs/x/soft.npz", {"a": np.arange(3), "b": np.array(1.0)})
    store.save_json("registry.json", {"records": [1, 2]})
    got = store.load_arrays("jobs/x/soft.npz")
    np.testing.assert_array_equal(got["a"], np.arange(3))
    assert store.load_json("registry.json") == {"records": [1, 2]}
    assert store.load_json("missing.json") is None and store.load_arrays("missing.npz") is None
    assert sorted(p.name for p in (tmp_path / "jobs/x").iterdir()) == ["soft.npz"]


def test_job_folders_are_distinct_for_names_that_read_alike() -> None:
    names = ["run/1", "run_1", "run 1", "../etc", "ü"]
    folders = [job_folder(n) for n in names]
    assert len(set(folders)) == len(names)
    # One path component below jobs/, never "." or "..": a job name cannot reach outside.
    assert all(f.startswith("jobs/") and "/" not in f[5:] and f[5:] not in (".", "..") for f in folders)
