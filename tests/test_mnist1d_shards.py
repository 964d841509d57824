from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa
import pytest

from loader.datasets import make_shards
from loader.errors import ConfigError
from loader.sources import read_shard
from loader.tensors import to_numpy

SAMPLES = 600


def _read(paths: list[str]) -> dict[str, np.ndarray]:
    tables = [read_shard(path) for path in paths]
    assert all(table.schema == tables[0].schema for table in tables)
    return {name: np.concatenate([to_numpy(t.column(name)) for t in tables]) for name in tables[0].column_names}


@pytest.fixture(scope="module")
def noisy_tar(tmp_path_factory) -> tuple[str, dict[str, list[str]]]:
    out = str(tmp_path_factory.mktemp("tar"))
    return out, make_shards(out, shards=5, label_noise=0.3, samples=SAMPLES, progress=False)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_file_names(tmp_path, fmt: str) -> None:
    written = make_shards(str(tmp_path), shards=10, fmt=fmt, samples=SAMPLES, progress=False)
    expected = {"train": 10, "holdout": 2, "test": 2}
    assert {split: len(paths) for split, paths in written.items()} == expected
    for split, count in expected.items():
        assert written[split] == [str(tmp_path / f"{split}-{i:06d}.{fmt}") for i in range(count)]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for ps in written.values() for p in ps)
    schema = read_shard(written["train"][0]).schema
    # Parquet keeps the written order; a tar's members come in name order (webdataset.TarWriter).
    assert schema.names == (["x", "y", "noisy"] if fmt == "parquet" else ["noisy", "x", "y"])
    assert isinstance(schema.field("x").type, pa.FixedShapeTensorType)
    assert read_shard(written["test"][0]).schema == schema


def test_rows_add_up_and_are_distinct(noisy_tar) -> None:
    _, written = noisy_tar
    splits = {split: _read(paths) for split, paths in written.items()}
    counts = {split: len(cols["y"]) for split, cols in splits.items()}
    assert sum(counts.values()) == SAMPLES
    assert counts == {"train": 384, "holdout": 96, "test": 120}
    sizes = [read_shard(p).num_rows for p in written["train"]]
    assert max(sizes) - min(sizes) <= 1
    every_x = np.concatenate([cols["x"] for cols in splits.values()])
    assert len(np.unique(every_x, axis=0)) == SAMPLES


def test_label_noise(noisy_tar, tmp_path) -> None:
    _, written = noisy_tar
    noisy = {split: _read(paths) for split, paths in written.items()}
    clean = {split: _read(paths) for split, paths in make_shards(
        str(tmp_path), shards=5, samples=SAMPLES, progress=False).items()}
    train, reference = noisy["train"], clean["train"]
    np.testing.assert_array_equal(train["x"], reference["x"])
    changed = train["y"] != reference["y"]
    np.testing.assert_array_equal(changed, train["noisy"] == 1)
    assert 0.24 < changed.mean() < 0.36
    assert reference["noisy"].sum() == 0
    for split in ("holdout", "test"):
        assert noisy[split]["noisy"].sum() == 0
        np.testing.assert_array_equal(noisy[split]["y"], clean[split]["y"])


def test_x_is_float32_rows_of_40(noisy_tar) -> None:
    _, written = noisy_tar
    table = read_shard(written["holdout"][0])
    x = to_numpy(table.column("x"))
    assert x.dtype == np.float32 and x.shape == (table.num_rows, 40)
    assert table.schema.field("y").type == pa.int64()
    assert set(np.unique(to_numpy(table.column("y")))) <= set(range(10))


def test_quiet_and_global_random_state_untouched(tmp_path, capsys) -> None:
    np.random.seed(123)
    random.seed(123)
    make_shards(str(tmp_path), shards=1, samples=60, progress=False)
    assert capsys.readouterr() == ("", "")
    assert np.random.random() == np.random.RandomState(123).random_sample()
    assert random.random() == random.Random(123).random()


def test_bad_settings(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        make_shards(str(tmp_path), fmt="csv", samples=60, progress=False)
    assert info.value.key == "fmt"
    with pytest.raises(ConfigError, match="label_noise"):
        make_shards(str(tmp_path), label_noise=1.5, samples=60, progress=False)
    assert os.listdir(tmp_path) == []
