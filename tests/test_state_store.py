"""StateStore: whole files replaced atomically, journals that survive a write cut short and
are fsynced at a bounded interval."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from loader.files import atomic_file
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


# --- atomic_file ------------------------------------------------------------------------------


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path) -> None:
    target = tmp_path / "deep" / "er" / "f.bin"
    with atomic_file(target) as temp:
        assert not target.exists()  # nothing under the final name until the block is done
        Path(temp).write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="died mid-write"):
        with atomic_file(target) as temp:
            Path(temp).write_bytes(b"half of the sec")
            raise RuntimeError("died mid-write")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]  # the temporary file went


def test_atomic_file_gives_new_files_the_usual_permissions(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "f") as temp:
            Path(temp).write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644  # as open() would create it


# --- journal fsync policy -----------------------------------------------------------------------


class Disk:
    """A clock the test moves and an fsync that counts, around the real file writes."""

    def __init__(self) -> None:
        self.now = 0.0
        self.fsyncs = 0

    def clock(self) -> float:
        return self.now

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        self.fsyncs += 1


def test_a_journal_is_fsynced_at_most_once_per_interval(tmp_path) -> None:
    disk = Disk()
    store = StateStore(tmp_path, journal_sync_s=1.0, clock=disk.clock, fsync=disk.fsync)
    store.append_batch("e.log", *batch(0))
    assert disk.fsyncs == 1  # the first record at once
    for i in range(1, 10):  # nine more within the interval: none
        disk.now += 0.1
        store.append_batch("e.log", *batch(i))
    assert disk.fsyncs == 1 and disk.now < 1.0
    disk.now = 1.0  # the interval is over: the next append fsyncs, with everything before it
    store.append_batch("e.log", *batch(10))
    assert disk.fsyncs == 2
    disk.now = 1.5
    store.append_batch("e.log", *batch(11))
    assert disk.fsyncs == 2
    # Records are readable at once, fsynced or not: a crash of the process loses none of them.
    assert len(StateStore(tmp_path).read_batches("e.log")) == 12


def test_sync_close_and_the_next_journal_fsync_what_is_left(tmp_path) -> None:
    disk = Disk()
    store = StateStore(tmp_path, journal_sync_s=60.0, clock=disk.clock, fsync=disk.fsync)
    store.append_batch("epoch-0.log", *batch(0))
    store.sync()  # the first record was fsynced already: nothing to do
    assert disk.fsyncs == 1
    store.append_batch("epoch-0.log", *batch(1))
    store.sync()
    assert disk.fsyncs == 2
    store.append_batch("epoch-0.log", *batch(2))
    store.append_batch("epoch-1.log", *batch(3))  # moving on: epoch 0's tail, then epoch 1's first
    assert disk.fsyncs == 4
    store.append_batch("epoch-1.log", *batch(4))
    store.close()
    store.close()  # nothing open any more
    assert disk.fsyncs == 5
    store.append_batch("epoch-1.log", *batch(5))  # reopened, appended after the others
    assert [len(store.read_batches(f"epoch-{e}.log")) for e in (0, 1)] == [3, 3]


def test_removing_the_open_journal_closes_it_and_a_new_one_starts_empty(tmp_path) -> None:
    disk = Disk()
    store = StateStore(tmp_path, journal_sync_s=60.0, clock=disk.clock, fsync=disk.fsync)
    store.append_batch("e.log", *batch(0))
    store.append_batch("e.log", *batch(1))
    store.remove("e.log")
    assert not (tmp_path / "e.log").exists() and disk.fsyncs == 1  # a removed journal needs none
    store.append_batch("e.log", *batch(2))
    (got,) = store.read_batches("e.log")
    np.testing.assert_array_equal(got[0], batch(2)[0])


def test_interval_zero_fsyncs_every_record(tmp_path) -> None:
    disk = Disk()
    store = StateStore(tmp_path, journal_sync_s=0.0, clock=disk.clock, fsync=disk.fsync)
    for i in range(5):
        store.append_batch("e.log", *batch(i))
    assert disk.fsyncs == 5
    with pytest.raises(ValueError, match="journal_sync_s"):
        StateStore(tmp_path, journal_sync_s=-1.0)
