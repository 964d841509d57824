"""Shard readers: each turns one shard file into one Arrow table."""

from __future__ import annotations

import os

import pyarrow as pa

from loader.errors import ShardError
from loader.sources.parquet import read_parquet
from loader.sources.patterns import expand
from loader.sources.webdataset import read_tar

__all__ = ["expand", "read_parquet", "read_shard", "read_tar"]


def read_shard(uri: str) -> pa.Table:
    """Whole shard, rows in file order; any problem is a ShardError naming `uri`."""
    lower = uri.lower()
    if lower.endswith(".tar"):
        reader = read_tar
    elif lower.endswith((".parquet", ".pq")):
        reader = read_parquet
    else:
        suffix = os.path.splitext(uri)[1] or "(none)"
        raise ShardError(uri, f"unsupported shard format {suffix!r} (expected .tar or .parquet)")
    if not os.path.exists(uri):
        raise ShardError(uri, "not found")
    if not os.path.isfile(uri):
        raise ShardError(uri, "not a regular file")
    table = reader(uri)
    if table.num_rows == 0:
        raise ShardError(uri, "empty shard: 0 rows")
    return table
