"""A trainer rides through a service restart: the whole service (`python -m loader serve`, its own
Ray) SIGKILLed mid-epoch and started again on the same `state_dir` and address while one
RemoteLoader `for` loop runs; the same loop completes the epoch with every sample exactly once.
A service gone for longer than `reconnect_s` ends the loop with a clear error, and a refused token
is raised at once, never retried.

Two service starts in all (each costs a Ray start); the tests after the first reuse the restarted
service, and the last one kills it for good.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from loader import RemoteLoader
from loader import ServiceUnreachable
from loader.ids import make_ids
from tests.helpers import LOADER_TIMEOUT_S, rows_in
from tests.test_service_kill import START_TIMEOUT_S, Served, kill_service, port_open

TOKEN = "tok-8c1e44d7a9f2-reconnect"
BATCH = 16
KILL_AT = 10  # batches the loop has taken when the service is killed (of 40)
GONE_RECONNECT_S = 3.0
# The loop ends with ServiceUnreachable this soon after reconnect_s has run out: the attempt in
# flight fails at once (connection refused), nothing else is waited for.
GIVE_UP_SLACK_S = 10.0


@dataclasses.dataclass
class Launched(Served):
    lines: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)


def launch(config: str, log: str, address: str) -> Launched:
    """`loader serve` on `address`, not waited for; `listening` waits for it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LOADER_TOKEN")}
    with open(log, "a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loader", "serve", "--config", config, "--address", address],
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True, env=env,
        )  # fmt: skip
    launched = Launched(proc, "", log)
    threading.Thread(target=lambda: [launched.lines.put(line) for line in proc.stdout], daemon=True).start()
    return launched


def listening(launched: Launched) -> str:
    try:
        line = launched.lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        pytest.fail(f"loader serve printed nothing within {START_TIMEOUT_S} s:\n{launched.log_tail()}")
    assert line.startswith("listening on 127.0.0.1:"), f"{line!r}\n{launched.log_tail()}"
    launched.address = line.split()[-1]
    return launched.address


class Services:
    """The one service of this module at a time, on the same config and state_dir."""

    def __init__(self, config: str, log: str) -> None:
        self.config, self.log = config, log
        self.running: Launched | None = None
        self.starts = 0

    def start(self, address: str = "127.0.0.1:0") -> Launched:
        assert self.running is None
        self.running = launch(self.config, self.log, address)
        self.starts += 1
        return self.running

    def current(self) -> Launched:
        """The running service, started (and waited for) if there is none."""
        if self.running is None:
            self.start()
        if not self.running.address:
            listening(self.running)
        return self.running

    def kill(self) -> None:
        if self.running is not None:
            running, self.running = self.running, None
            kill_service(running)


@pytest.fixture(scope="module")
def services(tmp_path_factory, mnist_tar):
    root = tmp_path_factory.mktemp("reconnect")
    token = root / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config = root / "service.yaml"
    config.write_text(
        f"shards: {list(mnist_tar['train'])!r}\nstate_dir: {str(root / 'state')!r}\ntoken_file: {str(token)!r}\n"
        "default_policy: uniform\nreaders: 1\nnum_cpus: 2\nshuffle_rows: 64\n"
    )
    running = Services(str(config), str(root / "serve.log"))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("LOADER_TOKEN", raising=False)  # a developer's own token must not be sent
        yield running
    running.kill()


def test_one_loop_rides_through_the_service_killed_and_restarted_on_the_same_address(services, mnist_tar):
    first = services.current()
    address = first.address
    ids: list[np.ndarray] = []
    with RemoteLoader(address, job="reconnect", batch_size=BATCH, token=TOKEN, timeout_s=LOADER_TIMEOUT_S) as loader:
        assert loader.reconnect_s == 120
        for batch in loader:
            ids.append(batch["_id"].numpy().copy())
            loader.report(batch, np.full(len(ids[-1]), 0.5, np.float32))  # reports go on through it all
            if len(ids) == KILL_AT:
                services.kill()
                assert not port_open(address), f"{address} still accepts connections after the kill"
                # On the same port, explicitly; it boots while the loop below waits for it.
                again = services.start(address)
        assert listening(again) == address
        assert loader.reconnects == 1
        assert loader.state_dict()["epoch"] == 1, "the loop did not run the epoch to its end"
        stats = loader.stats()
    pool = np.concatenate([make_ids(s.index, s.rows) for s in stats.shards])
    assert len(pool) == rows_in(mnist_tar["train"])
    served = np.concatenate(ids)
    repeated = len(served) - len(np.unique(served))
    assert repeated == 0, f"{repeated} samples served twice across the restart"
    missing = np.setdiff1d(pool, served)
    assert np.array_equal(np.sort(served), np.sort(pool)), f"{len(missing)} samples lost: {missing[:20]}"


def test_a_refused_token_is_raised_at_once_not_retried(services):
    address = services.current().address
    intruder = RemoteLoader(
        address, job="reconnect-intruder", batch_size=BATCH, token="not-the-token", timeout_s=LOADER_TIMEOUT_S
    )
    with intruder as loader:
        assert loader.reconnect_s > 60
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            next(iter(loader))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            len(loader)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        took = time.monotonic() - began
    assert took < 10, f"took {took:.1f} s: a refused token was retried"


def test_a_service_gone_for_longer_than_reconnect_s_ends_the_loop_with_a_clear_error(services):
    address = services.current().address
    with RemoteLoader(
        address, job="reconnect-gone", batch_size=BATCH, token=TOKEN, timeout_s=LOADER_TIMEOUT_S,
        reconnect_s=GONE_RECONNECT_S,
    ) as loader:  # fmt: skip
        it = iter(loader)
        for _ in range(3):
            next(it)
        services.kill()  # for good
        gone = time.monotonic()
        with pytest.raises(ServiceUnreachable) as info:
            for _ in it:
                pass
        took = time.monotonic() - gone
    assert GONE_RECONNECT_S <= took < GONE_RECONNECT_S + GIVE_UP_SLACK_S, took
    error = info.value
    assert isinstance(error, ConnectionError)
    assert (error.address, error.job, error.reconnect_s) == (address, "reconnect-gone", GONE_RECONNECT_S)
    assert error.attempts >= 2 and error.elapsed_s >= GONE_RECONNECT_S
    message = str(error)
    assert address in message and f"{error.attempts} attempts" in message and "UNAVAILABLE" in message, message
    assert services.starts <= 3


# -- without a service: nothing listens on the address ---------------------------------------------


@pytest.fixture
def nowhere() -> str:
    """An address nothing listens on (a port the OS gave out and was given back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_reconnect_s_0_raises_the_first_failure_at_once(nowhere):
    with RemoteLoader(nowhere, job="j", batch_size=BATCH, timeout_s=LOADER_TIMEOUT_S, reconnect_s=0) as loader:
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            next(iter(loader))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not isinstance(info.value, ServiceUnreachable)
        assert time.monotonic() - began < 10


def test_a_service_that_never_comes_is_given_reconnect_s_then_named(nowhere):
    with RemoteLoader(nowhere, job="j", batch_size=BATCH, timeout_s=LOADER_TIMEOUT_S, reconnect_s=2) as loader:
        began = time.monotonic()
        with pytest.raises(ServiceUnreachable) as info:
            next(iter(loader))
        took = time.monotonic() - began
    assert 2 <= took < 2 + GIVE_UP_SLACK_S, took
    assert info.value.attempts >= 3  # after 0.5 s, 1 s, ... of backoff
    assert nowhere in str(info.value)


def test_reconnect_s_must_be_a_finite_number_of_seconds():
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="reconnect_s"):
            RemoteLoader("127.0.0.1:1", job="j", batch_size=1, reconnect_s=bad)
