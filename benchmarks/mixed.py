"""The curation benchmark on the redundant, imbalanced pool (`curation.py --pool mixed`).

Learnability alone against learnability with a cluster bandit (EXP3 and UCB), with a diversity
memory, and with both, beside uniform, on the pool `pools.make_mixed_pool` builds. Besides
accuracy, each run records what it was served (from the flag columns of its batches), the
curator's selection time per batch, and for bandit runs the cluster weights at every evaluation.
"""

from __future__ import annotations

import asyncio
import math
import os
import time

import numpy as np

from actors.runtime import ensure_ray, shutdown
from harness import LABEL_NOISE, MAX_HOLDOUT_SHARE, Run, forward_flops, job_stats, load_split, reference_model, rows
from harness import service
from loader.datasets import make_shards
from loader.ids import make_ids
from loader.scoring import ModelSpec, build_model
from pools import FLAGS, make_mixed_pool
from tracked_training import train_tracked

RUNS = (
    "uniform",
    "learnability",
    "learnability+bandit-exp3",
    "learnability+bandit-ucb",
    "learnability+diversity",
    "learnability+bandit+diversity",
)
# Not run by default: the full combination with the other bandit (`--runs` names it).
EXTRA_RUNS = ("learnability+bandit+diversity-ucb",)
# Settings passed to the service only when set, and only to runs with the feature they tune.
BANDIT_OPTIONS = ("gamma", "eta", "max_clusters")
DIVERSITY_OPTIONS = ("diversity", "memory_size", "chunk")
SERVED = ("duplicate", "noise_input", "noisy")


def make_runs(s) -> list[Run]:
    curated = {"keep_ratio": s.keep_ratio, "selector": s.selector, "beta": s.beta, "learner_loss": "feedback"}

    def tuned(names: tuple[str, ...]) -> dict:
        return {name: f"{getattr(s, name):g}" for name in names if getattr(s, name) is not None}

    bandit, diversity = tuned(BANDIT_OPTIONS), tuned(DIVERSITY_OPTIONS)
    every = [
        Run("uniform", "uniform", None, {}),
        Run("learnability", "learnability", "feedback", curated),
        Run("learnability+bandit-exp3", "learnability+bandit", "feedback", {**curated, **bandit, "bandit": "exp3"}),
        Run("learnability+bandit-ucb", "learnability+bandit", "feedback", {**curated, **bandit, "bandit": "ucb"}),
        Run("learnability+diversity", "learnability+diversity", "feedback", {**curated, **diversity}),
        # The composite name's own bandit (EXP3): the combination as a user would ask for it.
        Run("learnability+bandit+diversity", "learnability+bandit+diversity", "feedback", {**curated, **bandit, **diversity}),
        Run("learnability+bandit+diversity-ucb", "learnability+bandit+diversity", "feedback",
            {**curated, **bandit, **diversity, "bandit": "ucb"}),
    ]  # fmt: skip
    return [r for r in every if r.label in s.runs]


def has_bandit(run: Run) -> bool:
    return "+bandit" in run.policy


def run_mixed(s, out_dir: str) -> dict:
    """Builds the pool, trains the reference, runs every (run, seed); returns everything the
    report needs."""
    runs = make_runs(s)
    t0 = time.perf_counter()
    shard_args = dict(shards=s.shards, fmt="parquet", samples=s.samples, holdout_fraction=s.holdout_fraction)
    # Clean labels: the mixed pool corrupts its own; holdout and test are the plain pool's.
    splits = make_shards(os.path.join(out_dir, "clean"), label_noise=0.0, progress=False, **shard_args)
    pool = make_mixed_pool(
        os.path.join(out_dir, "mixed"), splits["train"], s.shards, label_noise=LABEL_NOISE, duplicates=s.duplicates,
        bases=s.bases, jitter=s.jitter, noise_inputs=s.noise_inputs,
    )  # fmt: skip
    composition = pool.composition()
    n_train, n_holdout, n_test = composition["rows"], rows(splits["holdout"]), rows(splits["test"])
    print(f"data: mixed pool {composition}, clean holdout {n_holdout}, clean test {n_test}; "
          f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    if n_holdout > MAX_HOLDOUT_SHARE * n_train:
        raise SystemExit(f"holdout {n_holdout} exceeds {MAX_HOLDOUT_SHARE:.0%} of the pool {n_train}")
    test = load_split(splits["test"])
    reference, weights, ref_model = reference_model(s, splits["holdout"], out_dir, test)
    reference["flops"] = 3 * forward_flops(ref_model, test[0]) * n_holdout * s.reference_epochs

    ensure_ray(None, num_cpus=2)
    results: dict[tuple[str, int], dict] = {}
    try:
        with service(pool.paths, s, weights) as (address, pipeline):
            for seed in range(s.seeds):
                for run in runs:
                    job = f"mix-{run.label}-seed{seed}"
                    results[(run.label, seed)] = r = train_run(address, job, run, s, seed, n_train, test)
                    if has_bandit(run):
                        r["cluster_makeup"] = cluster_makeup(address, pipeline, job, pool)
            stats, _ = job_stats(address, f"mix-{runs[0].label}-seed0")
    finally:
        shutdown()
    return {
        "runs": runs,
        "results": results,
        "composition": composition,
        "pool": n_train,
        "holdout": n_holdout,
        "test": n_test,
        "reference": reference,
        "reference_scoring": {"seconds": stats.reference_scoring_seconds, "samples": stats.reference_scored_samples},
    }


def train_run(address: str, job: str, run: Run, s, seed: int, n_train: int, test) -> dict:
    keep = 1.0 if run.policy == "uniform" else float(run.options["keep_ratio"])
    curve, served, trace = train_tracked(
        address, job, lambda: build_model(ModelSpec(f"loader.models:{s.model}")).train(), test,
        steps=s.steps, flags=SERVED, trace_clusters=has_bandit(run), batch_size=s.batch_size, policy=run.policy,
        options=run.options, eval_every=s.eval_every, lr=s.lr, seed=seed, prefetch=s.prefetch,
        total_epochs=math.ceil(s.steps * s.batch_size / (n_train * keep)),
        use_weights=s.curated_weights or run.policy == "uniform",
    )  # fmt: skip
    _, mine = job_stats(address, job)
    per_batch_ms = 1e3 * mine.selection_seconds / mine.selections if mine.selections else math.nan
    fractions = {name: served.fraction(name) for name in SERVED}
    print(
        f"{job:44s} best {curve.best:.3f} final {curve.final:.3f} served dup {fractions['duplicate']:.3f} "
        f"noise {fractions['noise_input']:.3f} flipped {fractions['noisy']:.3f} selection {per_batch_ms:.2f} ms/batch "
        f"trainer {curve.trainer_seconds:5.1f} s wall {curve.wall_seconds:5.1f} s clusters {len(mine.clusters)}",
        flush=True,
    )
    return {
        "curve": curve,
        "served": fractions,
        "samples_served": mine.samples_served,
        "samples_considered": mine.samples_considered,
        "selection_seconds": mine.selection_seconds,
        "selections": mine.selections,
        "selection_ms_per_batch": per_batch_ms,
        "trace": trace,
    }


def cluster_makeup(address: str, pipeline, job: str, pool) -> list[dict] | None:
    """Per cluster of the job: members, and the shares of noise inputs, rows of duplicate groups
    and corrupted labels among them.

    GetStats gives a cluster's size but not its members, so the members come from
    `Pipeline.cluster_of` (the service runs in this process). If that fails, the plot loses its
    labels and says so, rather than the benchmark failing.
    """
    stats, _ = job_stats(address, job)
    index_of = {os.path.basename(shard.uri): shard.index for shard in stats.shards}
    ids, flags = [], {name: [] for name in FLAGS}
    for path, columns in pool.flags.items():
        ids.append(make_ids(index_of[os.path.basename(path)], len(columns["group"])))
        for name in FLAGS:
            flags[name].append(columns[name])
    ids = np.concatenate(ids)
    flags = {name: np.concatenate(v) for name, v in flags.items()}
    try:
        clusters = np.asarray(asyncio.run(pipeline.cluster_of(job, ids)))
    except Exception as exc:  # noqa: BLE001  (see the docstring)
        print(f"cluster members of {job} unavailable ({exc!r}); the cluster plot is unlabelled", flush=True)
        return None
    makeup = []
    for c in range(int(clusters.max()) + 1 if len(clusters) else 0):
        members = clusters == c
        n = int(members.sum())
        share = (lambda v: float(v[members].mean()) if n else 0.0)  # noqa: E731
        makeup.append({
            "id": c, "size": n, "noise_input": share(flags["noise_input"]), "in_duplicate_group": share(flags["group"] >= 0),
            "noisy": share(flags["noisy"]), "groups": int(len(np.unique(flags["group"][members & (flags["group"] >= 0)]))),
        })  # fmt: skip
    return makeup
