"""Builds the gRPC server (Loader service, health, reflection) and runs it."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from loader.config import TOKEN_ENV, ServiceConfig, is_loopback, parse_address, read_token
from loader.gateway import tls
from loader.gateway.auth import BearerTokenInterceptor
from loader.gateway.service import LoaderService
from loader.gateway.wire import PreSerializedBatches
from loader.sources import expand
from loader.v1 import loader_pb2, loader_pb2_grpc
from loader.watch import ShardWatcher

log = logging.getLogger("loader.gateway")

SERVICE_NAME = loader_pb2.DESCRIPTOR.services_by_name["Loader"].full_name


# A trainer whose machine vanished never closes its stream; pings find it within about 40 s, and
# its session (credits, waiting batch requests) is released. Clients may ping every 10 s at most.
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def message_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


class Gateway:
    """The running gRPC server of one pipeline; `address` is the bound HOST:PORT.

    The first (`primary`) gateway also runs the service's timers (idle jobs, watched shards, the
    pool budget) and, with `gateways: N` in the config, starts the N - 1 others on its port.
    """

    def __init__(self, pipeline, config: ServiceConfig, primary: bool = True) -> None:
        self.pipeline, self.config, self.primary = pipeline, config, primary
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self._reaper: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._admitting: asyncio.Task | None = None
        self._readying: asyncio.Task | None = None
        self._health = HealthServicer()
        # Read here, not at start(), so a bad token source fails before anything listens.
        token = read_token(config)
        self._interceptors = [BearerTokenInterceptor(token)] if token else []
        self._interceptors.append(PreSerializedBatches())
        self._credentials = tls.server_credentials(config.tls) if config.tls else None

    @property
    def requires_token(self) -> bool:
        return any(isinstance(i, BearerTokenInterceptor) for i in self._interceptors)

    async def start(self) -> str:
        host, _ = parse_address(self.config.address)
        # SO_REUSEPORT: every gateway process of a service binds its one port (actors/gateways.py).
        # gRPC's default on Linux; stated here because the design rests on it.
        options = message_options(self.config.max_message_bytes) + KEEPALIVE + [("grpc.so_reuseport", 1)]
        server = grpc.aio.server(interceptors=self._interceptors, options=options)
        loader_pb2_grpc.add_LoaderServicer_to_server(LoaderService(self.pipeline, self.config), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        if self._credentials is None:
            port = server.add_insecure_port(self.config.address)
        else:
            port = server.add_secure_port(self.config.address, self._credentials)
        if port == 0:
            raise OSError(f"cannot listen on {self.config.address}")
        # NOT_SERVING until every actor answers (a Kubernetes readiness probe keeps trainers away
        # meanwhile); the RPCs themselves work from now on and wait for the actors they need.
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        self.address = f"{host}:{port}"
        if self.primary:
            loop = asyncio.get_running_loop()
            self._reaper = loop.create_task(self._release_idle_jobs())
            if self.config.watch:
                self._watcher = loop.create_task(self._watch_shards())
            if self.config.max_samples is not None:
                self._admitting = loop.create_task(self._admit_pool())
            if self.config.gateways > 1:
                try:
                    await self.pipeline.start_gateways(self.address, self.config.gateways - 1, self.requires_token)
                except BaseException:
                    await self.stop(grace_s=0)
                    raise
        self._readying = asyncio.get_running_loop().create_task(self._serve_when_ready())
        self._log_security()
        return self.address

    async def _serve_when_ready(self) -> None:
        await self.pipeline.ready()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("health: SERVING (every actor is up)")

    def _log_security(self) -> None:
        config = self.config
        if self.requires_token:
            source = f"token_file {config.token_file}" if config.token_file else f"${TOKEN_ENV}"
            log.info("auth: bearer token required on every RPC except health (token from %s)", source)
            _warn_if_others_can_read(config.token_file)
        elif config.tls is not None and config.tls.client_ca:
            log.info("auth: no token; only clients with a certificate signed by %s can connect", config.tls.client_ca)
        else:
            log.warning("auth: none — anyone who can reach %s can read the data", self.address)
        exposed = config.tls is None and self.requires_token and not is_loopback(self.address)
        log.log(logging.WARNING if exposed else logging.INFO, tls.describe(config.tls))

    async def _release_idle_jobs(self) -> None:
        every = min(self.config.job_idle_s / 4, 30.0)
        while True:
            await asyncio.sleep(every)  # a timer, not synchronisation: idleness is time-based
            try:
                await self.pipeline.release_idle()
            except Exception:  # never let the timer die; the next round tries again
                log.exception("releasing idle jobs failed")

    async def _watch_shards(self) -> None:
        """Adds the watched patterns' complete new files to the pool, as `AddShards` would."""
        watcher = ShardWatcher(self.config.watch, known=set(expand(list(self.config.shards))))
        while True:
            try:
                new = watcher.poll()
                if new:
                    records = await self.pipeline.add_shards(new)
                    for r in records:
                        log.info("watch: shard %d %s %s %s", r.index, r.state, r.uri, r.reason or f"{r.rows} rows")
            except Exception:  # never let the timer die; the next poll tries again
                log.exception("adding watched shards failed")
            await asyncio.sleep(self.config.watch_poll_s)  # a poll interval, not synchronisation

    async def _admit_pool(self) -> None:
        try:
            await self.pipeline.admit_pool()
        except Exception:  # shards added later are admitted all the same
            log.exception("bringing the starting pool within max_samples failed")

    async def stop(self, grace_s: float = 2.0) -> None:
        for task in (self._reaper, self._watcher, self._admitting, self._readying):
            if task is not None:
                task.cancel()
        self._reaper = self._watcher = self._admitting = self._readying = None
        if self.primary and self.config.gateways > 1:
            await self.pipeline.stop_gateways()
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace_s)
            self._server = None

    async def wait(self) -> None:
        await self._server.wait_for_termination()


def _warn_if_others_can_read(path: str | None) -> None:
    if path is None:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token_file %s is accessible to other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode))


class BackgroundGateway:
    """A gateway on its own event loop thread, for embedding the service in a Python process."""

    def __init__(self, pipeline, config: ServiceConfig) -> None:
        self.gateway = Gateway(pipeline, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loader-gateway", daemon=True)

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.gateway.start(), self._loop).result(timeout_s)

    @property
    def address(self) -> str:
        return self.gateway.address

    def stop(self, timeout_s: float = 30.0) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
