"""What the trainer Job in k8s/ runs: RemoteLoader against the loader Service, DDP over gloo when
the Job has several ranks, checkpoints on a volume, and a resume when a pod starts again.

    LOADER_ADDRESS=127.0.0.1:50051 .venv/bin/python examples/k8s_trainer.py --epochs 2

It needs only the client (`from loader import RemoteLoader`) and torch. Everything else comes
from the environment, as the Job's pod template sets it; flags override:
    LOADER_ADDRESS           the Service's gRPC address, e.g. loader-grpc:50051 (required)
    LOADER_TOKEN_FILE        the file holding the bearer token (the Secret, mounted); unset:
                             $LOADER_TOKEN, else no token
    LOADER_TLS_CA            PEM file of the CA that signed the service's certificate; unset: plaintext
    LOADER_JOB               the job name all ranks share (default mnist1d-k8s)
    RANK, WORLD_SIZE         torchrun-style; without RANK, JOB_COMPLETION_INDEX (an Indexed Job)
    MASTER_ADDR, MASTER_PORT rank 0's address for gloo, when WORLD_SIZE > 1
    CHECKPOINT_DIR           where each rank keeps rank-R.pt (model, optimizer, loader state)
A pod that starts with its checkpoint present goes on from it: the job resumes at the batch after
the checkpoint; a pod restarted after the last epoch finds nothing left to do and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from loader import RemoteLoader
from loader.client import TLS


def main() -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=env("LOADER_ADDRESS"))
    parser.add_argument("--job", default=env("LOADER_JOB", "mnist1d-k8s"))
    parser.add_argument("--checkpoint-dir", default=env("CHECKPOINT_DIR", "checkpoints"))
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    if not args.address:
        parser.error("set LOADER_ADDRESS (or --address) to the loader Service's HOST:PORT")

    rank = int(env("RANK", env("JOB_COMPLETION_INDEX", "0")))
    world_size = int(env("WORLD_SIZE", "1"))
    if world_size > 1:  # MASTER_ADDR and MASTER_PORT from the environment (env://)
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size)
    token_file = env("LOADER_TOKEN_FILE")
    token = open(token_file).read().strip() if token_file else None  # None: $LOADER_TOKEN
    tls = TLS(ca=env("LOADER_TLS_CA")) if env("LOADER_TLS_CA") else None
    loader = RemoteLoader(args.address, job=args.job, batch_size=args.batch_size, rank=rank,
                          world_size=world_size, token=token, tls=tls)  # fmt: skip

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = nn.parallel.DistributedDataParallel(net) if world_size > 1 else net
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    path, step = os.path.join(args.checkpoint_dir, f"rank-{rank}.pt"), 0
    if os.path.exists(path):
        state = torch.load(path)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        step = state["step"]
        print(f"rank {rank}: resumed from {path} at step {step}, epoch {state['loader']['epoch']}", flush=True)

    def checkpoint() -> None:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        torch.save({**state, "loader": loader.state_dict()}, path + ".tmp")
        os.replace(path + ".tmp", path)  # a pod killed mid-save keeps its previous checkpoint

    for epoch in range(loader.state_dict()["epoch"], args.epochs):
        total, samples = 0.0, 0
        for batch in loader:
            losses = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
            optimizer.zero_grad()
            (losses * batch["_weight"]).mean().backward()
            optimizer.step()
            loader.report(batch, losses)
            total, samples, step = total + losses.sum().item(), samples + len(losses), step + 1
            if step % args.checkpoint_every == 0:
                checkpoint()
        checkpoint()
        mean = total / max(samples, 1)
        print(f"rank {rank} epoch {epoch}: step {step}, {samples} samples, mean loss {mean:.3f}", flush=True)

    weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in net.state_dict().values())).hexdigest()[:16]
    print(f"rank {rank}: done at step {step}, weights {weights}", flush=True)
    loader.close()
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
