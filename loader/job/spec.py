"""What a job is: the settings every trainer of it must agree on, and the service's knobs for it."""

from __future__ import annotations

import dataclasses

from loader.selection.options import SelectionOptions


@dataclasses.dataclass(frozen=True)
class JobSpec:
    job: str
    batch_size: int
    world_size: int
    policy: str
    seed: int
    options: SelectionOptions = SelectionOptions()
    # Planned epochs (0: unknown); lets a policy anneal near the end of training.
    total_epochs: int = 0
    # A stream job: passes over the living pool one after another (see `Curator.start_epoch`).
    stream: bool = False

    def conflict(self, other: "JobSpec") -> str:
        """Why `other` cannot join this job, or '' if it can."""
        for field in ("batch_size", "world_size", "policy", "seed", "options", "total_epochs", "stream"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"job {self.job!r} runs with {field}={mine!r}, got {field}={theirs!r}"
        return ""


@dataclasses.dataclass(frozen=True)
class CuratorSettings:
    shuffle_rows: int = 4096
    # How far reading runs ahead of selection, in super-batches per rank.
    ready_batches: int = 16
    # How many batches beyond the one a rank asks for are chosen ahead of its request. Small on
    # purpose: a batch chosen early is chosen with older learner losses (snapshot mode).
    select_ahead: int = 0
    keep_epochs: int = 2
    # How often what selection has learned is written to the state folder (journals: per batch).
    checkpoint_s: float = 30.0
