"""Soak: many jobs through one real worker with retention on; the results store's size and the
worker's memory, printed every ``--every`` jobs, must level off.

Each job scores the digits dataset five times over (8,985 rows, one shard), alternating a
scikit-learn and a PyTorch model, through ``python -m worker --processes 1`` on the embedded
default (SQLite broker and results file) or, with ``--database-url`` / ``--broker-url``, on
PostgreSQL / Redis. The launcher prunes every ``--prune-interval-s`` seconds the jobs that
ended over ``--retention`` ago (``none``: the control, which keeps everything).

Usage, from the repository root::

    .venv/bin/python bench/soak.py                      # 200 jobs, retention 10s
    .venv/bin/python bench/soak.py --quick              # 60 jobs of 2,000 rows
    .venv/bin/python bench/soak.py --retention none     # the control: the store grows

Prints one row per ``--every`` jobs: jobs done, store size (SQLite file and WAL, or the
store's PostgreSQL tables), jobs / shard blobs kept, worker RSS (heartbeat), elapsed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    """Run the soak; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rows", type=int, default=8985, help="rows per job (multiples of 1,797 repeat the data)")
    parser.add_argument("--every", type=int, default=20, help="print a row every N jobs")
    parser.add_argument("--retention", default="10s", help="results_retention (e.g. 10s, 1m; none: the control)")
    parser.add_argument("--prune-interval-s", type=float, default=2.0)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--broker-url", default=None)
    parser.add_argument("--quick", action="store_true", help="60 jobs of 2,000 rows")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.rows = 60, 2000

    from demo import digits as d
    from ml_framework.settings import load_settings
    from producer.client import Client

    root = Path(tempfile.mkdtemp(prefix="mlf-soak-"))
    data = d.load_data()
    models_dir, data_dir = root / "models", root / "data"
    data_dir.mkdir()
    d.export_sklearn_model(d.fit_sklearn(data), models_dir)
    d.export_torch_model(d.fit_torch(data, epochs=2), models_dir)
    frame = pd.concat([data.frame] * (args.rows // len(data.frame) + 1), ignore_index=True).iloc[:args.rows]
    frame.to_csv(data_dir / "soak.csv", index=False)
    values = {"models_dir": models_dir, "data_dir": data_dir, "var_dir": root / "var", "worker_metrics_port": 0,
              "results_retention": args.retention, "prune_interval_s": args.prune_interval_s,
              "broker_polling_interval_s": 0.05, "bulk_queue": "mlf.soak.bulk", "online_queue": "mlf.soak.online"}
    if args.database_url:
        values["database_url"] = args.database_url
    if args.broker_url:
        values["broker_url"] = args.broker_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in values.items()})
    log = open(root / "worker.log", "wb")  # noqa: SIM115 - closed at the end
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--processes", "1", "--grace", "20"], env=env,
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    client = Client(load_settings(**values))
    try:
        deadline = time.monotonic() + 180
        while not client.workers():
            if worker.poll() is not None or time.monotonic() > deadline:
                print((root / "worker.log").read_text()[-3000:])
                return 1
            time.sleep(0.5)
        print(f"soak: {args.jobs} jobs of {args.rows} rows, retention {args.retention}, pass every "
              f"{args.prune_interval_s:g} s; store {client.store.engine.url.get_backend_name()}; work dir {root}")
        print(f"{'jobs':>5} {'store MB':>9} {'jobs kept':>9} {'blobs kept':>10} {'worker RSS MiB':>14} {'elapsed s':>9}")
        started = time.monotonic()
        models = ["digits-sklearn", "digits-torch"]
        for i in range(1, args.jobs + 1):
            job = client.score_dataset(data_dir / "soak.csv", models[i % 2])
            status = job.wait(timeout_s=600)
            if status.rows_ok != args.rows:
                print(f"job {job.id}: {status.state.value}, {status.rows_ok} rows ok of {args.rows}")
                return 1
            if i % args.every == 0:
                time.sleep(5.5)  # one more heartbeat: the worker's RSS after this job
                st = client.store.stats()
                rss = sum(w.rss_bytes or 0 for w in client.workers())
                print(f"{i:>5} {st.size_bytes / 1e6:>9.1f} {st.rows['jobs']:>9} {st.rows['shard_outputs']:>10} "
                      f"{rss / 2**20:>14.0f} {time.monotonic() - started:>9.0f}", flush=True)
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
