"""GPU discovery and telemetry through NVML (``pynvml`` from ``nvidia-ml-py``).

NVML is NVIDIA's management library: it lists devices and reads memory, utilisation,
temperature and power without creating a CUDA context, so the launcher can plan one
worker process per GPU without initialising CUDA itself. Devices are identified by UUID,
which stays the same whatever ``CUDA_VISIBLE_DEVICES`` does to indices.

Where NVML is missing (CPU host, container without the driver) :func:`discover` reports
no GPUs and the reason; it never raises.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from types import ModuleType


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as NVML reports it.

    Attributes:
        index: NVML index (physical order on the host, not the CUDA index in a process).
        uuid: ``GPU-...`` identifier; the stable way to pin a process to this device.
        name: product name, e.g. ``NVIDIA H200``.
        memory_total_bytes / memory_used_bytes: device memory, bytes.
        utilization_pct: GPU utilisation over NVML's last sample period, percent.
        temperature_c: core temperature, degrees Celsius.
        power_w: power draw, watts (NVML reports milliwatts).
    """

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None


@dataclass(frozen=True)
class DeviceReport:
    """The GPUs this process may use, or why there are none.

    Attributes:
        gpus: visible devices, in ``CUDA_VISIBLE_DEVICES`` order when it is set.
        reason: why ``gpus`` is empty (``None`` when there are GPUs).
    """

    gpus: list[GpuDevice] = field(default_factory=list)
    reason: str | None = None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _read(nvml: ModuleType, index: int) -> GpuDevice:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)

    def optional(read):  # a device may not support every counter
        try:
            return read()
        except nvml.NVMLError:
            return None

    util = optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    temp = optional(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    power_mw = optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    return GpuDevice(
        index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)), name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(memory.total), memory_used_bytes=int(memory.used),
        utilization_pct=util, temperature_c=temp, power_w=None if power_mw is None else power_mw / 1000.0,
    )


def select_visible(gpus: list[GpuDevice], visible: str | None) -> tuple[list[GpuDevice], str | None]:
    """Apply ``CUDA_VISIBLE_DEVICES`` semantics to the host's devices.

    Entries are indices (``0,2``) or UUIDs / unique UUID prefixes (``GPU-8f3...``). As in
    CUDA, the list ends at the first entry that names no device, and a device is not
    listed twice.

    Returns:
        ``(devices, reason)``: the visible devices in the listed order, and why that list
        is empty, if it is.
    """
    if visible is None:
        return gpus, None if gpus else "NVML found no NVIDIA GPU"
    chosen: list[GpuDevice] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdecimal():
            match = [g for g in gpus if g.index == int(entry)]
        else:
            match = [g for g in gpus if entry and g.uuid.startswith(entry)]
        if len(match) != 1 or match[0] in chosen:
            break
        chosen.append(match[0])
    if chosen:
        return chosen, None
    return [], f"{visible!r} selects none of the {len(gpus)} GPU(s)"


def discover(nvml: ModuleType | None = None, visible: str | None = None, *, use_env: bool = True) -> DeviceReport:
    """List the GPUs visible to this process, with their telemetry.

    Args:
        nvml: the NVML binding (``pynvml``); imported when ``None``. Tests pass a fake.
        visible: a ``CUDA_VISIBLE_DEVICES`` value; default: this process's, if ``use_env``.

    Returns:
        A :class:`DeviceReport`; never raises for a missing library, driver or device.
    """
    if visible is None and use_env:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return DeviceReport([], "NVML binding not installed (pip install nvidia-ml-py)")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return DeviceReport([], f"NVML unavailable ({exc}): no NVIDIA driver on this host or in this container")
    try:
        gpus = [_read(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
    except nvml.NVMLError as exc:
        return DeviceReport([], f"NVML failed to list devices: {exc}")
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
    chosen, reason = select_visible(gpus, visible)
    return DeviceReport(chosen, reason if visible is None or reason is None else f"CUDA_VISIBLE_DEVICES={reason}")


MEMORY_FRACTION_ENV = "MLF_DEVICE_MEMORY_FRACTION"
"""Set by ``mlf worker`` for each of several processes sharing one GPU
(``--processes-per-device N``): that process's share of the device's memory, ``1/N``."""


def memory_fraction() -> float | None:
    """This process's share of its GPU's memory (see :data:`MEMORY_FRACTION_ENV`), or
    ``None`` when it has the device to itself."""
    value = os.environ.get(MEMORY_FRACTION_ENV)
    return float(value) if value else None
