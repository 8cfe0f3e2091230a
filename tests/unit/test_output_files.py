"""Results in an output prefix (``output_uri``): part names, writes that replace, reading back
in row order equal to a database job's results, deletion, and the HTTP API's prefix rule.

The tests taking ``store`` run on SQLite here and on PostgreSQL in
tests/integration/test_output_uri.py (:func:`tests.conftest.database_tests`).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from ml_framework.errors import JobNotFoundError, JobOptionError, ObjectStoreError
from ml_framework.manifest import OutputSpec
from ml_framework.store import JobState, NewJob, ResultStore, RowError
from ml_framework.store.output_files import OutputFiles, normalize, part_name
from ml_framework.store.outputs import output_schema
from producer.api.requests import output_uri_allowed
from producer.plan import JobOptions

LABELS = ["cat", "dog", "owl"]
RANGES = [(0, 3), (3, 6), (6, 8)]


@pytest.fixture()
def store(db_url):
    """A store on SQLite here, on PostgreSQL in tests/integration/test_output_uri.py (``db_kind``)."""
    s = ResultStore(db_url)
    yield s
    s.close()


def shard_table(rows: list[int]) -> pa.Table:
    """A classification shard's output table as the worker's decoder writes it."""
    k = len(LABELS)
    probs = [[(r + j) % k / 3.0 for j in range(k)] for r in rows]
    return pa.table({
        "row": pa.array(rows, pa.int64()),
        "prediction": pa.array([LABELS[r % k] for r in rows]),
        "score": pa.array([max(p) for p in probs], pa.float64()),
        "probabilities": pa.FixedSizeListArray.from_arrays(pa.array([x for p in probs for x in p], pa.float64()), k),
    })


def record_job(store: ResultStore, output_uri: str | None, order=(2, 0, 1)) -> str:
    """A job of three shards (rows 0-7; row 4 fails) recorded shard by shard in ``order``."""
    job_id = uuid.uuid4().hex
    schema = output_schema(OutputSpec(kind="classification", labels=LABELS))
    store.create_jobs([NewJob(job_id, "m", 1, "d.csv", 8, RANGES, 4, output_schema=schema, output_uri=output_uri)])
    for index in order:
        lo, hi = RANGES[index]
        rows = [r for r in range(lo, hi) if r != 4]
        errors = [RowError(4, "row 4: not a number", "x")] if lo <= 4 < hi else []
        assert store.complete_shard(job_id, index, shard_table(rows), errors)
    return job_id


def test_part_names_are_zero_padded_by_shard():
    """A shard's part file is named by its index, zero-padded to six digits."""
    assert part_name(0) == "part-000000.parquet"
    assert part_name(42) == "part-000042.parquet"
    assert part_name(1_234_567) == "part-1234567.parquet"


def test_normalize_accepts_s3_and_local_directories(tmp_path, monkeypatch):
    """An s3:// prefix loses its trailing slash; a local path becomes absolute; other schemes are refused."""
    assert normalize("s3://mlf-data/results/") == "s3://mlf-data/results"
    monkeypatch.chdir(tmp_path)
    assert normalize("out/../res") == str(tmp_path / "res")
    for bad in ("", "   ", "https://example.com/x", "s3://Bad_Bucket/x", "s3://b/../x"):
        with pytest.raises(ObjectStoreError, match="output_uri|s3://"):
            normalize(bad)


def test_local_write_replaces_the_part_whole(tmp_path):
    """Writing a shard twice leaves one part file with the last rows, and no temporary file."""
    prefix = OutputFiles().open(normalize(str(tmp_path)))
    prefix.write("j1", 3, shard_table([0, 1, 2]))
    prefix.write("j1", 3, shard_table([0, 1]))
    assert sorted(p.name for p in (tmp_path / "j1").iterdir()) == ["part-000003.parquet"]
    assert prefix.read("j1", [3])[0].equals(shard_table([0, 1]))
    assert prefix.schema("j1", 3) == shard_table([0]).schema
    assert prefix.part_uri("j1", 3) == f"{tmp_path}/j1/part-000003.parquet"


def test_missing_part_names_its_file(tmp_path):
    """Reading a part that is not there raises naming the file."""
    prefix = OutputFiles().open(normalize(str(tmp_path)))
    with pytest.raises(ObjectStoreError, match="part-000007.parquet: cannot read results"):
        prefix.read("j2", [7])


def test_check_creates_a_local_directory_and_refuses_a_file(tmp_path):
    """At submit a local output directory is created; a path that is a file is refused, named."""
    files = OutputFiles()
    assert files.check(str(tmp_path / "new" / "dir")) == str(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ObjectStoreError, match=f"output_uri {tmp_path / 'plain'}: cannot write there"):
        files.check(str(tmp_path / "plain"))


def test_results_in_files_equal_results_in_the_database(store, tmp_path):
    """The same shards recorded to a prefix and to the database read back equal, in row order,
    by every reader: the whole table, pages, the paged stream and the DataFrame."""
    from producer.results import job_results

    in_db = record_job(store, None)
    in_files = record_job(store, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / in_files).iterdir()) == [part_name(i) for i in range(3)]
    expected = store.results_table(in_db)
    got = store.results_table(in_files)
    assert got.equals(expected)
    assert got.column("row").to_pylist() == list(range(8))
    assert got.column("error").to_pylist()[4] == "row 4: not a number"
    assert store.results_page(in_files, 2, 3) == store.results_page(in_db, 2, 3)
    assert pa.concat_tables(store.results_pages(in_files, page_rows=3)).equals(
        pa.concat_tables(store.results_pages(in_db, page_rows=3)))
    assert job_results(store, in_files).equals(job_results(store, in_db))
    status = store.job(in_files)
    assert (status.state, status.rows_ok, status.rows_failed, status.output_uri) == (
        JobState.PARTIAL, 7, 1, str(tmp_path))
    assert store.job(in_db).output_uri is None


def test_a_shard_recorded_twice_keeps_its_rows_once(store, tmp_path):
    """A redelivered shard overwrites its part with the same rows and is counted once."""
    job_id = record_job(store, str(tmp_path))
    before = store.results_table(job_id)
    assert not store.complete_shard(job_id, 1, shard_table([3, 5]), [RowError(4, "row 4: not a number", "x")])
    assert store.results_table(job_id).equals(before)
    assert store.job(job_id).rows_ok == 7
    assert len(list((tmp_path / job_id).iterdir())) == 3


def test_delete_removes_the_part_files(store, tmp_path):
    """Deleting a job removes its part files and directory, and says how many."""
    job_id = record_job(store, str(tmp_path))
    report = store.delete_job(job_id)
    assert report is not None and report.output_files == 3
    assert not (tmp_path / job_id).exists()
    with pytest.raises(JobNotFoundError):
        store.results_table(job_id)


def test_a_job_without_rows_carries_its_columns(store, tmp_path):
    """A job with no rows and an output prefix reads back its columns, typed, like a database job."""
    schema = output_schema(OutputSpec(kind="classification", labels=LABELS))
    job_id = uuid.uuid4().hex
    store.create_jobs([NewJob(job_id, "m", 1, "d.csv", 0, [], 4, output_schema=schema, output_uri=str(tmp_path))])
    table = store.results_table(job_id)
    assert table.num_rows == 0 and table.column_names[:2] == ["row", "prediction"]


def test_a_part_written_for_a_deleted_job_is_removed(store, tmp_path):
    """A shard whose job was deleted while it ran (its store handle knew the job) leaves no
    part file behind; other jobs' parts stay."""
    other = record_job(store, str(tmp_path), order=(0,))
    job_id = "f" * 32
    store.create_jobs([NewJob(job_id, "m", 1, "d.csv", 6, [(0, 3), (3, 6)], 4, output_uri=str(tmp_path))])
    assert store.complete_shard(job_id, 0, shard_table([0, 1, 2]), [])
    assert store.delete_job(job_id).output_files == 1
    assert not store.complete_shard(job_id, 1, shard_table([3, 4, 5]), [])
    assert not (tmp_path / job_id / part_name(1)).exists()
    assert (tmp_path / other / part_name(0)).exists()


def test_api_output_prefixes_rule():
    """Over HTTP only s3:// locations under an allowed prefix pass, compared part by part."""
    allowed = ["s3://mlf-data/results", "s3://other"]
    assert output_uri_allowed("s3://mlf-data/results", allowed) == "s3://mlf-data/results"
    assert output_uri_allowed("s3://mlf-data/results/team/", allowed) == "s3://mlf-data/results/team"
    assert output_uri_allowed("s3://other/anything", allowed) == "s3://other/anything"
    refused = {"s3://mlf-data/results-x": "not under a prefix", "s3://mlf-data/other": "not under a prefix",
               "/tmp/out": "only s3://", "file:///tmp/out": "only s3://", "s3://mlf-data/results/../x": "is not an"}
    for uri, why in refused.items():
        with pytest.raises(JobOptionError, match=why):
            output_uri_allowed(uri, allowed)
    with pytest.raises(JobOptionError, match="does not accept output_uri"):
        output_uri_allowed("s3://mlf-data/results", [])


def test_output_uri_counts_in_the_idempotency_hash_only_when_set():
    """A request without output_uri hashes as before the option existed; one with it differs."""
    plain = JobOptions.of("m").request()
    assert "output_uri" not in plain
    assert JobOptions.of("m", output_uri="s3://b-1/x").request()["output_uri"] == "s3://b-1/x"


def test_settings_check_api_output_prefixes(tmp_path):
    """api_output_prefixes takes comma-separated s3:// prefixes and refuses anything else, naming the key."""
    from ml_framework.errors import SettingsError
    from ml_framework.settings import load_settings

    settings = load_settings(var_dir=tmp_path, api_output_prefixes="s3://mlf-data/a/, s3://b-2")
    assert settings.api_output_prefixes == ["s3://mlf-data/a", "s3://b-2"]
    with pytest.raises(SettingsError, match="api_output_prefixes"):
        load_settings(var_dir=tmp_path, api_output_prefixes="/srv/out")


def test_path_of_written_part(tmp_path):
    """The part file lies at <output_uri>/<job_id>/part-<index>.parquet."""
    prefix = OutputFiles().open(str(tmp_path))
    prefix.write("abc", 12, shard_table([1]))
    assert Path(prefix.part_path("abc", 12)) == tmp_path / "abc" / "part-000012.parquet"
