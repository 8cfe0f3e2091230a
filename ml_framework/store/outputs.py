"""Columnar shard outputs: how a shard's scored rows are held and stored.

A shard's outputs are one Arrow table: an ``int64`` ``row`` column (0-based input row),
then one column per output key (``prediction``, ``score``, ``probabilities``,
``embedding``). The results store keeps it as one compressed Arrow IPC stream per shard
(table ``shard_outputs``), not one JSON row per input row: on a 50,000-row tabular shard
the per-row JSON INSERTs cost five times the model's own time (``bench/bulk.py``'s
profile, see ``docs/benchmarks.md``), one blob costs a few milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

ROW = "row"
CODEC = "lz4"
"""Arrow IPC buffer compression (LZ4 frame): fast enough that a 50,000-row shard
compresses in about a millisecond; PostgreSQL's own TOAST compression then finds little
left to do."""


def column(values: Sequence) -> pa.Array:
    """One output column from Python values. A column holds one type: values mixing text
    and numbers (class labels such as ``["other", 1, 2]``), or integers beyond int64, are
    stored as text (``"1"``); integers mixed with floats become floats."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return _text(values)


def _text(values: Sequence) -> pa.Array:
    """``values`` as a string column: text as is, other values as their JSON."""
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def outputs_table(pairs: Sequence[tuple[int, dict]]) -> pa.Table:
    """Outputs given row by row, as one table.

    Args:
        pairs: ``(row_index, output)`` where ``output`` is a dict of output keys to
            JSON-ready values.

    Returns:
        A table with ``row`` (``int64``) first, then one column per output key (in order
        of first appearance; ``null`` where a row lacks it).
    """
    records = [o for _, o in pairs]
    keys = list(dict.fromkeys(k for rec in records for k in rec))
    columns = {ROW: pa.array([r for r, _ in pairs], pa.int64())}
    for k in keys:
        columns[k] = column([rec.get(k) for rec in records])
    return pa.table(columns)


def as_table(outputs: pa.Table | Sequence[tuple[int, dict]]) -> pa.Table:
    """``outputs`` as a table (see :func:`outputs_table`); a table is returned as is."""
    return outputs if isinstance(outputs, pa.Table) else outputs_table(list(outputs))


def encode(table: pa.Table) -> bytes:
    """A shard's output table as a compressed Arrow IPC stream (what ``shard_outputs.data`` holds)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=CODEC)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(data: bytes) -> pa.Table:
    """Inverse of :func:`encode`."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def concat(tables: Sequence[pa.Table]) -> pa.Table | None:
    """One table of several shards' outputs (columns a shard lacks are null), or ``None``
    when there are none."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # a key stored as numbers in one shard and text in another (class labels mixing
        # both, converted row by row): that key as text in every shard, as column() does
        types: dict[str, set] = {}
        for t in tables:
            for f in t.schema:
                types.setdefault(f.name, set()).add(f.type)
        mixed = [name for name, ts in types.items() if len(ts - {pa.null()}) > 1]
        return pa.concat_tables([_as_text(t, mixed) for t in tables], promote_options="permissive")


def _as_text(table: pa.Table, names: Sequence[str]) -> pa.Table:
    for name in names:
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, _text(table.column(name).to_pylist()))
    return table


def to_columns(table: pa.Table | None) -> dict[str, list]:
    """The output columns of ``table`` (``row`` excluded) as Python lists: scalars as
    ``int`` / ``float`` / ``str``, vectors as lists of floats (what JSON gave before)."""
    if table is None:
        return {}
    return {name: table.column(name).to_pylist() for name in table.column_names if name != ROW}
