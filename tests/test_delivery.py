"""Uniform delivery on real Ray and gRPC: every sample exactly once per epoch, equal batch counts."""

from __future__ import annotations

import time

import numpy as np
import pytest

from loader import RemoteLoader
from tests.helpers import epoch_ids, rows_in, run_ranks


@pytest.fixture(scope="module", params=["tar", "parquet"])
def service(request, serve, mnist_tar, mnist_parquet):
    splits = mnist_tar if request.param == "tar" else mnist_parquet
    return serve(splits["train"], shuffle_rows=64), rows_in(splits["train"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_epoch_delivers_every_sample_once_with_equal_batch_counts(service, world_size):
    svc, rows = service
    per_rank = run_ranks(svc.address, f"exactly-once-{world_size}", world_size, batch_size=32)
    ids = np.concatenate([b for rank in per_rank for b in rank])
    assert len(ids) == rows
    assert len(np.unique(ids)) == rows
    assert len({len(rank) for rank in per_rank}) == 1, [len(r) for r in per_rank]
    assert all(len(b) <= 32 for rank in per_rank for b in rank)


def test_batches_hold_the_shard_columns_with_ids_and_weights(service):
    svc, _ = service
    with RemoteLoader(svc.address, job="columns", batch_size=16, timeout_s=60) as loader:
        batch = next(iter(loader))
    assert batch["x"].shape == (16, 40) and batch["x"].dtype.is_floating_point
    assert batch["y"].dtype.is_floating_point is False and batch["y"].shape == (16,)
    assert str(batch["_id"].dtype) == "torch.int64"
    assert str(batch["_weight"].dtype) == "torch.float32"
    assert (batch["_weight"] == 1).all()


def test_second_epoch_reshuffles_and_again_covers_everything(service):
    svc, rows = service
    with RemoteLoader(svc.address, job="two-epochs", batch_size=50, timeout_s=60) as loader:
        first = epoch_ids(loader)
        second = epoch_ids(loader)
        assert loader.state_dict()["epoch"] == 2
    assert sorted(np.concatenate(first)) == sorted(np.concatenate(second))
    assert len(np.concatenate(second)) == rows
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))


def test_acknowledged_batches_are_released_once_the_stream_ends(service):
    # Acks ride on the gateway's next batch request; the last ones go when the stream ends.
    svc, rows = service
    with RemoteLoader(svc.address, job="acks", batch_size=40, timeout_s=60) as loader:
        assert sum(len(b) for b in epoch_ids(loader)) == rows
        deadline = time.monotonic() + 30
        while (held := loader.stats().jobs[0].unacked_batches) != 0:
            assert time.monotonic() < deadline, f"{held} acknowledged batches still held"
            time.sleep(0.05)
