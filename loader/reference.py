"""Train the reference model (RHO-LOSS's "irreducible loss model") on clean holdout shards.

Its per-sample loss on training data estimates how hard a sample stays even for a model that
never saw it; learnability = learner loss - reference loss then prefers samples that are
learnable, not noisy or already learnt.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from loader.errors import ConfigError
from loader.files import atomic_file
from loader.scoring import ModelSpec, build_model, inputs_from_table, reference_scores, split_head
from loader.sources import expand, read_shard


def _load_holdout(holdout: list[str], input_col: str, label_col: str) -> tuple[torch.Tensor, torch.Tensor]:
    paths = expand(holdout)
    if not paths:
        raise ConfigError("holdout", f"no shards match {holdout!r}")
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for path in paths:
        table = read_shard(path)
        try:
            x, y = inputs_from_table(table, input_col, label_col)
        except KeyError as exc:
            raise ConfigError("holdout", f"{path}: {exc.args[0]}") from exc
        except ConfigError as exc:  # a column of a type the model cannot take: say which shard
            raise ConfigError(exc.key, f"{exc.problem} (in holdout shard {path})") from exc
        xs.append(x)
        ys.append(y)
    # cat copies, which also detaches the tensors from Arrow's read-only buffers.
    return torch.cat(xs), torch.cat(ys)


def _check_labels(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: str) -> None:
    with torch.inference_mode():
        classes = model(inputs[:1].to(device)).shape[1]
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise ConfigError("holdout", f"labels span {low}..{high}, but the model predicts classes 0..{classes - 1}")


def _check(epochs: int, lr: float, batch_size: int) -> None:
    if epochs < 1:
        raise ConfigError("epochs", f"must be at least 1, got {epochs}")
    if not 0 < lr < float("inf"):
        raise ConfigError("lr", f"must be a positive finite number, got {lr}")
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be at least 1, got {batch_size}")


def train_reference(
    spec: ModelSpec,
    holdout: list[str],
    out: str,
    input_col: str = "x",
    label_col: str = "y",
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Trains `spec`'s model with Adam on the holdout shards (paths or patterns), saves its
    state_dict to `out`, and returns samples, final_loss (mean eval-mode cross-entropy on the
    holdout), holdout_accuracy and seconds.

    The same seed gives the same weights on CPU; the caller's torch random state is left as it
    was. `spec.weights`, when set, is the starting point (fine-tuning).
    """
    _check(epochs, lr, batch_size)
    started = time.perf_counter()
    inputs, labels = _load_holdout(holdout, input_col, label_col)
    n = len(inputs)
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = build_model(spec, device, key="reference")
        # Fail before training, not after it, if the scorer could not take an embedding.
        split_head(model)
        _check_labels(model, inputs, labels, device)
        order = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        x_all, y_all = inputs.to(device), labels.to(device)
        model.train()
        with tqdm(range(epochs), desc="reference", unit="epoch", disable=not progress) as bar:
            for _ in bar:
                # Summed on the device: reading loss.item() every step would sync a GPU each time.
                total = torch.zeros((), device=device)
                for batch in torch.randperm(n, generator=order).split(batch_size):
                    batch = batch.to(device)
                    loss = F.cross_entropy(model(x_all[batch]), y_all[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.detach() * len(batch)
                bar.set_postfix(loss=f"{total.item() / n:.4f}")
    model.eval()
    losses, _ = reference_scores(model, inputs, labels, device=device)
    with torch.inference_mode():
        predictions = torch.cat([model(x.to(device)).argmax(1).cpu() for x in inputs.split(4096)])
    # A reader (a service starting up, a second run) sees the old file or the new one, never a
    # half-written state_dict.
    with atomic_file(out) as temp:
        torch.save({name: t.detach().cpu().clone() for name, t in model.state_dict().items()}, temp)
    return {
        "samples": n,
        "final_loss": float(losses.mean()),
        "holdout_accuracy": float((predictions == labels).float().mean()),
        "seconds": time.perf_counter() - started,
    }
