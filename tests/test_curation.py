"""Curated policies on real Ray and gRPC: reference scoring, learnability, snapshots."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import ray
import torch

from loader import RemoteLoader
from loader.ids import make_ids
from loader.models import mlp
from loader.reference import train_reference
from loader.scoring import ModelSpec
from loader.sources import read_shard
from loader.sources.writers import write_parquet
from tests.helpers import LOADER_TIMEOUT_S, blobs, rows_in, run_ranks

KEEP = 0.2


@pytest.fixture(scope="module")
def half_random(tmp_path_factory):
    """Six shards whose last three have random labels, and a reference model trained on a clean
    holdout of the same distribution."""
    root = tmp_path_factory.mktemp("half_random")
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(10, 40)).astype(np.float32) * 2
    paths, random_shards = [], set(range(3, 6))
    for i in range(6):
        columns = blobs(rng, centroids, 128)
        if i in random_shards:
            columns["y"] = rng.integers(0, 10, size=128)
        paths.append(str(root / f"train-{i:06d}.parquet"))
        write_parquet(paths[-1], columns)
    holdout = str(root / "holdout-000000.parquet")
    write_parquet(holdout, blobs(rng, centroids, 512))
    weights = str(root / "ref.pt")
    metrics = train_reference(ModelSpec("loader.models:mlp"), [holdout], weights, epochs=20, progress=False)
    assert metrics["holdout_accuracy"] > 0.9
    return paths, random_shards, weights


@pytest.fixture(scope="module")
def service(serve, half_random):
    paths, _, weights = half_random
    reference = {"factory": "loader.models:mlp", "weights": weights}
    # The shuffle buffer spans the pool so that every super-batch mixes clean and noisy shards.
    return serve(paths, shuffle_rows=1024, ready_batches=1, reference=reference), rows_in(paths)


def served_ids(loader: RemoteLoader, report=None) -> tuple[np.ndarray, np.ndarray]:
    ids, labels = [], []
    for batch in loader:
        ids.append(batch["_id"].numpy().copy())
        labels.append(batch["y"].numpy().copy())
        if report is not None:
            loader.report(batch, report(batch))
    return np.concatenate(ids), np.concatenate(labels)


def test_learnability_under_selects_the_randomly_labelled_half(service, half_random):
    svc, rows = service
    _, random_shards, _ = half_random
    with RemoteLoader(svc.address, job="learnability", batch_size=16, timeout_s=LOADER_TIMEOUT_S, policy="learnability",
                      options={"keep_ratio": KEEP}) as loader:  # fmt: skip
        ids, _ = served_ids(loader)
    # Registry index == position in the (sorted) shard list: the service registered them in order.
    from_random = np.isin(ids >> 32, list(random_shards)).mean()
    share_of_pool = len(random_shards) / len(half_random[0])
    assert from_random < 0.5 * share_of_pool, (from_random, share_of_pool)


def test_uniform_serves_the_random_half_at_its_share(service, half_random):
    """Over a whole epoch uniform serves every sample once, so the random half's share is exactly
    its share of the pool; the claim with teeth is that every part of the epoch, each as long as
    what the learnability job above is served (KEEP of the pool), holds it at that share too."""
    svc, rows = service
    paths, random_shards, _ = half_random
    with RemoteLoader(svc.address, job="uniform-share", batch_size=16, timeout_s=LOADER_TIMEOUT_S) as loader:
        ids, _ = served_ids(loader)
    pool = np.concatenate([make_ids(i, read_shard(p).num_rows) for i, p in enumerate(paths)])
    assert len(ids) == rows and np.array_equal(np.sort(ids), np.sort(pool)), "uniform lost or repeated samples"
    share = len(random_shards) / len(paths)
    window = int(KEEP * rows)
    starts = range(0, rows - window + 1, window)
    shares = [np.isin(ids[i : i + window] >> 32, list(random_shards)).mean() for i in starts]
    # A window draws `window` of the pool's rows at random (the shuffle buffer spans the pool):
    # its share has a standard deviation of about 0.036, so 0.15 is over 4 of them.
    assert len(shares) == round(1 / KEEP) and all(abs(s - share) < 0.15 for s in shares), (share, shares)


@pytest.mark.parametrize("policy", ["learnability", "easy_reference", "loss"])
def test_curated_epoch_considers_everything_once_and_serves_keep_ratio(service, policy):
    svc, rows = service
    per_rank = run_ranks(svc.address, f"semantics-{policy}", 2, batch_size=8, policy=policy,
                         options={"keep_ratio": KEEP})  # fmt: skip
    ids = np.concatenate([b for rank in per_rank for b in rank])
    assert len(np.unique(ids)) == len(ids), "a sample was served twice in one epoch"
    assert abs(len(ids) / rows - KEEP) < 0.02
    assert len(per_rank[0]) == len(per_rank[1])
    with RemoteLoader(svc.address, job=f"semantics-{policy}", batch_size=8, timeout_s=LOADER_TIMEOUT_S,
                      policy=policy, world_size=2, options={"keep_ratio": KEEP}) as loader:  # fmt: skip
        job = loader.stats().jobs[0]
    assert job.samples_considered == rows and job.samples_served == len(ids)


def constant_learner(favoured_wrong: int) -> torch.nn.Module:
    """An MLP whose output ignores its input and all but rules out class `favoured_wrong`, so
    samples of that class get a huge learner loss and top learnability."""
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[-1].bias.fill_(0.0)
        model[-1].bias[favoured_wrong] = -30.0
    return model


def test_snapshot_pushes_change_what_the_curator_selects(service):
    svc, _ = service
    options = {"keep_ratio": KEEP, "learner_loss": "snapshot", "learner": "loader.models:mlp"}
    with RemoteLoader(svc.address, job="snapshot", batch_size=8, timeout_s=LOADER_TIMEOUT_S, policy="learnability",
                      options=options) as loader:  # fmt: skip
        served_ids(loader)  # epoch 0 opens the job (no snapshot yet: reported losses stand in)
        assert loader.push_weights(constant_learner(7), step=10) == 10
        _, labels = served_ids(loader)
        assert (labels == 7).mean() > 0.4, np.bincount(labels, minlength=10)
        loader.push_weights(constant_learner(2), step=20)
        _, labels = served_ids(loader)
        assert (labels == 2).mean() > 0.4 and (labels == 7).mean() < 0.2, np.bincount(labels, minlength=10)
        stats = loader.stats()
    job = stats.jobs[0]
    assert job.weight_pushes == 2 and job.weights_step == 20
    # Every candidate of the two snapshot epochs went through the learner on a scorer.
    assert job.learner_scored_samples >= 2 * job.samples_considered // 3
    assert job.learner_scoring_seconds > 0
    assert stats.reference_scored_samples == 768, "each sample is scored by the reference exactly once"
    # Scorers take a share of a GPU when Ray has one, and then run on it; else on the CPU.
    expected = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    assert list(stats.scorer_devices) == [expected] * svc.pipeline.config.scorers


def test_scorers_start_only_for_jobs_that_call_them(serve, half_random):
    """Feedback-mode `loss` uses the losses trainers report: no scorer (a worker that loads torch)
    starts for it. A snapshot-mode job needs one to run the learner."""
    svc = serve(half_random[0][:1])
    with RemoteLoader(svc.address, job="loss-feedback", batch_size=8, timeout_s=LOADER_TIMEOUT_S, policy="loss",
                      options={"keep_ratio": KEEP}) as loader:  # fmt: skip
        assert len(next(iter(loader))["_id"]) > 0
    assert svc.pipeline.actors()["scorers"] == []
    options = {"keep_ratio": KEEP, "learner_loss": "snapshot", "learner": "loader.models:mlp"}
    with RemoteLoader(svc.address, job="loss-snapshot", batch_size=8, timeout_s=LOADER_TIMEOUT_S, policy="loss",
                      options=options) as loader:  # fmt: skip
        assert len(next(iter(loader))["_id"]) > 0
    assert len(svc.pipeline.actors()["scorers"]) == svc.pipeline.config.scorers > 0


def test_curated_policy_without_reference_fails_precondition(serve, half_random):
    import grpc

    svc = serve(half_random[0][:1])
    with RemoteLoader(svc.address, job="no-ref", batch_size=8, timeout_s=LOADER_TIMEOUT_S,
                      policy="learnability") as loader:  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            next(iter(loader))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs a reference model" in err.value.details()


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"keep_ratio": "2"}, "options.keep_ratio"),
        ({"selector": "nope"}, "options.selector"),
        ({"learner_loss": "snapshot", "learner": "no_such_module:mlp"}, "cannot import module 'no_such_module'"),
    ],
)
def test_bad_job_options_are_invalid_argument(service, options, fragment):
    import grpc

    with RemoteLoader(service[0].address, job="bad-options", batch_size=8, timeout_s=LOADER_TIMEOUT_S,
                      policy="learnability", options=options) as loader:  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            next(iter(loader))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()


def test_reference_that_does_not_import_stops_start_up(tmp_path):
    cfg = tmp_path / "service.yaml"
    cfg.write_text("shards: ['x.tar']\nreference:\n  factory: no_such_module:make\n")
    done = subprocess.run([sys.executable, "-m", "loader", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "reference.factory: cannot import module 'no_such_module'" in done.stderr, done.stderr
