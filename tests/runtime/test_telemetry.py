"""The NVML sampler with an injected fake NVML module, and the absence of GPU series without one."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from parallama_runtime.engine import EngineStats
from parallama_runtime.metrics import RuntimeMetrics
from parallama_runtime.telemetry import NvmlSampler


class FakeNVMLError(Exception):
    pass


class NotSupported(FakeNVMLError):
    pass


def fake_nvml(*, power_supported: bool = True, init_error: bool = False, pid: int = 4242) -> Any:
    gpus = [
        {
            "name": b"NVIDIA L20",
            "util": 37,
            "used": 10 * 2**30,
            "total": 48 * 2**30,
            "power": 182_500,
            "temp": 61,
        },
        {"name": "NVIDIA L20", "util": 0, "used": 2**30, "total": 48 * 2**30, "power": 60_000, "temp": 40},
    ]
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise FakeNVMLError("Driver Not Loaded")

    def power(handle: int) -> int:
        if not power_supported and handle == 1:
            raise NotSupported("Not Supported")
        return int(gpus[handle]["power"])

    def processes(handle: int) -> list[Any]:
        if handle == 0:
            return [
                SimpleNamespace(pid=pid, usedGpuMemory=3 * 2**30),
                SimpleNamespace(pid=1, usedGpuMemory=2**30),
            ]
        return []

    return SimpleNamespace(
        NVMLError=FakeNVMLError,
        NVML_TEMPERATURE_GPU=0,
        calls=calls,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: gpus[h]["name"],
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=gpus[h]["util"], memory=0),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(
            used=gpus[h]["used"], total=gpus[h]["total"], free=int(gpus[h]["total"]) - int(gpus[h]["used"])
        ),
        nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetTemperature=lambda h, sensor: gpus[h]["temp"],
        nvmlDeviceGetComputeRunningProcesses=processes,
    )


def _series(metrics: RuntimeMetrics) -> dict[str, float]:
    values = {}
    for line in metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _stats() -> EngineStats:
    return EngineStats(2, 1, 2, 0, 3, 100, 1024)


def test_sampler_reads_every_gpu() -> None:
    nvml = fake_nvml()
    sampler = NvmlSampler(nvml=nvml, interval_seconds=3600, pid=4242)
    assert sampler.start()
    try:
        samples = sampler.samples()
        assert [s.name for s in samples] == ["NVIDIA L20", "NVIDIA L20"]
        assert samples[0].utilization_ratio == pytest.approx(0.37)
        assert samples[0].power_watts == pytest.approx(182.5)
        assert samples[0].process_memory_bytes == 3 * 2**30
        assert samples[1].process_memory_bytes is None
        metrics = RuntimeMetrics()
        metrics.bind(_stats, sampler.samples)
        series = _series(metrics)
        assert series['parallama_gpu_utilization_ratio{gpu="0"}'] == pytest.approx(0.37)
        assert series['parallama_gpu_memory_used_bytes{gpu="1"}'] == 2**30
        assert series['parallama_gpu_memory_total_bytes{gpu="0"}'] == 48 * 2**30
        assert series['parallama_gpu_power_watts{gpu="1"}'] == 60
        assert series['parallama_gpu_temperature_celsius{gpu="0"}'] == 61
        assert series['parallama_memory_measured_bytes{component="process",device="gpu0"}'] == 3 * 2**30
        assert series["parallama_kv_cache_usage_ratio"] == pytest.approx(100 / 1024)
        assert series["parallama_slots_busy_max"] == 2
    finally:
        sampler.stop()
    assert nvml.calls == ["init", "shutdown"]


def test_unsupported_query_leaves_only_that_value_out() -> None:
    sampler = NvmlSampler(nvml=fake_nvml(power_supported=False), interval_seconds=3600)
    assert sampler.start()
    try:
        metrics = RuntimeMetrics()
        metrics.bind(_stats, sampler.samples)
        series = _series(metrics)
        assert 'parallama_gpu_power_watts{gpu="0"}' in series
        assert 'parallama_gpu_power_watts{gpu="1"}' not in series
        assert 'parallama_gpu_temperature_celsius{gpu="1"}' in series
    finally:
        sampler.stop()


def test_no_driver_means_no_gpu_series() -> None:
    nvml = fake_nvml(init_error=True)
    sampler = NvmlSampler(nvml=nvml)
    assert sampler.start() is False
    assert sampler.samples() == []
    metrics = RuntimeMetrics()
    metrics.bind(_stats, sampler.samples)
    text = metrics.render().decode()
    assert "parallama_gpu_" not in text
    assert "parallama_slots_total 2.0" in text
    sampler.stop()
    assert "shutdown" not in nvml.calls


def test_real_pynvml_without_a_driver_degrades_cleanly() -> None:
    pytest.importorskip("pynvml")
    sampler = NvmlSampler()
    started = sampler.start()
    try:
        if started:
            pytest.skip("this machine has an NVIDIA driver")
        assert sampler.samples() == []
    finally:
        sampler.stop()


def test_registries_are_independent() -> None:
    first, second = RuntimeMetrics(), RuntimeMetrics()
    first.count_request("openai", 200)
    assert 'parallama_requests_total{api="openai",status="200"}' in _series(first)
    assert 'parallama_requests_total{api="openai",status="200"}' not in _series(second)


def test_exposition_passes_promtool() -> None:
    """One family per name (llama.cpp and NVML measured bytes share one), in valid text format."""
    import shutil
    import subprocess

    from parallama_runtime.engine.llama_log import BufferReport, ParsedReports

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    sampler = NvmlSampler(nvml=fake_nvml(), interval_seconds=3600, pid=4242)
    sampler.start()
    try:
        metrics = RuntimeMetrics()
        metrics.bind(_stats, sampler.samples)
        metrics.set_measured(
            ParsedReports(
                buffers=[BufferReport("weights", "CPU", 6.0), BufferReport("kv_cache", "CUDA0", 1.0)]
            )
        )
        metrics.set_model("tiny", 2, 256, "f16")
        text = metrics.render()
    finally:
        sampler.stop()
    series = _series(metrics)
    assert series['parallama_memory_measured_bytes{component="kv_cache",device="CUDA0"}'] == 2**20
    assert series['parallama_memory_measured_bytes{component="process",device="gpu0"}'] == 3 * 2**30
    assert text.decode().count("# TYPE parallama_memory_measured_bytes gauge") == 1
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    problems = [line for line in (checked.stdout + checked.stderr).decode().splitlines() if line.strip()]
    # design.md fixes the gauge name parallama_slots_total; promtool's lint dislikes "_total" on gauges
    assert all("parallama_slots_total" in line for line in problems), problems
