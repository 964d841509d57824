"""Tensor columns in Arrow, and how each column type becomes a numpy array on the way out.

Columns `to_arrow` writes: 1-d values as primitive arrays, n-d values as fixed_shape_tensor.
Columns `to_numpy` reads ("dense": one shape for every row) are those, plus numeric
`fixed_size_list`s nested to any depth (how pyarrow, pandas and Hugging Face datasets store
vectors and embeddings): a column of `fixed_size_list<fixed_size_list<float>[4]>[3]` is a
float32 array of shape (rows, 3, 4).

Variable-length numeric lists (`list<...>`, `large_list<...>`: token ids) have no one shape;
`ragged_to_numpy` gives their values and offsets without copying, `pad` turns those into a padded
array plus lengths (the form a batch reaches torch in, see `loader.codec`), and `pad_to` and
`pack` bring a padded batch to the fixed length a language model trains on.

Both directions avoid copies where Arrow allows it, so a batch read from a shard reaches
numpy (and then torch) without duplicating its buffers. Arrays coming back from Arrow
are read-only views of Arrow memory.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa

# Kinds Arrow can hold as fixed-width numbers; bool is left out because Arrow packs it
# into bits (never zero-copy) and fixed_shape_tensor rejects it.
_NUMERIC_KINDS = "iuf"


def _is_numeric(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_)


def is_tensor_like(type_: pa.DataType) -> bool:
    """True for the column types `to_arrow` writes: numbers and numeric fixed_shape_tensor.
    (`is_dense` also takes fixed_size_list columns, which `to_arrow` never makes.)"""
    if isinstance(type_, pa.FixedShapeTensorType):
        return _is_numeric(type_.value_type)
    return _is_numeric(type_)


def row_shape(type_: pa.DataType) -> tuple[int, ...] | None:
    """The shape of one row for a dense numeric column: () for numbers, the tensor's shape for a
    fixed_shape_tensor, (n, *inner) for a fixed_size_list of size n; None for any other type."""
    if isinstance(type_, pa.FixedShapeTensorType):
        if not _is_numeric(type_.value_type):
            return None
        # `shape` is the physical layout; a permutation gives the logical (numpy) one.
        shape, order = list(type_.shape), type_.permutation or range(len(type_.shape))
        return tuple(int(shape[i]) for i in order)
    if pa.types.is_fixed_size_list(type_):
        value = type_.value_type
        if not (pa.types.is_fixed_size_list(value) or _is_numeric(value)):
            return None  # strings, bools, structs, or an extension type inside a list
        inner = row_shape(value)
        return None if inner is None else (int(type_.list_size), *inner)
    return () if _is_numeric(type_) else None


def is_dense(type_: pa.DataType) -> bool:
    """True for columns `to_numpy` turns into one numeric ndarray of shape (rows, *row_shape)."""
    return row_shape(type_) is not None


def is_ragged(type_: pa.DataType) -> bool:
    """True for variable-length lists (`list`, `large_list`) of dense numeric values."""
    return (pa.types.is_list(type_) or pa.types.is_large_list(type_)) and is_dense(type_.value_type)


def to_arrow(values: np.ndarray) -> pa.Array:
    """One row per leading index: shape (n,) gives a primitive array, (n, *s) a tensor array."""
    values = np.asarray(values)
    if values.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"cannot store dtype {values.dtype} as a tensor column (need int, uint or float)")
    if values.ndim == 0:
        raise ValueError("need at least one dimension (one row per leading index), got a scalar")
    if not values.dtype.isnative:
        # Arrow buffers are always native (little-endian); .npy files may not be.
        values = values.astype(values.dtype.newbyteorder("="))
    if values.ndim == 1:
        return pa.array(values)
    if len(values) == 0:
        # Arrow's numpy constructor refuses an empty array; the type still carries the shape.
        kind = pa.fixed_shape_tensor(pa.from_numpy_dtype(values.dtype), values.shape[1:])
        storage = pa.array([], type=pa.list_(pa.from_numpy_dtype(values.dtype), int(np.prod(values.shape[1:]))))
        return pa.ExtensionArray.from_storage(kind, storage)
    # Row-major storage keeps permutation trivial; readers that combine chunks
    # (ChunkedArray.combine_chunks) do not support permuted tensors.
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))


def _single_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.Array):
        return column
    if column.num_chunks == 1:
        return column.chunk(0)
    if column.num_chunks == 0:
        storage = pa.array([], type=getattr(column.type, "storage_type", column.type))
        if isinstance(column.type, pa.BaseExtensionType):
            return pa.ExtensionArray.from_storage(column.type, storage)
        return storage
    return pa.concat_arrays(column.chunks)


def _no_nulls(array: pa.Array, type_: pa.DataType) -> None:
    if array.null_count:
        # Arrow would turn ints into floats with NaN; a silent dtype change is worse than an error.
        raise ValueError(f"column of type {type_} has {array.null_count} null(s); tensors cannot hold nulls")


def _dense_numpy(array: pa.Array, type_: pa.DataType) -> np.ndarray:
    _no_nulls(array, type_)
    if isinstance(array, pa.FixedShapeTensorArray):
        return array.to_numpy_ndarray()
    rows, shape = len(array), []
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        # flatten() slices the child by this array's offset (no copy), unlike `.values`.
        array = array.flatten()
        _no_nulls(array, type_)
    return array.to_numpy(zero_copy_only=True).reshape(rows, *shape)


def to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A dense column (see `is_dense`) as an ndarray of shape (rows, *row_shape); the inverse of
    `to_arrow`. Zero-copy for a single chunk without nulls, sliced or not."""
    if not is_dense(column.type):
        raise TypeError(f"column of type {column.type} is not a numeric tensor column")
    return _dense_numpy(_single_array(column), column.type)


def ragged_to_numpy(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A variable-length list column (see `is_ragged`) as (values, offsets): values of shape
    (total, *row_shape of the items) sharing Arrow's memory, and int64 offsets of shape (rows+1,)
    from 0, so that row i is values[offsets[i]:offsets[i+1]]."""
    if not is_ragged(column.type):
        raise TypeError(f"column of type {column.type} is not a variable-length list of numbers")
    array = _single_array(column)
    _no_nulls(array, column.type)
    offsets = array.offsets.to_numpy().astype(np.int64)  # respects a slice, not rebased
    first, last = (int(offsets[0]), int(offsets[-1])) if len(offsets) else (0, 0)
    values = _dense_numpy(array.values.slice(first, last - first), column.type)
    return values, offsets - first


def pad(values: np.ndarray, offsets: np.ndarray, pad_value: Any = 0) -> tuple[np.ndarray, np.ndarray]:
    """(padded, lengths) from `ragged_to_numpy`'s (values, offsets): padded has shape
    (rows, longest row, *item shape), row i holding its lengths[i] items and then `pad_value`;
    lengths is int64 (rows,). One copy of the values, as padding cannot avoid."""
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets) if len(offsets) else np.zeros(0, np.int64)
    longest = int(lengths.max(initial=0))
    out = np.full((len(lengths), longest, *values.shape[1:]), pad_value, dtype=values.dtype)
    # Row-major: True cells of the mask are visited row by row, in the order the values come.
    out[np.arange(longest) < lengths[:, None]] = values[: int(lengths.sum())]
    return out, lengths


def _as_torch(values: Any, lengths: Any):
    import torch

    if isinstance(values, np.ndarray):
        with warnings.catch_warnings():
            # Read-only batches are only read here; the results are new arrays.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(values), torch.from_numpy(np.asarray(lengths, np.int64)), True
    return values, torch.as_tensor(lengths, dtype=torch.int64, device=values.device), False


def _back(value: Any, was_numpy: bool) -> Any:
    return value.numpy() if was_numpy else value


def _check_padded(values: Any, lengths: Any, length: int) -> None:
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    if values.ndim < 2:
        raise ValueError(f"values must be padded rows of shape (batch, longest, ...), got shape {tuple(values.shape)}")
    if lengths.ndim != 1 or len(lengths) != len(values):
        raise ValueError(f"lengths must be one count per row ({len(values)}), got shape {tuple(lengths.shape)}")
    if len(lengths) and (int(lengths.min()) < 0 or int(lengths.max()) > values.shape[1]):
        raise ValueError(f"lengths must lie in 0..{values.shape[1]} (the padded width)")


def pad_to(values: Any, lengths: Any, length: int, pad_value: Any = 0) -> tuple[Any, Any]:
    """A padded batch (values of shape (batch, longest, ...) with `lengths` (batch,), as a
    variable-length column arrives) at exactly `length` per row: longer rows are cut, shorter
    ones padded with `pad_value` (also past each row's length in the input, whatever it held).
    Returns (values (batch, length, ...), lengths clipped to `length`); torch tensors in give
    torch tensors out, on the same device, and numpy arrays give numpy arrays. Never writes to
    its input (batches from the loader are read-only views)."""
    import torch

    values, lengths, was_numpy = _as_torch(values, lengths)
    _check_padded(values, lengths, length)
    keep = min(length, values.shape[1])
    out = values.new_full((values.shape[0], length, *values.shape[2:]), pad_value)
    out[:, :keep] = values[:, :keep]
    clipped = lengths.clamp(max=length)
    out[torch.arange(length, device=out.device) >= clipped[:, None]] = pad_value
    return _back(out, was_numpy), _back(clipped, was_numpy)


def pack(values: Any, lengths: Any, length: int, pad_value: Any = 0, separator: Any = None) -> tuple[Any, Any]:
    """Packs a padded batch's sequences end to end into rows of exactly `length` (language-model
    pre-training packing, no padding between sequences): the tokens of row 0, then `separator`
    (an end-of-text id, when given), then row 1's, ...; cut into rows of `length`, the last one
    padded with `pad_value`. Returns (packed (rows, length, ...), int64 count of real tokens per
    row); torch in, torch out (same device), numpy in, numpy out."""
    import torch

    values, lengths, was_numpy = _as_torch(values, lengths)
    _check_padded(values, lengths, length)
    valid = torch.arange(values.shape[1], device=values.device) < lengths[:, None]
    if separator is not None:
        # One more column per row, to hold its separator just after its last token.
        extra = values.new_full((values.shape[0], 1, *values.shape[2:]), pad_value)
        values = torch.cat([values, extra], dim=1)
        values[torch.arange(len(values), device=values.device), lengths] = separator
        valid = torch.arange(values.shape[1], device=values.device) < (lengths + 1)[:, None]
    tokens = values[valid]
    rows = -(-len(tokens) // length)
    out = tokens.new_full((rows * length, *tokens.shape[1:]), pad_value)
    out[: len(tokens)] = tokens
    counts = torch.full((rows,), length, dtype=torch.int64, device=tokens.device)
    if rows:
        counts[-1] = len(tokens) - (rows - 1) * length
    return _back(out.reshape(rows, length, *tokens.shape[1:]), was_numpy), _back(counts, was_numpy)
