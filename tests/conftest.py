"""Shared fixtures: one local Ray per test session, real shard files, real services on 127.0.0.1."""

from __future__ import annotations

import dataclasses

import pytest

import actors  # noqa: F401  (sets Ray's loopback switch before ray is imported)


@pytest.fixture(scope="session")
def ray_session():
    from actors.runtime import ensure_ray, shutdown

    ensure_ray(None, num_cpus=2)
    yield
    shutdown()


@pytest.fixture(scope="session")
def mnist_tar(tmp_path_factory):
    from loader.datasets import make_shards

    out = tmp_path_factory.mktemp("mnist_tar")
    return make_shards(out, shards=5, samples=1000, fmt="tar", progress=False)


@pytest.fixture(scope="session")
def mnist_parquet(tmp_path_factory):
    from loader.datasets import make_shards

    out = tmp_path_factory.mktemp("mnist_parquet")
    return make_shards(out, shards=5, samples=1000, fmt="parquet", progress=False)


@dataclasses.dataclass
class RunningService:
    address: str
    pipeline: object
    gateway: object
    stopped: bool = False

    def stop(self) -> None:
        """Stops the gateway, then the pipeline (which saves its state); only the first call acts."""
        if not self.stopped:
            self.stopped = True
            self.gateway.stop()
            self.pipeline.shutdown()


@pytest.fixture(scope="module")
def serve(ray_session):
    """Starts a pipeline and gateway for the given shards; all are stopped after the module."""
    from actors.pipeline import Pipeline
    from loader.config import from_mapping
    from loader.gateway.server import BackgroundGateway

    running: list[RunningService] = []

    def start(shards, **settings) -> RunningService:
        config = from_mapping({"shards": list(shards), "address": "127.0.0.1:0", **settings})
        pipeline = Pipeline(config)
        gateway = BackgroundGateway(pipeline, config)
        service = RunningService(gateway.start(), pipeline, gateway)
        running.append(service)
        return service

    yield start
    for service in running:
        service.stop()
