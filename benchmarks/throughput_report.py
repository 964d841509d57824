"""Ratios, goals and the markdown tables of the throughput benchmark."""

from __future__ import annotations

MIB = 1 << 20
# The goals the issue sets.
VS_BARE_GOAL = 0.9  # remote_uniform / bare_grpc, for batches of at least 1 MiB
VS_TORCH_GOAL = 1.0  # remote_uniform / torch_dataloader
E2E_GOAL = 0.95  # steps/s, remote curated / local DataLoader uniform
# remote_uniform / webdataset_dataloader per sample kind (issue 15's table).
VS_WEBDATASET_GOALS = {"large": 1.0, "small": 3.0}
BASES = (("vs_bare_grpc", "bare_grpc"), ("vs_torch_dataloader", "torch_dataloader"),
         ("vs_webdataset_dataloader", "webdataset_dataloader"))  # fmt: skip


def _rate(rows: list[dict], path: str, sample: str) -> float | None:
    for row in rows:
        if row["path"] == path and row["sample"] == sample:
            return row["samples_per_s"]
    return None


def summarise(rows: list[dict], e2e: list[dict]) -> dict:
    """Adds `vs_bare_grpc`, `vs_torch_dataloader` and `vs_webdataset_dataloader` to every row;
    returns the goal checks."""
    for row in rows:
        for key, base in BASES:
            ref = _rate(rows, base, row["sample"])
            row[key] = row["samples_per_s"] / ref if ref else None
    goals = []
    for row in rows:
        if row["path"] != "remote_uniform":
            continue
        if row["vs_bare_grpc"] is not None and row["batch_bytes"] >= MIB:
            goals.append({"goal": f"remote_uniform >= {VS_BARE_GOAL} x bare_grpc (batches >= 1 MiB)",
                          "sample": row["sample"], "ratio": row["vs_bare_grpc"],
                          "met": row["vs_bare_grpc"] >= VS_BARE_GOAL})  # fmt: skip
        if row["vs_torch_dataloader"] is not None:
            goals.append({"goal": f"remote_uniform >= {VS_TORCH_GOAL} x torch_dataloader", "sample": row["sample"],
                          "ratio": row["vs_torch_dataloader"], "met": row["vs_torch_dataloader"] >= VS_TORCH_GOAL})  # fmt: skip
        goal = VS_WEBDATASET_GOALS.get(row["sample"])
        if row["vs_webdataset_dataloader"] is not None and goal is not None:
            goals.append({"goal": f"remote_uniform >= {goal} x webdataset_dataloader", "sample": row["sample"],
                          "ratio": row["vs_webdataset_dataloader"], "met": row["vs_webdataset_dataloader"] >= goal})  # fmt: skip
    for sample in sorted({e["sample"] for e in e2e}):
        mine = {e["source"]: e["steps_per_s"] for e in e2e if e["sample"] == sample and e["steps_per_s"]}
        if "remote_curated" in mine and "torch_dataloader_uniform" in mine:
            ratio = mine["remote_curated"] / mine["torch_dataloader_uniform"]
            goals.append({"goal": f"end to end: remote curated >= {E2E_GOAL} x DataLoader uniform (steps/s)",
                          "sample": sample, "ratio": ratio, "met": ratio >= E2E_GOAL})  # fmt: skip
    return {"goals": goals}


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    lines = ["| sample | path | batch | samples/s | MB/s | × bare_grpc | × torch_dataloader | × webdataset_dataloader "
             "| first epoch samples/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in report["throughput"]:
        first = row.get("first_epoch_samples_per_s")
        lines.append(
            f"| {row['sample']} | {row['path']} | {row['batch_size']} | {row['samples_per_s']:,.0f} | "
            f"{row['mb_per_s']:,.1f} | {fmt(row['vs_bare_grpc'])} | {fmt(row['vs_torch_dataloader'])} | "
            f"{fmt(row.get('vs_webdataset_dataloader'))} | "
            f"{'–' if first is None else f'{first:,.0f}'} |"
        )
    if report["end_to_end"]:
        lines += ["", "| sample | source | steps/s | share of wall time not in the step | error |",
                  "|---|---|---:|---:|---|"]  # fmt: skip
        for e in report["end_to_end"]:
            wait = "–" if e["wait_fraction"] is None else f"{e['wait_fraction']:.0%}"
            lines.append(f"| {e['sample']} | {e['source']} | {fmt(e['steps_per_s'])} | {wait} | {e.get('error') or ''} |")
    if report["goals"]:
        lines += ["", "| goal | sample | ratio | met |", "|---|---|---:|---|"]
        for g in report["goals"]:
            lines.append(f"| {g['goal']} | {g['sample']} | {g['ratio']:.2f} | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"
