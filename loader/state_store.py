"""The service's state on disk (`state_dir`): what a restarted service, or a restarted actor, needs.

Layout under the root:
    registry.json                 shard URIs, their indices and states
    scores/<index>.npz            one shard's reference losses and embeddings
    jobs/<job>/spec.json          the job's batch size, policy, options ...
    jobs/<job>/soft.npz           learner losses, clusters, bandit, memory (periodic snapshot)
    jobs/<job>/epoch-<n>.log      every batch selected in epoch n, appended before it is served

Whole files are replaced atomically (loader.files.atomic_file: write, fsync, rename), so a crash
leaves the old or the new version, never half of one.

Journals are append-only records, each with its length and a CRC: a record cut short is detected
at restore, and it and everything after it are dropped. A record is appended before its batch can
be served, and the append has reached the kernel when `append_batch` returns, so a crash of the
process (the curator actor, its worker) loses no record, and a record it cut short is of a batch
nobody received.

A crash of the node (power loss, kernel panic) loses what the kernel had not written to disk yet,
and the disk is only sure to hold what was fsynced. An fsync per record would bound the batch rate
by the disk's fsync latency, so a journal is fsynced at most once per `journal_sync_s` (1 s): an
append fsyncs (in the caller's thread) when the journal's last fsync is that old or older;
`sync()` and `close()` fsync what is left, and so does moving on to another journal (the next
epoch's). A new journal's folder is fsynced once, so its name survives too.

After a node crash the journal therefore holds every batch up to its last fsync, and can lack the
records appended since, all of them appended within one interval after that fsync. (They stay
unsynced until an append past the interval, `sync()` or `close()`: through a pause in appends
unless the caller syncs; the kernel writes them back by itself too, within about 30 s by default.)
Those batches were selected and may well have been served: their records were in the kernel, not
on disk, when they went out. The restarted curator does not know them, so it selects those places
of the epoch again from candidates it takes for unconsidered:
- a trainer that asks again for one of those batches (resuming from an older state_dict, say)
  gets a batch chosen anew, not the one first served;
- the samples of those batches, served or only considered, can be served once more in that
  epoch: "each sample considered once per epoch" can fail for up to one interval's batches.
Nothing else is lost: later records cannot survive without them (a record after a hole fails its
check and is dropped with the rest), and learned state has its own checkpoint (soft.npz).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from loader.files import atomic_file, fsync_path, make_dirs

log = logging.getLogger("loader.state")

_MAGIC = b"LDRJ"
# magic, considered count, kept count, crc32 of the body
_HEADER = struct.Struct("<4sIII")


@dataclasses.dataclass
class _OpenJournal:
    name: str
    file: io.BufferedWriter
    synced_at: float = -float("inf")  # the first record is fsynced at once
    dirty: bool = False  # records appended since the last fsync


class StateStore:
    def __init__(
        self,
        root: str | os.PathLike,
        journal_sync_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        """`journal_sync_s`: the longest a journal goes without an fsync while it is appended to
        (0: fsync every record). `clock` and `fsync` are for tests."""
        if not journal_sync_s >= 0:
            raise ValueError(f"journal_sync_s must be >= 0, got {journal_sync_s!r}")
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.journal_sync_s, self._clock, self._fsync = journal_sync_s, clock, fsync
        # The journal appended to last, kept open; the lock lets sync() run from another thread.
        self._lock = threading.Lock()
        self._journal: _OpenJournal | None = None

    # -- whole files -----------------------------------------------------------------------------

    def save_json(self, name: str, value: object) -> None:
        with atomic_file(self.root / name) as temp:
            Path(temp).write_bytes(json.dumps(value, indent=1, sort_keys=True).encode())

    def load_json(self, name: str) -> object | None:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        # An open file, not the name: np.savez would add ".npz" to a name not ending in it.
        with atomic_file(self.root / name) as temp, open(temp, "wb") as out:
            np.savez(out, **arrays)

    def load_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        path = self.root / name
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def remove(self, name: str) -> None:
        with self._lock:
            if self._journal is not None and self._journal.name == name:
                self._journal.file.close()  # no fsync: the file goes
                self._journal = None
        (self.root / name).unlink(missing_ok=True)

    # -- journals --------------------------------------------------------------------------------

    def append_batch(self, name: str, considered: np.ndarray, kept: np.ndarray, weights: np.ndarray) -> None:
        """One selected batch: the candidates it was chosen from, the ids kept and their weights."""
        considered = np.ascontiguousarray(considered, dtype="<i8")
        kept = np.ascontiguousarray(kept, dtype="<i8")
        weights = np.ascontiguousarray(weights, dtype="<f4")
        if len(kept) != len(weights):
            raise ValueError(f"{len(kept)} kept ids but {len(weights)} weights")
        body = considered.tobytes() + kept.tobytes() + weights.tobytes()
        record = _HEADER.pack(_MAGIC, len(considered), len(kept), zlib.crc32(body)) + body
        with self._lock:
            if self._journal is not None and self._journal.name != name:
                self._close_journal()
            if self._journal is None:
                self._journal = _OpenJournal(name, self._open_journal(name))
            journal = self._journal
            journal.file.write(record)
            journal.file.flush()  # into the kernel before the batch can be served
            journal.dirty = True
            if self._clock() - journal.synced_at >= self.journal_sync_s:
                self._sync_journal()

    def sync(self) -> None:
        """fsyncs the records not fsynced yet, e.g. when appends pause."""
        with self._lock:
            self._sync_journal()

    def close(self) -> None:
        """fsyncs and closes the open journal; a later append opens it again."""
        with self._lock:
            self._close_journal()

    def _open_journal(self, name: str) -> io.BufferedWriter:
        path = self.root / name
        make_dirs(path.parent)
        new = not path.exists()
        out = open(path, "ab")
        if new:  # the file's name must survive a crash too, not only its records
            fsync_path(path.parent)
        return out

    def _sync_journal(self) -> None:
        journal = self._journal
        if journal is not None and journal.dirty:
            self._fsync(journal.file.fileno())
            journal.synced_at, journal.dirty = self._clock(), False

    def _close_journal(self) -> None:
        if self._journal is not None:
            self._sync_journal()
            self._journal.file.close()
            self._journal = None

    def read_batches(self, name: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The journal's intact records in order; a damaged tail (a crash mid-append) is dropped."""
        path = self.root / name
        if not path.exists():
            return []
        data = path.read_bytes()
        records, at = [], 0
        while at < len(data):
            if len(data) - at < _HEADER.size:
                break
            magic, n, k, crc = _HEADER.unpack_from(data, at)
            end = at + _HEADER.size + 8 * n + 12 * k
            if magic != _MAGIC or end > len(data) or zlib.crc32(data[at + _HEADER.size : end]) != crc:
                break
            body = memoryview(data)[at + _HEADER.size : end]
            considered = np.frombuffer(body[: 8 * n], "<i8").astype(np.int64)
            kept = np.frombuffer(body[8 * n : 8 * (n + k)], "<i8").astype(np.int64)
            weights = np.frombuffer(body[8 * (n + k) :], "<f4").astype(np.float32)
            records.append((considered, kept, weights))
            at = end
        if at < len(data):
            log.warning("journal %s: dropped %d damaged bytes at its end (a write cut short)", path, len(data) - at)
        return records

    def list(self, folder: str, pattern: str) -> list[str]:
        """Names (relative to the root) of files in `folder` matching the regex `pattern`."""
        base = self.root / folder
        if not base.is_dir():
            return []
        return sorted(f"{folder}/{p.name}" for p in base.iterdir() if re.fullmatch(pattern, p.name))


def job_folder(job: str) -> str:
    """A folder name for a job name of any characters: readable where it can be, and unique."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", job)[:64]
    return f"jobs/{readable}-{zlib.crc32(job.encode()):08x}"
