"""ml_framework.logging: the production format, JSON lines, the task context, rotation,
and Celery's records passing through our handlers once."""

from __future__ import annotations

import json
import logging

import pytest

from ml_framework.logging import LOG_FILE, configure_logging, task_context
from ml_framework.settings import load_settings


@pytest.fixture(autouse=True)
def restore_logging():
    """configure_logging changes the process's root logger: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def read_lines(path) -> list[str]:
    for handler in logging.getLogger().handlers:
        handler.flush()
    return path.read_text().splitlines()


def test_text_records_use_the_guide_format_and_name_the_task(tmp_path):
    configure_logging("INFO", load_settings(var_dir=tmp_path))
    log = logging.getLogger("worker.tasks")
    log.info("outside")
    with task_context(job_id="j1", shard=3, model="digits/1", device="gpu0"):
        log.info("scored %d rows", 5)
    logging.getLogger("worker.tasks").debug("not at INFO")
    first, second = read_lines(tmp_path / "logs" / LOG_FILE)
    assert first.endswith(" - worker.tasks - INFO - outside")
    assert second.endswith(" - worker.tasks - INFO - scored 5 rows [job=j1 shard=3 model=digits/1 device=gpu0]")
    assert first[4] == "-" and first[10] == " "  # %(asctime)s: 2026-11-29 12:00:00,123


def test_json_lines_carry_the_context_as_keys(tmp_path):
    configure_logging("DEBUG", load_settings(var_dir=tmp_path, log_format="json"))
    with task_context(job_id="j2", shard=0):
        with task_context(model="m/2"):
            logging.getLogger("producer.client").debug("nested")
        logging.getLogger("producer.client").warning("outer")
    nested, outer = (json.loads(line) for line in read_lines(tmp_path / "logs" / LOG_FILE))
    assert (nested["message"], nested["level"], nested["job_id"], nested["shard"], nested["model"]) == (
        "nested", "DEBUG", "j2", 0, "m/2")
    assert (outer["message"], outer["model"], outer["device"]) == ("outer", None, None)
    assert nested["name"] == "producer.client" and "time" in nested


def test_celery_records_are_written_once_and_not_swallowed(tmp_path):
    """Celery's loggers propagate to our handlers: a warning appears exactly once, its
    INFO chatter (a line per task) is left out, and a second set-up adds no handler."""
    settings = load_settings(var_dir=tmp_path)
    configure_logging("INFO", settings)
    configure_logging("INFO", settings)
    logging.getLogger("celery.worker.consumer").warning("lost connection to broker")
    logging.getLogger("celery.app.trace").info("Task mlf.score_shard succeeded")
    logging.getLogger("worker.launcher").info("started worker cpu0")
    lines = read_lines(tmp_path / "logs" / LOG_FILE)
    assert [ln.split(" - ", 1)[1] for ln in lines] == [
        "celery.worker.consumer - WARNING - lost connection to broker", "worker.launcher - INFO - started worker cpu0"]


def test_the_file_rotates_at_the_size_set(tmp_path):
    configure_logging("INFO", load_settings(var_dir=tmp_path, log_max_bytes=2000, log_backup_count=2))
    log = logging.getLogger("ml_framework.test")
    for i in range(200):
        log.info("record %03d %s", i, "x" * 40)
    for handler in logging.getLogger().handlers:
        handler.flush()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir() if not p.name.startswith("."))
    assert files == [LOG_FILE, f"{LOG_FILE}.1", f"{LOG_FILE}.2"]  # two backups kept, no more
    record = len(read_lines(tmp_path / "logs" / LOG_FILE)[-1]) + 1
    for name in files[1:]:  # a full file holds 2,000 bytes, give or take the record that crossed the line
        assert 2000 - record <= (tmp_path / "logs" / name).stat().st_size <= 2000 + record
    assert (tmp_path / "logs" / LOG_FILE).stat().st_size <= 2000 + record
    newest = read_lines(tmp_path / "logs" / LOG_FILE)
    assert newest[-1].endswith("record 199 " + "x" * 40)


def test_an_unwritable_log_directory_leaves_stdout_logging(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    configure_logging("INFO", load_settings(var_dir=tmp_path, log_dir=blocker / "logs"))
    logging.getLogger("ml_framework.test").info("still here")
    out = capsys.readouterr().out
    assert "cannot write the log file" in out and "still here" in out


IMPORT_THEN_SET_UP = """
import logging, sys
from pathlib import Path
log_file = Path(sys.argv[1])
before = list(logging.getLogger().handlers)
import worker.app  # what a test or a tool does
print("handlers added by the import:", len(logging.getLogger().handlers) - len(before))
print("log file after the import:", log_file.exists())
from celery.signals import setup_logging
setup_logging.send(sender=None, loglevel="INFO", logfile=None, format="", colorize=False)  # a worker starting
logging.getLogger("worker.test").info("set up by the worker's start")
for handler in logging.getLogger().handlers:
    handler.flush()
print("logged after set-up:", "set up by the worker's start" in log_file.read_text())
"""


def test_importing_the_worker_app_configures_no_logging(tmp_path):
    """Importing ``worker.app`` adds no handler and creates no log file (it did: ``make
    test`` wrote thousands of lines into the checkout's var/logs); the worker process
    configures its logging when Celery sets it up (the ``setup_logging`` signal)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env["ML_FRAMEWORK_VAR_DIR"] = str(tmp_path / "var")
    log_file = tmp_path / "var" / "logs" / LOG_FILE
    run = subprocess.run([sys.executable, "-c", IMPORT_THEN_SET_UP, str(log_file)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    said = [line for line in run.stdout.splitlines() if not line[:1].isdigit()]  # not the record on stdout
    assert said == ["handlers added by the import: 0", "log file after the import: False",
                    "logged after set-up: True"], run.stdout
