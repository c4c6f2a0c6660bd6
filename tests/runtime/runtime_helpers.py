"""Helpers shared by the runtime tests (imported as a plain module: tests/ has no packages)."""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parallama_runtime import serve

SERVED_NAME = "tiny"


def have_llama() -> bool:
    """llama-cpp-python is importable (the suites that need it skip without it)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


def settings_for(model: Path, *extra: str, env: dict[str, str] | None = None) -> serve.ServeSettings:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args([str(model), "--host", "127.0.0.1", "--port", "0", "--threads", "2", *extra])
    return serve.resolve_settings(args, env or {})


def scrape(url: str) -> dict[str, float]:
    """The runtime's /metrics as {'name{labels}': value} (labels as printed)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^(\S+)\s+(\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def post_json(url: str, payload: dict[str, Any], timeout: float = 60) -> tuple[int, dict[str, Any]]:
    """POST a JSON body; the status and the JSON answer, errors included (no client in between)."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)
