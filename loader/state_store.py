"""The service's state on disk (`state_dir`): what a restarted service, or a restarted actor, needs.

Layout under the root:
    registry.json                 shard URIs, their indices and states
    scores/<index>.npz            one shard's reference losses and embeddings
    jobs/<job>/spec.json          the job's batch size, policy, options ...
    jobs/<job>/soft.npz           learner losses, clusters, bandit, memory (periodic snapshot)
    jobs/<job>/epoch-<n>.log      every batch selected in epoch n, appended before it is served

Whole files are replaced atomically (write, fsync, rename), so a crash leaves the old or the new
version, never half of one. Journals are append-only records, each with its length and a CRC: a
record cut short by a crash is detected and dropped, and since a record is written before its
batch can be served, a dropped record is a batch nobody received.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger("loader.state")

_MAGIC = b"LDRJ"
# magic, considered count, kept count, crc32 of the body
_HEADER = struct.Struct("<4sIII")


class StateStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- whole files -----------------------------------------------------------------------------

    def save_json(self, name: str, value: object) -> None:
        self._replace(name, json.dumps(value, indent=1, sort_keys=True).encode())

    def load_json(self, name: str) -> object | None:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            np.savez(tmp, **arrays)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)

    def load_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        path = self.root / name
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def _replace(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)

    # -- journals --------------------------------------------------------------------------------

    def append_batch(self, name: str, considered: np.ndarray, kept: np.ndarray, weights: np.ndarray) -> None:
        """One selected batch: the candidates it was chosen from, the ids kept and their weights."""
        considered = np.ascontiguousarray(considered, dtype="<i8")
        kept = np.ascontiguousarray(kept, dtype="<i8")
        weights = np.ascontiguousarray(weights, dtype="<f4")
        if len(kept) != len(weights):
            raise ValueError(f"{len(kept)} kept ids but {len(weights)} weights")
        body = considered.tobytes() + kept.tobytes() + weights.tobytes()
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:
            out.write(_HEADER.pack(_MAGIC, len(considered), len(kept), zlib.crc32(body)) + body)

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
