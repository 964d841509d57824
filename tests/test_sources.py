from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from loader.errors import ShardError
from loader.sources import expand, read_shard
from loader.sources.decoders import decode
from loader.sources.webdataset import split_member
from loader.sources.writers import write_parquet, write_tar
from loader.tensors import to_numpy


def _samples(n: int = 6) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {"x": rng.random((3, 2)).astype(np.float32), "y": i % 4, "name": f"s{i}", "w": np.array(float(i))}
        for i in range(n)
    ]


def _raw_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value)
    return buffer.getvalue()


def test_tar_round_trip(tmp_path) -> None:
    samples = _samples()
    path = str(tmp_path / "a.tar")
    write_tar(path, samples)
    table = read_shard(path)
    assert table.column_names == ["name", "w", "x", "y"]  # TarWriter writes a sample's members in name order
    assert table.schema.field("y").type == pa.int64()
    assert table.schema.field("name").type == pa.string()
    np.testing.assert_array_equal(to_numpy(table.column("x")), np.stack([s["x"] for s in samples]))
    assert table.column("y").to_pylist() == [s["y"] for s in samples]
    assert table.column("name").to_pylist() == [s["name"] for s in samples]
    np.testing.assert_array_equal(to_numpy(table.column("w")), np.arange(6, dtype=np.float64))


def test_tar_writer_is_deterministic_and_atomic(tmp_path) -> None:
    a, b = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    write_tar(a, _samples())
    write_tar(b, _samples())
    assert open(a, "rb").read() == open(b, "rb").read()
    with pytest.raises(TypeError, match="float"):
        write_tar(str(tmp_path / "c.tar"), [{"x": 1.5}])
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]


def test_tar_member_names_and_given_keys(tmp_path) -> None:
    path = str(tmp_path / "k.tar")
    write_tar(path, [{"__key__": "dir/k1", "v": 1}, {"__key__": "dir/k2", "v": 2}])
    names = tarfile.open(path).getnames()
    assert names == ["dir/k1.v.cls", "dir/k2.v.cls"]
    assert read_shard(path).column("v").to_pylist() == [1, 2]


def test_split_member() -> None:
    assert split_member("a/b/000001.x.npy") == ("a/b/000001", "x", "npy")
    assert split_member("000001.cls") == ("000001", "cls", "cls")
    assert split_member("k.seg.mask.png") == ("k", "seg.mask", "png")
    assert split_member("README") is None
    assert split_member(".hidden.npy") is None
    assert split_member("a.b/k.x.npy") == ("a.b/k", "x", "npy")  # dots in folders are not the key's


def test_webdataset_columns_and_grouping(tmp_path) -> None:
    path = str(tmp_path / "w.tar")
    _raw_tar(
        path,
        [
            ("d/k1.image.npy", _npy(np.zeros(2, np.int16))),
            ("d/k1.cls", b"3\n"),
            ("d/k1.meta.json", b'{"a": 1}'),
            ("d/k1.caption.txt", "h\u00e9".encode()),
            ("d/k1.blob.bin", b"\x00\x01"),
            ("d/k2.image.npy", _npy(np.ones(2, np.int16))),
            ("d/k2.cls", b"7"),
            ("d/k2.meta.json", b'{"a": 2}'),
            ("d/k2.caption.txt", b"b"),
            ("d/k2.blob.bin", b"\x02"),
        ],
    )
    table = read_shard(path)
    assert table.num_rows == 2
    assert table.column_names == ["image", "cls", "meta", "caption", "blob"]
    assert to_numpy(table.column("image")).tolist() == [[0, 0], [1, 1]]
    assert table.column("cls").to_pylist() == [3, 7]
    assert table.column("meta").to_pylist() == [{"a": 1}, {"a": 2}]
    assert table.column("caption").to_pylist() == ["h\u00e9", "b"]
    assert table.schema.field("blob").type == pa.binary()
    assert table.column("blob").to_pylist() == [b"\x00\x01", b"\x02"]


def test_decoders() -> None:
    kw = {"uri": "u", "member": "m"}
    np.testing.assert_array_equal(decode("npy", _npy(np.eye(2)), **kw), np.eye(2))
    assert decode("cls", b" 12\n", **kw) == 12
    assert decode("json", json.dumps([1, "a"]).encode(), **kw) == [1, "a"]
    assert decode("txt", "\u00fc".encode(), **kw) == "\u00fc"
    assert decode("weird", b"\xff", **kw) == b"\xff"
    with pytest.raises(ShardError, match="u: member 'm': cannot decode as .cls"):
        decode("cls", b"three", **kw)
    with pytest.raises(ShardError, match="cannot decode as .json"):
        decode("json", b"{", **kw)
    with pytest.raises(ShardError, match="cannot decode as .npy"):
        decode("npy", b"garbage", **kw)


def test_parquet_round_trip(tmp_path) -> None:
    columns = {"x": np.arange(24, dtype=np.float32).reshape(4, 3, 2), "y": np.arange(4, dtype=np.int64)}
    for suffix in ("parquet", "pq"):
        path = str(tmp_path / f"a.{suffix}")
        write_parquet(path, columns)
        table = read_shard(path)
        assert isinstance(table.schema.field("x").type, pa.FixedShapeTensorType)
        for name, values in columns.items():
            np.testing.assert_array_equal(to_numpy(table.column(name)), values)
    assert sorted(os.listdir(tmp_path)) == ["a.parquet", "a.pq"]


def test_brace_pattern_keeps_padding_and_missing_files(tmp_path) -> None:
    (tmp_path / "s-000009.tar").write_bytes(b"")
    paths = expand(str(tmp_path / "s-{000008..000011}.tar"))
    assert paths == [str(tmp_path / f"s-{i:06d}.tar") for i in range(8, 12)]


def test_glob_order_dedup_and_relative(tmp_path, monkeypatch) -> None:
    for name in ("b.tar", "a.tar", "c.parquet"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    got = expand(["*.tar", "c.parquet", "a.tar", "nothing-*.tar", "{x,y}.pq"])
    expected = ["a.tar", "b.tar", "c.parquet", "x.pq", "y.pq"]
    assert got == [str(tmp_path / name) for name in expected]


def _error(uri: str) -> ShardError:
    with pytest.raises(ShardError) as info:
        read_shard(uri)
    assert info.value.uri == uri
    assert str(info.value).startswith(f"{uri}: ")
    return info.value


def test_missing_file(tmp_path) -> None:
    assert _error(str(tmp_path / "nope.tar")).reason == "not found"


def test_unknown_suffix(tmp_path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(b"x")
    error = _error(str(path))
    assert "unsupported shard format '.zip'" in error.reason
    assert "expected .tar or .parquet" in error.reason


def test_garbage_files(tmp_path) -> None:
    tar, parquet = tmp_path / "g.tar", tmp_path / "g.parquet"
    tar.write_bytes(os.urandom(4096))
    parquet.write_bytes(os.urandom(4096))
    assert "not a readable tar archive" in _error(str(tar)).reason
    assert "not a readable parquet file" in _error(str(parquet)).reason


def test_truncated_tar(tmp_path) -> None:
    whole = str(tmp_path / "whole.tar")
    write_tar(whole, _samples(20))
    data = open(whole, "rb").read()
    half = tmp_path / "half.tar"
    half.write_bytes(data[: len(data) // 2])
    assert _error(str(half)).reason.startswith("truncated tar: ")
    member = tarfile.open(whole).getmembers()[41]
    in_data = tmp_path / "in_data.tar"
    in_data.write_bytes(data[: member.offset_data + 10])
    assert _error(str(in_data)).reason == "truncated tar: unexpected end of data"
    # Cut right after a member: tarfile alone would report a valid, shorter shard.
    boundary = tmp_path / "boundary.tar"
    boundary.write_bytes(data[: member.offset_data + 512])
    assert "no end-of-archive marker" in _error(str(boundary)).reason


def test_member_that_fails_to_decode(tmp_path) -> None:
    path = tmp_path / "bad.tar"
    _raw_tar(str(path), [("k1.x.npy", _npy(np.zeros(2))), ("k2.x.npy", b"garbage")])
    assert "member 'k2.x.npy': cannot decode as .npy" in _error(str(path)).reason


def test_inconsistent_columns(tmp_path) -> None:
    lacks = tmp_path / "lacks.tar"
    _raw_tar(str(lacks), [("k1.a.cls", b"1"), ("k1.b.cls", b"2"), ("k2.a.cls", b"3")])
    assert _error(str(lacks)).reason == "sample 'k2' lacks column 'b' (present in sample 'k1')"
    extra = tmp_path / "extra.tar"
    _raw_tar(str(extra), [("k1.a.cls", b"1"), ("k2.a.cls", b"3"), ("k2.c.txt", b"x")])
    assert _error(str(extra)).reason == "sample 'k2' has extra column 'c' (absent from sample 'k1')"
    shapes = tmp_path / "shapes.tar"
    _raw_tar(str(shapes), [("k1.a.npy", _npy(np.zeros(2))), ("k2.a.npy", _npy(np.zeros(3)))])
    assert "sample 'k2': column 'a' is float64[3], expected float64[2]" in _error(str(shapes)).reason


def test_empty_shards(tmp_path) -> None:
    tar = str(tmp_path / "empty.tar")
    _raw_tar(tar, [])
    assert "empty shard" in _error(tar).reason
    parquet = str(tmp_path / "empty.parquet")
    write_parquet(parquet, {"y": np.zeros(0, np.int64)})
    assert "empty shard" in _error(parquet).reason
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    assert "empty file" in _error(str(zero)).reason


def test_a_shard_read_has_one_chunk_per_column(tmp_path) -> None:
    import pyarrow.parquet as pq

    from loader.reader import read_with_ids

    path = str(tmp_path / "groups.parquet")
    pq.write_table(pa.table({"x": np.arange(100, dtype=np.float32), "y": np.arange(100)}), path, row_group_size=10)
    assert pq.read_table(path).column("x").num_chunks == 10
    result = read_with_ids(path, 3)
    assert [c.num_chunks for c in result.table.columns] == [1, 1, 1]
    np.testing.assert_array_equal(result.table.column("x").to_numpy(), np.arange(100, dtype=np.float32))
