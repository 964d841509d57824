"""A folder of Parquet files as Hugging Face `datasets` and pandas write them (string, int, list
and image columns) serves as it is: no conversion step, the folder given as the shard pattern."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from loader.errors import ShardError
from loader.sources import expand, read_shard
from loader.sources.huggingface import image_columns
from tests.test_columns import received

datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets package writes these shards")
pd = pytest.importorskip("pandas")

ROWS, PARTS = 24, 3
TOKENS = [list(range(i % 5)) for i in range(ROWS)]


def pictures(rng, n: int, shape=(16, 12, 3)) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> tuple[str, np.ndarray]:
    """`datasets`' own layout: data/train-0000N-of-0000M.parquet, written by Dataset.to_parquet."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)
    pixels = pictures(rng, ROWS)
    features = datasets.Features({
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=[f"c{i}" for i in range(4)]),
        "tokens": datasets.Sequence(datasets.Value("int64")),
        "image": datasets.Image(),
    })  # fmt: skip
    full = datasets.Dataset.from_dict({
        "text": [f"row {i}" for i in range(ROWS)],
        "label": [i % 4 for i in range(ROWS)],
        "tokens": TOKENS,
        "image": [Image.fromarray(p) for p in pixels],
    }, features=features)  # fmt: skip
    os.makedirs(root / "data")
    for part in range(PARTS):
        full.shard(PARTS, part, contiguous=True).to_parquet(str(root / "data" / f"train-{part:05d}-of-{PARTS:05d}.parquet"))
    (root / "README.md").write_text("a dataset card: not a shard\n")
    return str(root), pixels


def test_a_folder_pattern_lists_its_parquet_files(hf_folder) -> None:
    root, _ = hf_folder
    paths = expand(root)
    assert [os.path.basename(p) for p in paths] == [f"train-{i:05d}-of-{PARTS:05d}.parquet" for i in range(PARTS)]


def test_datasets_columns_arrive_as_a_trainer_wants_them(hf_folder) -> None:
    root, pixels = hf_folder
    batches = [received(read_shard(path))[0] for path in expand(root)]
    per = ROWS // PARTS
    first = batches[0]
    assert first["text"] == [f"row {i}" for i in range(per)]
    assert first["label"].dtype == torch.int64 and first["label"].tolist() == [i % 4 for i in range(per)]
    assert first["tokens_lengths"].tolist() == [len(t) for t in TOKENS[:per]]
    assert first["tokens"][4].tolist()[:4] == [0, 1, 2, 3]
    # PNG-encoded by datasets, decoded to the very pixels it was given.
    image = torch.cat([b["image"] for b in batches])
    assert image.dtype == torch.uint8 and image.shape == (ROWS, 16, 12, 3)
    assert image.numpy().tobytes() == pixels.tobytes()


def test_image_columns_come_from_the_datasets_metadata(hf_folder, tmp_path) -> None:
    root, _ = hf_folder
    table = pq.read_table(expand(root)[0])
    assert image_columns(table.schema) == ["image"]
    # The same struct without the metadata is left as it is: a list of {bytes, path} per row.
    plain = str(tmp_path / "plain.parquet")
    pq.write_table(table.replace_schema_metadata(None), plain)
    batch, _ = received(read_shard(plain))
    assert set(batch["image"][0]) == {"bytes", "path"}


def test_images_of_different_sizes_name_the_column(tmp_path) -> None:
    rng = np.random.default_rng(1)
    images = [Image.fromarray(pictures(rng, 1)[0]), Image.fromarray(pictures(rng, 1, (8, 8, 3))[0])]
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    path = str(tmp_path / "mixed.parquet")
    ds.to_parquet(path)
    with pytest.raises(ShardError, match=r"image column 'image': row 1 is \[8, 8, 3\].*share a size"):
        read_shard(path)


def test_pandas_parquet_with_string_int_list_and_image_bytes(tmp_path) -> None:
    rng = np.random.default_rng(2)
    encoded = []
    for p in pictures(rng, 4):
        buffer = io.BytesIO()
        Image.fromarray(p).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    frame = pd.DataFrame({
        "text": ["a", "bb", "ccc", "d"],
        "label": np.arange(4, dtype=np.int64),
        "tokens": [np.arange(n, dtype=np.int64) for n in (3, 0, 1, 2)],
        "png": encoded,
    }, index=pd.Index([10, 11, 12, 13], name="row"))  # fmt: skip
    os.makedirs(tmp_path / "frame")
    frame.to_parquet(tmp_path / "frame" / "part-0.parquet")
    (path,) = expand(str(tmp_path / "frame"))
    batch, _ = received(read_shard(path))
    assert batch["text"] == ["a", "bb", "ccc", "d"]
    assert batch["label"].tolist() == [0, 1, 2, 3]
    assert batch["tokens_lengths"].tolist() == [3, 0, 1, 2]
    assert batch["png"] == encoded  # bytes stay bytes: pandas says nothing of images
    assert batch["row"].tolist() == [10, 11, 12, 13]  # a named index is a column, as pandas stores it


def test_remote_loader_serves_a_datasets_folder(hf_folder, serve) -> None:
    from loader import RemoteLoader
    from tests.helpers import LOADER_TIMEOUT_S

    root, pixels = hf_folder
    svc = serve([root])
    with RemoteLoader(svc.address, job="hf", batch_size=8, timeout_s=LOADER_TIMEOUT_S) as loader:
        batches = list(loader)
    ids = torch.cat([b["_id"] for b in batches])
    assert len(ids) == ROWS and len(set(ids.tolist())) == ROWS
    order = np.argsort([int(t.split()[1]) for b in batches for t in b["text"]])
    image = torch.cat([b["image"] for b in batches])[torch.as_tensor(order)]
    assert image.numpy().tobytes() == pixels.tobytes()
