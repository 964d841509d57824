"""Bad shards are quarantined while good ones keep serving; bad client messages are rejected."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest

from loader import RemoteLoader
from loader.errors import ConfigError
from loader.v1 import loader_pb2 as pb
from loader.v1 import loader_pb2_grpc as pb_grpc
from tests.helpers import epoch_ids, rows_in


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
    return serve([pattern], shuffle_rows=32), rows_in(good)


def test_bad_and_missing_shards_are_quarantined_and_the_rest_is_served(service, mixed_pool):
    svc, good_rows = service
    _, _, garbage, missing = mixed_pool
    with RemoteLoader(svc.address, job="quarantine", batch_size=16) as loader:
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


def open_stream(address: str, *requests: pb.TrainRequest):
    """Sends `requests`, keeps the stream open, returns (responses so far, final RpcError or None)."""
    channel = grpc.insecure_channel(address)
    call = pb_grpc.LoaderStub(channel).Train(iter(requests), timeout=30)
    got = []
    try:
        for response in call:
            got.append(response)
    except grpc.RpcError as exc:
        return got, exc
    finally:
        channel.close()
    return got, None


def hello(job="raw", **kw) -> pb.TrainRequest:
    fields = {"job": job, "rank": 0, "world_size": 1, "batch_size": 8} | kw
    return pb.TrainRequest(hello=pb.Hello(**fields))


@pytest.mark.parametrize(
    "first, fragment",
    [
        (pb.TrainRequest(credit=pb.Credit(batches=1)), "first message must be Hello"),
        (hello(job=""), "Hello.job"),
        (hello(rank=2, world_size=2), "rank"),
        (hello(batch_size=0), "batch_size"),
        (hello(policy="no-such-policy"), "unknown policy"),
    ],
)
def test_bad_hello_is_invalid_argument(service, first, fragment):
    _, err = open_stream(service[0].address, first)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.details()


def test_joining_a_job_with_another_batch_size_fails_precondition(service):
    address = service[0].address
    with RemoteLoader(address, job="fixed", batch_size=8) as loader:
        next(iter(loader))
    _, err = open_stream(address, hello(job="fixed", batch_size=16), pb.TrainRequest(credit=pb.Credit(batches=1)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "batch_size=8" in err.details()


def feedback(ids, losses) -> pb.TrainRequest:
    return pb.TrainRequest(
        feedback=pb.Feedback(ids=np.asarray(ids, "<i8").tobytes(), losses=np.asarray(losses, "<f4").tobytes())
    )


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (feedback([1], [float("nan")]), "NaN"),
        (feedback([1, 2], [0.5]), "2 ids but 1 losses"),
        (pb.TrainRequest(feedback=pb.Feedback(ids=b"123", losses=b"")), "int64"),
        (feedback([(999 << 32) | 5], [0.5]), "not in the pool"),
        (pb.TrainRequest(ack=pb.Ack(epoch=0, seq=7)), "never sent"),
        (pb.TrainRequest(credit=pb.Credit(batches=0)), "Credit.batches"),
        (hello(), "second Hello"),
    ],
)
def test_bad_stream_messages_are_invalid_argument_and_change_nothing(service, bad, fragment):
    address = service[0].address
    job = f"bad-{fragment[:6]}"
    with RemoteLoader(address, job=job, batch_size=8) as loader:
        next(iter(loader))  # the job and its pool exist
        before = loader.stats().jobs[0].feedback_samples
        _, err = open_stream(address, hello(job=job), bad)
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert fragment in err.details()
        assert loader.stats().jobs[0].feedback_samples == before


def test_reported_losses_reach_the_curator(service):
    with RemoteLoader(service[0].address, job="feedback", batch_size=16) as loader:
        reported = 0
        for batch in loader:
            loader.report(batch, np.linspace(0, 1, len(batch["_id"])))
            reported += len(batch["_id"])
        assert loader.stats().jobs[0].feedback_samples == reported
    with pytest.raises(ValueError, match="3 losses for a batch of 16"):
        loader.report(batch, [1.0, 2.0, 3.0])
