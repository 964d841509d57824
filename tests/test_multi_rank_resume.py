"""A 4-rank job stopped mid-epoch and resumed from each rank's state_dict() serves every sample of
the epoch exactly once across its ranks, as DDP ranks that checkpoint and restart would see it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from loader import RemoteLoader
from loader.ids import make_ids
from tests.helpers import LOADER_TIMEOUT_S, rows_in

WORLD = 4
BATCH = 16
# Batches each rank has trained on when the job stops: every rank at another point of the epoch.
BEFORE_STOP = [1, 2, 3, 5]
JOIN_S = 120


@pytest.fixture(scope="module")
def service(serve, mnist_tar):
    return serve(mnist_tar["train"], shuffle_rows=64)


def on_every_rank(work) -> list:
    """work(rank) on every rank at once, in threads (as DDP ranks run side by side)."""
    results: list = [None] * WORLD
    errors: list = []

    def main(rank: int) -> None:
        try:
            results[rank] = work(rank)
        except Exception as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(rank,)) for rank in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
        assert not t.is_alive(), f"a rank did not finish within {JOIN_S} s"
    if errors:
        raise errors[0]
    return results


def loader_for(address: str, rank: int) -> RemoteLoader:
    return RemoteLoader(address, job="four-ranks", batch_size=BATCH, rank=rank, world_size=WORLD,
                        timeout_s=LOADER_TIMEOUT_S)  # fmt: skip


def test_four_ranks_resumed_mid_epoch_serve_every_sample_exactly_once(service, mnist_tar):
    def until_stop(rank: int) -> tuple[list[np.ndarray], dict]:
        with loader_for(service.address, rank) as loader:
            taken = []
            for batch in loader:
                taken.append(batch["_id"].numpy().copy())
                if len(taken) == BEFORE_STOP[rank]:
                    break
            return taken, loader.state_dict()

    stopped = on_every_rank(until_stop)
    states = [state for _, state in stopped]
    assert [(s["rank"], s["epoch"], s["seq"]) for s in states] == [(r, 0, n) for r, n in enumerate(BEFORE_STOP)]

    def resumed(rank: int) -> tuple[list[np.ndarray], object]:
        with loader_for(service.address, rank) as loader:  # a new loader, as in a restarted trainer
            loader.load_state_dict(states[rank])
            rest = [batch["_id"].numpy().copy() for batch in loader]
            assert loader.state_dict()["epoch"] == 1, "the resumed epoch did not run to its end"
            stats = loader.stats()
            return rest, stats

    finished = on_every_rank(resumed)
    per_rank = [taken + rest for (taken, _), (rest, _) in zip(stopped, finished)]
    stats = finished[0][1]
    pool = np.concatenate([make_ids(s.index, s.rows) for s in stats.shards])
    assert len(pool) == rows_in(mnist_tar["train"])
    served = np.concatenate([ids for batches in per_rank for ids in batches])
    assert len(served) == len(np.unique(served)), "a sample was served twice across the ranks"
    assert np.array_equal(np.sort(served), np.sort(pool)), f"{len(pool) - len(served)} samples lost"
    # Each rank's batches came in seq order, none skipped: every rank got its equal share.
    assert len({len(batches) for batches in per_rank}) == 1, [len(b) for b in per_rank]
