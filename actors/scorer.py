"""Scorer actors: reference losses and embeddings once per sample, and learner losses from
the snapshots trainers push (snapshot mode). On a GPU when Ray has one."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import ray

from actors.runtime import ProcessInfo
from loader.reader import ReadResult
from loader.scoring import ModelSpec, best_device, build_model, inputs_from_table, learner_losses, load_state_bytes, reference_scores
from loader.state_store import StateStore
from loader.tensors import to_numpy

log = logging.getLogger("loader.scorer")


def embedding_rows(table: pa.Table, column: str) -> np.ndarray:
    """float32 [rows, d]: a numeric column (a tensor or fixed-size list per row) as embeddings."""
    if column not in table.column_names:
        raise ValueError(f"the embedding column {column!r} is not in the shard (columns: {table.column_names})")
    values = np.asarray(to_numpy(table.column(column)), np.float32)
    return values.reshape(len(values), -1)


# Its calls are pure, so Ray may repeat one cut off by a crash on the restarted actor; a shard that
# crashes it every time is given up after a few tries (and then quarantined by the curator).
@ray.remote(num_cpus=0.25, max_restarts=-1, max_task_retries=3)
class ScorerActor(ProcessInfo):
    def __init__(
        self, reference: ModelSpec | None, input_column: str, label_column: str, state_dir: str | None = None,
        embedding_column: str | None = None,
    ) -> None:  # fmt: skip
        self._device = best_device()
        self._columns = (input_column, label_column)
        self._embedding_column = embedding_column
        self._reference = build_model(reference, self._device) if reference is not None else None
        # Saved scores are valid for the model and the embedding source that made them.
        self._fingerprint = reference.fingerprint() if reference is not None else ""
        if embedding_column is not None:
            self._fingerprint += f"|embedding column {embedding_column}"
        self._store = StateStore(state_dir) if state_dir else None
        # Shard index -> (reference loss, embedding): score once, serve every epoch and job.
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Job -> (learner spec, model, step of the newest snapshot).
        self._learners: dict[str, tuple[ModelSpec, object, int]] = {}
        self._reference_samples = 0
        self._reference_seconds = 0.0
        # Job -> [samples, seconds] of learner scoring.
        self._learner_cost: dict[str, list] = {}

    def device(self) -> str:
        return str(self._device)

    def score(self, result: ReadResult) -> tuple[np.ndarray, np.ndarray]:
        cached = self._cache.get(result.index) or self._saved(result)
        if cached is None:
            if self._reference is None and self._embedding_column is None:
                raise RuntimeError("this service has no reference model (set `reference` in its config)")
            started = time.perf_counter()
            if self._reference is None:  # embeddings only; no reference loss to give (NaN)
                embedding = embedding_rows(result.table, self._embedding_column)
                cached = np.full(len(embedding), np.nan, np.float32), embedding
            else:
                inputs, labels = inputs_from_table(result.table, *self._columns)
                cached = reference_scores(self._reference, inputs, labels, device=self._device)
                if self._embedding_column is not None:
                    cached = cached[0], embedding_rows(result.table, self._embedding_column)
            self._reference_seconds += time.perf_counter() - started
            self._reference_samples += len(cached[0])
            if self._store is not None:
                self._store.save_arrays(self._score_file(result.index), {
                    "uri": np.array(result.uri), "model": np.array(self._fingerprint),
                    "ref_loss": cached[0], "embedding": cached[1],
                })  # fmt: skip
        self._cache[result.index] = cached
        return cached

    @staticmethod
    def _score_file(index: int) -> str:
        return f"scores/{index}.npz"

    def _saved(self, result: ReadResult) -> tuple[np.ndarray, np.ndarray] | None:
        """Scores of this shard from state_dir, if the same model scored the same shard."""
        saved = self._store.load_arrays(self._score_file(result.index)) if self._store is not None else None
        if saved is None or str(saved["uri"]) != result.uri or str(saved["model"]) != self._fingerprint:
            return None
        if result.table is not None and len(saved["ref_loss"]) != result.table.num_rows:
            return None
        return saved["ref_loss"], saved["embedding"]

    def set_learner(self, job: str, spec: ModelSpec, weights: bytes, step: int) -> int:
        known = self._learners.get(job)
        model = known[1] if known is not None and known[0] == spec else build_model(spec, self._device, key="options.learner")
        load_state_bytes(model, weights)
        model.eval()
        self._learners[job] = (spec, model, step)
        return step

    def drop_learner(self, job: str) -> None:
        """Frees the job's learner snapshot (the job was released; a push brings it back)."""
        self._learners.pop(job, None)

    def learner_loss(self, job: str, table: pa.Table) -> tuple[np.ndarray | None, int]:
        """Per-sample loss of the job's newest snapshot and that snapshot's step; (None, -1)
        before the first push (the curator then falls back to reported losses)."""
        known = self._learners.get(job)
        if known is None:
            return None, -1
        started = time.perf_counter()
        inputs, labels = inputs_from_table(table, *self._columns)
        losses = learner_losses(known[1], inputs, labels, device=self._device)
        cost = self._learner_cost.setdefault(job, [0, 0.0])
        cost[0] += len(labels)
        cost[1] += time.perf_counter() - started
        return losses, known[2]

    def stats(self) -> dict:
        return {
            "device": str(self._device),
            "reference_samples": self._reference_samples,
            "reference_seconds": self._reference_seconds,
            "learner": {job: tuple(cost) for job, cost in self._learner_cost.items()},
        }

