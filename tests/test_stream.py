"""Stream jobs over a living pool: passes one after another without a loop ending, shards added
while a stream runs (through the `loader add-shards` CLI) served in the same pass, refused shards
named with their reason, and a stream resumed from `state_dict` losing and repeating no batch."""

from __future__ import annotations

import time

import numpy as np
import pytest

from loader import RemoteLoader
from loader.cli import main as cli
from loader.ids import shard_of
from loader.sources.writers import write_parquet
from tests.helpers import LOADER_TIMEOUT_S

ROWS, SHUFFLE_ROWS, BATCH = 200, 128, 25


def write_shards(root, first: int, count: int) -> list[str]:
    rng = np.random.default_rng(first)
    paths = []
    for i in range(first, first + count):
        paths.append(str(root / f"part-{i:03d}.parquet"))
        write_parquet(paths[-1], {"x": rng.normal(size=(ROWS, 8)).astype(np.float32), "y": rng.integers(0, 3, ROWS)})
    return paths


@pytest.fixture
def living(serve, tmp_path):
    """A service over 3 shards of 200 rows, with room (`tmp_path`) for shards added later."""
    service = serve(write_shards(tmp_path, 0, 3), shuffle_rows=SHUFFLE_ROWS, ready_batches=1)
    yield service, tmp_path
    service.stop()  # its actors hold CPU shares of the 2-CPU test Ray


def stream(address: str, job: str, **kwargs) -> RemoteLoader:
    return RemoteLoader(address, job=job, batch_size=BATCH, stream=True, timeout_s=LOADER_TIMEOUT_S, **kwargs)


def ids_of(loader, batches: int | None = None) -> list[np.ndarray]:
    out = []
    for batch in loader:
        out.append(batch["_id"].numpy().copy())
        if len(out) == batches:
            break
    return out


def test_a_stream_runs_pass_after_pass_until_max_steps_without_a_near_repeat(living):
    service, _ = living
    with stream(service.address, "endless", max_steps=70) as loader:
        batches = ids_of(loader)  # one loop: 70 x 25 = 1,750 rows from a pool of 600
        assert loader.state_dict()["epoch"] >= 2, "three passes should have begun"
    assert len(batches) == 70 and all(len(b) == BATCH for b in batches[:20])
    served = np.concatenate(batches)
    # Every sample of the pool came; samples came again in later passes, never soon after.
    assert len(np.unique(served)) == 3 * ROWS
    last_seen: dict[int, int] = {}
    gaps = []
    for position, sample in enumerate(served.tolist()):
        if sample in last_seen:
            gaps.append(position - last_seen[sample])
        last_seen[sample] = position
    assert gaps, "no sample was served twice over almost three passes"
    window = min(SHUFFLE_ROWS, 3 * ROWS // 2)
    assert min(gaps) >= window, f"a sample came again after only {min(gaps)} rows (window {window})"


def test_a_stream_resumed_from_state_dict_loses_and_repeats_no_batch(living):
    service, _ = living
    # Same seed, same pool, no reported losses: one uninterrupted stream is the reference order.
    with stream(service.address, "whole", max_steps=40) as loader:
        whole = ids_of(loader)
    with stream(service.address, "halves", max_steps=40) as loader:
        first = ids_of(loader, 29)  # past the first pass (24 batches), mid-way through the second
        state = loader.state_dict()
    with stream(service.address, "halves", max_steps=40) as loader:
        loader.load_state_dict(state)
        rest = ids_of(loader)
    assert len(first) + len(rest) == 40
    for i, (a, b) in enumerate(zip(whole, first + rest)):
        np.testing.assert_array_equal(a, b, err_msg=f"batch {i} differs after the resume")


def test_shards_added_while_streaming_are_served_in_the_same_pass(living, capsys):
    service, root = living
    new = write_shards(root, 3, 2)
    with stream(service.address, "arrivals") as loader:
        it = iter(loader)
        for _ in range(3):
            next(it)
        assert cli(["add-shards", "--address", service.address, *new]) == 0
        added = time.monotonic()
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[:3] for line in lines] == [["3", "ok", new[0]], ["4", "ok", new[1]]]
        epoch = loader.state_dict()["epoch"]
        seen_new = None
        for _ in range(60):
            ids = next(it)["_id"].numpy()
            if (shard_of(ids) >= 3).any():
                seen_new = time.monotonic() - added
                break
        assert seen_new is not None, "no sample of the added shards within 60 batches"
        assert loader.state_dict()["epoch"] == epoch, "the new shards waited for the next pass"
        it.close()


def test_a_bad_uri_or_another_schema_is_refused_by_name_and_the_stream_goes_on(living, capsys):
    service, root = living
    other = str(root / "other-schema.parquet")
    write_parquet(other, {"x": np.zeros((10, 8), np.float32), "label": np.zeros(10, np.int64)})
    missing = str(root / "never-written.parquet")
    with stream(service.address, "refusals", max_steps=30) as loader:
        it = iter(loader)
        next(it)
        assert cli(["add-shards", "--address", service.address, missing, other]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2
        assert lines[0].split()[1:3] == ["quarantined", missing] and "not found" in lines[0]
        assert lines[1].split()[1:3] == ["quarantined", other]
        assert "schema differs from the pool's: lacks column 'y'" in lines[1], lines[1]
        rest = [batch["_id"].numpy() for batch in it]
    assert len(rest) == 29
    assert not (shard_of(np.concatenate(rest)) >= 3).any()


def test_a_restarted_service_goes_on_with_the_same_stream_and_its_added_shards(serve, tmp_path):
    state_dir = str(tmp_path / "state")
    paths = write_shards(tmp_path, 0, 3)
    service = serve(paths, shuffle_rows=SHUFFLE_ROWS, ready_batches=1, state_dir=state_dir)
    with stream(service.address, "durable", max_steps=36) as loader:
        first = ids_of(loader, 30)  # into the second pass
        state = loader.state_dict()
    added = write_shards(tmp_path, 3, 1)
    assert cli(["add-shards", "--address", service.address, *added]) == 0
    service.stop()

    again = serve(paths, shuffle_rows=SHUFFLE_ROWS, ready_batches=1, state_dir=state_dir)
    try:
        with stream(again.address, "durable", max_steps=36) as loader:
            loader.load_state_dict(state)
            rest = ids_of(loader)
            shards = [(s.index, s.uri, s.state) for s in loader.stats().shards]
    finally:
        again.stop()
    assert len(first) + len(rest) == 36
    assert shards == [(i, p, "ok") for i, p in enumerate(paths + added)]
    # The second pass resumed where it was: no batch of it lost or served twice.
    second = np.concatenate(first[24:] + rest)
    assert len(np.unique(second)) == len(second)
