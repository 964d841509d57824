"""Load and back-pressure: 8 trainer processes on one service, a stalled one, trainers churning.

    python benchmarks/load.py --json benchmarks/results/load.json
    python benchmarks/load.py --quick --json /tmp/load.json

Phases, each with fresh jobs on one service (local Ray, gRPC on 127.0.0.1), after an unmeasured
warm-up of half a phase:
  alone     7 trainers consume for --seconds
  stalled   the same 7, plus one that takes two batches and then stops reading for the whole phase
  eight     8 trainers consume
  ranks     8 trainers are the 8 ranks of one job
  churn     8 trainers leave after 1-8 batches and rejoin from their state, for --seconds
The service's memory is the summed PSS of this process (gateway and pipeline) and of every actor's
worker process, sampled every 0.5 s. Each trainer checks that no epoch served an id twice.
"""

from __future__ import annotations

import actors  # noqa: F401  (must precede anything that imports ray: keeps a local Ray on loopback)

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

from actors.pipeline import Pipeline
from actors.runtime import ensure_ray, shutdown
from loader.config import from_mapping
from loader.datasets import make_shards
from loader.gateway.server import BackgroundGateway

def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (Ray's object store is mapped into every worker) are
    split between the processes that map them, so a sum over processes counts them once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # the process is gone
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak and last summed PSS of the service's processes, sampled in the background."""

    def __init__(self, pipeline: Pipeline, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pipeline, self.every_s = pipeline, every_s
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._pids: set[int] = {os.getpid()}

    def refresh_pids(self) -> None:
        self._pids = set(self.pipeline.processes().values())

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop_event.wait(self.every_s):
            if len(self.samples) % 4 == 0:
                try:  # jobs (and their curators) come and go with the phases
                    self.refresh_pids()
                except Exception:  # an actor mid-restart: keep the last known set
                    pass
            self.samples.append((time.monotonic() - started, sum(pss_bytes(p) for p in list(self._pids))))

    def window(self, since: float) -> dict:
        mine = [pss for t, pss in self.samples if t >= since] or [0]
        return {"peak_mb": max(mine) / 2**20, "last_mb": mine[-1] / 2**20}

    def now(self) -> float:
        return self.samples[-1][0] if self.samples else 0.0


def run_phase(address: str, name: str, modes: list[str], seconds: float, one_job: bool = False) -> list[dict]:
    """One trainer process per mode, each its own job, or the ranks of one job."""
    ranks = lambda i: [str(i), str(len(modes))] if one_job else []  # noqa: E731
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.load_trainer", address, name if one_job else f"{name}-{i}", mode,
             str(seconds), str(i), *ranks(i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i, mode in enumerate(modes)
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=seconds + 180)  # bounded: a deadlock fails the run
        if proc.returncode != 0:
            raise RuntimeError(f"trainer of phase {name} failed: {stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def summarise(results: list[dict], mode: str = "consume") -> dict:
    mine = [r for r in results if r["mode"] == mode]
    rates = [r["samples"] / r["seconds"] for r in mine]
    return {
        "trainers": len(mine),
        "samples_per_s_total": sum(rates),
        "samples_per_s_min": min(rates),
        "samples_per_s_mean": sum(rates) / len(rates),
        "batches": sum(r["batches"] for r in mine),
        "repeats": sum(not ok for r in results for ok in r["epochs_without_repeats"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--samples", type=int, default=20000, help="MNIST-1D samples in the pool")
    parser.add_argument("--quick", action="store_true", help="10 s phases")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    seconds = 10.0 if args.quick else args.seconds
    wall = time.monotonic()
    ensure_ray(None, num_cpus=2)
    with tempfile.TemporaryDirectory() as root:
        shards = make_shards(root, shards=20, samples=args.samples, fmt="tar", progress=False)["train"]
        # Jobs of a finished phase are released after 5 s idle, so each phase's memory is its own.
        config = from_mapping({"shards": shards, "address": "127.0.0.1:0", "readers": 2, "ready_batches": 4,
                               "job_idle_s": 5.0})  # fmt: skip
        pipeline = Pipeline(config)
        gateway = BackgroundGateway(pipeline, config)
        address = gateway.start()
        sampler = MemorySampler(pipeline)
        sampler.start()
        phases = {}
        try:
            # Readers decode every shard once and Ray starts its worker processes: not measured.
            run_phase(address, "warmup", ["consume"] * 7, seconds / 2)
            for name, modes in [
                ("alone", ["consume"] * 7),
                ("stalled", ["consume"] * 7 + ["stall"]),
                ("eight", ["consume"] * 8),
                ("ranks", ["consume"] * 8),
                ("churn", ["churn"] * 8),
            ]:
                since = sampler.now()
                results = run_phase(address, name, modes, seconds, one_job=name == "ranks")
                phases[name] = {**summarise(results, "churn" if name == "churn" else "consume"), **sampler.window(since)}
                print(name, json.dumps(phases[name]), flush=True)
        finally:
            sampler.stop_event.set()
            gateway.stop()
            pipeline.shutdown()
            shutdown()
    report = {
        "phases": phases,
        "stalled_vs_alone": phases["stalled"]["samples_per_s_mean"] / phases["alone"]["samples_per_s_mean"],
        "setup": {
            "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}",
            "phase_seconds": seconds, "pool": args.samples, "batch_size": 64, "prefetch": 4, "job_idle_s": 5.0,
            "command": "python " + " ".join(sys.argv), "wall_seconds": time.monotonic() - wall,
        },
    }  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "phases"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
