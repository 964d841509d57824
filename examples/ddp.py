"""DistributedDataParallel on RemoteLoader: one loader per rank, checkpoints, and a resume.

    loader serve --shards 'data/mnist1d/train-*.tar' --address 127.0.0.1:50051 &
    torchrun --standalone --nproc-per-node 2 examples/ddp.py --address 127.0.0.1:50051 \\
        --checkpoint-dir ckpt --stop-after 30          # stops after step 30's checkpoint
    torchrun --standalone --nproc-per-node 2 examples/ddp.py --address 127.0.0.1:50051 \\
        --checkpoint-dir ckpt --resume ckpt            # goes on from there to the end

(`--standalone`: one machine, a free port on localhost. Across machines use torchrun's
`--nnodes`, `--rdzv-endpoint`, or MASTER_ADDR / MASTER_PORT.)

What it shows:
- gloo on CPU, rank and world size from torchrun's environment, `DistributedDataParallel`, and
  one `RemoteLoader(rank=..., world_size=...)` per rank on the same job: an epoch serves every
  sample once across the ranks and the same number of batches to each, so no rank is left waiting
  in an all-reduce for one that ran out;
- every `--checkpoint-every` steps (and at the end) each rank saves model + optimizer +
  `loader.state_dict()` to CKPT/rank-R.pt; the loader state is the rank's own place in the epoch;
- `--resume CKPT` loads them in new processes and the job goes on at the batch after the
  checkpoint, losing and repeating none: under `uniform` the batches are a function of the job's
  seed, so a run stopped and resumed ends with the very weights of a run never stopped.

`--stop-after N` ends the run right after step N's checkpoint, as a preemption would.
`--save-final DIR` writes each rank's final weights to DIR/rank-R.pt; the ranks' digests are
printed too, and DDP keeps them equal.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from loader import RemoteLoader
from loader.models import mlp


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a rank killed mid-save leaves the previous checkpoint whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the loader service")
    parser.add_argument("--job", default="ddp-mnist1d", help="the job all ranks share")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", help="save CKPT/rank-R.pt here")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--resume", metavar="CKPT", help="a --checkpoint-dir to go on from")
    parser.add_argument("--stop-after", type=int, help="stop after this step's checkpoint (a preemption)")
    parser.add_argument("--save-final", metavar="DIR", help="write each rank's final weights here")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from torchrun
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(mlp())  # rank 0's initial weights are broadcast to the others
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = RemoteLoader(args.address, job=args.job, batch_size=args.batch_size, rank=rank,
                          world_size=world_size, seed=args.seed)  # fmt: skip
    step = 0
    if args.resume:
        state = torch.load(os.path.join(args.resume, f"rank-{rank}.pt"))
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])  # this rank's epoch and next batch
        step = state["step"]
        steps = [None] * world_size
        dist.all_gather_object(steps, step)
        if len(set(steps)) != 1:
            raise SystemExit(f"{args.resume}: the ranks' checkpoints are of different steps {steps}")
        if rank == 0:
            print(f"resumed at step {step}, epoch {state['loader']['epoch']} batch {state['loader']['seq']}")

    def checkpoint() -> None:
        if args.checkpoint_dir:
            save(os.path.join(args.checkpoint_dir, f"rank-{rank}.pt"), {
                "model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                "loader": loader.state_dict(), "step": step,
            })  # fmt: skip

    stopped = False
    for epoch in range(loader.state_dict()["epoch"], args.epochs):
        # Mean loss over the epoch's samples on all ranks: a sum and a count, all-reduced.
        totals = torch.zeros(2, dtype=torch.float64)
        for batch in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=rank != 0):
            losses = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
            optimizer.zero_grad()
            losses.mean().backward()  # DDP averages the gradients across the ranks here
            optimizer.step()
            loader.report(batch, losses)
            totals += torch.tensor([losses.sum().item(), len(losses)], dtype=torch.float64)
            step += 1
            if step % args.checkpoint_every == 0 or step == args.stop_after:
                checkpoint()
            if step == args.stop_after:
                stopped = True
                break
        dist.all_reduce(totals)
        if rank == 0:
            samples, mean = int(totals[1]), totals[0].item() / max(totals[1].item(), 1)
            print(f"epoch {epoch}: step {step}, {samples} samples, mean loss {mean:.3f}")
        if stopped:
            print(f"rank {rank}: stopped after step {step}; go on with --resume {args.checkpoint_dir}")
            break
    else:
        checkpoint()
    if args.save_final and not stopped:
        save(os.path.join(args.save_final, f"rank-{rank}.pt"), model.module.state_dict())
    print(f"rank {rank}: step {step}, weights {digest(model.module)}")
    loader.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
