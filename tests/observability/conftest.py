"""Real processes for the observability suite: a running parallama runtime, the operator's metrics
registry served over HTTP, and /usr/bin/prometheus scraping both (loopback only, temp dirs, free ports)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from obs_support import (
    OPERATOR_EXPORTER,
    OPERATOR_JOB,
    OPERATOR_NAMESPACE,
    PROMETHEUS,
    REPO,
    RULES,
    RUNTIME_JOB,
    RUNTIME_NAMESPACE,
    RUNTIME_START,
    OperatorExporter,
    Prometheus,
    Runtime,
    free_port,
    http_get,
    require_serve,
)


@pytest.fixture(scope="session")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """`parallama serve` with the built-in demo model, 2 slots of 256 tokens, on a free loopback port."""
    require_serve()
    port = free_port()
    log = tmp_path_factory.mktemp("runtime") / "runtime.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "PARALLAMA_"))}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", RUNTIME_START.format(port=port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    server = Runtime(f"http://127.0.0.1:{port}", port, process, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the runtime exited with {process.returncode} before /readyz:\n{server.log_tail()}"
                )
            try:
                if http_get(f"{server.url}/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the runtime was not ready within 120 s:\n{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def operator_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorExporter]:
    """The operator's real collectors (parallama_operator.metrics, default registry) served over HTTP
    from a child process, with a few synthetic observations of the kind a reconcile records (there is
    no cluster here). A child process keeps those observations out of this test process's registry."""
    port = free_port()
    script = OPERATOR_EXPORTER.format(port=port, namespace=RUNTIME_NAMESPACE, name=RUNTIME_JOB)
    log = tmp_path_factory.mktemp("operator") / "exporter.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", script], stdout=sink, stderr=subprocess.STDOUT, cwd=REPO
        )
    exporter = OperatorExporter(f"http://127.0.0.1:{port}", port)
    try:
        _wait_until_answering(process, f"{exporter.url}/metrics", log, "the operator metrics exporter")
        yield exporter
    finally:
        _terminate(process, timeout=10)


@pytest.fixture(scope="session")
def prometheus(
    runtime: Runtime, operator_exporter: OperatorExporter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """Real Prometheus, scrape and rule evaluation every second, with the chart's alert rules loaded."""
    if not Path(PROMETHEUS).exists() and shutil.which("prometheus") is None:
        pytest.fail(f"{PROMETHEUS} is missing (Debian package `prometheus`)")
    binary = PROMETHEUS if Path(PROMETHEUS).exists() else str(shutil.which("prometheus"))
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": RUNTIME_JOB,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{runtime.port}"], "labels": {"namespace": RUNTIME_NAMESPACE}}
                ],
            },
            {
                "job_name": OPERATOR_JOB,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{operator_exporter.port}"],
                        "labels": {"namespace": OPERATOR_NAMESPACE},
                    }
                ],
            },
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_until_answering(process, f"{server.url}/-/ready", log, "prometheus")
        yield server
    finally:
        _terminate(process, timeout=15)


def _wait_until_answering(process: subprocess.Popen[bytes], url: str, log: Path, what: str) -> None:
    """Poll ``url`` until it answers 200; fail with the process's log if it exits or takes 30 s."""
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if http_get(url, timeout=1)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer within 30 s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def _terminate(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
