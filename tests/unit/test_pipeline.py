"""The worker's data path on real files: the prefetch thread, row-group streams kept between
shards, batches kept queued on the device across pieces, and wide column inputs."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ml_framework.datasets import iter_pieces, read_rows
from ml_framework.datasets import parquet as parquet_reader
from ml_framework.errors import DatasetFormatError
from ml_framework.manifest import InputSpec, ModelManifest, OutputSpec
from tests.conversion import to_inputs
from worker.inputs import Converted
from worker.pipeline import Prefetcher, ShardSource
from worker.runtimes.base import Runtime

ROWS = 1000


@pytest.fixture()
def numbers(tmp_path):
    """A Parquet file of ``ROWS`` rows: ``a`` = row number, ``b`` = 2 x row, one big row group."""
    path = tmp_path / "n.parquet"
    a = np.arange(ROWS, dtype=np.float64)
    pq.write_table(pa.table({"a": a, "b": 2 * a}), path, row_group_size=ROWS)
    return path


def convert(table: pa.Table, row_start: int) -> Converted:
    """A stand-in converter: the column ``a`` as the input, rows numbered from ``row_start``."""
    x = table.column("a").to_numpy()
    return Converted(x, np.arange(row_start, row_start + len(x)), [], len(x))


def source(path, a: int, b: int) -> ShardSource:
    return ShardSource(a, b, ("a",), path, "parquet", key="m/1")


def test_pieces_cover_the_shard_in_order_and_the_guessed_next_shard_is_read_ahead(numbers):
    """Every row of a shard arrives once, in order, in pieces; a right guess of the next
    shard hands its first piece over without reading it again (a hit), a wrong one is
    dropped (a miss) and that shard still reads right."""
    prefetcher = Prefetcher()
    seen = []
    for a, b in ((0, 300), (300, 600), (700, 1000)):
        guess = source(numbers, b, b + 300)
        for piece in prefetcher.pieces(source(numbers, a, b), convert, 128, guess=guess):
            seen.extend(piece.x.tolist())
            assert piece.rows.tolist() == piece.x.astype(int).tolist()
        assert prefetcher.wait_idle(10)  # the guess lands in the background
    assert seen == list(range(600)) + list(range(700, 1000))
    assert (prefetcher.hits, prefetcher.misses) == (1, 1)


def test_a_guessed_first_piece_longer_than_the_shard_is_cut_to_it(numbers):
    """The last shard of a file is often shorter than a piece: the prefetched piece is cut."""
    prefetcher = Prefetcher()
    list(prefetcher.pieces(source(numbers, 0, 100), convert, 128, guess=source(numbers, 100, 200)))
    assert prefetcher.wait_idle(10)
    pieces = list(prefetcher.pieces(source(numbers, 100, 150), convert, 128))
    assert prefetcher.hits == 1 and [p.x.tolist() for p in pieces] == [list(np.arange(100.0, 150.0))]
    assert sum(p.n_rows for p in pieces) == 50


def test_a_read_error_reaches_the_consumer_at_its_piece(tmp_path):
    """A file that cannot be read raises in the consumer, naming the file; the prefetch
    thread stays alive for the next shard."""
    bad = tmp_path / "gone.parquet"
    prefetcher = Prefetcher()
    with pytest.raises(DatasetFormatError, match="gone.parquet"):
        list(prefetcher.pieces(source(bad, 0, 10), convert, 8))
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"a": np.arange(10.0)}), good)
    assert sum(len(p.x) for p in prefetcher.pieces(source(good, 0, 10), convert, 8)) == 10


def test_a_consumer_that_stops_early_frees_the_thread(numbers):
    """Leaving a shard after its first piece (a failed model) cancels the rest of the
    read: the next shard is served at once."""
    prefetcher = Prefetcher(depth=1)
    pieces = prefetcher.pieces(source(numbers, 0, 1000), convert, 10)
    next(pieces)
    pieces.close()
    done = threading.Event()

    def read_next() -> None:
        list(prefetcher.pieces(source(numbers, 0, 20), convert, 10))
        done.set()

    threading.Thread(target=read_next, daemon=True).start()
    assert done.wait(10)


def test_shards_within_one_big_row_group_decode_it_once_per_process(numbers, monkeypatch):
    """pandas and pyarrow write row groups of up to 1 Mi rows: consecutive shards inside one
    continue the open row-group stream instead of decoding the group from its start
    again; a shard that goes back opens a new stream. Rows are right either way."""
    opened = []
    real_open = parquet_reader._open_stream

    def counting_open(*args, **kwargs):
        opened.append(args[2])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(parquet_reader, "_open_stream", counting_open)
    parquet_reader._STREAMS.clear()
    for a in range(0, ROWS, 100):
        table = read_rows(numbers, "parquet", a, a + 100, ["a", "b"])
        assert table.column("a").to_pylist() == list(range(a, a + 100))
    assert opened == [0]
    assert read_rows(numbers, "parquet", 50, 60, ["b"]).column("b").to_pylist() == list(range(100, 120, 2))
    assert opened == [0, 0]


def test_pieces_of_several_row_groups_and_parts_are_exact(tmp_path):
    """A range crossing row groups and parts comes back exactly, in pieces no longer than asked."""
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):
        a = np.arange(i * 100, (i + 1) * 100, dtype=np.int64)
        pq.write_table(pa.table({"a": a}), parts / f"p{i}.parquet", row_group_size=30)
    pieces = list(iter_pieces(parts, "parquet", 25, 260, ["a"], 40))
    assert all(p.num_rows <= 40 for p in pieces)
    assert [v for p in pieces for v in p.column("a").to_pylist()] == list(range(25, 260))


class Queued(Runtime):
    """A runtime whose device runs one pass behind the host: ``submit`` queues, ``collect``
    computes (as CUDA does with asynchronous launches). It records the order of calls."""

    framework = "test"

    def load(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def predict_batch(self, x):
        self.calls.append(("sync", len(x)))
        if (x < 0).any():
            raise ValueError("negative input")
        return np.stack([x, -x], axis=1)

    def submit(self, x):
        self.calls.append(("submit", len(x)))
        if (x < 0).any():
            raise ValueError("negative input")
        return x.copy()

    def collect(self, handle):
        self.calls.append(("collect", len(handle)))
        return np.stack([handle, -handle], axis=1)


def _manifest() -> ModelManifest:
    return ModelManifest(name="q", version=1, framework="torch", artifact="a", inputs=InputSpec(columns=["a"]),
                         outputs=OutputSpec(kind="regression", size=2))


def test_the_next_batch_is_queued_before_the_last_one_is_collected_across_pieces():
    """Batch k+1 is submitted before batch k is collected, also from one piece to the
    next, and every piece comes back in order with its own outputs."""
    rt = Queued(_manifest(), ".")
    rt.load()
    pieces = [np.arange(5.0), np.arange(10.0, 13.0)]
    out = list(rt.stream(pieces, batch_size=2))
    assert [x.tolist() for x, _ in out] == [p.tolist() for p in pieces]
    for x, run in out:
        assert run.ok.all() and run.outputs[:, 0].tolist() == x.tolist()
    assert rt.calls == [("submit", 2), ("submit", 2), ("collect", 2), ("submit", 1), ("collect", 2),
                        ("submit", 2), ("collect", 1), ("submit", 1), ("collect", 2), ("collect", 1)]


def test_a_batch_failing_at_submit_is_split_without_losing_the_one_in_flight():
    """A failing batch is isolated row by row while the batch before it is still queued;
    both pieces' other rows keep their outputs."""
    rt = Queued(_manifest(), ".")
    rt.load()
    bad = np.array([1.0, -1.0, 2.0, 3.0])
    out = list(rt.stream([np.array([5.0, 6.0]), bad], batch_size=2))
    first, second = out[0][1], out[1][1]
    assert first.ok.all() and first.outputs[:, 0].tolist() == [5.0, 6.0]
    assert second.ok.tolist() == [True, False, True, True] and "negative input" in second.errors[1]
    assert second.outputs[[0, 2, 3], 0].tolist() == [1.0, 2.0, 3.0]


def test_an_empty_piece_between_others_keeps_its_place():
    """A piece whose rows all failed conversion (nothing to run) comes back in order."""
    rt = Queued(_manifest(), ".")
    rt.load()
    pieces = [np.arange(3.0), np.zeros(0), np.arange(2.0)]
    assert [len(x) for x, _ in rt.stream(pieces, batch_size=2)] == [3, 0, 2]


def test_wide_columns_are_copied_into_rows_exactly():
    """Hundreds of columns (image pixels) land in the right place of each row, across the
    blocks they are copied in, with a bad cell still failing only its row."""
    rng = np.random.default_rng(0)
    x = rng.random((37, 600)).astype(np.float32)
    columns = [f"c{j}" for j in range(600)]
    table = pa.Table.from_arrays([pa.array(x[:, j]) for j in range(600)], names=columns)
    table = table.set_column(417, "c417", pa.array([*x[:5, 417], None, *x[6:, 417]], pa.float32()))
    got, rows, errors = to_inputs(table, columns, InputSpec(columns=columns))
    assert [e.row_index for e in errors] == [5] and errors[0].field == "c417"
    np.testing.assert_array_equal(got, np.delete(x, 5, axis=0))
    assert rows.tolist() == [r for r in range(37) if r != 5]
