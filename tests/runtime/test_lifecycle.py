"""``serve.run`` as a real process: demo model on first use, auto slots from the planner, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from parallama_runtime.termination import FailureReason, parse_failure

pytestmark = pytest.mark.llama

SCRIPT = (
    "import argparse, sys\n"
    "from parallama_runtime import serve\n"
    "parser = argparse.ArgumentParser()\n"
    "serve.add_arguments(parser)\n"
    "sys.exit(serve.run(parser.parse_args(sys.argv[1:])))\n"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_demo_model_auto_slots_and_sigterm(model_path: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "PARALLAMA_"))}
    env.update({"PARALLAMA_CACHE": str(tmp_path / "cache"), "OLLAMA_CONTEXT_LENGTH": "512"})
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "--port", str(port), "--threads", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                    ready = json.load(response)
                    break
            except OSError:
                time.sleep(0.2)
        assert ready is not None, "server never became ready"
        assert ready["slots"] == 4  # a 3M-parameter model: the planner's maximum fits in RAM
        with urllib.request.urlopen(url + "/metrics") as response:
            text = response.read().decode()
        assert 'num_ctx="512"' in text and 'num_parallel="4"' in text
        with urllib.request.urlopen(url + "/v1/models") as response:
            served = [model["id"] for model in json.load(response)["data"]]
        assert served == ["parallama-demo"], "the demo model is served under its plain name"
        assert list((tmp_path / "cache").glob("*.gguf")), "the demo model was not generated into the cache"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    log = output.decode()
    assert process.returncode == 0, log
    assert "auto parallelism" in log and "4 slots" in log
    assert "stopped" in log


def test_serve_refuses_bad_settings(tmp_path: Path) -> None:
    env = {**os.environ, "OLLAMA_KV_CACHE_TYPE": "q5_9"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"q5_9" in done.stderr
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "missing.gguf")], capture_output=True, timeout=60
    )
    assert done.returncode == 2 and b"does not exist" in done.stderr


def test_slots_that_cannot_be_allocated_leave_a_termination_message(model_path: Path, tmp_path: Path) -> None:
    """2 slots of 100M tokens need hundreds of GB of KV cache: llama.cpp's allocation fails, and the
    runtime says so where Kubernetes keeps a container's last words (the operator reads them)."""
    termination_log = tmp_path / "termination-log"
    termination_log.touch()  # the kubelet creates it in a pod
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "PARALLAMA_"))}
    env["PARALLAMA_TERMINATION_LOG"] = str(termination_log)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(model_path),
            "--parallel",
            "2",
            "--num-ctx",
            "100000000",
            "--port",
            str(_free_port()),
        ],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr.decode()[-2000:]
    failure = parse_failure(termination_log.read_text())
    assert failure is not None and failure.reason == FailureReason.GPU_OOM_LOAD, termination_log.read_text()
    assert (failure.slots, failure.num_ctx) == (2, 100_000_000)
