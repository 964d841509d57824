"""Service calls that are not a training stream: what `loader stats`, `loader add-shards`,
`loader set-reference` and operators use."""

from __future__ import annotations

import grpc

from loader.client.channel import TLSLike, as_tls, open_channel, resolve_token, token_metadata
from loader.errors import LoaderError
from loader.v1 import loader_pb2 as pb
from loader.v1 import loader_pb2_grpc as pb_grpc


class ServiceCallError(LoaderError):
    """A call the service refused or could not answer; `code` is the gRPC status name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details

    def __str__(self) -> str:
        return f"{self.code}: {self.details}"


def _call(address: str, token: str | None, tls: TLSLike, call):
    tls = as_tls(tls)
    metadata = token_metadata(resolve_token(token), address, tls)
    with open_channel(address, tls) as channel:
        try:
            return call(pb_grpc.LoaderStub(channel), metadata)
        except grpc.RpcError as exc:
            raise ServiceCallError(exc.code().name, exc.details() or "") from exc


def fetch_stats(
    address: str, job: str = "", token: str | None = None, timeout_s: float = 30.0, tls: TLSLike = None
) -> pb.Stats:
    """GetStats for `job` (every job when empty); the token defaults to $LOADER_TOKEN, `tls` is as
    for RemoteLoader."""
    request = pb.GetStatsRequest(job=job)
    return _call(address, token, tls, lambda stub, metadata: stub.GetStats(request, metadata=metadata, timeout=timeout_s))


def add_shards(
    address: str, uris: list[str], token: str | None = None, timeout_s: float = 300.0, tls: TLSLike = None
) -> list[pb.ShardInfo]:
    """Adds shards (paths or patterns, as the service sees its files) to the running service's
    pool; returns each shard's record once the service has read it: state "ok", or
    "quarantined" with the reason. Running stream jobs serve the new shards without a restart."""
    request = pb.AddShardsRequest(uris=list(uris))
    reply = _call(address, token, tls, lambda stub, metadata: stub.AddShards(request, metadata=metadata, timeout=timeout_s))
    return list(reply.shards)


def set_reference(
    address: str, weights: str, token: str | None = None, timeout_s: float = 120.0, tls: TLSLike = None
) -> pb.SetReferenceResponse:
    """Swaps refreshed reference weights (a torch.save'd state_dict of the config's reference
    model, at a path the service's machines see) into the running service. Returns once the
    scorers use them; the pool is rescored in the background (Stats.rescore_pending)."""
    request = pb.SetReferenceRequest(weights=weights)
    return _call(address, token, tls, lambda stub, metadata: stub.SetReference(request, metadata=metadata, timeout=timeout_s))
