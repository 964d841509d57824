"""Watched shard patterns: new files that match, once they are complete.

A file counts as complete when its size and modification time are the same at two consecutive
polls. No marker files are needed, so shards written in place (`webdataset.ShardWriter`,
`pyarrow.parquet.write_table`) and shards moved in with `mv` both work; a writer that pauses for
longer than the poll interval mid-file would be taken early, so slow writers should write under
another name (one the pattern does not match) and rename when done. A file that was taken is never
taken again, even if it changes later: its rows already have ids.
"""

from __future__ import annotations

import os

from loader.sources import expand


class ShardWatcher:
    def __init__(self, patterns: tuple[str, ...] | list[str], known: set[str] | None = None) -> None:
        self.patterns = list(patterns)
        self._taken: set[str] = set(known or ())
        self._seen: dict[str, tuple[int, int]] = {}

    def poll(self) -> list[str]:
        """Paths that matched and stayed unchanged since the last poll, not handed out before,
        in pattern order."""
        ready, seen = [], {}
        for path in expand(self.patterns):
            if path in self._taken:
                continue
            try:
                info = os.stat(path)
            except OSError:  # removed between the match and the stat
                continue
            seen[path] = (info.st_size, info.st_mtime_ns)
            if self._seen.get(path) == seen[path]:
                ready.append(path)
        self._taken.update(ready)
        self._seen = {path: mark for path, mark in seen.items() if path not in self._taken}
        return ready
