"""Built-in model factories and the body/head split that scoring relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loader import models
from loader.scoring import split_head


@pytest.mark.parametrize(
    ("factory", "kwargs", "shape"),
    [
        (models.mlp, {}, (5, 40)),
        (models.mlp, {"in_features": 7, "classes": 3, "depth": 1}, (5, 7)),
        (models.cnn1d, {}, (5, 40)),
        (models.cnn1d, {"length": 3, "classes": 4, "width": 8}, (5, 3)),
        (models.cnn1d, {"length": 41}, (5, 41)),
        (models.cnn, {}, (5, 3, 32, 32)),
        (models.cnn, {"in_channels": 1, "classes": 2, "width": 8}, (5, 1, 28, 28)),
        (models.cnn, {"in_channels": 1}, (5, 1, 3, 5)),
    ],
)
def test_factory_builds_sequential_with_linear_head(factory, kwargs, shape):
    model = factory(**kwargs)
    assert isinstance(model, nn.Sequential)
    assert isinstance(model[-1], nn.Linear)
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], kwargs.get("classes", 10))
    assert model[-1].out_features == kwargs.get("classes", 10)


@pytest.mark.parametrize(
    ("factory", "shape"), [(models.mlp, (4, 40)), (models.cnn1d, (4, 40)), (models.cnn, (4, 3, 16, 16))]
)
def test_embedding_is_what_the_head_takes(factory, shape):
    model = factory()
    body, head = split_head(model)
    x = torch.randn(*shape)
    embedding = body(x)
    assert embedding.ndim == 2 and embedding.shape[1] == head.in_features
    torch.testing.assert_close(head(embedding), model(x))


def test_cnn1d_rejects_empty_signal():
    with pytest.raises(ValueError, match="length"):
        models.cnn1d(length=0)


def test_split_head_sequential_shares_modules():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    body, head = split_head(model)
    assert head is model[2]
    assert list(body) == [model[0], model[1]]


class _BodyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_split_head_body_head_module():
    model = _BodyHead()
    assert split_head(model) == (model.body, model.head)


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize("model", [_Opaque(), nn.Sequential(nn.Linear(4, 3)), nn.Linear(4, 3)])
def test_split_head_refuses_models_without_a_head(model):
    with pytest.raises(ValueError, match="head"):
        split_head(model)


def test_accuracy_restores_training_mode():
    model = models.mlp(in_features=2, hidden=4, classes=2, depth=1)
    with torch.no_grad():
        model[-1].weight.zero_()
        model[-1].bias.copy_(torch.tensor([0.0, 1.0]))
    assert models.accuracy(model, torch.randn(4, 2), torch.tensor([1, 1, 0, 1])) == 0.75
    assert model.training
