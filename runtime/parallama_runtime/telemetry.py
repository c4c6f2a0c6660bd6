"""GPU telemetry from NVML, sampled in the background so a scrape never waits on the driver.

Without ``nvidia-ml-py`` or without a driver the sampler simply has no GPUs: the GPU series are then
absent from ``/metrics`` (absent, not zero, so dashboards do not show idle GPUs that do not exist).
A query a GPU does not support (``NVMLError_NotSupported``: power on some boards, utilisation under
MIG) leaves that one value out; other values of the same GPU are still reported.

The NVML module is injectable so tests can drive the sampler with a fake; production code only ever
uses ``pynvml`` and never invents a value.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GpuSample", "NvmlSampler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment; a field is None when NVML could not tell."""

    index: int
    name: str
    utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_watts: float | None = None
    temperature_celsius: float | None = None
    process_memory_bytes: int | None = None
    """GPU memory this process holds on the GPU (NVML's per-process accounting)."""


@dataclass
class NvmlSampler:
    interval_seconds: float = 5.0
    nvml: Any = None
    """The NVML module; ``None`` imports ``pynvml`` on :meth:`start`."""
    pid: int = field(default_factory=os.getpid)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: list[GpuSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = False

    def start(self) -> bool:
        """Initialise NVML and begin sampling; False (and no series) when there is no NVML."""
        if self.nvml is None:
            try:
                import pynvml
            except ImportError:
                log.info("nvidia-ml-py is not installed: no GPU telemetry")
                return False
            self.nvml = pynvml
        try:
            self.nvml.nvmlInit()
        except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            log.info("NVML unavailable (%s): no GPU telemetry", error)
            return False
        self.available = True
        self.sample()
        self._thread = threading.Thread(target=self._run, name="parallama-nvml", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.available:
            self.available = False
            try:
                self.nvml.nvmlShutdown()
            except Exception as error:
                log.debug("nvmlShutdown: %s", error)

    def samples(self) -> list[GpuSample]:
        with self._lock:
            return list(self._samples)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                self.sample()
            except Exception:  # never let telemetry take the server down
                log.exception("GPU telemetry sample failed")

    def _call(self, what: str, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except self._error_type() as error:
            log.debug("NVML %s: %s", what, error)
            return None

    def _error_type(self) -> type[BaseException]:
        error = getattr(self.nvml, "NVMLError", None)
        return error if isinstance(error, type) and issubclass(error, BaseException) else Exception

    def sample(self) -> list[GpuSample]:
        """Read every GPU once and keep the result for scrapes."""
        nvml = self.nvml
        count = self._call("device count", nvml.nvmlDeviceGetCount)
        samples: list[GpuSample] = []
        for index in range(count or 0):
            handle = self._call("handle", nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                continue
            name = self._call("name", nvml.nvmlDeviceGetName, handle) or f"gpu{index}"
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            util = self._call("utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = self._call("memory", nvml.nvmlDeviceGetMemoryInfo, handle)
            power = self._call("power", nvml.nvmlDeviceGetPowerUsage, handle)
            temperature = self._call(
                "temperature", nvml.nvmlDeviceGetTemperature, handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
            )
            processes = self._call("processes", nvml.nvmlDeviceGetComputeRunningProcesses, handle)
            own: int | None = None
            for process in processes or ():
                if getattr(process, "pid", None) == self.pid:
                    used = getattr(process, "usedGpuMemory", None)
                    if isinstance(used, int):
                        own = (own or 0) + used
            samples.append(
                GpuSample(
                    index=index,
                    name=str(name),
                    utilization_ratio=None if util is None else float(util.gpu) / 100.0,
                    memory_used_bytes=None if memory is None else int(memory.used),
                    memory_total_bytes=None if memory is None else int(memory.total),
                    power_watts=None if power is None else float(power) / 1000.0,
                    temperature_celsius=None if temperature is None else float(temperature),
                    process_memory_bytes=own,
                )
            )
        with self._lock:
            self._samples = samples
        return samples
