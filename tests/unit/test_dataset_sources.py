"""Readers over a pyarrow filesystem: an object-storage-like Source (a local directory seen as
a bucket through pyarrow's SubTreeFileSystem, named by an s3:// URI) reads as the local file.

No server: the real S3 server is in tests/integration/test_object_store_datasets.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.fs as pafs
import pytest
from PIL import Image

from ml_framework.datasets import (
    ROW_ERROR,
    Source,
    decode_table,
    inspect,
    iter_shards,
    read_rows,
    shard_ranges,
)
from ml_framework.datasets import arrow as arrow_reader
from ml_framework.datasets.source import fingerprint
from ml_framework.errors import DatasetFormatError, DatasetNotFoundError, ObjectStoreError
from ml_framework.protocol import DatasetRef, InlineRows
from ml_framework.settings import load_settings
from producer.api.requests import object_allowed
from producer.datasets import plan_sources


@pytest.fixture()
def bucket(tmp_path):
    """``(directory, source_of)``: files written under ``directory/mlf-data`` are read as
    ``s3://mlf-data/<key>`` through a filesystem that is not the local one."""
    root = tmp_path / "store"
    (root / "mlf-data").mkdir(parents=True)
    fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())

    def source_of(key: str) -> Source:
        return Source(fs, f"mlf-data/{key}", f"s3://mlf-data/{key}")

    return root / "mlf-data", source_of


@pytest.fixture()
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({"x": rng.normal(size=700), "n": np.arange(700), "t": [f"r{i}" for i in range(700)]})


def write(kind: str, frame: pd.DataFrame, directory) -> str:
    """``frame`` saved as ``kind`` under ``directory``; returns its key."""
    if kind == "csv":
        frame.to_csv(directory / "d.csv", index=False)
        return "d.csv"
    if kind == "parquet":
        frame.to_parquet(directory / "d.parquet", row_group_size=128)
        return "d.parquet"
    if kind == "parts":
        (directory / "parts" / "y=1").mkdir(parents=True)
        frame.iloc[:300].to_parquet(directory / "parts" / "a.parquet", row_group_size=100)
        frame.iloc[300:].to_parquet(directory / "parts" / "y=1" / "b.parquet", row_group_size=64)
        (directory / "parts" / "_SUCCESS").write_text("")
        return "parts"
    if kind == "feather":
        feather.write_feather(pa.Table.from_pandas(frame, preserve_index=False), directory / "d.feather",
                              chunksize=90)
        return "d.feather"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["csv", "parquet", "parts", "feather"])
def test_an_object_reads_as_the_same_local_file(bucket, frame, kind):
    """Columns, row count and every row range of an object equal those of the local file."""
    directory, source_of = bucket
    key = write(kind, frame, directory)
    local, remote = inspect(directory / key), inspect(source_of(key))
    assert remote.path == f"s3://mlf-data/{key}" and remote.format == local.format
    assert (remote.columns, remote.n_rows) == (local.columns, local.n_rows) == (["x", "n", "t"], 700)
    for a, b in [(0, 1), (95, 385), (600, 700), (0, 700)]:
        assert read_rows(source_of(key), remote.format, a, b, ["n", "x"]).equals(
            read_rows(directory / key, local.format, a, b, ["n", "x"]))
    ranges = shard_ranges(700, 250)
    for got, want in zip(iter_shards(remote, ranges, ["t"]), iter_shards(local, ranges, ["t"]), strict=True):
        assert got.equals(want)


def test_an_npy_object_reads_only_the_rows_asked(bucket):
    """An .npy object: its header, then the byte range of the rows (same values as np.load)."""
    directory, source_of = bucket
    array = np.arange(500 * 6, dtype=np.float32).reshape(500, 2, 3)
    np.save(directory / "a.npy", array)
    info = inspect(source_of("a.npy"))
    assert (info.format, info.n_rows, info.schema) == ("npy", 500, inspect(directory / "a.npy").schema)
    table = read_rows(source_of("a.npy"), "npy", 123, 321, ["array"])
    assert np.array_equal(table.column("array").combine_chunks().to_numpy_ndarray(), array[123:321])
    with pytest.raises(DatasetFormatError, match=r"s3://mlf-data/a.npy: expected rows 400-600"):
        read_rows(source_of("a.npy"), "npy", 400, 600, ["array"])


def test_a_fortran_ordered_npy_object_is_refused_naming_it(bucket):
    directory, source_of = bucket
    np.save(directory / "f.npy", np.asfortranarray(np.ones((4, 3))))
    with pytest.raises(DatasetFormatError, match=r"^s3://mlf-data/f.npy: .*Fortran order"):
        inspect(source_of("f.npy"))


def test_arrow_batches_before_a_range_are_not_read_again(bucket, frame, monkeypatch):
    """After one shard of an Arrow object, a later shard skips the batches before its rows."""
    directory, source_of = bucket
    key = write("feather", frame, directory)
    arrow_reader._COUNTS.clear()
    assert read_rows(source_of(key), "arrow", 0, 700, ["n"]).num_rows == 700
    fetched = []
    real = pa.ipc.RecordBatchFileReader.get_batch
    monkeypatch.setattr(pa.ipc.RecordBatchFileReader, "get_batch",
                        lambda self, i: fetched.append(i) or real(self, i))
    table = read_rows(source_of(key), "arrow", 500, 560, ["n"])
    assert table.column("n").to_pylist() == list(range(500, 560))
    assert fetched == [5, 6]  # batches of 90 rows: 450-539 and 540-629


def test_an_image_prefix_lists_its_images_and_plans_their_uris(bucket):
    """A prefix of images is a one-column dataset; its shards carry the images' full URIs."""
    directory, source_of = bucket
    (directory / "images" / "b").mkdir(parents=True)
    for name in ("b/2.png", "1.png", "_skip.png"):
        Image.new("L", (4, 4)).save(directory / "images" / name)
    (directory / "images" / "notes.txt").write_text("not an image")
    info = inspect(source_of("images"))
    assert (info.format, info.files, info.n_rows) == ("images", ("1.png", "b/2.png"), 2)
    [shard] = list(plan_sources(info, [(0, 2)], ["path"], directory))
    assert isinstance(shard, InlineRows)
    assert decode_table(shard.data_b64).column("path").to_pylist() == [
        "s3://mlf-data/images/1.png", "s3://mlf-data/images/b/2.png"]


def test_an_object_dataset_is_planned_by_reference_to_its_uri(bucket, frame, tmp_path):
    """Shards of an object dataset are references naming its URI, never inline rows."""
    directory, source_of = bucket
    info = inspect(source_of(write("parquet", frame, directory)))
    shards = list(plan_sources(info, shard_ranges(700, 300), ["x"], tmp_path / "data"))
    stamp = fingerprint(info.source)
    assert stamp == f"{(directory / 'd.parquet').stat().st_size}-{(directory / 'd.parquet').stat().st_mtime_ns}"
    assert shards == [DatasetRef(path="s3://mlf-data/d.parquet", format="parquet", row_start=a, row_end=b,
                                 fingerprint=stamp) for a, b in [(0, 300), (300, 600), (600, 700)]]


def test_a_missing_object_is_not_found_naming_its_uri(bucket):
    _, source_of = bucket
    with pytest.raises(DatasetNotFoundError, match="dataset not found: s3://mlf-data/nothing.csv"):
        inspect(source_of("nothing.csv"))


def test_an_unsupported_object_suffix_names_the_uri(bucket):
    directory, source_of = bucket
    (directory / "d.txt").write_text("a\n1\n")
    with pytest.raises(DatasetFormatError, match=r"^s3://mlf-data/d.txt: unsupported dataset type '.txt'"):
        inspect(source_of("d.txt"))


def test_a_missing_column_of_an_object_names_it_as_an_object(bucket, frame):
    directory, source_of = bucket
    info = inspect(source_of(write("csv", frame, directory)))
    with pytest.raises(Exception, match=r"^s3://mlf-data/d.csv: missing column\(s\) 'nope' \(the object has"):
        info.require_columns(["nope"])


def test_an_uri_given_as_text_needs_the_settings():
    with pytest.raises(ObjectStoreError, match="object_source"):
        inspect("s3://mlf-data/d.csv")


@pytest.mark.parametrize(("given", "allowed"), [
    ("s3://mlf-data/allowed/x.csv", True), ("s3://mlf-data/allowed", True),
    ("s3://mlf-data/allowedx/x.csv", False), ("s3://mlf-data/other/x.csv", False),
    ("s3://whole-bucket/any/x.parquet", True), ("s3://other-bucket/allowed/x.csv", False),
])
def test_the_api_admits_only_uris_under_its_prefixes(given, allowed):
    """api_object_prefixes admits whole path parts under a prefix, nothing else."""
    prefixes = load_settings(api_object_prefixes="s3://mlf-data/allowed/,s3://whole-bucket").api_object_prefixes
    if allowed:
        assert object_allowed(prefixes, given) == given
    else:
        with pytest.raises(ObjectStoreError, match="api_object_prefixes"):
            object_allowed(prefixes, given)


def test_the_api_refuses_every_uri_by_default():
    with pytest.raises(ObjectStoreError, match=r"'s3://mlf-data/x.csv'.*\(setting api_object_prefixes; none is set\)"):
        object_allowed(load_settings().api_object_prefixes, "s3://mlf-data/x.csv")


def test_a_malformed_prefix_setting_is_refused():
    with pytest.raises(Exception, match="api_object_prefixes"):
        load_settings(api_object_prefixes="s3://UPPER/x")


def test_a_ragged_line_of_a_csv_object_fails_its_row_alone(bucket):
    """A CSV object's record with a field too many is a row of its own, named by its line."""
    directory, source_of = bucket
    (directory / "r.csv").write_text("a,b\n1,2\n3,4,5\n6,7\n")
    info = inspect(source_of("r.csv"))
    assert info.n_rows == 3
    table = read_rows(source_of("r.csv"), "csv", 0, 3, ["a", "b"])
    assert table.column("a").to_pylist() == [b"1", None, b"6"]
    assert table.column(ROW_ERROR).to_pylist() == [None, "line 3: expected 2 fields, found 3", None]


def test_a_fingerprint_changes_with_the_dataset_and_a_worker_refuses_a_changed_one(tmp_path, bucket):
    """Rewritten (even at the same size), truncated, or a part added to a prefix: another
    fingerprint; a shard planned over the old one is refused, naming the dataset as given."""
    import os

    from ml_framework.errors import DatasetError
    from worker.pipeline import check_unchanged

    path = tmp_path / "d.csv"
    path.write_text("a\n1\n2\n")
    before = fingerprint(Source.of_path(path))
    assert fingerprint(Source.of_path(path)) == before
    path.write_text("a\n3\n4\n")  # same size, another modification time
    os.utime(path, ns=(1, 1))
    assert fingerprint(Source.of_path(path)) != before
    ref = DatasetRef(path="d.csv", format="csv", row_start=0, row_end=2, fingerprint=before)
    with pytest.raises(DatasetError, match="'d.csv' changed since the job was submitted"):
        check_unchanged(Source.of_path(path), ref)
    check_unchanged(Source.of_path(path), ref.model_copy(update={"fingerprint": None}))  # earlier releases
    directory, source_of = bucket
    (directory / "parts").mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(directory / "parts" / "p0.parquet")
    prefix = fingerprint(source_of("parts"))
    assert prefix.startswith("dir-") and fingerprint(source_of("parts")) == prefix
    pd.DataFrame({"a": [2]}).to_parquet(directory / "parts" / "p1.parquet")
    assert fingerprint(source_of("parts")) != prefix


def test_missing_rows_are_those_without_an_outcome():
    from ml_framework.protocol import ScoreShard
    from ml_framework.store import RowError
    from ml_framework.store.outputs import ROW
    from worker.scoring import ShardOutcome
    from worker.tasks import missing_rows

    msg = ScoreShard(job_id="j", shard_index=0, model="m", version=1, batch_size=2, columns=["a"],
                     source=DatasetRef(path="d.csv", format="csv", row_start=10, row_end=16))
    full = ShardOutcome(pa.table({ROW: pa.array([10, 11, 13, 14, 15], pa.int64())}), [RowError(12, "bad")])
    assert missing_rows(msg, full) == []
    short = ShardOutcome(pa.table({ROW: pa.array([10, 11], pa.int64())}), [RowError(12, "bad")])
    assert missing_rows(msg, short) == [13, 14, 15]
