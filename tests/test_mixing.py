"""Cluster bandit and diversity memory on real Ray and gRPC."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loader import RemoteLoader
from loader.ids import make_ids
from loader.models import mlp
from loader.reference import train_reference
from loader.scoring import ModelSpec
from loader.sources.writers import write_parquet
from tests.helpers import blobs, rows_in

NOISE_SHARD = 4
COPIES_SHARD = 5


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Four shards of learnable blobs, one shard of pure noise inputs with random labels, one
    shard of 64 exact copies of one easy sample; a reference trained on a clean holdout."""
    root = tmp_path_factory.mktemp("mixing")
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(10, 40)).astype(np.float32) * 2
    paths = []
    for i in range(4):
        paths.append(str(root / f"train-{i:06d}.parquet"))
        write_parquet(paths[-1], blobs(rng, centroids, 256))
    noise = {"x": (rng.normal(size=(256, 40)) * 6).astype(np.float32), "y": rng.integers(0, 10, 256)}
    paths.append(str(root / f"train-{NOISE_SHARD:06d}.parquet"))
    write_parquet(paths[-1], noise)
    copies = {"x": np.repeat(centroids[3:4], 64, axis=0), "y": np.full(64, 3)}
    paths.append(str(root / f"train-{COPIES_SHARD:06d}.parquet"))
    write_parquet(paths[-1], copies)
    holdout = str(root / "holdout-000000.parquet")
    write_parquet(holdout, blobs(rng, centroids, 512))
    weights = str(root / "ref.pt")
    train_reference(ModelSpec("loader.models:mlp"), [holdout], weights, epochs=20, progress=False)
    return paths, weights


@pytest.fixture(scope="module")
def service(serve, pool):
    paths, weights = pool
    return serve(paths, shuffle_rows=2048, reference={"factory": "loader.models:mlp", "weights": weights})


def test_noise_cluster_loses_bandit_weight_within_bounded_steps(service):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = RemoteLoader(service.address, job="bandit", batch_size=32, timeout_s=60, policy="learnability+bandit",
                          options={"keep_ratio": 1.0, "max_clusters": 16})  # fmt: skip
    for _ in range(2):  # 2 epochs of 44 batches: a bounded number of steps
        noise_at = []  # batch positions of noise samples in the epoch
        for step, batch in enumerate(loader):
            losses = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
            losses.mean().backward()
            opt.step()
            opt.zero_grad()
            loader.report(batch, losses)
            noise_at += [step] * int((batch["_id"] >> 32 == NOISE_SHARD).sum())
    clusters = list(loader.stats().jobs[0].clusters)
    loader.close()
    assert len(clusters) >= 3
    # The cluster of the noise inputs: where most of the noise shard's samples went (a far
    # outlier may open a tiny cluster of its own with a higher reference loss).
    noise_ids = make_ids(NOISE_SHARD, 256)
    members = asyncio.run(service.pipeline.cluster_of("bandit", noise_ids))
    junk = next(c for c in clusters if c.id == np.bincount(members[members >= 0]).argmax())
    uniform_weight = 1 / len(clusters)
    assert junk.weight < 0.5 * uniform_weight, [(c.id, c.size, round(c.weight, 3), round(c.reference_loss, 2)) for c in clusters]
    # Every cluster made of noise (the reference cannot fit it) is below a uniform share, and the
    # noise is served later in the epoch than the average sample (keep ratio 1 serves it all).
    noisy = [c for c in clusters if c.reference_loss > 3]
    assert noisy and all(c.weight < uniform_weight for c in noisy)
    assert np.mean(noise_at) > 0.5 * step, (np.mean(noise_at), step)
    assert sum(c.weight for c in clusters) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("diversity, served_copies", [(0.0, range(10, 65)), (2.0, range(0, 2))])
def test_exact_duplicates_are_suppressed_while_remembered(service, pool, diversity, served_copies):
    """The 64 copies are the easiest samples of the pool: without diversity easy_reference serves
    many of them. With it, at most one: once a copy is served the memory (larger than the pool)
    holds its exact embedding, and every later copy is penalised by the full similarity."""
    options = {"keep_ratio": 0.25, "diversity": diversity, "chunk": 1, "memory_size": 4096}
    with RemoteLoader(service.address, job=f"diversity-{diversity}", batch_size=32, timeout_s=60,
                      policy="easy_reference", options=options) as loader:  # fmt: skip
        copies = sum(int((batch["_id"] >> 32 == COPIES_SHARD).sum()) for batch in loader)
        stats = loader.stats()
    assert copies in served_copies, copies
    # Every sample, each copy included, was a candidate: what kept copies out was the selection.
    shards = {s.index: s for s in stats.shards}
    assert (shards[COPIES_SHARD].state, shards[COPIES_SHARD].rows) == ("ok", 64)
    assert stats.jobs[0].samples_considered == rows_in(pool[0])


def test_pipeline_reports_cluster_members_and_actor_processes(service):
    """Analysis tools read cluster membership and actor PIDs from the Pipeline, not from actor
    internals: the membership must add up to GetStats' cluster sizes."""
    with RemoteLoader(service.address, job="members", batch_size=32, timeout_s=60, policy="learnability+bandit",
                      options={"keep_ratio": 0.5}) as loader:  # fmt: skip
        for _ in loader:
            pass
        stats = loader.stats()
    ids = np.concatenate([make_ids(s.index, s.rows) for s in stats.shards if s.rows])
    members = asyncio.run(service.pipeline.cluster_of("members", ids))
    sizes = {c.id: c.size for c in stats.jobs[0].clusters}
    assert (members >= 0).all()
    assert np.bincount(members, minlength=len(sizes)).tolist() == [sizes[c] for c in range(len(sizes))]
    with pytest.raises(Exception, match="is not in the pool"):
        asyncio.run(service.pipeline.cluster_of("members", make_ids(99, 1)))

    processes = service.pipeline.processes()
    assert {"gateway", "raylet", "RegistryActor-1", "ShardReaderActor-1", "CuratorActor-1"} <= set(processes)
    for pid in processes.values():
        os.kill(pid, 0)  # each is a live process: raises if not
