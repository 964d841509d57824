"""`loader serve` as a user runs it: a child process, a printed address, health and reflection."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loader import RemoteLoader
from tests.helpers import LOADER_TIMEOUT_S, epoch_ids, rows_in

START_TIMEOUT_S = 90


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loader", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("readerz: 2\n", "readerz"),
        ("readers: many\n", "readers"),
        ("address: nowhere\n", "address"),
        ("shuffle_rows: -1\n", "shuffle_rows"),
        ("- a list\n", "--config"),
    ],
)
def test_bad_config_file_names_the_key(tmp_path, yaml_text, key):
    cfg = tmp_path / "service.yaml"
    cfg.write_text("shards: ['x-{0..1}.tar']\n" + yaml_text if not yaml_text.startswith("-") else yaml_text)
    done = run_cli("serve", "--config", str(cfg))
    assert done.returncode == 2
    assert f"config error: {key}:" in done.stderr, done.stderr


def test_serve_without_shards_says_so(tmp_path):
    done = run_cli("serve", "--address", "127.0.0.1:0")
    assert done.returncode == 2 and "shards:" in done.stderr


def test_make_shards_writes_named_splits(tmp_path):
    done = run_cli("make-shards", "mnist1d", "--out", str(tmp_path), "--shards", "3", "--samples", "500")
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["holdout-000000.tar", "test-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, mnist_tar):
    """`loader serve --config FILE` with flags overriding the file, on an OS-assigned port."""
    cfg = tmp_path_factory.mktemp("cli") / "service.yaml"
    cfg.write_text("address: 127.0.0.1:1\nreaders: 1\nshuffle_rows: 16\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loader", "serve", "--config", str(cfg), "--address", "127.0.0.1:0",
         "--num-cpus", "2", "--shards", mnist_tar["train"][0], "--shards", mnist_tar["train"][1]],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lines: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"loader serve printed nothing within {START_TIMEOUT_S} s")
    assert line.startswith("listening on 127.0.0.1:"), line
    yield line.split()[-1], proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_served_process_answers_health_reflection_and_trains(served, mnist_tar):
    address, _ = served
    assert not address.endswith(":0") and not address.endswith(":1")
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "loader.v1.Loader"):
            # NOT_SERVING until every actor is up (a probe's view), then SERVING; Watch reports each.
            watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)
            statuses = []
            for reply in watch:
                statuses.append(reply.status)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    watch.cancel()
                    break
            assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING, statuses
            assert set(statuses) <= {health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING}
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert "loader.v1.Loader" in names and "grpc.health.v1.Health" in names
    with RemoteLoader(address, job="cli", batch_size=32, timeout_s=LOADER_TIMEOUT_S) as loader:
        assert sum(len(b) for b in epoch_ids(loader)) == rows_in(mnist_tar["train"][:2])


def test_stats_verb_prints_the_pool(served, mnist_tar):
    """After a full epoch every shard has been read: each is `ok`, with its rows counted."""
    address, _ = served
    shards = mnist_tar["train"][:2]
    with RemoteLoader(address, job="cli-stats", batch_size=64, timeout_s=LOADER_TIMEOUT_S) as loader:
        assert sum(len(b) for b in epoch_ids(loader)) == rows_in(shards)
    done = run_cli("stats", "--address", address)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    pool = sorted((s["uri"], s["state"], int(s["rows"])) for s in stats["shards"])
    assert pool == sorted((os.path.abspath(p), "ok", rows_in([p])) for p in shards), done.stdout
    assert "cli-stats" in {j["job"] for j in stats["jobs"]}


def test_train_reference_writes_weights_the_service_can_load(tmp_path, mnist_tar):
    from loader.scoring import ModelSpec, build_model

    cfg = tmp_path / "service.yaml"
    cfg.write_text("reference:\n  factory: loader.models:mlp\n  kwargs: {hidden: 32}\n")
    out = tmp_path / "ref.pt"
    done = run_cli("train-reference", "--config", str(cfg), "--holdout", mnist_tar["holdout"][0],
                   "--out", str(out), "--epochs", "3")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    model = build_model(ModelSpec("loader.models:mlp", kwargs=(("hidden", 32),), weights=str(out)))
    assert model[0].out_features == 32


def test_train_reference_without_reference_section_names_the_key(tmp_path, mnist_tar):
    cfg = tmp_path / "service.yaml"
    cfg.write_text("readers: 1\n")
    done = run_cli("train-reference", "--config", str(cfg), "--holdout", mnist_tar["holdout"][0], "--out", "x.pt")
    assert done.returncode == 2 and "config error: reference:" in done.stderr
