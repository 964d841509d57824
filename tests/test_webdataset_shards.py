"""Tar shards as the `webdataset` package writes them (`ShardWriter` with its default member
naming) read into the columns a batch carries, with this project's strict checks kept."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from webdataset import tariterators

from loader import codec
from loader.errors import ShardError
from loader.sources import expand, read_shard
from loader.sources.images import decode_image
from loader.sources.webdataset import _grouped, key_and_suffix
from loader.sources.writers import write_tar
from loader.tensors import to_numpy
from tests.helpers import raw_tar
from tests.test_columns import inside, received

N = 12


def images(rng, n: int, shape=(20, 24, 3)) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


@pytest.fixture
def shard_writer_shards(tmp_path) -> tuple[list[str], list[dict]]:
    """Two shards from ShardWriter: `__key__` plus .cls, .npy, .json, .txt, .jpg and .png."""
    rng = np.random.default_rng(0)
    # Smooth pictures for JPEG, which blurs noise beyond recognition; noise for lossless PNG.
    ramp = np.add.outer(np.arange(20), np.arange(24)).astype(np.uint8)[:, :, None] * np.array([4, 2, 1], np.uint8)
    pixels, masks = np.stack([ramp + i for i in range(N)]).astype(np.uint8), images(rng, N, (20, 24))
    samples = [{
        "__key__": f"sample{i:04d}",
        "cls": int(i % 5),
        "npy": rng.normal(size=(3, 4)).astype(np.float32),
        "json": {"id": i, "tags": ["a", "b"][: i % 3]},
        "txt": f"caption {i} \u00e9",
        "jpg": pixels[i],
        "png": masks[i],
    } for i in range(N)]  # fmt: skip
    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=N // 2, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    return expand(str(tmp_path / "wds-*.tar")), samples


def test_shard_writer_default_naming_reads_every_column(shard_writer_shards) -> None:
    paths, samples = shard_writer_shards
    assert len(paths) == 2
    table = pa.concat_tables([read_shard(p) for p in paths])
    assert table.num_rows == N
    assert table.column("cls").to_pylist() == [s["cls"] for s in samples]
    assert table.schema.field("cls").type == pa.int64()
    np.testing.assert_array_equal(to_numpy(table.column("npy")), np.stack([s["npy"] for s in samples]))
    assert table.column("json").to_pylist()[4] == {"id": 4, "tags": ["a"]}
    assert table.column("txt").to_pylist() == [s["txt"] for s in samples]
    # PNG is lossless: pixels come back byte-identical, (H, W) for grayscale.
    png = to_numpy(table.column("png"))
    assert png.dtype == np.uint8 and png.shape == (N, 20, 24)
    assert png.tobytes() == np.stack([s["png"] for s in samples]).tobytes()
    # JPEG is lossy: shape and dtype kept, values close, and exactly what Pillow decodes.
    jpg = to_numpy(table.column("jpg"))
    assert jpg.dtype == np.uint8 and jpg.shape == (N, 20, 24, 3)
    assert np.abs(jpg.astype(int) - np.stack([s["jpg"] for s in samples]).astype(int)).mean() < 8
    with tarfile.open(paths[0]) as tar:
        member = tar.extractfile("sample0000.jpg").read()
    assert jpg[0].tobytes() == np.asarray(Image.open(io.BytesIO(member)).convert("RGB")).tobytes()


def test_images_arrive_as_uint8_tensors_without_a_copy(shard_writer_shards) -> None:
    paths, _ = shard_writer_shards
    batch, data = received(read_shard(paths[0]))
    assert batch["jpg"].dtype == torch.uint8 and batch["jpg"].shape == (N // 2, 20, 24, 3)
    assert inside(batch["jpg"], data) and inside(batch["png"], data)
    assert batch["txt"][0].startswith("caption") and batch["cls"].dtype == torch.int64


def test_image_modes_become_uint8() -> None:
    rng = np.random.default_rng(1)
    rgb = images(rng, 1)[0]
    for mode, shape in (("RGB", (20, 24, 3)), ("L", (20, 24)), ("RGBA", (20, 24, 4)), ("P", (20, 24, 3)), ("1", (20, 24, 3))):
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buffer, format="PNG")
        value = decode_image(buffer.getvalue())
        assert value.dtype == np.uint8 and value.shape == shape, mode
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).tobytes() == rgb.tobytes()


def test_images_of_different_sizes_are_a_named_shard_error(tmp_path) -> None:
    rng = np.random.default_rng(2)
    path = str(tmp_path / "mixed.tar")
    with wds.TarWriter(path) as sink:
        sink.write({"__key__": "a", "png": images(rng, 1)[0], "cls": 0})
        sink.write({"__key__": "b", "png": images(rng, 1, (8, 8, 3))[0], "cls": 1})
    with pytest.raises(ShardError, match=r"sample 'b': column 'png' is uint8\[8, 8, 3\].*share a size"):
        read_shard(path)


def test_a_broken_image_member_is_a_named_shard_error(tmp_path) -> None:
    path = str(tmp_path / "broken.tar")
    with wds.TarWriter(path, encoder=False) as sink:
        sink.write({"__key__": "a", "jpg": b"\xff\xd8 not a jpeg", "cls": b"0"})
    with pytest.raises(ShardError, match=r"member 'a.jpg': cannot decode as .jpg"):
        read_shard(path)


def test_strict_checks_stay(tmp_path) -> None:
    """What webdataset itself skips or lets through is a named quarantine reason here."""
    cases = {
        "unnamed": ([("a.cls", b"1"), ("README", b"hi")], "member 'README' is not named KEY.NAME.EXT"),
        "twice": ([("a.x.cls", b"1"), ("a.x.cls", b"2")], "member 'a.x.cls' appears twice in its sample"),
        "lacks": ([("a.x.cls", b"1"), ("a.y.cls", b"1"), ("b.x.cls", b"2")], "sample 'b' lacks column 'y'"),
    }
    for name, (members, reason) in cases.items():
        path = str(tmp_path / f"{name}.tar")
        raw_tar(path, members)
        with pytest.raises(ShardError, match=reason):
            read_shard(path)
    good = str(tmp_path / "good.tar")
    raw_tar(good, [("a.x.cls", b"1"), ("b.x.cls", b"2")])
    cut = str(tmp_path / "cut.tar")
    data = open(good, "rb").read()
    open(cut, "wb").write(data[:1024])  # whole members, no end-of-archive marker
    with pytest.raises(ShardError, match="truncated tar"):
        read_shard(cut)


def test_our_writer_is_tar_writer_output_webdataset_reads_back(tmp_path) -> None:
    path = str(tmp_path / "ours.tar")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    write_tar(path, [{"x": x[i], "y": i, "caption": f"c{i}"} for i in range(4)])
    # webdataset's own pipeline groups and decodes what we wrote.
    got = list(wds.WebDataset(path, shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [f"{i:09d}" for i in range(4)]
    np.testing.assert_array_equal(np.stack([g["x.npy"] for g in got]), x)
    assert [int(g["y.cls"]) for g in got] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="invalid column name '_hidden'"):
        write_tar(str(tmp_path / "bad.tar"), [{"_hidden": 1}])


def test_codec_keeps_image_bytes_identical(tmp_path) -> None:
    rng = np.random.default_rng(4)
    pixels = images(rng, 6)
    path = str(tmp_path / "png.tar")
    with wds.TarWriter(path) as sink:
        for i in range(6):
            sink.write({"__key__": f"k{i}", "png": pixels[i]})
    table = read_shard(path)
    back = codec.to_numpy(codec.decode(codec.encode(table)))
    assert back["png"].tobytes() == pixels.tobytes()


# Member names from the characters that matter to the split: dots, slashes, a newline.
_names = st.text(alphabet="ab./\n", max_size=9)


@given(_names)
@settings(max_examples=400, deadline=None)
def test_member_names_split_as_webdataset_splits_them(name) -> None:
    assert key_and_suffix(name) == tariterators.base_plus_ext(name)


@given(st.lists(st.sampled_from(["a.x", "a.y", "a.X", "b.x", "b/c.x", "a.b.c", "c.x.npy"]), max_size=8))
@settings(max_examples=300, deadline=None)
def test_members_group_into_samples_as_webdataset_groups_them(names) -> None:
    members = [(name, name.encode()) for name in names]
    try:
        theirs = [
            (g["__key__"], {k: v for k, v in g.items() if not k.startswith("__")})
            for g in tariterators.group_by_keys(({"fname": n, "data": d, "__url__": "u"} for n, d in members), lcase=False)
        ]
    except ValueError:  # a suffix twice in one sample: theirs stops, ours names the member
        with pytest.raises(ShardError, match="appears twice in its sample"):
            list(_grouped("u", iter(members)))
        return
    assert list(_grouped("u", iter(members))) == theirs


def test_reading_a_tar_shard_does_not_import_torch(tmp_path) -> None:
    # Every reader, curator and gateway process reads tar shards; torch would cost each of them
    # ~190 MB and over a second to import (docs/decisions.md, "WebDataset shards").
    path = str(tmp_path / "s.tar")
    write_tar(path, [{"x": np.zeros(3, np.float32), "y": i} for i in range(2)])
    code = (
        "import sys; from loader.sources import read_shard; import actors.reader, actors.gather; "
        f"assert read_shard({path!r}).num_rows == 2; "
        "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
