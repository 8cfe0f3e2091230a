"""What every dataset reader shares: the dataset's description and its error wrapping."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from ml_framework.errors import DatasetFormatError, DatasetSchemaError

if TYPE_CHECKING:
    from ml_framework.datasets.source import Source

MAX_CSV_BLOCK_BYTES = 1 << 30
"""Largest pyarrow CSV block a record may need; a longer record is refused (see
:mod:`ml_framework.datasets.csv`)."""
# Separators people export by mistake, named in the hint of a missing-columns error.
_OTHER_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}
READ_ERRORS = (pa.ArrowException, OSError, UnicodeDecodeError)
ROW_ERROR = "__row_error__"
"""The column a reader adds to a piece that holds records it could not read as rows (a CSV
line with too many or too few fields): on those rows the reason (text), their other cells
null; null on every other row. Such a record stays a row, so row numbers do not shift, and
the worker fails it with that reason (``InputConverter.convert``). A piece without
such records has no such column."""
NAMES_SHOWN = 12
"""Column names an error message lists before it summarises the rest (see :func:`names_summary`)."""


def names_summary(names: Sequence[str], limit: int = NAMES_SHOWN) -> str:
    """Column names for an error message: the first ``limit`` quoted, then how many in all
    (``'a', 'b', ... (64 in all)``), so that a wide dataset or model stays one short line."""
    shown = ", ".join(map(repr, names[:limit]))
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


@dataclass(frozen=True)
class DatasetInfo:
    """Schema and size of a dataset, read without loading its rows.

    Attributes:
        path: absolute path of the file (or of the directory of Parquet parts or images);
            for an object, its ``s3://`` URI (text).
        format: ``csv``, ``parquet``, ``arrow`` (Arrow IPC / Feather), ``npy``,
            ``images`` (a directory of image files) or ``inline`` (rows given in memory).
        columns: column names in file order (an ``.npy`` array is one column, ``array``;
            a directory of images one column, ``path``).
        n_rows: number of data rows (header excluded; a CSV record with too many or too
            few fields counts, and fails as its own row).
        schema: the columns' Arrow types where the format stores them (Parquet, Arrow,
            ``.npy``); ``None`` for CSV, whose cells are text until a worker converts them.
        files: a directory of images: its image files, relative to it, in row order.
        source: where the rows are read from (see :mod:`ml_framework.datasets.source`);
            ``None`` for rows given in memory.
    """

    path: Path | str
    format: str
    columns: list[str]
    n_rows: int
    schema: pa.Schema | None = field(default=None, compare=False)
    files: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    source: Source | None = field(default=None, repr=False, compare=False)

    def require_columns(self, needed: Sequence[str]) -> None:
        """Raise :class:`DatasetSchemaError` naming every column of ``needed`` not in the file."""
        missing = [c for c in needed if c not in self.columns]
        if missing:
            holder = "the rows have" if self.format == "inline" else f"the {self._kind} has"
            raise DatasetSchemaError(
                f"{self.path}: missing column(s) {names_summary(missing)} "
                f"({holder} {names_summary(self.columns) or 'no columns'})"
                f"{self._delimiter_hint()}"
            )

    @property
    def _kind(self) -> str:
        """What the dataset is, for messages: ``file`` or ``directory`` (``object`` or
        ``prefix`` in object storage)."""
        if self.source is not None and self.source.local is None:
            return "prefix" if self.format == "images" or self.source.info().is_file is False else "object"
        return "directory" if self.format == "images" or Path(self.path).is_dir() else "file"

    def _delimiter_hint(self) -> str:
        if self.format != "csv":
            return ""
        for sep, name in _OTHER_DELIMITERS.items():
            if any(sep in c for c in self.columns):
                return f"; the header looks {name}-separated ({sep!r}): CSV datasets must be comma-separated"
        return ""


def decode_dictionaries(table: pa.Table) -> pa.Table:
    """``table`` with every dictionary-encoded column decoded to its value type.

    Parquet and Arrow files written from a pandas ``category`` column, and DataFrames
    given in memory, hold such columns: codes plus a dictionary of values (numbers stored
    as text, labels, paths). Readers of values need the values; a table without such a
    column is returned as is.
    """
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, pa.field(f.name, f.type.value_type, f.nullable),
                                     table.column(i).cast(f.type.value_type))
    return table


def value_type(data_type: pa.DataType) -> pa.DataType:
    """The type of the values a column of ``data_type`` holds: a dictionary's value type, else itself."""
    return data_type.value_type if pa.types.is_dictionary(data_type) else data_type


def check_unique(path: object, names: list[str]) -> list[str]:
    """``names``, or :class:`DatasetFormatError` naming the duplicates."""
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DatasetFormatError(f"{path}: duplicate column name(s) {dup}")
    return names


def too_long(exc: Exception) -> bool:
    """pyarrow's CSV error for a record longer than its block size."""
    return "straddl" in str(exc)  # pyarrow: "straddling object straddles two block boundaries"


def format_error(path: object, exc: Exception, doing: str) -> DatasetFormatError:
    """A :class:`DatasetFormatError` naming ``path`` for a reader's exception."""
    detail = None
    if isinstance(exc, UnicodeDecodeError):
        detail = f"{path}: cannot {doing}: text that is not UTF-8 ({exc.reason} at byte {exc.start})"
    elif too_long(exc):
        detail = (f"{path}: cannot {doing}: a record is longer than {MAX_CSV_BLOCK_BYTES >> 20} MiB "
                  "(a quote that is never closed?)")
    return DatasetFormatError(detail or f"{path}: cannot {doing}: {exc}")


@contextmanager
def reading(path: object, doing: str) -> Iterator[None]:
    """Turn pyarrow's and the OS's errors while reading ``path`` into a
    :class:`DatasetFormatError` naming it."""
    try:
        yield
    except DatasetFormatError:
        raise
    except READ_ERRORS as exc:
        raise format_error(path, exc, doing) from exc


def slices(table: pa.Table, piece_rows: int) -> Iterator[pa.Table]:
    """``table`` in consecutive zero-copy slices of at most ``piece_rows`` rows."""
    for start in range(0, table.num_rows, piece_rows):
        yield table.slice(start, piece_rows)
