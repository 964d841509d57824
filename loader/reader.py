"""The shard-reading stage: one shard URI in, one table with sample ids out (or why not)."""

from __future__ import annotations

import dataclasses
import logging

import pyarrow as pa

from loader.codec import ID
from loader.errors import ShardError
from loader.ids import make_ids
from loader.sources import read_shard

log = logging.getLogger("loader.reader")


@dataclasses.dataclass
class ReadResult:
    index: int
    uri: str
    table: pa.Table | None = None
    error: str = ""


def read_with_ids(uri: str, index: int) -> ReadResult:
    try:
        table = read_shard(uri)
    except ShardError as exc:
        return ReadResult(index, uri, error=exc.reason)
    except Exception as exc:
        # Whatever a shard's bytes make a library raise, it is that shard's problem: raised from
        # the reader actor it would fail the whole epoch instead of quarantining one shard.
        log.warning("unexpected error reading %s", uri, exc_info=True)
        return ReadResult(index, uri, error=f"cannot read it: {type(exc).__name__}: {exc}")
    if ID in table.column_names:
        return ReadResult(index, uri, error=f"column {ID!r} is reserved for sample ids")
    try:
        ids = make_ids(index, table.num_rows)
    except ValueError as exc:  # more rows than an id can address
        return ReadResult(index, uri, error=str(exc))
    # One chunk per column (a Parquet file gives one per row group): batches are gathered from
    # these tables every epoch, and a gather from one chunk is one copy per row.
    table = table.combine_chunks() if any(c.num_chunks > 1 for c in table.columns) else table
    return ReadResult(index, uri, table=table.append_column(ID, pa.array(ids)))
