"""Where a batch's CPU goes: CPU seconds per delivered batch of every process of the service.

    python benchmarks/service_cpu.py --sample large --policy uniform --epochs 5
    python benchmarks/service_cpu.py --sample large --py-spy /tmp/spy   # also sample each process

Starts the throughput benchmark's service (in-process Pipeline + BackgroundGateway on a local
Ray) for one sample kind, lets a RemoteLoader consumer run one epoch (curator started, reader
cache filled), then has the same job's next --epochs consumed by a fresh consumer while the CPU
time (user + system, from /proc) of the curator, the readers, the registry, this process (the
gateway's event loop) and Ray's raylet is counted. CPU time, unlike wall time, barely moves with
what else runs on the machine. With --py-spy, each of those processes is also sampled
(`py-spy record --gil --nonblocking`, collapsed stacks) into the folder, with a summary of the
hottest frames.
"""

from __future__ import annotations

import actors  # noqa: F401  (must precede anything that imports ray: keeps a local Ray on loopback)

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from actors.pipeline import Pipeline
from actors.runtime import ensure_ray, shutdown
from loader.config import from_mapping
from loader.gateway.server import BackgroundGateway
from throughput import CURATED, HERE, kinds, write_shards


def cpu_seconds(pid: int, tid: str | None = None) -> float:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # the process is gone
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_seconds(pid: int) -> collections.Counter:
    """CPU seconds of each of the process's threads, summed by thread name (for this process,
    Python threads by their Python name, digits dropped: asyncio_0 and asyncio_1 as asyncio_)."""
    import threading

    python = {str(t.native_id): t.name.rstrip("0123456789") for t in threading.enumerate()} if pid == os.getpid() else {}
    out = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = python.get(tid) or f.read().strip()
        except OSError:
            continue
        out[name] += cpu_seconds(pid, tid)
        out[name + " faults"] += minor_faults(pid, tid)
    return out


def minor_faults(pid: int, tid: str) -> int:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except OSError:
        return 0


def hottest(path: str, count: int = 12) -> list[tuple[float, str]]:
    """Share of samples in which each frame is the innermost one."""
    own, total = collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            total += int(n)
            own[stack.split(";")[-1]] += int(n)
    return [(n / max(total, 1), frame) for frame, n in own.most_common(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", choices=("small", "large"), default="large")
    parser.add_argument("--policy", choices=("uniform", "curated"), default="uniform")
    parser.add_argument("--epochs", type=int, default=5, help="epochs counted")
    parser.add_argument("--shuffle-rows", type=int, help="override the service's shuffle_rows")
    parser.add_argument("--py-spy", metavar="DIR", help="also record each process with py-spy into DIR")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    kind = next(k for k in kinds(quick=True) if k.name == args.sample)
    service = {**kind.service, **({"shuffle_rows": args.shuffle_rows} if args.shuffle_rows is not None else {})}
    ensure_ray(None, num_cpus=2)
    with tempfile.TemporaryDirectory(prefix="service-cpu-") as root:
        paths = write_shards(kind, root)
        config = from_mapping({"shards": paths, "address": "127.0.0.1:0", **service})
        pipeline = Pipeline(config)
        gateway = BackgroundGateway(pipeline, config)
        address = gateway.start()
        policy = CURATED if args.policy == "curated" else {"policy": "uniform"}
        spec = {"mode": "remote", "address": address, "job": "cpu", "batch_size": kind.batch_size, "epochs": 1,
                "report": args.policy == "curated", **policy}  # fmt: skip
        consumer = [sys.executable, os.path.join(HERE, "throughput_consumer.py")]
        try:
            subprocess.run([*consumer, json.dumps(spec)], check=True, capture_output=True)
            processes = pipeline.processes()
            spies = []
            if args.py_spy:
                os.makedirs(args.py_spy, exist_ok=True)
                spies = [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--gil", "--nonblocking", "--rate", "1000", "--format", "raw",
                                           "-o", os.path.join(args.py_spy, f"{name}.txt")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                         for name, pid in processes.items()]  # fmt: skip
            before = {name: cpu_seconds(pid) for name, pid in processes.items()}
            threads_before = thread_seconds(os.getpid())
            started = time.perf_counter()
            load = os.getloadavg()[0]
            done = subprocess.run([*consumer, json.dumps({**spec, "epochs": args.epochs, "first_epoch": 1})],
                                  check=True, capture_output=True, text=True)  # fmt: skip
            wall = time.perf_counter() - started
            spent = {name: cpu_seconds(pid) - before[name] for name, pid in processes.items()}
            threads = thread_seconds(os.getpid())
            threads.subtract(threads_before)
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
        finally:
            gateway.stop()
            pipeline.shutdown()
            shutdown()
    epochs = json.loads(done.stdout.strip().splitlines()[-1])["epochs"]
    batches = sum(e["batches"] for e in epochs)
    samples = sum(e["samples"] for e in epochs)
    seconds = sum(e["seconds"] for e in epochs)  # the consumer's epochs, not its start-up
    per_batch = {name: seconds / batches * 1e3 for name, seconds in spent.items()}
    # The trainer's side (gRPC receive, decode, acks), counted by the consumer itself: not service.
    trainer = sum(e["cpu_seconds"] for e in epochs) / batches * 1e3
    report = {"sample": args.sample, "policy": args.policy, "service": service, "batches": batches,
              "samples_per_s": samples / seconds, "wall_s": wall, "load_1min": load, "cpu_ms_per_batch": per_batch,
              "service_cpu_ms_per_batch": sum(per_batch.values()), "trainer_cpu_ms_per_batch": trainer,
              "gateway_threads_ms_per_batch": {n: v / batches * 1e3 for n, v in threads.items() if not n.endswith(" faults")},
              "gateway_threads_faults_per_batch": {n[:-7]: v / batches for n, v in threads.items() if n.endswith(" faults")}}  # fmt: skip
    print(f"{args.sample} {args.policy} {service}: {batches} batches, {samples / seconds:,.0f} samples/s, load {load:.1f}")
    for name, ms in sorted(per_batch.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24s} {ms:7.2f} ms CPU per batch")
    for name, seconds_ in sorted(((n, v) for n, v in threads.items() if not n.endswith(" faults")), key=lambda nv: -nv[1])[:6]:
        faults = threads[name + " faults"] / batches
        print(f"    gateway thread {name:15s} {seconds_ / batches * 1e3:7.2f} ms CPU per batch, {faults:6.0f} page faults")
    print(f"  {'service total':24s} {report['service_cpu_ms_per_batch']:7.2f} ms CPU per batch")
    print(f"  {'trainer process':24s} {trainer:7.2f} ms CPU per batch (RemoteLoader: receive, decode, acks)")
    if args.py_spy:
        for name in processes:
            path = os.path.join(args.py_spy, f"{name}.txt")
            if os.path.exists(path):
                print(f"-- {name}: frames holding the GIL, innermost")
                for share, frame in hottest(path):
                    print(f"  {share:6.1%} {frame[:140]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
