"""Tables and the figure of benchmarks/lifelong.py, from its JSON payload.

    python benchmarks/lifelong_report.py benchmarks/results/lifelong-quick.json

redraws `<stem>.md` and `<stem>.png` next to that file from it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

STAGES = 5
ORDER = ("fifo", "class_reservoir", "cluster_reservoir", "curated", "curated_no_bandit", "pruned_uniform")


_HOLDOUTS = {
    "first": "stage 0 only",
    "all": "every stage",
    "refresh": "stage 0 at start, then at each stage start one on the holdouts of every stage so far is swapped "
    "into the running service (`set_reference`; stage 0's rows shown here)",
}


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float], digits: int = 3) -> str:
    m, sd = mean_sd(values)
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {sd:.{digits}f}"


def by_run(payload: dict) -> dict[str, list[dict]]:
    """Details per run name, in the benchmark's order."""
    out: dict[str, list[dict]] = {}
    for r in sorted(payload["details"], key=lambda r: (ORDER.index(r["name"]) if r["name"] in ORDER else 99, r["seed"])):
        out.setdefault(r["name"], []).append(r)
    return out


def results_table(runs: dict[str, list[dict]]) -> str:
    head = ["run", "final avg acc", "forgetting", "backward transfer", *(f"avg acc after stage {s}" for s in range(STAGES)),
            *(f"final acc task {t}" for t in range(STAGES))]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in runs.items():
        stages = len(rs[0]["per_stage"])
        row = [
            name, cell([r["average_accuracy"][-1] for r in rs]), cell([r["forgetting"][-1] for r in rs]),
            cell([r["backward_transfer"][-1] for r in rs]),
            *(f"{mean_sd([r['average_accuracy'][s] for r in rs])[0]:.3f}" for s in range(stages)),
            *(f"{mean_sd([r['per_stage'][-1][t] for r in rs])[0]:.3f}" for t in range(stages)),
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def goal(runs: dict[str, list[dict]]) -> str:
    """The issue's goal, checked on the means over seeds."""
    need = ("curated", "class_reservoir", "curated_no_bandit")
    if any(n not in runs for n in need):
        return "(goal not checked: it needs the curated, class_reservoir and curated_no_bandit runs)"
    final = {n: mean_sd([r["average_accuracy"][-1] for r in runs[n]])[0] for n in need}
    forget = {n: mean_sd([r["forgetting"][-1] for r in runs[n]])[0] for n in need}
    checks = [
        (f"curated beats class_reservoir on final average accuracy ({final['curated']:.3f} vs "
         f"{final['class_reservoir']:.3f})", final["curated"] > final["class_reservoir"]),
        (f"curated forgets at most half as much as class_reservoir ({forget['curated']:.3f} vs "
         f"{forget['class_reservoir']:.3f}, half is {forget['class_reservoir'] / 2:.3f})",
         forget["curated"] <= forget["class_reservoir"] / 2),
        (f"curated beats curated_no_bandit on final average accuracy ({final['curated']:.3f} vs "
         f"{final['curated_no_bandit']:.3f})", final["curated"] > final["curated_no_bandit"]),
    ]  # fmt: skip
    return "\n".join(f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in checks)


def arrivals_table(runs: dict[str, list[dict]]) -> str:
    lines = ["| run | stage | add_shards call s | add_shards return → first new sample served s (max) "
             "| batches until then | seeds served in the stage |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, rs in runs.items():
        if "arrivals" not in rs[0]:
            continue
        lines.append(f"| {name} | 0 (starting pool) | – | first batch after the stream opened: "
                     f"{cell([r['first_batch_s'] for r in rs], 2)} | – | – |")  # fmt: skip
        for i, arrival in enumerate(rs[0]["arrivals"]):
            got = [r["arrivals"][i] for r in rs]
            after = [a["served_after_s"] for a in got if a["served_after_s"] is not None]
            most = f" ({max(after):.2f})" if after else ""
            lines.append(
                f"| {name} | {arrival['stage']} | {cell([a['add_shards_s'] for a in got], 2)} | {cell(after, 2)}{most} "
                f"| {cell([a['batches'] for a in got if a['batches'] is not None], 1)} | {len(after)}/{len(got)} |"
            )
    return "\n".join(lines)


def memory_table(runs: dict[str, list[dict]]) -> str:
    lines = ["| run | stage | pool kept (budget) | PSS all service processes MiB | this process (gateway + trainer) "
             "| Ray actor workers | raylet |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rs in runs.items():
        if "pss_mib" not in rs[0]["stages"][0]:
            continue
        for s in range(len(rs[0]["stages"])):
            pss = [r["stages"][s]["pss_mib"] for r in rs]
            actors = [sum(v for k, v in p.items() if k not in ("gateway", "raylet")) for p in pss]
            lines.append(
                f"| {name} | {s} | {cell([r['stages'][s]['budget']['kept_samples'] for r in rs], 0)} "
                f"| {cell([sum(p.values()) for p in pss], 0)} | {cell([p.get('gateway', math.nan) for p in pss], 0)} "
                f"| {cell(actors, 0)} | {cell([p.get('raylet', math.nan) for p in pss], 0)} |"
            )
    return "\n".join(lines)


def wait_table(runs: dict[str, list[dict]], steps_per_stage: int) -> str:
    """Milliseconds per step the trainer waited for its batch, per stage (the service's cost seen
    from the trainer; in-process runs index an array)."""
    stages = len(next(iter(runs.values()))[0]["stages"])
    head = "| run | " + " | ".join(f"stage {s}" for s in range(stages)) + " | wall s per run |"
    lines = [head, "|" + "---|" * (stages + 2)]
    for name, rs in runs.items():
        cells = [cell([r["stages"][s]["batch_wait_seconds"] * 1e3 / steps_per_stage for r in rs], 1) for s in range(stages)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cell([r['wall_seconds'] for r in rs], 1)} |")
    return "\n".join(lines)


def pool_table(runs: dict[str, list[dict]], key: str) -> str:
    """What the pool held (key "pool") or what was served (key "served") at each stage's end."""
    lines = ["| run | stage | rows per task 0..4 | newest task's share | share labelled as the newest task's classes "
             "| label noise | copies |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rs in runs.items():
        for s in range(len(rs[0]["stages"])):
            got = [r["stages"][s][key] for r in rs]
            per_task = [mean_sd([g["per_task"][t] for g in got])[0] for t in range(STAGES)]
            newest = [g["per_task"][s] / g["rows"] for g in got if g["rows"]]
            # Below the share above: rows of the new task that carry an older class's label.
            labelled = [sum(g["per_label"][2 * s : 2 * s + 2]) / g["rows"] for g in got if g["rows"] and "per_label" in g]
            lines.append(
                f"| {name} | {s} | {' / '.join(f'{n:.0f}' for n in per_task)} | {cell(newest, 2)} | {cell(labelled, 2)} "
                f"| {cell([g['noisy'] for g in got], 2)} | {cell([g['duplicate'] for g in got], 2)} |"
            )
    return "\n".join(lines)


def plot(payload: dict, runs: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(14, 8), sharey=True)
    panels = list(axes.flat)
    stages = np.arange(STAGES)
    for ax, (name, rs) in zip(panels, runs.items()):
        for t in range(STAGES):
            acc = np.array([[r["per_stage"][s][t] for s in range(t, len(r["per_stage"]))] for r in rs])
            ax.errorbar(stages[t : t + acc.shape[1]], acc.mean(0), yerr=acc.std(0), marker="o", capsize=2, label=f"task {t}")
        ax.set_title(f"{name}: accuracy per task", fontsize=10)
    last = panels[-1]
    for name, rs in runs.items():
        acc = np.array([r["average_accuracy"] for r in rs])
        last.errorbar(stages, acc.mean(0), yerr=acc.std(0), marker="o", capsize=2, label=name)
    last.set_title("average accuracy over the tasks seen", fontsize=10)
    for ax in panels:
        ax.set_xticks(stages)
        ax.set_xlabel("after stage")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (10-way)")
    settings = payload["settings"]
    fig.suptitle(
        f"MNIST-1D in 5 stages of 2 classes, {settings['label_noise']:.0%} labels corrupted, {settings['duplicates']:.0%} "
        f"copies; budget {payload['setup']['budget']} of {payload['setup']['rows_seen']} rows; reference "
        f"'{settings['reference']}'; mean ± sd over {settings['seeds']} seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(payload: dict, png: str) -> str:
    s, setup = payload["settings"], payload["setup"]
    runs = by_run(payload)
    ref = setup["reference"]
    options = ", ".join(f"{k}={v}" for k, v in setup["curated_options"].items()) or "the service's defaults"
    drawn = " / ".join(f"{c['noisy']:.2f}" for c in setup["stage_composition"])
    pushes = f", learner weights pushed every {s['push_every']} steps" if s.get("push_every") else ""
    return (
        f"`{setup['command']}`: {setup['date']}, {setup['machine']}, torch {setup['torch']}; "
        f"wall {setup['wall_seconds'] / 60:.1f} min.\n\n"
        f"- data: MNIST-1D, 5 stages of 2 classes, streamed rows per stage {setup['rows_per_stage']} "
        f"({s['label_noise']:.0%} of labels moved to another class uniformly; {s['duplicates']:.0%} of each stage's rows "
        f"jittered copies (jitter {s['jitter']} sd) of {s['bases']} of its samples); {s['shards_per_stage']} Parquet "
        f"shards per stage; test rows per task {setup['test_rows_per_task']}; share of corrupted labels per stage as "
        f"drawn (copies repeat their base's) {drawn}\n"
        f"- budget: {setup['budget']} rows ({s['budget_fraction']:.0%} of the {setup['rows_seen']} that arrive) "
        f"for every run\n"
        f"- reference: {s['reference_model']} on the clean holdout of "
        f"{_HOLDOUTS.get(s['reference'], s['reference'])} ({setup['holdout_rows']} rows, "
        f"{s['reference_epochs']} epochs, {ref['seconds']:.1f} s); test accuracy per task "
        f"{' / '.join(f'{a:.2f}' for a in ref['test_accuracy_per_task'])}\n"
        f"- trainer (every run): {s['model']}, Adam lr {s['lr']}, batch {s['batch_size']}, {s['steps_per_stage']} "
        f"steps per stage, unweighted mean loss, seeds 0..{s['seeds'] - 1}; fifo, class_reservoir and "
        f"cluster_reservoir run in-process (uniform passes over their memory), the curated runs through one "
        f"in-process service each\n"
        f"- curated: stream job, policy `{s['curated_policy']}` (curated_no_bandit: without `+bandit`; "
        f"pruned_uniform: `uniform` on the same service, the budget's pruning alone), embeddings "
        f"{'of the input column' if s.get('embedding') == 'input' else 'of the reference body'}, options "
        f"{options}; service shuffle_rows {s['shuffle_rows']}, ready_batches {s['ready_batches']}, prefetch_shards "
        f"{s['prefetch_shards']}, max_samples = the budget; trainer prefetch {s['prefetch']}"
        f"{pushes}\n"
        f"- accuracy: 10-way argmax on the test rows of each task; forgetting: mean over earlier tasks of the best "
        f"accuracy so far minus the current one; backward transfer: mean over earlier tasks of the current accuracy "
        f"minus the accuracy right after that task's stage (both after the last stage in the first columns)\n\n"
        f"{results_table(runs)}\n\n"
        f"Goal of the issue (means over seeds):\n\n{goal(runs)}\n\n"
        f"![accuracy per task over stages]({os.path.basename(png)})\n\n"
        f"**New shards reaching the trainer** (mean ± sd over seeds; the issue's goal is under 5 s):\n\n"
        f"{arrivals_table(runs)}\n\n"
        f"**Trainer waiting for its batch** (ms per step, mean ± sd over seeds; stage 0 of a curated run includes "
        f"the job's start on a fresh service):\n\n{wait_table(runs, s['steps_per_stage'])}\n\n"
        f"**Service memory after each stage** (PSS summed over `Pipeline.processes()`, mean ± sd over seeds; this "
        f"process holds the trainer, its model and data too):\n\n{memory_table(runs)}\n\n"
        f"**What the pool held at the end of each stage** (rows per task: means over seeds):\n\n"
        f"{pool_table(runs, 'pool')}\n\n"
        f"**What the trainer was served during each stage** (\"labelled as the newest task's classes\": rows whose "
        f"label, as served, is one of that stage's two classes, whichever task they come from; far below the newest "
        f"task's share means its rows were served mostly with corrupted labels):\n\n{pool_table(runs, 'served')}\n"
    )


def write(payload: dict, out_dir: str, name: str) -> str:
    png = os.path.join(out_dir, f"{name}.png")
    plot(payload, by_run(payload), png)
    report = render(payload, png)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as handle:
        handle.write(report)
    return report


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as handle:
        data = json.load(handle)
    stem = os.path.splitext(os.path.basename(sys.argv[1]))[0]
    print(write(data, os.path.dirname(os.path.abspath(sys.argv[1])), stem))
