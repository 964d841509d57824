"""The policy registry: name -> policy. A policy turns a super-batch into a served batch."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Policy(Protocol):
    name: str
    # Super-batch size as a multiple of the batch size (1 / keep ratio).
    oversample: int

    def weights(self, ids: np.ndarray) -> np.ndarray: ...


class Uniform:
    """Serves the shuffled stream as it comes; every sample weighs 1."""

    name = "uniform"
    oversample = 1

    def weights(self, ids: np.ndarray) -> np.ndarray:
        return np.ones(len(ids), dtype=np.float32)


POLICIES: dict[str, type] = {"uniform": Uniform}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
