"""Comparing a shard's columns with the pool's: the first difference, named the way it was written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from loader.sources.schema import conform, mismatch_reason, schema_difference, type_name
from loader.tensors import to_arrow


def schema(**columns: pa.DataType | pa.Field) -> pa.Schema:
    return pa.schema([c if isinstance(c, pa.Field) else pa.field(n, c) for n, c in columns.items()])


X40 = to_arrow(np.zeros((1, 40), np.float32)).type
POOL = schema(x=X40, y=pa.int64(), noisy=pa.int64())


def test_type_names_follow_numpy() -> None:
    assert type_name(X40) == "float32[40]"
    assert type_name(to_arrow(np.zeros((1, 2, 3), np.float64)).type) == "float64[2, 3]"
    assert type_name(pa.int64()) == "int64" and type_name(pa.float32()) == "float32"
    assert type_name(pa.string()) == "string"


@pytest.mark.parametrize(
    "got, difference",
    [
        (POOL, ""),
        (schema(noisy=pa.int64(), y=pa.int64(), x=X40), ""),
        (schema(x=X40, noisy=pa.int64()), "lacks column 'y' (int64)"),
        (schema(x=to_arrow(np.zeros((1, 40), np.float64)).type, y=pa.int64(), noisy=pa.int64()),
         "column 'x' is float64[40], the pool's is float32[40]"),
        (schema(x=to_arrow(np.zeros((1, 41), np.float32)).type, y=pa.int64(), noisy=pa.int64()),
         "column 'x' is float32[41], the pool's is float32[40]"),
        (schema(x=X40, y=pa.int32(), noisy=pa.int64()), "column 'y' is int32, the pool's is int64"),
        (schema(x=X40, y=pa.int64(), noisy=pa.int64(), extra=pa.string()), "has extra column 'extra' (string)"),
        (pa.schema([("x", X40), ("y", pa.int64()), ("y", pa.int64()), ("noisy", pa.int64())]), "column 'y' appears twice"),
        (schema(text=pa.string()), "lacks column 'x' (float32[40])"),
    ],
)  # fmt: skip
def test_schema_difference_names_the_first_problem(got, difference) -> None:
    assert schema_difference(got, POOL) == difference
    assert mismatch_reason(got, POOL) == (f"schema differs from the pool's: {difference}" if difference else "")


def test_nullability_matters_only_towards_a_stricter_pool() -> None:
    strict = schema(y=pa.field("y", pa.int64(), nullable=False))
    assert schema_difference(schema(y=pa.int64()), strict) == "column 'y' may hold nulls, the pool's may not"
    assert schema_difference(strict, schema(y=pa.int64())) == ""


def test_conform_reorders_and_relaxes_without_converting() -> None:
    pool = schema(a=pa.int64(), b=pa.string())
    table = pa.table({"b": pa.array(["u", "v"]), "a": pa.array([1, 2], pa.int64())},
                     schema=pa.schema([pa.field("b", pa.string(), nullable=False), ("a", pa.int64())]))  # fmt: skip
    out = conform(table, pool)
    assert out.schema.equals(pool)
    assert out.column("a").to_pylist() == [1, 2] and out.column("b").to_pylist() == ["u", "v"]
    same = pa.table({"a": [1], "b": ["u"]})
    assert conform(same, pool).schema.equals(pool)
