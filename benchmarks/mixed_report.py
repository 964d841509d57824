"""Tables, plots and the markdown report of the mixed-pool curation benchmark (benchmarks/mixed.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics

import numpy as np

from harness import LABEL_NOISE, PARTIAL_TARGET, curve_record, fmt_sci, mean_curve, mean_sd

def weight_matrix(trace) -> np.ndarray:
    """[evaluations, clusters] bandit weights; a cluster not yet known at an evaluation is 0."""
    k = max((c[0] + 1 for step in trace.clusters for c in step), default=0)
    w = np.zeros((len(trace.steps), k))
    for i, step in enumerate(trace.clusters):
        for cid, _size, weight, _reward, _served in step:
            w[i, cid] = weight
    return w


def trace_record(trace) -> dict:
    """The trace as matrices [evaluations, clusters] (column = cluster id), compact in JSON."""
    k = max((c[0] + 1 for step in trace.clusters for c in step), default=0)
    columns = {name: np.zeros((len(trace.steps), k)) for name in ("size", "weight", "reward", "served")}
    for i, step in enumerate(trace.clusters):
        for cid, *values in step:
            for name, value in zip(columns, values):
                columns[name][i, cid] = value
    record = {"steps": trace.steps}
    for name, m in columns.items():
        record[name] = m.astype(int).tolist() if name in ("size", "served") else np.round(m, 5).tolist()
    return record


def member_shares(makeup: list[dict] | None, k: int, key: str) -> np.ndarray | None:
    """[k] share of each cluster's members with property `key`; None without a makeup."""
    if not makeup:
        return None
    out = np.zeros(k)
    for c in makeup:
        if c["id"] < k:
            out[c["id"]] = c[key]
    return out


def bandit_summary(runs, results: dict, seeds: int) -> list[dict]:
    """Per bandit run and seed: the cluster holding most noise inputs and the weight the bandit
    gave it, and the shares of noise inputs and near-copies a draw by the bandit's weights would
    hold (Σ_c π_c · share_c), against the pool's own shares."""
    out = []
    for run in runs:
        for seed in range(seeds):
            r = results[(run.label, seed)]
            if not r["trace"].steps or not r.get("cluster_makeup"):
                continue
            w, makeup = weight_matrix(r["trace"]), r["cluster_makeup"]
            k = w.shape[1]
            noise = member_shares(makeup, k, "noise_input")
            copies = member_shares(makeup, k, "in_duplicate_group")
            sizes = member_shares(makeup, k, "size")
            c = int(np.argmax(noise))
            drawn_noise, drawn_copies = w @ noise, w @ copies
            out.append({
                "label": run.label, "seed": seed, "clusters": k, "noise_cluster": c,
                "noise_cluster_noise_share": float(noise[c]),
                "noise_cluster_holds": float(noise[c] * sizes[c] / max((noise * sizes).sum(), 1)),
                "noise_cluster_weight_mean": float(w[:, c].mean()), "noise_cluster_weight_final": float(w[-1, c]),
                "drawn_noise_mean": float(drawn_noise.mean()), "drawn_noise_final": float(drawn_noise[-1]),
                "drawn_copies_mean": float(drawn_copies.mean()), "drawn_copies_final": float(drawn_copies[-1]),
            })  # fmt: skip
    return out


def summarise(s, data: dict) -> tuple[dict, str, str]:
    runs, results = data["runs"], data["results"]
    uniform = [results[("uniform", seed)] for seed in range(s.seeds)]
    # As on the plain pool: the accuracy every uniform seed reaches at some point.
    target = min(r["curve"].best for r in uniform)
    near = PARTIAL_TARGET * target
    records = []
    for run in runs:
        for seed in range(s.seeds):
            r = results[(run.label, seed)]
            curve, trace = r["curve"], r["trace"]
            records.append({
                "policy": run.policy,
                "label": run.label,
                "bandit": run.options.get("bandit", "exp3") if "+bandit" in run.policy else None,
                "learner_loss": run.learner_loss,
                "options": run.options,
                "seed": seed,
                "steps_to_target": curve.steps_to(target),
                "final_test_accuracy": curve.final,
                "best_test_accuracy": curve.best,
                "served_duplicate_fraction": r["served"]["duplicate"],
                "served_noise_input_fraction": r["served"]["noise_input"],
                "served_label_corrupted_fraction": r["served"]["noisy"],
                "selection_ms_per_batch": r["selection_ms_per_batch"],
                "selection_seconds": r["selection_seconds"],
                "selections": r["selections"],
                "samples_served": r["samples_served"],
                "samples_considered": r["samples_considered"],
                "trainer_seconds": curve.trainer_seconds,
                "wall_seconds": curve.wall_seconds,
                "curve": curve_record(curve),
                "cluster_trace": trace_record(trace) if trace.steps else None,
                "cluster_makeup": r.get("cluster_makeup"),
            })  # fmt: skip
    payload = {"target_accuracy": target, "runs": records, "bandits": bandit_summary(runs, results, s.seeds)}

    base = statistics.fmean(r["curve"].steps_to(target) for r in uniform)
    base_near = statistics.fmean(r["curve"].steps_to(near) for r in uniform)
    lines = [
        "| run | steps to target (seeds reaching it) | speed-up vs uniform | speed-up to 95% of target "
        "| final test acc | best test acc | served: duplicates | served: noise inputs | served: labels corrupted "
        "| selection ms / batch | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        rs = [results[(run.label, seed)] for seed in range(s.seeds)]
        to_target = [r["curve"].steps_to(target) for r in rs]
        reached = [float(x) for x in to_target if x is not None]
        steps_m, steps_sd = mean_sd(reached)
        # A seed that never reached the target counts as the whole budget: the speed-up is then
        # an upper bound (marked ≤).
        speedup = base / statistics.fmean(x or s.steps for x in to_target)
        near_steps = [r["curve"].steps_to(near) for r in rs]
        near_speedup = base_near / statistics.fmean(x or s.steps for x in near_steps)
        cells = [
            f"{steps_m:.0f} ± {steps_sd:.0f} ({len(reached)}/{len(rs)})" if reached else f"never (0/{len(rs)})",
            f"{'≤ ' if len(reached) < len(rs) else ''}{speedup:.2f}x",
            f"{'≤ ' if None in near_steps else ''}{near_speedup:.2f}x",
        ]
        for values in ([r["curve"].final for r in rs], [r["curve"].best for r in rs]):
            cells.append("{:.3f} ± {:.3f}".format(*mean_sd(values)))
        for name in ("duplicate", "noise_input", "noisy"):
            cells.append("{:.3f} ± {:.3f}".format(*mean_sd([r["served"][name] for r in rs])))
        cells.append("{:.2f} ± {:.2f}".format(*mean_sd([r["selection_ms_per_batch"] for r in rs])))
        cells.append("{:.0f}".format(statistics.fmean(r["curve"].wall_seconds for r in rs)))
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    c = data["composition"]
    lines.append(
        f"| *the pool itself* | | | | | | {c['duplicates'] / c['rows']:.3f} | {c['noise_inputs'] / c['rows']:.3f} "
        f"| {c['labels_corrupted'] / c['rows']:.3f} | | |"
    )
    return payload, "\n".join(lines), bandit_table(payload["bandits"])


def bandit_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = [
        "| run | clusters | noise cluster: noise share (of all noise inputs) | its weight: mean over training | at the end "
        "| 1 / clusters | noise inputs in a draw by π: mean | at the end | near-copies in a draw by π: mean | at the end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]

        def m(key: str) -> float:
            return statistics.fmean(r[key] for r in rs)

        cells = [
            f"{m('clusters'):.1f}",
            f"{m('noise_cluster_noise_share'):.2f} ({m('noise_cluster_holds'):.2f})",
            f"{m('noise_cluster_weight_mean'):.3f}",
            f"{m('noise_cluster_weight_final'):.3f}",
            f"{statistics.fmean(1 / r['clusters'] for r in rs):.3f}",
            *(f"{m(key):.3f}" for key in ("drawn_noise_mean", "drawn_noise_final", "drawn_copies_mean", "drawn_copies_final")),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(path: str, s, data: dict, target: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for run in data["runs"]:
        steps, mean, sd = mean_curve([data["results"][(run.label, seed)]["curve"] for seed in range(s.seeds)])
        (line,) = ax.plot(steps, mean, label=run.label)
        ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.12)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel("trainer steps")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"MNIST-1D mixed pool ({s.duplicates:.0%} near-duplicates of {s.bases}, {s.noise_inputs:.0%} noise inputs, "
        f"{LABEL_NOISE:.0%} labels corrupted); keep ratio {s.keep_ratio}; mean ± sd over {s.seeds} seeds",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_clusters(path: str, s, data: dict) -> bool:
    """Top: each cluster's weight against steps (seed 0), coloured by its share of noise inputs.
    Bottom: the shares of noise inputs and near-copies a draw by those weights would hold, mean
    over seeds, beside the pool's own shares. False if no bandit ran."""
    runs = [r for r in data["runs"] if data["results"][(r.label, 0)]["trace"].steps]
    if not runs:
        return False
    plt = _pyplot()
    grey, red = np.array([0.6, 0.6, 0.6]), np.array([0.84, 0.15, 0.16])
    composition = data["composition"]
    fig, axes = plt.subplots(2, len(runs), figsize=(5.2 * len(runs), 8), squeeze=False, sharex=True)
    for col, run in enumerate(runs):
        top, bottom = axes[0, col], axes[1, col]
        r0 = data["results"][(run.label, 0)]
        w, makeup = weight_matrix(r0["trace"]), r0.get("cluster_makeup")
        steps = np.asarray(r0["trace"].steps)
        noise = member_shares(makeup, w.shape[1], "noise_input")
        copies = member_shares(makeup, w.shape[1], "in_duplicate_group")
        most_copies = int(np.argmax(copies)) if copies is not None else -1
        for c in range(w.shape[1]):
            share = noise[c] if noise is not None else 0.0
            label = None
            if noise is not None and (share >= 0.2 or c == most_copies):
                label = f"cluster {c}: {share:.0%} noise, {copies[c]:.0%} copies, {makeup[c]['size']} rows"
            top.plot(steps, w[:, c], color=tuple((1 - share) * grey + share * red), linewidth=0.8 + 2 * share,
                     linestyle="--" if c == most_copies else "-", label=label)  # fmt: skip
        top.set_title(f"{run.label}, seed 0: π per cluster (redder: more noise inputs)", fontsize=8)
        top.set_ylabel("bandit weight π")
        top.grid(alpha=0.3)
        if noise is not None:
            top.legend(fontsize=7, loc="upper right")
        for key, name, colour, pool_share in (
            ("noise_input", "noise inputs", "tab:red", composition["noise_inputs"] / composition["rows"]),
            ("in_duplicate_group", "near-copies", "tab:orange", composition["rows_in_duplicate_groups"] / composition["rows"]),
        ):
            drawn = []
            for seed in range(s.seeds):
                r = data["results"][(run.label, seed)]
                ws = weight_matrix(r["trace"])
                shares = member_shares(r.get("cluster_makeup"), ws.shape[1], key)
                if shares is not None:
                    drawn.append(ws @ shares)
            if drawn:
                n = min(len(d) for d in drawn)
                bottom.plot(steps[:n], np.mean([d[:n] for d in drawn], 0), color=colour, label=f"{name} in a draw by π")
            bottom.axhline(pool_share, color=colour, linestyle=":", linewidth=1, label=f"{name} in the pool")
        bottom.set_title(f"{run.label}: mean over {s.seeds} seeds", fontsize=9)
        bottom.set_xlabel("trainer steps")
        bottom.set_ylabel("share")
        bottom.set_ylim(0, 1)
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the report -----------------------------------------------------------------------------------


def write(s, data: dict, info: dict, out_dir: str, name: str, json_path: str | None) -> str:
    payload, table, bandits = summarise(s, data)
    payload["settings"], payload["setup"] = dataclasses.asdict(s), info
    payload["composition"] = data["composition"]
    png = os.path.join(out_dir, f"{name}.png")
    plot_accuracy(png, s, data, payload["target_accuracy"])
    clusters_png = os.path.join(out_dir, f"{name}-clusters.png")
    if not plot_clusters(clusters_png, s, data):
        clusters_png = None
    report = render(s, info, data, payload, table, bandits, png, clusters_png)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as handle:
        handle.write(report)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as handle:
            json.dump(payload, handle, indent=1)
    return report


def render(s, info, data, payload, table, bandits, png, clusters_png) -> str:
    c, ref, scoring = data["composition"], info["reference"], info["reference_scoring"]
    tuned = {k: getattr(s, k) for k in ("gamma", "eta", "max_clusters", "diversity", "memory_size", "chunk")}
    tuned = ", ".join(f"{k} {v:g}" for k, v in tuned.items() if v is not None) or "none (the service's defaults)"
    parts = [
        f"`{info['command']}`: {info['date']}, {info['machine']}, torch {info['torch']}; "
        f"wall {info['wall_seconds'] / 60:.1f} min.\n",
        f"- pool: {c['rows']} samples in {s.shards} Parquet shards: {c['rows_in_duplicate_groups']} near-copies of "
        f"{c['duplicate_groups']} base samples (jitter {s.jitter} sd), of which {c['duplicates']} count as duplicates "
        f"(every copy but the first of its base); {c['noise_inputs']} pure-noise inputs with random labels; "
        f"{c['distinct']} distinct samples; {c['labels_corrupted']} corrupted labels ({LABEL_NOISE:.0%} of bases and "
        f"distinct samples, copies inheriting their base's label); clean holdout {data['holdout']}, clean test "
        f"{data['test']}",
        f"- reference: {s.reference_model} trained {s.reference_epochs} epochs on the holdout in {ref['seconds']:.1f} s "
        f"({fmt_sci(ref['flops'])} FLOPs), test accuracy {ref['test_accuracy']:.3f}; pool scored "
        f"{scoring['samples']} samples in {scoring['seconds']:.2f} s",
        f"- every run: learner {s.model}, Adam lr {s.lr}, batch {s.batch_size}, {s.steps} steps, seeds "
        f"0..{s.seeds - 1}; curated runs: keep_ratio {s.keep_ratio}, selector {s.selector}, learner losses from "
        f"feedback; bandit and diversity options set: {tuned}",
        f"- target: {payload['target_accuracy']:.3f}, the best test accuracy every uniform seed reaches; speed-up = "
        f"uniform's mean steps to it / the run's (a seed that never gets there counts as the budget, marked ≤)",
        "- served fractions: of all samples served over the run, those that are duplicates, noise inputs, or real "
        "inputs with a corrupted label; selection ms / batch: the curator's `selection_seconds / selections` "
        "from GetStats (policy, bandit draw, diversity; not encoding)\n",
        table,
        f"\n![test accuracy vs trainer steps]({os.path.basename(png)})\n",
    ]
    if bandits:
        parts += [
            "Bandit runs (mean over seeds): the cluster holding the largest share of noise inputs and the weight π "
            "the bandit gave it, and the shares of noise inputs and near-copies that a draw by π would hold "
            "(Σ π_c · share_c; the pool holds "
            f"{c['noise_inputs'] / c['rows']:.2f} and {c['rows_in_duplicate_groups'] / c['rows']:.2f}). "
            "Cluster members are read from the job's curator after the run.\n",
            bandits,
        ]
    if clusters_png:
        parts.append(f"\n![cluster weights vs trainer steps]({os.path.basename(clusters_png)})\n")
    return "\n".join(parts)
