"""Riding through a service restart: which failures are worth a retry, how long to wait
between tries, and the error raised once `reconnect_s` has run out. The RemoteLoader uses these;
they hold no connection of their own."""

from __future__ import annotations

import random
import time

import grpc

from loader.errors import LoaderError

# Reconnecting: the first retry after about BACKOFF_FIRST_S, each wait twice the last (within
# +-BACKOFF_JITTER, so ranks that lost the service together do not come back in step), at most
# BACKOFF_CAP_S: a service that is back is found within about that long.
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 5.0
BACKOFF_JITTER = 0.2
# The channel's own reconnection backoff (gRPC's default grows to 120 s) kept as short, or a
# Hello would fail fast against a channel still waiting to try the address again.
CHANNEL_BACKOFF = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5000)]
# Enough for the head pod of a Kubernetes Ray cluster to be rescheduled and the service to come
# back on its state_dir (pod start, Ray start, actors, restore: typically 30-90 s), short enough
# that a service that is really gone ends the job within two minutes rather than hanging it.
RECONNECT_S = 120.0
# Only these failures mean "the service went away"; every other status (a refused token, a bad
# Hello, a job conflict, a newer stream for this rank) would only fail again, so it is raised.
TRANSIENT = (grpc.StatusCode.UNAVAILABLE,)
_JITTER = random.Random()


class ServiceUnreachable(LoaderError, ConnectionError):
    """The loader service stayed unreachable for longer than `reconnect_s`; the fields say where,
    for how long, how many attempts were made and the last gRPC status."""

    def __init__(
        self, address: str, job: str, attempts: int, elapsed_s: float, reconnect_s: float, status: str
    ) -> None:
        super().__init__(address, job, attempts, elapsed_s, reconnect_s, status)
        self.address, self.job, self.attempts = address, job, attempts
        self.elapsed_s, self.reconnect_s, self.status = elapsed_s, reconnect_s, status

    def __str__(self) -> str:
        tries = f"{self.attempts} attempt{'' if self.attempts == 1 else 's'}"
        return (
            f"the loader service at {self.address} was unreachable for job {self.job!r}: {tries} over "
            f"{self.elapsed_s:.1f} s (reconnect_s={self.reconnect_s:g}) failed; last gRPC status {self.status}"
        )


class Outage:
    """One stretch without the service: when it began, attempts that failed, the last status.
    It ends when the service serves again (a batch or an epoch end), not at a mere READY, so a
    service that accepts a Hello and dies again at once still runs out of time."""

    def __init__(self, loader) -> None:
        self.loader, self.began, self.attempts, self.failures, self.status = loader, time.monotonic(), 0, 0, ""

    def failed(self, status: str, attempt: bool) -> float:
        """Records a failure (`attempt`: a try to connect, not an established stream breaking);
        the wait before the next try, or ServiceUnreachable once reconnect_s has run out."""
        self.status = status
        self.attempts += attempt
        self.failures += 1
        loader = self.loader
        elapsed = time.monotonic() - self.began
        left = loader.reconnect_s - elapsed
        if left <= 0:
            raise ServiceUnreachable(loader.address, loader.job, self.attempts, elapsed, loader.reconnect_s, status)
        backoff = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** min(self.failures - 1, 16))
        return min(left, backoff * _JITTER.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER))


def status_of(exc: grpc.RpcError) -> str:
    return f"{exc.code().name} ({exc.details() or 'no details'})"
