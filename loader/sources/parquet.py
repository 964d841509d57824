"""Read a Parquet shard; tensor extension columns come back as fixed_shape_tensor."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from loader.errors import ShardError


def read_parquet(path: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(path, f"not a readable parquet file: {exc}") from exc
