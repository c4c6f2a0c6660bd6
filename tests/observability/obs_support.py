"""Helpers for the observability tests: dashboard queries, metric names in PromQL and in expositions,
HTTP, and handles on the runtime and Prometheus processes the fixtures (conftest.py) start."""

from __future__ import annotations

import importlib
import json
import re
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "parallama"
RULES = CHART / "rules" / "parallama.rules.yaml"
RULES_TEST = Path(__file__).resolve().parent / "rules_test.yaml"
DASHBOARD = CHART / "dashboards" / "parallama.json"

METRIC = re.compile(r"\b(parallama_[a-z0-9_]+)\b")
GPU_PREFIX = "parallama_gpu_"
OPERATOR_PREFIX = "parallama_operator_"
GPU_ROW = "GPU"
PROMETHEUS = "/usr/bin/prometheus"

# Target labels the local Prometheus attaches, as prometheus-operator would: `job` is the runtime
# Service's name (= the ModelDeployment's name), `namespace` its namespace.
RUNTIME_JOB = "demo"
RUNTIME_NAMESPACE = "parallama-test"
OPERATOR_JOB = "parallama-operator"
OPERATOR_NAMESPACE = "parallama-system"

RUNTIME_START = (
    "import argparse,sys; from parallama_runtime import serve; p=argparse.ArgumentParser(); "
    "serve.add_arguments(p); "
    "sys.exit(serve.run(p.parse_args(['--port','{port}','--parallel','2','--num-ctx','256'])))"
)


# The operator's own collectors, observed the way a reconcile does, served on 127.0.0.1:{port}.
OPERATOR_EXPORTER = """
import time
from prometheus_client import start_http_server
from parallama_operator import metrics
metrics.RECONCILES.labels(result="ok").inc(3)
metrics.RECONCILES.labels(result="error").inc()
metrics.RECONCILE_SECONDS.observe(0.12)
metrics.RECONCILE_SECONDS.observe(0.4)
metrics.PLANS.labels(fits="true").inc(2)
metrics.PLANNED_SLOTS.labels(namespace="{namespace}", name="{name}").set(2)
metrics.PLANNED_GPUS.labels(namespace="{namespace}", name="{name}").set(1)
metrics.AUTOSCALING_DESIRED.labels(namespace="{namespace}", name="{name}").set(3)
metrics.AUTOSCALING_REPLICAS.labels(namespace="{namespace}", name="{name}").set(2)
metrics.AUTOSCALING_LIMITED.labels(namespace="{namespace}", name="{name}", reason="capacity").set(1)
metrics.AUTOSCALING_LIMITED.labels(namespace="{namespace}", name="{name}", reason="max").set(0)
metrics.AUTOSCALING_OBSERVED.labels(namespace="{namespace}", name="{name}", signal="queued").set(4)
start_http_server({port}, addr="127.0.0.1")
while True:
    time.sleep(3600)
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def http_post_json(url: str, body: dict[str, Any], timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), {"error": error.read().decode(errors="replace")}


def require_serve() -> None:
    """The runtime server is another engineer's module: fail (never skip) while it is missing."""
    try:
        serve = importlib.import_module("parallama_runtime.serve")
    except ImportError as error:
        pytest.fail(
            f"parallama_runtime.serve is missing ({error}): the observability suite needs the real runtime"
        )
    for function in ("add_arguments", "run"):
        if not callable(getattr(serve, function, None)):
            pytest.fail(f"parallama_runtime.serve.{function} is missing")


@dataclass
class Runtime:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def send_completions(runtime: Runtime, count: int = 4) -> list[dict[str, Any]]:
    """A few concurrent POST /v1/completions, so both slots, the queue and every histogram see traffic."""

    status, listing = http_get(f"{runtime.url}/v1/models")
    assert status == 200, listing
    model = str(json.loads(listing)["data"][0]["id"])

    def one(index: int) -> dict[str, Any]:
        status, body = http_post_json(
            f"{runtime.url}/v1/completions",
            {
                "model": model,
                "prompt": f"Request {index}: once upon a time",
                "max_tokens": 12,
                "temperature": 0,
            },
        )
        assert status == 200, f"POST /v1/completions -> {status}: {body}\n{runtime.log_tail()}"
        return body

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


@dataclass
class OperatorExporter:
    url: str
    port: int


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str) -> dict[str, Any]:
        status, body = http_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        payload: dict[str, Any] = json.loads(body)
        payload["http_status"] = status
        return payload

    def series_label_values(self, match: str, label: str) -> set[str]:
        """Grafana's label_values(match, label), through the series API."""
        status, body = http_get(f"{self.url}/api/v1/series?" + urllib.parse.urlencode({"match[]": match}))
        assert status == 200, body
        return {str(s[label]) for s in json.loads(body)["data"] if label in s}

    def get(self, path: str) -> Any:
        status, body = http_get(f"{self.url}{path}")
        assert status == 200, body
        return json.loads(body)


@dataclass(frozen=True)
class PanelQuery:
    row: str
    panel: str
    ref_id: str
    expr: str

    @property
    def metrics(self) -> set[str]:
        return metric_names(self.expr)

    @property
    def needs_gpu(self) -> bool:
        """GPU series (and NVML's per-process memory) are absent without an NVIDIA GPU."""
        return self.row.startswith(GPU_ROW) or any(name.startswith(GPU_PREFIX) for name in self.metrics)


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including panels nested in collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every target of every panel, with the title of the row it sits under."""
    queries: list[PanelQuery] = []
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        for child in [panel, *panel.get("panels", [])]:
            for target in child.get("targets", []):
                queries.append(PanelQuery(row, child["title"], target["refId"], target["expr"]))
    return queries


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Template variables of type query: name -> PromQL-ish definition (label_values(...))."""
    result: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            result[variable["name"]] = query["query"] if isinstance(query, dict) else str(query)
    return result


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation for $name and ${name} (longest names first)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def rules_metric_names() -> set[str]:
    names: set[str] = set()
    for rule in alert_rules():
        names |= metric_names(str(rule["expr"]))
    return names


def exposition_sample_names(text: str) -> set[str]:
    """Every sample name in a Prometheus text exposition (histograms give _bucket, _count, _sum)."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def family_sample_names(families: Iterable[Metric]) -> set[str]:
    """Sample names a collector will expose, from its description alone (no samples needed): a
    labelled metric without children exposes nothing yet, but its description names it."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "summary": ("_count", "_sum", "_created"),
        "info": ("_info",),
        "gauge": ("",),
        "stateset": ("",),
        "unknown": ("",),
    }
    return {family.name + suffix for family in families for suffix in suffixes[family.type]}
