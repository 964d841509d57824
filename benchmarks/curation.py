"""Curation benchmark: does curated selection reach uniform's best test accuracy in fewer steps?

MNIST-1D with 30% of the training labels corrupted is served by one in-process loader service
(Pipeline + BackgroundGateway on a local Ray). A reference model is trained on a clean holdout
and configured on that service, so the pool is scored by it once and every curated run reuses
the scores. Each run trains the same learner with the same optimiser, seed and step budget
through `loader.training.train`; only the policy (and its options) differ.

    python benchmarks/curation.py --quick --json benchmarks/results/curation-quick.json
    python benchmarks/curation.py --json benchmarks/results/curation.json

Writes, under --out-dir, a PNG of test accuracy against trainer steps (mean over seeds) and a
markdown table; --json writes the per-run figures. A diagnostic run, uniform on the same pool with
its labels intact, bounds what filtering the noise could gain at all.

`--pool mixed` runs the cluster-bandit and diversity comparison on a pool that is also redundant
and imbalanced instead (benchmarks/pools.py builds it, benchmarks/mixed.py runs it):

    python benchmarks/curation.py --pool mixed --quick --json benchmarks/results/curation-mix-quick.json
"""

from __future__ import annotations

import actors  # noqa: F401  (must precede anything that imports ray: keeps a local Ray on loopback)

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import mixed
import mixed_report
from actors.runtime import ensure_ray, shutdown
from harness import LABEL_NOISE, MAX_HOLDOUT_SHARE, PARTIAL_TARGET, Run, curve_record, fmt_sci, forward_flops
from harness import job_stats, load_split, mean_curve, mean_sd, reference_model, rows, service
from loader.datasets import make_shards
from loader.scoring import ModelSpec, build_model
from loader.training import train


@dataclasses.dataclass
class Settings:
    seeds: int = 3
    steps: int = 3000
    samples: int = 24000
    shards: int = 64
    # Of make_shards' train part; 1/6 makes the holdout 20% of the served pool and 1/6 of both.
    holdout_fraction: float = 1 / 6
    model: str = "cnn1d"
    reference_model: str = "cnn1d"
    reference_epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    keep_ratio: float = 0.2
    # learnability's selector: top-k as in RHO-LOSS, on scores that change as the learner learns.
    selector: str = "topk"
    beta: float = 1.0
    # easy_reference's score never changes, so top-k would serve the same fifth of the pool every
    # epoch; sampling with coldness beta keeps filtering noise without freezing the subset.
    easy_selector: str = "softmax"
    easy_beta: float = 2.0
    push_every: int = 1
    # InfoBatch (`loss`) by itself keeps about 1 - r/2 of the data; None runs it at the curated
    # keep ratio like the other policies (at 0.7 it did no better, see BENCHMARKS.md).
    loss_keep_ratio: float | None = None
    eval_every: int = 25
    shuffle_rows: int = 1024
    ready_batches: int = 1
    prefetch_shards: int = 1
    # Batches per rank the service chooses ahead of a request (its `select_ahead`).
    select_ahead: int = 0
    # RemoteLoader credits: batches in flight between service and trainer.
    prefetch: int = 1
    # Whether learnability and easy_reference runs multiply losses by the served `_weight`: 1
    # under topk; under a stochastic selector the importance weights 1/(n p) pull the batch back
    # towards the uniform gradient, and give a rare noisy pick most of the batch's weight.
    # `loss` always uses its weights (InfoBatch's rescale is part of the method), uniform's are 1.
    curated_weights: bool = False
    # Also train uniform on the same pool with its labels intact (a diagnostic, not a policy).
    clean_ceiling: bool = True
    torch_threads: int = 1
    runs: tuple[str, ...] = ("uniform", "loss", "learnability-feedback", "learnability-snapshot", "easy_reference")
    # "noisy": the pool above. "mixed": also redundant and imbalanced (benchmarks/pools.py), with
    # the runs of benchmarks/mixed.py; the fields below apply to it only.
    pool: str = "noisy"
    duplicates: float = 0.5  # share of the pool that is near-copies of `bases` samples
    bases: int = 320
    jitter: float = 0.1  # of a copy, in standard deviations of the inputs
    noise_inputs: float = 0.1  # share of the pool that is pure-noise inputs with random labels
    # Bandit and diversity options of the composite policies; unset, the service's defaults hold.
    gamma: float | None = None
    eta: float | None = None
    max_clusters: int | None = None
    diversity: float | None = None
    memory_size: int | None = None
    chunk: int | None = None


QUICK = dict(steps=1000, eval_every=20)


def make_runs(s: Settings) -> list[Run]:
    curated = {"keep_ratio": s.keep_ratio, "selector": s.selector, "beta": s.beta}
    easy = {"keep_ratio": s.keep_ratio, "selector": s.easy_selector, "beta": s.easy_beta}
    learner = {"learner": f"loader.models:{s.model}"}
    every = [
        Run("uniform", "uniform", None, {}),
        Run("loss", "loss", "feedback", {"keep_ratio": s.loss_keep_ratio or s.keep_ratio}),
        Run("learnability-feedback", "learnability", "feedback", {**curated, "learner_loss": "feedback"}),
        Run("learnability-snapshot", "learnability", "snapshot", {**curated, "learner_loss": "snapshot", **learner}),
        Run("easy_reference", "easy_reference", None, easy),
    ]
    return [r for r in every if r.label in s.runs]


# -- summary --------------------------------------------------------------------------------------


def summarise(s: Settings, runs: list[Run], results: dict, clean: dict) -> tuple[dict, str]:
    uniform = [results[("uniform", seed)] for seed in range(s.seeds)]
    # The accuracy every uniform seed reaches at some point: each uniform run then has a step
    # count of its own, and curated runs are measured against a level uniform demonstrably gets to.
    target = min(r["curve"].best for r in uniform)
    records = []
    for run in runs:
        for seed in range(s.seeds):
            r = results[(run.label, seed)]
            curve = r["curve"]
            r["steps_to_target"] = curve.steps_to(target)
            records.append(
                {
                    "policy": run.policy,
                    "learner_loss": run.learner_loss,
                    "seed": seed,
                    "steps_to_target": r["steps_to_target"],
                    "final_test_accuracy": curve.final,
                    "trainer_seconds": curve.trainer_seconds,
                    "scoring_seconds": r["scoring_seconds"],
                    "label": run.label,
                    "options": run.options,
                    "best_test_accuracy": curve.best,
                    "wall_seconds": curve.wall_seconds,
                    "trainer_flops": r["trainer_flops"],
                    "scoring_flops": r["scoring_flops"],
                    "samples_served": r["samples_served"],
                    "samples_considered": r["samples_considered"],
                    "learner_scored_samples": r["learner_scored_samples"],
                    "weight_pushes": r["weight_pushes"],
                    "curve": curve_record(curve),
                }
            )
    payload = {"target_accuracy": target, "runs": records}
    if clean:
        payload["diagnostics"] = [
            {
                "label": "uniform, labels not corrupted",
                "seed": seed,
                "steps_to_target": r["curve"].steps_to(target),
                "final_test_accuracy": r["curve"].final,
                "best_test_accuracy": r["curve"].best,
                "trainer_seconds": r["curve"].trainer_seconds,
                "curve": curve_record(r["curve"]),
            }
            for seed, r in sorted(clean.items())
        ]

    base = statistics.fmean(r["steps_to_target"] for r in uniform)
    # Uniform passes 95% of the target on the way to it, so every uniform seed has this count too.
    near = PARTIAL_TARGET * target
    base_near = statistics.fmean(r["curve"].steps_to(near) for r in uniform)
    lines = [
        "| run | steps to target (seeds reaching it) | speed-up vs uniform | speed-up to 95% of target "
        "| final test acc | best test acc | trainer s | scoring s | trainer FLOPs | scoring FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows_ = [(run.label, [results[(run.label, seed)] for seed in range(s.seeds)]) for run in runs]
    if clean:
        for r in clean.values():
            r.update(steps_to_target=r["curve"].steps_to(target), scoring_seconds=0.0, scoring_flops=0)
            r["trainer_flops"] = uniform[0]["trainer_flops"]
        rows_.append(("*diagnostic: uniform on uncorrupted labels*", list(clean.values())))
    for label, rs in rows_:
        reached = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
        steps_m, steps_sd = mean_sd([float(x) for x in reached])
        # A seed that never reached the target counts as the whole budget, so the speed-up of a
        # run where some seeds fell short is an upper bound (marked ≤).
        speedup = base / statistics.fmean(r["steps_to_target"] or s.steps for r in rs)
        bound = "" if len(reached) == len(rs) else "≤ "
        near_steps = [r["curve"].steps_to(near) for r in rs]
        near_bound = "" if None not in near_steps else "≤ "
        near_speedup = base_near / statistics.fmean(x or s.steps for x in near_steps)
        final_m, final_sd = mean_sd([r["curve"].final for r in rs])
        best_m, best_sd = mean_sd([r["curve"].best for r in rs])
        trainer_m, trainer_sd = mean_sd([r["curve"].trainer_seconds for r in rs])
        scoring_m, scoring_sd = mean_sd([r["scoring_seconds"] for r in rs])
        steps_cell = f"{steps_m:.0f} ± {steps_sd:.0f}" if reached else "never"
        lines.append(
            f"| {label} | {steps_cell} ({len(reached)}/{len(rs)}) | {bound}{speedup:.2f}x | {near_bound}{near_speedup:.2f}x "
            f"| {final_m:.3f} ± {final_sd:.3f} | {best_m:.3f} ± {best_sd:.3f} "
            f"| {trainer_m:.1f} ± {trainer_sd:.1f} | {scoring_m:.2f} ± {scoring_sd:.2f} "
            f"| {fmt_sci(statistics.fmean(r['trainer_flops'] for r in rs))} "
            f"| {fmt_sci(statistics.fmean(r['scoring_flops'] for r in rs))} |"
        )
    return payload, "\n".join(lines)


def plot(path: str, s: Settings, runs: list[Run], results: dict, clean: dict, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    series = [(run.label, [results[(run.label, seed)]["curve"] for seed in range(s.seeds)], "-") for run in runs]
    if clean:
        series.append(("uniform, uncorrupted labels (diagnostic)", [r["curve"] for r in clean.values()], ":"))
    for label, curves, style in series:
        steps, mean, sd = mean_curve(curves)
        (line,) = ax.plot(steps, mean, style, label=label)
        ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.12)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel("trainer steps")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"MNIST-1D, {LABEL_NOISE:.0%} labels corrupted; {s.model}, batch {s.batch_size}, keep ratio {s.keep_ratio}; "
        f"mean ± sd over {s.seeds} seeds",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the benchmark --------------------------------------------------------------------------------


def train_run(address: str, job: str, run: Run, s: Settings, seed: int, n_train: int, test) -> dict:
    keep = 1.0 if run.policy == "uniform" else float(run.options["keep_ratio"])
    curve = train(
        address, job, lambda: build_model(ModelSpec(f"loader.models:{s.model}")).train(), test,
        steps=s.steps, batch_size=s.batch_size, policy=run.policy, options=run.options,
        eval_every=s.eval_every, lr=s.lr, seed=seed,
        push_every=s.push_every if run.learner_loss == "snapshot" else 0, progress=False,
        prefetch=s.prefetch, total_epochs=math.ceil(s.steps * s.batch_size / (n_train * keep)),
        use_weights=s.curated_weights or run.policy in ("uniform", "loss"),
    )  # fmt: skip
    _, mine = job_stats(address, job)
    print(
        f"{job:32s} best {curve.best:.3f} final {curve.final:.3f} trainer {curve.trainer_seconds:5.1f} s "
        f"wall {curve.wall_seconds:5.1f} s epochs {curve.epochs} served {mine.samples_served} "
        f"considered {mine.samples_considered} snapshot-scored {mine.learner_scored_samples} "
        f"staleness mean {mine.snapshot_staleness_mean:.2f} max {mine.snapshot_staleness_max}",
        flush=True,
    )
    return {
        "curve": curve,
        "samples_served": mine.samples_served,
        "samples_considered": mine.samples_considered,
        "learner_scored_samples": mine.learner_scored_samples,
        "learner_scoring_seconds": mine.learner_scoring_seconds,
        "weight_pushes": mine.weight_pushes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(s.torch_threads)
    os.makedirs(args.out_dir, exist_ok=True)
    command = " ".join(["python benchmarks/curation.py", *(sys.argv[1:] if argv is None else argv)])
    if s.pool == "mixed":
        return main_mixed(s, args, command, started)
    name = args.name or ("curation-quick" if args.quick else "curation")
    runs = make_runs(s)

    with tempfile.TemporaryDirectory(prefix="curation-") as data_dir:
        t0 = time.perf_counter()
        shard_args = dict(shards=s.shards, fmt="parquet", samples=s.samples, holdout_fraction=s.holdout_fraction)
        splits = make_shards(os.path.join(data_dir, "noisy"), label_noise=LABEL_NOISE, progress=False, **shard_args)
        n_train, n_holdout, n_test = (rows(splits[k]) for k in ("train", "holdout", "test"))
        print(
            f"data: pool {n_train} ({LABEL_NOISE:.0%} labels corrupted) in {len(splits['train'])} shards, clean "
            f"holdout {n_holdout} ({n_holdout / n_train:.1%} of the pool, {n_holdout / (n_train + n_holdout):.1%} "
            f"of pool + holdout), clean test {n_test}; {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        if n_holdout > MAX_HOLDOUT_SHARE * n_train:
            raise SystemExit(f"holdout {n_holdout} exceeds {MAX_HOLDOUT_SHARE:.0%} of the pool {n_train}")
        test = load_split(splits["test"])

        reference, reference_weights, ref_model = reference_model(s, splits["holdout"], data_dir, test)
        learner_fwd = forward_flops(build_model(ModelSpec(f"loader.models:{s.model}")), test[0])
        reference_fwd = forward_flops(ref_model, test[0])
        # Adam's update is a handful of FLOPs per parameter per step: noise next to 3 x forward x batch.
        reference["flops"] = 3 * reference_fwd * n_holdout * s.reference_epochs

        ensure_ray(None, num_cpus=2)
        results: dict[tuple[str, int], dict] = {}
        clean: dict[int, dict] = {}
        try:
            with service(splits["train"], s, reference_weights) as (address, _):
                for seed in range(s.seeds):
                    for run in runs:
                        results[(run.label, seed)] = train_run(address, f"{run.label}-seed{seed}", run, s, seed, n_train, test)
                stats, _ = job_stats(address, f"{runs[0].label}-seed0")
            if s.clean_ceiling:
                # Same samples and seed, labels left intact: how fast uniform gets there without
                # noise bounds what any noise filter could gain.
                clean_splits = make_shards(os.path.join(data_dir, "clean"), label_noise=0.0, progress=False, **shard_args)
                with service(clean_splits["train"], s) as (address, _):
                    for seed in range(s.seeds):
                        clean[seed] = train_run(address, f"uniform-clean-seed{seed}", runs[0], s, seed, n_train, test)
        finally:
            shutdown()

    # Reference scoring happens once for the whole service; every run that reads reference scores
    # is charged all of it (an upper bound: the runs here share it).
    reference_scoring = {"seconds": stats.reference_scoring_seconds, "samples": stats.reference_scored_samples}
    for run in runs:
        uses_reference = run.policy in ("learnability", "easy_reference")
        for seed in range(s.seeds):
            r = results[(run.label, seed)]
            r["scoring_seconds"] = r["learner_scoring_seconds"] + (reference_scoring["seconds"] if uses_reference else 0.0)
            r["trainer_flops"] = 3 * learner_fwd * s.batch_size * s.steps
            r["scoring_flops"] = learner_fwd * r["learner_scored_samples"] + (
                reference_fwd * reference_scoring["samples"] if uses_reference else 0
            )

    info = {
        **machine(),
        "pool": n_train,
        "holdout": n_holdout,
        "test": n_test,
        "reference": reference,
        "reference_scoring": reference_scoring,
        "learner_forward_flops": learner_fwd,
        "reference_forward_flops": reference_fwd,
        "command": command,
    }
    payload, table = summarise(s, runs, results, clean)
    payload["settings"], payload["setup"] = dataclasses.asdict(s), info
    png = os.path.join(args.out_dir, f"{name}.png")
    plot(png, s, runs, results, clean, payload["target_accuracy"])
    info["wall_seconds"] = time.perf_counter() - started
    report = render(s, info, payload, table, png)
    with open(os.path.join(args.out_dir, f"{name}.md"), "w") as handle:
        handle.write(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)
    print(report)
    return 0


def main_mixed(s: Settings, args: argparse.Namespace, command: str, started: float) -> int:
    name = args.name or ("curation-mix-quick" if args.quick else "curation-mix")
    with tempfile.TemporaryDirectory(prefix="curation-mix-") as data_dir:
        data = mixed.run_mixed(s, data_dir)
    info = {**machine(), "command": command, **{k: data[k] for k in ("reference", "reference_scoring")}}
    info["wall_seconds"] = time.perf_counter() - started
    print(mixed_report.write(s, data, info, args.out_dir, name, args.json))
    return 0


def machine() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, no GPU, {platform.platform()}",
        "torch": torch.__version__,
    }


def render(s: Settings, info: dict, payload: dict, table: str, png: str) -> str:
    ref, scoring = info["reference"], info["reference_scoring"]
    learnability = f"{s.selector}{f' (beta {s.beta})' if s.selector != 'topk' else ''}"
    easy = f"{s.easy_selector}{f' (beta {s.easy_beta})' if s.easy_selector != 'topk' else ''}"
    return (
        f"`{info['command']}`: {info['date']}, {info['machine']}, torch {info['torch']}; "
        f"wall {info['wall_seconds'] / 60:.1f} min.\n\n"
        f"- data: pool {info['pool']} samples ({LABEL_NOISE:.0%} labels corrupted) in {s.shards} Parquet shards, "
        f"clean holdout {info['holdout']}, clean test {info['test']}\n"
        f"- reference: {s.reference_model} trained {s.reference_epochs} epochs on the holdout in {ref['seconds']:.1f} s "
        f"({fmt_sci(ref['flops'])} FLOPs, not in the table), test accuracy {ref['test_accuracy']:.3f}; it scored "
        f"the pool once for all runs: {scoring['samples']} samples in {scoring['seconds']:.2f} s\n"
        f"- every run: learner {s.model} ({info['learner_forward_flops']} forward FLOPs per sample), Adam lr {s.lr}, "
        f"batch {s.batch_size}, {s.steps} steps, seeds 0..{s.seeds - 1}\n"
        f"- curated: keep_ratio {s.keep_ratio}; learnability selector {learnability}; easy_reference selector "
        f"{easy}; snapshot pushed every {s.push_every} step(s); loss (InfoBatch) keep_ratio "
        f"{s.loss_keep_ratio or s.keep_ratio}, prune_ratio 0.5\n"
        f"- service: shuffle_rows {s.shuffle_rows}, ready_batches {s.ready_batches}, select_ahead {s.select_ahead}, prefetch_shards "
        f"{s.prefetch_shards}; trainer prefetch {s.prefetch}\n"
        f"- target: {payload['target_accuracy']:.3f}, the best test accuracy every uniform seed reaches; speed-up = "
        f"uniform's mean steps to it / the run's (a seed that never gets there counts as the budget, marked ≤); "
        f"the same at {PARTIAL_TARGET:.0%} of the target, {PARTIAL_TARGET * payload['target_accuracy']:.3f}\n"
        f"- scoring s: the reference's one scoring pass over the pool charged in full to every run that reads "
        f"reference losses, plus the run's own snapshot scoring; FLOPs: 3 x forward per trained sample, reference "
        f"forward once per pool sample, snapshot forward per candidate\n\n"
        f"{table}\n\n![test accuracy vs trainer steps]({os.path.basename(png)})\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"shorter runs ({QUICK['steps']} steps), 3 seeds: < 10 min on 2 cores")
    p.add_argument("--json", metavar="PATH", help="write the per-run figures as JSON")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the PNG and the markdown table go")
    p.add_argument("--name", help="file name stem of the outputs (default curation or curation-quick)")
    p.add_argument("--seeds", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--runs", help=f"comma-separated subset of {','.join(d.runs)}, or with --pool mixed of "
                   f"{','.join(mixed.RUNS + mixed.EXTRA_RUNS)} (uniform is always run)")
    for field in dataclasses.fields(Settings):
        if field.name in ("seeds", "steps", "runs"):
            continue
        default = getattr(d, field.name)
        kind = float if default is None else _flag if isinstance(default, bool) else type(default)
        p.add_argument(f"--{field.name.replace('_', '-')}", type=kind, dest=field.name, help=f"default {getattr(d, field.name)}")
    return p.parse_args(argv)


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def settings_from(args: argparse.Namespace) -> Settings:
    values = dict(QUICK) if args.quick else {}
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name, None)
        if value is not None and field.name != "runs":
            values[field.name] = value
    if values.get("pool", "noisy") not in ("noisy", "mixed"):
        raise SystemExit(f"--pool must be noisy or mixed, got {values['pool']!r}")
    mixed_pool = values.get("pool") == "mixed"
    known = (*mixed.RUNS, *mixed.EXTRA_RUNS) if mixed_pool else Settings.runs
    if args.runs:
        values["runs"] = tuple(dict.fromkeys(["uniform", *args.runs.split(",")]))
        unknown = [r for r in values["runs"] if r not in known]
        if unknown:
            pool = values.get("pool", "noisy")
            raise SystemExit(f"unknown runs {', '.join(unknown)} for the {pool} pool; known: {', '.join(known)}")
    elif mixed_pool:
        values["runs"] = mixed.RUNS
    s = Settings(**values)
    if s.seeds < 1 or s.steps < 1:
        raise SystemExit("--seeds and --steps must be positive")
    return s


if __name__ == "__main__":
    sys.exit(main())
