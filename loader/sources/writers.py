"""Write WebDataset tars and Parquet shards, deterministically and atomically."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loader.files import atomic_file
from loader.tensors import to_arrow

Value = np.ndarray | int | str


def _encode(value: Value) -> tuple[str, bytes]:
    if isinstance(value, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        return "npy", buffer.getvalue()
    # bool is an int subclass, but a 0/1 .cls would read back as an int64 label.
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return "cls", str(int(value)).encode("ascii")
    if isinstance(value, str):
        return "txt", value.encode("utf-8")
    raise TypeError(f"cannot write {type(value).__name__} to a tar shard (use ndarray, int or str)")


def write_tar(path: str, samples: Iterable[dict[str, Value]]) -> None:
    """One sample per dict; an optional `__key__` entry overrides the key `f"{i:09d}"`.

    Written by `webdataset.TarWriter` (members `KEY.NAME.EXT`, in name order within a sample) with
    fixed metadata, so that the same samples make byte-identical shards."""
    import webdataset

    with atomic_file(path) as tmp, open(tmp, "wb") as stream:
        writer = webdataset.TarWriter(stream, encoder=False, mtime=0, mode=0o644, user="", group="", format="PAX_FORMAT")
        with writer:
            for index, sample in enumerate(samples):
                key = str(sample.get("__key__", f"{index:09d}"))
                if "." in os.path.basename(key):
                    raise ValueError(f"key {key!r}: a dot would split it when read back")
                encoded: dict[str, str | bytes] = {"__key__": key}
                for name, value in sample.items():
                    if name == "__key__":
                        continue
                    # TarWriter drops names starting with "_" (its metadata); ours are columns.
                    if not name or "/" in name or name.startswith("_"):
                        raise ValueError(f"sample {key!r}: invalid column name {name!r}")
                    ext, payload = _encode(value)
                    encoded[f"{name}.{ext}"] = payload
                writer.write(encoded)


def write_parquet(path: str, columns: dict[str, np.ndarray]) -> None:
    table = pa.table({name: to_arrow(values) for name, values in columns.items()})
    with atomic_file(path) as tmp:
        # Page checksums let readers tell a corrupted page from data.
        pq.write_table(table, tmp, write_page_checksum=True)
