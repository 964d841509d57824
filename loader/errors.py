"""Exceptions shared by the loader; each carries the fields a caller needs to report it."""

from __future__ import annotations

import dataclasses
import types
import typing


class LoaderError(Exception):
    """Base class, so callers can catch everything the loader raises on purpose."""


class ShardError(LoaderError):
    """A shard that cannot be read; the loader quarantines it instead of crashing."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(uri, reason)
        self.uri = uri
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.uri}: {self.reason}"


class ConfigError(LoaderError):
    """An invalid setting; `key` names it the way the user wrote it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}"

    @classmethod
    def from_validation(cls, error, schema: type, prefix: str = "") -> ConfigError:
        """The first problem of a pydantic ValidationError from validating a mapping into the
        dataclass `schema`, named by its dotted key (`tls.cert`, `options.keep_ratio`) and said in
        one line: pydantic's own text is a multi-line dump in its vocabulary, not the user's."""
        errors = error.errors(include_url=False)
        # An unknown key first: usually a typo, so what else looks wrong may well follow from it.
        first = next((e for e in errors if e["type"] in _UNKNOWN_KEY), errors[0])
        owner, hint, keys, item = schema, None, [prefix] if prefix else [], ""
        for part in first["loc"]:
            if not isinstance(part, str):  # an item of a list: the list's key names it
                item = f"item {part}: "
                break
            if hint is not None:
                owner = _unwrap(hint)[0]
            hint = typing.get_type_hints(owner, include_extras=True).get(part)
            keys.append(part)
        return cls(".".join(keys) or schema.__name__, item + _problem(first, owner, hint))


_UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden")
_KINDS = {"int": "an integer", "float": "a number", "string": "a string", "tuple": "a list", "dataclass": "a mapping"}


def _unwrap(hint) -> tuple[object, list]:
    """(the type, its Annotated metadata) of a field's hint; `X | None` is taken as X."""
    metadata: list = []
    while True:
        if typing.get_origin(hint) is typing.Annotated:
            metadata += hint.__metadata__
            hint = hint.__origin__
        elif typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        else:
            return hint, metadata


def _bounds(interval) -> str:
    low, high = (interval.gt, interval.ge), (interval.lt, interval.le)
    if high == (None, None):
        return f"> {low[0]}" if low[0] is not None else f">= {low[1]}"
    left = f"in ({low[0]}" if low[0] is not None else f"in [{low[1]}"
    return left + (f", {high[0]})" if high[0] is not None else f", {high[1]}]")


def _problem(error: dict, owner: type, hint) -> str:
    kind, value = error["type"], error["input"]
    bare, metadata = _unwrap(hint)
    if kind in ("missing", "missing_argument"):
        return "required"
    if kind in _UNKNOWN_KEY:
        return f"unknown key; known: {', '.join(f.name for f in dataclasses.fields(owner))}"
    if kind == "literal_error":
        return f"unknown value {value!r}; known: {', '.join(map(str, typing.get_args(bare)))}"
    if kind in ("value_error", "assertion_error"):  # raised by the schema's own checks
        return str(error["ctx"]["error"])
    from annotated_types import Interval  # pydantic's: only the service validates configs

    bounds = [_bounds(m) for m in metadata if isinstance(m, Interval)]
    if kind == "finite_number":
        return f"must be finite{' and ' + bounds[0] if bounds else ''}, got {value!r}"
    if kind.startswith(("greater_than", "less_than")) and bounds:
        return f"must be {bounds[0]}, got {value!r}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "int_from_float":
        return f"expected a whole number, got {value!r}"
    what = _KINDS.get(kind.split("_")[0])
    if what:
        return f"expected {what}, got {'a boolean' if isinstance(value, bool) else repr(value)}"
    return error["msg"]


class JobConflict(LoaderError, ValueError):
    """A trainer's request does not fit the job as it runs (or the service cannot run it)."""
