"""Entry points: importing the package registers the handlers; `parallama operator` arguments."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

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
    for expected in ("configure", "gpu_nodes", "node_changed", "replanner", "pod_event", "deployment_event"):
        assert expected in ids, ids
    assert any(i.startswith("reconcile_handler") for i in ids)


def test_operator_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["-n", "ai", "-n", "ml", "--metrics-port", "0", "--liveness", ""])
    assert args.namespace == ["ai", "ml"] and args.metrics_port == 0 and args.liveness == ""
    defaults = parser.parse_args([])
    assert defaults.namespace == [] and defaults.liveness.endswith("/healthz")
