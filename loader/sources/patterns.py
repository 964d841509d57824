"""Turn shard patterns (`data/train-{000000..000099}.tar`, `data/*.parquet`) into paths."""

from __future__ import annotations

import glob
import os

from braceexpand import braceexpand

_GLOB_CHARS = frozenset("*?[")
# What a folder given as a pattern stands for: the shard files anywhere below it, the layout of a
# Hugging Face dataset repository (data/train-00000-of-00004.parquet, ...).
SHARD_SUFFIXES = (".parquet", ".pq", ".tar")


def _folder(path: str) -> list[str]:
    found = []
    for root, folders, files in os.walk(path):
        folders[:] = [f for f in folders if not f.startswith(".")]  # .git, .cache, ...
        found.extend(os.path.join(root, f) for f in files if f.lower().endswith(SHARD_SUFFIXES))
    return sorted(found)


def expand(patterns: str | list[str]) -> list[str]:
    """Absolute paths in pattern order, without duplicates.

    Brace-expanded paths are kept even when missing, so the caller can report each one;
    a glob only yields what exists (sorted, since the filesystem order is arbitrary); an existing
    folder yields the .parquet, .pq and .tar files below it, sorted.
    Commas are never separators: they belong to brace expressions like `{a,b}`.
    Remote URIs (`https://`, `s3://`, `gs://`) are kept as written; a glob in one is listed
    through fsspec (a listing that fails is a ShardError naming the pattern). `pipe:` commands
    are brace-expanded and kept as written.
    """
    from loader.sources import remote

    if isinstance(patterns, str):
        patterns = [patterns]
    seen: dict[str, None] = {}
    for pattern in patterns:
        if pattern.startswith("pipe:"):  # a command, not a path: brace-expanded only
            for entry in braceexpand(pattern):
                seen.setdefault(entry, None)
            continue
        if remote.is_remote(pattern):
            for entry in braceexpand(pattern):
                path = remote.url_path(entry) if remote.scheme(entry) in ("http", "https") else entry
                for match in remote.glob(entry) if _GLOB_CHARS.intersection(path) else [entry]:
                    seen.setdefault(match, None)
            continue
        for entry in braceexpand(os.path.expanduser(pattern)):
            if _GLOB_CHARS.intersection(entry):
                matches = sorted(glob.glob(entry, recursive=True))
            elif os.path.isdir(entry):
                matches = _folder(entry)
            else:
                matches = [entry]
            for match in matches:
                seen.setdefault(os.path.abspath(match), None)
    return list(seen)
