"""Small built-in models: the demo's trainer and, later, reference models."""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_features: int = 40, hidden: int = 256, classes: int = 10, depth: int = 2) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return correct
