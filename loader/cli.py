"""The `loader` command: serve, make-shards, train-reference, demo, and the client verbs stats,
add-shards and set-reference."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import signal
import sys

from loader.errors import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from loader import config as config_mod

    overrides = {"shards": args.shards, "address": args.address, "ray_address": args.ray_address,
                 "num_cpus": args.num_cpus, "readers": args.readers, "gateways": args.gateways}  # fmt: skip
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


def _admin(args: argparse.Namespace, verb: str, call):
    """One call to the service at --address: (its reply, 0), or (None, exit status) once the
    reason is printed (1: the service refused or could not answer; 2: a bad client setting)."""
    from loader.client.admin import ServiceCallError

    try:
        return call(token=_client_token(args), tls=_client_tls(args)), 0
    except ServiceCallError as exc:
        print(f"loader: {verb} at {args.address}: {exc}", file=sys.stderr)
        return None, 1
    except ValueError as exc:  # a token or TLS setting the client cannot use
        print(f"loader: {verb}: {exc}", file=sys.stderr)
        return None, 2


def _stats(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from loader.client.admin import fetch_stats

    stats, status = _admin(args, "stats", lambda **auth: fetch_stats(args.address, job=args.job or "", **auth))
    if stats is not None:
        print(json_format.MessageToJson(stats, always_print_fields_with_no_presence=True))
    return status


def _set_reference(args: argparse.Namespace) -> int:
    from loader.client.admin import set_reference

    reply, status = _admin(args, "set-reference", lambda **auth: set_reference(args.address, args.weights, **auth))
    if reply is not None:
        print(f"reference {args.weights}: rescoring {reply.shards_to_rescore} shards in the background")
    return status


def _add_shards(args: argparse.Namespace) -> int:
    from loader.client.admin import add_shards

    shards, status = _admin(args, "add-shards", lambda **auth: add_shards(args.address, args.uris, **auth))
    if shards is None:
        return status
    for shard in shards:  # one line each: index, state, uri, then rows or the reason
        detail = f"{shard.rows} rows" if shard.state == "ok" else shard.reason
        print(f"{shard.index} {shard.state} {shard.uri} {detail}".rstrip())
    return 0 if all(shard.state == "ok" for shard in shards) else 1


def _client_token(args: argparse.Namespace) -> str | None:
    # No --token flag: a secret on the command line shows in `ps` and shell history.
    if args.token_file is None:
        return None  # the client falls back to $LOADER_TOKEN
    try:
        token = pathlib.Path(args.token_file).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not ASCII text"
        raise ConfigError("--token-file", f"cannot read {args.token_file!r}: {reason}") from None
    if not token:
        raise ConfigError("--token-file", f"{args.token_file!r} is empty")
    return token


def _client_tls(args: argparse.Namespace):
    from loader.client import TLS

    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    for flag, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(flag, f"file {path!r} not found")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-key" if args.tls_key is None else "--tls-cert", "--tls-cert and --tls-key go together")
    return TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)


def _add_client_security(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", help="file holding the service's bearer token (default: $LOADER_TOKEN)")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    p.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate (implies --tls)")
    p.add_argument("--tls-cert", help="client certificate PEM, for a server that requires mutual TLS")
    p.add_argument("--tls-key", help="the client certificate's private key PEM")
    p.add_argument("--tls-server-name", help="name to check the server's certificate against, if not the host")


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
    s.add_argument("--gateways", type=int, help="gRPC gateway processes sharing --address (SO_REUSEPORT)")
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
    _add_client_security(t)
    t.set_defaults(func=_stats)

    a = sub.add_parser("add-shards", help="add shards to a running service's pool (stream jobs serve them at once)")
    a.add_argument("--address", required=True)
    a.add_argument("uris", nargs="+", metavar="URI", help="shard path or pattern, as the service's machine sees it")
    _add_client_security(a)
    a.set_defaults(func=_add_shards)

    f = sub.add_parser("set-reference", help="swap refreshed reference weights into a running service")
    f.add_argument("--address", required=True)
    f.add_argument("weights", metavar="WEIGHTS", help="state_dict file (from train-reference), as the service sees it")
    _add_client_security(f)
    f.set_defaults(func=_set_reference)

    d = sub.add_parser("demo", help="noisy MNIST-1D: train uniform vs curated through RemoteLoader")
    d.add_argument("--data", default="data/mnist1d")
    d.add_argument("--steps", type=int, default=1000)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--keep-ratio", type=float, default=0.2)
    d.set_defaults(func=_demo)
    return p


# Modules of the `server` extra: a trainer that installed only the client (`pip install loader`)
# has none of them, and the verbs that run the service or make data need them.
SERVER_MODULES = frozenset({"ray", "pydantic", "annotated_types", "yaml", "sklearn", "mnist1d", "braceexpand",
                            "grpc_health", "grpc_reflection"})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"loader: config error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        print(f"loader {args.command}: needs the service's packages (no module {exc.name!r} here); install them "
              f"with: pip install 'loader[server]'", file=sys.stderr)  # fmt: skip
        return 2


if __name__ == "__main__":
    sys.exit(main())
