"""Parquet written by Hugging Face `datasets`: its `Image` columns become uint8 tensors.

`datasets` stores an image as a struct {bytes: encoded file, path: name} and says so in the
schema's `huggingface` metadata; without that metadata a struct column is left as it is. Every
other feature type `datasets` writes is plain Arrow (strings, ints, lists, fixed-size lists) and is
served like any Parquet column.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from loader.errors import ShardError
from loader.sources.images import decode_image
from loader.tensors import to_arrow


def image_columns(schema: pa.Schema) -> list[str]:
    """Names of the columns the `huggingface` metadata declares as `Image`, present in `schema`."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return []
    try:
        meta = json.loads(raw)
        features = meta.get("info", {}).get("features") or meta.get("features") or {}
    except (ValueError, AttributeError):
        return []  # metadata we cannot read changes nothing: the columns stay as stored
    return [name for name, feature in features.items()
            if isinstance(feature, dict) and feature.get("_type") == "Image" and name in schema.names]  # fmt: skip


def _decode_column(path: str, name: str, column: pa.ChunkedArray) -> pa.Array:
    if not pa.types.is_struct(column.type) or column.type.get_field_index("bytes") < 0:
        raise ShardError(path, f"image column {name!r} is {column.type}, not the struct {{bytes, path}} datasets writes")
    images = []
    for row, data in enumerate(column.combine_chunks().field("bytes").to_pylist()):
        if data is None:
            raise ShardError(path, f"image column {name!r}, row {row}: no image bytes (only a path, which is not read)")
        try:
            images.append(decode_image(data))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this row's fault
            raise ShardError(path, f"image column {name!r}, row {row}: cannot decode: {type(exc).__name__}: {exc}") from None
        if images[-1].shape != images[0].shape:
            raise ShardError(
                path,
                f"image column {name!r}: row {row} is {list(images[-1].shape)}, row 0 {list(images[0].shape)}; "
                "images of one shard must share a size to form a batch tensor (resize them when writing)",
            )
    return to_arrow(np.stack(images))


def decode_images(path: str, table: pa.Table) -> pa.Table:
    """`table` with each declared `Image` column replaced by a uint8 (rows, H, W[, C]) tensor."""
    for name in image_columns(table.schema):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, _decode_column(path, name, table.column(name)))
    return table
