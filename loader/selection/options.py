"""Selection options of a job, and the batch arithmetic that follows from the keep ratio.

Options arrive from YAML (native types) or from a trainer's Hello (`map<string,string>`, so every
value is a string); both go through `parse_options`, which checks everything here so that the
selection code can trust its inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping

from loader.errors import ConfigError
from loader.selection.selectors import SELECTORS

__all__ = ["SelectionOptions", "keep_count", "parse_options", "split_policy", "super_batch_size"]

LEARNER_LOSSES = ("feedback", "snapshot")
BANDIT_NAMES = ("none", "exp3", "ucb")
# "package.module:factory", the factory possibly a dotted attribute path (Class.create).
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclasses.dataclass(frozen=True)
class SelectionOptions:
    keep_ratio: float = 0.2  # ρ: a batch of B is chosen from a super-batch of round(B/ρ)
    selector: str = "topk"
    beta: float = 1.0  # coldness of stochastic selectors; 0 = uniform
    learner_loss: str = "feedback"  # "feedback" | "snapshot"
    prune_ratio: float = 0.5  # InfoBatch (policy `loss`)
    anneal_fraction: float = 0.875  # InfoBatch: from this fraction of total epochs on, no pruning
    learner: str = ""  # snapshot mode: import path "module:factory" of the learner
    learner_kwargs: str = "{}"  # JSON object of kwargs for that factory
    # Cluster bandit composing super-batches by cluster quota: "none", "exp3" or "ucb".
    bandit: str = "none"
    gamma: float = 0.1  # bandit exploration: every arm keeps at least gamma / K
    eta: float = 4.0  # bandit learning rate on rewards normalised to [-1, 1]
    max_clusters: int = 32
    # Diversity: scores lowered by lam * max cosine similarity to the memory and the batch so far.
    diversity: float = 0.0
    memory_size: int = 1024  # embeddings of recently served samples remembered (FIFO)
    chunk: int = 32  # joint selection picks this many at a time, re-scoring in between

    @property
    def needs_embeddings(self) -> bool:
        return self.bandit != "none" or self.diversity > 0


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
    known = [f.name for f in dataclasses.fields(SelectionOptions)]
    changes: dict[str, object] = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{key}.{name}", f"unknown option; known: {', '.join(known)}")
        try:
            changes[name] = _PARSERS[name](value)
        except _Invalid as exc:
            raise ConfigError(f"{key}.{name}", str(exc)) from None
    options = dataclasses.replace(base, **changes)
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


class _Invalid(ValueError):
    """A bad value; parse_options adds the key it came from."""


def _number(value: object) -> float:
    # bool is an int to Python, but `keep_ratio: true` is a mistake, not 1.0.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise _Invalid(f"expected a number, got {value!r}")


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {value!r}")
    return value.strip()


def _keep_ratio(value: object) -> float:
    x = _number(value)
    if not 0 < x <= 1:
        raise _Invalid(f"must be in (0, 1], got {value!r}")
    return x


def _prune_ratio(value: object) -> float:
    x = _number(value)
    if not 0 <= x < 1:
        raise _Invalid(f"must be in [0, 1), got {value!r}")
    return x


def _anneal_fraction(value: object) -> float:
    x = _number(value)
    if not 0 < x <= 1:
        raise _Invalid(f"must be in (0, 1], got {value!r}")
    return x


def _selector(value: object) -> str:
    name = _text(value)
    if name not in SELECTORS:
        raise _Invalid(f"unknown selector {name!r}; known: {', '.join(sorted(SELECTORS))}")
    return name


def _learner_loss(value: object) -> str:
    mode = _text(value)
    if mode not in LEARNER_LOSSES:
        raise _Invalid(f"expected one of {', '.join(LEARNER_LOSSES)}, got {mode!r}")
    return mode


def _learner(value: object) -> str:
    path = _text(value)
    # Only the form: importing would run the trainer's code inside the config parser.
    if path and not _IMPORT_PATH.match(path):
        raise _Invalid(f'expected an import path "module:function", got {path!r}')
    return path


def _learner_kwargs(value: object) -> str:
    if isinstance(value, Mapping):
        try:
            return json.dumps(dict(value), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _Invalid(f"cannot be written as JSON: {exc}") from None
    text = _text(value)
    try:
        parsed = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise _Invalid(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(parsed, dict):
        raise _Invalid(f"expected a JSON object, got {text!r}")
    return text or "{}"


def _bandit(value: object) -> str:
    name = _text(value)
    if name not in BANDIT_NAMES:
        raise _Invalid(f"expected one of {', '.join(BANDIT_NAMES)}, got {name!r}")
    return name


def _unit_interval(value: object) -> float:
    x = _number(value)
    if not 0 <= x <= 1:
        raise _Invalid(f"must be in [0, 1], got {value!r}")
    return x


def _non_negative(value: object) -> float:
    x = _number(value)
    if not (math.isfinite(x) and x >= 0):
        raise _Invalid(f"must be finite and >= 0, got {value!r}")
    return x


def _positive_int(value: object) -> int:
    x = _number(value)
    if not (x.is_integer() and x >= 1):
        raise _Invalid(f"must be a whole number >= 1, got {value!r}")
    return int(x)


_PARSERS: dict[str, Callable[[object], object]] = {
    "bandit": _bandit,
    "gamma": _unit_interval,
    "eta": _non_negative,
    "max_clusters": _positive_int,
    "diversity": _non_negative,
    "memory_size": _positive_int,
    "chunk": _positive_int,
    "keep_ratio": _keep_ratio,
    "selector": _selector,
    "beta": _non_negative,
    "learner_loss": _learner_loss,
    "prune_ratio": _prune_ratio,
    "anneal_fraction": _anneal_fraction,
    "learner": _learner,
    "learner_kwargs": _learner_kwargs,
}
