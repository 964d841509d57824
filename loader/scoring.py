"""Reference and learner models as the service sees them: built from a spec, scored in batches.

A reference model is any classifier whose output is `head(body(x))`: the per-sample
cross-entropy is its "irreducible loss" (RHO-LOSS), and `body(x)` is the embedding that
clustering and the diversity memory use. Nothing here knows about Ray or gRPC, so scorer
actors, the CLI and tests share the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from loader import tensors
from loader.errors import ConfigError
from loader.imports import resolve_import_path, split_import_path
from loader.sources.schema import type_name

_SPEC_KEYS = ("factory", "kwargs", "weights")
_SCALARS = (type(None), bool, int, float, str)


def _freeze(key: str, value: Any) -> Any:
    # The spec is hashable so that cached scores can be keyed by the model that made them;
    # YAML lists become tuples for that reason, and nested mappings have no frozen form that
    # would reach the factory unchanged, so they are refused.
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(f"{key}[{i}]", item) for i, item in enumerate(value))
    raise ConfigError(key, f"expected a number, string, boolean, null or list of those, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build a model: a factory, its keyword arguments, and optional saved weights."""

    # "module.path:function", resolved from the service's working directory and PYTHONPATH.
    factory: str
    # Sorted (name, value) pairs: hashable and independent of the order they were written in.
    kwargs: tuple[tuple[str, object], ...] = ()
    # A state_dict written with torch.save (absolute when parsed by from_mapping); None keeps
    # the factory's initialisation.
    weights: str | None = None

    def kwargs_dict(self) -> dict[str, object]:
        return dict(self.kwargs)

    @classmethod
    def from_mapping(cls, values: Mapping, key: str = "reference") -> ModelSpec:
        """Validates a config mapping; every error names the offending key under `key`."""
        if not isinstance(values, Mapping):
            raise ConfigError(
                key, f"expected a mapping with `factory` (and optional kwargs, weights), got {type(values).__name__}"
            )
        unknown = sorted(str(name) for name in values if name not in _SPEC_KEYS)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"unknown key; known keys: {', '.join(_SPEC_KEYS)}")
        if "factory" not in values:
            raise ConfigError(f"{key}.factory", "missing; expected 'module:function', e.g. 'loader.models:mlp'")
        factory = values["factory"]
        if not isinstance(factory, str):
            raise ConfigError(f"{key}.factory", f"expected a string 'module:function', got {type(factory).__name__}")
        try:
            split_import_path(factory)
        except ValueError as exc:
            raise ConfigError(f"{key}.factory", str(exc)) from None

        raw_kwargs = values.get("kwargs")
        if raw_kwargs is None:
            raw_kwargs = {}
        if not isinstance(raw_kwargs, Mapping):
            raise ConfigError(
                f"{key}.kwargs", f"expected a mapping of argument names to values, got {type(raw_kwargs).__name__}"
            )
        kwargs: list[tuple[str, object]] = []
        for name, value in raw_kwargs.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"{key}.kwargs", f"argument names must be identifiers, got {name!r}")
            kwargs.append((name, _freeze(f"{key}.kwargs.{name}", value)))

        weights = values.get("weights")
        if weights is not None and (not isinstance(weights, str) or not weights):
            raise ConfigError(f"{key}.weights", f"expected a path to a saved state_dict or null, got {weights!r}")
        if weights is not None:
            # Made absolute where the config is read: Ray workers on other nodes start in other
            # directories, and a relative path would silently mean a different file there.
            weights = os.path.abspath(os.path.expanduser(weights))
        return cls(factory=factory.strip(), kwargs=tuple(sorted(kwargs)), weights=weights)

    def fingerprint(self) -> str:
        """Changes when the model would: its factory, arguments, or weights file (size, mtime).
        Scores saved under one fingerprint are not reused under another."""
        weights = ""
        if self.weights is not None and os.path.exists(self.weights):
            stat = os.stat(self.weights)
            weights = f"{self.weights}:{stat.st_size}:{stat.st_mtime_ns}"
        return f"{self.factory}|{self.kwargs!r}|{weights}"


def resolve_factory(path: str, key: str = "reference.factory") -> Callable[..., nn.Module]:
    """The callable named by 'module:function' (the attribute may be dotted: 'module:Class.build')."""
    target = resolve_import_path(path, key)
    if not callable(target):
        raise ConfigError(key, f"{path!r} is a {type(target).__name__}, not a callable that builds a model")
    return target


def _mismatch(model: nn.Module, state: Mapping[str, Any]) -> str | None:
    """Why `state` does not fit `model`, checked up front so a failed load changes nothing
    (load_state_dict copies the tensors that fit before it raises about the rest)."""
    expected = model.state_dict()
    problems: list[str] = []
    missing = [name for name in expected if name not in state]
    unexpected = [str(name) for name in state if name not in expected]
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    for name, tensor in expected.items():
        if name not in state:
            continue
        value = state[name]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name} is a {type(value).__name__}, not a tensor")
        elif value.shape != tensor.shape:
            problems.append(f"{name} has shape {tuple(value.shape)}, the model wants {tuple(tensor.shape)}")
    return "; ".join(problems) or None


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def build_model(spec: ModelSpec, device: str | torch.device = "cpu", key: str = "reference") -> nn.Module:
    """The model in eval mode on `device`, with the spec's weights loaded when it names any."""
    factory = resolve_factory(spec.factory, f"{key}.factory")
    try:
        model = factory(**spec.kwargs_dict())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}.kwargs", f"{spec.factory}(**{spec.kwargs_dict()!r}) failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        kind = type(model).__name__
        raise ConfigError(f"{key}.factory", f"{spec.factory} returned a {kind}, not a torch.nn.Module")
    model = model.to(device)
    if spec.weights is not None:
        _load_weights(model, os.path.expanduser(spec.weights), device, f"{key}.weights")
    return model.eval()


def _load_weights(model: nn.Module, path: str, device: str | torch.device, key: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(key, f"file {path!r} not found")
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except Exception as exc:
        raise ConfigError(key, f"cannot load {path!r} as a state_dict: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ConfigError(key, f"{path!r} holds a {type(state).__name__}, not a state_dict (save model.state_dict())")
    problem = _mismatch(model, state)
    if problem:
        raise ConfigError(key, f"{path!r} does not fit the model the factory builds: {problem}")
    model.load_state_dict(state)


def state_bytes(model: nn.Module) -> bytes:
    """The model's state_dict as torch.save bytes (what a trainer pushes as a snapshot)."""
    # clone: torch.save writes a tensor's whole storage, so a view would drag its base along.
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_state_bytes(model: nn.Module, data: bytes) -> None:
    """Loads `state_bytes` output into `model`; on any error (ValueError) the model is unchanged."""
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location=device)
    except Exception as exc:
        raise ValueError(f"weights are not a torch.save'd state_dict: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"weights hold a {type(state).__name__}, not a state_dict")
    problem = _mismatch(model, state)
    if problem:
        raise ValueError(f"weights do not fit the model: {problem}")
    model.load_state_dict(state)


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, head) with model(x) == head(body(x)); body(x) is the sample's embedding."""
    if isinstance(model, nn.Sequential):
        if len(model) < 2:
            raise ValueError(f"a reference nn.Sequential needs a body and a head (2+ modules), got {len(model)}")
        return model[:-1], model[-1]
    body, head = getattr(model, "body", None), getattr(model, "head", None)
    if isinstance(body, nn.Module) and isinstance(head, nn.Module):
        return body, head
    raise ValueError(
        f"cannot find the embedding of a {type(model).__name__}: a reference model must be an nn.Sequential "
        "whose last module is the classification head, or a module with `body` and `head` submodules "
        "such that model(x) == head(body(x))"
    )


def check_model_column(schema: pa.Schema, name: str, key: str, label: bool = False) -> None:
    """Raises unless column `name` of `schema` can be a model's input (`label`: its labels):
    KeyError when it is missing, ConfigError (under `key`, e.g. "columns.input") naming the
    column and its type when a model cannot take it. Needs only the schema, so a service can
    check its pool before reading a row."""
    if name not in schema.names:
        raise KeyError(f"column {name!r} not in table; it has {schema.names}")
    type_ = schema.field(name).type
    problem = _unusable(type_, label)
    if problem:
        raise ConfigError(key, f"column {name!r} is {type_name(type_)}: {problem}")


def _column(table: pa.Table, name: str, key: str, label: bool = False) -> np.ndarray:
    check_model_column(table.schema, name, key, label)
    return tensors.to_numpy(table.column(name))


def _unusable(type_: pa.DataType, label: bool) -> str:
    """Why a column of `type_` cannot be a model's input (or label), or ''."""
    shape = tensors.row_shape(type_)
    if label:
        if shape == ():
            return ""
        return "labels must be one number (a class index) per row"
    if shape is not None:
        return ""
    kind = "a model input needs numbers of one shape per row (numbers, a fixed_size_list of numbers, or a fixed_shape_tensor)"
    if pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_binary(type_) \
            or pa.types.is_large_binary(type_) or pa.types.is_fixed_size_binary(type_):
        return f"text and bytes cannot be a model input; {kind}"
    if tensors.is_ragged(type_):
        return (f"its rows have different lengths (a variable-length list); {kind}. Store it as a "
                "fixed_size_list, each row padded or cut to one length, to use it as a model input")
    return kind


def _tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # Arrow memory is read-only and shared on purpose; nothing here writes to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def inputs_from_table(
    table: pa.Table, input_col: str = "x", label_col: str = "y"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 inputs, int64 labels), sharing Arrow's memory when the dtypes already match.

    Inputs are numbers, numeric fixed_size_lists (nested too) or fixed_shape_tensors, of shape
    (rows, *row shape); labels one number per row. A column of any other type (text, bytes,
    variable-length lists) is a ConfigError naming it and its type; a missing one a KeyError.

    uint8 inputs are taken as pixels and scaled to [0, 1]; models stay float-only so that a
    factory never has to guess what a shard stores.
    """
    x, y = _column(table, input_col, "columns.input"), _column(table, label_col, "columns.label", label=True)
    if x.dtype == np.uint8:
        inputs = _tensor(x).to(torch.float32).div_(255.0)
    else:
        inputs = _tensor(x if x.dtype == np.float32 else x.astype(np.float32))
    labels = _tensor(y if y.dtype == np.int64 else y.astype(np.int64))
    return inputs, labels


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    # Dropout and batch-norm statistics would make scores depend on the batch; the caller's
    # mode is restored because the learner a test or trainer passes in may be mid-training.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_batch(inputs: torch.Tensor, labels: torch.Tensor, batch_rows: int) -> int:
    """Validates the arguments; returns the largest label (-1 for none) to check against the classes."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be one class index per sample (1-d), got shape {tuple(labels.shape)}")
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
    # Checked on the host: a bad label on a GPU is a device-side assert that poisons the CUDA
    # context, and a negative one would match cross_entropy's ignore_index and score 0.
    if labels.numel() == 0:
        return -1
    low, high = torch.aminmax(labels)
    if int(low) < 0:
        raise ValueError(f"labels must be non-negative class indices, got {int(low)}")
    return int(high)


def _losses(logits: torch.Tensor, labels: torch.Tensor, max_label: int) -> torch.Tensor:
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits of shape (batch, classes), got {tuple(logits.shape)}")
    if max_label >= logits.shape[1]:
        raise ValueError(f"label {max_label} out of range for a model with {logits.shape[1]} classes")
    return F.cross_entropy(logits.float(), labels, reduction="none")


@torch.inference_mode()
def reference_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_rows: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample cross-entropy (float32 [n]) and embedding body(x) (float32 [n, d])."""
    max_label = _check_batch(inputs, labels, batch_rows)
    body, head = split_head(model)
    losses: list[torch.Tensor] = []
    embeddings: list[torch.Tensor] = []
    with _evaluating(model):
        # range(..., max(n, 1)) runs once on an empty input, which still tells us d.
        for start in range(0, max(len(inputs), 1), batch_rows):
            x = inputs[start : start + batch_rows].to(device, non_blocking=True)
            y = labels[start : start + batch_rows]
            embedding = body(x).flatten(1)
            losses.append(_losses(head(embedding), y.to(device, non_blocking=True), max_label))
            embeddings.append(embedding.float())
    # One transfer at the end keeps the GPU busy instead of syncing after every batch.
    return torch.cat(losses).cpu().numpy(), torch.cat(embeddings).cpu().numpy()


@torch.inference_mode()
def learner_losses(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_rows: int = 4096,
) -> np.ndarray:
    """Per-sample cross-entropy (float32 [n]) of any classifier, e.g. a pushed learner snapshot."""
    max_label = _check_batch(inputs, labels, batch_rows)
    if len(inputs) == 0:
        return np.zeros(0, np.float32)
    losses: list[torch.Tensor] = []
    with _evaluating(model):
        for start in range(0, len(inputs), batch_rows):
            x = inputs[start : start + batch_rows].to(device, non_blocking=True)
            y = labels[start : start + batch_rows].to(device, non_blocking=True)
            losses.append(_losses(model(x), y, max_label))
    return torch.cat(losses).cpu().numpy()


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
