"""Pure scoring: converted pieces of a shard in, the shard's output table and row errors out.

Nothing here touches the broker or the results store; :mod:`worker.tasks` claims the shard
and records what this returns, and :mod:`worker.pipeline` feeds the pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ml_framework.store import RowError
from ml_framework.store.outputs import ROW, outputs_table
from worker.inputs import Converted
from worker.outputs import decode_outputs
from worker.runtimes import Runtime
from worker.runtimes.batching import BatchRun


@dataclass
class ShardOutcome:
    """The scored rows of one shard.

    Attributes:
        outputs: the rows that succeeded, as an output table (``row`` first, ascending,
            then one column per output key; see :func:`worker.outputs.decode_outputs`).
        errors: one :class:`RowError` per row that did not, sorted by row.
        oom_splits: batches split after an out-of-memory error.
        model_load_s: seconds this shard spent loading and warming up its model (a cold
            start), else ``None``.
    """

    outputs: pa.Table
    errors: list[RowError] = field(default_factory=list)
    oom_splits: int = 0
    model_load_s: float | None = None


def assemble(runtime: Runtime, piece: Converted, run: BatchRun) -> tuple[pa.Table | None, list[RowError]]:
    """The output table and row errors of one converted piece after its forward passes.

    Args:
        piece: the piece (its ``rows`` number the rows of ``run``).
        run: what the model did with ``piece.x``.

    Returns:
        ``(table or None when no row succeeded, errors)``: the piece's conversion errors,
        the rows the model failed on, and the rows whose outputs are not finite.
    """
    rows = piece.rows
    errors = list(piece.errors)
    errors.extend(RowError(int(rows[i]), f"row {int(rows[i])}: {run.errors.get(int(i), 'model failed')}")
                  for i in np.flatnonzero(~run.ok))
    if not run.ok.any():
        return None, errors
    ok = run.ok if not run.ok.all() else slice(None)
    table, failures = decode_outputs(rows[ok], run.outputs[ok], runtime.manifest.outputs)
    errors.extend(RowError(row, f"row {row}: {message}") for row, message in failures)
    return table, errors


def score_pieces(runtime: Runtime, pieces: Iterable[Converted], batch_size: int) -> ShardOutcome:
    """Score converted pieces of one shard, in batches of ``batch_size`` rows, keeping the
    device fed across piece boundaries (:meth:`Runtime.stream`).

    Returns:
        A :class:`ShardOutcome` whose outputs and errors cover each row of the pieces once.
    """
    tables: list[pa.Table] = []
    errors: list[RowError] = []
    oom_splits = 0
    for piece, run in runtime.stream(pieces, batch_size, x_of=lambda p: p.x):
        table, piece_errors = assemble(runtime, piece, run)
        if table is not None:
            tables.append(table)
        errors.extend(piece_errors)
        oom_splits += run.oom_splits
    return ShardOutcome(_outputs(tables), sorted(errors, key=lambda e: e.row_index), oom_splits)


def _outputs(tables: Sequence[pa.Table]) -> pa.Table:
    """The pieces' tables as one, in row order (an empty table: only ``row``)."""
    if not tables:
        return outputs_table([])
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
    rows = table.column(ROW)
    if len(rows) > 1 and not pc.all(pc.greater(rows.slice(1), rows.slice(0, len(rows) - 1))).as_py():
        table = table.sort_by(ROW)  # a converter may reorder rows (text, by length)
    return table


def score_table(runtime: Runtime, table: pa.Table, columns: Sequence[str], row_start: int,
                batch_size: int) -> ShardOutcome:
    """Convert and score every row of ``table`` in this thread (online requests, tests).

    Args:
        table: the rows; ``columns`` feed the model in ``inputs.columns`` order.
        row_start: dataset row number of ``table``'s first row.
        batch_size: rows per forward pass.
    """
    return score_pieces(runtime, [runtime.converter.convert(table, columns, row_start)], batch_size)
