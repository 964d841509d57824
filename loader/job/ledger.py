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
        self.reset()

    def reset(self, state: dict[str, np.ndarray] | None = None) -> None:
        """An empty epoch (state None) or as saved by `get_state`, for the same world size.

        Payloads are not state: a restored batch is looked up as `Materialize`, to be re-read from
        its ids. Nor is `error`, which belongs to the run that failed."""
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
        if state is None:
            return
        rows = np.asarray(state["rows"], np.int64)
        bounds = np.concatenate([[0], np.cumsum(rows)])
        if not (len(state["ids"]) == len(state["weights"]) == bounds[-1] and len(state["snapshot_steps"]) == len(rows)):
            raise ValueError(f"inconsistent ledger state: {len(rows)} batches of {bounds[-1]} rows in all")
        for a, b in zip(bounds[:-1], bounds[1:]):
            self.ids.append(np.array(state["ids"][a:b], np.int64))
            self.weights.append(np.array(state["weights"][a:b], np.float32))
        self._snapshot_steps = [int(step) for step in state["snapshot_steps"]]
        self.acked = dict(zip(state["acked_ranks"].tolist(), state["acked_seqs"].tolist()))
        self.wanted = int(state["wanted"])
        self.closed = bool(state["closed"])

    def get_state(self) -> dict[str, np.ndarray]:
        """Every batch's ids and weights (flat, with each batch's length), acknowledgements, how
        far ranks have asked, and whether the epoch is closed."""
        return {
            "rows": np.array([len(ids) for ids in self.ids], np.int64),
            "ids": np.concatenate(self.ids or [np.zeros(0, np.int64)]),
            "weights": np.concatenate(self.weights or [np.zeros(0, np.float32)]),
            "snapshot_steps": np.array(self._snapshot_steps, np.int64),
            # Ranks in the order they first acknowledged, so the restored dict is the same too.
            "acked_ranks": np.array(list(self.acked), np.int64),
            "acked_seqs": np.array(list(self.acked.values()), np.int64),
            "wanted": np.array(self.wanted, np.int64),
            "closed": np.array(self.closed),
        }

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

    def newest_ids(self, n: int) -> np.ndarray:
        """The ids of the last `n` rows chosen, in the order of the global batch sequence."""
        if n <= 0 or not self.ids:
            return np.zeros(0, np.int64)
        tail, rows = [], 0
        for ids in reversed(self.ids):
            tail.append(ids)
            rows += len(ids)
            if rows >= n:
                break
        return np.concatenate(tail[::-1])[-n:]

    def steps_of(self, rank: int) -> int:
        """Batches `rank` has acknowledged: its trainer's step count in this epoch."""
        return self.acked.get(rank, -1) + 1
