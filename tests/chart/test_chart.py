"""The Helm chart, rendered and linted by the real Helm v4 engine (helm-python-sdk, no binary needed).

Every rendered manifest is validated against the Kubernetes 1.33 OpenAPI schemas (kubernetes-validate,
strict: unknown fields fail); prometheus-operator kinds, which those schemas lack, get shape checks.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "parallama"
KUBE_VERSION = "1.33.0"
RELEASE = "demo"
NAMESPACE = "parallama-system"

Manifest = dict[str, Any]
Triple = tuple[str, str, str]

# Cluster-scoped resources the operator reads; everything else in its rules is namespaced.
CLUSTER_SCOPED = {("", "nodes"), ("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions")}
CRD_ONLY_KINDS = {"ServiceMonitor", "PrometheusRule"}

ALL_ON: dict[str, Any] = {
    "metrics": {"enabled": True, "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
    "dashboards": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "LLM"}},
}
NAMESPACED: dict[str, Any] = {"operator": {"scope": "namespace", "watchNamespaces": ["team-a", "team-b"]}}
CUSTOM: dict[str, Any] = {
    "operator": {
        "image": {"repository": "registry.example.com/ml/op", "tag": "1.2.3", "pullPolicy": "Always"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "extraArgs": ["--verbose"],
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
    },
    "runtime": {
        "image": {"repository": "registry.example.com/ml/rt", "tag": "9.9.9-cuda", "pullPolicy": "Never"}
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"create": False, "name": "preexisting"},
}
ALL_OFF: dict[str, Any] = {
    "crds": {"install": False},
    "rbac": {"create": False},
    "metrics": {"enabled": False, "serviceMonitor": {"enabled": True}},
    "prometheusRule": {"enabled": False},
    "dashboards": {"enabled": False},
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "all-on": ALL_ON,
    "namespaced": NAMESPACED,
    "custom": CUSTOM,
    "all-off": ALL_OFF,
}


def render(values: dict[str, Any] | None = None) -> list[Manifest]:
    """Every Kubernetes object the chart renders (NOTES.txt and empty documents left out)."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[Manifest], kind: str) -> Manifest:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def triples(rules: list[dict[str, Any]]) -> set[Triple]:
    """Rules as (apiGroup, resource, verb) permissions, so grouping and order do not matter."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def operator_container(objects: list[Manifest]) -> Manifest:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    container: Manifest = containers[0]
    return container


def env_of(container: Manifest) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def operator_args(container: Manifest) -> argparse.Namespace:
    """The container's arguments as the operator's own command line parses them."""
    try:
        from parallama_operator import main
    except ImportError as error:
        pytest.fail(f"parallama_operator.main is missing ({error}); the chart runs `parallama operator`")
    parser = argparse.ArgumentParser(prog="parallama operator", exit_on_error=False)
    main.add_arguments(parser)
    args, unknown = parser.parse_known_args([str(a) for a in container["args"]])
    assert unknown == [], f"`parallama operator` does not accept {unknown}"
    return args


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)


def cluster_rules() -> list[dict[str, list[str]]]:
    try:
        from parallama_operator.rbac import CLUSTER_RULES
    except ImportError as error:  # a clear failure, not a skip: the chart must track the operator
        pytest.fail(
            f"parallama_operator.rbac.CLUSTER_RULES missing ({error}); the chart RBAC is tested against it"
        )
    return list(CLUSTER_RULES)


# ---------------------------------------------------------------------------------------------- lint


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict_passes(name: str) -> None:
    report = helm.lint(
        CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "values",
    [
        {"operator": {"scope": "everywhere"}},
        {"operator": {"image": {"repository": "x", "tag": "latest", "pullPolicy": "Always"}}},
        {"runtime": {"image": {"repository": "x", "pullPolicy": "Sometimes"}}},
        {"operatr": {}},
        {"dashboards": {"enabled": "yes"}},
        {"operator": {"watchNamespaces": ["Not_A_Namespace"]}},
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(values))
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"], "lint must refuse values the schema rejects"


def test_chart_metadata() -> None:
    with helm.Chart.load(CHART) as chart:
        meta = chart.metadata
        assert meta["apiVersion"] == "v2" and meta["name"] == "parallama"
        assert meta["appVersion"]
        assert chart.schema is not None


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_validates_against_kubernetes_schemas(name: str) -> None:
    objects = render(VALUE_SETS[name])
    assert objects
    for obj in objects:
        assert obj["metadata"]["name"], obj
        if obj["kind"] in CRD_ONLY_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_validation_can_fail() -> None:
    """Guard: the validator really is strict (an unknown field in a rendered Deployment is refused)."""
    deployment = one(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


# ------------------------------------------------------------------------------------------ kinds


def kinds(objects: list[Manifest]) -> set[str]:
    return {obj["kind"] for obj in objects}


def test_default_kinds() -> None:
    objects = render()
    assert kinds(objects) == {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
    }
    for obj in objects:
        if obj["kind"] not in {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_all_toggles_on() -> None:
    objects = render(ALL_ON)
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds(objects)

    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in port_names
    container_ports = {p["name"]: p["containerPort"] for p in operator_container(objects)["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in container_ports
    assert (
        service["spec"]["selector"].items()
        <= one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )

    rule = one(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    rules_file = yaml.safe_load((CHART / "rules" / "parallama.rules.yaml").read_text())
    assert rule["spec"] == rules_file
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert item["alert"] and item["expr"]

    dashboard = one(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    shipped = json.loads(dashboard["data"]["parallama.json"])
    assert shipped == json.loads((CHART / "dashboards" / "parallama.json").read_text())


def test_all_toggles_off() -> None:
    objects = render(ALL_OFF)
    assert kinds(objects) == {"ServiceAccount", "Deployment"}


def test_service_account_not_created_uses_given_name() -> None:
    objects = render(CUSTOM)
    assert of_kind(objects, "ServiceAccount") == []
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "preexisting"
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "preexisting", "namespace": NAMESPACE}]


# ------------------------------------------------------------------------------------------- RBAC


@pytest.mark.parametrize("name", VALUE_SETS)
def test_no_wildcards_in_rbac(name: str) -> None:
    for obj in render(VALUE_SETS[name]):
        if obj["kind"] in {"ClusterRole", "Role"}:
            for rule in obj["rules"]:
                assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
                for field in ("apiGroups", "resources", "verbs"):
                    assert all("*" not in item for item in rule[field]), rule


def test_cluster_role_equals_operator_rules() -> None:
    objects = render()
    role = one(objects, "ClusterRole")
    assert of_kind(objects, "Role") == []
    assert triples(role["rules"]) == triples(cluster_rules())
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    account = one(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert (
        one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        == account["metadata"]["name"]
    )


def test_namespace_scope_splits_rules_into_roles() -> None:
    objects = render(NAMESPACED)
    expected = triples(cluster_rules())
    cluster_role = one(objects, "ClusterRole")
    cluster_part = triples(cluster_role["rules"])
    assert {(group, resource) for group, resource, _ in cluster_part} <= CLUSTER_SCOPED

    roles = of_kind(objects, "Role")
    bindings = of_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        namespaced_part = triples(role["rules"])
        assert not {(group, resource) for group, resource, _ in namespaced_part} & CLUSTER_SCOPED
        # the union is exactly the operator's rules: nothing missing, nothing extra
        assert cluster_part | namespaced_part == expected
        assert not cluster_part & namespaced_part
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE

    assert operator_args(operator_container(objects)).namespace == ["team-a", "team-b"]


def test_namespace_scope_defaults_to_release_namespace() -> None:
    objects = render({"operator": {"scope": "namespace"}})
    assert [r["metadata"]["namespace"] for r in of_kind(objects, "Role")] == [NAMESPACE]
    assert operator_args(operator_container(objects)).namespace == [NAMESPACE]


# ----------------------------------------------------------------------------- operator Deployment


def test_operator_deployment_defaults() -> None:
    objects = render()
    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
        defaults = chart.values
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    container = operator_container(objects)
    assert container["image"] == f"{defaults['operator']['image']['repository']}:{app_version}"
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}

    assert container["command"] == ["parallama", "operator"]
    args = operator_args(container)
    assert args.namespace == []  # cluster-wide
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    assert args.metrics_port == ports["metrics"] == 9090

    env = env_of(container)
    assert env["PARALLAMA_RUNTIME_IMAGE"] == f"{defaults['runtime']['image']['repository']}:{app_version}"
    assert env["PARALLAMA_RUNTIME_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert all(":latest" not in s for s in walk_strings(objects))


def test_custom_images_and_scheduling() -> None:
    objects = render(CUSTOM)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(objects)
    assert container["image"] == "registry.example.com/ml/op:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    env = env_of(container)
    assert env["PARALLAMA_RUNTIME_IMAGE"] == "registry.example.com/ml/rt:9.9.9-cuda"
    assert env["PARALLAMA_RUNTIME_IMAGE_PULL_POLICY"] == "Never"
    assert env["EXTRA"] == "1"
    assert operator_args(container).verbose is True
    assert container["resources"] == CUSTOM["operator"]["resources"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == CUSTOM["operator"]["tolerations"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_numeric_looking_tag_stays_a_string() -> None:
    objects = render(
        {"operator": {"image": {"repository": "r/op", "tag": "2.0", "pullPolicy": "IfNotPresent"}}}
    )
    assert operator_container(objects)["image"] == "r/op:2.0"


# ------------------------------------------------------------------------------------------- CRDs


def repo_crds() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.yaml"))}


def test_crd_files_in_chart_are_identical_to_repository_crds() -> None:
    source = repo_crds()
    assert "modeldeployments.parallama.dev.yaml" in source, (
        "crds/modeldeployments.parallama.dev.yaml is missing"
    )
    copies = {p.name: p.read_bytes() for p in sorted((CHART / "files" / "crds").glob("*.yaml"))}
    assert copies == source, (
        "charts/parallama/files/crds/ differs from crds/: cp crds/*.yaml charts/parallama/files/crds/"
    )


def test_rendered_crds_equal_repository_crds() -> None:
    expected = sorted(
        (yaml.safe_load(text) for text in repo_crds().values()), key=lambda crd: str(crd["metadata"]["name"])
    )
    for keep in (True, False):
        rendered = sorted(
            of_kind(render({"crds": {"keep": keep}}), "CustomResourceDefinition"),
            key=lambda crd: str(crd["metadata"]["name"]),
        )
        assert len(rendered) == len(expected)
        for crd, want in zip(rendered, expected, strict=True):
            annotations = crd["metadata"].get("annotations", {})
            if keep:
                assert annotations.pop("helm.sh/resource-policy") == "keep"
            else:
                assert "helm.sh/resource-policy" not in annotations
            if not annotations:
                crd["metadata"].pop("annotations", None)
            assert crd == want
    crd = one(render(), "CustomResourceDefinition")
    assert crd["spec"]["group"] == "parallama.dev"
    assert crd["spec"]["names"]["kind"] == "ModelDeployment"
    assert crd["spec"]["names"]["plural"] == "modeldeployments"
    assert "mdep" in crd["spec"]["names"]["shortNames"]
    assert [v["name"] for v in crd["spec"]["versions"]] == ["v1alpha1"]


# ------------------------------------------------------------------------------------------ NOTES


def test_notes_tell_what_to_do_next() -> None:
    text = notes()
    assert f"deployment/{RELEASE}-parallama" in text
    assert "ModelDeployment" in text and "kubectl get mdep" in text
    assert "set prometheusRule.enabled=true" in text
    text_on = notes({**ALL_ON, **NAMESPACED, "crds": {"install": False}})
    assert "PrometheusRule demo-parallama" in text_on
    assert "team-a,team-b" in text_on
    assert "kubectl apply -f crds/" in text_on
