"""Model specs, factory resolution, weight loading and batched per-sample scoring."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loader import models, tensors
from loader.errors import ConfigError
from loader.scoring import (
    ModelSpec,
    best_device,
    build_model,
    inputs_from_table,
    learner_losses,
    load_state_bytes,
    reference_scores,
    resolve_factory,
    split_head,
    state_bytes,
)

SMALL = {"factory": "loader.models:mlp", "kwargs": {"in_features": 6, "hidden": 8, "classes": 3, "depth": 1}}


def _spec(**changes) -> ModelSpec:
    return ModelSpec.from_mapping({**SMALL, **changes})


# --- ModelSpec -------------------------------------------------------------------------------


def test_spec_from_mapping_normalises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec.from_mapping(
        {"factory": " loader.models:mlp ", "kwargs": {"hidden": 8, "depth": 1, "sizes": [1, [2, 3]]}, "weights": "w.pt"}
    )
    assert spec.factory == "loader.models:mlp"
    assert spec.kwargs == (("depth", 1), ("hidden", 8), ("sizes", (1, (2, 3))))
    assert spec.kwargs_dict() == {"depth": 1, "hidden": 8, "sizes": (1, (2, 3))}
    assert spec.weights == str(tmp_path / "w.pt")
    reordered = ModelSpec.from_mapping(
        {"factory": "loader.models:mlp", "kwargs": {"sizes": [1, [2, 3]], "hidden": 8, "depth": 1}, "weights": "w.pt"}
    )
    assert hash(spec) == hash(reordered) and spec == reordered


def test_spec_defaults():
    spec = ModelSpec.from_mapping({"factory": "loader.models:cnn1d", "kwargs": None, "weights": None})
    assert spec == ModelSpec("loader.models:cnn1d")
    assert spec.kwargs_dict() == {}


@pytest.mark.parametrize(
    ("values", "key", "words"),
    [
        ({}, "reference.factory", "missing"),
        ({"factory": 3}, "reference.factory", "expected a string"),
        ({"factory": "loader.models"}, "reference.factory", "expected 'module:function'"),
        ({"factory": ":mlp"}, "reference.factory", "expected 'module:function'"),
        ({"factory": "loader.models:"}, "reference.factory", "expected 'module:function'"),
        ({"factory": "a:b:c"}, "reference.factory", "expected 'module:function'"),
        ({**SMALL, "kwargs": [1, 2]}, "reference.kwargs", "mapping"),
        ({**SMALL, "kwargs": {"not an identifier": 1}}, "reference.kwargs", "identifiers"),
        ({**SMALL, "kwargs": {"layers": {"a": 1}}}, "reference.kwargs.layers", "got dict"),
        ({**SMALL, "kwargs": {"layers": [1, {"a": 1}]}}, "reference.kwargs.layers[1]", "got dict"),
        ({**SMALL, "weights": ""}, "reference.weights", "path"),
        ({**SMALL, "weights": 5}, "reference.weights", "path"),
        ({**SMALL, "wieghts": "w.pt"}, "reference.wieghts", "unknown key; known keys: factory, kwargs, weights"),
    ],
)
def test_spec_errors_name_the_key(values, key, words):
    with pytest.raises(ConfigError) as caught:
        ModelSpec.from_mapping(values)
    assert caught.value.key == key
    assert words in caught.value.problem


def test_spec_error_uses_the_given_key_and_refuses_non_mappings():
    with pytest.raises(ConfigError) as caught:
        ModelSpec.from_mapping({"factory": "nope"}, key="learner")
    assert caught.value.key == "learner.factory"
    with pytest.raises(ConfigError) as caught:
        ModelSpec.from_mapping("loader.models:mlp")
    assert caught.value.key == "reference" and "mapping" in caught.value.problem


# --- resolve_factory -------------------------------------------------------------------------


@pytest.fixture
def project_dir(tmp_path, monkeypatch):
    """tmp_path as the working directory of a service, with sys.path and sys.modules restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("user_"):
            del sys.modules[name]


def test_resolve_factory_imports_from_working_directory(project_dir):
    (project_dir / "user_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def tiny(classes=2):
                return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, classes))

            class Zoo:
                @staticmethod
                def build():
                    return tiny(5)
            """
        )
    )
    assert str(project_dir) not in sys.path
    factory = resolve_factory("user_models:tiny")
    assert str(project_dir) in sys.path
    assert factory(classes=3)(torch.zeros(1, 3)).shape == (1, 3)
    assert resolve_factory("user_models:Zoo.build")()[-1].out_features == 5
    model = build_model(ModelSpec("user_models:tiny", kwargs=(("classes", 7),)))
    assert model[-1].out_features == 7 and not model.training


def test_resolve_factory_missing_module_message(project_dir):
    with pytest.raises(ConfigError) as caught:
        resolve_factory("user_foo:build")
    assert str(caught.value) == (
        "reference.factory: cannot import module 'user_foo' (searched the working directory and PYTHONPATH): "
        "No module named 'user_foo'"
    )


def test_resolve_factory_missing_attribute_message():
    with pytest.raises(ConfigError) as caught:
        resolve_factory("loader.models:nope", key="learner.factory")
    assert str(caught.value) == "learner.factory: module 'loader.models' has no attribute 'nope'"


def test_resolve_factory_bad_format_message():
    with pytest.raises(ConfigError) as caught:
        resolve_factory("x")
    assert str(caught.value) == "reference.factory: expected 'module:function', got 'x'"


def test_resolve_factory_reports_a_broken_dependency_not_a_missing_module(project_dir):
    (project_dir / "user_broken.py").write_text("import user_dependency_that_is_absent\n")
    with pytest.raises(ConfigError, match="importing module 'user_broken' failed: No module named 'user_dependency"):
        resolve_factory("user_broken:build")
    (project_dir / "user_syntax.py").write_text("def build(:\n")
    with pytest.raises(ConfigError, match="importing module 'user_syntax' failed: SyntaxError"):
        resolve_factory("user_syntax:build")


def test_resolve_factory_refuses_non_callables():
    with pytest.raises(ConfigError, match="not a callable"):
        resolve_factory("loader.models:__doc__")


# --- build_model -----------------------------------------------------------------------------


def test_build_model_loads_weights(tmp_path):
    torch.manual_seed(1)
    trained = build_model(_spec())
    path = tmp_path / "ref.pt"
    torch.save(trained.state_dict(), path)
    torch.manual_seed(2)
    fresh = build_model(_spec())
    assert not torch.equal(fresh[0].weight, trained[0].weight)
    loaded = build_model(_spec(weights=str(path)))
    assert not loaded.training
    for (name, expected), (_, actual) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


def test_build_model_rejects_weights_of_another_architecture(tmp_path):
    path = tmp_path / "cnn.pt"
    torch.save(models.cnn1d(length=6, classes=3, width=4).state_dict(), path)
    with pytest.raises(ConfigError) as caught:
        build_model(_spec(weights=str(path)))
    assert caught.value.key == "reference.weights"
    assert "does not fit" in caught.value.problem and "missing" in caught.value.problem

    path = tmp_path / "wider.pt"
    torch.save(models.mlp(in_features=6, hidden=9, classes=3, depth=1).state_dict(), path)
    with pytest.raises(ConfigError, match=r"0.weight has shape \(9, 6\), the model wants \(8, 6\)") as caught:
        build_model(_spec(weights=str(path)), key="learner")
    assert caught.value.key == "learner.weights"


def test_build_model_weight_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found") as caught:
        build_model(_spec(weights=str(tmp_path / "absent.pt")))
    assert caught.value.key == "reference.weights"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load") as caught:
        build_model(_spec(weights=str(garbage)))
    assert caught.value.key == "reference.weights"
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ConfigError, match="not a state_dict"):
        build_model(_spec(weights=str(listed)))


def test_build_model_bad_kwargs_and_non_module_factory():
    with pytest.raises(ConfigError, match="unexpected keyword") as caught:
        build_model(ModelSpec("loader.models:mlp", kwargs=(("colours", 3),)))
    assert caught.value.key == "reference.kwargs"
    with pytest.raises(ConfigError, match="not a torch.nn.Module") as caught:
        build_model(ModelSpec("loader.scoring:best_device"))
    assert caught.value.key == "reference.factory"


# --- scoring ---------------------------------------------------------------------------------


def _data(n: int = 23, features: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def test_reference_scores_match_direct_computation():
    torch.manual_seed(0)
    model = build_model(_spec())
    x, y = _data()
    losses, embeddings = reference_scores(model, x, y)
    body, _ = split_head(model)
    with torch.no_grad():
        expected_losses = F.cross_entropy(model(x), y, reduction="none").numpy()
        expected_embeddings = body(x).numpy()
    assert losses.dtype == np.float32 and losses.shape == (23,)
    assert embeddings.dtype == np.float32 and embeddings.shape == (23, 8)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embeddings, expected_embeddings, rtol=1e-5, atol=1e-6)

    small_losses, small_embeddings = reference_scores(model, x, y, batch_rows=7)
    np.testing.assert_allclose(small_losses, losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(small_embeddings, embeddings, rtol=1e-5, atol=1e-6)


def test_scoring_uses_eval_mode_and_restores_the_callers_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    x, y = _data()
    first, _ = reference_scores(model, x, y, batch_rows=5)
    second, _ = reference_scores(model, x, y)
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(learner_losses(model, x, y, batch_rows=4), first, rtol=1e-5, atol=1e-6)
    assert model.training


def test_learner_losses_match_for_any_classifier():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)  # no body/head split needed for learner losses
    x, y = _data()
    expected = F.cross_entropy(model(x), y, reduction="none").detach().numpy()
    for rows in (7, 4096):
        losses = learner_losses(model, x, y, batch_rows=rows)
        assert losses.dtype == np.float32 and losses.shape == (23,)
        np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)


def test_scoring_empty_input():
    model = build_model(_spec())
    losses, embeddings = reference_scores(model, torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64))
    assert losses.shape == (0,) and embeddings.shape == (0, 8)
    assert learner_losses(model, torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64)).shape == (0,)


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        (torch.tensor([0, 3, 1]), "label 3 out of range for a model with 3 classes"),
        (torch.tensor([0, -100, 1]), "non-negative"),
        (torch.tensor([0, 1]), "3 inputs but 2 labels"),
        (torch.tensor([[0], [1], [2]]), "1-d"),
    ],
)
def test_scoring_rejects_bad_labels(labels, words):
    model = build_model(_spec())
    with pytest.raises(ValueError, match=words):
        reference_scores(model, torch.zeros(3, 6), labels)
    with pytest.raises(ValueError, match=words):
        learner_losses(model, torch.zeros(3, 6), labels)


def test_scoring_rejects_bad_batch_rows():
    with pytest.raises(ValueError, match="batch_rows"):
        learner_losses(build_model(_spec()), *_data(), batch_rows=0)


# --- snapshot bytes --------------------------------------------------------------------------


def test_state_bytes_round_trip():
    torch.manual_seed(0)
    source = build_model(_spec())
    torch.manual_seed(1)
    target = build_model(_spec())
    x, y = _data()
    assert not np.allclose(learner_losses(source, x, y), learner_losses(target, x, y))
    load_state_bytes(target, state_bytes(source))
    np.testing.assert_array_equal(learner_losses(source, x, y), learner_losses(target, x, y))


def test_load_state_bytes_leaves_the_model_unchanged_on_error():
    target = build_model(_spec())
    before = {name: t.clone() for name, t in target.state_dict().items()}
    other = models.mlp(in_features=6, hidden=8, classes=4, depth=1)  # only the head differs
    with pytest.raises(ValueError, match=r"2.weight has shape \(4, 8\)"):
        load_state_bytes(target, state_bytes(other))
    with pytest.raises(ValueError, match="not a torch.save'd state_dict"):
        load_state_bytes(target, b"garbage")
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# --- tables ----------------------------------------------------------------------------------


def test_inputs_from_table_tensor_column_zero_copy():
    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    table = pa.table({"image": tensors.to_arrow(x), "label": pa.array(np.array([0, 1, 2, 1], np.int64))})
    inputs, labels = inputs_from_table(table, "image", "label")
    assert inputs.dtype == torch.float32 and inputs.shape == (4, 2, 3)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 1]
    np.testing.assert_array_equal(inputs.numpy(), x)
    assert np.shares_memory(inputs.numpy(), tensors.to_numpy(table.column("image")))
    assert np.shares_memory(labels.numpy(), tensors.to_numpy(table.column("label")))


def test_inputs_from_table_converts_dtypes():
    pixels = np.array([[0, 51], [255, 102]], np.uint8)
    table = pa.table({"x": tensors.to_arrow(pixels), "y": pa.array(np.array([1, 0], np.int32))})
    inputs, labels = inputs_from_table(table)
    assert inputs.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(inputs, torch.tensor([[0.0, 0.2], [1.0, 0.4]]))
    assert labels.tolist() == [1, 0]
    doubles = pa.table({"x": pa.array(np.array([1.5, 2.5])), "y": pa.array([0, 1])})
    assert inputs_from_table(doubles)[0].dtype == torch.float32


def test_inputs_from_table_missing_column():
    table = pa.table({"x": pa.array([1.0]), "label": pa.array([0])})
    with pytest.raises(KeyError, match=r"column 'y' not in table; it has \['x', 'label'\]"):
        inputs_from_table(table)
    with pytest.raises(KeyError, match="'image'"):
        inputs_from_table(table, input_col="image", label_col="label")


def test_best_device_is_usable_and_is_cuda_whenever_cuda_works():
    device = best_device()
    assert device in ("cpu", "cuda")
    # The device it names takes a tensor and computes on it.
    assert (torch.ones(3, device=device) * 2).sum().item() == 6
    if device == "cpu":
        # Chosen only when no CUDA device can be used at all: placing a tensor on one must fail
        # (AssertionError from a CPU-only build of torch, RuntimeError when no GPU is visible).
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")
    else:
        assert torch.zeros(1, device=device).device.type == "cuda"
