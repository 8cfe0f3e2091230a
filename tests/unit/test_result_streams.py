"""Results read page by page (``ResultStore.results_pages``) and the streamed answers built
from them (:mod:`producer.api.streams`): bounded pieces that add up to the whole table;
the job event stream's events, keep-alives and end."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from ml_framework.store import ResultStore
from ml_framework.store.outputs import RowError
from producer.api.schemas import JobOut
from producer.api.streams import arrow_stream, job_events, ndjson_stream

SHARD_ROWS = 300
N_SHARDS = 4


@pytest.fixture()
def store(db_url):
    """A store on SQLite here, on PostgreSQL in tests/integration/test_result_streams_postgresql.py,
    which runs these tests again (``db_kind``)."""
    s = ResultStore(db_url)
    yield s
    s.close()


def scored_job(store: ResultStore, mixed: bool = False) -> str:
    """1,200 rows in 4 shards of 300, every 50th row a row error, class probabilities as
    fixed-size lists; ``mixed``: the labels of shard 2 are text, the others integers."""
    ranges = [(i * SHARD_ROWS, (i + 1) * SHARD_ROWS) for i in range(N_SHARDS)]
    job = store.create_job(model="m", model_version=1, dataset="d.csv", n_rows=ranges[-1][1], shard_ranges=ranges,
                           batch_size=100)
    for shard, (lo, hi) in enumerate(ranges):
        ok = [r for r in range(lo, hi) if r % 50]
        label = (lambda r: f"c{r % 3}") if mixed and shard == 2 else (lambda r: r % 3)
        table = pa.table({"row": pa.array(ok, pa.int64()), "prediction": [label(r) for r in ok],
                          "probabilities": pa.array([[0.25, 0.75]] * len(ok), pa.list_(pa.float64(), 2))})
        errors = [RowError(r, f"row {r}: bad", "x") for r in range(lo, hi) if not r % 50]
        assert store.complete_shard(job, shard, table, errors)
    return job


@pytest.mark.parametrize("mixed", [False, True])
def test_pages_are_bounded_and_add_up_to_the_results_table(store, mixed):
    """A result bigger than one page comes in several pages of at most ``page_rows``
    rows, all with the whole table's columns; together they equal ``results_table``
    (labels text in one shard make the column text everywhere, as in the download)."""
    job = scored_job(store, mixed)
    whole = store.results_table(job)
    pages = list(store.results_pages(job, page_rows=500))
    assert [p.num_rows for p in pages] == [500, 500, 200]
    assert all(p.schema == whole.schema for p in pages)
    assert pa.concat_tables(pages).equals(whole)
    assert pa.types.is_string(whole.schema.field("prediction").type) == mixed


def test_pages_of_a_job_half_recorded_and_of_one_with_no_rows_recorded(store):
    """A running job streams the rows recorded so far; one with none recorded yet, one
    page without rows (a valid, empty Arrow stream)."""
    ranges = [(0, 300), (300, 600)]
    job = store.create_job(model="m", model_version=1, dataset="d.csv", n_rows=600, shard_ranges=ranges, batch_size=10)
    empty = list(store.results_pages(job, page_rows=100))
    assert len(empty) == 1 and empty[0].num_rows == 0
    assert pa.ipc.open_stream(b"".join(arrow_stream(empty, job))).read_all().num_rows == 0
    store.complete_shard(job, 1, [(r, {"p": r * 0.5}) for r in range(300, 600)], [])
    pages = list(store.results_pages(job, page_rows=100))
    assert len(pages) == 3 and pa.concat_tables(pages).equals(store.results_table(job))


def test_arrow_and_ndjson_streams_write_each_page_as_it_comes(store):
    """The Arrow IPC stream is one chunk per page plus the end marker and reads back as
    the results table; NDJSON gives one object per row with every column."""
    job = scored_job(store)
    whole = store.results_table(job)
    chunks = list(arrow_stream(store.results_pages(job, page_rows=400), job))
    assert len(chunks) == 4  # 3 pages, then the end-of-stream marker
    assert pa.ipc.open_stream(b"".join(chunks)).read_all().equals(whole)
    lines = b"".join(ndjson_stream(store.results_pages(job, page_rows=400), job)).decode().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows == whole.to_pylist()
    assert rows[50] == {"row": 50, "prediction": None, "probabilities": None, "error": "row 50: bad",
                        "error_field": "x"}


def job_out(state: str, rows_ok: int) -> JobOut:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return JobOut(job_id="j" * 32, model="m", model_version=1, dataset="d.csv", owner=None, state=state, n_rows=10,
                  rows_ok=rows_ok, rows_failed=0, n_shards=2, shards_done=rows_ok // 5, batch_size=5, oom_splits=0,
                  priority=0, model_load_s=None, created_at=now, started_at=None, finished_at=None)


def test_job_events_send_changes_keep_alives_and_end():
    """Progress on the first read and on each change only, a comment once the keep-alive
    interval passes without one, then ``end`` with the final body; the stream stops
    there, and at once when the client has gone."""
    reads = iter([job_out("PENDING", 0), job_out("PENDING", 0), job_out("PENDING", 0), job_out("RUNNING", 5),
                  job_out("SUCCEEDED", 10)])
    ticks = iter([0, 0, 5, 20, 20, 20, 20, 20, 20])

    async def read():
        return next(reads)

    async def connected():
        return False

    async def collect(disconnected):
        return [e async for e in job_events(read, disconnected, poll_s=0, keepalive_s=15, clock=lambda: next(ticks))]

    events = asyncio.run(collect(connected))
    kinds = [e.split("\n")[0] for e in events]
    assert kinds == ["event: progress", ": keep-alive", "event: progress", "event: progress", "event: end"]
    states = [json.loads(e.split("\n")[1].removeprefix("data: "))["state"] for e in events if e.startswith("event")]
    assert states == ["PENDING", "RUNNING", "SUCCEEDED", "SUCCEEDED"]

    async def gone():
        return True

    assert asyncio.run(collect(gone)) == []


def test_ndjson_writes_nan_and_infinity_as_null():
    """The JSON rule holds on the fast path too: a NaN or an infinity is written as null."""
    page = pa.table({"row": pa.array([0, 1], pa.int64()), "score": [float("nan"), 0.5],
                     "v": pa.array([[float("inf"), 1.0], [2.0, 3.0]], pa.list_(pa.float64(), 2))})
    lines = b"".join(ndjson_stream([page], "j")).decode().splitlines()
    assert [json.loads(line) for line in lines] == [{"row": 0, "score": None, "v": [None, 1.0]},
                                                   {"row": 1, "score": 0.5, "v": [2.0, 3.0]}]
