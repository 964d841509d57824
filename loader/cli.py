"""The `loader` command: serve, make-shards, demo, stats."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from loader.errors import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from loader import config as config_mod

    overrides = {"shards": args.shards, "address": args.address, "ray_address": args.ray_address,
                 "num_cpus": args.num_cpus, "readers": args.readers}  # fmt: skip
    config = config_mod.load(args.config, overrides)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from actors.pipeline import Pipeline
    from actors.runtime import shutdown
    from loader.gateway.server import Gateway

    pipeline = Pipeline(config)

    async def run() -> None:
        gateway = Gateway(pipeline, config)
        address = await gateway.start()
        print(f"listening on {address}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await gateway.stop()

    try:
        asyncio.run(run())
    finally:
        pipeline.shutdown()
        shutdown()
    return 0


def _make_shards(args: argparse.Namespace) -> int:
    from loader.datasets import make_shards

    written = make_shards(args.out, shards=args.shards, label_noise=args.label_noise, fmt=args.format,
                          seed=args.seed, samples=args.samples)  # fmt: skip
    for split, paths in written.items():
        print(f"{split}: {len(paths)} shards in {args.out}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from loader.v1 import loader_pb2 as pb
    from loader.v1 import loader_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.address) as channel:
        stats = pb_grpc.LoaderStub(channel).GetStats(pb.GetStatsRequest(job=args.job or ""), timeout=30)
    print(json_format.MessageToJson(stats, always_print_fields_with_no_presence=True))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from loader.demo import run

    return run(data_dir=args.data, epochs=args.epochs, batch_size=args.batch_size)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loader", description="Curated batches for PyTorch trainers, over gRPC.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the service (local Ray unless a cluster is named)")
    s.add_argument("--config", help="YAML file; flags override its values")
    s.add_argument("--shards", action="append", help="shard path, brace or glob pattern (repeatable)")
    s.add_argument("--address", help="HOST:PORT to listen on; port 0 picks a free one")
    s.add_argument("--ray-address", help="join this Ray cluster ('auto', ray://...) instead of a local one")
    s.add_argument("--num-cpus", type=int, help="CPUs for a local Ray")
    s.add_argument("--readers", type=int, help="shard reader actors")
    s.set_defaults(func=_serve)

    m = sub.add_parser("make-shards", help="write dataset splits as shards")
    m.add_argument("dataset", choices=["mnist1d"])
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--shards", type=int, default=10, help="train shards (holdout and test get a fifth each)")
    m.add_argument("--label-noise", type=float, default=0.0, help="fraction of train labels to corrupt")
    m.add_argument("--format", choices=["tar", "parquet"], default="tar")
    m.add_argument("--samples", type=int, default=5000)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_make_shards)

    t = sub.add_parser("stats", help="print the service's shard and job statistics as JSON")
    t.add_argument("--address", required=True)
    t.add_argument("--job")
    t.set_defaults(func=_stats)

    d = sub.add_parser("demo", help="make MNIST-1D shards, serve them, train through RemoteLoader")
    d.add_argument("--data", default="data/mnist1d")
    d.add_argument("--epochs", type=int, default=40)
    d.add_argument("--batch-size", type=int, default=128)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"loader: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
