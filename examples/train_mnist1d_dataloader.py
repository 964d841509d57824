"""Train a small MLP on MNIST-1D shards: one script, two loaders.

    loader make-shards mnist1d --out data/mnist1d --shards 10
    .venv/bin/python examples/train_mnist1d_dataloader.py --data data/mnist1d

    loader serve --shards 'data/mnist1d/train-*.tar' --address 127.0.0.1:50051 &
    .venv/bin/python examples/train_mnist1d.py --data data/mnist1d --address 127.0.0.1:50051

What it shows: `train_mnist1d_dataloader.py` reads the train shards itself and shuffles them with a
`torch.utils.data.DataLoader`; `train_mnist1d.py` is the same script with batches streamed by the
loader service through `RemoteLoader` instead, curated by the `loss` policy (InfoBatch: samples
the model already fits well are pruned more often, from the per-sample losses the script reports).
Both print the accuracy on the test shards, read locally. Everything else is byte-identical:
`diff -u examples/train_mnist1d_dataloader.py examples/train_mnist1d.py` is the whole change.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm


def read_shards(pattern: str) -> list[dict]:
    """The samples of WebDataset tars (members KEY.x.npy and KEY.y.cls), as dicts of tensors."""
    samples: dict[str, dict] = {}
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, column, ext = member.name.rsplit(".", 2)
                data = tar.extractfile(member).read()
                value = np.load(io.BytesIO(data)) if ext == "npy" else np.int64(data)
                samples.setdefault(f"{path}/{key}", {})[column] = torch.as_tensor(value)
    if not samples:
        raise SystemExit(f"no samples in {pattern!r}: make them with `loader make-shards mnist1d`")
    return [{"x": s["x"], "y": s["y"]} for s in samples.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/mnist1d", help="folder of `loader make-shards mnist1d`")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(read_shards(os.path.join(args.data, "train-*.tar")), batch_size=args.batch_size, shuffle=True)
    for epoch in range(args.epochs):
        total, samples = 0.0, 0
        for batch in tqdm(loader, desc=f"epoch {epoch}", leave=False):
            losses = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
            optimizer.zero_grad()
            losses.mean().backward()
            optimizer.step()
            total, samples = total + losses.sum().item(), samples + len(losses)
        print(f"epoch {epoch}: {samples} samples, mean loss {total / max(samples, 1):.3f}")

    test = DataLoader(read_shards(os.path.join(args.data, "test-*.tar")), batch_size=1024)
    model.eval()
    with torch.no_grad():
        correct = sum((model(b["x"]).argmax(1) == b["y"]).sum().item() for b in test)
    print(f"test accuracy {correct / len(test.dataset):.3f}")


if __name__ == "__main__":
    main()
