"""The Grafana dashboard and the alert rules against the metrics that really exist.

* runtime names: the /metrics output of a running `parallama serve` (demo model, no GPU);
* GPU names (absent without a GPU): the runtime's own metrics code fed by its NVML sampler over a fake NVML;
* operator names: the collectors in parallama_operator.metrics;
* every non-GPU panel query: run against a real Prometheus scraping the runtime and the operator's registry.
"""

from __future__ import annotations

import importlib
import math
import re
import time
from types import SimpleNamespace
from typing import Any

import pytest
from obs_support import (
    GPU_PREFIX,
    OPERATOR_JOB,
    OPERATOR_NAMESPACE,
    OPERATOR_PREFIX,
    RUNTIME_JOB,
    RUNTIME_NAMESPACE,
    Prometheus,
    Runtime,
    exposition_sample_names,
    family_sample_names,
    http_get,
    load_dashboard,
    metric_names,
    panel_queries,
    panels,
    rules_metric_names,
    send_completions,
    substitute,
    variable_queries,
)
from prometheus_client.parser import text_string_to_metric_families

VARIABLES = {
    "datasource": "prometheus",
    "namespace": RUNTIME_NAMESPACE,
    "deployment": RUNTIME_JOB,
    "operator_namespace": OPERATOR_NAMESPACE,
    "__rate_interval": "1m",
}


def all_names() -> set[str]:
    names = rules_metric_names()
    for query in panel_queries(load_dashboard()):
        names |= query.metrics
    return names


# ------------------------------------------------------------------------------------- static


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "parallama" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    queries = variable_queries(dashboard)
    assert queries["namespace"].startswith("label_values(") and queries["namespace"].endswith(", namespace)")
    assert queries["deployment"].startswith("label_values(") and queries["deployment"].endswith(", job)")
    assert "$namespace" in queries["deployment"]
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_covers_the_required_signals() -> None:
    used = set().union(*(q.metrics for q in panel_queries(load_dashboard())))
    required = {
        "parallama_slots_busy",
        "parallama_slots_total",
        "parallama_queue_depth",
        "parallama_time_to_first_token_seconds_bucket",
        "parallama_inter_token_latency_seconds_bucket",
        "parallama_generation_tokens_total",
        "parallama_kv_cache_usage_ratio",
        "parallama_gpu_utilization_ratio",
        "parallama_gpu_memory_used_bytes",
        "parallama_gpu_memory_total_bytes",
        "parallama_memory_planned_bytes",
        "parallama_memory_measured_bytes",
        "parallama_operator_reconcile_total",
        "parallama_operator_reconcile_duration_seconds_bucket",
    }
    assert required - used == set()


SELECTOR = re.compile(r"\b(parallama_[a-z0-9_]+)(\{[^}]*\})?")


def test_runtime_queries_are_per_model_deployment() -> None:
    """Every runtime series selector is filtered by the namespace and ModelDeployment variables, every
    operator selector by the operator namespace; quantiles are computed from buckets by `le`."""
    for query in panel_queries(load_dashboard()):
        selectors = SELECTOR.findall(query.expr)
        assert selectors, query
        for metric, matchers in selectors:
            if metric.startswith(OPERATOR_PREFIX):
                assert 'namespace=~"$operator_namespace"' in matchers, (query.panel, metric)
            else:
                assert 'namespace=~"$namespace"' in matchers, (query.panel, metric)
                assert 'job=~"$deployment"' in matchers, (query.panel, metric)
        if "histogram_quantile" in query.expr:
            assert "_bucket" in query.expr and "le)" in query.expr, query


# ------------------------------------------------------------------------ names against reality


def runtime_metrics_text(runtime: Runtime) -> str:
    send_completions(runtime, count=2)
    status, body = http_get(f"{runtime.url}/metrics")
    assert status == 200
    return body.decode()


def test_runtime_names_exist_in_real_metrics_output(runtime: Runtime) -> None:
    exposed = exposition_sample_names(runtime_metrics_text(runtime))
    wanted = {n for n in all_names() if not n.startswith((GPU_PREFIX, OPERATOR_PREFIX))}
    assert wanted, "no runtime metric names found in the dashboard and rules"
    missing = sorted(wanted - exposed)
    assert missing == [], f"used by the dashboard or alert rules but not in the runtime's /metrics: {missing}"


def test_memory_components_are_comparable(runtime: Runtime) -> None:
    """Planned-vs-measured panels and the drift alert compare weights, kv_cache and compute one by one:
    the runtime must report each of them both planned and measured."""
    components: dict[str, set[str]] = {
        "parallama_memory_planned_bytes": set(),
        "parallama_memory_measured_bytes": set(),
    }
    for family in text_string_to_metric_families(runtime_metrics_text(runtime)):
        for sample in family.samples:
            if sample.name in components:
                components[sample.name].add(sample.labels["component"])
    compared = {"weights", "kv_cache", "compute"}
    planned, measured = components.values()
    assert compared <= planned
    assert compared <= measured
    for query in panel_queries(load_dashboard()):
        if "parallama_memory_" in query.expr and not query.needs_gpu:
            assert 'component=~"weights|kv_cache|compute"' in query.expr, query


class FakeNvml:
    """Just enough of pynvml for parallama_runtime.telemetry.NvmlSampler: two GPUs, one process."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA L4"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=50 + handle, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=(10 + handle) * 2**30, total=24 * 2**30, free=(14 - handle) * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 70_000  # milliwatts

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 60

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=self.pid, usedGpuMemory=9 * 2**30)]


def gpu_exposition() -> str:
    """/metrics text of the runtime's real metrics code fed by its real NVML sampler over a fake NVML:
    the GPU series' names come from the code that emits them, not from reading its source."""
    telemetry = importlib.import_module("parallama_runtime.telemetry")
    metrics = importlib.import_module("parallama_runtime.metrics")
    sampler = telemetry.NvmlSampler(nvml=FakeNvml(pid=12345), pid=12345)
    samples = sampler.sample()
    assert len(samples) == 2
    runtime_metrics = metrics.RuntimeMetrics()
    runtime_metrics.bind(lambda: None, sampler.samples)
    text: str = runtime_metrics.render().decode()
    return text


def test_gpu_names_exist_in_the_runtime_gpu_exposition() -> None:
    text = gpu_exposition()
    exposed = exposition_sample_names(text)
    gpu_queries = [q for q in panel_queries(load_dashboard()) if q.needs_gpu]
    assert gpu_queries, "the dashboard has no GPU panels"
    checked_live = set().union(*(q.metrics for q in panel_queries(load_dashboard()) if not q.needs_gpu))
    wanted = {n for n in all_names() if n.startswith(GPU_PREFIX)}
    for query in gpu_queries:
        wanted |= query.metrics - checked_live  # the rest is checked against the live runtime
    assert {"parallama_gpu_utilization_ratio", "parallama_gpu_memory_used_bytes"} <= wanted
    assert sorted(wanted - exposed) == []
    gpus = {
        sample.labels["gpu"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "parallama_gpu_memory_total_bytes"
    }
    assert gpus == {"0", "1"}, "one series per GPU, labelled gpu"
    assert 'parallama_memory_measured_bytes{component="process"' in text, (
        "the process panel reads this series"
    )


def test_gpu_series_are_absent_without_gpus() -> None:
    """Why the live test skips GPU panels: no GPU, no series (absent, not zero)."""
    metrics = importlib.import_module("parallama_runtime.metrics")
    runtime_metrics = metrics.RuntimeMetrics()
    runtime_metrics.bind(lambda: None, lambda: [])
    assert GPU_PREFIX not in runtime_metrics.render().decode()


def test_operator_names_exist_in_operator_registry() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    metrics = importlib.import_module("parallama_operator.metrics")
    defined: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            defined |= family_sample_names(value.describe())
    wanted = {n for n in all_names() if n.startswith(OPERATOR_PREFIX)}
    assert wanted
    assert sorted(wanted - defined) == []


# --------------------------------------------------------------------------- live Prometheus


def wait_for(prometheus: Prometheus, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        payload = prometheus.query(expr)
        result: list[dict[str, Any]] = payload.get("data", {}).get("result", [])
        if payload["status"] == "success" and result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"prometheus never answered {expr!r}: {payload}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def scraped(prometheus: Prometheus, runtime: Runtime) -> Prometheus:
    """Prometheus after it scraped the runtime both before and after some completions."""
    wait_for(prometheus, f'up{{job="{RUNTIME_JOB}"}} == 1')
    wait_for(prometheus, f'up{{job="{OPERATOR_JOB}"}} == 1')
    time.sleep(2)  # a few scrapes of the idle runtime first, so rate() spans the traffic
    send_completions(runtime, count=4)
    _, body = http_get(f"{runtime.url}/metrics")
    tokens = sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "parallama_generation_tokens_total"
    )
    assert tokens > 0, "the completions generated no tokens"
    wait_for(prometheus, f'sum(parallama_generation_tokens_total{{job="{RUNTIME_JOB}"}}) >= {tokens}')
    time.sleep(2.5)  # and a couple more scrapes after it
    return prometheus


def test_every_panel_query_returns_data(scraped: Prometheus) -> None:
    failures: list[str] = []
    checked = 0
    for query in panel_queries(load_dashboard()):
        if query.needs_gpu:
            continue  # no GPU here: those series are absent by design (checked against telemetry instead)
        expr = substitute(query.expr, VARIABLES)
        payload = scraped.query(expr)
        checked += 1
        if payload["status"] != "success":
            failures.append(f"{query.panel} [{query.ref_id}] error {payload.get('error')}: {expr}")
        elif not payload["data"]["result"]:
            failures.append(f"{query.panel} [{query.ref_id}] no data: {expr}")
    assert checked >= 20
    assert failures == [], "\n".join(failures)


def test_throughput_and_latency_panels_show_the_traffic(scraped: Prometheus) -> None:
    """Not just series: the rates and quantiles over the completions are real numbers above zero."""
    job = f'job="{RUNTIME_JOB}"'
    quantiles = [
        f"histogram_quantile(0.5, sum by (le) (rate({name}_bucket{{{job}}}[1m])))"
        for name in ("parallama_time_to_first_token_seconds", "parallama_inter_token_latency_seconds")
    ]
    for expr in [f"sum(rate(parallama_generation_tokens_total{{{job}}}[1m]))", *quantiles]:
        value = float(scraped.query(expr)["data"]["result"][0]["value"][1])
        assert math.isfinite(value) and value > 0, expr
    slots = scraped.query(f"sum(parallama_slots_total{{{job}}})")["data"]["result"][0]["value"][1]
    assert float(slots) == 2  # --parallel 2


def test_variable_queries_find_the_deployment(scraped: Prometheus) -> None:
    for name, query in variable_queries(load_dashboard()).items():
        inner = query.removeprefix("label_values(").removesuffix(")")
        match, _, label = inner.rpartition(",")
        values = scraped.series_label_values(substitute(match.strip(), VARIABLES), label.strip())
        expected = {
            "namespace": RUNTIME_NAMESPACE,
            "deployment": RUNTIME_JOB,
            "operator_namespace": OPERATOR_NAMESPACE,
        }
        assert expected[name] in values, (name, values)


def test_alert_rules_evaluate_cleanly_on_real_series(scraped: Prometheus) -> None:
    deadline = time.monotonic() + 10
    while True:
        groups = scraped.get("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule.get("lastEvaluation", "").startswith("0001") is False for rule in rules):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {rule["name"] for rule in rules} >= {"ParallamaRuntimeDown", "ParallamaOperatorReconcileErrors"}
    bad = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert bad == []
    names = metric_names(" ".join(rule["query"] for rule in rules))
    assert names == rules_metric_names()
