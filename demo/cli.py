"""``mlf demo``: train three digits models, score them through the queue, print accuracy."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)  # paths as they are


def model_load(status) -> str:
    """The demo table's ``model load`` cell of a job's status: the cold load a shard waited
    for (seconds), ``warm`` when rows were scored by a worker that had the model loaded
    already, ``-`` when no row was scored ok (a model that failed to load records no time)."""
    if status.model_load_s is not None:
        return f"{status.model_load_s:.1f} s"
    return "warm" if status.rows_ok else "-"


def _start_workers(processes: int | None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "worker"] + (["--processes", str(processes)] if processes else [])
    return subprocess.Popen(argv)


def demo(
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs of the two CNNs.")] = 30,
    processes: Annotated[int | None, typer.Option(min=1, help="Worker processes to start if none is running.")] = None,
    timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for each job.")] = 900.0,
) -> None:
    """Train sklearn, PyTorch and Keras models on the digits dataset, score it through the
    queue with each, and print per-model accuracy and throughput."""
    from demo.digits import FRAMEWORKS, load_data, train_and_export
    from ml_framework.endpoints import where_line
    from ml_framework.errors import MLFrameworkError
    from ml_framework.settings import get_settings
    from producer.cli_console import fail
    from producer.client import Client
    from producer.durations import job_rows_per_s
    from worker.launcher import terminate

    settings = get_settings()
    with Client(settings) as client:
        workers = None
        live = client.store.live_workers()
        if live:
            console.print(where_line(settings))
            console.print(f"using running workers: {', '.join(live)}")
        else:  # `mlf worker` names the broker and results store itself: said once
            console.print("no worker running: starting workers for the demo (`mlf worker`)")
            workers = _start_workers(processes)
        try:
            data = load_data()
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            dataset = settings.data_dir / "digits.csv"
            data.frame.to_csv(dataset, index=False)
            console.print(f"dataset: {dataset} ({len(data.frame)} rows, 64 pixel columns, "
                          f"{(data.frame['split'] == 'test').sum()} held-out test rows)")
            manifests = {}
            for framework in FRAMEWORKS:
                t0 = time.perf_counter()
                console.print(f"training {framework} model ...")
                manifests[framework] = train_and_export(framework, data, settings.models_dir, epochs)
                m = manifests[framework]
                console.print(f"  exported {m.name}/{m.version} to {settings.models_dir / m.name / str(m.version)} "
                              f"in {time.perf_counter() - t0:.1f} s")
            jobs = {fw: client.score_dataset(dataset, m.name, version=m.version) for fw, m in manifests.items()}
            for fw, job in jobs.items():
                console.print(f"submitted job {job.id} ({manifests[fw].name})")
            report = Table("model", "framework", "state", "accuracy (test)", "accuracy (all)",
                           "rows", "rows/s", "model load", "job id", title="digits: scored through the queue")
            out_dir = settings.var_dir / "demo"
            out_dir.mkdir(parents=True, exist_ok=True)
            for fw, job in jobs.items():
                status = job.wait(timeout_s=timeout, progress=True)
                frame = job.results().join(data.frame[["label", "split"]])
                correct = frame["prediction"] == frame["label"]
                test = frame["split"] == "test"
                rate = job_rows_per_s(status)
                report.add_row(manifests[fw].name, fw, status.state.value, f"{correct[test].mean():.3f}",
                               f"{correct.mean():.3f}", str(status.rows_done), "-" if rate is None else f"{rate:,.0f}",
                               model_load(status), job.id)
                job.save_results(out_dir / f"{manifests[fw].name}.csv")
        except MLFrameworkError as exc:
            raise fail(str(exc)) from None
        finally:
            if workers is not None:
                console.print("stopping the demo's workers ...")
                terminate(workers, grace_s=90)
    Console(width=max(Console().width, 170), markup=False, emoji=False).print(report)
    console.print(f"results: {out_dir}/<model>.csv, and in the results store "
                  "(`mlf jobs list`, `mlf status JOB`, `mlf results JOB -o out.parquet`)")
    console.print("rows/s: rows / (first shard start -> last result), including the model's load when a worker "
                  "loaded it for this job (model load; warm: already loaded), so rates of cold and warm models differ")


def register(app: typer.Typer, _models_app: typer.Typer) -> None:
    """Plug ``mlf demo`` into ``mlf``."""
    app.command(name="demo")(demo)
