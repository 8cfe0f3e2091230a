"""Reading CSV and Parquet datasets by row range."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ml_framework.datasets import (
    decode_table,
    encode_table,
    inspect,
    iter_shards,
    read_rows,
    shard_ranges,
)
from ml_framework.errors import DatasetFormatError, DatasetNotFoundError, DatasetSchemaError


@pytest.fixture()
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=1000), "b": np.arange(1000), "c": ["t"] * 1000})


@pytest.fixture(params=["csv", "parquet"])
def dataset(request, frame, tmp_path):
    path = tmp_path / f"d.{request.param}"
    if request.param == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, row_group_size=128)
    return path


def test_inspect_reads_columns_and_row_count(dataset):
    """inspect gives column names and the number of data rows."""
    info = inspect(dataset)
    assert info.columns == ["a", "b", "c"] and info.n_rows == 1000


@pytest.mark.parametrize(("a", "b"), [(0, 1), (0, 1000), (127, 129), (500, 777), (999, 1000)])
def test_read_rows_returns_exactly_the_range(dataset, frame, a, b):
    """Any row range, across Parquet row groups and CSV blocks, comes back exactly."""
    info = inspect(dataset)
    table = read_rows(dataset, info.format, a, b, ["b", "a"])
    assert table.column_names == ["b", "a"]
    assert [int(v) for v in table.column("b").to_pylist()] == list(range(a, b))


def test_iter_shards_matches_read_rows(dataset):
    """One pass over the file yields the same rows as reading each range."""
    info = inspect(dataset)
    ranges = shard_ranges(info.n_rows, 300)
    assert ranges == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    for (a, b), table in zip(ranges, iter_shards(info, ranges, ["b"]), strict=True):
        assert table.equals(read_rows(dataset, info.format, a, b, ["b"]))


def test_inline_encoding_round_trips():
    """Arrow IPC + base64 round-trips a table."""
    table = pa.table({"x": ["1", None, "3"]})
    assert decode_table(encode_table(table)).equals(table)


def test_missing_and_unsupported_files(tmp_path):
    """A missing path and an unsupported suffix are named in the error."""
    with pytest.raises(DatasetNotFoundError, match="nope.csv"):
        inspect(tmp_path / "nope.csv")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DatasetFormatError, match="unsupported dataset type '.xlsx'"):
        inspect(tmp_path / "d.xlsx")


def test_missing_columns_are_named(dataset):
    """require_columns lists every missing column."""
    with pytest.raises(DatasetSchemaError, match="'z', 'y'"):
        inspect(dataset).require_columns(["a", "z", "y"])


def test_duplicate_csv_columns_are_refused(tmp_path):
    """A CSV header that repeats a name is refused, naming it."""
    path = tmp_path / "dup.csv"
    path.write_text("a,b,a\n1,2,3\n")
    with pytest.raises(DatasetFormatError, match="duplicate column name"):
        inspect(path)


def test_short_file_is_reported(dataset):
    """Asking for rows past the end of the file fails, naming the file."""
    info = inspect(dataset)
    with pytest.raises(DatasetFormatError, match="has only 1000"):
        read_rows(dataset, info.format, 900, 1100, ["a"])


def test_blank_lines_and_multiline_fields_keep_row_numbers(tmp_path):
    """Row ranges name the same parsed records as inspect(), whatever blank lines or quoted
    newlines the CSV holds (regression: rows shifted onto the wrong row numbers)."""
    path = tmp_path / "tricky.csv"
    lines = ["id,note"]
    for i in range(12):
        lines.append(f'{i},"line one\nline two"' if i % 4 == 1 else f"{i},plain")
        if i % 5 == 2:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    info = inspect(path)
    assert info.n_rows == 12
    for a, b in [(0, 3), (3, 6), (5, 12), (11, 12)]:
        ids = [int(v) for v in read_rows(path, "csv", a, b, ["id"]).column("id").to_pylist()]
        assert ids == list(range(a, b))
    ranges = shard_ranges(12, 5)
    for (a, _b), table in zip(ranges, iter_shards(info, ranges, ["id"]), strict=True):
        assert int(table.column("id")[0].as_py()) == a


def test_ragged_row_is_named_by_line(tmp_path):
    """A row with too many fields is reported with its line number and the file."""
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n1,2\n3,4,5\n6,7\n")
    with pytest.raises(DatasetFormatError, match=r"ragged\.csv: line 3: expected 2 fields, found 3"):
        inspect(path)


def test_duplicate_parquet_columns_are_refused(tmp_path):
    """Parquet files with a repeated column name are refused at inspect, naming it."""
    import pyarrow.parquet as pq

    path = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["x", "x"]), path)
    with pytest.raises(DatasetFormatError, match=r"duplicate column name\(s\) \['x'\]"):
        inspect(path)


def test_directory_is_not_a_dataset(tmp_path):
    """A directory named like a dataset is refused clearly."""
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(DatasetFormatError, match="is a directory"):
        inspect(tmp_path / "d.csv")


def test_multiline_fields_across_parse_blocks(tmp_path):
    """A CSV larger than one 4 MiB parse block, with quoted newlines throughout, keeps
    every record whole and numbered (regression: blocks were cut inside quoted fields)."""
    from ml_framework.datasets import CSV_BLOCK_BYTES

    path = tmp_path / "big.csv"
    note = '"first line, with a comma\nsecond\nthird ""quoted""\nfourth"'  # 3 of 4 newlines quoted
    n = 0
    with open(path, "w") as f:
        f.write("id,note,x\n")
        while f.tell() < 4.5 * CSV_BLOCK_BYTES:
            f.write(f"{n},{note},{n * 0.5}\n")
            n += 1
    info = inspect(path)
    assert info.n_rows == n
    ids = read_rows(path, "csv", n - 1000, n, ["id", "x"]).column("id").to_pylist()
    assert [int(v) for v in ids] == list(range(n - 1000, n))
    ranges = shard_ranges(n, 20_000)
    starts = [int(t.column("id")[0].as_py()) for t in iter_shards(info, ranges, ["id"])]
    assert starts == [a for a, _ in ranges]


def test_ragged_row_line_counts_multiline_fields(tmp_path):
    """The reported line is the ragged record's own, not an earlier line with the same text."""
    path = tmp_path / "rg.csv"
    path.write_text('x,note,y\n1,"a\n2,b\nc",0\n3,d,0\n2,b\n')
    with pytest.raises(DatasetFormatError, match=r"line 6: expected 3 fields, found 2"):
        inspect(path)


def test_ragged_row_with_invalid_utf8_is_named(tmp_path, capfd):
    """A ragged row holding non-UTF-8 bytes is reported by line, without a traceback."""
    path = tmp_path / "rg.csv"
    path.write_bytes(b"x,y\n1,2\n3,\xff,9\n")
    with pytest.raises(DatasetFormatError, match=r"line 3: expected 2 fields, found 3"):
        inspect(path)
    assert "Traceback" not in capfd.readouterr().err


def test_a_parquet_file_replaced_under_the_same_name_size_and_mtime_is_read_anew(tmp_path):
    """Workers keep Parquet footers between shards: a file replaced by one of the same size
    whose mtime was kept (``cp -p``, ``rsync -a``) is still read anew, not through the old
    footer (whose columns it no longer has)."""
    import os
    import shutil

    import pyarrow.parquet as pq

    from ml_framework.datasets import read_rows

    path, other = tmp_path / "d.parquet", tmp_path / "new.parquet"
    pq.write_table(pa.table({"x": np.arange(100, dtype=np.int64)}), path)
    pq.write_table(pa.table({"y": np.arange(100, dtype=np.int64)}), other)
    assert read_rows(path, "parquet", 0, 3, ["x"]).column("x").to_pylist() == [0, 1, 2]
    st = path.stat()
    assert other.stat().st_size == st.st_size  # same size: only the names differ
    shutil.copyfile(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert read_rows(path, "parquet", 0, 3, ["y"]).column("y").to_pylist() == [0, 1, 2]
