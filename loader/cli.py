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


def _train_reference(args: argparse.Namespace) -> int:
    from loader import config as config_mod
    from loader.reference import train_reference
    from loader.sources import expand

    config = config_mod.load(args.config, require_shards=False)
    if config.reference is None:
        raise ConfigError("reference", f"{args.config} has no `reference` section (factory, kwargs) to train")
    holdout = expand(args.holdout)
    if not holdout:
        raise ConfigError("--holdout", f"{args.holdout} matched no files")
    metrics = train_reference(config.reference, holdout, args.out, input_col=config.input_column,
                              label_col=config.label_column, epochs=args.epochs, lr=args.lr,
                              batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    print(f"wrote {args.out}: {metrics['samples']} holdout samples, loss {metrics['final_loss']:.4f}, "
          f"accuracy {metrics['holdout_accuracy']:.4f}, {metrics['seconds']:.1f} s")  # fmt: skip
    return 0


def _stats(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from loader.client.admin import fetch_stats

    stats = fetch_stats(args.address, job=args.job or "")
    print(json_format.MessageToJson(stats, always_print_fields_with_no_presence=True))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from loader.demo import run

    return run(data_dir=args.data, steps=args.steps, batch_size=args.batch_size, keep_ratio=args.keep_ratio)


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

    r = sub.add_parser("train-reference", help="train the reference model on clean holdout shards")
    r.add_argument("--config", required=True, help="service YAML whose `reference` names the model")
    r.add_argument("--holdout", action="append", required=True, help="holdout shard path or pattern (repeatable)")
    r.add_argument("--out", required=True, help="where to write the state_dict (set it as reference.weights)")
    r.add_argument("--epochs", type=int, default=30)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_train_reference)

    t = sub.add_parser("stats", help="print the service's shard and job statistics as JSON")
    t.add_argument("--address", required=True)
    t.add_argument("--job")
    t.set_defaults(func=_stats)

    d = sub.add_parser("demo", help="noisy MNIST-1D: train uniform vs curated through RemoteLoader")
    d.add_argument("--data", default="data/mnist1d")
    d.add_argument("--steps", type=int, default=1000)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--keep-ratio", type=float, default=0.2)
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
