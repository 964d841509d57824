"""Damaged shard files: reading one either yields a table or raises ShardError naming the file and
the problem, never anything else (which would fail a whole epoch instead of one shard)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.errors import ShardError
from loader.reader import read_with_ids
from loader.sources import read_shard
from loader.sources.decoders import decode
from loader.sources.writers import write_parquet, write_tar


def npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value)
    return buffer.getvalue()


def columns(rows: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"x": rng.normal(size=(rows, 6)).astype(np.float32), "y": np.arange(rows, dtype=np.int64)}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("originals")
    cols = columns()
    write_tar(str(root / "a.tar"), ({"x": cols["x"][i], "y": int(cols["y"][i])} for i in range(12)))
    write_parquet(str(root / "a.parquet"), cols)
    return {suffix: (root / f"a.{suffix}").read_bytes() for suffix in ("tar", "parquet")}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("damaged")


def test_a_broken_npy_header_is_a_decode_error() -> None:
    # numpy's header parser lets tokenize.TokenError out here, not a ValueError.
    payload = npy(np.zeros(40, np.float32)).replace(b"(40,)", b"(40, ")
    with pytest.raises(ShardError, match=r"u: member 'k.x.npy': cannot decode as \.npy: TokenError"):
        decode("npy", payload, uri="u", member="k.x.npy")


def test_a_cut_parquet_file_is_reported_as_truncated(originals, scratch) -> None:
    data = originals["parquet"]
    for name, cut in (("half", len(data) // 2), ("tail", len(data) - 3), ("magic", 4)):
        path = scratch / f"cut-{name}.parquet"
        path.write_bytes(data[:cut])
        with pytest.raises(ShardError) as err:
            read_shard(str(path))
        assert err.value.reason.startswith("truncated parquet: no footer"), err.value.reason
    not_parquet = scratch / "text.parquet"
    not_parquet.write_bytes(b"hello, this is text")
    with pytest.raises(ShardError, match="not a readable parquet file"):
        read_shard(str(not_parquet))


def test_written_parquet_pages_carry_checksums_that_reading_verifies(originals, scratch) -> None:
    path = scratch / "flipped.parquet"
    path.write_bytes(originals["parquet"])
    chunk = pq.ParquetFile(str(path)).metadata.row_group(0).column(0)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size  # the chunk's last bytes lie in a data page's body
    data = bytearray(originals["parquet"])
    data[end - 4 : end] = bytes(b ^ 0xFF for b in data[end - 4 : end])
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="CRC checksum verification failed"):
        read_shard(str(path))


def test_a_shard_index_past_the_id_space_is_a_reason_not_a_crash(scratch) -> None:
    path = str(scratch / "ok.parquet")
    write_parquet(path, columns())
    result = read_with_ids(path, index=2**31)  # past the last shard index an id can hold
    assert result.table is None and "out of range" in result.error


damage = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("splice"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=300))),
)


def damaged(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "cut":
        return data[: int(arg * len(data))]
    out = bytearray(data)
    if kind == "flip":
        for where, mask in arg:
            i = min(int(where * len(out)), len(out) - 1)
            out[i] ^= mask
        return bytes(out)
    where, chunk = arg
    i = int(where * len(out))
    return bytes(out[:i] + chunk + out[i + len(chunk) :])


@settings(max_examples=150, deadline=None)
@given(suffix=st.sampled_from(["tar", "parquet"]), how=damage)
def test_any_damage_reads_as_a_table_or_a_shard_error(originals, scratch, suffix, how) -> None:
    path = scratch / f"damaged.{suffix}"
    path.write_bytes(damaged(originals[suffix], how))
    try:
        table = read_shard(str(path))
    except ShardError as exc:
        assert exc.uri == str(path) and exc.reason
        return
    assert table.num_rows > 0  # damage that left a valid shard (a flip in padding, say)


VALID_NPY = npy(np.zeros((2, 3), np.float32))
# Near-valid .npy bytes reach numpy's header parser, where random bytes stop at the magic.
npy_like = st.tuples(
    st.just("flip"), st.lists(st.tuples(st.floats(0, 0.7), st.integers(1, 255)), min_size=1, max_size=3)
).map(lambda how: damaged(VALID_NPY, how))


@settings(max_examples=300, deadline=None)
@given(ext=st.sampled_from(["npy", "cls", "json", "txt"]), payload=st.one_of(st.binary(max_size=200), npy_like))
def test_decoders_turn_any_bytes_into_a_value_or_a_shard_error(ext, payload) -> None:
    try:
        decode(ext, payload, uri="u", member=f"k.c.{ext}")
    except ShardError as exc:
        assert exc.reason.startswith(f"member 'k.c.{ext}': cannot decode as .{ext}: ")


def pickled_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([1, "a"], dtype=object), allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "payload",
    [
        npy(np.zeros(4, np.float32)).replace(b"(4,)", b"(4, "),  # header cut inside the shape
        npy(np.zeros(4, np.float32))[:-3],  # body shorter than the header says
        pickled_npy(),  # object arrays need pickle, which a shard must never run
        b"\x93NUMPY\x01\x00" + bytes(4),  # magic, then no header
    ],
    ids=["header", "body", "pickle", "no-header"],
)
def test_a_damaged_npy_member_names_the_member(scratch, payload) -> None:
    path = scratch / "member.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("k.x.npy")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardError, match=r"member 'k.x.npy': cannot decode as \.npy"):
        read_shard(str(path))
