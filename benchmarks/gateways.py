"""Gateway processes: two ranks of one job, each through a gateway of its own, against both ranks
through one gateway (config `gateways`, actors/gateways.py).

    python benchmarks/gateways.py --sample large --rounds 2 --json benchmarks/results/gateways.json

For each round and each setting (1 gateway, 2 gateways), a fresh in-process service on a local
Ray (as benchmarks/throughput.py starts it), one untimed epoch, then --epochs timed ones read by
two consumer processes at once (ranks 0 and 1 of one job, `uniform`). With 2 gateways the second
is started on a port of its own and rank 1 reads through it, so the placement is fixed (with
`gateways: 2` on one port the kernel picks). Reported: both ranks' samples/s together (samples
over the slower rank's time), and CPU ms per delivered batch of each service process (from
/proc, as benchmarks/service_cpu.py counts it).
"""

from __future__ import annotations

import actors  # noqa: F401  (must precede anything that imports ray: keeps a local Ray on loopback)

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

from actors.pipeline import Pipeline
from actors.runtime import ensure_ray, shutdown
from loader.config import from_mapping
from loader.gateway.server import BackgroundGateway
from service_cpu import cpu_seconds
from throughput import HERE, kinds, write_shards


def ranks(addresses: list[str], job: str, batch_size: int, epochs: int, first_epoch: int = 0) -> list[dict]:
    """Both ranks' consumers at once; each one's result (epochs with samples and seconds)."""
    consumer = [sys.executable, os.path.join(HERE, "throughput_consumer.py")]
    specs = [{"mode": "remote", "address": a, "job": job, "batch_size": batch_size, "policy": "uniform",
              "epochs": epochs, "rank": r, "world_size": len(addresses), "first_epoch": first_epoch}
             for r, a in enumerate(addresses)]  # fmt: skip
    procs = [subprocess.Popen([*consumer, json.dumps(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in specs]  # fmt: skip
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"a consumer failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def one_setting(paths: list[str], kind, gateways: int, epochs: int, r: int) -> dict:
    config = from_mapping({"shards": paths, "address": "127.0.0.1:0", **kind.service})
    pipeline = Pipeline(config)
    gateway = BackgroundGateway(pipeline, config)
    addresses = [gateway.start()]
    try:
        if gateways == 2:
            start = pipeline.start_gateways("127.0.0.1:0", 1, False)
            addresses += asyncio.run_coroutine_threadsafe(start, gateway._loop).result(120)
        else:
            addresses.append(addresses[0])
        job = f"gateways-{gateways}-{r}"
        ranks(addresses, job, kind.batch_size, 1)  # curator started, reader caches filled
        processes = pipeline.processes()
        before = {name: cpu_seconds(pid) for name, pid in processes.items()}
        load = os.getloadavg()[0]
        results = ranks(addresses, job, kind.batch_size, epochs, first_epoch=1)
        spent = {name: cpu_seconds(pid) - before[name] for name, pid in processes.items()}
    finally:
        gateway.stop()
        pipeline.shutdown()
    samples = sum(e["samples"] for res in results for e in res["epochs"])
    batches = sum(e["batches"] for res in results for e in res["epochs"])
    seconds = max(sum(e["seconds"] for e in res["epochs"]) for res in results)
    per_batch = {name: s / batches * 1e3 for name, s in spent.items()}
    return {"gateways": gateways, "round": r, "samples_per_s": samples / seconds, "batches": batches,
            "load_1min": load, "cpu_ms_per_batch": per_batch, "service_cpu_ms_per_batch": sum(per_batch.values())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", choices=("small", "large"), default="large")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running both settings")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    kind = next(k for k in kinds(quick=True) if k.name == args.sample)
    ensure_ray(None, num_cpus=2)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="gateways-") as root:
            paths = write_shards(kind, root)
            for r in range(args.rounds):
                for gateways in (1, 2) if r % 2 == 0 else (2, 1):  # alternated: the machine drifts
                    row = one_setting(paths, kind, gateways, args.epochs, r)
                    rows.append(row)
                    gateway_ms = sum(ms for name, ms in row["cpu_ms_per_batch"].items() if "ateway" in name)
                    print(f"{args.sample} round {r} gateways {gateways}: {row['samples_per_s']:,.0f} samples/s, "
                          f"service CPU {row['service_cpu_ms_per_batch']:.2f} ms/batch (gateways {gateway_ms:.2f}), "
                          f"load {row['load_1min']:.1f}", flush=True)  # fmt: skip
    finally:
        shutdown()
    if args.json:
        report = {"sample": args.sample, "epochs": args.epochs, "date": time.strftime("%Y-%m-%d"), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
