"""Gateway processes beyond the first (config `gateways: N`): one Ray actor each, on the node of
the process that serves the Pipeline, all listening on its port.

Why: the gateway gathers and frames every payload byte, so it is the busiest process of the
service (6.6 of 12.2 ms of CPU per 4.8 MB batch, BENCHMARKS.md), and one Python process uses one
core. How: every gateway binds the same HOST:PORT with SO_REUSEPORT (gRPC sets it on Linux), and
the kernel spreads new connections over them, so trainers and a Kubernetes Service still see one
address. The ranks of one job may land on different gateways: each asks the job's one curator
for its rank's plans, and the curator keeps every rank's share of an epoch.
"""

from __future__ import annotations

import asyncio
import dataclasses

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.forwarding import Forwarding, ForwardedPipeline, MailboxActor
from actors.runtime import ProcessInfo
from loader.config import ServiceConfig
from loader.errors import ConfigError

START_TIMEOUT_S = 60.0


# No restarts: a gateway that died has lost its trainers' connections, which reconnect to the port
# and land on a live gateway.
@ray.remote(num_cpus=0, max_restarts=0)
class GatewayActor(ProcessInfo):
    def __init__(self, config: ServiceConfig, index: int, mailbox, readers: list, table_bytes: int, remote) -> None:
        from loader.gateway.server import Gateway  # grpc only where a gateway runs

        self._pipeline = ForwardedPipeline(mailbox, index, readers, table_bytes, remote)
        # The token is read here, from the same token_file or $LOADER_TOKEN: it never travels
        # through Ray. ConfigError if it cannot be read.
        self._gateway = Gateway(self._pipeline, config, primary=False)
        self._stopped = asyncio.Event()

    async def start(self, address: str, requires_token: bool) -> str:
        if self._gateway.requires_token != requires_token:
            where = "it has no $LOADER_TOKEN" if requires_token else "it has a $LOADER_TOKEN the first one lacks"
            raise ConfigError("gateways", f"a gateway process would not require the first one's token ({where}); "
                                          "use token_file")  # fmt: skip
        # The first gateway's bound address: a port 0 in the config was resolved by it.
        self._gateway.config = dataclasses.replace(self._gateway.config, address=address)
        return await self._gateway.start()

    def superseded(self, key: int, message: str) -> None:
        self._pipeline.superseded(key, message)

    async def until_stopped(self) -> None:
        """Returns once `stop` has run; the serving process waits on it to learn of a death."""
        await self._stopped.wait()

    async def stop(self) -> None:
        await self._gateway.stop()
        self._stopped.set()


class Gateways:
    """The gateway actors of one Pipeline and the forwarding task that answers them."""

    def __init__(self, pipeline, config: ServiceConfig, readers: list, table_bytes: int, remote) -> None:
        self._config, self._readers, self._table_bytes, self._remote = config, readers, table_bytes, remote
        self._mailbox = MailboxActor.remote()
        self._forwarding = Forwarding(pipeline, self._mailbox)

    @property
    def actors(self) -> list:
        return list(self._forwarding.gateways)

    async def start(self, address: str, count: int, requires_token: bool) -> list[str]:
        """Starts `count` more gateways listening on `address`; returns their bound addresses
        (the same as `address` unless its port is 0). Runs on the event loop that serves them."""
        self._forwarding.start()
        # On this node: SO_REUSEPORT shares a port between the processes of one machine only.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        first = len(self._forwarding.gateways)
        for index in range(first, first + count):
            self._forwarding.gateways.append(
                GatewayActor.options(scheduling_strategy=here).remote(
                    self._config, index, self._mailbox, self._readers, self._table_bytes, self._remote
                )
            )
        added = self._forwarding.gateways[first:]
        try:
            started = asyncio.gather(*(g.start.remote(address, requires_token) for g in added))
            addresses = list(await asyncio.wait_for(started, START_TIMEOUT_S))
        except BaseException:  # none of them serves: a half-started set would take some trainers only
            for actor in added:
                ray.kill(actor, no_restart=True)
            del self._forwarding.gateways[first:]
            raise
        for index in range(first, first + count):
            self._forwarding.watch(index)
        return addresses

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the gateways (their streams end), then the forwarding task and the mailbox."""
        try:
            await asyncio.wait_for(asyncio.gather(*(g.stop.remote() for g in self._forwarding.gateways)), timeout_s)
        except Exception:  # they are killed below all the same
            pass
        self.kill()

    def kill(self) -> None:
        self._forwarding.stop()
        for actor in [*self._forwarding.gateways, self._mailbox]:
            ray.kill(actor, no_restart=True)
        self._forwarding.gateways.clear()
