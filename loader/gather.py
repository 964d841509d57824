"""Rows of several tables gathered into one table with one chunk per column.

A batch leaves the curator as one Arrow IPC message that the trainer maps zero-copy into numpy,
which needs one chunk per column. Taking from each table and then concatenating copies every
row twice; tensor columns here are copied once, straight into the output array, or, for a
payload's parts, not at all (`Deferred`).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from loader import tensors
from loader.ids import row_of, shard_of

# (table, row indices into it): the rows of one source, in the order they are wanted. The table
# may be a `Source`, which keeps what gathering works out about it.
Group = tuple["pa.Table | Source", np.ndarray]

# Rows of a tensor column at least this big are copied run by run straight into place even when
# the shards alternate: a second copy of such a row costs more than a numpy call per run (a
# 4.8 MB batch of 150 KB images: 0.5 ms more for the copy, 0.03 ms for 32 calls).
RUN_ROW_BYTES = 4096
# Rows of a tensor column at least this big are not gathered into a new buffer for a payload's
# parts: the parts point at the rows in the shard tables, and framing the batch for gRPC copies
# them from there (`Deferred`), once instead of twice.
DEFER_ROW_BYTES = 4096
_UNSET = object()


class Deferred:
    """Tensor columns of a payload whose rows are not copied by the gather.

    Each such column's array points into a placeholder buffer, the right size and never read or
    written: the IPC writer only hands body buffers on (`codec.encode_parts`), and `resolve`
    replaces the placeholder's part by the column's rows, views of the shard tables' memory.
    Their concatenation is the buffer the gather would have written, so the payload's bytes are
    the same; framing the payload (`gateway.wire.batch_response`) copies the rows in place. A
    4.8 MB batch of 150 KB images: its gather thread's CPU went from 1.5 to 0.8 ms a batch."""

    def __init__(self) -> None:
        self._columns: list[tuple[pa.Buffer, list]] = []

    def column(self, shape: tuple, dtype: np.dtype, rows: list) -> np.ndarray:
        """An array of `shape` standing for `rows` (C-contiguous arrays, one row each)."""
        placeholder = pa.allocate_buffer(math.prod(shape) * dtype.itemsize)
        self._columns.append((placeholder, rows))
        return np.frombuffer(placeholder, dtype=dtype).reshape(shape)

    def resolve(self, parts: list) -> list:
        """`parts` with each placeholder's bytes replaced by the rows they stand for."""
        if not self._columns:
            return parts
        spans = [(buffer.address, buffer.address + buffer.size, rows) for buffer, rows in self._columns]
        out = []
        for part in parts:
            address = part.address if isinstance(part, pa.Buffer) else None
            span = next((s for s in spans if address is not None and s[0] <= address < s[1]), None)
            if span is None:
                out.append(part)
            elif address == span[0] and part.size == span[1] - span[0]:
                out.extend(span[2])
            else:  # only part of a placeholder (not what Arrow writes now): those bytes, copied
                start = address - span[0]
                out.append(b"".join(span[2])[start : start + part.size])
        return out


class Source:
    """A table rows are gathered from, with the numpy view of each tensor column worked out once
    (on first use) rather than for every batch: the gateway keeps one per cached shard table
    (`actors.gather.ShardTables`). Building the views was a fifth of a 45 KB batch's gather."""

    __slots__ = ("table", "num_rows", "_views", "_copied")

    def __init__(self, table: pa.Table) -> None:
        self.table, self.num_rows = table, table.num_rows
        self._views = [_UNSET] * table.num_columns
        self._copied: float | None = None

    def copied_row_bytes(self) -> float:
        """Bytes per row that a payload's gather copies: all but the big tensor rows it leaves
        where they are (`Deferred`)."""
        if self._copied is None:
            rows, copied = max(self.num_rows, 1), 0.0
            for i, column in enumerate(self.table.columns):
                view = self.view(i)
                if view is None or view.ndim < 2 or view.itemsize * math.prod(view.shape[1:]) < DEFER_ROW_BYTES:
                    copied += column.nbytes / rows
            self._copied = copied
        return self._copied

    def view(self, i: int) -> np.ndarray | None:
        """Column `i` as one numpy array sharing the table's memory, or None (see `_dense`)."""
        view = self._views[i]
        if view is _UNSET:  # two threads may both build it: the same view, harmlessly
            view = self._views[i] = _dense(self.table.column(i))
        return view


def _source(table: pa.Table | Source) -> Source:
    return table if isinstance(table, Source) else Source(table)


def gather_rows(schema: pa.Schema, groups: list[Group]) -> pa.Table:
    """The rows of each group in turn, as one table of `schema` with single-chunk columns."""
    groups = [(_source(table), rows) for table, rows in groups]
    modes = [_take_mode(source, rows) for source, rows in groups]
    return pa.Table.from_arrays(_gather_runs(schema, groups, modes), schema=schema)


def _take_mode(source: Source, rows: np.ndarray) -> str:
    """numpy's take with `out` and mode "raise" copies into a temporary first (a second copy of
    the batch, into new memory: 0.45 ms instead of 0.12 for 4.8 MB); rows known to be in range
    are taken with "clip" instead."""
    rows = np.asarray(rows)
    if not len(rows) or (rows.min() >= 0 and rows.max() < source.num_rows):
        return "clip"
    return "raise"  # the IndexError (or numpy's negative indexing) as before


def _gather_runs(schema: pa.Schema, groups: list[tuple[Source, np.ndarray]], modes: list[str],
                 deferred: Deferred | None = None) -> list[pa.Array]:  # fmt: skip
    total = sum(len(rows) for _, rows in groups)
    return [_gather_column(i, field.type, groups, modes, total, deferred) for i, field in enumerate(schema)]


def groups_by_id(ids: np.ndarray, tables: dict[int, pa.Table | Source]) -> list[Group]:
    """Groups that gather the rows of `ids` (any mix of shards, by shard index in `tables`) in the
    order of `ids`: one group per run of ids from the same shard."""
    ids = np.asarray(ids, np.int64)
    if not len(ids):
        return []
    owners = shard_of(ids)
    starts = np.flatnonzero(np.diff(owners, prepend=owners[0] - 1))
    ends = np.append(starts[1:], len(ids))
    return [(tables[int(owners[a])], row_of(ids[a:b])) for a, b in zip(starts.tolist(), ends.tolist())]


def gather_by_id(schema: pa.Schema, ids: np.ndarray, tables: dict[int, pa.Table | Source]) -> pa.Table:
    """The rows of `ids` (any mix of shards, by shard index in `tables`), in the order of `ids`."""
    return pa.Table.from_arrays(gather_arrays(schema, ids, tables), schema=schema)


def gather_arrays(schema: pa.Schema, ids: np.ndarray, tables: dict[int, pa.Table | Source],
                  deferred: Deferred | None = None) -> list[pa.Array]:  # fmt: skip
    """`gather_by_id`'s columns, one single-chunk array per field of `schema`; with `deferred`,
    tensor columns of big rows are not copied at all (see `Deferred`).

    Ids from a few runs of shards gather run by run. Ids that alternate between shards (a batch
    drawn from a merged buffer table) would make one group, and one call per column, per row: they
    are gathered shard by shard, then put in order with one more vectorised copy; tensor columns
    of big rows are still copied run by run, straight into place (see RUN_ROW_BYTES)."""
    ids = np.asarray(ids, np.int64)
    sources = {s: _source(t) for s, t in tables.items()}
    owners, rows = shard_of(ids), row_of(ids)
    if len(ids):
        starts = np.flatnonzero(np.diff(owners, prepend=owners[0] - 1))
        ends = np.append(starts[1:], len(ids))
    else:
        starts = ends = np.empty(0, np.int64)
    runs = [(sources[int(owners[a])], rows[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]
    in_range = _in_range(owners, rows, sources)
    if len(runs) <= 2 * len(sources):
        return _gather_runs(schema, runs, [("clip" if in_range else "raise")] * len(runs), deferred)
    order = np.argsort(owners, kind="stable")
    by_shard = groups_by_id(ids[order], sources)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    mode = "clip" if in_range else "raise"
    return [_gather_interleaved(i, field.type, runs, by_shard, inverse, mode, deferred) for i, field in enumerate(schema)]


def _in_range(owners: np.ndarray, rows: np.ndarray, sources: dict[int, Source]) -> bool:
    """Whether every row is one its shard's table holds (a shard rewritten in place may hold
    fewer): checked once per batch, so the takes need not check (see `_take_mode`)."""
    if not len(rows):
        return True
    shards = np.unique(owners)
    sizes = np.array([sources[s].num_rows for s in shards.tolist()], np.int64)  # KeyError as before
    return bool((rows < sizes[np.searchsorted(shards, owners)]).all())


def _gather_column(i: int, type_: pa.DataType, groups: list[tuple[Source, np.ndarray]], modes: list[str],
                   total: int, deferred: Deferred | None = None) -> pa.Array:  # fmt: skip
    values = _dense_take(i, groups, modes, total, deferred)
    array = None if values is None else _as_arrow(values, type_)
    return array if array is not None and array.type == type_ else _arrow_take(i, type_, groups)


def _dense_take(i: int, groups: list[tuple[Source, np.ndarray]], modes: list[str], total: int,
                deferred: Deferred | None = None) -> np.ndarray | None:  # fmt: skip
    """Column `i` of the groups' rows, copied by numpy straight into new memory of Arrow's (or,
    with `deferred`, rows of at least DEFER_ROW_BYTES left where they are); None where Arrow's
    take has to do it (not a tensor column in every source, or no rows)."""
    views = [source.view(i) for source, _ in groups]
    if not total or any(view is None for view in views):
        return None
    first = views[0]
    if deferred is not None and first.ndim > 1 and first.itemsize * math.prod(first.shape[1:]) >= DEFER_ROW_BYTES:
        if all(view.flags.c_contiguous for view in views):
            # One view per row (an IndexError for a row the table lacks, as numpy's take).
            rows_ = [view[row] for view, (_, rows) in zip(views, groups) for row in rows.tolist()]
            return deferred.column((total, *first.shape[1:]), first.dtype, rows_)
    out = _empty((total, *first.shape[1:]), first.dtype)
    at = 0
    for view, (_, rows), mode in zip(views, groups, modes):
        view.take(rows, axis=0, out=out[at : at + len(rows)], mode=mode)
        at += len(rows)
    return out


def _gather_interleaved(i: int, type_: pa.DataType, runs: list[tuple[Source, np.ndarray]],
                        by_shard: list[tuple[Source, np.ndarray]], inverse: np.ndarray, mode: str,
                        deferred: Deferred | None = None) -> pa.Array:  # fmt: skip
    """Column `i` of rows whose shards alternate: `runs` in batch order, `by_shard` the same rows
    grouped by shard, `inverse` the batch's order of those."""
    first = by_shard[0][0].view(i)
    if first is not None and first.itemsize * math.prod(first.shape[1:]) >= RUN_ROW_BYTES:
        values = _dense_take(i, runs, [mode] * len(runs), len(inverse), deferred)
    else:
        values = _dense_take(i, by_shard, [mode] * len(by_shard), len(inverse))
        if values is not None:  # into place with one more copy
            values = values.take(inverse, axis=0, out=_empty(values.shape, values.dtype), mode="clip")
    array = None if values is None else _as_arrow(values, type_)
    if array is not None and array.type == type_:
        return array
    # As gathering by shard into a table and taking `inverse` from it did (same bytes).
    return _arrow_take(i, type_, by_shard).take(pa.array(inverse, pa.int64()))


def _arrow_take(i: int, type_: pa.DataType, groups: list[tuple[Source, np.ndarray]]) -> pa.Array:
    # Strings, lists, nulls, permuted tensors: Arrow's take, then one concatenation.
    taken = [chunk for source, rows in groups for chunk in source.table.column(i).take(pa.array(rows, pa.int64())).chunks]
    if not taken:
        return pa.array([], type=type_) if not isinstance(type_, pa.BaseExtensionType) else _empty_extension(type_)
    return taken[0] if len(taken) == 1 else pa.concat_arrays(taken)


def _as_arrow(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """`values` (rows, *shape), gathered for a column of `type_`, as that Arrow type without a copy.
    Built from the known type: `tensors.to_arrow` infers one per call, and that inference was a
    tenth of the gateway's time per small batch."""
    if values.ndim == 1:
        return pa.array(values)
    flat = pa.array(values.reshape(-1))
    if isinstance(type_, pa.FixedShapeTensorType) and type_.permutation in (None, list(range(len(type_.shape)))):
        storage = pa.FixedSizeListArray.from_arrays(flat, math.prod(values.shape[1:]))
        return pa.ExtensionArray.from_storage(type_, storage)
    if pa.types.is_fixed_size_list(type_):
        levels = []  # the list types from the outside in, with their own field names
        while pa.types.is_fixed_size_list(type_):
            levels.append(type_)
            type_ = type_.value_type
        array = flat
        for level in reversed(levels):
            array = pa.FixedSizeListArray.from_arrays(array, type=level)
        return array
    return tensors.to_arrow(values)


def _empty(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """An uninitialised array in Arrow's memory pool. Batches are megabytes each; numpy's malloc
    maps fresh pages for each, and faulting them in can cost more than the copy, while the pool
    reuses what it freed (gathering 16 MB here: 54 ms into new numpy memory, 16 ms from the
    pool, 4-13 ms into memory already touched)."""
    buffer = pa.allocate_buffer(math.prod(shape) * dtype.itemsize)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _dense(column: pa.ChunkedArray) -> np.ndarray | None:
    """The column as one numpy array without copying, or None when that is not possible."""
    if column.num_chunks != 1 or column.null_count or not tensors.is_tensor_like(column.type):
        return None
    array = column.chunk(0)
    if isinstance(array, pa.FixedShapeTensorArray) and array.type.permutation not in (None, list(range(len(array.type.shape)))):
        return None
    return tensors.to_numpy(array)


def _empty_extension(type_: pa.BaseExtensionType) -> pa.Array:
    return pa.ExtensionArray.from_storage(type_, pa.array([], type=type_.storage_type))


def plan_schema(plan, tables: dict[int, pa.Table | Source]) -> pa.Schema:
    """The schema `plan`'s rows are gathered as: its own, or (None) that of its first shard."""
    if plan.schema is not None:
        return plan.schema
    first = tables[min(tables)]
    return (first.table if isinstance(first, Source) else first).schema


def conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    from loader.sources.schema import conform

    return table if table.schema.equals(schema) else conform(table, schema)


def encode_plan_parts(plan, tables: dict[int, pa.Table | Source]) -> list:
    """`encode_plan` as the buffers whose concatenation it is (`codec.encode_parts`): the
    gathered columns themselves, not a copy of them. `tables` may hold `Source`s of tables
    already conformed to the plan's schema, as `actors.gather.ShardTables` keeps them."""
    from loader import codec

    schema = plan_schema(plan, tables)
    tables = {s: t if isinstance(t, Source) else conformed(t, schema) for s, t in tables.items()}
    deferred = Deferred()
    columns = gather_arrays(schema, plan.ids, tables, deferred)
    columns.append(pa.array(np.asarray(plan.weights, np.float32)))
    # A record batch, not a table: the IPC writer takes it as it is (the same message).
    batch = pa.RecordBatch.from_arrays(columns, schema=schema.append(pa.field(codec.WEIGHT, pa.float32())))
    return deferred.resolve(codec.encode_parts(batch))


def encode_plan(plan, tables: dict[int, pa.Table]) -> pa.Buffer:
    """The Arrow IPC payload of `plan` (a loader.job.plan.BatchPlan): its rows gathered from the
    decoded shard tables (by shard index, as readers give them), in the pool's column order, with
    `_weight` appended; byte for byte what the curator used to encode."""
    return pa.py_buffer(b"".join(encode_plan_parts(plan, tables)))
