"""The worker's input conversion, called the way the tests need it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ml_framework.manifest import InputSpec, ModelManifest, OutputSpec, Preprocessing
from worker.inputs import converter_for


def to_inputs(table: pa.Table, columns: list[str], spec: InputSpec, prep: Preprocessing | None = None,
              row_start: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """``(x, rows, errors)`` of the worker's converter for ``spec`` over one piece, checking
    that rows and errors cover every row of the piece once."""
    manifest = ModelManifest(name="m", version=1, framework="torch", artifact="a", inputs=spec,
                             outputs=OutputSpec(kind="regression"), preprocessing=prep or Preprocessing())
    piece = converter_for(manifest, ".").convert(table, columns, row_start)
    covered = sorted([*piece.rows.tolist(), *(e.row_index for e in piece.errors)])
    assert piece.n_rows == table.num_rows and covered == list(range(row_start, row_start + table.num_rows))
    return piece.x, piece.rows, piece.errors
