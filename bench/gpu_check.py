"""GPU check: our worker's inference path against the raw framework loop on one device.

Scores a synthetic image dataset (3 x 32 x 32 float32 pixels, one column per pixel, as
a dataset file would hold them) with

- a ResNet-style torch CNN (CIFAR ResNet-18 layout: 4 stages x 2 basic blocks, 64-512
  channels; He et al. 2016, "Deep Residual Learning for Image Recognition") in fp32 and
  in bf16 (``runtime.precision: bf16``, autocast), and
- a Keras CNN (3 conv blocks + dense head),

through the worker's own code (model repository -> ``ModelRegistry`` load and warm-up ->
``worker.tasks.score_table``: row conversion, batched forward passes with OOM splitting,
result records), and times the framework's raw batched loop over the same in-memory
array, same batch size, same device, in the same process. Prints rows/s for both, their
ratio, where our time goes (convert / forward / records), and NVML readings sampled every
0.2 s during each run (mean utilisation, peak memory, mean power).

Images come as a dataset holds them: one tensor column (``--layout tensor``, default) or
one column per value (``--layout columns``). ``--queue`` also scores a tensor-column
Parquet file through the queue: ``python -m worker`` on the device (one process per GPU,
``--processes-per-device``), the embedded broker, one warm-up job, then the timed job
from ``score_dataset`` to the job finished.

Usage (on a GPU host, from the repository root; under 10 minutes on one H200)::

    .venv/bin/python bench/gpu_check.py --queue      # 20,000 images, batch 512
    .venv/bin/python bench/gpu_check.py --allow-cpu --rows 16 --batch-size 8 --shard-rows 16 --queue  # smoke

Exit status 2 when no GPU is visible and ``--allow-cpu`` is not given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from worker.devices import discover

CHANNELS, SIZE, CLASSES = 3, 32, 10
COLUMNS = [f"p{i}" for i in range(CHANNELS * SIZE * SIZE)]


@dataclass
class NvmlSampler:
    """Samples the first visible GPU every ``period_s`` seconds in a thread."""

    period_s: float = 0.2
    util: list[float] = field(default_factory=list)
    memory: list[int] = field(default_factory=list)
    power: list[float] = field(default_factory=list)

    def __enter__(self) -> NvmlSampler:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            gpus = discover().gpus
            if gpus:
                g = gpus[0]
                if g.utilization_pct is not None:
                    self.util.append(g.utilization_pct)
                self.memory.append(g.memory_used_bytes)
                if g.power_w is not None:
                    self.power.append(g.power_w)
            self._stop.wait(self.period_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.memory:
            return "no NVML readings (no GPU)"
        util = f"{statistics.mean(self.util):.0f}%" if self.util else "n/a"
        power = f"{statistics.mean(self.power):.0f} W" if self.power else "n/a"
        return f"util {util}, peak mem {max(self.memory) / 2**30:.1f} GiB, power {power}"


def resnet18_cifar():
    """ResNet-18 for 32x32 inputs: 3x3 stem, stages of 2 basic blocks, global pool."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    layers = [nn.Conv2d(CHANNELS, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, CLASSES)]
    torch.manual_seed(0)
    return nn.Sequential(*layers).eval()


def keras_cnn():
    """A Keras CNN for (32, 32, 3) inputs: 3 conv blocks of 64/128/256 filters + dense."""
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.Input((SIZE, SIZE, CHANNELS))]
    for filters in (64, 128, 256):
        layers += [keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
                   keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
                   keras.layers.MaxPooling2D(2)]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(CLASSES, activation="softmax")]
    return keras.Sequential(layers)


def synthetic_images(rows: int) -> np.ndarray:
    """``rows`` random images: ``(rows, 3, 32, 32)`` float32 in [0, 1)."""
    return np.random.default_rng(0).random((rows, CHANNELS, SIZE, SIZE), dtype=np.float32)


def image_table(x: np.ndarray, layout: str) -> pa.Table:
    """Images as a dataset holds them: one ``image`` tensor column (``tensor``) or one
    column per value (``columns``)."""
    flat = x.reshape(len(x), -1)
    if layout == "tensor":
        return pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])})
    return pa.Table.from_arrays([pa.array(flat[:, j]) for j in range(flat.shape[1])], names=COLUMNS)


def model_inputs(layout: str, shape: list[int]) -> dict:
    """The manifest's ``inputs`` for a layout."""
    if layout == "tensor":
        return {"kind": "tensor", "columns": ["image"], "shape": shape}
    return {"columns": COLUMNS, "shape": shape}


def raw_torch(model, x: np.ndarray, batch_size: int, precision: str) -> float:
    """The plain PyTorch loop: per batch, host -> device, forward, device -> host. Seconds."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    dtype = {"bf16": torch.bfloat16}.get(precision)
    images = x.reshape(-1, CHANNELS, SIZE, SIZE)

    def loop(n: int) -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for i in range(0, n, batch_size):
                model(torch.from_numpy(images[i:i + batch_size]).to(device)).float().cpu()

    loop(min(len(images), 2 * batch_size))  # warm-up, as our registry does
    started = time.perf_counter()
    loop(len(images))
    return time.perf_counter() - started


def raw_keras(model, images: np.ndarray, batch_size: int) -> float:
    """The plain Keras loop over ``(N, 32, 32, 3)`` images: ``predict_on_batch`` per batch. Seconds."""
    model.predict_on_batch(images[:batch_size])
    started = time.perf_counter()
    for i in range(0, len(images), batch_size):
        model.predict_on_batch(images[i:i + batch_size])
    return time.perf_counter() - started


def ours(registry, name: str, version: int, table: pa.Table, batch_size: int, shard_rows: int) -> tuple[float, dict]:
    """The worker's path over the table in shards of ``shard_rows``: conversion on the
    prefetch thread, batched forward passes kept queued on the device, result decoding.
    Returns seconds and a breakdown (shares of the stages timed one after another on the
    first shard)."""
    from worker.pipeline import Prefetcher, ShardSource
    from worker.scoring import assemble, score_pieces

    runtime = registry.get(name, version)  # loaded and warmed up before timing
    converter = runtime.converter
    columns = list(runtime.manifest.inputs.columns)
    prefetcher = Prefetcher()
    piece_rows = converter.piece_rows(batch_size)
    started = time.perf_counter()
    rows_ok = 0
    for start in range(0, table.num_rows, shard_rows):
        shard = table.slice(start, shard_rows)
        source = ShardSource(start, start + shard.num_rows, tuple(columns), table=shard, key=name)
        pieces = prefetcher.pieces(source, lambda t, row: converter.convert(t, columns, row), piece_rows)
        rows_ok += score_pieces(runtime, pieces, batch_size).outputs.num_rows
    total = time.perf_counter() - started
    assert rows_ok == table.num_rows, f"{table.num_rows - rows_ok} rows failed"
    shard = table.slice(0, shard_rows)
    t0 = time.perf_counter()
    piece = converter.convert(shard, columns, 0)
    t1 = time.perf_counter()
    run = runtime.run(piece.x, batch_size)
    t2 = time.perf_counter()
    assemble(runtime, piece, run)
    t3 = time.perf_counter()
    stages = t3 - t0
    return total, {"convert": (t1 - t0) / stages, "forward": (t2 - t1) / stages, "records": (t3 - t2) / stages}


def through_queue(root: Path, x: np.ndarray, versions: list[int], batch_size: int, shard_rows: int,
                  processes_per_device: int) -> dict[int, float]:
    """Score a tensor-column Parquet file of ``x`` through the embedded broker against
    ``python -m worker`` (one process per GPU, ``processes_per_device`` each; one CPU
    process without a GPU), warm (models preloaded, one warm-up job each). Returns the
    job's seconds, from ``score_dataset`` to the job finished, per model version."""
    import subprocess

    import pyarrow.parquet as pq

    from ml_framework.settings import load_settings
    from producer.client import Client

    data = root / "data"
    data.mkdir()
    pq.write_table(image_table(x, "tensor"), data / "images.parquet", row_group_size=shard_rows)
    pq.write_table(image_table(x[:batch_size], "tensor"), data / "warm.parquet")
    values = {"models_dir": root / "models", "data_dir": data, "var_dir": root / "var", "shard_size": shard_rows,
              "worker_metrics_port": 0, "log_to_file": False, "logging_level": "WARNING"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in values.items()})
    preload = [arg for v in versions for arg in ("--preload", f"resnet-tensor:{v}")]
    gpu = bool(discover().gpus)
    placement = ["--processes-per-device", str(processes_per_device)] if gpu else ["--cpu-processes", "1"]
    log = open(root / "worker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "worker", *placement, *preload, "--grace", "20"],
                            env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    client = Client(load_settings(**values))
    try:
        deadline = time.monotonic() + 600
        while len([w for w in client.workers() if len(w.models) == len(versions)]) < (
                processes_per_device if gpu else 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "worker.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        seconds = {}
        for version in versions:
            for path in (data / "warm.parquet", data / "images.parquet"):
                started = time.perf_counter()
                job = client.score_dataset(path, "resnet-tensor", version=version, batch_size=batch_size)
                status = job.wait(timeout_s=3600)
                if status.state.value != "SUCCEEDED":
                    raise RuntimeError(f"job {job.id} ended {status.state.value}")
                seconds[version] = time.perf_counter() - started
        return seconds
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        log.close()
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--shard-rows", type=int, default=5_000)
    parser.add_argument("--layout", choices=["tensor", "columns"], default="tensor",
                        help="how the in-process path gets the images: one tensor column, or 3,072 columns")
    parser.add_argument("--queue", action="store_true",
                        help="also score through the queue: `python -m worker` and the embedded broker")
    parser.add_argument("--processes-per-device", type=int, default=1)
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU when no GPU is visible (smoke test)")
    parser.add_argument("--skip-keras", action="store_true")
    args = parser.parse_args()

    report = discover()
    if report.gpus:
        g = report.gpus[0]
        print(f"device: {g.name} {g.uuid}, {g.memory_total_bytes / 2**30:.0f} GiB")
    elif not args.allow_cpu:
        print(f"no GPU: {report.reason}. Pass --allow-cpu for a CPU smoke run.", file=sys.stderr)
        return 2
    else:
        print(f"no GPU ({report.reason}): CPU smoke run, numbers are not GPU numbers")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

    from worker.export import export_keras, export_torch
    from worker.registry import ModelRegistry

    x = synthetic_images(args.rows)
    table = image_table(x, args.layout)
    outputs = {"kind": "classification", "labels": list(range(CLASSES)), "activation": "softmax"}
    rows, queue_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models_dir = root / "models"
        cnn = resnet18_cifar()
        shape = [CHANNELS, SIZE, SIZE]
        for name, layout in (("resnet", args.layout), ("resnet-tensor", "tensor")):
            for precision in ("fp32", "bf16"):
                export_torch(cnn, models_dir, name, inputs=model_inputs(layout, shape), outputs=outputs,
                             default_batch_size=args.batch_size, runtime={"precision": precision})
        registry = ModelRegistry(models_dir, warmup_batch_size=args.batch_size)
        raw = {}
        for version, precision in ((1, "fp32"), (2, "bf16")):
            with NvmlSampler() as raw_nvml:
                raw[version] = raw_s = raw_torch(cnn, x, args.batch_size, precision)
            with NvmlSampler() as our_nvml:
                our_s, parts = ours(registry, "resnet", version, table, args.batch_size, args.shard_rows)
            rows.append((f"torch ResNet-18 {precision}", raw_s, our_s, parts, raw_nvml, our_nvml))
        if not args.skip_keras:
            model = keras_cnn()
            hwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
            export_keras(model, models_dir, "kcnn", inputs=model_inputs(args.layout, [SIZE, SIZE, CHANNELS]),
                         outputs={**outputs, "activation": "none"}, default_batch_size=args.batch_size)
            with NvmlSampler() as raw_nvml:
                raw_s = raw_keras(model, hwc, args.batch_size)
            with NvmlSampler() as our_nvml:
                our_s, parts = ours(registry, "kcnn", 1, image_table(hwc, args.layout), args.batch_size,
                                    args.shard_rows)
            rows.append(("keras CNN fp32", raw_s, our_s, parts, raw_nvml, our_nvml))
        registry.close()  # the device is the workers' now
        if args.queue:
            with NvmlSampler() as queue_nvml:
                seconds = through_queue(root, x, [1, 2], args.batch_size, args.shard_rows, args.processes_per_device)
            for version, precision in ((1, "fp32"), (2, "bf16")):
                queue_rows.append((f"torch ResNet-18 {precision}", raw[version], seconds[version], queue_nvml))

    n = args.rows
    print(f"\n{n} images 3x32x32 ({args.layout} layout in process), batch {args.batch_size}, "
          f"shards of {args.shard_rows} rows")
    print(f"{'workload':<24}{'raw rows/s':>12}{'ours rows/s':>13}{'ours/raw':>10}  "
          f"{'convert/forward/records':<26}NVML (raw | ours)")
    for name, raw_s, our_s, parts, raw_nvml, our_nvml in rows:
        split = "/".join(f"{100 * parts[k]:.0f}%" for k in ("convert", "forward", "records"))
        print(f"{name:<24}{n / raw_s:>12.0f}{n / our_s:>13.0f}{raw_s / our_s:>10.2f}  {split:<26}"
              f"{raw_nvml.summary()} | {our_nvml.summary()}")
    if queue_rows:
        print(f"\nthrough the queue (tensor column, `python -m worker`, embedded broker, "
              f"{args.processes_per_device} process(es) per device, job elapsed)")
        for name, raw_s, our_s, nvml in queue_rows:
            print(f"{name:<24}{n / raw_s:>12.0f}{n / our_s:>13.0f}{raw_s / our_s:>10.2f}  NVML {nvml.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
