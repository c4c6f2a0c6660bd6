"""RBAC: every API the operator calls is allowed, nothing is a wildcard."""

from __future__ import annotations

import re
from pathlib import Path

from parallama_operator.rbac import CLUSTER_RULES

SOURCE = Path(__file__).resolve().parents[2] / "operator" / "parallama_operator"


def allowed(group: str, resource: str, verb: str) -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in CLUSTER_RULES
    )


def test_no_wildcards_and_well_formed() -> None:
    for rule in CLUSTER_RULES:
        assert set(rule) == {"apiGroups", "resources", "verbs"}
        for values in rule.values():
            assert values and "*" not in values


def test_the_operator_may_do_what_it_does() -> None:
    assert allowed("parallama.dev", "modeldeployments", "watch")
    assert allowed("parallama.dev", "modeldeployments", "patch")  # kopf's annotations and finalizer
    assert allowed("parallama.dev", "modeldeployments/status", "patch")
    for group, resource in (
        ("apps", "deployments"),
        ("", "services"),
        ("policy", "poddisruptionbudgets"),
        ("monitoring.coreos.com", "servicemonitors"),
    ):
        for verb in ("get", "create", "patch"):
            assert allowed(group, resource, verb), (group, resource, verb)
    for resource in ("nodes", "pods"):
        assert allowed("", resource, "list") and allowed("", resource, "watch")
        assert not allowed("", resource, "patch")
    assert allowed("", "events", "create")
    assert allowed("apiextensions.k8s.io", "customresourcedefinitions", "watch")
    assert not any("kopf.dev" in r["apiGroups"] for r in CLUSTER_RULES)  # standalone: no peering


def test_every_path_the_client_uses_is_covered() -> None:
    text = (SOURCE / "kube.py").read_text()
    for group, resource in re.findall(r'"/apis?/(?:([a-z.]+)/)?v\w+/namespaces/\{ns\}/(\w+)"', text):
        assert allowed(group if group not in ("",) else "", resource, "get"), (group, resource)
