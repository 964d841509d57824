"""The next epoch starts reading before a rank asks for it (`CuratorActor._start_next_early`);
what ranks receive does not change: shards added meanwhile are in it, and a rank still reading
the epoch before it gets all of that epoch."""

from __future__ import annotations

import numpy as np

from loader import RemoteLoader
from loader.client.admin import add_shards
from loader.ids import make_ids
from loader.sources.writers import write_tar
from tests.helpers import epoch_ids


def _shard(path: str, rows: int, start: int) -> str:
    write_tar(path, [{"x": np.full(4, start + i, np.float32), "y": i % 3} for i in range(rows)])
    return path


def _ids(batches: list[np.ndarray]) -> list[int]:
    return sorted(np.concatenate(batches).tolist())


def test_a_shard_added_after_an_epoch_is_in_the_next_though_it_started_early(tmp_path, serve) -> None:
    paths = [_shard(str(tmp_path / "a.tar"), 20, 0), _shard(str(tmp_path / "b.tar"), 30, 100)]
    svc = serve(paths, shuffle_rows=16)
    with RemoteLoader(svc.address, job="early-add", batch_size=8, timeout_s=60) as loader:
        assert len(_ids(epoch_ids(loader))) == 50
        # Epoch 0's reading ended before its last batch: epoch 1 is being read already.
        (added,) = add_shards(svc.address, [_shard(str(tmp_path / "c.tar"), 12, 200)])
        assert added.state == "ok"
        expected = sorted(np.concatenate([make_ids(0, 20), make_ids(1, 30), make_ids(added.index, 12)]).tolist())
        assert _ids(epoch_ids(loader)) == expected
        assert _ids(epoch_ids(loader)) == expected


def test_a_lagging_rank_still_gets_its_epoch_when_the_one_after_the_next_starts_early(tmp_path, serve) -> None:
    paths = [_shard(str(tmp_path / f"{i}.tar"), 24, 100 * i) for i in range(3)]
    svc = serve(paths, shuffle_rows=16)
    job = dict(job="early-lag", batch_size=6, world_size=2, timeout_s=60)
    with RemoteLoader(svc.address, rank=0, **job) as ahead:
        mine = [epoch_ids(ahead), epoch_ids(ahead)]  # epochs 0 and 1: epoch 2 then starts early
    with RemoteLoader(svc.address, rank=1, **job) as behind:
        theirs = epoch_ids(behind)  # epoch 0, which epoch 2's start must not have forgotten
    assert len(theirs) == len(mine[0]) and sorted(_ids(mine[0]) + _ids(theirs)) == _ids(
        [make_ids(i, 24) for i in range(3)]
    )
