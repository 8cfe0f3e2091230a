"""results stored per shard, as one compressed Arrow IPC stream (table shard_outputs),
instead of one JSON row per input row (table results); existing results are converted

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import json

import pyarrow as pa
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_BATCH = 10_000  # old rows fetched per round trip while converting


def _encode(table: pa.Table) -> bytes:
    # frozen copy of ml_framework.store.outputs.encode as of this revision
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _column(values: list) -> pa.Array:
    # frozen copy of ml_framework.store.outputs.column: labels mixing text and numbers
    # (valid in manifests) become text
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                        pa.string())


def _table(rows: list[int], outputs: list[dict]) -> pa.Table:
    keys = list(dict.fromkeys(k for rec in outputs for k in rec))
    columns = {"row": pa.array(rows, pa.int64())}
    for k in keys:
        columns[k] = _column([rec.get(k) for rec in outputs])
    return pa.table(columns)


def upgrade() -> None:
    shard_outputs = op.create_table(
        "shard_outputs",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("shard_index", sa.Integer, primary_key=True),
        sa.Column("row_start", sa.Integer, nullable=False),
        sa.Column("row_end", sa.Integer, nullable=False),
        sa.Column("n_rows", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        # the blobs are compressed already (LZ4): TOAST's own pglz pass would only cost
        # time (20 to 30 ms on a 5 MB shard), so store them out of line, uncompressed
        op.execute("ALTER TABLE shard_outputs ALTER COLUMN data SET STORAGE EXTERNAL")
    current: tuple[str, int] | None = None
    rows: list[int] = []
    outputs: list[dict] = []

    def flush() -> None:
        if current is not None and rows:
            conn.execute(sa.insert(shard_outputs).values(
                job_id=current[0], shard_index=current[1], row_start=min(rows), row_end=max(rows) + 1,
                n_rows=len(rows), data=_encode(_table(rows, outputs))))

    result = conn.execute(sa.text(  # streamed: the inserts above run while it is open
        "SELECT job_id, shard_index, row_index, output FROM results ORDER BY job_id, shard_index, row_index"
    ).execution_options(yield_per=_BATCH))
    for job_id, shard_index, row_index, output in result:
        if (job_id, shard_index) != current:
            flush()
            current, rows, outputs = (job_id, shard_index), [], []
        rows.append(row_index)
        outputs.append(json.loads(output))
    flush()
    op.drop_table("results")


def downgrade() -> None:
    results = op.create_table(
        "results",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("row_index", sa.Integer, primary_key=True),
        sa.Column("shard_index", sa.Integer, nullable=False),
        sa.Column("output", sa.Text, nullable=False),
    )
    conn = op.get_bind()
    blobs = conn.execute(sa.text("SELECT job_id, shard_index, data FROM shard_outputs")).all()
    for job_id, shard_index, data in blobs:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        values = [{"job_id": job_id, "row_index": rec.pop("row"), "shard_index": shard_index,
                   "output": json.dumps({k: v for k, v in rec.items() if v is not None}, separators=(",", ":"))}
                  for rec in table.to_pylist()]
        if values:
            conn.execute(sa.insert(results), values)
    op.drop_table("shard_outputs")
