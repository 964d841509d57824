"""A multi-node service on one machine, run as a child process by tests/test_multinode.py (one
Ray per process: the test session has its own local Ray already).

`ray.cluster_utils.Cluster` starts a head and two worker nodes, each its own raylet with its own
object store: `readers` advertises loader_reader, `scorers` loader_scorer. The service joins that
cluster (`ray_address`), as `loader serve --ray-address auto` does on Kubernetes, with the
placement keys of k8s/configmap.yaml. The service starts before the worker nodes exist, so its
readers cannot be placed yet: health (watched with grpc.health.v1 Watch) must say NOT_SERVING
until the nodes join and every actor is up, then SERVING, and NOT_SERVING again while the service
drains at the end. One trainer streams an epoch; after `--remove-after`
batches the readers' node is removed (with every actor and object it held) and, as KubeRay would
reschedule the pod, a new one with the same resources joins. Prints one JSON object: where each
actor ran, and every sample id served (on the line that starts with RESULT).
"""

from __future__ import annotations

import actors  # noqa: F401  (before ray: loopback only)

import argparse
import json
import sys

import threading

import grpc
import numpy as np
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.cluster_utils import Cluster

from actors.pipeline import Pipeline
from loader import RemoteLoader
from loader.config import from_mapping
from loader.gateway.server import SERVICE_NAME, BackgroundGateway

LOOPBACK = {"node_ip_address": "127.0.0.1"}
# Ray's workers log to this process's stdout too: the result is the line with this prefix.
RESULT = "multinode result: "


class HealthWatch:
    """Every status the service's health Watch stream reports, in order, until the stream ends."""

    def __init__(self, address: str) -> None:
        self.statuses: list[str] = []
        self.changed = threading.Condition()
        self._channel = grpc.insecure_channel(address)
        stub = health_pb2_grpc.HealthStub(self._channel)
        self._stream = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for reply in self._stream:
                with self.changed:
                    self.statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                    self.changed.notify_all()
        except grpc.RpcError:  # the server went away: the watch is over
            pass

    def wait_for(self, status: str, timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.statuses and self.statuses[-1] == status, timeout_s)

    def close(self, timeout_s: float) -> list[str]:
        self._thread.join(timeout_s)
        self._channel.close()
        return self.statuses


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--state-dir", required=True)
    p.add_argument("--remove-after", type=int, default=4)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("weights")
    p.add_argument("shards", nargs="+")
    args = p.parse_args()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **LOOPBACK})
    config = from_mapping({
        "shards": args.shards, "address": "127.0.0.1:0", "ray_address": cluster.address, "state_dir": args.state_dir,
        "readers": 2, "reader_resources": {"loader_reader": 1}, "scorers": 1, "scorer_resources": {"loader_scorer": 1},
        "reference": {"factory": "loader.models:mlp", "weights": args.weights}, "shuffle_rows": 128,
        "ready_batches": 1, "log_level": "WARNING",
    })  # fmt: skip
    pipeline = Pipeline(config)
    gateway = BackgroundGateway(pipeline, config)
    address = gateway.start()
    health = HealthWatch(address)
    assert health.wait_for("NOT_SERVING", args.timeout_s), health.statuses  # no reader can be placed yet
    nodes = {
        "readers": cluster.add_node(num_cpus=1, resources={"loader_reader": 2}, **LOOPBACK),
        "scorers": cluster.add_node(num_cpus=1, resources={"loader_scorer": 1}, **LOOPBACK),
    }
    assert health.wait_for("SERVING", args.timeout_s), health.statuses
    ids_of_node = {role: node.node_id for role, node in nodes.items()}
    stopped = False
    try:
        # keep_ratio 1: every candidate is served, so the epoch must hold every sample exactly once.
        loader = RemoteLoader(address, job="multinode", batch_size=32, policy="learnability", seed=1,
                              options={"keep_ratio": 1}, timeout_s=args.timeout_s)  # fmt: skip
        served, placed = [], {}
        for n, batch in enumerate(loader):
            served.append(batch["_id"].numpy())
            loader.report(batch, np.ones(len(batch["_id"]), np.float32))
            if n + 1 == args.remove_after:
                running = pipeline.actors()
                placed = {role: ray.get([a.node.remote() for a in running[role]], timeout=args.timeout_s)
                          for role in ("readers", "scorers")}  # fmt: skip
                cluster.remove_node(nodes["readers"])
                cluster.add_node(num_cpus=1, resources={"loader_reader": 2}, **LOOPBACK)
        loader.close()
        gateway.stop()  # drains: NOT_SERVING, then the server closes and the watch ends
        stopped = True
        print(RESULT + json.dumps({
            "nodes": ids_of_node, "placed": placed, "health": health.close(args.timeout_s),
            "served": np.concatenate(served).tolist(),
        }))  # fmt: skip
    finally:
        if not stopped:
            gateway.stop()
        pipeline.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
