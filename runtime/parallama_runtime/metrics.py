"""Prometheus metrics of one runtime, in their own registry (tests run several servers at once).

Counters and histograms are updated as things happen (the engine calls the :class:`EngineObserver`
hooks from its scheduler thread). Live values (slots, queue, KV usage, GPUs) are read at scrape time
by a custom collector, so they are never stale and cost nothing between scrapes.

Beyond design.md's names, two high-water gauges make peaks observable without racing a scraper:
``parallama_slots_busy_max`` and ``parallama_queue_depth_max`` (largest value since start).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine import EngineStats, Finish
from .engine.llama_log import ParsedReports
from .planning.memory import MemoryEstimate
from .telemetry import GpuSample

__all__ = ["CONTENT_TYPE", "RuntimeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_DURATION = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _LiveCollector(Collector):
    def __init__(
        self,
        stats: Callable[[], EngineStats | None],
        gpus: Callable[[], Sequence[GpuSample]],
        measured: Callable[[], dict[tuple[str, str], int]],
    ) -> None:
        self._stats = stats
        self._gpus = gpus
        self._measured = measured

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        if stats is not None:
            yield GaugeMetricFamily("parallama_slots_total", "Parallel slots allocated", stats.slots_total)
            yield GaugeMetricFamily("parallama_slots_busy", "Slots serving a request now", stats.slots_busy)
            yield GaugeMetricFamily(
                "parallama_slots_busy_max", "Most slots busy at once since start", stats.slots_busy_max
            )
            yield GaugeMetricFamily(
                "parallama_queue_depth", "Requests waiting for a free slot", stats.queue_depth
            )
            yield GaugeMetricFamily(
                "parallama_queue_depth_max", "Longest wait queue since start", stats.queue_depth_max
            )
            # the prompt cache keeps finished requests' cells in the free part of the pool; they
            # are given back on demand, so "in use" counts what running requests hold
            running = stats.kv_cells_used - stats.kv_cells_cached
            ratio = running / stats.kv_cells_total if stats.kv_cells_total else 0.0
            yield GaugeMetricFamily(
                "parallama_kv_cache_usage_ratio",
                "KV cache cells running requests hold over cells allocated",
                ratio,
            )
            yield GaugeMetricFamily(
                "parallama_kv_cache_cached_cells",
                "KV cells the prompt cache keeps for finished requests (given back when needed)",
                stats.kv_cells_cached,
            )
        samples = list(self._gpus())
        measured = GaugeMetricFamily(
            "parallama_memory_measured_bytes",
            "Memory held per component and device: llama.cpp's buffer reports, and NVML's per-process use",
            labels=["component", "device"],
        )
        for (component, device), value in sorted(self._measured().items()):
            measured.add_metric([component, device], float(value))
        for sample in samples:
            if sample.process_memory_bytes is not None:
                measured.add_metric(["process", f"gpu{sample.index}"], float(sample.process_memory_bytes))
        if measured.samples:
            yield measured
        if not samples:
            return
        families = {
            "utilization_ratio": GaugeMetricFamily(
                "parallama_gpu_utilization_ratio", "GPU busy fraction (NVML)", labels=["gpu"]
            ),
            "memory_used_bytes": GaugeMetricFamily(
                "parallama_gpu_memory_used_bytes", "GPU memory used, all processes (NVML)", labels=["gpu"]
            ),
            "memory_total_bytes": GaugeMetricFamily(
                "parallama_gpu_memory_total_bytes", "GPU memory size (NVML)", labels=["gpu"]
            ),
            "power_watts": GaugeMetricFamily(
                "parallama_gpu_power_watts", "GPU power draw (NVML)", labels=["gpu"]
            ),
            "temperature_celsius": GaugeMetricFamily(
                "parallama_gpu_temperature_celsius", "GPU temperature (NVML)", labels=["gpu"]
            ),
        }
        for sample in samples:
            for key, family in families.items():
                value = getattr(sample, key)
                if value is not None:
                    family.add_metric([str(sample.index)], float(value))
        for family in families.values():
            if family.samples:
                yield family


class RuntimeMetrics:
    """All of a runtime's series; also the engine's observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "parallama_requests", "Requests by API and outcome", ["api", "status"], registry=r
        )
        self.request_duration = Histogram(
            "parallama_request_duration_seconds", "End-to-end request time", buckets=_DURATION, registry=r
        )
        self.time_to_first_token = Histogram(
            "parallama_time_to_first_token_seconds",
            "From arrival to the first generated token",
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "parallama_inter_token_latency_seconds",
            "Between consecutive tokens",
            buckets=_TOKEN_GAP,
            registry=r,
        )
        self.queue_time = Histogram(
            "parallama_queue_time_seconds", "Waiting for a free slot", buckets=_LATENCY, registry=r
        )
        self.prompt_tokens = Counter(
            "parallama_prompt_tokens",
            "Prompt tokens of admitted requests, from the cache or computed",
            registry=r,
        )
        self.generation_tokens = Counter("parallama_generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens_cached = Counter(
            "parallama_prompt_tokens_cached",
            "Prompt tokens served from the prompt cache instead of computed",
            registry=r,
        )
        self.memory_planned = Gauge(
            "parallama_memory_planned_bytes", "Memory the planner expects", ["component"], registry=r
        )
        self.measured: dict[tuple[str, str], int] = {}
        """(component, device) -> bytes from llama.cpp's buffer reports; NVML's are added at scrape."""
        self.model_info = Info("parallama_model", "The served model and its slot configuration", registry=r)
        self._live: _LiveCollector | None = None

    def bind(
        self,
        stats: Callable[[], EngineStats | None],
        gpus: Callable[[], Sequence[GpuSample]] = lambda: (),
    ) -> None:
        """Attach the live sources read at scrape time (engine stats, GPU samples)."""
        self._live = _LiveCollector(stats, gpus, lambda: self.measured)
        self.registry.register(self._live)

    def set_model(self, model: str, num_parallel: int, num_ctx: int, kv_cache_type: str) -> None:
        self.model_info.info(
            {
                "model": model,
                "num_parallel": str(num_parallel),
                "num_ctx": str(num_ctx),
                "kv_cache_type": kv_cache_type,
            }
        )

    def set_planned(self, estimate: MemoryEstimate) -> None:
        self.memory_planned.labels("weights").set(estimate.weights_bytes + estimate.host_bytes)
        self.memory_planned.labels("kv_cache").set(estimate.kv_cache_bytes)
        self.memory_planned.labels("compute").set(estimate.compute_bytes)
        self.memory_planned.labels("total").set(estimate.total_bytes + estimate.host_bytes)

    def set_measured(self, reports: ParsedReports) -> None:
        totals: dict[tuple[str, str], int] = {}
        for report in reports.buffers:
            component = "weights" if report.component == "output" else report.component
            key = (component, report.device)
            totals[key] = totals.get(key, 0) + report.bytes
        self.measured = totals

    def count_request(self, api: str, status: int | str) -> None:
        self.requests.labels(api, str(status)).inc()

    def observe_duration(self, seconds: float) -> None:
        self.request_duration.observe(seconds)

    # ---- EngineObserver

    def on_admitted(self, queue_seconds: float, prompt_tokens: int, cached_tokens: int) -> None:
        self.queue_time.observe(queue_seconds)
        self.prompt_tokens.inc(prompt_tokens)
        if cached_tokens:
            self.prompt_tokens_cached.inc(cached_tokens)

    def on_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def on_inter_token(self, seconds: Sequence[float]) -> None:
        observe = self.inter_token_latency.observe
        for gap in seconds:
            observe(gap)

    def on_finished(self, finish: Finish) -> None:
        self.generation_tokens.inc(finish.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
