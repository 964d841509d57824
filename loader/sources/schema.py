"""How a shard's columns differ from the pool's, in words an operator can act on."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa


def type_name(type_: pa.DataType) -> str:
    """numpy-style names (`float32[40]` for a tensor column), since shards are written from numpy."""
    if isinstance(type_, pa.FixedShapeTensorType):
        return f"{type_name(type_.value_type)}{list(type_.shape)}"
    if pa.types.is_integer(type_) or pa.types.is_floating(type_):
        return np.dtype(type_.to_pandas_dtype()).name
    return str(type_)


def schema_difference(got: pa.Schema, expected: pa.Schema) -> str:
    """The first way `got` differs from `expected`, or '' when both hold the same columns with the
    same types. Column order is not compared: a reader can reorder columns, not convert them."""
    duplicates = [name for name, n in collections.Counter(got.names).items() if n > 1]
    if duplicates:
        return f"column {duplicates[0]!r} appears twice"
    fields = {field.name: field for field in got}
    for want in expected:
        have = fields.get(want.name)
        if have is None:
            return f"lacks column {want.name!r} ({type_name(want.type)})"
        if not have.type.equals(want.type):
            return f"column {want.name!r} is {type_name(have.type)}, the pool's is {type_name(want.type)}"
        if have.nullable and not want.nullable:
            return f"column {want.name!r} may hold nulls, the pool's may not"
    extra = [name for name in got.names if name not in expected.names]
    if extra:
        return f"has extra column {extra[0]!r} ({type_name(fields[extra[0]].type)})"
    return ""


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with the pool's column order and nullability; only for tables without a
    `schema_difference`, so nothing is converted."""
    table = table.select(schema.names)
    return table if table.schema.equals(schema) else table.cast(schema)


def mismatch_reason(got: pa.Schema, pool: pa.Schema) -> str:
    """Why a shard with schema `got` cannot join a pool of schema `pool`, or ''."""
    difference = schema_difference(got, pool)
    return f"schema differs from the pool's: {difference}" if difference else ""
