"""Selection options of a job, and the batch arithmetic that follows from the keep ratio.

Options arrive from YAML (native types) or from a trainer's Hello (`map<string,string>`, so every
value is a string); both go through `parse_options`, which checks everything here so that the
selection code can trust its inputs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Annotated, Literal

from annotated_types import Interval
from pydantic import AfterValidator, BeforeValidator, ConfigDict, TypeAdapter, ValidationError

from loader.errors import ConfigError
from loader.selection.selectors import SELECTORS

__all__ = ["SelectionOptions", "keep_count", "parse_options", "split_policy", "super_batch_size"]

LEARNER_LOSSES = ("feedback", "snapshot")
IRREDUCIBLE_LOSSES = ("reference", "learner_best")
BANDIT_NAMES = ("none", "exp3", "ucb")
_SELECTOR_NAMES = tuple(sorted(SELECTORS))
# "package.module:factory", the factory possibly a dotted attribute path (Class.create).
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _number(value: object) -> object:
    # Hello sends numbers as text, so parse it here ("1e3" too, which pydantic's int refuses).
    # bool is an int to Python, but `keep_ratio: true` is a mistake, not 1.0.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected a number, got {value!r}")


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value.strip()


def _import_path(path: str) -> str:
    # Only the form: importing would run the trainer's code inside the config parser.
    if path and not _IMPORT_PATH.match(path):
        raise ValueError(f'expected an import path "module:function", got {path!r}')
    return path


def _json_object(value: object) -> str:
    if isinstance(value, Mapping):
        try:
            return json.dumps(dict(value), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot be written as JSON: {exc}") from None
    text = _text(value)
    try:
        parsed = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return text or "{}"


_NUMBER = BeforeValidator(_number)
_TEXT = BeforeValidator(_text)


@dataclasses.dataclass(frozen=True)
class SelectionOptions:
    """Each option's type, bounds and default. The bounds are checked by `parse_options` (pydantic
    reads the annotations), not by the constructor: code that builds options itself is trusted,
    as are options restored from a job's saved spec."""

    # allow_inf_nan: no option has a use for NaN or infinity, and NaN slips through every bound.
    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)

    # ρ: a batch of B is chosen from a super-batch of round(B/ρ).
    keep_ratio: Annotated[float, _NUMBER, Interval(gt=0, le=1)] = 0.2
    selector: Annotated[Literal[_SELECTOR_NAMES], _TEXT] = "topk"
    beta: Annotated[float, _NUMBER, Interval(ge=0)] = 1.0  # coldness of stochastic selectors; 0 = uniform
    learner_loss: Annotated[Literal[LEARNER_LOSSES], _TEXT] = "feedback"
    prune_ratio: Annotated[float, _NUMBER, Interval(ge=0, lt=1)] = 0.5  # InfoBatch (policy `loss`)
    # InfoBatch: from this fraction of total epochs on, no pruning.
    anneal_fraction: Annotated[float, _NUMBER, Interval(gt=0, le=1)] = 0.875
    # Snapshot mode: import path "module:factory" of the learner, and a JSON object of kwargs for
    # that factory (YAML may give a mapping; it is kept as canonical JSON).
    learner: Annotated[str, _TEXT, AfterValidator(_import_path)] = ""
    learner_kwargs: Annotated[str, BeforeValidator(_json_object)] = "{}"
    # Cluster bandit composing super-batches by cluster quota: "none", "exp3" or "ucb".
    bandit: Annotated[Literal[BANDIT_NAMES], _TEXT] = "none"
    gamma: Annotated[float, _NUMBER, Interval(ge=0, le=1)] = 0.1  # bandit exploration: each arm keeps >= gamma / K
    eta: Annotated[float, _NUMBER, Interval(ge=0)] = 4.0  # bandit learning rate on rewards normalised to [-1, 1]
    max_clusters: Annotated[int, _NUMBER, Interval(ge=1)] = 32
    # Diversity: scores lowered by lam * max cosine similarity to the memory and the batch so far.
    diversity: Annotated[float, _NUMBER, Interval(ge=0)] = 0.0
    memory_size: Annotated[int, _NUMBER, Interval(ge=1)] = 1024  # embeddings of recently served samples (FIFO)
    chunk: Annotated[int, _NUMBER, Interval(ge=1)] = 32  # joint selection picks this many at a time, re-scoring between
    # What learnability subtracts from the learner's loss: "reference", the reference model's loss
    # (RHO-LOSS), or "learner_best", the lowest loss the learner has had on the sample (0 for a
    # sample never reported). The second needs no reference model: for a living pool, whose new
    # tasks a reference trained on the first ones does not know (docs/decisions.md).
    irreducible_loss: Annotated[Literal[IRREDUCIBLE_LOSSES], _TEXT] = "reference"

    @property
    def needs_embeddings(self) -> bool:
        return self.bandit != "none" or self.diversity > 0


_SCHEMA = TypeAdapter(SelectionOptions)


# Suffixes of a composite policy name ("learnability+bandit+diversity") and what they switch on
# when the options leave them off.
FEATURES: dict[str, dict[str, object]] = {"bandit": {"bandit": "exp3"}, "diversity": {"diversity": 0.5}}


def split_policy(name: str) -> tuple[str, dict[str, object]]:
    """"learnability+bandit" -> ("learnability", {"bandit": "exp3"}); unknown suffixes raise."""
    base, *features = name.split("+")
    defaults: dict[str, object] = {}
    for feature in features:
        if feature not in FEATURES:
            raise ValueError(f"unknown policy feature {feature!r} in {name!r}; known: {', '.join(FEATURES)}")
        defaults.update(FEATURES[feature])
    return base, defaults


def parse_options(
    values: Mapping[str, object], key: str = "selection", base: SelectionOptions = SelectionOptions()
) -> SelectionOptions:
    """`base` updated with `values`; raises ConfigError naming `key.option` and the problem."""
    if not isinstance(values, Mapping):
        raise ConfigError(key, f"expected a mapping of option names to values, got {type(values).__name__}")
    try:
        parsed = _SCHEMA.validate_python(dict(values))
    except ValidationError as exc:
        raise ConfigError.from_validation(exc, SelectionOptions, key) from None
    # Only the options given: the rest come from `base`, not from the defaults the schema filled in.
    options = dataclasses.replace(base, **{name: getattr(parsed, name) for name in values})
    if options.bandit != "none" and options.max_clusters < 1:
        raise ConfigError(f"{key}.max_clusters", "a bandit needs at least one cluster")
    # Checked on the result, not on `values`: the learner may come from `base` and the mode from
    # `values`, or the other way round.
    if options.learner_loss == "snapshot" and not options.learner:
        raise ConfigError(f"{key}.learner", 'learner_loss "snapshot" needs a learner as "module:function"')
    return options


def super_batch_size(batch_size: int, keep_ratio: float) -> int:
    """Candidates to consider for one batch: round(B / ρ), never fewer than B."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    return max(batch_size, round(batch_size / keep_ratio))


def keep_count(n: int, super_batch: int, batch_size: int) -> int:
    """How many of n candidates to keep: the batch size for a full super-batch, and for the short
    one at the end of an epoch the same ratio, at least one and at most min(n, batch size)."""
    if n < 0 or super_batch < 1 or batch_size < 1:
        raise ValueError(f"need n >= 0, super_batch >= 1, batch_size >= 1; got {n}, {super_batch}, {batch_size}")
    if n == super_batch:
        return min(n, batch_size)
    return min(max(1, round(n * batch_size / super_batch)), n, batch_size)
