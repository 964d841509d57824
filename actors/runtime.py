"""Starting or joining Ray."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Joins `address` ("auto", ray://...) or starts a local Ray on loopback; no-op if connected."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined Ray at %s", address)
        return
    ray.init(
        # "local": always a new Ray of our own. Without it ray.init joins whatever cluster
        # /tmp/ray/ray_current_cluster names, and hangs on one that died without cleaning up.
        address="local",
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )
    log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))


class ProcessInfo:
    """Mixed into every actor class: which OS process it runs in, for operators' CPU and memory
    accounting (and for fault tests that kill one)."""

    def process(self) -> tuple[str, int]:
        """(actor class name, OS process id)."""
        return type(self).__name__, os.getpid()

    def node(self) -> str:
        """The Ray node id this actor runs on (placement checks, node-loss tests)."""
        return ray.get_runtime_context().get_node_id()


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
