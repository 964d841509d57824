"""Watched patterns: a new file joins once it is complete (unchanged over two polls), once only;
and a service with `watch` serves a file dropped into the folder to a running stream job."""

from __future__ import annotations

import os
import time

import numpy as np

from loader import RemoteLoader
from loader.ids import shard_of
from loader.sources.writers import write_parquet
from loader.watch import ShardWatcher
from tests.helpers import LOADER_TIMEOUT_S


def test_a_file_is_taken_once_it_stops_changing_and_only_once(tmp_path):
    known = tmp_path / "a.parquet"
    known.write_bytes(b"old")
    watcher = ShardWatcher([str(tmp_path / "*.parquet")], known={str(known)})
    growing = tmp_path / "b.parquet"
    growing.write_bytes(b"1")
    assert watcher.poll() == []  # first sight: it may still be written
    growing.write_bytes(b"12")
    assert watcher.poll() == []  # it changed since
    assert watcher.poll() == [str(growing)]
    assert watcher.poll() == []  # never twice
    growing.write_bytes(b"123")
    assert watcher.poll() == [] and watcher.poll() == []
    (tmp_path / "c.txt").write_bytes(b"x")  # not matched
    assert watcher.poll() == []


def test_a_file_that_vanishes_before_it_is_complete_is_not_taken(tmp_path):
    watcher = ShardWatcher([str(tmp_path / "*.parquet")])
    brief = tmp_path / "brief.parquet"
    brief.write_bytes(b"x")
    assert watcher.poll() == []
    os.remove(brief)
    assert watcher.poll() == []


def test_a_watched_folder_feeds_a_running_stream(serve, tmp_path):
    rng = np.random.default_rng(0)

    def shard(path):
        write_parquet(str(path), {"x": rng.normal(size=(100, 4)).astype(np.float32), "y": rng.integers(0, 2, 100)})
        return str(path)

    first = shard(tmp_path / "part-000.parquet")
    service = serve([first], watch=[str(tmp_path / "*.parquet")], watch_poll_s=0.1, shuffle_rows=64)
    try:
        with RemoteLoader(service.address, job="watched", batch_size=10, stream=True, timeout_s=LOADER_TIMEOUT_S) as loader:
            it = iter(loader)
            next(it)
            shard(tmp_path / "part-001.parquet.tmp")  # written under another name, then moved in
            os.rename(tmp_path / "part-001.parquet.tmp", tmp_path / "part-001.parquet")
            deadline = time.monotonic() + 60
            while not (shard_of(next(it)["_id"].numpy()) == 1).any():
                assert time.monotonic() < deadline, "the watched file was not served within 60 s"
            it.close()
            shards = {s.uri: s.state for s in loader.stats().shards}
    finally:
        service.stop()
    assert shards == {first: "ok", str(tmp_path / "part-001.parquet"): "ok"}
