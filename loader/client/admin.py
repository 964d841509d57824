"""Service calls that are not a training stream: what `loader stats` and operators use."""

from __future__ import annotations

import os

import grpc

from loader.v1 import loader_pb2 as pb
from loader.v1 import loader_pb2_grpc as pb_grpc


def fetch_stats(address: str, job: str = "", token: str | None = None, timeout_s: float = 30.0) -> pb.Stats:
    """GetStats for `job` (every job when empty); the token defaults to $LOADER_TOKEN."""
    token = token if token is not None else os.environ.get("LOADER_TOKEN")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.LoaderStub(channel).GetStats(pb.GetStatsRequest(job=job), metadata=metadata, timeout=timeout_s)
