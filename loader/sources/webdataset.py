"""Read a WebDataset tar shard into one Arrow table, one row per sample in file order."""

from __future__ import annotations

import posixpath
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa

from loader.errors import ShardError
from loader.sources.decoders import decode
from loader.tensors import to_arrow

# A sample: key, then column name -> (extension, decoded value), in member order.
_Sample = tuple[str, dict[str, tuple[str, Any]]]


def split_member(name: str) -> tuple[str, str, str] | None:
    """`dir/KEY.NAME.EXT` -> (`dir/KEY`, `NAME`, `EXT`); None when the basename has no dot."""
    directory, base = posixpath.split(name)
    stem, dot, suffix = base.partition(".")
    if not dot or not stem or not suffix:
        return None
    column, _, ext = suffix.rpartition(".")
    return posixpath.join(directory, stem), column or ext, ext


def _samples(path: str) -> list[_Sample]:
    samples: list[_Sample] = []
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            parts = split_member(info.name)
            if parts is None:
                raise ShardError(path, f"member {info.name!r} is not named KEY.NAME.EXT")
            key, column, ext = parts
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            fields = samples[-1][1]
            if column in fields:
                raise ShardError(path, f"sample {key!r}: column {column!r} appears twice")
            member = tar.extractfile(info)
            assert member is not None  # regular files always have a payload
            fields[column] = (ext.lower(), decode(ext, member.read(), uri=path, member=info.name))
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


def _stack(path: str, column: str, keys: list[str], values: list[np.ndarray]) -> pa.Array:
    shape, dtype = values[0].shape, values[0].dtype
    for key, value in zip(keys, values):
        if value.shape != shape or value.dtype != dtype:
            raise ShardError(
                path,
                f"sample {key!r}: column {column!r} is {value.dtype}{list(value.shape)}, "
                f"expected {dtype}{list(shape)} like sample {keys[0]!r}",
            )
    try:
        return to_arrow(np.stack(values))
    except (TypeError, ValueError) as exc:
        raise ShardError(path, f"column {column!r}: {exc}") from exc


def _to_column(path: str, column: str, ext: str, keys: list[str], values: list[Any]) -> pa.Array:
    if ext == "npy":
        return _stack(path, column, keys, values)
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
