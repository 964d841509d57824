"""Selection cost: the curator's time per training batch, against the trainer's time per step.

Drives the real pure Curator (policy `learnability+bandit+diversity`) over a registered pool
(see selection_pool.py and selection_drive.py) and times, per full-size batch:

- draw: the bandit's quota draw of a super-batch from the ClusteredShuffleBuffer
  (`take_candidates`; the assembler's work, per batch);
- select: `Curator.select` as its own `selection_seconds` counts it (policy scores, diversity,
  weights, the kept rows' Arrow take, memory and per-cluster bookkeeping);
- encode: the rest of `select` (Arrow IPC encode of the kept batch, ledger), reported apart;
- feedback: `Curator.feedback` for the batch's reported losses, reported apart.

The goal compares draw + select with one training step (forward, backward, Adam) of a
784-256-10 MLP at B = 256, timed in a torch child process in the same run. Curator parts run with
BLAS limited to one thread, as in a Ray actor (Ray sets OMP_NUM_THREADS=1 for an actor with
num_cpus=0, and the curator actor has num_cpus=0).

    python benchmarks/selection_cost.py --json benchmarks/results/selection_cost.json
    python benchmarks/selection_cost.py --quick --json benchmarks/results/selection_cost-quick.json
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from mlp_timing import TorchTimer
from selection_drive import Driver, Setting, Timings
from selection_pool import index_bytes
from selection_report import markdown

GOAL_SNAPSHOT = 0.5  # (draw + select + forward) / train step
GOAL_FEEDBACK = 0.1  # (draw + select) / train step
GOAL_POOL_FLAT = 1.2  # time per batch at the largest pool / at the smallest
GOAL_INDEX_BYTES = 32  # pool index bytes per sample, embeddings aside

SWEEPS = {
    "batch_size": [64, 128, 256, 512, 1024],
    "dim": [16, 32, 64, 128, 256],
    # memory_size must be >= 1: one remembered row stands for none (the in-batch chunks remain).
    "memory": [1, 256, 1024, 4096],
    "clusters": [1, 8, 32, 128],
    "score_spread": [0.0, 0.25, 1.0, 4.0],
}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 4) if values else float("nan")


def summary(t: Timings) -> dict:
    """Medians per part in ms: CPU time (the headline figures) and, prefixed wall_, wall time."""
    out: dict = {"batches": t.count}
    for clock, prefix in (("cpu", ""), ("wall", "wall_")):
        parts = getattr(t, clock)
        per_batch = [d + s for d, s in zip(parts["draw"], parts["select"])]
        for part in ("draw", "select", "encode", "feedback"):
            out[f"{prefix}{part}_ms"] = ms(parts[part])
        out[f"{prefix}draw_plus_select_ms"] = ms(per_batch)
        out[f"{prefix}draw_plus_select_p90_ms"] = round(1e3 * float(np.percentile(per_batch, 90)), 4)
    out["wall_intake_ms_per_batch"] = round(1e3 * t.intake_seconds / max(t.batches_emitted, 1), 4)
    return out


def torch_ms(samples: list[tuple[float, float]]) -> dict:
    walls, cpus = zip(*samples)
    return {"cpu_ms": ms(list(cpus)), "wall_ms": ms(list(walls)),
            "wall_p10_ms": round(1e3 * float(np.percentile(walls, 10)), 4), "repeats": len(samples)}  # fmt: skip


def warm(driver: Driver) -> None:
    """Fills the diversity memory and gives the bandit a few rewards before anything is timed."""
    s = driver.setting
    driver.run(max(6, -(-s.memory // s.batch_size) + 3))


def rounds_of(drivers: dict[str, Driver], rounds: int, batches: int, snapshot: bool = False) -> dict[str, Timings]:
    """Every driver runs `batches` per round, round-robin, so load changes hit all alike."""
    out = {name: Timings() for name in drivers}
    for _ in range(rounds):
        for name, driver in drivers.items():
            out[name].extend(driver.run(batches, snapshot=snapshot))
    return out


def goal_block(torch_timer: TorchTimer, args: argparse.Namespace) -> tuple[dict, Driver]:
    """The headline setting, interleaved round by round with the trainer's step and the scorer's
    forward, so that each ratio compares times taken under the same load.

    Ratios use CPU-time medians on both sides with one thread each: the curator is single-threaded
    (Ray actor), and a one-thread step's CPU time is its wall time on an idle core. The trainer's
    default thread count is timed too (wall), but on a loaded machine its threads wait for each
    other and its times say more about the load than about the step.
    """
    driver = Driver(Setting(pool=args.pool))
    warm(driver)
    s = driver.setting
    feedback, snapshot = Timings(), Timings()
    steps1, steps_n, forward1 = [], [], []
    threads = torch_timer.default_threads
    for r in range(args.rounds):
        steps1 += torch_timer.times("train_step", 1, s.batch_size, args.steps, seed=r)
        feedback.extend(driver.run(args.batches))
        steps_n += torch_timer.times("train_step", threads, s.batch_size, args.steps, seed=r)
        snapshot.extend(driver.run(args.batches, snapshot=True))
        forward1 += torch_timer.times("forward", 1, driver.super_batch, args.forwards, seed=r)
    step1, step_n, fwd = torch_ms(steps1), torch_ms(steps_n), torch_ms(forward1)
    step = step1["cpu_ms"]
    fb, sn = summary(feedback), summary(snapshot)
    snapshot_total = sn["draw_plus_select_ms"] + fwd["cpu_ms"]
    return {
        "setting": dataclasses.asdict(s) | {"super_batch": driver.super_batch, "policy": s.policy},
        "train_step_ms": step,
        "train_step": {"1_thread": step1, f"{threads}_threads": step_n, "default_threads": threads},
        "feedback": fb | {
            "ratio_to_step": round(fb["draw_plus_select_ms"] / step, 3),
            "goal": GOAL_FEEDBACK,
            "met": fb["draw_plus_select_ms"] <= GOAL_FEEDBACK * step,
        },
        "snapshot": sn | {
            "forward_1_thread": fwd,
            "forward_rows": driver.super_batch,
            "draw_select_forward_ms": round(snapshot_total, 4),
            "ratio_to_step": round(snapshot_total / step, 3),
            "goal": GOAL_SNAPSHOT,
            "met": snapshot_total <= GOAL_SNAPSHOT * step,
        },
    }, driver  # fmt: skip


def sweeps(args: argparse.Namespace, torch_timer: TorchTimer) -> dict[str, list[dict]]:
    base = Setting(pool=args.pool)
    out: dict[str, list[dict]] = {}
    for name, values in SWEEPS.items():
        drivers = {}
        for value in values:
            drivers[str(value)] = Driver(dataclasses.replace(base, **{name: value}))
            warm(drivers[str(value)])
        if name == "memory":
            drivers["no diversity"] = Driver(dataclasses.replace(base, diversity=False))
            warm(drivers["no diversity"])
        before = load()
        timed = rounds_of(drivers, args.rounds, args.batches)
        rows = []
        for label, driver in drivers.items():
            row = {name: label, "super_batch": driver.super_batch, "clusters_found": driver.build.clusters_found,
                   **summary(timed[label])}  # fmt: skip
            if name == "batch_size":
                forward = torch_timer.times("forward", 1, driver.super_batch, args.forwards, seed=int(label))
                row["forward_ms_1_thread"] = torch_ms(forward)["cpu_ms"]
            rows.append(row)
        out[name] = rows
        print(f"sweep {name}: load {before} -> {load()}", file=sys.stderr)
        for row in rows:
            print("  ", row, file=sys.stderr)
    return out


def pool_sizes(args: argparse.Namespace) -> list[dict]:
    drivers, builds = {}, {}
    for n in args.pool_sizes:
        driver = Driver(Setting(pool=n))
        warm(driver)
        drivers[str(n)] = driver
        nbytes = index_bytes(driver.curator)
        builds[str(n)] = {"build_seconds": round(driver.build.seconds, 2), "index_bytes": nbytes,
                          "shards": len(driver.build.records)}  # fmt: skip
        print(f"pool {n}: built in {driver.build.seconds:.1f} s, load {load()}", file=sys.stderr)
    timed = rounds_of(drivers, args.rounds, args.batches)
    rows = []
    for label, driver in drivers.items():
        n = int(label)
        nbytes = builds[label]["index_bytes"]
        metadata = sum(v for k, v in nbytes.items() if k != "embedding")
        rows.append({
            "pool": n,
            **summary(timed[label]),
            **{k: v for k, v in builds[label].items() if k != "index_bytes"},
            "index_bytes_per_sample": round(metadata / n, 3),
            "index_columns_bytes_per_sample": {k: round(v / n, 3) for k, v in nbytes.items() if k != "embedding"},
            "embedding_bytes_per_sample": round(nbytes["embedding"] / n, 3),
        })  # fmt: skip
    return rows


def profile(driver: Driver, batches: int) -> str:
    """cProfile of the headline setting's feedback-mode batches: the top functions by own time,
    in CPU time like the medians (wall time on a shared machine mostly measures the others)."""
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    driver.run(batches)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats(25)
    return text.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="one round, fewer batches, smaller sweep pool, no profile, pools up to 10^6")
    parser.add_argument("--md", help="markdown tables (default: next to --json, .md)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per measurement (3; quick 1)")
    parser.add_argument("--batches", type=int, help="timed batches per setting and round (20; quick 8)")
    parser.add_argument("--pool", type=int, help="pool size of the headline and sweeps (10^5; quick 2*10^4)")
    parser.add_argument("--max-pool-exp", type=int, help="largest pool 10^N (7; quick 6)")
    parser.add_argument("--no-sweeps", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile the headline setting even with --quick")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.batches = args.batches or (8 if args.quick else 20)
    args.pool = args.pool or (20_000 if args.quick else 100_000)
    args.steps = 40 if args.quick else 150
    args.forwards = 8 if args.quick else 25
    args.no_profile = args.no_profile or (args.quick and not args.profile)
    top = args.max_pool_exp or (6 if args.quick else 7)
    args.pool_sizes = [10**e for e in range(4, top + 1)]

    started = time.perf_counter()
    result: dict = {
        "benchmark": "selection_cost",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "pyarrow": pa.__version__},  # fmt: skip
        "load_average": {"start": load()},
        "curator_blas_threads": 1,
    }
    torch_timer = TorchTimer()
    result["machine"]["torch"] = torch_timer.torch_version
    try:
        with threadpool_limits(1):
            goal, headline = goal_block(torch_timer, args)
            result["load_average"]["after_goal"] = load()
            print(json.dumps(goal, indent=1), file=sys.stderr)
            result["sweeps"] = {} if args.no_sweeps else sweeps(args, torch_timer)
            result["load_average"]["after_sweeps"] = load()
            result["pool_size"] = pool_sizes(args)
            result["load_average"]["after_pool_size"] = load()
            if not args.no_profile:
                result["profile"] = profile(headline, 4 * args.batches)
    finally:
        torch_timer.close()
    pool = result["pool_size"]
    ratio = pool[-1]["draw_plus_select_ms"] / pool[0]["draw_plus_select_ms"]
    index = max(row["index_bytes_per_sample"] for row in pool)
    goal["pool_flat"] = {"from": pool[0]["pool"], "to": pool[-1]["pool"], "ratio": round(ratio, 3),
                         "goal": GOAL_POOL_FLAT, "met": ratio <= GOAL_POOL_FLAT}  # fmt: skip
    goal["pool_index"] = {
        "bytes_per_sample": index, "goal": GOAL_INDEX_BYTES, "met": index <= GOAL_INDEX_BYTES,
        "embeddings": "float16 [rows, d] per shard, 2*d bytes per sample, kept apart from the index columns",
    }  # fmt: skip
    result["baseline_train_step_ms"] = goal["train_step_ms"]
    result["goal"] = goal
    result["load_average"]["end"] = load()
    result["wall_seconds"] = round(time.perf_counter() - started, 1)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    md_path = args.md or os.path.splitext(args.json)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(markdown(result))
    if "profile" in result:
        with open(os.path.splitext(args.json)[0] + "-profile.txt", "w") as f:
            f.write(result["profile"])
    print(markdown(result))
    print(f"wall {result['wall_seconds']} s; wrote {args.json} and {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
