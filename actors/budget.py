"""The pool budget as a Ray actor: one `PoolBudget` for the whole pool, and the record of every
sample it pruned, with its reason, in `state_dir` (`budget.npz`, replaced atomically after each
admission), so pruned samples stay pruned after a restart.

A shard is admitted once, with its reference scores: its embeddings place it in the budget's
clusters and, within a cluster, a lower reference loss counts as more valuable (a sample the
clean reference cannot fit is the likelier label error). Curators hear of every pruning from the
pipeline and never serve a pruned sample from then on; pruning runs here, off their path.
"""

from __future__ import annotations

import numpy as np
import ray

from actors.runtime import ProcessInfo
from loader.ids import make_ids
from loader.selection.pruning import LOW_VALUE, NEAR_DUPLICATE, PoolBudget
from loader.state_store import StateStore

BUDGET_FILE = "budget.npz"
REASONS = (NEAR_DUPLICATE, LOW_VALUE)  # stored as their position here


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class BudgetActor(ProcessInfo):
    def __init__(self, state_dir: str, max_samples: int, max_clusters: int, seed: int = 0) -> None:
        self._store, self._seed = StateStore(state_dir), seed
        self._budget = PoolBudget(max_samples, max_clusters=max_clusters, seed=seed)
        saved = self._store.load_arrays(BUDGET_FILE)
        self._admitted = np.zeros(0, np.int64)  # shard indices, sorted
        self._pruned = np.zeros(0, np.int64)  # sample ids, sorted
        self._reasons = np.zeros(0, np.int8)  # per pruned id, a position in REASONS
        if saved is not None:
            self._budget.reset({k[len("pool.") :]: v for k, v in saved.items() if k.startswith("pool.")})
            self._admitted, self._pruned, self._reasons = saved["admitted"], saved["pruned"], saved["reasons"]

    def admitted(self, index: int) -> bool:
        return bool(np.isin(index, self._admitted))

    def admit(self, index: int, ref_loss: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """Admits shard `index` (once; again is a no-op) and returns the ids pruned now, sorted."""
        if self.admitted(index):
            return np.zeros(0, np.int64)
        ids = make_ids(index, len(ref_loss))
        pruned = self._budget.admit(ids, embeddings, self._value(index, ref_loss))
        codes = np.array([REASONS.index(r) for r in pruned.reasons], np.int8)
        order = np.argsort(np.concatenate([self._pruned, pruned.ids]), kind="stable")
        self._pruned = np.concatenate([self._pruned, pruned.ids])[order]
        self._reasons = np.concatenate([self._reasons, codes])[order]
        self._admitted = np.union1d(self._admitted, [index]).astype(np.int64)
        self._save()
        return np.sort(pruned.ids)

    def _value(self, index: int, ref_loss: np.ndarray) -> np.ndarray:
        # Without a reference model (embeddings from a column) no sample is known to be worth more:
        # a value drawn at random (seeded by the shard) then favours neither old nor new ones.
        value = -np.asarray(ref_loss, np.float64)
        unknown = np.isnan(value)
        value[unknown] = -np.random.default_rng([self._seed, index]).random(int(unknown.sum()))
        return value

    def _save(self) -> None:
        state = {f"pool.{k}": v for k, v in self._budget.get_state().items()}
        self._store.save_arrays(BUDGET_FILE, {**state, "admitted": self._admitted, "pruned": self._pruned,
                                              "reasons": self._reasons})  # fmt: skip

    def revalue(self, index: int, ref_loss: np.ndarray) -> None:
        """New reference losses of shard `index` (a refreshed reference): the values its kept
        samples are compared by from now on. Nothing is pruned now; the next admission prunes."""
        if not self.admitted(index):
            return
        self._budget.update_value(make_ids(index, len(ref_loss)), self._value(index, ref_loss))
        self._save()

    def state(self) -> dict[str, np.ndarray]:
        """The budget's state (kept ids, embeddings, values, clusters and centroids), for tests
        and operators' tooling."""
        return self._budget.get_state()

    def pruned(self) -> np.ndarray:
        """Every id pruned so far, sorted."""
        return self._pruned

    def reasons(self, ids: np.ndarray) -> list[str]:
        """Why each of `ids` was pruned ('' for one that was not)."""
        at = np.searchsorted(self._pruned, ids)
        found = (at < len(self._pruned)) & (self._pruned[np.minimum(at, len(self._pruned) - 1)] == ids)
        return [REASONS[self._reasons[a]] if f else "" for a, f in zip(at.tolist(), found.tolist())]

    def stats(self) -> dict:
        return {
            "max_samples": self._budget.max_samples,
            "kept_samples": len(self._budget),
            "pruned_near_duplicate": int((self._reasons == 0).sum()),
            "pruned_low_value": int((self._reasons == 1).sum()),
            "clusters": int((self._budget.cluster_sizes() > 0).sum()),
        }
