"""Random Train streams, valid and invalid, against the real server: every stream ends with a
deliberate status, the service keeps answering, and no trainer session outlives its stream."""

from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from loader import RemoteLoader, codec
from loader.v1 import loader_pb2 as pb
from loader.v1 import loader_pb2_grpc as pb_grpc
from tests.helpers import epoch_ids, rows_in

MAX_MESSAGE_BYTES = 1 << 20
CALL_TIMEOUT_S = 60
U32, U64 = 2**32 - 1, 2**64 - 1
# Codes that say the server decided; UNKNOWN or INTERNAL would be an exception escaping a handler,
# DEADLINE_EXCEEDED a stream the server never ended although the trainer had closed its side.
DELIBERATE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.fixture(scope="module")
def service(serve, mnist_tar):
    shards = mnist_tar["train"][:2]
    return serve(shards, shuffle_rows=32, ready_batches=2, max_message_bytes=MAX_MESSAGE_BYTES), rows_in(shards)


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service[0].address) as channel:
        yield channel


# A few job names only: each new job starts a curator actor, and reusing names also sends Hellos
# that conflict with a job already running.
hellos = st.builds(
    pb.Hello,
    job=st.sampled_from(["fuzz-a", "fuzz-b", ""]),
    rank=st.sampled_from([0, 1, 2, U32]),
    world_size=st.sampled_from([0, 1, 2, U32]),
    batch_size=st.sampled_from([0, 1, 8, U32]),
    policy=st.sampled_from(["", "uniform", "loss", "learnability", "no-such-policy"]),
    seed=st.sampled_from([0, 1, U64]),
    epoch=st.sampled_from([0, 1, U64]),
    next_seq=st.sampled_from([0, 1, 5, U64]),
    options=st.dictionaries(
        st.sampled_from(["keep_ratio", "selector", "beta", "prune_ratio", "bogus", ""]),
        st.sampled_from(["0.5", "1", "-1", "nan", "inf", "topk", "softmax", "", "\x00"]),
        max_size=2,
    ),
    total_epochs=st.sampled_from([0, 3, U32]),
)
# Ids of real samples (shards 0 and 1, low rows) next to ids no pool holds.
sample_ids = st.one_of(
    st.integers(0, 3), st.integers(0, 3).map(lambda r: (1 << 32) | r), st.integers(-(2**63), 2**63 - 1)
)
losses = st.floats(width=32)


@st.composite
def typed_feedback(draw) -> pb.Feedback:
    n = draw(st.integers(0, 4))
    ids = draw(st.lists(sample_ids, min_size=n, max_size=n))
    values = draw(st.lists(losses, min_size=draw(st.sampled_from([n, n, n + 1])), max_size=n + 1))
    return pb.Feedback(ids=np.asarray(ids, "<i8").tobytes(), losses=np.asarray(values, "<f4").tobytes())


feedbacks = st.one_of(
    typed_feedback(), st.builds(pb.Feedback, ids=st.binary(max_size=40), losses=st.binary(max_size=20))
)
OVERSIZED = pb.TrainRequest(feedback=pb.Feedback(ids=bytes(MAX_MESSAGE_BYTES + 8)))
# Placeholders the driver fills in from what the stream has received so far: an Ack of the last
# batch, and finite losses for its samples (as a well-behaved trainer sends them).
ACK_LAST, REPORT_LAST = "ack-last", "report-last"
plausible = st.one_of(
    st.integers(1, 3).map(lambda n: pb.TrainRequest(credit=pb.Credit(batches=n))),
    st.just(ACK_LAST),
    st.just(REPORT_LAST),
)
anything = st.one_of(
    hellos.map(lambda h: pb.TrainRequest(hello=h)),
    st.integers(0, 2000).map(lambda n: pb.TrainRequest(credit=pb.Credit(batches=n))),
    st.builds(pb.Ack, epoch=st.sampled_from([0, 1, U64]), seq=st.sampled_from([0, 1, 2, 5, U64])).map(
        lambda a: pb.TrainRequest(ack=a)
    ),
    feedbacks.map(lambda f: pb.TrainRequest(feedback=f)),
    st.just(pb.TrainRequest()),
    st.just(OVERSIZED),
)
# Most streams open as a trainer does (Hello, Credit) and go on mostly plausibly, so that the odd
# message reaches a live session with batches in flight.
opening = st.builds(
    pb.Hello, job=st.sampled_from(["fuzz-a", "fuzz-b"]), world_size=st.just(1), batch_size=st.just(8),
    epoch=st.sampled_from([0, 1]), next_seq=st.sampled_from([0, 1]),
).map(lambda h: pb.TrainRequest(hello=h))  # fmt: skip
first_credit = st.integers(1, 3).map(lambda n: pb.TrainRequest(credit=pb.Credit(batches=n)))
streams = st.tuples(
    st.one_of(st.tuples(opening, first_credit).map(list), st.tuples(opening).map(list), st.just([])),
    st.lists(st.one_of(plausible, plausible, plausible, plausible, anything), max_size=12),
).map(lambda parts: parts[0] + parts[1])

_CLOSE = object()


class Driver:
    """Plays one planned stream. It sends up to and including the next Credit, then waits for a
    response before going on: a credit always earns a response (a batch, the end of the epoch or
    an error), so the exchange cannot stall, and acks and reports can name batches received."""

    def __init__(self, plan: list) -> None:
        self.plan, self.outbox = list(plan), queue.SimpleQueue()
        self.sent: list[pb.TrainRequest] = []
        self.last: pb.Batch | None = None
        self.closed = False

    def requests(self):
        while (message := self.outbox.get()) is not _CLOSE:
            yield message

    def send_until_credit(self) -> None:
        while self.plan and not self.closed:
            message = self._fill(self.plan.pop(0))
            self.sent.append(message)
            self.outbox.put(message)
            if message.WhichOneof("kind") == "credit":
                return
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.outbox.put(_CLOSE)

    def _fill(self, item) -> pb.TrainRequest:
        if item == ACK_LAST:
            last = self.last or pb.Batch()
            return pb.TrainRequest(ack=pb.Ack(epoch=last.epoch, seq=last.seq))
        if item == REPORT_LAST:
            ids = codec.decode(self.last.arrow_ipc).column(codec.ID).to_numpy() if self.last else np.zeros(1, np.int64)
            losses = np.linspace(0.1, 2.0, len(ids)).astype("<f4")
            return pb.TrainRequest(feedback=pb.Feedback(ids=ids.astype("<i8").tobytes(), losses=losses.tobytes()))
        return item


def run_stream(channel, plan: list) -> tuple[list[pb.TrainResponse], list[pb.TrainRequest], grpc.StatusCode, str]:
    driver = Driver(plan)
    driver.send_until_credit()
    call = pb_grpc.LoaderStub(channel).Train(driver.requests(), timeout=CALL_TIMEOUT_S)
    responses: list[pb.TrainResponse] = []
    try:
        for response in call:
            responses.append(response)
            if response.WhichOneof("kind") == "batch":
                driver.last = response.batch
            driver.send_until_credit()
    except grpc.RpcError as exc:
        return responses, driver.sent, exc.code(), exc.details()
    finally:
        driver.close()  # ends the request thread however the call ended
    return responses, driver.sent, grpc.StatusCode.OK, ""


def credited(messages: list[pb.TrainRequest]) -> int:
    return sum(m.credit.batches for m in messages if m.WhichOneof("kind") == "credit" and m.credit.batches <= 1024)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages=streams)
def test_random_train_streams_end_deliberately(channel, messages):
    responses, sent, code, details = run_stream(channel, messages)
    event(f"ended {code.name}")  # --hypothesis-show-statistics: how far the examples got
    assert code == grpc.StatusCode.OK or code in DELIBERATE, (code, details)
    if code != grpc.StatusCode.OK:
        assert details, f"{code} without a message"
    batches = [r for r in responses if r.WhichOneof("kind") == "batch"]
    event(f"batches served: {bool(batches)}")
    assert len(batches) <= credited(sent)  # never more batches than credited
    if responses:
        assert responses[0].status.code == pb.Status.READY


def wait_for_no_trainers(channel, timeout_s: float = 30.0) -> pb.Stats:
    """A handler's cleanup may finish just after its client saw the status: poll, boundedly."""
    deadline = time.monotonic() + timeout_s
    stub = pb_grpc.LoaderStub(channel)
    while True:
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=CALL_TIMEOUT_S)
        if stats.trainers_connected == 0:
            return stats
        assert time.monotonic() < deadline, f"{stats.trainers_connected} trainer sessions left after every stream ended"
        time.sleep(0.05)


def test_after_the_fuzzing_the_service_is_healthy_and_holds_no_trainer(channel, service):
    # Runs after the fuzz test in file order; on its own it checks a fresh service the same way.
    check = health_pb2_grpc.HealthStub(channel).Check
    health = check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    wait_for_no_trainers(channel)
    svc, rows = service
    with RemoteLoader(svc.address, job="after-fuzz", batch_size=16, timeout_s=CALL_TIMEOUT_S) as loader:
        ids = np.concatenate(epoch_ids(loader))
    assert len(ids) == rows and len(np.unique(ids)) == rows
