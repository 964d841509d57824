"""The training examples run as a user runs them: a child process each (torchrun for DDP), against
a real service (local Ray, gRPC on 127.0.0.1, a bearer token) on small MNIST-1D shards."""

from __future__ import annotations

import difflib
import glob
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TORCHRUN = str(pathlib.Path(sys.executable).with_name("torchrun"))
TOKEN = "examples-token-7f3a"
# Every child process is killed past this (a hang fails the test instead of stalling the suite).
CHILD_S = 240
# What "a handful of lines" means for the DataLoader -> RemoteLoader diff.
MAX_CHANGED_LINES = 10
TRAIN_ROWS = 1280  # 2,000 samples: 80 % train split, 80 % of that train, 20 % holdout
EPOCHS, BATCH, WORLD = 2, 64, 2
STEPS = EPOCHS * TRAIN_ROWS // (BATCH * WORLD)  # 20 per rank: 10 a epoch
STOP_AFTER = 13  # mid second epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from loader.datasets import make_shards

    out = tmp_path_factory.mktemp("mnist1d")
    make_shards(str(out), shards=4, samples=2000, fmt="tar", progress=False)
    return str(out)


@pytest.fixture(scope="module")
def service(serve, data, tmp_path_factory):
    token = tmp_path_factory.mktemp("secret") / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    running = serve(sorted(glob.glob(os.path.join(data, "train-*.tar"))), token_file=str(token))
    return running.address, str(token)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADER_", "RANK", "WORLD_SIZE", "MASTER_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=CHILD_S, cwd=ROOT, env=env)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def run_together(runs: list[tuple[list[str], dict[str, str]]]) -> list[str]:
    """Starts every process at once (ranks of one job), waits for all, each for at most CHILD_S."""
    pipe = subprocess.PIPE
    procs = [subprocess.Popen(a, stdout=pipe, stderr=pipe, text=True, cwd=ROOT, env=e) for a, e in runs]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=CHILD_S)
            assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def accuracy(stdout: str) -> float:
    found = re.findall(r"^test accuracy (\d\.\d+)$", stdout, re.M)
    assert len(found) == 1, stdout
    return float(found[0])


def epoch_samples(stdout: str) -> list[int]:
    return [int(n) for n in re.findall(r"^epoch \d+: (?:step \d+, )?(\d+) samples", stdout, re.M)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(folder: pathlib.Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"rank-{rank}.pt")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_remote_loader_script_is_the_dataloader_script_but_a_handful_of_lines():
    plain = (EXAMPLES / "train_mnist1d_dataloader.py").read_text().splitlines()
    remote = (EXAMPLES / "train_mnist1d.py").read_text().splitlines()
    diff = list(difflib.unified_diff(plain, remote, lineterm=""))
    changed = [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert 0 < len(changed) <= MAX_CHANGED_LINES, "\n".join(diff)
    assert "+from loader import RemoteLoader" in changed
    assert not any("loader" in line for line in plain if "import" in line), "the plain script imports loader"


def test_the_dataloader_script_trains_above_chance(data):
    script = [sys.executable, str(EXAMPLES / "train_mnist1d_dataloader.py"), "--data", data, "--epochs", "3"]
    out = run(script, child_env())
    assert epoch_samples(out) == [TRAIN_ROWS] * 3, out  # the whole train split every epoch
    assert accuracy(out) > 0.2, out  # ten classes: chance is 0.1


def test_the_remote_loader_script_trains_above_chance_on_curated_batches(service, data):
    address, _ = service
    script = [sys.executable, str(EXAMPLES / "train_mnist1d.py"), "--data", data, "--epochs", "3", "--address", address]
    out = run(script, child_env(LOADER_TOKEN=TOKEN))
    # The `loss` policy keeps 3/4 of each super-batch: every epoch is a curated subset of the split.
    served = epoch_samples(out)
    assert len(served) == 3 and all(0 < n < TRAIN_ROWS for n in served), out
    assert accuracy(out) > 0.2, out


def test_ddp_ranks_end_equal_and_a_resumed_run_ends_as_one_never_stopped(service, tmp_path):
    address, _ = service
    ddp = [TORCHRUN, "--standalone", "--nproc-per-node", str(WORLD), str(EXAMPLES / "ddp.py"), "--address", address,
           "--epochs", str(EPOCHS), "--batch-size", str(BATCH)]  # fmt: skip
    env = child_env(LOADER_TOKEN=TOKEN)
    full = run(ddp + ["--job", "ddp-full", "--save-final", str(tmp_path / "full")], env)
    ckpt = str(tmp_path / "ckpt")
    cut_job = ["--job", "ddp-cut", "--checkpoint-dir", ckpt]
    cut = run(ddp + cut_job + ["--checkpoint-every", "4", "--stop-after", str(STOP_AFTER)], env)
    resumed = run(ddp + cut_job + ["--resume", ckpt, "--save-final", str(tmp_path / "resumed")], env)

    assert f"resumed at step {STOP_AFTER}, epoch 1 batch {STOP_AFTER - STEPS // EPOCHS}" in resumed, resumed
    for out, step in ((full, STEPS), (cut, STOP_AFTER), (resumed, STEPS)):
        # Not anchored to lines: the two ranks share stdout and their lines may run together.
        digests = set(re.findall(rf"rank [01]: step {step}, weights ([0-9a-f]{{16}})", out))
        assert len(digests) == 1 and len(re.findall(r"rank [01]: step", out)) == WORLD, out
    # The second epoch, split by the stop: every sample once, none lost or repeated in between.
    assert epoch_samples(full) == [TRAIN_ROWS] * EPOCHS, full
    assert epoch_samples(cut)[1] + epoch_samples(resumed)[0] == TRAIN_ROWS, (cut, resumed)
    full_0, resumed_0 = weights(tmp_path / "full", 0), weights(tmp_path / "resumed", 0)
    assert same(full_0, weights(tmp_path / "full", 1)), "the DDP ranks of the full run ended apart"
    assert same(resumed_0, weights(tmp_path / "resumed", 1)), "the DDP ranks of the resumed run ended apart"
    # Same seed under `uniform`: the same batches, so the same weights, to the bit.
    assert same(full_0, resumed_0), "stopped and resumed, the run ended with other weights"


def test_the_k8s_trainer_runs_as_an_indexed_job_and_a_restarted_pod_resumes(service, tmp_path):
    address, token_file = service

    def pods(epochs: int) -> list[str]:
        port = free_port()
        script = [sys.executable, str(EXAMPLES / "k8s_trainer.py"), "--epochs", str(epochs), "--batch-size", str(BATCH)]
        pod = {"LOADER_ADDRESS": address, "LOADER_TOKEN_FILE": token_file, "LOADER_JOB": "k8s",
               "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "CHECKPOINT_DIR": str(tmp_path / "ckpt")}  # fmt: skip
        envs = [child_env(**pod, JOB_COMPLETION_INDEX=str(rank)) for rank in range(WORLD)]
        return run_together([(script, env) for env in envs])

    first = pods(epochs=1)
    assert [len(re.findall(r"^rank \d epoch 0: step 10, 640 samples", out, re.M)) for out in first] == [1, 1], first
    # The Job's pods start again, asked for one more epoch: they go on from their checkpoints.
    second = pods(epochs=2)
    for rank, out in enumerate(second):
        assert f"rank {rank}: resumed from " in out and "at step 10, epoch 1" in out, out
        assert re.search(rf"^rank {rank} epoch 1: step 20, 640 samples", out, re.M), out
        assert "epoch 0:" not in out, out
    digests = {re.search(r"done at step 20, weights (\w+)", out).group(1) for out in second}
    assert len(digests) == 1, second
