"""Reading CSV and Parquet datasets by row range."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ml_framework.datasets import (
    ROW_ERROR,
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


def ragged(table: pa.Table) -> dict[int, str]:
    """The rows a reader marked as unreadable, by position in ``table``, with the reason."""
    if ROW_ERROR not in table.column_names:
        return {}
    return {i: r for i, r in enumerate(table.column(ROW_ERROR).to_pylist()) if r is not None}


def test_ragged_lines_stay_rows_in_their_places(tmp_path):
    """Data lines 4 and 8 with one field too many and one too few are rows 2 and 6, marked
    with their line and field counts; every other row keeps its number, in inspect, in any
    row range and in one pass over the file (regression: the file was refused whole,
    naming only line 4)."""
    path = tmp_path / "ragged.csv"
    lines = ["a,b"] + [f"{i},{i * 10}" for i in range(10)]
    lines[3] = "2,20,extra"  # file line 4
    lines[7] = "6"  # file line 8
    path.write_text("\n".join(lines) + "\n")
    info = inspect(path)
    assert info.n_rows == 10
    whole = read_rows(path, "csv", 0, 10, ["a", "b"])
    assert ragged(whole) == {2: "line 4: expected 2 fields, found 3", 6: "line 8: expected 2 fields, found 1"}
    assert whole.column("a").to_pylist() == [str(i).encode() if i not in (2, 6) else None for i in range(10)]
    for a, b in [(0, 2), (2, 3), (3, 7), (5, 10), (7, 10)]:
        table = read_rows(path, "csv", a, b, ["a"])
        assert table.column("a").to_pylist() == whole.column("a").to_pylist()[a:b]
        assert ragged(table) == {i - a: r for i, r in ragged(whole).items() if a <= i < b}
    ranges = shard_ranges(10, 3)
    for (a, b), table in zip(ranges, iter_shards(info, ranges, ["b"]), strict=True):
        assert table.column("b").to_pylist() == whole.column("b").to_pylist()[a:b]
        assert ragged(table) == {i - a: r for i, r in ragged(whole).items() if a <= i < b}


def test_ragged_line_after_a_multiline_field_and_blank_lines(tmp_path):
    """The line named is the ragged record's own first line, counting quoted newlines and
    blank lines; records at the end of the file and after a long record are placed too."""
    path = tmp_path / "rg.csv"
    path.write_text('x,note,y\n1,"a\n2,b\nc",0\n\n3,d,0\n2,b\n4,e,0\n5\n')
    info = inspect(path)
    assert info.n_rows == 5
    table = read_rows(path, "csv", 0, 5, ["x", "note"])
    assert table.column("x").to_pylist() == [b"1", b"3", None, b"4", None]
    assert ragged(table) == {2: "line 7: expected 3 fields, found 2", 4: "line 9: expected 3 fields, found 1"}


def test_ragged_line_after_a_record_longer_than_a_block(tmp_path):
    """A ragged line after a 10 MB cell (which makes the reader parse again with a larger
    block) is still one row in its place."""
    path = tmp_path / "long.csv"
    path.write_text(f"a,b\n1,2\n3,{'x' * (10 << 20)}\n5,6,7\n8,9\n")
    assert inspect(path).n_rows == 4
    table = read_rows(path, "csv", 0, 4, ["a"])
    assert table.column("a").to_pylist() == [b"1", b"3", None, b"8"]
    assert ragged(table) == {2: "line 4: expected 2 fields, found 3"}


def test_ragged_line_that_is_not_utf8_is_a_row_and_cells_keep_their_bytes(tmp_path):
    """A ragged line holding non-UTF-8 bytes (which pyarrow cannot hand to its skip
    handler) is still one failed row in its place, the other cells keep their raw bytes
    (a Latin-1 cell then fails alone on the worker), and nothing is printed: no traceback
    from inside pyarrow (run in a fresh process, as the CLI would)."""
    import subprocess
    import sys

    path = tmp_path / "rg.csv"
    path.write_bytes(b"x,y\n1,2\n3,\xff,9\n4,caf\xe9\n5,\xc3\xa9\n")
    table = read_rows(path, "csv", 0, inspect(path).n_rows, ["x", "y"])
    assert table.column("y").to_pylist() == [b"2", None, b"caf\xe9", b"\xc3\xa9"]
    assert ragged(table) == {1: "line 3: expected 2 fields, found 3"}
    code = ("import sys; from ml_framework.datasets import inspect, read_rows; "
            "info = inspect(sys.argv[1]); print(info.n_rows, read_rows(info.path, 'csv', 0, 4, ['y']).num_rows)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["4", "4"], "")


def test_every_reader_takes_a_dataset_without_rows(tmp_path):
    """A CSV header, a Parquet schema, a directory of empty Parquet parts, an Arrow file and
    an .npy array without rows are datasets of 0 rows (regression: refused at submit), and
    reading no rows gives their columns with the types they store."""
    import pyarrow.parquet as pq

    empty = pa.table({"a": pa.array([], pa.float64()), "b": pa.array([], pa.int64())})
    (tmp_path / "h.csv").write_text("a,b\n")
    pq.write_table(empty, tmp_path / "e.parquet")
    (tmp_path / "parts").mkdir()
    for i in range(2):
        pq.write_table(empty, tmp_path / "parts" / f"p{i}.parquet")
    with pa.ipc.new_file(tmp_path / "e.arrow", empty.schema) as writer:
        writer.write_table(empty)
    np.save(tmp_path / "e.npy", np.zeros((0, 2), np.float32))
    for name, columns in [("h.csv", ["a", "b"]), ("e.parquet", ["a", "b"]), ("parts", ["a", "b"]),
                          ("e.arrow", ["a", "b"]), ("e.npy", ["array"])]:
        info = inspect(tmp_path / name)
        assert (info.n_rows, info.columns) == (0, columns), name
        assert shard_ranges(info.n_rows, 100) == []
        table = read_rows(info.path, info.format, 0, 0, columns)
        assert table.num_rows == 0 and table.column_names == columns, name
        if info.schema is not None:
            assert table.schema.field(columns[0]).type == info.schema.field(columns[0]).type


def test_missing_columns_and_the_columns_there_are_summarised_alike():
    """Missing-column errors list both the missing columns and those the dataset has as
    one short summary each, the first few names then the count (regression: 64 missing
    names in full, the file's cut at 20 without a count); rows given in memory are called
    rows, not a file."""
    from pathlib import Path

    from ml_framework.datasets import DatasetInfo

    wanted = [f"pixel_{i}" for i in range(64)]
    info = DatasetInfo(Path("/data/wide.csv"), "csv", [f"col{i}" for i in range(30)], 5)
    with pytest.raises(DatasetSchemaError) as caught:
        info.require_columns(wanted)
    message = str(caught.value)
    assert "missing column(s) 'pixel_0', 'pixel_1'" in message and "(64 in all)" in message
    assert "'pixel_63'" not in message and "the file has 'col0', 'col1'" in message and "(30 in all)" in message
    inline = DatasetInfo(Path("<inline rows>"), "inline", ["a"], 1)
    with pytest.raises(DatasetSchemaError, match=r"the rows have 'a'\)") as caught:
        inline.require_columns(["b"])
    assert "file" not in str(caught.value)


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
