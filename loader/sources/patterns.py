"""Turn shard patterns (`data/train-{000000..000099}.tar`, `data/*.parquet`) into paths."""

from __future__ import annotations

import glob
import os

from braceexpand import braceexpand

_GLOB_CHARS = frozenset("*?[")


def expand(patterns: str | list[str]) -> list[str]:
    """Absolute paths in pattern order, without duplicates.

    Brace-expanded paths are kept even when missing, so the caller can report each one;
    a glob only yields what exists (sorted, since the filesystem order is arbitrary).
    Commas are never separators: they belong to brace expressions like `{a,b}`.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    seen: dict[str, None] = {}
    for pattern in patterns:
        for entry in braceexpand(os.path.expanduser(pattern)):
            if _GLOB_CHARS.intersection(entry):
                matches = sorted(glob.glob(entry, recursive=True))
            else:
                matches = [entry]
            for match in matches:
                seen.setdefault(os.path.abspath(match), None)
    return list(seen)
