"""Read a WebDataset tar shard into one Arrow table, one row per sample in file order.

Members are named and grouped into samples by webdataset's rule: a member's key is its path up
to the first dot of its base name, and consecutive members with one key are one sample, so a shard
groups here exactly as `webdataset.WebDataset` groups it (tests/test_webdataset_shards.py compares
the two). The rule is written here rather than imported: importing `webdataset` imports torch,
+190 MB and over a second in every process that reads a tar shard (docs/decisions.md, "WebDataset
shards"). The tar is walked with `tarfile` in random-access mode rather than the package's
streaming iterator: that walk is what lets the end-of-archive marker be checked, and it measured
faster for large members (benchmarks/tar_read.py).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from loader.errors import ShardError
from loader.sources.decoders import ARRAY_EXTENSIONS, decode
from loader.tensors import to_arrow

# A sample: key, then column name -> (extension, decoded value), in member order.
_Sample = tuple[str, dict[str, tuple[str, Any]]]

# `dir/KEY.SUFFIX`, split as webdataset splits it, odd names included (`a/.b` is key `a/`):
# tests/test_webdataset_shards.py compares the two on generated names.
_MEMBER = re.compile(r"((?:.*/)?[^.]+)\.([^/]*)")


def key_and_suffix(name: str) -> tuple[str, str] | tuple[None, None]:
    """`dir/KEY.NAME.EXT` -> (`dir/KEY`, `NAME.EXT`): the key ends at the first dot of the base
    name, as webdataset's `base_plus_ext` splits it; (None, None) when the base name has none."""
    match = _MEMBER.fullmatch(name)
    return (match[1], match[2]) if match else (None, None)


def split_member(name: str) -> tuple[str, str, str] | None:
    """`dir/KEY.NAME.EXT` -> (`dir/KEY`, `NAME`, `EXT`), keys as webdataset forms them; a member
    named only `KEY.EXT` is column `EXT`. None when the basename has no dot."""
    key, suffix = key_and_suffix(name)
    if key is None or not suffix or suffix.endswith("."):
        return None
    column, _, ext = suffix.rpartition(".")
    return key, column or ext, ext


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, bytes]]:
    """The regular files of an open tar, in order, as (name, bytes)."""
    for info in tar:
        if info.isfile():
            member = tar.extractfile(info)
            assert member is not None  # regular files always have a payload
            yield info.name, member.read()


def _grouped(path: str, members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, suffix -> bytes) for each run of consecutive members with one key, as webdataset
    groups them; a member that cannot be named or repeats a suffix in its sample is a ShardError
    (webdataset skips the one silently and stops at the other)."""
    key, group = None, {}
    for name, data in members:
        this, suffix = key_and_suffix(name)
        if this is None or not suffix or suffix.endswith("."):
            raise ShardError(path, f"member {name!r} is not named KEY.NAME.EXT")
        if this != key:
            if group:
                yield key, group
            key, group = this, {}
        if suffix in group:  # compared as written: column names keep their case
            raise ShardError(path, f"member {name!r} appears twice in its sample")
        group[suffix] = data
    if group:
        yield key, group


def _samples(path: str) -> list[_Sample]:
    samples: list[_Sample] = []
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for key, group in _grouped(path, _members(tar)):
            fields: dict[str, tuple[str, Any]] = {}
            for suffix, data in group.items():
                column, _, ext = suffix.rpartition(".")
                fields[column or ext] = (ext.lower(), decode(ext, data, uri=path, member=f"{key}.{suffix}"))
            samples.append((key, fields))
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
