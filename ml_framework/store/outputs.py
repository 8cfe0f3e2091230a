"""Shard results: how a shard's scored rows are held, stored and read back, as Arrow.

A shard's outputs are one Arrow table: an ``int64`` ``row`` column (0-based input row),
then one column per output key (``prediction``, ``score``, ``probabilities``,
``embedding``). The results store keeps it as one compressed Arrow IPC stream per shard
(table ``shard_outputs``), not one JSON row per input row: on a 50,000-row tabular shard
the per-row JSON INSERTs cost five times the model's own time (``bench/bulk.py``'s
profile, see ``docs/benchmarks.md``), one blob costs a few milliseconds. Row errors, rare,
are one row each (table ``row_errors``, :class:`RowError`).

The store hands results back as Arrow (:func:`results_table`, :func:`recorded_rows`) or
plain dicts (:func:`results_page`), never pandas: the DataFrame view is the producer's
(``producer.results``). A job with an ``output_uri`` keeps its shards' tables as Parquet
files instead (:mod:`ml_framework.store.output_files`); the readers here read them back
through the ``files`` they are given, transparently.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Connection, Engine, LargeBinary, bindparam, or_, select, text

from ml_framework.errors import JobNotFoundError
from ml_framework.manifest import OutputSpec
from ml_framework.store.engine import chunks, read
from ml_framework.store.models import (
    FINISHED_JOB,
    JobRow,
    JobState,
    RowErrorRow,
    ShardOutputRow,
    ShardRow,
    sql_in,
)
from ml_framework.store.output_files import OutputFiles

ROW = "row"
CODEC = "lz4"
"""Arrow IPC buffer compression (LZ4 frame): fast enough that a 50,000-row shard
compresses in about a millisecond; PostgreSQL's own TOAST compression then finds little
left to do."""


@dataclass(frozen=True)
class RowError:
    """Why one row has no output.

    Attributes:
        row_index: 0-based row of the dataset (header excluded).
        message: what was wrong, naming the value when there is one.
        field: the column to blame, if any.
    """

    row_index: int
    message: str
    field: str | None = None


def column(values: Sequence) -> pa.Array:
    """One output column from Python values. A column holds one type: values mixing text
    and numbers (class labels such as ``["other", 1, 2]``), or integers beyond int64, are
    stored as text (``"1"``); integers mixed with floats become floats."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return text_column(values)


def text_column(values: Sequence) -> pa.Array:
    """``values`` as a string column: text as is, other values as their JSON."""
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def output_schema(spec: OutputSpec) -> pa.Schema:
    """The columns a model's outputs become (what ``worker.outputs.decode_outputs``
    writes), known before any row is scored: how a job with no rows still reports them.

    Returns:
        ``row`` (int64), then by ``spec.kind``: ``prediction`` (the labels' type),
        ``score`` (float64), ``probabilities`` (``fixed_size_list<float64>[K]``);
        ``prediction`` (float64, or ``fixed_size_list<float64>[size]`` when ``size`` > 1);
        ``embedding`` (``fixed_size_list<float32>[size]``: the outputs' own precision is
        known only once the model has run; a list of float32 when ``size`` is not declared).
    """
    fields = [pa.field(ROW, pa.int64())]
    if spec.kind == "classification":
        fields += [pa.field("prediction", column(spec.labels or []).type), pa.field("score", pa.float64()),
                   pa.field("probabilities", pa.list_(pa.float64(), len(spec.labels or [])))]
    elif spec.kind == "regression":
        many = spec.size is not None and spec.size > 1
        fields.append(pa.field("prediction", pa.list_(pa.float64(), spec.size) if many else pa.float64()))
    else:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), spec.size) if spec.size else pa.list_(pa.float32())))
    return pa.schema(fields)


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
    when there are none. Tables without rows count only when all are so: a job with no
    rows stores one, which carries the output columns (see :func:`output_schema`)."""
    if not tables:
        return None
    tables = [t for t in tables if t.num_rows] or list(tables[:1])
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
        return pa.concat_tables([_astext_column(t, mixed) for t in tables], promote_options="permissive")


def _astext_column(table: pa.Table, names: Sequence[str]) -> pa.Table:
    for name in names:
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, text_column(table.column(name).to_pylist()))
    return table


def to_columns(table: pa.Table | None) -> dict[str, list]:
    """The output columns of ``table`` (``row`` excluded) as Python lists: scalars as
    ``int`` / ``float`` / ``str``, vectors as lists of floats (what JSON gave before)."""
    if table is None:
        return {}
    return {name: table.column(name).to_pylist() for name in table.column_names if name != ROW}


# Prebuilt statements (see ml_framework.store.jobs for why text): datetimes and blobs are
# bound with the column's type.
_INSERT_OUTPUTS = text(
    "INSERT INTO shard_outputs (job_id, shard_index, row_start, row_end, n_rows, data) "
    "VALUES (:job_id, :shard_index, :row_start, :row_end, :n_rows, :data)"
).bindparams(bindparam("data", type_=LargeBinary))
_INSERT_ROW_ERROR = text(
    "INSERT INTO row_errors (job_id, row_index, shard_index, field, message) "
    "VALUES (:job_id, :row_index, :shard_index, :field, :message)")
_FINISHED_STATES = text(
    f"SELECT id, state FROM jobs WHERE id IN :job_ids AND state IN {sql_in(FINISHED_JOB)}"
).bindparams(bindparam("job_ids", expanding=True))
_FINISHED_OUTPUTS = text(
    "SELECT job_id, data FROM shard_outputs WHERE job_id IN :job_ids ORDER BY job_id, shard_index"
).bindparams(bindparam("job_ids", expanding=True))
_FINISHED_ERRORS = text(
    "SELECT job_id, row_index, field, message FROM row_errors WHERE job_id IN :job_ids"
).bindparams(bindparam("job_ids", expanding=True))


def insert(conn: Connection, shards: Sequence[tuple[str, int, pa.Table, Sequence[RowError]]]) -> None:
    """Insert the outputs (one compressed Arrow blob per shard with rows) and the row
    errors of ``shards`` (one multi-row INSERT each), on ``conn`` inside the caller's
    transaction.

    Args:
        shards: ``(job_id, shard_index, outputs, errors)``; ``outputs`` as
            :func:`as_table` gives it (``row`` first).
    """
    blobs = []
    for job_id, shard_index, table, _ in shards:
        if table.num_rows:
            rows = table.column(ROW)
            blobs.append({"job_id": job_id, "shard_index": shard_index, "row_start": pc.min(rows).as_py(),
                          "row_end": pc.max(rows).as_py() + 1, "n_rows": table.num_rows, "data": encode(table)})
    if blobs:
        conn.execute(_INSERT_OUTPUTS, blobs)
    errors = [{"job_id": job_id, "row_index": e.row_index, "shard_index": shard_index,
               "field": e.field, "message": e.message}
              for job_id, shard_index, _, errs in shards for e in errs]
    if errors:
        conn.execute(_INSERT_ROW_ERROR, errors)


def insert_empty(conn: Connection, schemas: Sequence[tuple[str, pa.Schema]]) -> None:
    """Store, for each ``(job_id, schema)`` of a job without rows, an empty output table
    with the model's columns (shard 0, ``n_rows`` 0), so that its results still carry them."""
    blobs = [{"job_id": job_id, "shard_index": 0, "row_start": 0, "row_end": 0, "n_rows": 0,
              "data": encode(schema.empty_table())} for job_id, schema in schemas]
    if blobs:
        conn.execute(_INSERT_OUTPUTS, blobs)


def recorded_rows(engine: Engine, job_id: str, lo: int = 0, hi: int | None = None,
                  files: OutputFiles | None = None) -> tuple[pa.Table | None, list]:
    """The recorded rows of a job among input rows ``[lo, hi)`` (all when ``hi`` is ``None``).

    Reads only the shards whose rows overlap the range: their blobs, or for a job with an
    ``output_uri`` the part files of its recorded shards (through ``files``).

    Returns:
        ``(outputs, errors)``: the output table (``row`` int64 first, then one column per
        output key; ``None`` when no row succeeded), and ``(row_index, field, message)``
        tuples of the rows that failed, unordered.

    Raises:
        JobNotFoundError: no such job.
        ObjectStoreError: a part file of the job cannot be read.
    """
    outs = select(ShardOutputRow.data).where(ShardOutputRow.job_id == job_id,  # n_rows 0: a job without rows
                                             or_(ShardOutputRow.row_end > lo, ShardOutputRow.n_rows == 0))
    parts = select(ShardRow.shard_index).where(ShardRow.job_id == job_id, ShardRow.rows_ok > 0,
                                               ShardRow.row_end > lo)
    errs = select(RowErrorRow.row_index, RowErrorRow.field, RowErrorRow.message).where(
        RowErrorRow.job_id == job_id, RowErrorRow.row_index >= lo)
    if hi is not None:
        outs, errs = outs.where(ShardOutputRow.row_start < hi), errs.where(RowErrorRow.row_index < hi)
        parts = parts.where(ShardRow.row_start < hi)
    with read(engine) as conn:
        output_uri = job_output_uri(conn, engine, job_id)
        blobs = conn.execute(outs.order_by(ShardOutputRow.shard_index)).scalars().all()
        indices = [] if output_uri is None else conn.execute(parts.order_by(ShardRow.shard_index)).scalars().all()
        errors = [tuple(e) for e in conn.execute(errs).all()]
    tables = [decode(b) for b in blobs]
    if indices:
        tables += output_files(files).open(output_uri).read(job_id, indices)
    table = concat(tables)
    if table is not None and (lo > 0 or hi is not None):
        rows = table.column(ROW)
        keep = pc.greater_equal(rows, lo)
        if hi is not None:
            keep = pc.and_(keep, pc.less(rows, hi))
        table = table.filter(keep)
    return table, errors


def job_output_uri(conn: Connection, engine: Engine, job_id: str) -> str | None:
    """The ``output_uri`` of job ``job_id`` (``None``: results in the database), on ``conn``.

    Raises:
        JobNotFoundError: no such job.
    """
    row = conn.execute(select(JobRow.output_uri).where(JobRow.id == job_id)).first()
    if row is None:
        raise JobNotFoundError(f"no job {job_id!r} in results store {engine.url!r}")
    return row.output_uri


def output_files(files: OutputFiles | None) -> OutputFiles:
    """``files``, or the process's own (:class:`OutputFiles` on the process's settings) when ``None``."""
    return OutputFiles() if files is None else files


def results_table(engine: Engine, job_id: str, lo: int = 0, hi: int | None = None,
                  files: OutputFiles | None = None) -> pa.Table:
    """Outputs and row errors of a job as one Arrow table, in input row order (what
    ``mlf results -o`` and the API's downloads write, without a pandas round trip).

    Args:
        lo, hi: only input rows ``[lo, hi)`` (all when ``hi`` is ``None``; see
            :func:`recorded_rows`).
        files: opens the part files of a job with an ``output_uri``.

    Returns:
        ``row`` (int64) first, one column per output key (null on rows that failed;
        integer labels stay integers), then ``error`` and ``error_field`` (text, null
        on rows that succeeded). Rows not yet recorded are absent.

    Raises:
        JobNotFoundError: no such job.
    """
    table, errors = recorded_rows(engine, job_id, lo, hi, files)
    failed = pa.table({ROW: pa.array([r for r, _, _ in errors], pa.int64()),
                       "error": pa.array([m for _, _, m in errors], pa.string()),
                       "error_field": pa.array([f for _, f, _ in errors], pa.string())})
    if table is None:
        return failed.sort_by(ROW)
    nulls = pa.nulls(table.num_rows, pa.string())
    scored = table.append_column("error", nulls).append_column("error_field", nulls)
    merged = pa.concat_tables([scored, failed], promote_options="permissive") if errors else scored
    return merged.sort_by(ROW)


def results_page(engine: Engine, job_id: str, offset: int, limit: int,
                 files: OutputFiles | None = None) -> list[dict]:
    """The recorded rows of a job among input rows ``[offset, offset + limit)``.

    Returns:
        One dict per recorded row, in row order: ``row``, the output keys (e.g.
        ``prediction``, ``score``, ``probabilities``) for rows that succeeded, or
        ``error`` and ``error_field`` for rows that failed. Rows not yet recorded are
        absent. Reads only the shards whose rows overlap the page: a page costs the
        same at any offset.

    Raises:
        JobNotFoundError: no such job.
    """
    table, errs = recorded_rows(engine, job_id, offset, offset + limit, files)
    rows = [] if table is None else [{k: v for k, v in rec.items() if v is not None} for rec in table.to_pylist()]
    rows += [{"row": r, "error": m, "error_field": f} for r, f, m in errs]
    return sorted(rows, key=lambda d: d["row"])


def finished(engine: Engine, job_ids: Sequence[str]) -> dict[str, tuple[JobState, pa.Table | None, list]]:
    """The jobs among ``job_ids`` that have ended, with their recorded rows, in three
    queries whatever their number (how waiting online callers get their answers).

    Returns:
        ``{job_id: (state, outputs, errors)}`` for each terminal job, where ``outputs``
        is the output table (``row`` first) or ``None`` when no row succeeded, and
        ``errors`` ``(row_index, field, message)`` tuples, as :func:`recorded_rows` gives
        them. Unknown and unfinished jobs are absent.
    """
    states: dict[str, JobState] = {}
    tables: dict[str, list[pa.Table]] = defaultdict(list)
    errors: dict[str, list] = defaultdict(list)
    with read(engine) as conn:
        for chunk in chunks(list(job_ids)):
            ended = {job_id: JobState(state) for job_id, state in conn.execute(_FINISHED_STATES, {"job_ids": chunk})}
            if not ended:
                continue
            states.update(ended)
            for job_id, data in conn.execute(_FINISHED_OUTPUTS, {"job_ids": list(ended)}):
                tables[job_id].append(decode(data))
            for job_id, row, field_, message in conn.execute(_FINISHED_ERRORS, {"job_ids": list(ended)}):
                errors[job_id].append((row, field_, message))
    return {j: (state, concat(tables.get(j, [])), errors.get(j, [])) for j, state in states.items()}


def row_errors(engine: Engine, job_id: str, limit: int = 10) -> list[RowError]:
    """The first ``limit`` row errors of a job, by row (an index range of the primary
    key: cheap however many rows failed). Empty for an unknown job."""
    query = (select(RowErrorRow.row_index, RowErrorRow.message, RowErrorRow.field)
             .where(RowErrorRow.job_id == job_id).order_by(RowErrorRow.row_index).limit(limit))
    with read(engine) as conn:
        return [RowError(row, message, field_) for row, message, field_ in conn.execute(query)]
