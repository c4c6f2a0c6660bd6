"""The CRD: generated from the pydantic models, structural, and its CEL rules mean what they say."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from parallama_operator.crd import crd_manifest, crd_yaml
from parallama_operator.resources import ModelDeploymentSpec, name_error
from pydantic import ValidationError
from schema_tools import admit

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "modeldeployments.parallama.dev.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    result: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def md(spec: dict[str, Any], name: str = "m") -> dict[str, Any]:
    return {
        "apiVersion": "parallama.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


METADATA = {
    "architecture": "llama",
    "sizeBytes": 4_000_000_000,
    "blockCount": 32,
    "embeddingLength": 4096,
    "headCount": 32,
    "contextLength": 8192,
}


def test_committed_yaml_is_what_the_models_generate() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "run: python -m parallama_operator.crd > " + str(CRD_FILE)


def test_crd_is_a_valid_apiextensions_object() -> None:
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), "1.33", strict=True)


def test_identity_subresources_and_columns() -> None:
    crd = crd_manifest()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "modeldeployments.parallama.dev"
    assert spec["group"] == "parallama.dev"
    assert spec["names"]["kind"] == "ModelDeployment"
    assert spec["names"]["plural"] == "modeldeployments"
    assert "mdep" in spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert version["subresources"]["scale"]["statusReplicasPath"] == ".status.replicas"
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Model", "Task", "Slots", "GPUs", "Ready", "Phase", "Age"]
    task = next(c for c in version["additionalPrinterColumns"] if c["name"] == "Task")
    assert task["jsonPath"] == ".status.plan.task"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found += _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _walk(value, f"{path}[{i}]")
    return found


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    """No refs or unions, a type on every schema node, no additionalProperties beside properties."""
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "oneOf" not in node, path
        if path.endswith("/properties") or "x-kubernetes-validations" in path.rsplit("/", 1)[-1]:
            continue
        if "properties" in node or "items" in node or "enum" in node:
            assert "type" in node, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path


def test_defaults_are_applied(schema: dict[str, Any]) -> None:
    obj, errors = admit(schema, md({"model": {"uri": "https://example.com/m.gguf"}}))
    assert errors == []
    spec = obj["spec"]
    assert spec["numCtx"] == 4096
    assert spec["headroom"] == 0.2
    assert spec["engine"] == "parallama"
    assert spec["gpu"]["resourceName"] == "nvidia.com/gpu"
    assert spec["parallelism"]["minParallel"] == 1
    assert spec["service"] == {"type": "ClusterIP", "port": 11434}
    assert spec["swaFull"] is False  # llama-server's default: window-sized sliding-window caches
    assert ModelDeploymentSpec.model_validate(obj["spec"]).swa_full is False


VALID = [
    {"model": {"uri": "https://example.com/m.gguf"}},
    {"model": {"uri": "http://models.local/m.gguf", "sha256": "a" * 64}},
    {"model": {"uri": "pvc://models/llama/m.gguf", "metadata": METADATA}},
    {"model": {"uri": "file:///models/m.gguf", "metadata": METADATA}},
    {
        "model": {"uri": "https://x/m.gguf"},
        "parallelism": {"minParallel": 2, "maxParallel": 8, "numParallel": 4},
    },
    {"model": {"uri": "https://x/m.gguf"}, "parallelism": {"numParallel": 3}},
    {"model": {"uri": "https://x/m.gguf"}, "headroom": 0.0},
    {"model": {"uri": "https://x/m.gguf"}, "headroom": 0.9},
    {"model": {"uri": "https://x/m.gguf"}, "kvCacheType": "q8_0", "flashAttention": True},
    {
        "model": {"uri": "https://x/m.gguf"},
        "storage": {"volume": "persistentVolumeClaim", "claimName": "cache"},
    },
    {"model": {"uri": "pvc://models/embed/m.gguf", "metadata": {**METADATA, "poolingType": "mean"}}},
]

INVALID = [
    ({"model": {"uri": "s3://bucket/m.gguf"}}, "model.uri must start with"),
    ({"model": {"uri": "pvc://models/m.gguf"}}, "need model.metadata"),
    ({"model": {"uri": "pvc://Bad_Claim/m.gguf", "metadata": METADATA}}, "pvc://<claim>/<path"),
    ({"model": {"uri": "pvc://claimonly", "metadata": METADATA}}, "pvc://<claim>/<path"),
    (
        {"model": {"uri": "https://x/m.gguf"}, "parallelism": {"minParallel": 5, "maxParallel": 2}},
        "minParallel",
    ),
    (
        {"model": {"uri": "https://x/m.gguf"}, "parallelism": {"numParallel": 9, "maxParallel": 8}},
        "numParallel",
    ),
    (
        {"model": {"uri": "https://x/m.gguf"}, "parallelism": {"numParallel": 1, "minParallel": 2}},
        "numParallel",
    ),
    ({"model": {"uri": "https://x/m.gguf"}, "headroom": 0.95}, "headroom"),
    ({"model": {"uri": "https://x/m.gguf"}, "headroom": -0.1}, "headroom"),
    (
        {"model": {"uri": "https://x/m.gguf"}, "kvCacheType": "q4_0", "flashAttention": False},
        "flashAttention",
    ),
    ({"model": {"uri": "https://x/m.gguf"}, "storage": {"volume": "persistentVolumeClaim"}}, "claimName"),
    ({"model": {"uri": "https://x/m.gguf"}, "kvCacheType": "q2"}, "kvCacheType"),
    ({"model": {"uri": "https://x/m.gguf", "sha256": "xyz"}}, "sha256"),
    ({"model": {"uri": "http://models.local/m.gguf"}}, "http:// model needs model.sha256"),
    (
        {"model": {"uri": "pvc://models/m.gguf", "metadata": {**METADATA, "poolingType": "avg"}}},
        "poolingType",
    ),
]


@pytest.mark.parametrize("spec", VALID)
def test_valid_specs_pass_the_api_server_and_the_operator(
    schema: dict[str, Any], spec: dict[str, Any]
) -> None:
    obj, errors = admit(schema, md(spec))
    assert errors == []
    ModelDeploymentSpec.model_validate(obj["spec"])


@pytest.mark.parametrize(("spec", "fragment"), INVALID)
def test_invalid_specs_fail_both(schema: dict[str, Any], spec: dict[str, Any], fragment: str) -> None:
    """The API server's CEL/schema and the operator's own validation refuse the same specs."""
    _obj, errors = admit(schema, md(spec))
    assert errors, "the API server would accept this"
    assert any(fragment in e for e in errors), errors
    with pytest.raises(ValidationError):
        ModelDeploymentSpec.model_validate(spec)


def test_long_names_are_refused(schema: dict[str, Any]) -> None:
    _obj, errors = admit(schema, md({"model": {"uri": "https://x/m.gguf"}}, name="x" * 64))
    assert any("63 characters" in e for e in errors)
    _obj, errors = admit(schema, md({"model": {"uri": "https://x/m.gguf"}}, name="x" * 63))
    assert errors == []


@pytest.mark.parametrize("name", ["chat.v2", "1chat", "Chat", "chat-", "a_b"])
def test_names_that_cannot_name_a_service_are_refused_by_both(schema: dict[str, Any], name: str) -> None:
    _obj, errors = admit(schema, md({"model": {"uri": "https://x/m.gguf"}}, name=name))
    assert any("DNS-1035" in e for e in errors), errors
    message = name_error(name)
    assert message is not None and "DNS-1035" in message and name in message


@pytest.mark.parametrize("name", ["chat", "chat-v2", "a", "llama-3-8b"])
def test_service_names_are_admitted_by_both(schema: dict[str, Any], name: str) -> None:
    _obj, errors = admit(schema, md({"model": {"uri": "https://x/m.gguf"}}, name=name))
    assert errors == [] and name_error(name) is None


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_admitted(schema: dict[str, Any], path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    defaulted, errors = admit(schema, copy.deepcopy(obj))
    assert errors == []
    ModelDeploymentSpec.model_validate(defaulted["spec"])
