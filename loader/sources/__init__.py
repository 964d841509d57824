"""Shard readers: each turns one shard file into one Arrow table."""

from __future__ import annotations

import os

import pyarrow as pa

from loader.errors import ShardError
from loader.sources.parquet import read_parquet
from loader.sources import pipe
from loader.sources.file_cache import FileCache
from loader.sources.patterns import expand
from loader.sources.remote import is_remote, local_copy, redact, scrub, url_path
from loader.sources.webdataset import read_tar

__all__ = ["expand", "is_remote", "read_parquet", "read_shard", "read_tar"]


def read_shard(uri: str) -> pa.Table:
    """Whole shard, rows in file order; any problem is a ShardError naming `uri`.

    A remote URI (`https://`, `s3://`, `gs://`, see loader.sources.remote) is fetched into the
    local read cache first; its errors name the URI without credentials. So is the output of a
    `pipe:COMMAND` shard (loader.sources.pipe), when the config allows them."""
    if pipe.is_pipe(uri):
        pipe.check_allowed(uri)  # before the cache: a copy kept from when pipes were on is not served
        reader = read_parquet if pipe.format_suffix(uri) == ".parquet" else read_tar
        fetch = lambda tmp: pipe.fetch(uri, tmp)  # noqa: E731
        return _read_fetched(uri, pipe.shown(uri), reader, lambda: FileCache.current().local_copy(uri, fetch))
    remote = is_remote(uri)
    lower = url_path(uri).lower() if remote else uri.lower()
    if lower.endswith(".tar"):
        reader = read_tar
    elif lower.endswith((".parquet", ".pq")):
        reader = read_parquet
    else:
        suffix = os.path.splitext(lower)[1] or "(none)"
        raise ShardError(redact(uri) if remote else uri, f"unsupported shard format {suffix!r} (expected .tar or .parquet)")
    if remote:
        return _read_fetched(uri, redact(uri), reader, lambda: local_copy(uri))
    if not os.path.exists(uri):
        raise ShardError(uri, "not found")
    if not os.path.isfile(uri):
        raise ShardError(uri, "not a regular file")
    table = reader(uri)
    if table.num_rows == 0:
        raise ShardError(uri, "empty shard: 0 rows")
    return table


def _read_fetched(uri: str, shown: str, reader, copy) -> pa.Table:
    """Reads the local copy `copy()` gives; errors name `shown`, never the cache's file."""
    for attempt in range(2):
        with copy() as path:
            try:
                table = reader(path)
            except ShardError as exc:
                # Another process may have evicted the cached copy between lookup and open.
                if attempt == 0 and not os.path.exists(path):
                    continue
                raise ShardError(shown, scrub(exc.reason.replace(path, shown), uri)) from None
        if table.num_rows == 0:
            raise ShardError(shown, "empty shard: 0 rows")
        return table
    raise ShardError(shown, "the cached copy vanished while it was read")
