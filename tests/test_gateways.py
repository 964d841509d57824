"""More than one gateway process over one pipeline (config `gateways: N`, actors/gateways.py).

The extra gateways here also get ports of their own (`Pipeline.start_gateways` on port 0), so a
test can put each rank on the gateway it names; `gateways: N` in the config puts them all on the
first one's port, where the kernel chooses.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from tests.helpers import LOADER_TIMEOUT_S, epoch_ids, in_rank_threads, rows_in
from loader import RemoteLoader
from loader.errors import ConfigError
from loader.v1 import loader_pb2 as pb
from loader.v1 import loader_pb2_grpc as pb_grpc

CALL_TIMEOUT_S = 60


def start_more(service, count: int, address: str = "127.0.0.1:0") -> list[str]:
    """`count` more gateways of `service` (on the first gateway's event loop, which answers them)."""
    loop, first = service.gateway._loop, service.gateway.gateway
    future = asyncio.run_coroutine_threadsafe(service.pipeline.start_gateways(address, count, first.requires_token), loop)
    return future.result(CALL_TIMEOUT_S)


def stats(address: str, job: str = "") -> pb.Stats:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.LoaderStub(channel).GetStats(pb.GetStatsRequest(job=job), timeout=CALL_TIMEOUT_S)


def ranks_on(addresses: list[str], job: str, batch_size: int, epochs: int, **kwargs) -> list[list[np.ndarray]]:
    """Rank r reads `epochs` epochs through addresses[r], all ranks at once; ids per epoch per rank."""
    world = len(addresses)

    def rank_main(rank: int) -> list[np.ndarray]:
        with RemoteLoader(addresses[rank], job=job, batch_size=batch_size, rank=rank, world_size=world,
                          timeout_s=LOADER_TIMEOUT_S, **kwargs) as loader:  # fmt: skip
            return [np.concatenate(epoch_ids(loader)) for _ in range(epochs)]  # each loop the next epoch

    return in_rank_threads(world, rank_main, timeout_s=180)


@pytest.fixture(scope="module")
def two(serve, mnist_tar):
    """A service with a second gateway process on a port of its own: (service, [first, second])."""
    service = serve(mnist_tar["train"])
    return service, [service.address, *start_more(service, 1)]


def test_the_second_gateway_is_another_process_of_the_same_pipeline(two):
    service, addresses = two
    assert addresses[0] != addresses[1]
    processes = service.pipeline.processes()
    assert processes["GatewayActor-1"] != processes["gateway"]
    # Stats through the second gateway are the pipeline's: the same shards as through the first.
    assert [s.uri for s in stats(addresses[1]).shards] == [s.uri for s in stats(addresses[0]).shards]


@pytest.mark.parametrize("policy", ["uniform", "loss"])
def test_two_ranks_on_different_gateways_get_disjoint_complete_epochs(two, mnist_tar, policy):
    service, addresses = two
    total = rows_in(mnist_tar["train"])
    job = f"two-gateways-{policy}"
    by_rank = ranks_on(addresses, job, batch_size=32, epochs=2, policy=policy)
    for epoch in range(2):
        rank0, rank1 = by_rank[0][epoch], by_rank[1][epoch]
        assert len(np.intersect1d(rank0, rank1)) == 0, f"epoch {epoch}: a sample went to both ranks"
        assert len(rank0) == len(rank1), "the ranks' shares of an epoch differ"
        assert len(np.unique(np.concatenate([rank0, rank1]))) == len(rank0) + len(rank1)
        if policy == "uniform":
            assert len(rank0) + len(rank1) == total, f"epoch {epoch} was not complete"
    # Rank 1's stream on the second gateway was counted by the pipeline's job, then closed there.
    info = {j.job: j for j in stats(addresses[1], job).jobs}[job]
    assert info.samples_served == sum(len(ids) for rank in by_rank for ids in rank)
    assert stats(addresses[0]).trainers_connected == 0


def open_train(address: str, hello: pb.Hello, batches: int):
    """A raw Train stream that sends Hello and one credit, then keeps its side open until the
    returned event is set; the call iterates its responses."""
    done = threading.Event()

    def requests():
        yield pb.TrainRequest(hello=hello)
        yield pb.TrainRequest(credit=pb.Credit(batches=batches))
        done.wait(timeout=CALL_TIMEOUT_S)

    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.LoaderStub(channel).Train(requests(), timeout=CALL_TIMEOUT_S), done


@pytest.mark.parametrize("first, second", [(1, 0), (0, 1), (1, 1)], ids=["second-then-first", "first-then-second", "same"])
def test_a_newer_stream_of_a_rank_aborts_the_older_on_whichever_gateway(two, first, second):
    _, addresses = two
    hello = pb.Hello(job=f"supersede-{first}{second}", rank=0, world_size=1, batch_size=8)
    old_channel, old, old_done = open_train(addresses[first], hello, batches=1)
    new_channel = new = new_done = None
    try:
        # READY comes once the stream is registered with its job: only then open the newer one.
        kinds = [next(old).WhichOneof("kind"), next(old).WhichOneof("kind")]
        assert kinds == ["status", "batch"]
        new_channel, new, new_done = open_train(addresses[second], hello, batches=1)
        assert next(new).status.code == pb.Status.READY
        with pytest.raises(grpc.RpcError) as err:
            for _ in old:
                pass
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "superseded by a newer stream" in err.value.details()
        assert next(new).WhichOneof("kind") == "batch"  # the newer one goes on
    finally:
        for done, call, channel in ((old_done, old, old_channel), (new_done, new, new_channel)):
            if call is not None:
                done.set()
                call.cancel()
                channel.close()


def test_control_calls_through_the_second_gateway_reach_the_pipeline(two, mnist_tar, tmp_path):
    service, addresses = two
    with grpc.insecure_channel(addresses[1]) as channel:
        stub = pb_grpc.LoaderStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.AddShards(pb.AddShardsRequest(uris=[str(tmp_path / "none-*.tar")]), timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "matched no files" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.SetReference(pb.SetReferenceRequest(weights="/no/such/weights.pt"), timeout=CALL_TIMEOUT_S)
        # This service has no reference: the pipeline's own refusal, not a forwarding failure.
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no reference model" in err.value.details()


def test_gateways_in_the_config_share_the_first_ones_port(serve, mnist_tar):
    service = serve(mnist_tar["holdout"], gateways=3)
    extra = service.pipeline.actors()["gateways"]
    assert len(extra) == 2
    processes = service.pipeline.processes()
    assert len({processes["gateway"], processes["GatewayActor-1"], processes["GatewayActor-2"]}) == 3
    # Each loader is a connection of its own, which the kernel hands to one of the three.
    for i in range(4):
        with RemoteLoader(service.address, job=f"shared-port-{i}", batch_size=50, timeout_s=LOADER_TIMEOUT_S) as loader:
            ids = np.concatenate(epoch_ids(loader))
        assert len(ids) == rows_in(mnist_tar["holdout"]) == len(np.unique(ids))


def test_a_second_gateway_requires_the_token_too(serve, mnist_tar, tmp_path):
    token = tmp_path / "token"
    token.write_text("gateways-secret\n")
    token.chmod(0o600)
    service = serve(mnist_tar["holdout"], token_file=str(token))
    [second] = start_more(service, 1)
    with grpc.insecure_channel(second) as channel:
        stub = pb_grpc.LoaderStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetStats(pb.GetStatsRequest(), timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.GetStats(pb.GetStatsRequest(), timeout=CALL_TIMEOUT_S,
                              metadata=[("authorization", "Bearer gateways-secret")])  # fmt: skip
        assert len(reply.shards) == len(mnist_tar["holdout"])


def test_a_token_the_gateway_processes_cannot_read_stops_them_with_the_key_to_use(serve, mnist_tar, monkeypatch):
    # Ray's worker processes started before this variable was set, so they do not have it.
    monkeypatch.setenv("LOADER_TOKEN", "only-in-this-process")
    service = serve(mnist_tar["holdout"])
    assert service.gateway.gateway.requires_token
    with pytest.raises(ConfigError) as err:
        start_more(service, 1)
    assert "token_file" in str(err.value) and "gateways" in str(err.value)
    assert service.pipeline.actors()["gateways"] == []  # the refused one was stopped


def test_the_streams_of_a_gateway_process_that_died_stop_counting(serve, mnist_tar):
    import ray

    service = serve(mnist_tar["holdout"])
    [second] = start_more(service, 1)
    hello = pb.Hello(job="dies", rank=0, world_size=1, batch_size=8)
    channel, call, done = open_train(second, hello, batches=1)
    try:
        assert next(call).status.code == pb.Status.READY  # registered with the job
        assert stats(service.address).trainers_connected == 1
        ray.kill(service.pipeline.actors()["gateways"][0], no_restart=True)
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while (connected := stats(service.address).trainers_connected) != 0:
            assert time.monotonic() < deadline, f"{connected} streams of the dead gateway still counted"
            time.sleep(0.1)  # polling a condition, bounded by the deadline
    finally:
        done.set()
        call.cancel()
        channel.close()
