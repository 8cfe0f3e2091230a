"""Images benchmark: a directory of JPEG files scored by ResNet-18 through the queue, against
a raw ``torch.utils.data.DataLoader`` loop doing the same decoding.

Data: ``--images`` JPEG files of 224x224 pixels (smooth gradients plus noise, quality 90)
written with Pillow into a temporary data directory. Model: ResNet-18 with random weights,
``torchvision.models.resnet18(weights=None)`` when torchvision imports, else the same
architecture built here (:func:`resnet18`; torchvision's PyPI wheels are CUDA builds whose
operators do not load beside the CPU build of torch this project installs on CPU hosts).
It is published (``torch.export``) with ``inputs.kind: image`` and the ImageNet recipe:
``resize: 224, crop: 224, scale: 1/255``, ImageNet ``mean`` / ``std``, NCHW, 1,000 labels
with a softmax.

- **raw**: one process, ``--threads`` torch threads: a ``DataLoader`` with
  ``num_workers=--threads`` processes, each decoding with Pillow and applying the same
  transforms (torchvision's ``Resize(224)``, ``CenterCrop(224)``, ``ToTensor()``,
  ``Normalize`` when torchvision imports, else the same steps with Pillow and NumPy), the
  model under ``torch.inference_mode()``, softmax / argmax, and the result columns
  (``prediction``, ``score``, ``probabilities``) written as one Parquet file.
- **ours**: ``Client.score_dataset`` on the directory through the queue, from the call to
  the job being finished (every row committed to the results store), against a warm
  ``python -m worker --processes 1 --threads T --preload resnet18-images`` (one warm-up
  job first). The worker decodes on ``T`` threads (``worker_threads``) while the model
  runs on ``T`` torch threads.

Both in the same run, same batch size, same number of decoding workers. Prints the rows/s
of both and one line ``ours/raw <ratio>``.

Usage, from the repository root::

    .venv/bin/python bench/images.py --quick     # 400 images: 2 to 4 minutes on 2 cores
    .venv/bin/python bench/images.py             # 2,000 images
    .venv/bin/python bench/images.py --profile   # and where the worker's time goes (py-spy)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.overhead import (  # noqa: E402
    backend_settings,
    clean_up,
    ours,
    profile_job,
    save_results,
    scratch_root,
    start_worker,
    wait_for_models,
)

SIDE = 224
CLASSES = 1000
MODEL = "resnet18-images"
MEAN = [0.485, 0.456, 0.406]  # ImageNet channel statistics, from torchvision's model documentation
STD = [0.229, 0.224, 0.225]
PREPROCESSING = {"resize": SIDE, "crop": SIDE, "scale": 1 / 255, "mean": MEAN, "std": STD}
MAIN_PHASES = (("forward", "predict_batch"), ("waiting for the prefetch thread", "Prefetcher"),
               ("decode outputs", "decode_outputs"), ("record (store)", "complete_shard"),
               ("claim", "claim_shard"), ("broker / celery", "drain_events"))
"""Phases of the worker's main thread, first match wins: name -> a frame on the stack."""


def profile_shares(path: Path) -> dict[str, float]:
    """Where the worker's time went, from a py-spy raw profile: each phase's share of the
    main thread's samples (first match of :data:`MAIN_PHASES`, else ``other``), and the
    busy samples of the decoding threads (``mlf-image_*``) and of the prefetch thread as a
    share of the main thread's samples (100% = one core busy for the whole job)."""
    counts: dict[str, int] = {name: 0 for name, _ in MAIN_PHASES}
    counts["other"] = 0
    main = decoding = prefetch = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        thread = stack.split(";", 1)[0]
        if thread.endswith("MainThread"):
            main += int(n)
            phase = next((name for name, frame in MAIN_PHASES if frame in stack), "other")
            counts[phase] += int(n)
        elif "mlf-image" in thread:
            decoding += int(n)
        elif "mlf-prefetch" in thread:
            prefetch += int(n)
    if not main:
        return {}
    shares = {f"main: {k}": v / main for k, v in counts.items() if v}
    shares["decoding threads (busy, all)"] = decoding / main
    shares["prefetch thread (busy)"] = prefetch / main
    return shares


def write_images(directory: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEG files of :data:`SIDE` x :data:`SIDE` pixels under ``directory``, in path order."""
    directory.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, 3)
        base = np.stack([xx * a, yy * b, (xx + yy) * c / 2], axis=-1) + rng.uniform(0, 255, 3)
        pixels = np.clip(np.mod(base, 256) + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = directory / f"img{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def resnet18():
    """ResNet-18 with random weights: torchvision's when it imports, else the same
    architecture (He et al. 2015; torchvision's ``BasicBlock`` layout) built here.

    Returns:
        ``(module, where)``: the model in eval mode, and ``"torchvision"`` or ``"by hand"``.
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    try:
        import torchvision

        return torchvision.models.resnet18(weights=None).eval(), "torchvision"
    except (ImportError, RuntimeError):
        pass

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                               if stride != 1 or cin != cout else None)

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, CLASSES)]
    model = nn.Sequential(*layers)
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model.eval(), "by hand"


def transforms():
    """Path -> ``(3, 224, 224)`` float32 tensor: torchvision's ImageNet transforms when it
    imports, else the same steps with Pillow and NumPy. Returns ``(transform, where)``."""
    import torch
    from PIL import Image

    try:
        from torchvision import transforms as T

        compose = T.Compose([T.Resize(SIDE), T.CenterCrop(SIDE), T.ToTensor(), T.Normalize(MEAN, STD)])

        def tv(path: str):
            with Image.open(path) as im:
                return compose(im.convert("RGB"))

        return tv, "torchvision"
    except (ImportError, RuntimeError):
        pass
    mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)

    def by_hand(path: str):
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            size = (SIDE, int(SIDE * h / w)) if w <= h else (int(SIDE * w / h), SIDE)
            if size != im.size:
                im = im.resize(size, Image.Resampling.BILINEAR)
            left, top = round((im.size[0] - SIDE) / 2), round((im.size[1] - SIDE) / 2)
            if im.size != (SIDE, SIDE):
                im = im.crop((left, top, left + SIDE, top + SIDE))
            x = (np.asarray(im, dtype=np.float32) / 255 - mean) / std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    return by_hand, "Pillow + NumPy"


class _Files:
    """A map-style dataset of image files (picklable, for the DataLoader's processes)."""

    def __init__(self, paths: list[str], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(self.paths[i])


def raw_loop(paths: list[Path], model, batch_size: int, workers: int, out: Path) -> float:
    """The raw loop (see the module docstring); seconds."""
    import torch

    transform, _ = transforms()
    loader = torch.utils.data.DataLoader(_Files([str(p) for p in paths], transform), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    started = time.perf_counter()
    parts = []
    with torch.inference_mode():
        for batch in loader:
            probs = torch.softmax(model(batch), dim=1).numpy().astype(np.float64)
            k = probs.argmax(axis=1)
            parts.append(pa.table({
                "prediction": pa.array(k), "score": pa.array(probs[np.arange(len(k)), k]),
                "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), CLASSES)}))
    pq.write_table(pa.concat_tables(parts), out)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="400 images")
    parser.add_argument("--images", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads and decoding workers, both sides (default: the CPU count)")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--backend", choices=["embedded", "redis-postgres"], default="embedded")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the data directory under var/")
    args = parser.parse_args()
    n = args.images or (400 if args.quick else 2000)
    import torch

    torch.set_num_threads(args.threads)
    from ml_framework.settings import load_settings
    from producer.client import Client
    from worker.export import export_torch

    root = scratch_root("images")
    proc = None
    try:
        t0 = time.perf_counter()
        paths = write_images(root / "data" / "images", n)
        write_images(root / "data" / "warm", 2 * args.batch_size, seed=1)
        model, where = resnet18()
        export_torch(model, root / "models", MODEL, inputs={"kind": "image", "columns": ["path"]},
                     outputs={"kind": "classification", "labels": list(range(CLASSES)), "activation": "softmax"},
                     preprocessing=PREPROCESSING)
        print(f"data: {n:,} JPEG files of {SIDE}x{SIDE} ({sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB), "
              f"ResNet-18 ({where}), raw transforms: {transforms()[1]}; built in {time.perf_counter() - t0:.0f} s; "
              f"batch {args.batch_size}, {args.threads} torch threads and {args.threads} decoding workers each, "
              f"backend {args.backend}", flush=True)
        values = backend_settings(root, args.backend, args.shard_size, tag="benchimages")
        client = Client(load_settings(**values))
        proc = start_worker(values, [MODEL], root / "worker.log", threads=args.threads)
        wait_for_models(client, proc, root / "worker.log")
        ours(client, root / "data" / "warm", MODEL, args.batch_size, 2 * args.batch_size)
        raw_s = raw_loop(paths, model, args.batch_size, args.threads, root / "raw.parquet")
        our_s = ours(client, root / "data" / "images", MODEL, args.batch_size, n)
        print(f"raw DataLoader: {raw_s:.2f} s ({n / raw_s:,.1f} rows/s); ours through the queue: {our_s:.2f} s "
              f"({n / our_s:,.1f} rows/s)", flush=True)
        results = {"raw_s": raw_s, "ours_s": our_s}
        if args.profile:
            pid = client.workers()[0].pid
            profile_job(client, pid, root / "data" / "images", MODEL, args.batch_size, n, root / "profile.txt")
            shares = profile_shares(root / "profile.txt")
            results["profile"] = shares
            print("  worker profile (share of the main thread's samples): " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()),
                  flush=True)
        print(f"\nours/raw {raw_s / our_s:.2f}")
        save_results("images", args.quick, {"images": n, "batch_size": args.batch_size, "threads": args.threads,
                                            "model": where, "backend": args.backend, "results": results})
        client.close()
    finally:
        clean_up(proc, root, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
