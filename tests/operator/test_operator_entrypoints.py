"""Entry points: importing the package registers the handlers; `parallama operator` arguments."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from harness import Cluster, gfd_node
from parallama_operator.main import add_arguments

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import parallama_operator
from kopf._core.intents import registries
registry = registries.get_default_registry()
ids = sorted({h.id for h in registry._changing.get_all_handlers()}
             | {h.id for h in registry._spawning.get_all_handlers()}
             | {h.id for h in registry._watching.get_all_handlers()}
             | {h.id for h in registry._indexing.get_all_handlers()}
             | {h.id for h in registry._activities.get_all_handlers()})
print(" ".join(ids))
"""


def test_importing_the_package_registers_every_handler() -> None:
    """What `kopf run -m parallama_operator` relies on. The source folders go first on the path: an
    editable install made before the package had an __init__.py maps it as a namespace package."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "runtime")])}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    ids = out.stdout.split()
    expected_ids = (
        "configure",
        "gpu_nodes",
        "node_changed",
        "model_deployment_event",
        "pod_event",
        "deployment_event",
    )
    for expected in expected_ids:
        assert expected in ids, ids
    assert any(i.startswith("reconcile_handler") for i in ids)


def test_operator_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["-n", "ai", "-n", "ml", "--metrics-port", "0", "--liveness", ""])
    assert args.namespace == ["ai", "ml"] and args.metrics_port == 0 and args.liveness == ""
    defaults = parser.parse_args([])
    assert defaults.namespace == [] and defaults.liveness.endswith("/healthz")
    assert defaults.metrics_address == "0.0.0.0" and defaults.model_url_allow is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


RUN = (
    "import argparse, sys\n"
    "from parallama_operator import main\n"
    "parser = argparse.ArgumentParser()\n"
    "main.add_arguments(parser)\n"
    "sys.exit(main.run(parser.parse_args(sys.argv[1:])))\n"
)


async def test_parallama_operator_serves_metrics_liveness_and_stops_cleanly(
    cluster: Cluster, model: dict[str, str]
) -> None:
    """`parallama operator` as cli.py will call it, in its own process."""
    await cluster.add_node(gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034))
    metrics_port, liveness_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "runtime")])}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUN,
        "--metrics-port",
        str(metrics_port),
        "--liveness",
        f"http://127.0.0.1:{liveness_port}/healthz",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await cluster.create_md("chat", {"model": model})
        await cluster.wait_for(
            lambda: (cluster.md("chat").get("status") or {}).get("plan"),
            within=30,
            what="a plan from the subprocess operator",
        )
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{liveness_port}/healthz") as response:
                assert response.status == 200
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                text = await response.text()
        assert 'parallama_operator_reconcile_total{result="ok"} 1.0' in text
        assert "parallama_operator_reconcile_duration_seconds_bucket" in text
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, output.decode()[-3000:]
