"""Debian's Prometheus scrapes a real runtime; the series come back through its query API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from parallama_runtime.serve import BackgroundServer
from runtime_helpers import SERVED_NAME

PROMETHEUS = "/usr/bin/prometheus"

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(shutil.which(PROMETHEUS) is None, reason=f"{PROMETHEUS} is not installed"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def prometheus(server: BackgroundServer, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: parallama\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail(
                "prometheus did not become ready: " + (tmp_path / "prometheus.log").read_text()[-2000:]
            )
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def _query(url: str, expr: str) -> list[dict[str, object]]:
    with urllib.request.urlopen(url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})) as response:
        body = json.load(response)
    assert body["status"] == "success"
    return list(body["data"]["result"])


def _wait_value(url: str, expr: str, predicate, timeout: float = 30.0) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        last = _query(url, expr)
        if last and predicate(float(last[0]["value"][1])):  # type: ignore[index]
            return float(last[0]["value"][1])  # type: ignore[index]
        time.sleep(0.5)
    pytest.fail(f"{expr} never satisfied the check; last result {last}")


def test_prometheus_scrapes_slots_and_tokens(server: BackgroundServer, prometheus: str) -> None:
    assert _wait_value(prometheus, "parallama_slots_total", lambda v: v == 2) == 2
    baseline = _wait_value(prometheus, "parallama_generation_tokens_total", lambda v: v >= 0)
    body = json.dumps(
        {
            "model": SERVED_NAME,
            "prompt": "scrape me",
            "stream": False,
            "options": {"num_predict": 16, "ignore_eos": True},
        }
    ).encode()
    for _ in range(3):
        urllib.request.urlopen(urllib.request.Request(server.url + "/api/generate", data=body)).read()
    _wait_value(prometheus, "parallama_generation_tokens_total", lambda v: v >= baseline + 48)
    assert _wait_value(prometheus, "parallama_slots_busy", lambda v: v == 0) == 0
    info = _query(prometheus, "parallama_model_info")
    assert info and info[0]["metric"]["model"] == SERVED_NAME  # type: ignore[index]
    assert info[0]["metric"]["num_parallel"] == "2"  # type: ignore[index]
    assert _query(prometheus, 'parallama_memory_measured_bytes{component="kv_cache"}')
    assert _query(prometheus, "parallama_gpu_utilization_ratio") == []  # no GPU here: absent, not zero
    up = _query(prometheus, 'up{job="parallama"}')
    assert up and up[0]["value"][1] == "1"  # type: ignore[index]
