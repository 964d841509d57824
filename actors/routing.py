"""Which actor handles what: pure functions, importable without torch (curators stay small)."""

from __future__ import annotations

import zlib


def learner_scorer(scorers: list, job: str):
    """The scorer that holds `job`'s learner snapshots; crc32 keeps the choice stable."""
    return scorers[zlib.crc32(job.encode()) % len(scorers)]


def shard_reader(readers: list, index: int, attempt: int = 0):
    """The reader for shard `index`: always the same one, so its cache holds the shard for the
    curator and the gateway alike; a retry moves on to the next."""
    return readers[(index + attempt) % len(readers)]
