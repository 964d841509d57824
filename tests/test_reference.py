"""Training the reference model on clean holdout shards."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from loader.datasets import make_shards
from loader.errors import ConfigError
from loader.reference import train_reference
from loader.scoring import ModelSpec, build_model, inputs_from_table, learner_losses
from loader.sources import read_shard

SPEC = ModelSpec("loader.models:mlp", kwargs=(("depth", 1), ("hidden", 64)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("mnist1d"), shards=2, samples=600, progress=False)


def test_train_reference_writes_a_loadable_model(shards, tmp_path):
    out = tmp_path / "models" / "ref.pt"
    result = train_reference(SPEC, shards["holdout"], str(out), epochs=60, progress=False)
    assert set(result) == {"samples", "final_loss", "holdout_accuracy", "seconds"}
    holdout = [read_shard(p) for p in shards["holdout"]]
    assert result["samples"] == sum(t.num_rows for t in holdout)
    assert result["holdout_accuracy"] > 0.3  # chance is 0.1
    assert result["seconds"] > 0
    assert [p for p in os.listdir(out.parent) if p != "ref.pt"] == []  # no temp file left

    model = build_model(ModelSpec(SPEC.factory, SPEC.kwargs, weights=str(out)))
    x, y = inputs_from_table(holdout[0])
    losses = learner_losses(model, x, y)
    assert np.isclose(losses.mean(), result["final_loss"], rtol=1e-4)
    assert result["final_loss"] < np.log(10)


def test_train_reference_is_deterministic_and_leaves_the_callers_rng(shards, tmp_path):
    torch.manual_seed(123)
    state_before = torch.get_rng_state()
    first = train_reference(SPEC, shards["holdout"], str(tmp_path / "a.pt"), epochs=2, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), state_before)
    second = train_reference(SPEC, shards["holdout"], str(tmp_path / "b.pt"), epochs=2, seed=7, progress=False)
    other = train_reference(SPEC, shards["holdout"], str(tmp_path / "c.pt"), epochs=2, seed=8, progress=False)
    a, b, c = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in "abc")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not all(torch.equal(a[name], c[name]) for name in a)
    assert first["final_loss"] == second["final_loss"] != other["final_loss"]


def test_train_reference_accepts_patterns(shards, tmp_path):
    pattern = os.path.join(os.path.dirname(shards["holdout"][0]), "holdout-*.tar")
    result = train_reference(SPEC, [pattern], str(tmp_path / "ref.pt"), epochs=1, progress=False)
    assert result["samples"] == sum(read_shard(p).num_rows for p in shards["holdout"])


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"label_col": "nope"}, "holdout"),
    ],
)
def test_train_reference_rejects_bad_arguments(shards, tmp_path, changes, key):
    out = tmp_path / "ref.pt"
    with pytest.raises(ConfigError) as caught:
        train_reference(SPEC, shards["holdout"], str(out), progress=False, **changes)
    assert caught.value.key == key
    assert not out.exists()


def test_train_reference_rejects_labels_the_model_cannot_predict(shards, tmp_path):
    spec = ModelSpec("loader.models:mlp", kwargs=(("classes", 5),))
    with pytest.raises(ConfigError, match="model predicts classes 0..4"):
        train_reference(spec, shards["holdout"], str(tmp_path / "ref.pt"), epochs=1, progress=False)


def test_train_reference_no_matching_shards(tmp_path):
    with pytest.raises(ConfigError, match="no shards match") as caught:
        train_reference(SPEC, [str(tmp_path / "*.tar")], str(tmp_path / "ref.pt"), progress=False)
    assert caught.value.key == "holdout"
