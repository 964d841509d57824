"""Batches on the wire: one Arrow IPC stream per batch, decoded zero-copy into numpy and torch."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa

from loader import tensors

ID, WEIGHT = "_id", "_weight"


def encode(table: pa.Table) -> pa.Buffer:
    """An Arrow buffer rather than bytes: Ray hands buffers between processes out of band (no
    pickling, zero-copy on the receiving side), where bytes would be copied into a pickle and out
    of it again, and the gateway frames it for gRPC with a single copy (`gateway.wire`)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def decode(payload: bytes | pa.Buffer) -> pa.Table:
    # py_buffer wraps the bytes without copying; columns keep pointing into them.
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()


def to_numpy(table: pa.Table) -> dict[str, np.ndarray | list]:
    """Numeric and tensor columns become zero-copy arrays; other columns stay Python lists
    (as DataLoader's default collate keeps strings)."""
    out: dict[str, np.ndarray | list] = {}
    for name, column in zip(table.column_names, table.columns):
        if tensors.is_tensor_like(column.type):
            out[name] = tensors.to_numpy(column)
        else:
            out[name] = column.to_pylist()
    return out


def to_torch(table: pa.Table) -> dict:
    import torch

    out = {}
    with warnings.catch_warnings():
        # The arrays are read-only views of the received message, which nothing else holds;
        # sharing it is the point (no copy per batch), so torch's warning says nothing useful.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, value in to_numpy(table).items():
            out[name] = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
    return out
