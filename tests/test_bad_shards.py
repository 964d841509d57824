"""Every kind of bad shard, mixed into a pool of good ones: it is quarantined with its URI and a
reason that names the problem (in GetStats and in the registry's log), and the epoch still
delivers every row of the good shards exactly once, under `uniform` and under a curated policy."""

from __future__ import annotations

import dataclasses
import io
import logging.handlers
import os
import shutil
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from loader import RemoteLoader
from loader.ids import make_ids
from loader.sources import read_shard
from loader.sources.writers import write_parquet, write_tar
from loader.tensors import to_numpy
from tests.helpers import epoch_ids, raw_tar

ROWS = 16  # rows of each bad shard that has rows at all
CALL_TIMEOUT_S = 60


# -- making bad shards from good rows ---------------------------------------------------------------


def columns_of(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: to_numpy(table.column(name)) for name in table.column_names}


def samples(columns: dict[str, np.ndarray]) -> list[dict]:
    n = len(next(iter(columns.values())))
    return [{k: (v[i] if v.ndim > 1 else v[i].item()) for k, v in columns.items()} for i in range(n)]


def npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def tar_members(columns: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
    members = []
    for i, sample in enumerate(samples(columns)):
        for name, value in sample.items():
            members.append((f"{i:09d}.{name}.npy", npy(np.asarray(value))))
    return members


def cut(path: str, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def garbage(path: str, _cols) -> None:
    open(path, "wb").write(np.random.default_rng(7).bytes(8192))


def good_tar(path: str, cols) -> None:
    write_tar(path, samples(cols))


def good_parquet(path: str, cols) -> None:
    write_parquet(path, cols)


def member_index(members: list[tuple[str, bytes]], name: str) -> int:
    return [member for member, _ in members].index(name)


def truncated_tar(path: str, cols) -> None:
    write_tar(path, samples(cols))
    cut(path)


def undecodable_member(path: str, cols) -> None:
    members = tar_members(cols)
    at = member_index(members, "000000003.x.npy")
    members[at] = (members[at][0], b"this is not an npy array")
    raw_tar(path, members)


def broken_npy_header(path: str, cols) -> None:
    # numpy's header parser raises tokenize.TokenError here, not ValueError.
    members = tar_members(cols)
    at = member_index(members, "000000003.x.npy")
    name, payload = members[at]
    members[at] = (name, payload.replace(b"(40,)", b"(40, "))
    raw_tar(path, members)


def without(column: str, writer: Callable) -> Callable:
    return lambda path, cols: writer(path, {k: v for k, v in cols.items() if k != column})


def with_x(transform: Callable[[np.ndarray], np.ndarray], writer: Callable) -> Callable:
    return lambda path, cols: writer(path, {**cols, "x": transform(cols["x"])})


def one_sample_lacks_label(path: str, cols) -> None:
    members = [(name, data) for name, data in tar_members(cols) if name != "000000005.y.npy"]
    raw_tar(path, members)


def empty_tar(path: str, _cols) -> None:
    raw_tar(path, [])


def empty_parquet(path: str, cols) -> None:
    pq.write_table(pa.table({"y": pa.array([], pa.int64())}), path)


def other_schema(writer: Callable) -> Callable:
    other = {"length": np.arange(ROWS, dtype=np.int64), "embedding": np.ones((ROWS, 8), np.float32)}
    return lambda path, cols: writer(path, other)


def truncated_parquet(path: str, cols) -> None:
    write_parquet(path, cols)
    cut(path)


def corrupt_parquet_page(path: str, cols) -> None:
    """Flips the last bytes of the first column chunk, which lie inside a data page's body."""
    write_parquet(path, cols)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size
    data = bytearray(open(path, "rb").read())
    for i in range(end - 8, end):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def wider(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, x[:, :1]], axis=1)


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    suffix: str
    make: Callable[[str, dict], None]
    fragment: str
    # "" bad from the start; "registered": deleted after the service registered it, before any
    # read; "later": served in epoch 0, then truncated or deleted before epoch 1.
    when: str = ""
    later: Callable[[str], None] | None = None


KINDS = [
    Kind("tar-truncated", "tar", truncated_tar, "truncated tar"),
    Kind("tar-garbage", "tar", garbage, "not a readable tar archive"),
    Kind("tar-undecodable-member", "tar", undecodable_member, "member '000000003.x.npy': cannot decode as .npy"),
    Kind("tar-broken-npy-header", "tar", broken_npy_header, "cannot decode as .npy: TokenError"),
    Kind("tar-missing-column", "tar", without("y", good_tar), "schema differs from the pool's: lacks column 'y' (int64)"),
    Kind("tar-sample-lacks-column", "tar", one_sample_lacks_label, "sample '000000005' lacks column 'y'"),
    Kind("tar-wrong-dtype", "tar", with_x(lambda x: x.astype(np.float64), good_tar), "column 'x' is float64[40], the pool's is float32[40]"),
    Kind("tar-wrong-shape", "tar", with_x(wider, good_tar), "column 'x' is float32[41], the pool's is float32[40]"),
    Kind("tar-empty", "tar", empty_tar, "empty shard"),
    Kind("tar-other-schema", "tar", other_schema(good_tar), "schema differs from the pool's: lacks column 'noisy' (int64)"),
    Kind("tar-vanished-after-registration", "tar", good_tar, "not found", when="registered"),
    Kind("tar-truncated-between-epochs", "tar", good_tar, "truncated tar", when="later", later=cut),
    Kind("tar-deleted-between-epochs", "tar", good_tar, "not found", when="later", later=os.remove),
    Kind("parquet-truncated", "parquet", truncated_parquet, "truncated parquet: no footer"),
    Kind("parquet-garbage", "parquet", garbage, "not a readable parquet file"),
    Kind("parquet-corrupt-page", "parquet", corrupt_parquet_page, "CRC checksum verification failed"),
    Kind("parquet-missing-column", "parquet", without("y", good_parquet), "schema differs from the pool's: lacks column 'y' (int64)"),
    Kind("parquet-wrong-dtype", "parquet", with_x(lambda x: x.astype(np.float64), good_parquet), "column 'x' is float64[40], the pool's is float32[40]"),
    Kind("parquet-wrong-shape", "parquet", with_x(wider, good_parquet), "column 'x' is float32[41], the pool's is float32[40]"),
    Kind("parquet-empty", "parquet", empty_parquet, "empty shard: 0 rows"),
    Kind("parquet-other-schema", "parquet", other_schema(good_parquet), "schema differs from the pool's: lacks column 'noisy' (int64)"),
    Kind("parquet-vanished-after-registration", "parquet", good_parquet, "not found", when="registered"),
    Kind("parquet-truncated-between-epochs", "parquet", good_parquet, "truncated parquet: no footer", when="later", later=cut),
]  # fmt: skip


# -- the service ------------------------------------------------------------------------------------


def capture_registry_log(pipeline) -> Callable[[], list[str]]:
    """Quarantines are logged by the registry actor, in its own process: a handler installed
    there keeps the records, and the returned function fetches their messages."""
    registry = pipeline.actors()["registry"][0]

    def install(actor) -> None:
        actor._test_records = logging.handlers.BufferingHandler(capacity=100_000)
        logging.getLogger("loader.registry").addHandler(actor._test_records)

    ray.get(registry.__ray_call__.remote(install), timeout=60)
    return lambda: ray.get(
        registry.__ray_call__.remote(lambda actor: [r.getMessage() for r in actor._test_records.buffer]), timeout=60
    )


def expected_ids(paths: list[str], first_index: int = 0) -> np.ndarray:
    """Sample ids of `paths`, registered in this order from `first_index` on."""
    return np.concatenate([make_ids(first_index + i, read_shard(p).num_rows) for i, p in enumerate(paths)])


@dataclasses.dataclass
class Run:
    paths: dict[str, str]  # kind name -> shard path
    index: dict[str, int]  # shard path -> registry index
    good_ids: np.ndarray  # good shards' ids, served in every epoch
    later_ids: np.ndarray  # ids of the shards bad only from epoch 1 on
    epochs: list[np.ndarray]  # served ids per epoch
    stats: list  # GetStats after each epoch
    log: list[str]


def good_shards(root, mnist_tar, mnist_parquet) -> list[str]:
    """Two tar and two Parquet shards of the same columns: the pool's schema is theirs."""
    paths = []
    for i, src in enumerate(mnist_tar["train"][:2] + mnist_parquet["train"][:2]):
        paths.append(str(root / f"good-{i}{os.path.splitext(src)[1]}"))
        shutil.copy(src, paths[-1])
    return paths


@pytest.fixture(scope="module")
def uniform_run(serve, tmp_path_factory, mnist_tar, mnist_parquet) -> Run:
    root = tmp_path_factory.mktemp("bad_shards")
    good = good_shards(root, mnist_tar, mnist_parquet)
    rows = columns_of(read_shard(good[0]).slice(0, ROWS))
    paths = {}
    for kind in KINDS:
        paths[kind.name] = str(root / f"{kind.name}.{kind.suffix}")
        kind.make(paths[kind.name], rows)
    # Good shards first: the pool's schema is that of its first readable shard.
    order = good + [paths[k.name] for k in KINDS]
    # Small batches and little read-ahead: the shard read first (alone, for the pool's schema)
    # already fills more batches than the curator may hold ready.
    svc = serve(order, shuffle_rows=64, ready_batches=2)
    log = capture_registry_log(svc.pipeline)
    for kind in KINDS:
        if kind.when == "registered":
            os.remove(paths[kind.name])
    later = [paths[k.name] for k in KINDS if k.when == "later"]
    index = {path: i for i, path in enumerate(order)}
    later_ids = np.concatenate([make_ids(index[p], read_shard(p).num_rows) for p in later])
    epochs, stats = [], []
    with RemoteLoader(svc.address, job="uniform", batch_size=8, timeout_s=CALL_TIMEOUT_S) as loader:
        epochs.append(np.concatenate(epoch_ids(loader)))
        stats.append(loader.stats())
        for kind in KINDS:
            if kind.when == "later":
                kind.later(paths[kind.name])
        epochs.append(np.concatenate(epoch_ids(loader)))
        stats.append(loader.stats())
    return Run(paths, index, expected_ids(good), later_ids, epochs, stats, log())


def record(stats, uri: str):
    matches = [s for s in stats.shards if s.uri == uri]
    assert len(matches) == 1, f"{uri} is not in GetStats once: {matches}"
    return matches[0]


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_bad_shard_is_quarantined_and_every_good_row_served_once(uniform_run, kind):
    run = uniform_run
    epoch = 1 if kind.when == "later" else 0
    served = run.epochs[epoch]
    expected = np.concatenate([run.good_ids, run.later_ids]) if epoch == 0 else run.good_ids
    assert len(served) == len(np.unique(served)), "a sample was served twice in one epoch"
    np.testing.assert_array_equal(np.sort(served), np.sort(expected))
    uri = run.paths[kind.name]
    assert not np.isin(served >> 32, [run.index[uri]]).any()
    shard = record(run.stats[epoch], uri)
    assert (shard.state, shard.rows) == ("quarantined", 0)
    assert kind.fragment in shard.reason, shard.reason
    assert f"quarantined shard {uri}: {shard.reason}" in run.log


def test_shards_bad_only_later_were_served_whole_before(uniform_run):
    served = uniform_run.epochs[0]
    assert np.isin(uniform_run.later_ids, served).all()
    for kind in KINDS:
        if kind.when == "later":
            assert record(uniform_run.stats[0], uniform_run.paths[kind.name]).state == "ok"


def test_good_shards_stay_ok_and_are_quarantined_nowhere(uniform_run):
    stats = uniform_run.stats[-1]
    good = [s for s in stats.shards if os.path.basename(s.uri).startswith("good-")]
    assert len(good) == 4 and all(s.state == "ok" and s.rows == 128 and not s.reason for s in good)
    bad = {uniform_run.paths[k.name] for k in KINDS}
    assert {s.uri for s in stats.shards if s.state == "quarantined"} == bad
    assert sum(line.startswith("quarantined shard ") for line in uniform_run.log) == len(KINDS)


# -- a curated policy -------------------------------------------------------------------------------

KEEP = 0.5
CURATED_KINDS = {
    "tar-garbage": "not a readable tar archive",
    "tar-other-schema": "lacks column 'noisy'",
    "parquet-wrong-shape": "column 'x' is float32[41]",
    "parquet-wrong-dtype": "column 'x' is float64[40]",
    # Columns and types are the pool's, but the reference model (10 classes) cannot score label 12.
    "parquet-labels-out-of-range": "reference scoring failed",
}


@pytest.fixture(scope="module")
def curated_run(serve, tmp_path_factory, mnist_tar, mnist_parquet):
    root = tmp_path_factory.mktemp("bad_shards_curated")
    good = good_shards(root, mnist_tar, mnist_parquet)
    rows = columns_of(read_shard(good[0]).slice(0, ROWS))
    makers = {k.name: k.make for k in KINDS}
    makers["parquet-labels-out-of-range"] = lambda path, cols: write_parquet(path, {**cols, "y": np.full(ROWS, 12)})
    paths = {}
    for name in CURATED_KINDS:
        paths[name] = str(root / f"{name}.{name.split('-')[0]}")
        makers[name](paths[name], rows)
    # An untrained reference model scores as well as any for this: the point is that it runs.
    svc = serve(good + list(paths.values()), shuffle_rows=64, ready_batches=2,
                reference={"factory": "loader.models:mlp"})  # fmt: skip
    with RemoteLoader(svc.address, job="learnability", batch_size=16, policy="learnability",
                      options={"keep_ratio": KEEP, "selector": "topk"}, timeout_s=CALL_TIMEOUT_S) as loader:  # fmt: skip
        served = np.concatenate(epoch_ids(loader))
        stats = loader.stats()
    return paths, expected_ids(good), served, stats


def test_curated_policy_serves_around_bad_shards_and_quarantines_them(curated_run):
    paths, good_ids, served, stats = curated_run
    job = stats.jobs[0]
    assert job.samples_considered == len(good_ids)  # every good row considered exactly once
    assert len(served) == len(np.unique(served)) == job.samples_served
    assert np.isin(served, good_ids).all()
    assert abs(len(served) / len(good_ids) - KEEP) < 0.1
    for name, fragment in CURATED_KINDS.items():
        shard = record(stats, paths[name])
        assert shard.state == "quarantined" and fragment in shard.reason, (name, shard.reason)
