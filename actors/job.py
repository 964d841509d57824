"""JobHandle: the gateway's one way to a job. It holds the job's curator actor (no raw Ray handle
leaves `actors/`), the job's live trainer streams and its idle clock; `Jobs` holds them by name.

Every method that reaches the actor returns something to `await`, so the gateway's event loop
never blocks on Ray.
"""

from __future__ import annotations

import time

import numpy as np

from loader.errors import JobConflict
from loader.job.spec import JobSpec


class JobHandle:
    def __init__(self, spec: JobSpec, actor, tables=None) -> None:
        # `tables`: the pipeline's actors.gather.ShardTables, which turns batch plans into payloads.
        self.spec, self._actor, self._tables = spec, actor, tables
        # Rank -> (its live stream, the epoch it is on); a newer stream for a rank supersedes it.
        self._streams: dict[int, tuple[object, int]] = {}
        self.idle_since: float | None = time.monotonic()
        # Learner snapshots received (snapshot mode) and the step of the newest.
        self.pushes, self.weights_step = 0, 0

    # -- the curator -----------------------------------------------------------------------------

    def next_batches(self, rank: int, epoch: int, seq: int, count: int, acked: int = -1):
        return self._actor.next_batches.remote(rank, epoch, seq, count, acked)

    async def payload(self, plan):
        """A `Ready` batch's bytes: its plan gathered here, in the gateway's process."""
        return await self._tables.payload(plan)

    def ack(self, rank: int, epoch: int, seq: int) -> None:
        self._actor.ack.remote(rank, epoch, seq)

    def feedback(self, ids: np.ndarray, losses: np.ndarray):
        return self._actor.feedback.remote(ids, losses)

    def stats(self):
        return self._actor.stats.remote()

    def prune(self, ids: np.ndarray):
        return self._actor.prune.remote(ids)

    def reference_replaced(self):
        return self._actor.reference_replaced.remote()

    def shards_added(self):
        return self._actor.shards_added.remote()

    def checkpoint(self):
        return self._actor.checkpoint.remote()

    def cluster_of(self, ids: np.ndarray):
        return self._actor.cluster_of.remote(np.asarray(ids, np.int64))

    def snapshot_pushed(self, step: int):
        self.pushes += 1
        self.weights_step = step
        return self._actor.snapshot_pushed.remote(step)

    @property
    def actor(self):
        """The curator actor, for the pipeline's supervision and fault tests; not for the gateway."""
        return self._actor

    # -- trainer streams -------------------------------------------------------------------------

    @property
    def streams(self) -> int:
        return len(self._streams)

    def open_stream(self, rank: int, epoch: int, stream: object, epochs_kept: int) -> object | None:
        """Registers `stream` as rank's; returns the stream it supersedes, if any. JobConflict if
        the epoch is so far ahead of another rank's that the curator would forget that one's."""
        for other, (_, other_epoch) in self._streams.items():
            if other != rank and other_epoch <= epoch - epochs_kept:
                raise JobConflict(
                    f"Hello.epoch {epoch} is too far ahead: rank {other} of job {self.spec.job!r} is still on "
                    f"epoch {other_epoch}, and the service keeps only the newest {epochs_kept} epochs of a job"
                )
        previous = self._streams.get(rank)
        self._streams[rank] = (stream, epoch)
        self.idle_since = None
        return previous[0] if previous is not None else None

    def close_stream(self, rank: int, stream: object) -> None:
        known = self._streams.get(rank)
        if known is not None and known[0] is stream:
            del self._streams[rank]
        if not self._streams:
            self.idle_since = time.monotonic()

    def idle_for(self, now: float) -> float:
        return 0.0 if self.idle_since is None else now - self.idle_since
