"""spec.autoscaling in the CRD (defaults, schema, CEL) and in the operator's models, which must
refuse the same specs; status.autoscaling's shape; the HPA and KEDA examples on the scale subresource."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from parallama_operator.crd import crd_manifest
from parallama_operator.resources import AutoscalingStatus, ModelDeploymentSpec, ModelDeploymentStatus
from pydantic import ValidationError
from schema_tools import admit
from test_operator_crd import CRD_FILE, md

ROOT = Path(__file__).resolve().parents[2]
SCALING = ROOT / "examples" / "scaling"
URI = {"uri": "https://x/m.gguf"}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    result: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def test_autoscaling_is_off_by_default_with_the_documented_defaults(schema: dict[str, Any]) -> None:
    obj, errors = admit(schema, md({"model": URI}))
    assert errors == []
    assert obj["spec"]["autoscaling"] == {
        "enabled": False,
        "minReplicas": 1,
        "targetUtilization": 0.8,
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 300,
    }
    parsed = ModelDeploymentSpec.model_validate(obj["spec"]).autoscaling
    assert ModelDeploymentSpec.model_validate({"model": URI}).autoscaling == parsed
    assert not parsed.enabled and parsed.max_replicas is None


VALID = [
    {"enabled": True, "maxReplicas": 4},
    {"enabled": True, "minReplicas": 3, "maxReplicas": 3, "targetUtilization": 1.0},
    {"enabled": True, "maxReplicas": 10, "targetUtilization": 0.05, "scaleUpStabilizationSeconds": 60},
    {"enabled": False, "minReplicas": 2},  # off: no maximum needed
]

INVALID = [
    ({"enabled": True}, "maxReplicas is required"),
    ({"enabled": True, "minReplicas": 5, "maxReplicas": 2}, "minReplicas must not exceed maxReplicas"),
    ({"enabled": True, "maxReplicas": 4, "targetUtilization": 1.5}, "targetUtilization"),
    ({"enabled": True, "maxReplicas": 4, "targetUtilization": 0.0}, "targetUtilization"),
    ({"enabled": True, "minReplicas": 0, "maxReplicas": 4}, "minReplicas"),
    (
        {"enabled": True, "maxReplicas": 4, "scaleDownStabilizationSeconds": -1},
        "scaleDownStabilizationSeconds",
    ),
    ({"enabled": True, "maxReplicas": 4, "scaleUpStabilizationSeconds": 7200}, "scaleUpStabilizationSeconds"),
]


@pytest.mark.parametrize("autoscaling", VALID)
def test_valid_autoscaling_passes_both(schema: dict[str, Any], autoscaling: dict[str, Any]) -> None:
    obj, errors = admit(schema, md({"model": URI, "autoscaling": autoscaling}))
    assert errors == []
    ModelDeploymentSpec.model_validate(obj["spec"])


@pytest.mark.parametrize(("autoscaling", "fragment"), INVALID)
def test_invalid_autoscaling_fails_both(
    schema: dict[str, Any], autoscaling: dict[str, Any], fragment: str
) -> None:
    _obj, errors = admit(schema, md({"model": URI, "autoscaling": autoscaling}))
    assert any(fragment in e for e in errors), errors
    with pytest.raises(ValidationError, match=fragment.split(" ")[0]):
        ModelDeploymentSpec.model_validate({"model": URI, "autoscaling": autoscaling})


def test_the_ollama_engine_cannot_autoscale(schema: dict[str, Any]) -> None:
    """Ollama exports no slot gauges: the autoscaler would see every replica missing forever."""
    spec = {"model": URI, "engine": "ollama", "autoscaling": {"enabled": True, "maxReplicas": 2}}
    _obj, errors = admit(schema, md(spec))
    assert any("ollama engine exports none" in e for e in errors), errors
    with pytest.raises(ValidationError, match="ollama engine exports none"):
        ModelDeploymentSpec.model_validate(spec)
    _obj, errors = admit(schema, md({**spec, "autoscaling": {"enabled": False}}))
    assert errors == []


def test_status_autoscaling_fields(schema: dict[str, Any]) -> None:
    status = AutoscalingStatus.model_validate(
        {
            "observed": {"busy": 8, "queued": 3, "slotsPerReplica": 4, "reporting": 2, "missing": 1},
            "desired": 4,
            "current": 2,
            "limitedBy": "capacity",
            "capacity": 2,
            "closestNode": "1 x NVIDIA-T4 (15.0 GiB)",
            "shortfallBytes": 123,
            "message": "...",
            "lastScaleTime": "2024-01-01T00:00:00Z",
        }
    )
    full = ModelDeploymentStatus(autoscaling=status).model_dump(mode="json", by_alias=True, exclude_none=True)
    obj, errors = admit(schema, {**md({"model": URI}), "status": full})
    assert errors == []
    assert obj["status"]["autoscaling"]["limitedBy"] == "capacity"
    bad = {**full, "autoscaling": {**full["autoscaling"], "limitedBy": "budget"}}
    _obj, errors = admit(schema, {**md({"model": URI}), "status": bad})
    assert any("limitedBy" in e for e in errors)
    # a status without autoscaling does not grow an empty one (defaulting applies to status too)
    obj, _errors = admit(schema, {**md({"model": URI}), "status": {"phase": "Ready"}})
    assert "autoscaling" not in obj["status"]


def test_the_scale_subresource_is_what_hpa_and_keda_target() -> None:
    (version,) = crd_manifest()["spec"]["versions"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    for path in sorted(SCALING.glob("*.yaml")):
        target = yaml.safe_load(path.read_text())["spec"]["scaleTargetRef"]
        assert target == {
            "apiVersion": "parallama.dev/v1alpha1",
            "kind": "ModelDeployment",
            "name": "llama-chat",
        }
    example = yaml.safe_load((ROOT / "examples" / "chat-llama-8b-1gpu.yaml").read_text())
    assert example["metadata"]["name"] == "llama-chat"  # the ModelDeployment they scale


def test_the_hpa_example_is_a_valid_autoscaling_v2_object() -> None:
    kubernetes_validate.validate(yaml.safe_load((SCALING / "hpa.yaml").read_text()), "1.33", strict=True)
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "kubernetes-validate"),
            "--strict",
            "-k",
            "1.33.0",
            str(SCALING / "hpa.yaml"),
            str(CRD_FILE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_keda_example_divides_the_load_by_what_a_replica_should_carry() -> None:
    """KEDA's Prometheus scaler wants ceil(query / threshold) replicas: the query must be the whole
    deployment's busy + queued, the threshold slots x target (4 x 0.8 for the chat example)."""
    scaled = yaml.safe_load((SCALING / "keda-scaledobject.yaml").read_text())
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["minReplicaCount"] >= 1  # scale-to-zero needs a request-holding proxy
    (trigger,) = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    assert "parallama_slots_busy" in query and "parallama_queue_depth" in query
    assert float(trigger["metadata"]["threshold"]) == pytest.approx(4 * 0.8)
