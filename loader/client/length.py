"""`len(loader)` from what the service reports: how an epoch is cut into batches per rank, as
loader/epoch.py cuts it. Pure functions of a Stats message."""

from __future__ import annotations

import math

from loader.v1 import loader_pb2 as pb


def candidates_per_batch(stats: pb.Stats, job: str, policy: str, options: dict, batch_size: int) -> int | None:
    """Candidates per batch of `job` (as loader.selection.options.super_batch_size): the job's
    policy and options as the service reports them, else the client's; None while the service's
    defaults decide it and the job is not there to show them."""
    info = next((known for known in stats.jobs if known.job == job), None)
    if info is not None:
        policy, options = info.policy, dict(info.options)
    if policy.split("+")[0] == "uniform":  # keep ratio 1, whatever the options say
        return batch_size
    if not policy or "keep_ratio" not in options:
        return None
    return max(batch_size, round(batch_size / float(options["keep_ratio"])))


def batches_per_rank(stats: pb.Stats, candidates: int, world_size: int) -> int:
    """Every readable sample once, in super-batches of `candidates`, their number rounded up to a
    multiple of world_size so that every rank gets as many (no drop_last)."""
    rows = sum(shard.rows for shard in stats.shards if shard.state == "ok")
    if stats.HasField("budget"):  # samples the pool budget pruned are never served again
        rows -= stats.budget.pruned_near_duplicate + stats.budget.pruned_low_value
    return math.ceil(math.ceil(max(rows, 0) / candidates) / world_size)
