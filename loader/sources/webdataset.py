"""Read a WebDataset tar shard into one Arrow table, one row per sample in file order.

Members are named and grouped into samples by the `webdataset` package (`base_plus_ext`,
`group_by_keys`), so a shard groups here exactly as `webdataset.WebDataset` groups it. The tar
itself is walked with `tarfile` in random-access mode rather than the package's streaming
iterator: that walk is what lets the end-of-archive marker be checked, and it measured faster for
large members (benchmarks/tar_read.py; docs/decisions.md, "WebDataset shards").
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from webdataset import tariterators

from loader.errors import ShardError
from loader.sources.decoders import ARRAY_EXTENSIONS, decode
from loader.tensors import to_arrow

# A sample: key, then column name -> (extension, decoded value), in member order.
_Sample = tuple[str, dict[str, tuple[str, Any]]]


def split_member(name: str) -> tuple[str, str, str] | None:
    """`dir/KEY.NAME.EXT` -> (`dir/KEY`, `NAME`, `EXT`), keys as webdataset forms them; a member
    named only `KEY.EXT` is column `EXT`. None when the basename has no dot."""
    key, suffix = tariterators.base_plus_ext(name)
    if key is None or not suffix or suffix.endswith("."):
        return None
    column, _, ext = suffix.rpartition(".")
    return key, column or ext, ext


class _Members:
    """The regular files of an open tar, as the `{fname, data}` dicts webdataset groups; remembers
    the last one handed out, which is the member a grouping error is about."""

    def __init__(self, path: str, tar: tarfile.TarFile) -> None:
        self.path, self.tar, self.last = path, tar, ""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for info in self.tar:
            if not info.isfile():
                continue
            member = self.tar.extractfile(info)
            assert member is not None  # regular files always have a payload
            self.last = info.name
            yield {"fname": info.name, "data": member.read(), "__url__": self.path}


def _strict_key(path: str):
    def keys(name: str) -> tuple[str, str]:
        key, suffix = tariterators.base_plus_ext(name)
        if key is None or not suffix or suffix.endswith("."):
            # webdataset skips such members silently; here they mean a shard written wrongly.
            raise ShardError(path, f"member {name!r} is not named KEY.NAME.EXT")
        return key, suffix

    return keys


def _samples(path: str) -> list[_Sample]:
    samples: list[_Sample] = []
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        members = _Members(path, tar)
        # lcase=False: column names keep their case; only extensions are compared lowercased.
        grouped = tariterators.group_by_keys(iter(members), keys=_strict_key(path), lcase=False)
        try:
            for group in grouped:
                key = group["__key__"]
                fields: dict[str, tuple[str, Any]] = {}
                for suffix, data in group.items():
                    if suffix.startswith("__") and suffix.endswith("__"):
                        continue  # the grouping's own entries (__key__, __url__)
                    column, _, ext = suffix.rpartition(".")
                    fields[column or ext] = (ext.lower(), decode(ext, data, uri=path, member=f"{key}.{suffix}"))
                samples.append((key, fields))
        except ValueError as exc:
            if "duplicate file name" not in str(exc):
                raise
            raise ShardError(path, f"member {members.last!r} appears twice in its sample") from None
        # tarfile stops silently at a missing or damaged header after the first one, so a
        # shard cut at a member boundary would otherwise read as a shorter, valid shard.
        raw.seek(tar.offset)
        if raw.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
            raise ShardError(path, f"truncated tar: no end-of-archive marker at byte {tar.offset}")
    return samples


def _check_columns(path: str, samples: list[_Sample]) -> None:
    first_key, first = samples[0]
    for key, fields in samples[1:]:
        missing = [c for c in first if c not in fields]
        extra = [c for c in fields if c not in first]
        if missing:
            raise ShardError(path, f"sample {key!r} lacks column {missing[0]!r} (present in sample {first_key!r})")
        if extra:
            raise ShardError(path, f"sample {key!r} has extra column {extra[0]!r} (absent from sample {first_key!r})")
        for column, (ext, _) in fields.items():
            if ext != first[column][0]:
                raise ShardError(path, f"sample {key!r}: column {column!r} is .{ext}, sample {first_key!r} had .{first[column][0]}")


def _stack(path: str, column: str, ext: str, keys: list[str], values: list[np.ndarray]) -> pa.Array:
    shape, dtype = values[0].shape, values[0].dtype
    for key, value in zip(keys, values):
        if value.shape != shape or value.dtype != dtype:
            hint = "" if ext == "npy" else (
                "; images of one shard must share a size to form a batch tensor: resize them when "
                "writing, or store them as .bin to receive the encoded bytes"
            )
            raise ShardError(
                path,
                f"sample {key!r}: column {column!r} is {value.dtype}{list(value.shape)}, "
                f"expected {dtype}{list(shape)} like sample {keys[0]!r}{hint}",
            )
    try:
        return to_arrow(np.stack(values))
    except (TypeError, ValueError) as exc:
        raise ShardError(path, f"column {column!r}: {exc}") from exc


def _to_column(path: str, column: str, ext: str, keys: list[str], values: list[Any]) -> pa.Array:
    if ext in ARRAY_EXTENSIONS:
        return _stack(path, column, ext, keys, values)
    try:
        if ext == "cls":
            return pa.array(values, type=pa.int64())
        if ext == "txt":
            return pa.array(values, type=pa.string())
        if ext == "json":
            return pa.array(values)
        return pa.array(values, type=pa.binary())
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
        raise ShardError(path, f"column {column!r} (.{ext}): cannot build an Arrow column: {exc}") from exc


def read_tar(path: str) -> pa.Table:
    """Whole shard as a table; columns follow the members of the first sample."""
    try:
        samples = _samples(path)
    except tarfile.TarError as exc:
        what = "truncated tar" if "unexpected end" in str(exc) else "not a readable tar archive"
        raise ShardError(path, f"{what}: {exc}") from exc
    except (EOFError, OSError) as exc:
        raise ShardError(path, f"cannot read tar: {exc}") from exc
    if not samples:
        raise ShardError(path, "empty shard: the tar holds no samples")
    _check_columns(path, samples)
    keys = [key for key, _ in samples]
    first = samples[0][1]
    arrays = {
        column: _to_column(path, column, ext, keys, [fields[column][1] for _, fields in samples])
        for column, (ext, _) in first.items()
    }
    return pa.table(arrays)
