"""Manifest builders: the runtime's env contract, GPU requests, scheduling, hardening, validity."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from parallama_operator.builders import (
    ASSUMED_LOAD_BYTES_PER_SECOND,
    DOWNLOAD_SCRIPT,
    PLAN_HASH_ANNOTATION,
    Owner,
    build_all,
    build_deployment,
    build_pdb,
    build_service,
    build_service_monitor,
    model_path,
    startup_failure_threshold,
)
from parallama_operator.planning import plan_status
from parallama_operator.resources import ModelDeploymentSpec, PlanStatus
from parallama_runtime.planning.model_info import model_info_from_metadata
from parallama_runtime.planning.planner import Node, PlanRequest, make_plan
from parallama_runtime.planning.presets import PRESETS

K8S_VERSION = "1.33"
OWNER = Owner(name="chat", namespace="ai", uid="0b6a3e0e-1111-2222-3333-444455556666")
METADATA = {k: v for k, v in PRESETS["llama-3.1-8b"].items() if k != "name"}
GiB = 1024**3


def spec_of(**fields: Any) -> ModelDeploymentSpec:
    raw: dict[str, Any] = {"model": {"uri": "https://models.example/llama-8b-q4.gguf", "metadata": METADATA}}
    raw.update(fields)
    return ModelDeploymentSpec.model_validate(raw)


def plan_for(spec: ModelDeploymentSpec, nodes: list[Node]) -> PlanStatus:
    model = model_info_from_metadata(METADATA)
    request = PlanRequest(
        num_ctx=spec.num_ctx,
        num_parallel=spec.parallelism.num_parallel,
        gpus_per_replica=spec.gpu.count,
        profile=spec.parallelism.profile.value,
    )
    return plan_status(make_plan(model, nodes, request), spec)


L4 = Node(name="l4-a", product="NVIDIA-L4", gpu_count=1, gpu_memory_bytes=23034 * 1024**2)
L20 = Node(name="l20-a", product="NVIDIA-L20", gpu_count=8, gpu_memory_bytes=46068 * 1024**2)


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"]}


def test_env_contract_follows_the_plan() -> None:
    spec = spec_of(numCtx=8192, kvCacheType="q8_0")
    plan = plan_for(spec, [L4])
    env = env_of(build_deployment(OWNER, spec, plan))
    assert env["OLLAMA_NUM_PARALLEL"] == str(plan.num_parallel)
    assert env["OLLAMA_CONTEXT_LENGTH"] == "8192"
    assert env["OLLAMA_KV_CACHE_TYPE"] == plan.kv_cache_type
    assert env["OLLAMA_FLASH_ATTENTION"] == "1"
    assert env["PARALLAMA_GPU_LAYERS"] == "-1"
    assert env["PARALLAMA_MODEL"] == "/models/llama-8b-q4.gguf"
    assert "PARALLAMA_TENSOR_SPLIT" not in env  # one GPU: nothing to split, and no empty value
    assert env["PARALLAMA_SWA_FULL"] == "0"


def test_swa_full_reaches_the_pods() -> None:
    spec = spec_of(swaFull=True)
    env = env_of(build_deployment(OWNER, spec, plan_for(spec, [L4])))
    assert env["PARALLAMA_SWA_FULL"] == "1"


def test_multi_gpu_replica_gets_limits_split_and_product() -> None:
    spec = spec_of(gpu={"count": 4})
    plan = plan_for(spec, [L4, L20])
    assert plan.gpus_per_replica == 4
    deployment = build_deployment(OWNER, spec, plan)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L20"
    split = env_of(deployment)["PARALLAMA_TENSOR_SPLIT"].split(",")
    assert len(split) == 4 and abs(sum(float(x) for x in split) - 1) < 1e-3


def test_user_resources_and_selectors_are_kept() -> None:
    spec = spec_of(
        resources={"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"memory": "24Gi"}},
        nodeSelector={"pool": "gpu"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        gpu={"resourceName": "nvidia.com/mig-3g.40gb"},
    )
    plan = plan_for(spec, [L4])
    pod = build_deployment(OWNER, spec, plan)["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "16Gi"}
    assert resources["limits"] == {"memory": "24Gi", "nvidia.com/mig-3g.40gb": "1"}
    assert pod["nodeSelector"] == {"pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-L4"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "nvidia.com/mig-3g.40gb", "operator": "Exists", "effect": "NoSchedule"},
    ]


def test_gpu_pods_tolerate_the_gpu_taint_unless_told_otherwise() -> None:
    spec = spec_of()
    pod = build_deployment(OWNER, spec, plan_for(spec, [L4]))["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    own = spec_of(
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Equal", "value": "l4", "effect": "NoSchedule"}]
    )
    pod = build_deployment(OWNER, own, plan_for(own, [L4]))["spec"]["template"]["spec"]
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "l4", "effect": "NoSchedule"}
    ]


def test_pods_are_hardened() -> None:
    spec = spec_of()
    pod = build_deployment(OWNER, spec, plan_for(spec, [L4]))["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod["initContainers"]:
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}


def test_probes_and_startup_budget_scale_with_the_model() -> None:
    spec = spec_of()
    plan = plan_for(spec, [L4])
    container = build_deployment(OWNER, spec, plan)["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= plan.memory.weights_bytes / ASSUMED_LOAD_BYTES_PER_SECOND
    assert startup_failure_threshold(200 * 10**9) > 5 * startup_failure_threshold(2 * 10**9)


def test_download_init_container_verifies_sha256() -> None:
    digest = "ab" * 32
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {"uri": "https://models.example/x.gguf", "sha256": digest},
            "storage": {"sizeLimit": "10Gi"},
        }
    )
    plan = plan_for(spec_of(), [L4])
    pod = build_deployment(OWNER, spec, plan)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["sh", "-c", DOWNLOAD_SCRIPT]
    assert "sha256sum -c" in DOWNLOAD_SCRIPT
    values = {e["name"]: e.get("value") for e in init["env"]}
    assert values["MODEL_URI"] == "https://models.example/x.gguf" and values["MODEL_SHA256"] == digest
    assert values["MODEL_PATH"] == "/models/x.gguf"
    # each pod downloads to its own partial file and renames it into place
    assert (
        '"$MODEL_PATH.part.$POD_NAME"' in DOWNLOAD_SCRIPT and 'mv -f "$part" "$MODEL_PATH"' in DOWNLOAD_SCRIPT
    )
    volume = next(v for v in pod["volumes"] if v["name"].startswith("model-"))
    assert volume == {"name": "model-cache", "emptyDir": {"sizeLimit": "10Gi"}}


def test_download_script_holds_no_user_string() -> None:
    """A URI built to break out of shell quoting stays data: the script is a constant that only
    expands "$MODEL_URI" inside double quotes."""
    uri = "https://evil.example/x.gguf';touch /tmp/pwned;'$(id)`id`\"; echo"
    spec = ModelDeploymentSpec.model_validate({"model": {"uri": uri}})
    pod = build_deployment(OWNER, spec, plan_for(spec_of(), [L4]))["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["sh", "-c", DOWNLOAD_SCRIPT]
    assert all("evil" not in part and "pwned" not in part for part in init["command"])
    assert {"name": "MODEL_URI", "value": uri} in init["env"]
    assert "MODEL_SHA256" not in {e["name"] for e in init["env"]}  # omitted, never an empty value


def test_download_script_runs_with_a_hostile_uri(tmp_path: Path) -> None:
    """Run the real script with sh and a stand-in curl: the URI reaches curl as one argument and
    nothing in it is executed; the download lands through the pod's own partial file."""
    pwned = tmp_path / "pwned"
    uri = f"https://evil.example/x.gguf';touch {pwned};'$(touch {pwned})`touch {pwned}`"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_curl = bin_dir / "curl"
    # writes its last argument (the URL) to the -o file and logs the argv
    fake_curl.write_text(
        '#!/bin/sh\nout=""\n'
        'while [ $# -gt 0 ]; do case "$1" in -o) out="$2"; shift;; esac; last="$1"; shift; done\n'
        f'printf "%s" "$last" > "$out"\nprintf "%s" "$last" > {tmp_path}/curl-url\n'
    )
    fake_curl.chmod(0o755)
    target = tmp_path / "models" / "x.gguf"
    target.parent.mkdir()
    digest = hashlib.sha256(uri.encode()).hexdigest()
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MODEL_URI": uri,
        "MODEL_PATH": str(target),
        "MODEL_SHA256": digest,
        "POD_NAME": "chat-abc",
    }
    subprocess.run(["sh", "-c", DOWNLOAD_SCRIPT], env=env, check=True, capture_output=True)
    assert not pwned.exists()
    assert (tmp_path / "curl-url").read_text() == uri
    assert target.read_text() == uri and not list(target.parent.glob("*.part.*"))
    # a wrong digest: refused, and nothing is left at the target
    target.unlink()
    failed = subprocess.run(
        ["sh", "-c", DOWNLOAD_SCRIPT], env={**env, "MODEL_SHA256": "0" * 64}, capture_output=True
    )
    assert failed.returncode != 0 and not target.exists() and not pwned.exists()


def test_no_empty_env_values() -> None:
    """The API server drops an empty env value: emitting one makes every comparison differ."""
    for raw in (
        {"model": {"uri": "https://m.example/a.gguf"}},
        {"model": {"uri": "https://m.example/a.gguf"}, "engine": "ollama"},
    ):
        spec = ModelDeploymentSpec.model_validate(raw)
        pod = build_deployment(OWNER, spec, plan_for(spec_of(), [L4]))["spec"]["template"]["spec"]
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            for item in container.get("env", []):
                assert item.get("value") != "", item


def test_pvc_model_is_mounted_read_only_with_sub_path() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {"model": {"uri": "pvc://models/deepseek/r1/model.gguf", "metadata": METADATA}}
    )
    pod = build_deployment(OWNER, spec, plan_for(spec, [L4]))["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    volume = next(v for v in pod["volumes"] if v["name"].startswith("model-"))
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"].startswith("model-"))
    assert mount["subPath"] == "deepseek/r1" and mount["readOnly"] is True
    assert model_path(spec) == "/models/model.gguf"


def test_ollama_engine_uses_the_official_image_and_same_values() -> None:
    spec = spec_of(engine="ollama")
    plan = plan_for(spec, [L4])
    container = build_deployment(OWNER, spec, plan)["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("docker.io/ollama/ollama:")
    assert env_of(build_deployment(OWNER, spec, plan))["OLLAMA_NUM_PARALLEL"] == str(plan.num_parallel)
    assert container["readinessProbe"] != {"httpGet": {"path": "/readyz", "port": "http"}}


def test_children_are_owned_and_selected_by_stable_labels() -> None:
    spec = spec_of(replicas=3, monitoring={"serviceMonitor": True})
    plan = plan_for(spec, [L4])
    children = build_all(OWNER, spec, plan, service_monitor_available=True)
    assert [c["kind"] for c in children] == ["Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget"]
    for child in children:
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == OWNER.uid and ref["controller"] is True and ref["kind"] == "ModelDeployment"
        assert child["metadata"]["namespace"] == "ai"
    deployment = children[0]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert children[1]["spec"]["selector"] == selector
    assert deployment["spec"]["template"]["metadata"]["annotations"][PLAN_HASH_ANNOTATION] == plan.hash


def test_optional_children() -> None:
    spec = spec_of(monitoring={"serviceMonitor": True})
    plan = plan_for(spec, [L4])
    kinds = [c["kind"] for c in build_all(OWNER, spec, plan, service_monitor_available=False)]
    assert kinds == ["Deployment", "Service"]  # no CRD, no ServiceMonitor; one replica, no PDB


def _manifests() -> list[dict[str, Any]]:
    specs = [
        spec_of(),
        spec_of(replicas=2, engine="ollama", service={"type": "LoadBalancer", "port": 8080}),
        spec_of(
            gpu={"count": 8},
            affinity={"nodeAffinity": {}},
            storage={"volume": "persistentVolumeClaim", "claimName": "cache"},
        ),
        ModelDeploymentSpec.model_validate({"model": {"uri": "pvc://m/a/b.gguf", "metadata": METADATA}}),
        ModelDeploymentSpec.model_validate({"model": {"uri": "file:///opt/m.gguf", "metadata": METADATA}}),
    ]
    out = []
    for spec in specs:
        plan = plan_for(spec, [L4, L20])
        out += [build_deployment(OWNER, spec, plan), build_service(OWNER, spec), build_pdb(OWNER)]
    return out


@pytest.mark.parametrize("manifest", _manifests(), ids=lambda m: m["kind"])
def test_manifests_validate_strictly(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_service_monitor_shape() -> None:
    monitor = build_service_monitor(OWNER, spec_of(monitoring={"serviceMonitor": True, "interval": "15s"}))
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "chat"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ai"]}


def test_unfitting_plan_has_no_gpu_selector() -> None:
    spec = spec_of()
    plan = plan_for(spec, [])  # no nodes at all
    assert not plan.fits
    pod = build_deployment(OWNER, spec, plan)["spec"]["template"]["spec"]
    assert "nvidia.com/gpu.product" not in pod.get("nodeSelector", {})


def test_default_pull_policy_applies_only_to_the_default_image() -> None:
    def policy(spec: ModelDeploymentSpec) -> str | None:
        deployment = build_deployment(
            OWNER,
            spec,
            plan_for(spec, [L4]),
            default_image="registry.local/rt:1",
            default_pull_policy="Always",
        )
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        return container.get("imagePullPolicy")

    assert policy(spec_of()) == "Always"
    assert policy(spec_of(image="mirror.local/custom:2")) is None
    assert policy(spec_of(image="mirror.local/custom:2", imagePullPolicy="Never")) == "Never"
