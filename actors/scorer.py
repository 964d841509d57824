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
        embedding_column: str | None = None, loss_reference: ModelSpec | None = None,
    ) -> None:  # fmt: skip
        self._device = best_device()
        self._columns = (input_column, label_column)
        self._embedding_column = embedding_column
        # Two roles: embeddings come from the model the service started with (or a column) for
        # its whole life, since clusters, centroids, the budget and the diversity memory are all in
        # that space; reference losses come from `loss_reference`, which `set_reference` replaces
        # (a refreshed reference for a pool whose tasks changed). Until then both are one model.
        self._embedder = build_model(reference, self._device) if reference is not None else None
        self._embedding_fingerprint = f"embedding column {embedding_column}" if embedding_column is not None else (
            reference.fingerprint() if reference is not None else ""
        )  # fmt: skip
        self._embedder_fingerprint = reference.fingerprint() if reference is not None else ""
        self._reference, self._loss_fingerprint = self._embedder, self._embedder_fingerprint
        if loss_reference is not None and reference is not None and loss_reference != reference:
            self.set_reference(loss_reference)
        self._store = StateStore(state_dir) if state_dir else None
        # Shard index -> (reference loss, embedding, fingerprint of the model that gave the loss):
        # score once, serve every epoch and job; a new reference recomputes only the losses.
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, str]] = {}
        # Job -> (learner spec, model, step of the newest snapshot).
        self._learners: dict[str, tuple[ModelSpec, object, int]] = {}
        self._reference_samples = 0
        self._reference_seconds = 0.0
        # Job -> [samples, seconds] of learner scoring.
        self._learner_cost: dict[str, list] = {}

    def set_reference(self, spec: ModelSpec) -> str:
        """Replaces the model that gives reference losses (same role, new weights); returns its
        fingerprint. Scores computed before are recomputed when next asked for."""
        fingerprint = spec.fingerprint()
        same = self._embedder is not None and fingerprint == self._embedder_fingerprint
        self._reference = self._embedder if same else build_model(spec, self._device)
        self._loss_fingerprint = fingerprint
        return self._loss_fingerprint

    def device(self) -> str:
        return str(self._device)

    def score(self, result: ReadResult) -> tuple[np.ndarray, np.ndarray]:
        """(reference loss per row, embedding rows) of the shard; NaN losses without a reference."""
        known = self._cache.get(result.index) or self._saved(result)
        if known is not None and known[2] == self._loss_fingerprint:
            self._cache[result.index] = known
            return known[0], known[1]
        if self._reference is None and self._embedding_column is None:
            raise RuntimeError("this service has no reference model (set `reference` in its config)")
        started = time.perf_counter()
        embedding = known[1] if known is not None else None
        if self._reference is None:  # embeddings only; no reference loss to give (NaN)
            embedding = embedding_rows(result.table, self._embedding_column)
            ref_loss = np.full(len(embedding), np.nan, np.float32)
        else:
            inputs, labels = inputs_from_table(result.table, *self._columns)
            ref_loss, body = reference_scores(self._reference, inputs, labels, device=self._device)
            if embedding is None and self._embedding_column is not None:
                embedding = embedding_rows(result.table, self._embedding_column)
            elif embedding is None:  # from the embedder, which a refreshed reference is not
                same = self._reference is self._embedder
                embedding = body if same else reference_scores(self._embedder, inputs, labels, device=self._device)[1]
        self._reference_seconds += time.perf_counter() - started
        self._reference_samples += len(ref_loss)
        if self._store is not None:
            self._store.save_arrays(self._score_file(result.index), {
                "uri": np.array(result.uri), "model": np.array(self._loss_fingerprint),
                "embedder": np.array(self._embedding_fingerprint), "ref_loss": ref_loss, "embedding": embedding,
            })  # fmt: skip
        self._cache[result.index] = (ref_loss, embedding, self._loss_fingerprint)
        return ref_loss, embedding

    @staticmethod
    def _score_file(index: int) -> str:
        return f"scores/{index}.npz"

    def _saved(self, result: ReadResult) -> tuple[np.ndarray, np.ndarray, str] | None:
        """Scores of this shard from state_dir, if the same embedder scored the same shard (the
        loss's fingerprint comes along: the caller recomputes a loss of another reference)."""
        saved = self._store.load_arrays(self._score_file(result.index)) if self._store is not None else None
        if saved is None or str(saved["uri"]) != result.uri or "embedder" not in saved:
            return None
        if str(saved["embedder"]) != self._embedding_fingerprint:
            return None
        if result.table is not None and len(saved["ref_loss"]) != result.table.num_rows:
            return None
        return saved["ref_loss"], saved["embedding"], str(saved["model"])

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
            "reference_fingerprint": self._loss_fingerprint,
            "learner": {job: tuple(cost) for job, cost in self._learner_cost.items()},
        }

