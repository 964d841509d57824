"""Tensor columns in Arrow: 1-d values as primitive arrays, n-d values as fixed_shape_tensor.

Both directions avoid copies where Arrow allows it, so a batch read from a shard reaches
numpy (and then torch) without duplicating its buffers. Arrays coming back from Arrow
are read-only views of Arrow memory.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Kinds Arrow can hold as fixed-width numbers; bool is left out because Arrow packs it
# into bits (never zero-copy) and fixed_shape_tensor rejects it.
_NUMERIC_KINDS = "iuf"


def _is_numeric(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_)


def is_tensor_like(type_: pa.DataType) -> bool:
    """True for columns `to_numpy` can turn into a numeric ndarray."""
    if isinstance(type_, pa.FixedShapeTensorType):
        return _is_numeric(type_.value_type)
    return _is_numeric(type_)


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


def to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Inverse of `to_arrow`; zero-copy for a single chunk without nulls."""
    if not is_tensor_like(column.type):
        raise TypeError(f"column of type {column.type} is not a numeric tensor column")
    array = _single_array(column)
    if array.null_count:
        # Arrow would turn ints into floats with NaN; a silent dtype change is worse than an error.
        raise ValueError(f"column of type {column.type} has {array.null_count} null(s); tensors cannot hold nulls")
    if isinstance(array, pa.FixedShapeTensorArray):
        return array.to_numpy_ndarray()
    return array.to_numpy(zero_copy_only=True)
