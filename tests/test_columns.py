"""Column types as shards hold them, through the wire to the trainer, and as model inputs.

Each batch goes the way a real one does: `codec.encode` (the curator), `gateway.wire.batch_response`
(the gateway's framing), `client.wire.parse_train_response` and `codec.decode` / `codec.to_torch`
(RemoteLoader's stream), so the zero-copy checks look for tensors inside the bytes the client got.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from loader import codec, tensors
from loader.client.wire import BatchView, parse_train_response
from loader.errors import ConfigError
from loader.gateway.wire import batch_response
from loader.scoring import ModelSpec, inputs_from_table

B = 6


def received(table: pa.Table) -> tuple[dict, bytes]:
    """(the batch as the trainer gets it, the response bytes it was decoded from)."""
    data = batch_response(0, 1, table.num_rows, codec.encode(table))
    view = parse_train_response(data)
    assert isinstance(view, BatchView)
    return codec.to_torch(codec.decode(view.arrow_ipc)), data


def inside(tensor: torch.Tensor, data: bytes) -> bool:
    start = np.frombuffer(data, np.uint8).ctypes.data
    first = tensor.data_ptr()
    return start <= first and first + tensor.numel() * tensor.element_size() <= start + len(data)


def fixed_list(values: np.ndarray) -> pa.Array:
    """values (rows, *shape) as nested fixed_size_lists, the way pyarrow users build them."""
    array = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def ragged(rows: list[list], type_: pa.DataType) -> pa.Array:
    return pa.array(rows, type=type_)


TOKENS = [[5, 6, 7], [], [8], [9, 10, 11, 12], [13, 14], [15]]


# --- fixed shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40,), (3, 4), (2, 3, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8, np.float16])
def test_fixed_size_list_arrives_as_a_tensor_without_a_copy(shape, dtype) -> None:
    values = (np.arange(B * int(np.prod(shape))) % 97).astype(dtype).reshape(B, *shape)
    table = pa.table({"x": fixed_list(values)})
    assert tensors.row_shape(table.schema.field("x").type) == shape
    out, data = received(table)
    x = out["x"]
    assert isinstance(x, torch.Tensor) and x.shape == (B, *shape)
    assert x.dtype == torch.from_numpy(values).dtype
    np.testing.assert_array_equal(x.numpy(), values)
    assert inside(x, data), "the tensor was copied out of the received message"


def test_sliced_fixed_size_list_stays_zero_copy() -> None:
    values = np.arange(10 * 3 * 4, dtype=np.float32).reshape(10, 3, 4)
    column = fixed_list(values)[2:7]
    back = tensors.to_numpy(column)
    np.testing.assert_array_equal(back, values[2:7])
    assert not back.flags.owndata
    # The nested child arrays keep their own offsets; the view starts at the slice.
    child = np.frombuffer(column.values.values.buffers()[1], np.float32)
    assert np.shares_memory(back, child)
    # A slice of a decoded batch (e.g. a table sliced before encoding) decodes as its rows.
    out, data = received(pa.table({"x": column}))
    np.testing.assert_array_equal(out["x"].numpy(), values[2:7])
    assert inside(out["x"], data)


def test_fixed_shape_tensor_arrives_as_a_tensor_without_a_copy() -> None:
    values = np.arange(B * 3 * 2, dtype=np.float32).reshape(B, 3, 2) / 7
    column = pa.FixedShapeTensorArray.from_numpy_ndarray(values)
    out, data = received(pa.table({"image": column}))
    assert out["image"].shape == (B, 3, 2) and out["image"].dtype == torch.float32
    np.testing.assert_array_equal(out["image"].numpy(), values)
    assert inside(out["image"], data)


def test_permuted_fixed_shape_tensor_keeps_its_logical_shape_without_a_copy() -> None:
    # Physical shape [3, 2] stored column-major: the logical tensors are 2 x 3.
    type_ = pa.fixed_shape_tensor(pa.float32(), [3, 2], permutation=[1, 0])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.float32)), 6)
    column = pa.ExtensionArray.from_storage(type_, storage)
    assert tensors.row_shape(type_) == (2, 3)
    out, data = received(pa.table({"t": column}))
    assert out["t"].shape == (2, 2, 3)
    np.testing.assert_array_equal(out["t"].numpy(), column.to_numpy_ndarray())
    assert inside(out["t"], data)


def test_fixed_size_list_from_a_parquet_file_written_by_pyarrow(tmp_path) -> None:
    values = np.random.default_rng(0).normal(size=(B, 2, 5)).astype(np.float32)
    path = tmp_path / "vectors.parquet"
    pq.write_table(pa.table({"v": fixed_list(values), "y": np.arange(B)}), path)
    table = pq.read_table(path)
    assert pa.types.is_fixed_size_list(table.schema.field("v").type)
    out, _ = received(table)
    assert out["v"].shape == (B, 2, 5)
    assert out["v"].numpy().tobytes() == values.tobytes()  # byte-identical


def test_nulls_and_non_numeric_fixed_lists() -> None:
    with pytest.raises(ValueError, match="null"):
        tensors.to_numpy(pa.array([[1.0, 2.0], None], pa.list_(pa.float32(), 2)))
    with pytest.raises(ValueError, match="null"):
        tensors.to_numpy(pa.array([[1.0, None]], pa.list_(pa.float32(), 2)))
    # Lists of strings or bools are no tensors: they stay lists of lists.
    table = pa.table({"tags": pa.array([["a", "b"]] * 2, pa.list_(pa.string(), 2)),
                      "flags": pa.array([[True, False]] * 2, pa.list_(pa.bool_(), 2))})
    out, _ = received(table)
    assert out["tags"] == [["a", "b"]] * 2 and out["flags"] == [[True, False]] * 2


# --- variable-length lists -------------------------------------------------------------------


@pytest.mark.parametrize("type_", [pa.list_(pa.int64()), pa.large_list(pa.int32()), pa.list_(pa.float32())])
def test_variable_length_list_arrives_padded_with_lengths(type_) -> None:
    table = pa.table({"tokens": ragged(TOKENS, type_), "y": np.arange(B)})
    out, _ = received(table)
    assert list(out) == ["tokens", "tokens_lengths", "y"]
    tokens, lengths = out["tokens"], out["tokens_lengths"]
    assert tokens.shape == (B, 4) and tokens.numpy().dtype == np.dtype(type_.value_type.to_pandas_dtype())
    assert lengths.dtype == torch.int64 and lengths.tolist() == [len(t) for t in TOKENS]
    assert tokens.tolist() == [t + [0] * (4 - len(t)) for t in TOKENS]


def test_variable_length_values_and_offsets_share_memory() -> None:
    column = ragged(TOKENS, pa.list_(pa.int64()))[1:5]
    values, offsets = tensors.ragged_to_numpy(column)
    assert offsets.tolist() == [0, 0, 1, 5, 7]
    assert values.tolist() == [8, 9, 10, 11, 12, 13, 14]
    assert np.shares_memory(values, np.frombuffer(column.values.buffers()[1], np.int64))


def test_variable_length_lists_of_vectors_and_edge_cases() -> None:
    rows = [[[1.0, 2.0], [3.0, 4.0]], [], [[5.0, 6.0]]]
    out, _ = received(pa.table({"v": ragged(rows, pa.list_(pa.list_(pa.float32(), 2)))}))
    assert out["v"].shape == (3, 2, 2) and out["v_lengths"].tolist() == [2, 0, 1]
    assert out["v"][2].tolist() == [[5.0, 6.0], [0.0, 0.0]]
    # An empty batch, and a batch of empty rows.
    out, _ = received(pa.table({"t": ragged([], pa.list_(pa.int64()))}))
    assert out["t"].shape == (0, 0) and out["t_lengths"].shape == (0,)
    out, _ = received(pa.table({"t": ragged([[], []], pa.list_(pa.int64()))}))
    assert out["t"].shape == (2, 0) and out["t_lengths"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="null"):
        tensors.ragged_to_numpy(ragged([[1], None], pa.list_(pa.int64())))
    with pytest.raises(ValueError, match="t_lengths"):
        codec.to_numpy(pa.table({"t": ragged([[1]], pa.list_(pa.int64())), "t_lengths": [1]}))


def test_list_columns_from_pandas_parquet(tmp_path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "pandas.parquet"
    frame = pd.DataFrame({"ids": [np.array(t, np.int64) for t in TOKENS], "text": [f"s{i}" for i in range(B)]})
    frame.to_parquet(path)
    out, _ = received(pq.read_table(path))
    assert out["ids_lengths"].tolist() == [len(t) for t in TOKENS]
    assert out["ids"][3].tolist() == [9, 10, 11, 12]
    assert out["text"] == [f"s{i}" for i in range(B)]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_pad_to_cuts_and_pads_to_a_fixed_length(kind) -> None:
    padded, lengths = tensors.pad(*tensors.ragged_to_numpy(ragged(TOKENS, pa.list_(pa.int64()))))
    if kind == "torch":
        padded, lengths = torch.from_numpy(padded), torch.from_numpy(lengths)
    before = padded.clone() if kind == "torch" else padded.copy()
    short, short_lengths = tensors.pad_to(padded, lengths, 2, pad_value=-1)
    assert type(short) is type(padded) and short.shape == (B, 2)
    assert short.tolist() == [[5, 6], [-1, -1], [8, -1], [9, 10], [13, 14], [15, -1]]
    assert short_lengths.tolist() == [2, 0, 1, 2, 2, 1]
    long, long_lengths = tensors.pad_to(padded, lengths, 6, pad_value=-1)
    assert long.shape == (B, 6) and long_lengths.tolist() == [len(t) for t in TOKENS]
    assert long.tolist() == [t + [-1] * (6 - len(t)) for t in TOKENS]
    assert (padded == before).all()  # the input (a read-only batch) is left alone
    with pytest.raises(ValueError, match="length"):
        tensors.pad_to(padded, lengths, 0)


def test_pad_to_on_a_read_only_numpy_batch_does_not_warn(recwarn) -> None:
    # Rows already padded to 4 in the shard (a fixed_size_list), with their lengths beside them.
    padded = np.array([t + [0] * (4 - len(t)) for t in TOKENS], np.int64)
    table = pa.table({"t": fixed_list(padded), "n": [len(t) for t in TOKENS]})
    out = codec.to_numpy(codec.decode(codec.encode(table)))
    assert not out["t"].flags.writeable
    fixed, _ = tensors.pad_to(out["t"], out["n"], 3)
    assert isinstance(fixed, np.ndarray) and fixed.shape == (B, 3)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_pad_to_on_a_received_read_only_batch() -> None:
    out, _ = received(pa.table({"tokens": ragged(TOKENS, pa.list_(pa.int32()))}))
    fixed, lengths = tensors.pad_to(out["tokens"], out["tokens_lengths"], 8, pad_value=99)
    assert fixed.shape == (B, 8) and fixed.dtype == torch.int32
    assert fixed[1].tolist() == [99] * 8 and lengths.tolist() == [len(t) for t in TOKENS]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_pack_concatenates_sequences_into_fixed_rows(kind) -> None:
    padded, lengths = tensors.pad(*tensors.ragged_to_numpy(ragged(TOKENS, pa.list_(pa.int64()))))
    if kind == "torch":
        padded, lengths = torch.from_numpy(padded), torch.from_numpy(lengths)
    packed, counts = tensors.pack(padded, lengths, 4)
    assert packed.tolist() == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 0]]
    assert counts.tolist() == [4, 4, 3]
    packed, counts = tensors.pack(padded, lengths, 5, pad_value=-1, separator=1)
    flat = [t for seq in TOKENS for t in seq + [1]]
    assert packed.reshape(-1).tolist()[: len(flat)] == flat
    assert packed.shape == (4, 5) and counts.tolist() == [5, 5, 5, len(flat) - 15]
    assert packed.reshape(-1).tolist()[len(flat):] == [-1] * (20 - len(flat))


# --- strings and binary ----------------------------------------------------------------------


def test_strings_and_binary_stay_lists() -> None:
    table = pa.table({
        "caption": pa.array([f"c{i}" for i in range(B)]),
        "big": pa.array([f"c{i}" for i in range(B)], pa.large_string()),
        "jpeg": pa.array([bytes([i]) * 3 for i in range(B)]),
        "words": pa.array([["a"], [], ["b", "c"], [], [], ["d"]], pa.list_(pa.string())),
    })
    out, _ = received(table)
    assert out["caption"] == out["big"] == [f"c{i}" for i in range(B)]
    assert out["jpeg"] == [bytes([i]) * 3 for i in range(B)]
    assert out["words"] == [["a"], [], ["b", "c"], [], [], ["d"]]
    assert set(out) == set(table.column_names)


# --- model inputs ----------------------------------------------------------------------------


def test_fixed_size_list_and_tensor_columns_are_model_inputs() -> None:
    x = np.arange(B * 40, dtype=np.float32).reshape(B, 40)
    table = pa.table({"x": fixed_list(x), "y": pa.array(np.arange(B))})
    inputs, labels = inputs_from_table(table)
    assert inputs.shape == (B, 40) and inputs.dtype == torch.float32
    assert np.shares_memory(inputs.numpy(), tensors.to_numpy(table.column("x")))
    nested = pa.table({"x": fixed_list(x.reshape(B, 4, 10).astype(np.uint8)), "y": pa.array(np.arange(B))})
    assert inputs_from_table(nested)[0].shape == (B, 4, 10)


@pytest.mark.parametrize("column, type_text", [
    (pa.array(["a"] * 3), "string"),
    (pa.array([b"a"] * 3), "binary"),
    (pa.array([[1.0], [2.0, 3.0], []], pa.list_(pa.float32())), "list<item: float>"),
    (pa.array([["a"]] * 3, pa.list_(pa.string(), 1)), "fixed_size_list<item: string>[1]"),
    (pa.array([{"a": 1}] * 3), "struct<a: int64>"),
])
def test_unusable_input_column_is_a_config_error_naming_it(column, type_text) -> None:
    table = pa.table({"feat": column, "y": pa.array([0, 1, 0])})
    with pytest.raises(ConfigError) as info:
        inputs_from_table(table, "feat", "y")
    assert info.value.key == "columns.input"
    assert "'feat'" in str(info.value) and type_text in str(info.value)


def test_label_column_must_be_one_number_per_row() -> None:
    table = pa.table({"x": pa.array([1.0, 2.0]), "y": pa.array([[0, 1], [1, 0]], pa.list_(pa.int64(), 2))})
    with pytest.raises(ConfigError, match=r"columns.label: column 'y' is fixed_size_list"):
        inputs_from_table(table)


def _blob_shard(path, rows: int, seed: int, as_fixed_list: bool = True) -> None:
    from tests.helpers import blobs

    rng = np.random.default_rng(seed)
    centroids = np.random.default_rng(99).normal(size=(10, 40)).astype(np.float32) * 2
    data = blobs(rng, centroids, rows)
    x = fixed_list(data["x"]) if as_fixed_list else pa.array([str(row[:2]) for row in data["x"]])
    pq.write_table(pa.table({"x": x, "y": data["y"]}), path)


def test_train_reference_on_a_fixed_size_list_shard(tmp_path) -> None:
    from loader.reference import train_reference

    holdout = tmp_path / "holdout.parquet"
    _blob_shard(holdout, 256, 0)
    assert pq.read_schema(holdout).field("x").type == pa.list_(pa.float32(), 40)
    metrics = train_reference(ModelSpec("loader.models:mlp"), [str(holdout)], str(tmp_path / "ref.pt"),
                              epochs=5, progress=False)
    assert metrics["samples"] == 256
    assert metrics["holdout_accuracy"] > 0.5


def test_train_reference_on_a_string_column_is_a_config_error(tmp_path) -> None:
    from loader.reference import train_reference

    holdout = tmp_path / "holdout.parquet"
    _blob_shard(holdout, 16, 0, as_fixed_list=False)
    with pytest.raises(ConfigError) as info:
        train_reference(ModelSpec("loader.models:mlp"), [str(holdout)], str(tmp_path / "ref.pt"), epochs=1, progress=False)
    assert info.value.key == "columns.input"
    assert "column 'x' is string" in str(info.value) and str(holdout) in str(info.value)


def test_cli_train_reference_names_the_unusable_column(tmp_path, capsys) -> None:
    from loader.cli import main

    holdout = tmp_path / "holdout.parquet"
    _blob_shard(holdout, 16, 0, as_fixed_list=False)
    cfg = tmp_path / "service.yaml"
    cfg.write_text("reference:\n  factory: loader.models:mlp\n")
    code = main(["train-reference", "--config", str(cfg), "--holdout", str(holdout), "--out", str(tmp_path / "r.pt")])
    assert code == 2
    assert "config error: columns.input: column 'x' is string" in capsys.readouterr().err


# --- through a real service ------------------------------------------------------------------


def test_remote_loader_batches_of_a_pyarrow_parquet_shard(tmp_path, serve) -> None:
    from loader import RemoteLoader
    from tests.helpers import LOADER_TIMEOUT_S

    rows, paths = 48, []
    rng = np.random.default_rng(3)
    for i in range(2):
        x = rng.normal(size=(rows, 40)).astype(np.float32)
        tokens = [list(range(n)) for n in rng.integers(0, 9, size=rows)]
        paths.append(str(tmp_path / f"train-{i}.parquet"))
        pq.write_table(pa.table({
            "x": fixed_list(x),
            "y": rng.integers(0, 10, size=rows),
            "tokens": pa.array(tokens, pa.list_(pa.int32())),
            "caption": [f"row {j}" for j in range(rows)],
        }), paths[-1])
    svc = serve(paths)
    with RemoteLoader(svc.address, job="columns", batch_size=16, timeout_s=LOADER_TIMEOUT_S) as loader:
        batches = list(loader)
    assert sum(len(b["_id"]) for b in batches) == 2 * rows
    batch = batches[0]
    assert batch["x"].shape == (16, 40) and batch["x"].dtype == torch.float32
    assert batch["tokens"].dtype == torch.int32 and batch["tokens"].shape[0] == 16
    assert batch["tokens_lengths"].shape == (16,)
    for row, n in zip(batch["tokens"].tolist(), batch["tokens_lengths"].tolist()):
        assert row[:n] == list(range(n)) and all(v == 0 for v in row[n:])
    assert len(batch["caption"]) == 16 and all(c.startswith("row ") for c in batch["caption"])


def test_check_model_column_needs_only_the_schema() -> None:
    from loader.scoring import check_model_column

    schema = pa.schema([("x", pa.list_(pa.float32(), 40)), ("y", pa.int64()), ("ids", pa.large_list(pa.int64()))])
    check_model_column(schema, "x", "columns.input")
    check_model_column(schema, "y", "columns.label", label=True)
    with pytest.raises(ConfigError, match=r"columns.input: column 'ids' is large_list<item: int64>: its rows have different lengths"):
        check_model_column(schema, "ids", "columns.input")
    with pytest.raises(KeyError, match="'z'"):
        check_model_column(schema, "z", "columns.input")


def test_a_service_whose_reference_cannot_take_the_input_column_stops_at_start(ray_session, tmp_path):
    from actors.pipeline import Pipeline
    from loader.config import from_mapping
    from loader.errors import ConfigError
    from tests.helpers import blob_pool

    _, weights = blob_pool(tmp_path, seed=2, shards=1, reference_epochs=1)
    path = str(tmp_path / "text.parquet")
    pq.write_table(pa.table({"x": ["a b", "c d"], "y": [0, 1]}), path)
    config = from_mapping({"shards": [path], "address": "127.0.0.1:0",
                           "reference": {"factory": "loader.models:mlp", "weights": weights}})  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        Pipeline(config)
    assert refused.value.key == "columns.input" and "'x'" in str(refused.value)
