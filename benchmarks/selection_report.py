"""Markdown tables for the selection-cost benchmark's JSON result."""

from __future__ import annotations

# (JSON field, column header); CPU-time medians unless the header says wall.
PARTS = (
    ("draw_ms", "draw"),
    ("select_ms", "select"),
    ("draw_plus_select_ms", "**draw+select**"),
    ("draw_plus_select_p90_ms", "p90"),
    ("wall_draw_plus_select_ms", "wall draw+select"),
    ("encode_ms", "encode"),
    ("feedback_ms", "feedback"),
)


def _yes(met: bool) -> str:
    return "**met**" if met else "**not met**"


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def goal_table(result: dict) -> str:
    g = result["goal"]
    fb, sn = g["feedback"], g["snapshot"]
    one, threads = g["train_step"]["1_thread"], g["train_step"]["default_threads"]
    many = g["train_step"][f"{threads}_threads"]
    rows = [
        ["train step (784-256-10 MLP, B 256, Adam), 1 thread: CPU median (the baseline)", f"{one['cpu_ms']:.3f}",
         "1", "", ""],
        ["same, 1 thread: wall median / p10", f"{one['wall_ms']:.3f} / {one['wall_p10_ms']:.3f}", "", "", ""],
        # Under load the threads of a multi-threaded step wait for each other; its median then
        # measures the load, and only its 10th percentile says something about the step.
        [f"same, {threads} threads (torch default): wall median / p10", f"{many['wall_ms']:.3f} / {many['wall_p10_ms']:.3f}",
         "", "", ""],
        ["feedback mode: draw + select", f"{fb['draw_plus_select_ms']:.3f}", f"{fb['ratio_to_step']:.2f}",
         f"≤ {fb['goal']}", _yes(fb["met"])],
        ["snapshot mode: draw + select", f"{sn['draw_plus_select_ms']:.3f}", "", "", ""],
        [f"snapshot forward of {sn['forward_rows']} rows, 1 thread (the scorer actor's)",
         f"{sn['forward_1_thread']['cpu_ms']:.3f}", "", "", ""],
        ["snapshot mode: draw + select + forward", f"{sn['draw_select_forward_ms']:.3f}", f"{sn['ratio_to_step']:.2f}",
         f"≤ {sn['goal']}", _yes(sn["met"])],
        [f"draw + select, pool {g['pool_flat']['to']:.0e} / pool {g['pool_flat']['from']:.0e}", "",
         f"{g['pool_flat']['ratio']:.2f} (ratio)", f"≤ {g['pool_flat']['goal']}", _yes(g["pool_flat"]["met"])],
        ["pool index bytes per sample (embeddings aside)", f"{g['pool_index']['bytes_per_sample']:g} B", "",
         f"≤ {g['pool_index']['goal']} B", _yes(g["pool_index"]["met"])],
    ]  # fmt: skip
    return _table(["what", "ms", "× train step", "goal", ""], rows)


def parts_table(rows: list[dict], key: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    headers = [key, "S", *(h for _, h in PARTS), *(h for _, h in extra)]
    body = []
    for row in rows:
        cells = [row[key], row.get("super_batch", "")] + [f"{row[p]:.3f}" for p, _ in PARTS]
        cells += [f"{row[e]:g}" if isinstance(row.get(e), (int, float)) else row.get(e, "") for e, _ in extra]
        body.append(cells)
    return _table(headers, body)


def markdown(result: dict) -> str:
    g = result["goal"]
    s = g["setting"]
    out = [
        f"Setting: `{s['policy']}`, B {s['batch_size']}, ρ {s['keep_ratio']}, S {s['super_batch']}, "
        f"{s['dim']}-d embeddings, memory {s['memory']}, {s['clusters']} clusters, pool {s['pool']:,} samples "
        f"in shards of {s['shard_rows']:,}. Medians over {g['feedback']['batches']} batches per mode and "
        f"{g['train_step']['1_thread']['repeats']} training steps, interleaved; times in ms, CPU time unless "
        f"marked wall. Load average (1, 5, 15 min): {result['load_average']}.\n",
        goal_table(result),
    ]
    for name, rows in result.get("sweeps", {}).items():
        extra = (("forward_ms_1_thread", "forward S rows"),) if name == "batch_size" else ()
        out.append(f"\nSweep over `{name}` (other settings as above):\n\n" + parts_table(rows, name, extra))
    pool_rows = [dict(r, pool=f"{r['pool']:.0e}") for r in result["pool_size"]]
    extra = (("index_bytes_per_sample", "index B/sample"), ("embedding_bytes_per_sample", "embedding B/sample"),
             ("build_seconds", "build s"))  # fmt: skip
    out.append("\nPool size (registered samples):\n\n" + parts_table(pool_rows, "pool", extra))
    return "\n".join(out)
