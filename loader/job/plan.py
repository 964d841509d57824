"""A batch plan: what the curator decides about a batch, without its payload.

The curator chooses ids and weights; the gateway turns a plan into the bytes a trainer receives
by gathering the rows from the decoded shard tables (`loader.gather.encode_plan`), which Ray's
object store shares between processes of a node without copying. So payload bytes never pass
through the curator, and a plan can always be gathered again, from the shards, by id.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from loader.ids import shard_of


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    ids: np.ndarray  # int64 [rows], in batch order
    weights: np.ndarray  # float32 [rows]
    # The pool's columns, `_id` included: what the rows are gathered as. None: not known yet (a
    # restarted curator that has read no shard), then the first of the rows' shards decides.
    schema: pa.Schema | None
    uris: tuple[tuple[int, str], ...] = ()  # (shard index, URI) of every shard the rows come from

    @property
    def rows(self) -> int:
        return len(self.ids)

    def shards(self) -> list[int]:
        """The shard indices of the rows, ascending."""
        return np.unique(shard_of(self.ids)).tolist()

    def with_uris(self, uris: dict[int, str]) -> BatchPlan:
        return dataclasses.replace(self, uris=tuple((s, uris[s]) for s in self.shards()))
