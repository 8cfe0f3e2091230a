"""A job's results page by page, every page with the columns of the whole job: what the HTTP
API's Arrow IPC and NDJSON streams send (:mod:`producer.api.streams`), without holding the
whole result. The columns are learnt from each shard's stored schema (the head of its blob,
or the footer of its part file for a job with an ``output_uri``), not from its rows; each
page is read through :func:`~ml_framework.store.outputs.results_table` when it is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from sqlalchemy import Engine, func, select

from ml_framework.errors import JobNotFoundError
from ml_framework.store.engine import read
from ml_framework.store.models import JobRow, ShardOutputRow, ShardRow
from ml_framework.store.output_files import OutputFiles
from ml_framework.store.outputs import (
    ROW,
    decode,
    job_output_uri,
    output_files,
    results_table,
    text_column,
)

STREAM_PAGE_ROWS = 10_000
"""Input rows per page of a streamed result (:func:`results_pages`)."""
SCHEMA_PREFIX_BYTES = 65_536
"""Bytes of each stored shard blob read to learn its columns: an Arrow IPC stream opens
with its schema message (a few hundred bytes for the output columns)."""
_ERROR_FIELDS = [pa.field("error", pa.string()), pa.field("error_field", pa.string())]


def results_schema(engine: Engine, job_id: str, files: OutputFiles | None = None) -> pa.Schema:
    """The columns :func:`results_table` gives for the whole job, learnt from the head of
    each stored shard blob (:data:`SCHEMA_PREFIX_BYTES`), or the footer of each part file
    of a job with an ``output_uri``, not from its rows.

    Types are merged as :func:`concat` merges them (a key numeric in one shard and text in
    another becomes text).

    Raises:
        JobNotFoundError: no such job.
        ObjectStoreError: a part file of the job cannot be read.
    """
    query = (select(ShardOutputRow.shard_index, ShardOutputRow.n_rows,
                    func.substr(ShardOutputRow.data, 1, SCHEMA_PREFIX_BYTES))
             .where(ShardOutputRow.job_id == job_id).order_by(ShardOutputRow.shard_index))
    schemas = []
    with read(engine) as conn:
        output_uri = job_output_uri(conn, engine, job_id)
        for shard_index, n, head in conn.execute(query).all():
            try:
                schemas.append((n, pa.ipc.open_stream(pa.py_buffer(bytes(head))).schema))
            except (pa.ArrowInvalid, OSError):  # a schema message longer than the head: read the blob
                whole = conn.execute(select(ShardOutputRow.data).where(
                    ShardOutputRow.job_id == job_id, ShardOutputRow.shard_index == shard_index)).scalar_one()
                schemas.append((n, decode(whole).schema))
        parts = [] if output_uri is None else conn.execute(
            select(ShardRow.shard_index, ShardRow.rows_ok).where(ShardRow.job_id == job_id, ShardRow.rows_ok > 0)
            .order_by(ShardRow.shard_index)).all()
    if parts:
        prefix = output_files(files).open(output_uri)
        schemas += [(n, prefix.schema(job_id, index)) for index, n in parts]
    kept = [s for n, s in schemas if n] or [s for _, s in schemas[:1]]
    if not kept:
        return pa.schema([pa.field(ROW, pa.int64()), *_ERROR_FIELDS])
    try:
        merged = pa.unify_schemas(kept, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        types: dict[str, set] = {}
        for s in kept:
            for f in s:
                types.setdefault(f.name, set()).add(f.type)
        mixed = {name for name, ts in types.items() if len(ts - {pa.null()}) > 1}
        merged = pa.unify_schemas([pa.schema([pa.field(f.name, pa.string()) if f.name in mixed else f for f in s])
                                   for s in kept], promote_options="permissive")
    return pa.schema([*merged, *_ERROR_FIELDS])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly the columns of ``schema``, in its order and types: a column
    it lacks is null, one ``schema`` lacks is dropped, a number where ``schema`` has text
    becomes text as :func:`column` writes it, any other type is cast."""
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        col = table.column(f.name)
        if col.type != f.type:
            col = text_column(col.to_pylist()) if pa.types.is_string(f.type) else col.cast(f.type)
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def results_pages(engine: Engine, job_id: str, page_rows: int = STREAM_PAGE_ROWS,
                  files: OutputFiles | None = None) -> Iterator[pa.Table]:
    """A job's :func:`results_table` page by page, each page read from the store when it is
    asked for: input rows ``[0, page_rows)``, ``[page_rows, 2 * page_rows)``, ... up to
    the job's ``n_rows``, every page with the columns of :func:`results_schema` (the first page
    is read after it). Memory holds one page and the shards it overlaps, never the whole
    result. A page without recorded rows is skipped; a job without any yields one
    page without rows (its columns).

    Yields:
        Tables of at most ``page_rows`` rows, in row order; concatenated, they equal
        :func:`results_table` of a job that has ended.

    Raises:
        JobNotFoundError: no such job (also when it is deleted between pages).
    """
    schema = results_schema(engine, job_id, files)
    with read(engine) as conn:
        n_rows = conn.execute(select(JobRow.n_rows).where(JobRow.id == job_id)).scalar()
    if n_rows is None:
        raise JobNotFoundError(f"no job {job_id!r} in results store {engine.url!r}")
    empty = True
    for lo in range(0, n_rows, page_rows):
        page = results_table(engine, job_id, lo, lo + page_rows, files)
        if page.num_rows:
            empty = False
            yield conform(page, schema)
    if empty:
        yield schema.empty_table()
