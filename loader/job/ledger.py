"""Delivery of one epoch: the global sequence of batches, who has acknowledged what, and lookup.

Global batch g of an epoch goes to rank g % world_size as that rank's sequence number
g // world_size. The ledger keeps every chosen batch's ids and weights for the epoch, so a trainer
resuming from an older `state_dict` gets the very same batches again; encoded payloads are kept
only until the rank acknowledges them. It knows nothing of scores or of how batches are chosen.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Ready:
    seq: int
    rows: int
    payload: bytes


@dataclasses.dataclass
class Pending:
    pass


@dataclasses.dataclass
class EndOfEpoch:
    batches: int


@dataclasses.dataclass
class Materialize:
    """An acknowledged batch is wanted again: its rows must be re-read from these ids."""

    seq: int
    ids: np.ndarray
    weights: np.ndarray


@dataclasses.dataclass
class Failed:
    message: str


Lookup = Ready | Pending | EndOfEpoch | Materialize | Failed

# No learner snapshot was used to choose the batch.
NO_SNAPSHOT = -1


class Ledger:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.ids: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self._payloads: dict[int, bytes] = {}
        # Step of the learner snapshot each batch was chosen with (snapshot mode).
        self._snapshot_steps: list[int] = []
        # Per rank: the highest acknowledged sequence number (payloads up to it are dropped).
        self.acked: dict[int, int] = {}
        # Highest global batch index any rank has asked for.
        self.wanted = -1
        self.error = ""
        # No batch will be added: lookups past the end get EndOfEpoch.
        self.closed = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def unacked(self) -> int:
        return len(self._payloads)

    def append(self, kept: np.ndarray, weights: np.ndarray, payload: bytes | None, snapshot_step: int = NO_SNAPSHOT) -> int:
        """Adds the next batch (payload None: rebuilt from its ids when asked for); its index."""
        if self.closed:
            raise RuntimeError("a batch added to a closed epoch")
        g = len(self.ids)
        self.ids.append(np.asarray(kept, np.int64))
        self.weights.append(np.asarray(weights, np.float32))
        self._snapshot_steps.append(snapshot_step)
        if payload is not None:
            self._payloads[g] = payload
        return g

    def snapshot_step(self, g: int) -> int:
        return self._snapshot_steps[g]

    def global_index(self, rank: int, seq: int) -> int:
        return seq * self.world_size + rank

    def ask(self, rank: int, seq: int) -> int:
        """Records that `rank` wants its batch `seq`; returns its global index."""
        g = self.global_index(rank, seq)
        self.wanted = max(self.wanted, g)
        return g

    def lookup(self, rank: int, seq: int) -> Lookup:
        if self.error:
            return Failed(self.error)
        g = self.ask(rank, seq)
        if g < len(self.ids):
            payload = self._payloads.get(g)
            if payload is None:
                return Materialize(seq, self.ids[g], self.weights[g])
            return Ready(seq, len(self.ids[g]), payload)
        if self.closed:
            return EndOfEpoch(len(self.ids) // self.world_size)
        return Pending()

    def ack(self, rank: int, seq: int) -> None:
        first = self.acked.get(rank, -1) + 1
        for s in range(first, seq + 1):
            self._payloads.pop(self.global_index(rank, s), None)
        self.acked[rank] = max(seq, first - 1)

    def steps_of(self, rank: int) -> int:
        """Batches `rank` has acknowledged: its trainer's step count in this epoch."""
        return self.acked.get(rank, -1) + 1
