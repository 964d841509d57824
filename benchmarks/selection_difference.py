"""How far two versions of the selection code choose differently, at the selection-cost benchmark's
headline setting (selection_drive.Setting(): learnability+bandit+diversity, B 256, rho 0.2).

Two measures, both over many batches with the same seeds:

- `trajectory`: the whole curator run end to end (feedback mode, as selection_cost.py drives it),
  once per version in its own process; the kept ids of every batch are written to an .npz and
  two such files compared. One choice made differently changes the memory, the losses reported
  and the bandit, so the runs can drift apart after it: this is the end-to-end difference.
- `replay`: one run of the current code in which every `select_diverse` call is also handed,
  with the same inputs (scores, embeddings, the memory's rows), to the `select_diverse` of
  another version's diversity.py: the difference of the algorithm alone, batch by batch, and the
  largest difference of the probabilities it returns.

    python selection_difference.py trajectory --out /tmp/new.npz           # current code
    PYTHONPATH=/tmp/old python selection_difference.py trajectory --out /tmp/old.npz
    python selection_difference.py compare /tmp/old.npz /tmp/new.npz
    python selection_difference.py replay --old /tmp/old/loader/selection/diversity.py

The fraction reported is (ids kept by one version and not by the other) / (ids kept), per batch.
Curator parts run with BLAS limited to one thread, as in the benchmark.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import numpy as np
from threadpoolctl import threadpool_limits

from selection_cost import warm
from selection_drive import Driver, Setting


def _kept_ids(driver: Driver, batches: int) -> list[np.ndarray]:
    """Runs `batches` full-size batches and returns every batch's kept ids (tails included), in
    the order they were chosen. (Ledgers of old epochs are dropped, so they are read as they come.)"""
    curator = driver.curator
    select = curator.select
    out: list[np.ndarray] = []

    def recording(epoch, candidates, learner_loss=None, *rest):
        select(epoch, candidates, learner_loss, *rest)
        out.append(np.sort(np.asarray(curator.epochs[epoch].ledger.ids[-1], np.int64)))

    curator.select = recording
    driver.run(batches)
    del curator.select
    return out


def _setting(args: argparse.Namespace) -> Setting:
    return Setting(pool=args.pool, memory=args.memory, dim=args.dim, score_spread=args.score_spread)


def trajectory(args: argparse.Namespace) -> None:
    import loader.selection.diversity as diversity

    with threadpool_limits(1):
        driver = Driver(_setting(args), seed=args.seed)
        kept = _kept_ids(driver, args.batches)
    lengths = np.array([len(k) for k in kept], np.int64)
    np.savez(args.out, ids=np.concatenate(kept), lengths=lengths)
    print(f"{len(kept)} batches, {lengths.sum()} ids from {diversity.__file__} -> {args.out}")


def _fraction(a: np.ndarray, b: np.ndarray) -> float:
    return float(len(np.setxor1d(a, b)) / 2 / max(len(a), 1))


def compare(args: argparse.Namespace) -> None:
    runs = []
    for path in (args.a, args.b):
        with np.load(path) as f:
            runs.append(np.split(f["ids"], np.cumsum(f["lengths"])[:-1]))
    n = min(len(runs[0]), len(runs[1]))
    fractions = np.array([_fraction(a, b) for a, b in zip(runs[0][:n], runs[1][:n])])
    first = int(np.flatnonzero(fractions > 0)[0]) if (fractions > 0).any() else None
    summary = {
        "batches": n,
        "batches_differing": int((fractions > 0).sum()),
        "first_differing_batch": first,
        "mean_fraction_of_ids_differing": round(float(fractions.mean()), 6),
        "max_fraction": round(float(fractions.max()), 6),
    }
    print(json.dumps(summary, indent=1))


def _load_old(path: str):
    spec = importlib.util.spec_from_file_location("old_diversity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replay(args: argparse.Namespace) -> None:
    import loader.selection.policies as policies

    old = _load_old(args.old)
    new_select = policies.select_diverse
    rows: list[dict] = []

    def both(scores, embeddings, k, memory, lam, chunk, selector, beta, rng):
        state = rng.bit_generator.state
        new = new_select(scores, embeddings, k, memory, lam, chunk, selector, beta, rng)
        if memory is not None:
            twin = old.EmbeddingMemory(memory.size)
            twin.reset(memory.get_state())
        else:
            twin = None
        # Same random stream for a stochastic selector; the old code's own topk if it has one.
        other = np.random.default_rng()
        other.bit_generator.state = state
        chooser = old.topk if selector.__name__ == "topk" and hasattr(old, "topk") else selector
        was = old.select_diverse(scores, embeddings, k, twin, lam, chunk, chooser, beta, other)
        rows.append({
            "n": len(scores),
            "fraction": _fraction(np.asarray(was.indices), np.asarray(new.indices)),
            "same_order": bool(np.array_equal(was.indices, new.indices)),
            "max_prob_difference": float(np.abs(np.asarray(was.probs) - np.asarray(new.probs)).max()) if len(scores) else 0.0,
        })  # fmt: skip
        return new

    policies.select_diverse = both
    with threadpool_limits(1):
        driver = Driver(_setting(args), seed=args.seed)
        warm(driver)
        driver.run(args.batches)
    fractions = np.array([r["fraction"] for r in rows])
    summary = {
        "calls": len(rows),
        "calls_differing": int((fractions > 0).sum()),
        "calls_in_another_order": int(sum(not r["same_order"] for r in rows)),
        "mean_fraction_of_ids_differing": round(float(fractions.mean()), 6),
        "max_fraction": round(float(fractions.max()), 6),
        "max_prob_difference": max(r["max_prob_difference"] for r in rows),
    }
    print(json.dumps(summary, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("trajectory", help="run the current code, write kept ids")
    t.add_argument("--out", required=True)
    r = sub.add_parser("replay", help="current run, every select_diverse also given to an old diversity.py")
    r.add_argument("--old", required=True, help="path of the other version's loader/selection/diversity.py")
    for p in (t, r):
        p.add_argument("--batches", type=int, default=400, help="full-size batches (400)")
        p.add_argument("--pool", type=int, default=20_000, help="pool size (2*10^4, as selection_cost --quick)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--memory", type=int, default=Setting.memory, help="memory size (1024)")
        p.add_argument("--dim", type=int, default=Setting.dim, help="embedding dimension (64)")
        p.add_argument("--score-spread", type=float, default=Setting.score_spread,
                       help="multiplies every loss (1; 0 makes every score equal)")
    c = sub.add_parser("compare", help="compare two trajectory files")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args(argv)
    {"trajectory": trajectory, "compare": compare, "replay": replay}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
