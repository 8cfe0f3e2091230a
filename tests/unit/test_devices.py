"""GPU discovery with a fake NVML (NVML cannot exist on this CPU host), and the launcher's
per-device plan."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from ml_framework.settings import load_settings
from worker.devices import discover
from worker.launcher import plan_children


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """Stands in for pynvml: ``n`` H200s, device ``i`` with UUID ``GPU-000i-...``."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, n: int, init_error: bool = False) -> None:
        self.n = n
        self.init_error = init_error
        self.shutdown_called = False

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdown_called = True

    def nvmlDeviceGetCount(self) -> int:
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-000{h}-aaaa-bbbb"

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=141 * 2**30, used=(h + 1) * 2**30, free=0)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=10 * h, memory=0)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 40 + h

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 3:
            raise FakeNVMLError("Not Supported")
        return 250_000


@pytest.mark.parametrize("n", [0, 1, 4])
def test_discover_counts_and_reads_telemetry(n):
    """0, 1 and 4 GPUs are listed with UUID, memory, utilisation, temperature and power."""
    nvml = FakeNVML(n)
    report = discover(nvml, use_env=False)
    assert [g.index for g in report.gpus] == list(range(n))
    assert (report.reason is None) == (n > 0)
    assert nvml.shutdown_called
    if n == 4:
        g = report.gpus[2]
        assert (g.uuid, g.name, g.memory_used_bytes, g.utilization_pct, g.temperature_c, g.power_w) == (
            "GPU-0002-aaaa-bbbb", "NVIDIA H200", 3 * 2**30, 20, 42, 250.0)
        assert report.gpus[3].power_w is None  # unsupported counter, not a crash


def test_nvml_missing_or_failing_reports_a_reason(monkeypatch):
    """No binding installed, or no driver: no GPUs, a reason, no exception."""
    report = discover(FakeNVML(2, init_error=True), use_env=False)
    assert report.gpus == [] and "Driver Not Loaded" in report.reason
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    report = discover(use_env=False)
    assert report.gpus == [] and "nvidia-ml-py" in report.reason


@pytest.mark.parametrize(("visible", "expected"), [
    ("2,0", [2, 0]),
    ("GPU-0003-aaaa-bbbb,GPU-0001", [3, 1]),   # full UUID and unique prefix
    ("1,7,2", [1]),                             # CUDA stops at the first invalid entry
    ("1,1", [1]),
    ("", []),
])
def test_cuda_visible_devices_by_index_and_uuid(visible, expected):
    """CUDA_VISIBLE_DEVICES given as indices or UUIDs selects devices in its order."""
    report = discover(FakeNVML(4), visible=visible)
    assert [g.index for g in report.gpus] == expected
    assert (report.reason is not None) == (not expected)


def test_environment_variable_is_honoured(monkeypatch):
    """Without an explicit value, the process's CUDA_VISIBLE_DEVICES applies."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0002")
    assert [g.index for g in discover(FakeNVML(4)).gpus] == [2]


def test_launcher_pins_one_process_per_gpu_by_uuid():
    """4 GPUs -> 4 processes named gpu<i>-<launcher>@host, each seeing only its device by UUID."""
    gpus = discover(FakeNVML(4), use_env=False).gpus
    children = plan_children(load_settings(), cores=16, gpus=gpus, launcher_id="L")
    assert [c.name.split("@")[0] for c in children] == ["gpu0-L", "gpu1-L", "gpu2-L", "gpu3-L"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in children] == [g.uuid for g in gpus]
    assert {c.env["OMP_NUM_THREADS"] for c in children} == {"4"}
    assert all(c.argv[c.argv.index("--pool") + 1] == "threads" for c in children)


def test_launcher_processes_per_device_and_extra_cpu_processes():
    """Two processes per selected GPU plus CPU processes pinned to no GPU; threads split the cores."""
    gpus = discover(FakeNVML(4), visible="0,2").gpus
    children = plan_children(load_settings(), 2, cores=12, gpus=gpus, processes_per_device=2, launcher_id="L")
    names = [c.name.split("@")[0] for c in children]
    assert names == ["gpu0-0-L", "gpu0-1-L", "gpu2-0-L", "gpu2-1-L", "cpu0-L", "cpu1-L"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in children][-2:] == ["", ""]
    assert {c.env["ML_FRAMEWORK_WORKER_THREADS"] for c in children} == {"2"}


def test_processes_sharing_a_gpu_each_get_their_share_of_its_memory(monkeypatch):
    """With N processes per GPU each is capped at 1/N of the device's memory (PyTorch's
    per-process fraction, a TensorFlow memory limit from NVML's total); alone on a device,
    or on CPU, a process is not capped (regression: after an out-of-memory episode one
    process's cache kept 112 of 140 GiB and starved the other)."""
    from worker import devices
    from worker.runtimes import tensorflow as tf_runtime

    gpus = discover(FakeNVML(2), use_env=False).gpus
    shared = plan_children(load_settings(), 1, cores=8, gpus=gpus, processes_per_device=4)
    assert [c.env.get(devices.MEMORY_FRACTION_ENV) for c in shared] == ["0.250000"] * 8 + [None]
    alone = plan_children(load_settings(), cores=8, gpus=gpus)
    assert all(devices.MEMORY_FRACTION_ENV not in c.env for c in alone)
    monkeypatch.setenv(devices.MEMORY_FRACTION_ENV, shared[0].env[devices.MEMORY_FRACTION_ENV])
    monkeypatch.setattr(tf_runtime, "discover", lambda: devices.discover(FakeNVML(1), use_env=False))
    assert devices.memory_fraction() == 0.25
    assert tf_runtime.memory_limit_mb() == 141 * 1024 // 4
    monkeypatch.delenv(devices.MEMORY_FRACTION_ENV)
    assert devices.memory_fraction() is None and tf_runtime.memory_limit_mb() is None


def test_no_gpu_means_one_cpu_process_per_core():
    """With no GPU the plan is one CPU process per core."""
    children = plan_children(load_settings(), cores=3, gpus=[], launcher_id="L")
    assert [c.name.split("@")[0] for c in children] == ["cpu0-L", "cpu1-L", "cpu2-L"]


def test_heartbeat_reports_the_pinned_gpu_by_uuid(monkeypatch):
    """A worker pinned with CUDA_VISIBLE_DEVICES=<uuid> reports that device's telemetry,
    even though it is NVML index 2; rows/s comes from the rows counted between beats."""
    import worker.devices
    from worker import process

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0002-aaaa-bbbb")
    monkeypatch.setattr(process, "discover", lambda: worker.devices.discover(FakeNVML(4)))
    clock = {"now_s": 1000.0}  # the heartbeat's monotonic clock, moved by the test
    monkeypatch.setattr(process, "time", SimpleNamespace(monotonic=lambda: clock["now_s"]))
    beat = process.Heartbeat(process.WorkerContext(load_settings(), "gpu2@host"))
    first = beat.sample()
    assert (first.device_uuid, first.device_name, first.device_memory_used_bytes, first.device_utilization_pct,
            first.device_temperature_c, first.device_power_w) == (
        "GPU-0002-aaaa-bbbb", "NVIDIA H200", 3 * 2**30, 20, 42, 250.0)
    assert first.rows_per_s == 0.0 and first.rss_bytes > 0
    from prometheus_client import REGISTRY

    from worker import metrics
    assert REGISTRY.get_sample_value("mlf_gpu_memory_used_bytes", {"device": metrics.DEVICE}) == 3 * 2**30
    assert REGISTRY.get_sample_value("mlf_gpu_utilization_ratio", {"device": metrics.DEVICE}) == 0.2
    beat.info.rows_done += 500
    clock["now_s"] += 2.0  # the next beat, 2 s later
    assert beat.sample().rows_per_s == 250.0


def test_heartbeat_on_a_cpu_host_reports_no_device(monkeypatch):
    """Without NVML the heartbeat carries no device fields and never asks NVML again."""
    import worker.devices
    from worker import process

    calls = []

    def no_nvml():
        calls.append(1)
        return worker.devices.discover(FakeNVML(0, init_error=True))

    monkeypatch.setattr(process, "discover", no_nvml)
    beat = process.Heartbeat(process.WorkerContext(load_settings(), "cpu0@host"))
    info = beat.sample()
    beat.sample()
    assert info.device_uuid is None and info.device_memory_total_bytes is None
    assert len(calls) == 1


def test_torch_caps_a_shared_gpu_before_loading_the_model(monkeypatch, tmp_path):
    """On a CUDA device (mocked: none exists here) a process sharing it sets its memory
    fraction before the model is moved there."""
    import torch

    from ml_framework.errors import ModelLoadError
    from worker import devices
    from worker.export import export_torch
    from worker.registry import load_runtime

    manifest = export_torch(torch.nn.Linear(2, 2), tmp_path, "lin", inputs={"columns": ["a", "b"]},
                            outputs={"kind": "regression", "size": 2})
    fractions: list[float] = []
    monkeypatch.setenv(devices.MEMORY_FRACTION_ENV, "0.5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fractions.append)
    with pytest.raises(ModelLoadError):  # moving the model to a GPU that does not exist
        load_runtime(manifest, tmp_path / "lin" / "1")
    assert fractions == [0.5]
