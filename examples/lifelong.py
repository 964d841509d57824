"""A lifelong pool: MNIST-1D arrives in 5 stages of 2 classes each while one trainer streams.

    .venv/bin/python examples/lifelong.py            # a few minutes on a laptop CPU
    .venv/bin/python examples/lifelong.py --steps 300 --budget 1500

What it shows, with the public pieces only:
- `loader serve` (a child process on a local Ray) over the first stage's shards, with a pool
  budget (`max_samples`) that compares the inputs themselves (`columns.embedding: x`): no
  reference model, since one trained on the first stage knows nothing of the later ones;
- one `RemoteLoader(..., stream=True)` loop that never restarts, curated by learnability
  against the learner's own best loss (`irreducible_loss: learner_best`); it reports losses,
  and at each stage the next stage's shards join with `add_shards` (what `loader add-shards`
  does), so the trainer sees the new classes within a few batches;
- after each stage, the test accuracy on every task seen so far, and what the budget kept.

`--policy uniform` gives the same stream uncurated. How both compare with continual-learning
baselines is in BENCHMARKS.md ("Lifelong pools"): curation does not win there yet.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from loader import RemoteLoader
from loader.client.admin import add_shards, fetch_stats
from loader.demo import ServiceProcess
from loader.models import mlp
from loader.sources.writers import write_parquet

STAGES = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def mnist1d(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset  # never get_dataset: it downloads

    args = get_dataset_args()
    args.num_samples, args.seed = samples, seed
    data = make_dataset(args)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    return x, np.concatenate([data["y"], data["y_test"]]).astype(np.int64)


def write_stages(out: str, label_noise: float, seed: int) -> tuple[list[list[str]], list]:
    """Per stage: train shards (labels partly corrupted) and a clean test split."""
    x, y = mnist1d(8000, seed)
    rng = np.random.default_rng(seed)
    stages, tests = [], []
    for s, classes in enumerate(STAGES):
        rows = rng.permutation(np.flatnonzero(np.isin(y, classes)))
        test, train = rows[:200], rows[200:]
        labels = y[train].copy()
        flip = rng.random(len(train)) < label_noise
        labels[flip] = rng.integers(0, 10, flip.sum())
        paths = []
        for part, chunk in enumerate(np.array_split(np.arange(len(train)), 2)):
            paths.append(os.path.join(out, f"stage{s}-{part}.parquet"))
            write_parquet(paths[-1], {"x": x[train][chunk], "y": labels[chunk]})
        stages.append(paths)
        tests.append((torch.from_numpy(x[test]), torch.from_numpy(y[test])))
    return stages, tests


@torch.no_grad()
def accuracy(model: torch.nn.Module, split) -> float:
    model.eval()
    x, y = split
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="trainer steps per stage")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", type=int, default=1200, help="max_samples of the pool")
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default="learnability+bandit+diversity")
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="loader-lifelong-")
    stages, tests = write_stages(out, args.label_noise, args.seed)
    config = os.path.join(out, "service.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"shards": stages[0], "address": "127.0.0.1:0", "max_samples": args.budget,
                        "shuffle_rows": 256, "columns": {"input": "x", "label": "y", "embedding": "x"}}, f)  # fmt: skip
    service = ServiceProcess(["--config", config], log_path=os.path.join(out, "serve.log"))
    torch.manual_seed(args.seed)
    model = mlp()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    try:
        loader = RemoteLoader(service.address, job="lifelong", batch_size=args.batch_size, stream=True,
                              policy=args.policy,
                              options={"keep_ratio": 0.5, "irreducible_loss": "learner_best"} if args.policy != "uniform" else {},
                              max_steps=args.steps * len(STAGES))  # fmt: skip
        batches = iter(loader)
        for s in range(len(STAGES)):
            if s:
                joined = add_shards(service.address, stages[s])
                print(f"stage {s}: " + ", ".join(f"shard {j.index} {j.state}" for j in joined))
            new = 0
            for _ in tqdm(range(args.steps), desc=f"stage {s} classes {STAGES[s]}", leave=False):
                batch = next(batches)
                new += int(np.isin(batch["y"].numpy(), STAGES[s]).sum())
                losses = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
                optimiser.zero_grad()
                (losses * batch["_weight"]).mean().backward()
                optimiser.step()
                loader.report(batch, losses)
            seen = [accuracy(model, tests[t]) for t in range(s + 1)]
            budget = fetch_stats(service.address).budget
            print(f"stage {s}: {new / (args.steps * args.batch_size):.0%} of the samples served had its classes")
            print(f"after stage {s}: accuracy per task {' '.join(f'{a:.2f}' for a in seen)}, "
                  f"average {np.mean(seen):.3f}; pool {budget.kept_samples}/{budget.max_samples}, pruned "
                  f"{budget.pruned_near_duplicate} near-duplicates and {budget.pruned_low_value} others")  # fmt: skip
        loader.close()
    finally:
        service.stop()


if __name__ == "__main__":
    main()
