"""`len(loader)`: the batches this rank gets in the current epoch, as a DataLoader says it, for one
rank and for two, with a batch size that does not divide the pool; a stream job's len is its
max_steps, and without max_steps it has none (TypeError, like an IterableDataset)."""

from __future__ import annotations

import math
import operator
import threading

import numpy as np
import pytest

from loader import RemoteLoader
from loader.selection.options import super_batch_size
from tests.helpers import LOADER_TIMEOUT_S, epoch_ids, rows_in

BATCH = 50  # the pool has 640 rows: 12.8 batches
JOIN_S = 120


@pytest.fixture(scope="module")
def service(serve, mnist_tar):
    shards = mnist_tar["train"]
    return serve(shards, readers=1, shuffle_rows=64), rows_in(shards)


def loader_for(address: str, job: str, rank: int = 0, world_size: int = 1, **kwargs) -> RemoteLoader:
    return RemoteLoader(
        address, job=job, batch_size=BATCH, rank=rank, world_size=world_size, timeout_s=LOADER_TIMEOUT_S, **kwargs
    )


def test_len_before_the_first_epoch_is_the_number_of_batches_it_yields(service):
    svc, rows = service
    assert rows % BATCH, "the test wants a short last batch"
    with loader_for(svc.address, "len-one-rank") as loader:
        # Nothing has read the pool yet: the service does not know the shards' sizes.
        assert {shard.state for shard in loader.stats().shards} == {"pending"}
        expected = len(loader)
        assert expected == math.ceil(rows / BATCH) == 13
        for epoch in range(2):
            batches = epoch_ids(loader)
            assert len(batches) == expected, f"epoch {epoch}"
            assert sum(map(len, batches)) == rows
            assert len(loader) == expected  # asked again for the next epoch


def test_len_of_each_of_two_ranks_is_what_that_rank_gets(service):
    svc, rows = service
    loaders = [loader_for(svc.address, "len-two-ranks", rank, 2) for rank in range(2)]
    lengths = [len(loader) for loader in loaders]
    served: list = [None, None]
    errors: list = []

    def run(rank: int) -> None:
        try:
            served[rank] = epoch_ids(loaders[rank])
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
        assert not t.is_alive(), f"a rank did not finish its epoch within {JOIN_S} s"
    for loader in loaders:
        loader.close()
    if errors:
        raise errors[0]
    # 13 batches of the pool do not split in two: the tail is cut so each rank gets 7.
    assert lengths == [len(served[0]), len(served[1])] == [7, 7]
    ids = np.concatenate(served[0] + served[1])
    assert len(ids) == rows == len(np.unique(ids))


def test_len_of_a_curated_job_follows_the_services_default_keep_ratio(service):
    """`loss` without a keep_ratio of its own takes the service's default (0.2): super-batches of
    250 candidates, one batch each. Only the service knows that default, before the job exists."""
    svc, rows = service
    with loader_for(svc.address, "len-curated", policy="loss") as loader:
        assert not [job for job in loader.stats().jobs if job.job == "len-curated"]
        expected = len(loader)
        assert expected == math.ceil(rows / super_batch_size(BATCH, 0.2)) == 3
        batches = epoch_ids(loader)
    assert len(batches) == expected
    assert all(len(ids) <= BATCH for ids in batches)


def test_a_stream_job_has_its_max_steps_as_len_and_none_without(service):
    svc, _ = service
    with loader_for(svc.address, "len-stream", stream=True, max_steps=30) as loader:
        assert len(loader) == 30  # the total, as an LR schedule wants it, also once steps are taken
        batches = epoch_ids(loader)  # more than two passes over the pool (13 batches each)
        assert len(batches) == 30 and len(loader) == 30
    with loader_for(svc.address, "len-endless", stream=True) as loader:
        with pytest.raises(TypeError, match="max_steps"):
            len(loader)
        assert operator.length_hint(loader, -1) == -1  # what list() and tqdm see: no length
