"""Bad client input gets a clear status and changes nothing; the service stays up. (Bad shards:
a quick check here, every kind in test_bad_shards.py.)"""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loader import RemoteLoader, codec
from loader.errors import ConfigError
from loader.v1 import loader_pb2 as pb
from loader.v1 import loader_pb2_grpc as pb_grpc
from tests.helpers import epoch_ids, rows_in

MAX_MESSAGE_BYTES = 1 << 20
CALL_TIMEOUT_S = 60
U64 = 2**64 - 1
BATCH = 16


@pytest.fixture(scope="module")
def mixed_pool(tmp_path_factory, mnist_tar):
    """Two good tar shards, one file of garbage named .tar, and one brace-named shard that is missing."""
    root = tmp_path_factory.mktemp("mixed")
    good = []
    for i, src in enumerate(mnist_tar["train"][:2]):
        dst = root / f"part-{i:06d}.tar"
        shutil.copy(src, dst)
        good.append(str(dst))
    (root / "part-000002.tar").write_bytes(b"this is not a tar archive" * 100)
    return str(root / "part-{000000..000003}.tar"), good, str(root / "part-000002.tar"), str(root / "part-000003.tar")


@pytest.fixture(scope="module")
def service(serve, mixed_pool):
    pattern, good, _, _ = mixed_pool
    return serve([pattern], shuffle_rows=32, max_message_bytes=MAX_MESSAGE_BYTES), rows_in(good)


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service[0].address) as channel:
        yield pb_grpc.LoaderStub(channel)


def test_bad_and_missing_shards_are_quarantined_and_the_rest_is_served(service, mixed_pool):
    svc, good_rows = service
    _, _, garbage, missing = mixed_pool
    with RemoteLoader(svc.address, job="quarantine", batch_size=16, timeout_s=60) as loader:
        ids = np.concatenate(epoch_ids(loader))
        stats = loader.stats()
    assert len(ids) == good_rows and len(np.unique(ids)) == good_rows
    states = {s.uri: (s.state, s.reason) for s in stats.shards}
    assert states[missing] == ("quarantined", "not found")
    assert states[garbage][0] == "quarantined" and "tar" in states[garbage][1]
    assert sum(s.state == "ok" for s in stats.shards) == 2


def test_no_existing_shard_is_a_config_error(ray_session, tmp_path):
    from actors.pipeline import Pipeline
    from loader.config import from_mapping

    with pytest.raises(ConfigError) as err:
        Pipeline(from_mapping({"shards": [str(tmp_path / "none-{0..2}.tar")], "address": "127.0.0.1:0"}))
    assert err.value.key == "shards"


# -- raw streams ------------------------------------------------------------------------------------


def open_stream(address: str, *requests: pb.TrainRequest):
    """Sends `requests`, keeps the stream open, returns (responses so far, final RpcError or None)."""
    channel = grpc.insecure_channel(address)
    call = pb_grpc.LoaderStub(channel).Train(iter(requests), timeout=CALL_TIMEOUT_S)
    got = []
    try:
        for response in call:
            got.append(response)
    except grpc.RpcError as exc:
        return got, exc
    finally:
        channel.close()
    return got, None


def batches_then(address: str, first: list[pb.TrainRequest], after: int, then):
    """Sends `first`, waits until `after` batches arrived, then sends `then` (messages, or a
    function of the batches' id arrays that returns them); returns (batch ids received, final
    RpcError or None). The later messages thus reach a session with batches in flight."""
    received = threading.Event()
    ids: list[np.ndarray] = []

    def requests():
        yield from first
        if received.wait(timeout=CALL_TIMEOUT_S):
            yield from then(ids) if callable(then) else then

    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.LoaderStub(channel).Train(requests(), timeout=CALL_TIMEOUT_S)
        try:
            for response in call:
                if response.WhichOneof("kind") == "batch":
                    ids.append(codec.decode(response.batch.arrow_ipc).column(codec.ID).to_numpy())
                    if len(ids) == after:
                        received.set()
        except grpc.RpcError as exc:
            return ids, exc
        finally:
            received.set()  # lets the request thread end however the call ended
    return ids, None


def hello(job="raw", **kw) -> pb.TrainRequest:
    fields = {"job": job, "rank": 0, "world_size": 1, "batch_size": 8} | kw
    return pb.TrainRequest(hello=pb.Hello(**fields))


def credit(n: int) -> pb.TrainRequest:
    return pb.TrainRequest(credit=pb.Credit(batches=n))


def job_names(stub) -> set[str]:
    return {job.job for job in stub.GetStats(pb.GetStatsRequest(), timeout=CALL_TIMEOUT_S).jobs}


def wait_for_no_trainers(stub, timeout_s: float = 30.0) -> None:
    """A handler's cleanup may finish just after its client saw the status: poll, boundedly."""
    deadline = time.monotonic() + timeout_s
    while (left := stub.GetStats(pb.GetStatsRequest(), timeout=CALL_TIMEOUT_S).trainers_connected) != 0:
        assert time.monotonic() < deadline, f"{left} trainer sessions left after their streams ended"
        time.sleep(0.05)


def assert_serving(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        reply = check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- Hello ------------------------------------------------------------------------------------------


BAD_HELLOS = [
    ("credit-first", credit(1), "first message must be Hello"),
    ("empty-first", pb.TrainRequest(), "first message must be Hello, got None"),
    ("no-job", hello(job=""), "Hello.job"),
    ("rank-past-world", hello(job="h-rank", rank=2, world_size=2), "rank"),
    ("world-zero", hello(job="h-world", world_size=0), "Hello.world_size must be 1..65536, got 0"),
    ("world-huge", hello(job="h-world-huge", world_size=2**32 - 1), "Hello.world_size must be 1..65536"),
    ("batch-zero", hello(job="h-batch", batch_size=0), "batch_size"),
    ("unknown-policy", hello(job="h-policy", policy="no-such-policy"), "unknown policy"),
    ("unknown-option", hello(job="h-option", policy="loss", options={"bogus": "1"}), "options.bogus"),
    ("nan-option", hello(job="h-keep", policy="loss", options={"keep_ratio": "nan"}), "options.keep_ratio"),
]


@pytest.mark.parametrize("name, first, fragment", BAD_HELLOS, ids=[h[0] for h in BAD_HELLOS])
def test_bad_hello_is_invalid_argument_and_creates_no_job(service, stub, name, first, fragment):
    _, err = open_stream(service[0].address, first)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert fragment in err.details()
    if first.WhichOneof("kind") == "hello":
        assert first.hello.job not in job_names(stub)


def test_joining_a_job_with_another_batch_size_fails_precondition(service):
    address = service[0].address
    with RemoteLoader(address, job="fixed", batch_size=8, timeout_s=60) as loader:
        next(iter(loader))
    _, err = open_stream(address, hello(job="fixed", batch_size=16), credit(1))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "batch_size=8" in err.details()


def test_a_policy_the_service_cannot_run_fails_precondition(service, stub):
    _, err = open_stream(service[0].address, hello(job="needs-reference", policy="learnability"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "needs a reference model" in err.details()
    assert "needs-reference" not in job_names(stub)


# -- messages after Hello ---------------------------------------------------------------------------


def feedback(ids, losses) -> pb.TrainRequest:
    return pb.TrainRequest(
        feedback=pb.Feedback(ids=np.asarray(ids, "<i8").tobytes(), losses=np.asarray(losses, "<f4").tobytes())
    )


# Shard 2 of the pool is the quarantined garbage file, shard 0 holds 128 rows.
BAD_MESSAGES = [
    ("nan-loss", feedback([1], [float("nan")]), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ("inf-loss", feedback([1, 2], [0.5, float("inf")]), grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite"),
    ("minus-inf-loss", feedback([1], [float("-inf")]), grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite"),
    ("more-ids-than-losses", feedback([1, 2], [0.5]), grpc.StatusCode.INVALID_ARGUMENT, "2 ids but 1 losses"),
    ("more-losses-than-ids", feedback([1], [0.5, 0.5]), grpc.StatusCode.INVALID_ARGUMENT, "1 ids but 2 losses"),
    ("ids-not-int64", pb.TrainRequest(feedback=pb.Feedback(ids=b"123", losses=b"")), grpc.StatusCode.INVALID_ARGUMENT, "int64"),
    ("losses-not-float32", pb.TrainRequest(feedback=pb.Feedback(ids=bytes(8), losses=b"12345")), grpc.StatusCode.INVALID_ARGUMENT, "float32"),
    ("unknown-shard-id", feedback([(999 << 32) | 5], [0.5]), grpc.StatusCode.INVALID_ARGUMENT, "not in the pool"),
    # Shards 0 and 1 hold 128 rows each; whichever is in the job's pool yet, id 128 is named.
    ("row-past-the-shard", feedback([128, (1 << 32) | 128], [0.5, 0.5]), grpc.StatusCode.INVALID_ARGUMENT,
     "sample id 128 is not in the pool"),
    ("quarantined-shard-id", feedback([2 << 32], [0.5]), grpc.StatusCode.INVALID_ARGUMENT, "not in the pool"),
    ("negative-id", feedback([-1], [0.5]), grpc.StatusCode.INVALID_ARGUMENT, "sample id -1 is not in the pool"),
    ("ack-never-sent", pb.TrainRequest(ack=pb.Ack(epoch=0, seq=7)), grpc.StatusCode.INVALID_ARGUMENT, "never sent"),
    ("ack-other-epoch", pb.TrainRequest(ack=pb.Ack(epoch=3, seq=0)), grpc.StatusCode.INVALID_ARGUMENT, "never sent"),
    ("credit-zero", credit(0), grpc.StatusCode.INVALID_ARGUMENT, "Credit.batches must be 1..1024, got 0"),
    ("credit-huge", credit(5000), grpc.StatusCode.INVALID_ARGUMENT, "Credit.batches must be 1..1024, got 5000"),
    ("empty-request", pb.TrainRequest(), grpc.StatusCode.INVALID_ARGUMENT, "an empty TrainRequest"),
    ("second-hello", hello(), grpc.StatusCode.INVALID_ARGUMENT, "second Hello"),
    ("oversized", pb.TrainRequest(feedback=pb.Feedback(ids=bytes(MAX_MESSAGE_BYTES))), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "larger than max"),
]  # fmt: skip


@pytest.mark.parametrize("name, bad, code, fragment", BAD_MESSAGES, ids=[m[0] for m in BAD_MESSAGES])
def test_bad_message_mid_stream_is_rejected_and_loses_nothing(service, stub, name, bad, code, fragment):
    """Two batches are in flight (sent, not acknowledged) when the bad message arrives. The stream
    fails with `code`; no loss is recorded; a trainer that reconnects gets those very batches again
    and then the rest of the epoch, every good row exactly once."""
    svc, good_rows = service
    job = f"mid-{name}"
    first, err = batches_then(svc.address, [hello(job=job, batch_size=BATCH), credit(2)], 2, [bad])
    assert err is not None and err.code() == code, err
    assert fragment in err.details()
    assert len(first) == 2
    stats = stub.GetStats(pb.GetStatsRequest(job=job), timeout=CALL_TIMEOUT_S)
    assert stats.jobs[0].feedback_samples == 0
    with RemoteLoader(svc.address, job=job, batch_size=BATCH, timeout_s=CALL_TIMEOUT_S) as loader:
        epoch = epoch_ids(loader)
    for sent, again in zip(first, epoch):
        np.testing.assert_array_equal(again, sent)
    ids = np.concatenate(epoch)
    assert len(ids) == good_rows and len(np.unique(ids)) == good_rows
    wait_for_no_trainers(stub)
    assert_serving(svc.address)


def test_a_bad_report_after_a_good_one_keeps_the_good_one_only(service, stub):
    svc, _ = service
    job = "good-then-bad"

    def reports(batches: list[np.ndarray]) -> list[pb.TrainRequest]:
        served = batches[0]
        return [feedback(served[:3], [0.1, 0.2, 0.3]), feedback([served[3], 999 << 32], [0.5, 0.5])]

    _, err = batches_then(svc.address, [hello(job=job, batch_size=BATCH), credit(1)], 1, reports)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"sample id {999 << 32} is not in the pool" in err.details()
    # The valid report counts in full, the rejected one (its valid first id included) not at all.
    assert stub.GetStats(pb.GetStatsRequest(job=job), timeout=CALL_TIMEOUT_S).jobs[0].feedback_samples == 3


def test_an_ack_up_to_an_unsent_far_sequence_number_is_rejected(service, stub):
    """Hello may name any next_seq (a resume point); an ack just below it names batches this stream
    never sent. Accepted, it had the curator walk ~2**64 sequence numbers, hanging the job."""
    svc, good_rows = service
    job = "far-ack"
    far_ack = pb.TrainRequest(ack=pb.Ack(seq=U64 - 1))
    _, err = open_stream(svc.address, hello(job=job, batch_size=BATCH, next_seq=U64), far_ack)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no batch" in err.details()
    with RemoteLoader(svc.address, job=job, batch_size=BATCH, timeout_s=CALL_TIMEOUT_S) as loader:
        ids = np.concatenate(epoch_ids(loader))
    assert len(ids) == good_rows and len(np.unique(ids)) == good_rows


def test_reported_losses_reach_the_curator(service):
    with RemoteLoader(service[0].address, job="feedback", batch_size=16, timeout_s=60) as loader:
        reported = 0
        for batch in loader:
            loader.report(batch, np.linspace(0, 1, len(batch["_id"])))
            reported += len(batch["_id"])
        assert loader.stats().jobs[0].feedback_samples == reported
    with pytest.raises(ValueError, match="3 losses for a batch of 16"):
        loader.report(batch, [1.0, 2.0, 3.0])


# -- other RPCs -------------------------------------------------------------------------------------


def test_weights_for_an_unknown_job_fail_precondition(service, stub):
    chunks = iter([pb.WeightsChunk(job="no-such-job", step=1, data=b"weights")])
    with pytest.raises(grpc.RpcError) as err:
        stub.PushWeights(chunks, timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unknown job 'no-such-job'" in err.value.details()
    assert "no-such-job" not in job_names(stub)


def test_stats_of_an_unknown_job_are_empty_and_create_nothing(service, stub):
    stats = stub.GetStats(pb.GetStatsRequest(job="never-started"), timeout=CALL_TIMEOUT_S)
    assert list(stats.jobs) == [] and len(stats.shards) == 4
    assert "never-started" not in job_names(stub)


@pytest.mark.parametrize("rpc", ["AddShards", "PushWeights"])
def test_oversized_unary_and_client_stream_messages_are_resource_exhausted(service, stub, rpc):
    before = stub.GetStats(pb.GetStatsRequest(), timeout=CALL_TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as err:
        if rpc == "AddShards":
            stub.AddShards(pb.AddShardsRequest(uris=["x" * MAX_MESSAGE_BYTES]), timeout=CALL_TIMEOUT_S)
        else:
            chunk = pb.WeightsChunk(job="quarantine", data=bytes(MAX_MESSAGE_BYTES))
            stub.PushWeights(iter([chunk]), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.value.details()
    after = stub.GetStats(pb.GetStatsRequest(), timeout=CALL_TIMEOUT_S)
    assert [(s.uri, s.state) for s in after.shards] == [(s.uri, s.state) for s in before.shards]
    assert [(j.job, j.weight_pushes) for j in after.jobs] == [(j.job, j.weight_pushes) for j in before.jobs]
    assert_serving(service[0].address)


def test_add_shards_that_match_nothing_is_invalid_argument(service, stub, tmp_path):
    with pytest.raises(grpc.RpcError) as err:
        stub.AddShards(pb.AddShardsRequest(uris=[str(tmp_path / "nothing-*.tar")]), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "matched no files" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.AddShards(pb.AddShardsRequest(), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "AddShards.uris is empty" in err.value.details()
    assert len(stub.GetStats(pb.GetStatsRequest(), timeout=CALL_TIMEOUT_S).shards) == 4


def test_a_rank_too_far_ahead_is_refused_while_another_reads_an_older_epoch(service):
    """Starting an epoch forgets all but the newest two: a rank two epochs ahead of a live rank
    would cut it off, so its Hello fails; one epoch ahead (the normal overlap) is fine."""
    address = service[0].address
    job = "ahead"
    outcome = {}

    def then(_ids):
        outcome["two ahead"] = open_stream(address, hello(job, rank=1, world_size=2, epoch=2), credit(1))
        outcome["one ahead"] = open_stream(address, hello(job, rank=1, world_size=2, epoch=1), credit(1))
        return []

    ids, err = batches_then(address, [hello(job, rank=0, world_size=2), credit(1)], 1, then)
    assert err is None and len(ids) == 1
    _, far = outcome["two ahead"]
    assert far is not None and far.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rank 0 of job 'ahead' is still on epoch 0" in far.details()
    got, near = outcome["one ahead"]
    assert near is None and any(r.WhichOneof("kind") == "batch" for r in got)
