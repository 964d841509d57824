"""Read a Parquet shard; tensor extension columns come back as fixed_shape_tensor, and the
`Image` columns of Hugging Face datasets as uint8 tensors."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from loader.errors import ShardError
from loader.sources.huggingface import decode_images

MAGIC = b"PAR1"


def read_parquet(path: str) -> pa.Table:
    try:
        # Pages written with checksums (ours are) are verified: a flipped byte in a data page
        # would otherwise decode into plausible, wrong samples.
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(path, f"{_problem(path)}: {exc}") from exc
    return decode_images(path, table)


def _problem(path: str) -> str:
    """A file that starts as Parquet but lost its footer was cut short (a partial copy or
    upload); saying so points the operator at the transfer rather than the writer."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
            f.seek(max(size - len(MAGIC), 0))
            tail = f.read(len(MAGIC))
    except OSError:
        return "not a readable parquet file"
    # The smallest whole file: magic, a 4-byte footer length, magic.
    if head == MAGIC and (tail != MAGIC or size < 2 * len(MAGIC) + 4):
        return "truncated parquet: no footer"
    return "not a readable parquet file"
