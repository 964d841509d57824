"""Delivery throughput and end-to-end trainer steps: the loader service against its baselines.

    python benchmarks/throughput.py --json benchmarks/results/throughput.json
    python benchmarks/throughput.py --quick --json /tmp/throughput-quick.json

For small samples (MNIST-1D vectors, tar shards from `loader.datasets.make_shards`) and large ones
(uint8 3x224x224 images, tar shards), with one batch size per kind for every path:
  bare_grpc         a grpc.aio server streams pre-encoded batches (the same Arrow IPC bytes the
                    service sends) to a sync client: the ceiling of Python gRPC here
  remote_uniform    RemoteLoader, policy `uniform`, from an in-process service on a local Ray
  remote_curated    RemoteLoader, policy `loss` (InfoBatch) with random losses reported per batch
  torch_dataloader  torch DataLoader, 2 workers, an IterableDataset over the same shards
  webdataset_dataloader  webdataset.WebDataset (shard shuffle, shuffle buffer, decode, batched)
                    in a 2-worker DataLoader, the way its documentation shows
  ray_data          Ray Data `iter_torch_batches`, a read task per shard
Every consumer but Ray Data runs in its own process, as a trainer would. Each path runs one
untimed warm-up epoch, then --epochs timed ones; samples/s counts delivered samples (a curated
epoch delivers keep_ratio of the pool) and MB/s is samples/s times the bytes of one sample's
columns. End to end: trainer steps/s of one model with RemoteLoader (curated, real losses
reported) against the local DataLoader (uniform), and with batches held in memory (no loader).
Everything is measured --rounds times, interleaved, and the median round is reported with every
round's figure and the 1-minute load average next to it: the machine is shared.
"""

from __future__ import annotations

import actors  # noqa: F401  (must precede anything that imports ray: keeps a local Ray on loopback)

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from actors.pipeline import Pipeline
from actors.runtime import ensure_ray, shutdown
from bare_grpc import BareServer
from baselines import ray_data_epoch, shard_columns, time_epochs
from image_shards import write_image_shards
from loader import codec
from loader.config import from_mapping
from loader.datasets import make_shards
from loader.gateway.server import BackgroundGateway
from loader.reader import read_with_ids
from throughput_report import fmt, markdown, summarise

HERE = os.path.dirname(os.path.abspath(__file__))
# InfoBatch on reported losses: real selection work (a fifth of each super-batch is kept) without
# a reference model.
CURATED = {"policy": "loss", "options": {"keep_ratio": 0.2}}


@dataclasses.dataclass
class Kind:
    """One sample kind: its pool, batch size, service settings and end-to-end step counts."""

    name: str
    batch_size: int
    shards: int
    per_shard: int
    service: dict
    warmup_steps: int
    steps: int


def kinds(quick: bool) -> list[Kind]:
    return [
        Kind("small", 256, 8 if quick else 20, 1000, {}, 20, 100 if quick else 300),
        # The default shuffle buffer (4096 rows) would hold 600 MB of images per job; 512 rows
        # still mixes 8 shards.
        Kind("large", 32, 16 if quick else 32, 64, {"shuffle_rows": 512}, 2, 3 if quick else 6),
    ]


def write_shards(kind: Kind, root: str) -> list[str]:
    out = os.path.join(root, kind.name)
    if kind.name == "small":
        # mnist1d keeps 20% of the samples for its test split and make_shards 20% of the rest for
        # holdout; the train split is the pool.
        total = round(kind.shards * kind.per_shard / 0.64)
        return make_shards(out, shards=kind.shards, samples=total, fmt="tar", progress=False)["train"]
    return write_image_shards(out, kind.shards, kind.per_shard)


def sample_bytes(path: str) -> int:
    """Bytes of one sample's numeric columns: what every path delivers per sample."""
    columns = shard_columns(path)
    return sum(v.nbytes // len(v) for v in columns.values())


def wire_messages(paths: list[str], batch_size: int, count: int = 8) -> list[bytes]:
    """Batches encoded exactly as the curator encodes them (shard rows, `_id`, `_weight`)."""
    table = pa.concat_tables([read_with_ids(p, i).table for i, p in enumerate(paths[:4])])
    out = []
    for i in range(count):
        start = (i * batch_size) % max(table.num_rows - batch_size, 1)
        rows = table.slice(start, batch_size)
        payload = codec.encode(rows.append_column(codec.WEIGHT, pa.array(np.ones(rows.num_rows, np.float32))))
        out.append(payload.to_pybytes())
    return out


def consumer(spec: dict, timeout_s: float = 900) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(HERE, "throughput_consumer.py"), json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"consumer {spec['mode']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def epochs_record(path: str, kind: Kind, epochs: list[dict], nbytes: int, **extra) -> dict:
    """Headline figures over the timed epochs (all but the first); the first epoch on its own."""
    timed = epochs[1:] or epochs
    samples = sum(e["samples"] for e in timed)
    seconds = sum(e["seconds"] for e in timed)
    first = epochs[0]
    rate = samples / seconds
    return {
        "path": path, "sample": kind.name, "batch_size": kind.batch_size, "batch_bytes": kind.batch_size * nbytes,
        "samples_per_s": rate, "mb_per_s": rate * nbytes / 1e6,
        "timed_epochs": len(timed), "timed_samples": samples, "timed_seconds": seconds,
        "first_epoch_samples_per_s": first["samples"] / first["seconds"],
        "first_batch_s": first["first_batch_s"], "epochs": epochs, **extra,
    }  # fmt: skip


def bare_record(kind: Kind, messages: list[bytes], count: int, nbytes: int) -> dict:
    server = BareServer(messages)
    try:
        result = consumer({"mode": "bare", "address": server.start(), "count": count})
    finally:
        server.stop()
    rate = result["messages"] * kind.batch_size / result["seconds"]
    return {"path": "bare_grpc", "sample": kind.name, "batch_size": kind.batch_size,
            "batch_bytes": kind.batch_size * nbytes, "samples_per_s": rate, "mb_per_s": rate * nbytes / 1e6,
            "wire_mb_per_s": result["wire_bytes"] / result["seconds"] / 1e6, **result}  # fmt: skip


def service_round(kind: Kind, paths: list[str], r: int, epochs: int, nbytes: int, only: set[str]):
    """RemoteLoader paths on a fresh service (its own jobs each round); yields (path, record)."""
    config = from_mapping({"shards": paths, "address": "127.0.0.1:0", **kind.service})
    pipeline = Pipeline(config)
    gateway = BackgroundGateway(pipeline, config)
    address = gateway.start()
    common = {"address": address, "batch_size": kind.batch_size, "epochs": epochs + 1}
    try:
        if "remote_uniform" in only:
            spec = {"mode": "remote", "job": f"uniform-{r}", "policy": "uniform", **common}
            yield "remote_uniform", epochs_record("remote_uniform", kind, consumer(spec)["epochs"], nbytes)
        if "remote_curated" in only:
            spec = {"mode": "remote", "job": f"curated-{r}", "report": True, **CURATED, **common}
            yield "remote_curated", epochs_record("remote_curated", kind, consumer(spec)["epochs"], nbytes, **CURATED)
        if "e2e" in only:
            spec = {"mode": "train", "sample": kind.name, "batch_size": kind.batch_size, "warmup": kind.warmup_steps,
                    "steps": kind.steps, "source": "remote", "address": address, "job": f"e2e-{r}", **CURATED}  # fmt: skip
            yield "e2e:remote_curated", {"source": "remote_curated", "sample": kind.name, **CURATED, **consumer(spec)}
    finally:
        gateway.stop()
        pipeline.shutdown()


def local_round(kind: Kind, paths: list[str], epochs: int, nbytes: int, only: set[str]):
    """The baselines that need no service; yields (path, record)."""
    common = {"batch_size": kind.batch_size, "epochs": epochs + 1, "paths": paths, "workers": 2}
    if "torch_dataloader" in only:
        spec = {"mode": "torch", **common}
        yield "torch_dataloader", epochs_record("torch_dataloader", kind, consumer(spec)["epochs"], nbytes, workers=2)
        spec = {**spec, "in_worker_batches": True}
        record = epochs_record("torch_dataloader_worker_batches", kind, consumer(spec)["epochs"], nbytes, workers=2)
        yield "torch_dataloader_worker_batches", record
    if "webdataset_dataloader" in only:
        # The sample shuffle buffer holds as many rows as the service's (kind.service).
        spec = {"mode": "webdataset", "shuffle": kind.service.get("shuffle_rows", 1000), **common}
        result = consumer(spec)["epochs"]
        yield "webdataset_dataloader", epochs_record("webdataset_dataloader", kind, result, nbytes, workers=2)
    if "ray_data" in only:
        result = time_epochs(lambda e: ray_data_epoch(paths, kind.batch_size, 0, e), epochs + 1)
        yield "ray_data", epochs_record("ray_data", kind, result, nbytes)
    if "e2e" in only:
        for source, label in (("torch", "torch_dataloader_uniform"), ("memory", "in_memory")):
            spec = {"mode": "train", "sample": kind.name, "batch_size": kind.batch_size, "warmup": kind.warmup_steps,
                    "steps": kind.steps, "source": source, "paths": paths}  # fmt: skip
            yield f"e2e:{label}", {"source": label, "sample": kind.name, **consumer(spec)}


def median_of_rounds(records: list[dict], key: str) -> dict:
    """The round with the median figure (the lower middle one for an even count), with every
    round's figure listed: other jobs share this machine, and one round can be far off."""
    valued = sorted((r for r in records if r.get(key) is not None), key=lambda r: r[key])
    chosen = dict(valued[(len(valued) - 1) // 2] if valued else records[0])
    chosen["rounds"] = [{key: r.get(key), "load_1min": r["load_1min"]} for r in records]
    return chosen


def run_kind(kind: Kind, root: str, epochs: int, rounds: int, only: set[str]) -> tuple[list[dict], list[dict], dict]:
    t0 = time.perf_counter()
    paths = write_shards(kind, root)
    nbytes = sample_bytes(paths[0])
    pool = kind.shards * kind.per_shard
    setup = {"sample": kind.name, "shards": len(paths), "pool": pool, "sample_bytes": nbytes,
             "batch_size": kind.batch_size, "batch_bytes": nbytes * kind.batch_size,
             "shard_write_s": time.perf_counter() - t0, "service": kind.service,
             "e2e_warmup_steps": kind.warmup_steps, "e2e_steps": kind.steps}  # fmt: skip
    print(f"[{kind.name}] {pool} samples of {nbytes} B in {len(paths)} shards", flush=True)
    messages = wire_messages(paths, kind.batch_size)
    setup["wire_bytes_per_batch"] = sum(map(len, messages)) / len(messages)
    results: dict[str, list[dict]] = {}

    def keep(path: str, record: dict) -> None:
        record["load_1min"] = os.getloadavg()[0]
        results.setdefault(path, []).append(record)
        figure = record.get("samples_per_s") or record.get("steps_per_s")
        unit = "samples/s" if "samples_per_s" in record else "steps/s"
        print(f"[{kind.name}] round {r} {path} {fmt(figure)} {unit} (load {record['load_1min']:.1f})", flush=True)

    for r in range(rounds):
        if "bare_grpc" in only:
            keep("bare_grpc", bare_record(kind, messages, epochs * pool // kind.batch_size, nbytes))
        if {"remote_uniform", "remote_curated", "e2e"} & only:
            for path, record in service_round(kind, paths, r, epochs, nbytes, only):
                keep(path, record)
        for path, record in local_round(kind, paths, epochs, nbytes, only):
            keep(path, record)
    rows = [median_of_rounds(v, "samples_per_s") for k, v in results.items() if not k.startswith("e2e:")]
    e2e = [median_of_rounds(v, "steps_per_s") for k, v in results.items() if k.startswith("e2e:")]
    setup["seconds"] = time.perf_counter() - t0
    return rows, e2e, setup


PATHS = ("bare_grpc", "remote_uniform", "remote_curated", "torch_dataloader", "webdataset_dataloader", "ray_data", "e2e")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller pools, one timed epoch, fewer steps")
    parser.add_argument("--epochs", type=int, help="timed epochs per path (default 3, 1 with --quick)")
    parser.add_argument("--rounds", type=int, help="repeats of every measurement (default 2, 1 with --quick)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--markdown", help="write the result tables here (default: --json with .md)")
    parser.add_argument("--only", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--samples", default="small,large", help="sample kinds to run")
    args = parser.parse_args()
    epochs = args.epochs or (1 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 2)
    only = set(args.only.split(","))
    wall = time.perf_counter()
    load_before = os.getloadavg()
    ensure_ray(None, num_cpus=2)
    rows, e2e, setups = [], [], []
    try:
        with tempfile.TemporaryDirectory(prefix="throughput-") as root:
            for kind in kinds(args.quick):
                if kind.name in args.samples.split(","):
                    r, e, s = run_kind(kind, root, epochs, rounds, only)
                    rows += r
                    e2e += e
                    setups.append(s)
    finally:
        shutdown()
    report = {
        "throughput": rows,
        "end_to_end": e2e,
        **summarise(rows, e2e),
        "setup": {
            "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}",
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "timed_epochs": epochs, "rounds": rounds, "quick": args.quick, "kinds": setups, "curated": CURATED,
            "command": "python " + " ".join(sys.argv), "wall_seconds": time.perf_counter() - wall,
        },
    }  # fmt: skip
    table = markdown(report)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        with open(args.markdown or os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
