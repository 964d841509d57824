"""The registry's row count of a shard follows what the curator last read of it, though a shard
read again with the rows the registry already holds costs no registry call."""

from __future__ import annotations

import numpy as np

from loader import RemoteLoader
from loader.sources.writers import write_tar
from tests.helpers import epoch_ids


def _shard(path: str, rows: int, start: int) -> None:
    write_tar(path, [{"x": np.full(4, start + i, np.float32), "y": i % 3} for i in range(rows)])


def test_rows_of_a_shard_rewritten_between_epochs_reach_the_registry(tmp_path, serve) -> None:
    paths = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    _shard(paths[0], 20, 0)
    _shard(paths[1], 30, 100)
    svc = serve(paths, shuffle_rows=16)
    with RemoteLoader(svc.address, job="rewritten", batch_size=8, timeout_s=60) as loader:
        assert sum(len(b) for b in epoch_ids(loader)) == 50
        assert sorted((s.uri, s.rows) for s in loader.stats().shards) == [(paths[0], 20), (paths[1], 30)]
        assert sum(len(b) for b in epoch_ids(loader)) == 50  # read again, same rows: nothing changes
        _shard(paths[0], 25, 0)  # another size: another identity, so the readers read it again
        assert sum(len(b) for b in epoch_ids(loader)) == 55
        assert sorted((s.uri, s.rows) for s in loader.stats().shards) == [(paths[0], 25), (paths[1], 30)]
