"""Small built-in models: the demo's trainer and reference models.

Every factory returns an `nn.Sequential` whose last module is the `nn.Linear` classification
head, so `loader.scoring.split_head` can take the penultimate activations as the embedding
that clustering and the diversity memory work on.
"""

from __future__ import annotations

import math

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


def cnn1d(length: int = 40, classes: int = 10, width: int = 32, hidden: int = 128) -> nn.Sequential:
    """For vector samples (N, L) such as MNIST-1D.

    Convolutions see the signal as a sequence: MNIST-1D's digits are shifted and scaled
    templates, which weight sharing handles far better than an MLP's fixed positions.
    """
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    # ceil_mode keeps a partial window, so any length (even 1) leaves at least one position.
    pooled = math.ceil(math.ceil(length / 2) / 2)
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, width, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(width, width, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2, ceil_mode=True),
        nn.Conv1d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool1d(2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(width * pooled, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def cnn(in_channels: int = 3, classes: int = 10, width: int = 32, hidden: int = 128) -> nn.Sequential:
    """For small float images (N, C, H, W) of any size; uint8 pixels are scaled by the caller."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        # A fixed 2x2 grid makes the head independent of the image size while keeping
        # a little layout (global pooling would throw all of it away).
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 4, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return correct
