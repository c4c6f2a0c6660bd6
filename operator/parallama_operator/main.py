"""``parallama operator``: run the operator in this process (cli.py calls these two functions).

Equivalent to ``kopf run -m parallama_operator --standalone --all-namespaces`` plus the metrics
server; kept here so the CLI owns no kopf knowledge.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: the whole cluster",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("PARALLAMA_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="kopf liveness endpoint URL (empty to disable)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("PARALLAMA_OPERATOR_METRICS_PORT", "9090")),
        help="port of the Prometheus metrics endpoint (0 to disable)",
    )
    parser.add_argument(
        "--metrics-address",
        default=os.environ.get("PARALLAMA_OPERATOR_METRICS_ADDRESS", "0.0.0.0"),
        help="address the metrics endpoint binds (default 0.0.0.0: Prometheus scrapes the pod IP;"
        " 127.0.0.1 keeps it local)",
    )
    parser.add_argument(
        "--model-url-allow",
        default=None,
        help="comma list of host globs whose model headers the operator may fetch"
        " (env PARALLAMA_MODEL_URL_ALLOW; empty: any host)",
    )
    parser.add_argument(
        "--runtime-image",
        default=None,
        help="default runtime image for ModelDeployments without spec.image (env PARALLAMA_RUNTIME_IMAGE)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    from . import handlers as _handlers  # registers the handlers with kopf's default registry

    del _handlers
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.runtime_image:
        os.environ["PARALLAMA_RUNTIME_IMAGE"] = args.runtime_image
    if args.model_url_allow is not None:
        os.environ["PARALLAMA_MODEL_URL_ALLOW"] = args.model_url_allow
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address)
    namespaces = list(args.namespace)
    try:
        asyncio.run(
            kopf.operator(
                standalone=True,
                clusterwide=not namespaces,
                namespaces=namespaces,
                liveness_endpoint=args.liveness or None,
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0
