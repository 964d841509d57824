"""Messages at the size limits, end to end on real Ray and gRPC: a served batch within 1 KiB of the
service's `max_message_bytes`, and learner weights that take several PushWeights chunks."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from loader import RemoteLoader, codec
from loader.gateway.wire import batch_response
from loader.ids import make_ids
from loader.models import mlp
from loader.reader import read_with_ids
from loader.scoring import inputs_from_table, learner_losses
from loader.sources import read_shard
from loader.sources.writers import write_parquet
from tests.helpers import LOADER_TIMEOUT_S

FEATURES = 8192  # 32 KiB of float32 per row
ROWS = 48  # per shard
SHARDS = 2
BATCH = 32  # 96 rows: three full batches of 1 MiB of inputs each
CHUNK = 1 << 20  # RemoteLoader.push_weights' default chunk
SLACK = 1024  # the limit's room above the largest batch
LEARNER = {"in_features": FEATURES, "hidden": 96, "classes": 10, "depth": 1}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(5)
    paths = []
    for i in range(SHARDS):
        paths.append(str(root / f"wide-{i:06d}.parquet"))
        write_parquet(paths[-1], {"x": rng.normal(size=(ROWS, FEATURES)).astype(np.float32),
                                  "y": rng.integers(0, 10, size=ROWS)})  # fmt: skip
    return paths


def wire_size(path: str, rows: int, seq: int) -> int:
    """Bytes of the TrainResponse that serves `rows` rows of `path` as batch `seq` of epoch 0:
    the curator's Arrow payload (shard columns, `_id`, `_weight`) framed as the gateway frames it."""
    table = read_with_ids(path, 0).table.slice(0, rows)
    table = table.append_column(codec.WEIGHT, pa.array(np.ones(rows, np.float32)))
    return len(batch_response(0, seq, rows, codec.encode(table)))


@pytest.fixture(scope="module")
def limit(shards):
    """The service's and the client's message limit: SLACK above the epoch's largest batch (the
    slack leaves room for a few bytes more of schema metadata, far less than a row)."""
    return SLACK + max(wire_size(shards[0], BATCH, seq) for seq in range(SHARDS * ROWS // BATCH))


@pytest.fixture(scope="module")
def service(serve, shards, limit):
    return serve(shards, max_message_bytes=limit, ready_batches=1)


def pool_rows(stats, shards) -> dict[int, tuple[np.ndarray, int]]:
    """Sample id -> (input row, label), with ids from the service's own shard indices."""
    index = {s.uri: s.index for s in stats.shards}
    assert sorted(index) == sorted(shards)
    rows = {}
    for path in shards:
        table = read_shard(path)
        x, y = inputs_from_table(table)
        for sample_id, xi, yi in zip(make_ids(index[path], table.num_rows).tolist(), x.numpy(), y.tolist()):
            rows[sample_id] = (xi, yi)
    return rows


def test_a_batch_just_under_max_message_bytes_arrives_intact(service, shards, limit):
    assert BATCH * FEATURES * 4 > 0.99 * limit  # the inputs alone are nearly all of it
    batches = []
    with RemoteLoader(service.address, job="at-the-limit", batch_size=BATCH, max_message_bytes=limit,
                      timeout_s=LOADER_TIMEOUT_S) as loader:  # fmt: skip
        for batch in loader:
            batches.append({k: v.numpy().copy() for k, v in batch.items()})
        stats = loader.stats()
    assert [len(b["_id"]) for b in batches] == [BATCH] * (SHARDS * ROWS // BATCH)
    expected = pool_rows(stats, shards)
    served = np.concatenate([b["_id"] for b in batches])
    assert sorted(served.tolist()) == sorted(expected), "a sample was lost or repeated"
    for b in batches:
        assert b["x"].shape == (BATCH, FEATURES) and b["x"].dtype == np.float32
        np.testing.assert_array_equal(b["x"], np.stack([expected[i][0] for i in b["_id"].tolist()]))
        assert b["y"].tolist() == [expected[i][1] for i in b["_id"].tolist()]
        assert (b["_weight"] == 1).all()


def test_the_same_batch_over_max_message_bytes_is_refused_as_resource_exhausted(serve, shards, limit):
    """The limit is where the batch above sits: 1 KiB under that batch's size, it cannot be sent."""
    tight = serve(shards, max_message_bytes=limit - 2 * SLACK, ready_batches=1)
    try:
        with RemoteLoader(tight.address, job="over-the-limit", batch_size=BATCH,
                          timeout_s=LOADER_TIMEOUT_S) as loader:  # fmt: skip
            with pytest.raises(grpc.RpcError) as caught:
                next(iter(loader))
    finally:
        tight.stop()  # frees its share of the test Ray's CPUs now
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()


def learner(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mlp(**LEARNER)


def scorer_learner_losses(service, job: str, table: pa.Table) -> tuple[np.ndarray, int]:
    """The job's learner losses on `table` and the step of the snapshot that computed them, from
    the one scorer holding its snapshot (any other answers (None, -1))."""
    answers = ray.get([s.learner_loss.remote(job, table) for s in service.pipeline.actors()["scorers"]],
                      timeout=LOADER_TIMEOUT_S)  # fmt: skip
    held = [(losses, step) for losses, step in answers if losses is not None]
    assert len(held) == 1, f"{len(held)} scorers hold a snapshot of {job!r}"
    return held[0]


def test_pushed_weights_larger_than_a_chunk_arrive_whole(service, shards):
    buffer = io.BytesIO()
    torch.save(learner(0).state_dict(), buffer)
    assert len(buffer.getvalue()) > 3 * CHUNK  # several chunks, the last one partial
    options = {"keep_ratio": 0.5, "learner_loss": "snapshot", "learner": "loader.models:mlp",
               "learner_kwargs": json.dumps(LEARNER)}  # fmt: skip
    table = read_shard(shards[0])
    inputs, labels = inputs_from_table(table)
    with RemoteLoader(service.address, job="push", batch_size=8, policy="loss", options=options,
                      max_message_bytes=service.pipeline.config.max_message_bytes,
                      timeout_s=LOADER_TIMEOUT_S) as loader:  # fmt: skip
        assert len(next(iter(loader))["_id"]) == 8  # the Train stream opens the job
        # The default chunk, then one that divides nothing evenly: both reassemble to the model.
        for step, chunk_bytes in ((1, CHUNK), (2, 300_001)):
            model = learner(step)
            assert loader.push_weights(model, step=step, chunk_bytes=chunk_bytes) == step
            losses, held_step = scorer_learner_losses(service, "push", table)
            # Every tensor arrived, every byte in place: the scorer's learner is this model...
            np.testing.assert_allclose(losses, learner_losses(model, inputs, labels), rtol=1e-5, atol=1e-6)
            assert held_step == step
        # ...and no longer the one pushed before it (the two differ on these rows).
        assert not np.allclose(losses, learner_losses(learner(1), inputs, labels), rtol=1e-3)
        job = loader.stats().jobs[0]
    assert (job.job, job.weight_pushes, job.weights_step) == ("push", 2, 2)
