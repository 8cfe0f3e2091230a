"""What `mlf` prints: user data as plain text (never Rich markup or emoji codes), the broker
and results store it uses (passwords masked), a clear error when the broker cannot be
reached (and no job left behind), and one warning, not two, when no worker will take a job."""

from __future__ import annotations

import os
import shutil
import socket
from datetime import UTC, datetime

import pandas as pd
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from ml_framework.endpoints import broker_label, workers_warning
from ml_framework.errors import BrokerUnavailableError
from ml_framework.settings import Settings, get_settings, load_settings
from ml_framework.store import ResultStore, WorkerInfo
from producer import cli as cli_module
from producer.cli import app
from producer.client import Client
from worker.export import export_sklearn

COLUMNS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A repository with ``iris`` (four float columns a, b, c, d -> three classes)."""
    root = tmp_path_factory.mktemp("models")
    x, y = load_iris(return_X_y=True)
    export_sklearn(LogisticRegression(max_iter=500).fit(x, y), root, "iris", inputs={"columns": COLUMNS})
    return root


@pytest.fixture
def mlf(monkeypatch, tmp_path, model_dir):
    """Run ``mlf ARGS`` in this process, in ``tmp_path``, with only ``extra_env`` set;
    returns Click's result (``stdout``, ``stderr``, ``exit_code``)."""
    for name in list(os.environ):
        if name.startswith("ML_FRAMEWORK_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ML_FRAMEWORK_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("ML_FRAMEWORK_MODELS_DIR", str(model_dir))
    cli_module.load_plugins()

    def run(*args: str, **extra_env: str):
        for key, value in extra_env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        return CliRunner().invoke(app, list(args))

    yield run
    get_settings.cache_clear()


def iris_frame(columns=COLUMNS) -> pd.DataFrame:
    return pd.DataFrame(load_iris().data, columns=columns)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dataset_error_shows_column_names_as_typed(mlf, tmp_path):
    """Columns named like markup (`a[/]`, `[bold]c`) or an emoji code (`:thumbs_up:`)
    appear in the error verbatim: no MarkupError, no styling, no emoji."""
    iris_frame(["a[/]", ":thumbs_up:", "[bold]c", "d"]).to_csv(tmp_path / "odd.csv", index=False)
    run = mlf("score", "odd.csv", "--model", "iris")
    assert run.exit_code == 1, run.output
    assert "missing column(s)" in run.stderr
    for name in ("a[/]", ":thumbs_up:", "[bold]c"):
        assert f"'{name}'" in run.stderr, run.stderr
    assert "MarkupError" not in run.stderr


def test_job_status_shows_a_dataset_path_as_typed(mlf, tmp_path):
    """A dataset whose path holds `[/]` and `[bold]` (directory `x[`, file `]y [bold]z.csv`)
    is named as it is in `mlf status`; Rich markup would crash on `[/]`."""
    (tmp_path / "x[").mkdir()
    path = tmp_path / "x[" / "]y [bold]z.csv"
    iris_frame().to_csv(path, index=False)
    submitted = mlf("score", str(path), "--model", "iris")
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    run = mlf("status", job_id)
    assert run.exit_code == 0, run.output
    assert f"dataset  {path}" in run.stdout


def test_tables_show_worker_and_model_names_as_typed(mlf, tmp_path):
    """`mlf workers` prints a worker's name and models as recorded, `[bold]` and `[/]` included."""
    store = ResultStore(load_settings(var_dir=tmp_path / "var").effective_database_url)
    try:
        store.heartbeat(WorkerInfo(hostname="cpu0@[bold]box", pid=7, started_at=datetime.now(UTC),
                                   models=["odd[/]name/1"]))
    finally:
        store.close()
    run = mlf("workers")
    assert run.exit_code == 0, run.output
    assert "cpu0@[bold]box" in run.stdout and "odd[/]name/1" in run.stdout


def test_workers_shows_a_host_clock_off_the_databases(mlf, tmp_path, monkeypatch):
    """`mlf workers` lists a worker whose host clock runs 120 s behind as seen just now
    (ages are by the database's clock) and names its skew; a worker within 5 s shows none."""
    import json
    import time

    store = ResultStore(load_settings(var_dir=tmp_path / "var").effective_database_url)
    try:
        store.heartbeat(WorkerInfo(hostname="cpu0@fine", pid=8, started_at=datetime.now(UTC)))
        real_time = time.time
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda: real_time() - 120.0)
            store.heartbeat(WorkerInfo(hostname="cpu0@behind", pid=7, started_at=datetime.now(UTC)))
    finally:
        store.close()
    run = mlf("workers", "--json")
    assert run.exit_code == 0, run.output
    got = {w["hostname"]: w for w in map(json.loads, run.stdout.splitlines())}
    assert set(got) == {"cpu0@fine", "cpu0@behind"}
    assert abs(got["cpu0@behind"]["clock_skew_s"] + 120.0) < 5.0 and got["cpu0@behind"]["age_s"] < 30.0
    run = mlf("workers", COLUMNS="250")
    assert run.exit_code == 0, run.output
    lines = {line.split()[1]: line for line in run.stdout.splitlines() if "cpu0@" in line}
    assert "(clock -120 s)" in lines["cpu0@behind"] and "clock" not in lines["cpu0@fine"]


def test_score_names_broker_and_store_and_warns_once_without_workers(mlf, tmp_path, monkeypatch, caplog):
    """`mlf score --wait` says which broker and store it uses, then warns once (not also in
    the log) that no worker has a heartbeat, however long it waits."""
    from producer import job as job_module

    monkeypatch.setattr(job_module, "NO_WORKER_WARNING_S", 0.0)  # the wait's own check comes at once
    iris_frame().to_csv(tmp_path / "iris.csv", index=False)
    run = mlf("score", "iris.csv", "--model", "iris", "--wait", "--timeout", "1")
    assert run.exit_code == 6, run.output
    broker = (tmp_path / "var" / "broker.sqlite").resolve()
    store = (tmp_path / "var" / "results.sqlite").resolve()
    assert f"broker: embedded SQLite ({broker}); results store: sqlite:///{store}" in run.stderr
    said = run.output + caplog.text
    assert said.count("no worker heartbeat") == 1 and said.count("heartbeat") == 1, said


def test_unreachable_broker_is_named_masked_and_leaves_no_job(mlf, tmp_path):
    """A broker nobody listens on: the error names it, password masked, and says nothing
    was recorded; the results store holds no job afterwards."""
    iris_frame().to_csv(tmp_path / "iris.csv", index=False)
    url = f"redis://:s3cret-pw@127.0.0.1:{unused_port()}/0"
    run = mlf("score", "iris.csv", "--model", "iris", ML_FRAMEWORK_BROKER_URL=url)
    assert run.exit_code == 1, run.output
    masked = url.replace("s3cret-pw", "**********")
    assert f"broker: {masked}; results store: sqlite:///" in run.stderr
    assert f"error: cannot reach the broker at {masked}: " in run.stderr
    assert "Nothing was recorded or sent." in run.stderr
    assert "s3cret-pw" not in run.output
    store = ResultStore(load_settings(var_dir=tmp_path / "var").effective_database_url)
    try:
        assert not any(store.job_counts().values())
    finally:
        store.close()


def test_python_client_raises_broker_unavailable_and_records_nothing(tmp_path, model_dir):
    """The Python client raises BrokerUnavailableError (no job id: nothing was recorded)."""
    settings = load_settings(var_dir=tmp_path / "var", models_dir=model_dir,
                             broker_url=f"redis://:s3cret-pw@127.0.0.1:{unused_port()}/0")
    with Client(settings) as client:
        with pytest.raises(BrokerUnavailableError) as caught:
            client.score_rows(iris_frame().head(5), "iris")
        assert caught.value.job_id is None
        assert "cannot reach the broker at redis://:**********@127.0.0.1:" in str(caught.value)
        assert "s3cret-pw" not in str(caught.value)
        assert not any(client.store.job_counts().values())


def test_online_request_with_the_broker_down_names_its_cancelled_job(tmp_path, model_dir):
    """An online request is recorded before it is sent (requests are batched): with the
    broker down, the error names the broker and the request's job, which is CANCELLED."""
    from ml_framework.store import JobState

    settings = load_settings(var_dir=tmp_path / "var", models_dir=model_dir,
                             broker_url=f"redis://:s3cret-pw@127.0.0.1:{unused_port()}/0")
    with Client(settings) as client:
        with pytest.raises(BrokerUnavailableError) as caught:
            client.predict("iris", iris_frame().head(2), timeout_s=30)
        job_id = caught.value.job_id
        assert "cannot reach the broker at redis://:**********@127.0.0.1:" in str(caught.value)
        assert f"Online request {job_id} was cancelled." in str(caught.value)
        assert client.store.job(job_id).state is JobState.CANCELLED

def test_http_api_answers_503_naming_no_secret_when_the_broker_is_down(tmp_path, model_dir):
    """POST /v1/jobs with the broker down: 503 and a message that names neither the
    broker's host nor its password."""
    from fastapi.testclient import TestClient

    from producer.api import create_app

    key = "unit-admin-key-0123456789abcdef"
    (tmp_path / "data").mkdir()
    iris_frame().to_csv(tmp_path / "data" / "iris.csv", index=False)
    settings = load_settings(var_dir=tmp_path / "var", models_dir=model_dir, data_dir=tmp_path / "data",
                             broker_url=f"redis://:s3cret-pw@127.0.0.1:{unused_port()}/0",
                             api_keys={"tests": key}, api_key_roles={"tests": "admin"})
    with TestClient(create_app(settings), headers={"X-API-Key": key}) as http:
        r = http.post("/v1/jobs", json={"model": "iris", "dataset": "iris.csv"})
    assert r.status_code == 503, r.text
    assert "broker is unreachable" in r.text
    assert "s3cret" not in r.text and "127.0.0.1" not in r.text


def beat_on_another_broker(tmp_path) -> Settings:
    """Record a live worker ``cpu0@elsewhere`` whose heartbeat names another broker, in the
    store the CLI under test uses (``var_dir`` under ``tmp_path``); return those settings."""
    settings = load_settings(var_dir=tmp_path / "var")
    store = ResultStore(settings.effective_database_url)
    try:
        store.heartbeat(WorkerInfo(hostname="cpu0@elsewhere", pid=7, started_at=datetime.now(UTC),
                                   broker="redis://:**********@redis:6379/0"))
    finally:
        store.close()
    return settings


def test_score_warns_when_live_workers_listen_on_another_broker(mlf, tmp_path):
    """A live worker whose heartbeat names another broker: `mlf score` (embedded broker
    here) says where the workers listen and where the job went."""
    settings = beat_on_another_broker(tmp_path)
    iris_frame().to_csv(tmp_path / "iris.csv", index=False)
    run = mlf("score", "iris.csv", "--model", "iris")
    assert run.exit_code == 0, run.output
    assert ("warning: 1 live worker process(es) listen on redis://:**********@redis:6379/0, but this job went "
            f"to {broker_label(settings)}") in run.stderr


def test_workers_warning_only_when_no_live_worker_shares_the_broker(tmp_path):
    """No live worker: warned. One on our broker: silent. Only heartbeats without a broker
    (older workers): silent, since nothing is known. Only other brokers: named."""
    settings = load_settings(var_dir=tmp_path / "var")

    def beat(broker):
        return WorkerInfo(hostname="cpu0@h", pid=1, started_at=datetime.now(UTC), broker=broker)

    assert "no worker heartbeat" in workers_warning(settings, [])
    assert workers_warning(settings, [beat(broker_label(settings)), beat("redis://other:6379/0")]) is None
    assert workers_warning(settings, [beat(None)]) is None
    assert "listen on redis://other:6379/0, but" in workers_warning(settings, [beat("redis://other:6379/0")])


def test_heartbeat_records_the_broker_masked(tmp_path):
    """A worker process's heartbeat names its broker, password masked, and the store keeps it."""
    from worker.process import Heartbeat, WorkerContext

    settings = load_settings(var_dir=tmp_path / "var", broker_url="redis://:s3cret-pw@broker.example:6379/2")
    info = Heartbeat(WorkerContext(settings, "cpu0@h")).info
    assert info.broker == "redis://:**********@broker.example:6379/2"
    store = ResultStore(settings.effective_database_url)
    try:
        store.heartbeat(info)
        assert [w.broker for w in store.workers()] == ["redis://:**********@broker.example:6379/2"]
    finally:
        store.close()


def test_queues_says_an_unreachable_broker_once_naming_it_masked(mlf, tmp_path):
    """`mlf queues` with the broker down: one error line, naming the broker with its
    password masked and without the exception's class name; no table row repeating it."""
    url = f"redis://:s3cret-pw@127.0.0.1:{unused_port()}/3"
    run = mlf("queues", ML_FRAMEWORK_BROKER_URL=url)
    assert run.exit_code == 1, run.output
    masked = url.replace("s3cret-pw", "**********")
    assert f"error: cannot reach the broker at {masked}: " in run.stderr
    assert run.output.count("cannot reach the broker") == 1, run.output
    assert run.output.count("onnection refused") == 1, run.output
    assert "OperationalError" not in run.output and "broker unreachable" not in run.output
    assert "s3cret-pw" not in run.output


def test_worker_starts_no_process_when_the_broker_is_unreachable(mlf, monkeypatch):
    """`mlf worker` with the broker down: one `error: cannot reach the broker at <masked>`
    line, exit 1, and no worker process started (rather than Celery's minutes of retries)."""
    from worker import launcher

    started = []
    monkeypatch.setattr(launcher, "Supervisor", lambda *a, **k: started.append(k) or pytest.fail("a process starts"))
    url = f"redis://:s3cret-pw@127.0.0.1:{unused_port()}/3"
    run = mlf("worker", "--processes", "1", ML_FRAMEWORK_BROKER_URL=url)
    assert run.exit_code == 1, run.output
    masked = url.replace("s3cret-pw", "**********")
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot reach the broker at {masked}: "), run.stderr
    assert "No worker process was started." in errors[0]
    assert not started and "starting" not in run.stderr and "s3cret-pw" not in run.output


def test_worker_on_the_embedded_broker_needs_no_server_check(mlf, monkeypatch):
    """The embedded SQLite broker is not checked: `mlf worker` goes on to start its processes."""
    from worker import launcher

    class Started(Exception):
        pass

    class FakeSupervisor:
        def __init__(self, children, **_kwargs):
            self.children = children

        def run(self):
            raise Started(len(self.children))

    monkeypatch.setattr(launcher, "Supervisor", FakeSupervisor)
    run = mlf("worker", "--processes", "1")
    assert isinstance(run.exception, Started), run.output
    assert "starting 1 worker process(es)" in run.stderr and "broker: embedded SQLite (" in run.stderr


def test_other_launchers_note_counts_only_workers_on_this_broker(tmp_path, capsys):
    """Another launcher's processes on this host count only if they beat on this broker
    (or name none, as older workers do): those on another broker take none of its work."""
    from worker.cli import note_other_launchers
    from worker.launcher import ChildSpec

    settings = load_settings(var_dir=tmp_path / "var", broker_url="redis://:s3cret-pw@127.0.0.1:6390/3")
    host = os.uname().nodename
    store = ResultStore(settings.effective_database_url)
    try:
        for name, broker in [("cpu0-1", "redis://127.0.0.1:6379/0"), ("cpu1-1", "redis://127.0.0.1:6379/0"),
                             ("cpu0-2", broker_label(settings))]:
            store.heartbeat(WorkerInfo(hostname=f"{name}@{host}", pid=1, started_at=datetime.now(UTC), broker=broker))
    finally:
        store.close()
    note_other_launchers(settings, [ChildSpec(name=f"cpu0-9@{host}", argv=[], env={})])
    said = capsys.readouterr().err
    assert f"note: 1 worker process(es) of another `mlf worker` already run on this host with this broker " \
           f"(cpu0-2@{host})" in said, said


def test_workers_warns_once_when_the_live_workers_listen_on_another_broker(mlf, tmp_path):
    """`mlf workers` lists live workers of another broker than its own with one warning
    naming both brokers; none when a live worker shares its broker."""
    settings = beat_on_another_broker(tmp_path)
    for args in [("workers",), ("workers", "--json"), ("workers", "--all")]:
        run = mlf(*args)
        assert run.exit_code == 0, run.output
        assert run.stderr.count("warning: ") == 1, run.stderr
        assert ("warning: 1 live worker process(es) listen on redis://:**********@redis:6379/0, but this job went "
                f"to {broker_label(settings)}") in run.stderr
    store = ResultStore(settings.effective_database_url)
    try:
        store.heartbeat(WorkerInfo(hostname="cpu0@here", pid=8, started_at=datetime.now(UTC),
                                   broker=broker_label(settings)))
    finally:
        store.close()
    run = mlf("workers")
    assert run.exit_code == 0 and "warning" not in run.stderr, run.output


def test_launcher_says_bindings_cleanup_failed_in_the_broker_not_the_store(tmp_path, caplog):
    """A broker error while removing dead workers' bindings is logged as the broker's, not
    as a results-store failure."""
    import logging
    import threading

    import redis

    from worker.launcher import Supervisor

    def refused(_store):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")

    supervisor = Supervisor([], store_url=load_settings(var_dir=tmp_path / "var").effective_database_url)
    done = threading.Event()
    with caplog.at_level(logging.WARNING, logger="worker.launcher"):
        supervisor._with_store(refused, "remove the broker bindings of dead workers from the broker")
        supervisor._background.put(done.set)
        assert done.wait(30)
    assert ("could not remove the broker bindings of dead workers from the broker: Error 111 connecting to "
            "127.0.0.1:6390. Connection refused.") in caplog.text
    assert "results store" not in caplog.text


def test_mlf_models_says_what_image_and_text_models_take(mlf, tmp_path, model_dir):
    """An image model was listed as taking `1 cols -> [1] float32` (its one path column):
    it takes images of its prepared size, and text models take tokens."""
    from ml_framework.manifest import ModelManifest

    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    for name, inputs, extra in (
            ("photos", {"kind": "image", "columns": ["path"]}, {"preprocessing": {"resize": 256, "crop": 224}}),
            ("gray", {"kind": "image", "columns": ["path"]},
             {"preprocessing": {"resize": [32, 48], "layout": "NHWC", "color": "L"}}),
            ("reviews", {"kind": "text", "columns": ["review"]}, {"tokenizer": {"max_length": 128}})):
        (models / name / "1").mkdir(parents=True)
        ModelManifest.model_validate({"name": name, "version": 1, "framework": "torch", "artifact": "model.pt2",
                                      "inputs": inputs, "outputs": {"kind": "embedding"}, **extra}
                                     ).write(models / name / "1")
    run = mlf("models", ML_FRAMEWORK_MODELS_DIR=str(models))
    assert run.exit_code == 0, run.output
    rows = {line.split()[1]: line for line in run.stdout.splitlines() if line.startswith("│")}
    assert "images 224x224 (HxW) RGB -> [3, 224, 224] float32" in rows["photos"], run.stdout
    assert "images 32x48 (HxW) L -> [32, 48, 1] float32" in rows["gray"], run.stdout
    assert "text (128 tokens at most) -> [128] int64" in rows["reviews"], run.stdout
    assert "4 cols -> [4] float32" in rows["iris"], run.stdout
    assert "1 cols" not in run.stdout
