"""Node inventory: GPU Feature Discovery labels -> planner nodes (pure)."""

from __future__ import annotations

from harness import gfd_node
from parallama_operator.inventory import node_gpus, planner_nodes, requested_gpus, trim_node

MiB = 1024 * 1024


def test_gfd_labels_give_product_count_and_memory() -> None:
    gpus = node_gpus(gfd_node("a", "NVIDIA-L20", 8, 46068))
    assert gpus.usable
    assert (gpus.product, gpus.gpu_count, gpus.gpu_memory_bytes) == ("NVIDIA-L20", 8, 46068 * MiB)


def test_memory_falls_back_to_the_catalog() -> None:
    gpus = node_gpus(gfd_node("a", "NVIDIA-A100-SXM4-80GB", 4, None))
    assert gpus.usable and gpus.gpu_memory_bytes == 81920 * MiB
    unknown = node_gpus(gfd_node("b", "NVIDIA-Imaginary-9000", 4, None))
    assert not unknown.usable and "unknown memory" in (unknown.excluded or "")


def test_allocatable_wins_over_the_count_label() -> None:
    node = gfd_node("a", "NVIDIA-L4", 4, 23034)
    node["status"]["allocatable"]["nvidia.com/gpu"] = "2"  # two are taken by the device plugin's health check
    assert node_gpus(node).gpu_count == 2
    node["status"]["allocatable"]["nvidia.com/gpu"] = "0"
    assert not node_gpus(node).usable


def test_count_label_is_a_fallback_when_no_resource_is_advertised() -> None:
    node = gfd_node("a", "NVIDIA-L4", 4, 23034)
    del node["status"]["allocatable"]["nvidia.com/gpu"]
    assert node_gpus(node).gpu_count == 4


def test_cordoned_and_not_ready_nodes_offer_nothing() -> None:
    cordoned = node_gpus(gfd_node("a", "NVIDIA-L4", 1, 23034, unschedulable=True))
    not_ready = node_gpus(gfd_node("b", "NVIDIA-L4", 1, 23034, ready=False))
    assert not cordoned.usable and "cordoned" in (cordoned.excluded or "")
    assert not not_ready.usable and "not Ready" in (not_ready.excluded or "")
    no_conditions = gfd_node("c", "NVIDIA-L4", 1, 23034)
    no_conditions["status"]["conditions"] = []
    assert not node_gpus(no_conditions).usable


def test_cpu_nodes_are_not_gpu_nodes() -> None:
    node = {
        "metadata": {"name": "cpu"},
        "status": {"allocatable": {"cpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert not node_gpus(node).usable


def test_planner_nodes_respect_node_selector_and_skip_excluded() -> None:
    a = gfd_node("a", "NVIDIA-L4", 1, 23034)
    a["metadata"]["labels"]["pool"] = "chat"
    b = gfd_node("b", "NVIDIA-L20", 8, 46068)
    c = gfd_node("c", "NVIDIA-L20", 8, 46068, ready=False)
    inventory = [node_gpus(n) for n in (a, b, c)]
    assert [n.name for n in planner_nodes(inventory)] == ["a", "b"]
    only = planner_nodes(inventory, {"pool": "chat"})
    assert [(n.name, n.product, n.gpu_count) for n in only] == [("a", "NVIDIA-L4", 1)]


def test_other_resource_names_are_counted() -> None:
    node = gfd_node("a", "NVIDIA-A100-SXM4-80GB", 0, 81920)
    node["status"]["allocatable"]["nvidia.com/mig-3g.40gb"] = "2"
    assert not node_gpus(node).usable
    assert node_gpus(node, "nvidia.com/mig-3g.40gb").gpu_count == 2


def test_trim_ignores_heartbeats_and_images() -> None:
    node = gfd_node("a", "NVIDIA-L4", 1, 23034)
    before = trim_node(node)
    node["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-01-01T00:00:00Z"
    node["status"]["images"] = [{"names": ["x"]}]
    assert trim_node(node) == before
    node["metadata"]["labels"]["nvidia.com/gpu.product"] = "NVIDIA-L40S"
    assert trim_node(node) != before


# --------------------------------------------------------------------------------------------------
# shared GPUs: time-slicing and MIG, as GPU Feature Discovery labels them


def _shared(node: dict[str, object], **labels: str) -> dict[str, object]:
    node["metadata"]["labels"].update(labels)  # type: ignore[index]
    return node


def test_a_time_sliced_gpu_is_a_share_of_its_memory() -> None:
    """4 replicas of an L4 (GFD: gpu.replicas=4, product suffixed -SHARED): the device plugin
    advertises 4 x 1 shares on one memory; each is planned with a quarter of it, one per replica."""
    node = gfd_node("ts", "NVIDIA-L4-SHARED", 4, 23034)
    node = _shared(node, **{"nvidia.com/gpu.replicas": "4"})
    gpus = node_gpus(node)
    assert gpus.usable and gpus.sharing == "time-slicing"
    assert gpus.gpu_count == 4 and gpus.gpu_memory_bytes == 23034 // 4 * MiB
    assert gpus.max_gpus_per_replica == 1
    # the memory label may be absent: the catalog knows the product without its -SHARED suffix
    del node["metadata"]["labels"]["nvidia.com/gpu.memory"]  # type: ignore[index]
    assert node_gpus(node).gpu_memory_bytes > 0
    [planned] = planner_nodes([gpus])
    assert planned.max_gpus_per_replica == 1 and planned.product == "NVIDIA-L4-SHARED"


def test_mig_single_strategy_counts_mig_devices_with_their_own_memory() -> None:
    node = gfd_node("mig", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", 56, 4864)
    node = _shared(node, **{"nvidia.com/mig.strategy": "single"})
    gpus = node_gpus(node)
    assert gpus.usable and gpus.sharing == "mig" and gpus.max_gpus_per_replica == 1
    assert (gpus.gpu_count, gpus.gpu_memory_bytes) == (56, 4864 * MiB)


def test_mig_mixed_strategy_plans_the_profile_the_spec_asks_for() -> None:
    node = gfd_node("mixed", "NVIDIA-A100-SXM4-80GB", 1, 81920)
    node = _shared(
        node,
        **{
            "nvidia.com/mig.strategy": "mixed",
            "nvidia.com/mig-3g.40gb.count": "2",
            "nvidia.com/mig-3g.40gb.memory": "40192",
            "nvidia.com/mig-1g.10gb.count": "1",
            "nvidia.com/mig-1g.10gb.memory": "9728",
        },
    )
    node["status"]["allocatable"].update({"nvidia.com/mig-3g.40gb": "2", "nvidia.com/mig-1g.10gb": "1"})  # type: ignore[index]
    big = node_gpus(node, "nvidia.com/mig-3g.40gb")
    small = node_gpus(node, "nvidia.com/mig-1g.10gb")
    whole = node_gpus(node)
    assert (big.gpu_count, big.gpu_memory_bytes, big.max_gpus_per_replica) == (2, 40192 * MiB, 1)
    assert (small.gpu_count, small.gpu_memory_bytes) == (1, 9728 * MiB)
    assert whole.sharing == "none" and whole.gpu_memory_bytes == 81920 * MiB
    absent = node_gpus(node, "nvidia.com/mig-7g.80gb")
    assert not absent.usable


def test_a_replica_never_spans_shares_or_mig_devices() -> None:
    """A model that needs two L4s does not fit on eight time-sliced shares of them: the planner
    refuses rather than handing one replica two shares (which would be the same GPU twice)."""
    from parallama_runtime.planning.model_info import model_info_from_metadata
    from parallama_runtime.planning.planner import PlanRequest, make_plan
    from parallama_runtime.planning.presets import PRESETS

    model = model_info_from_metadata(PRESETS["qwen2.5-32b"])  # ~20 GB of weights
    whole = planner_nodes([node_gpus(gfd_node("whole", "NVIDIA-L4", 2, 23034))])
    shares = planner_nodes(
        [node_gpus(_shared(gfd_node("ts", "NVIDIA-L4-SHARED", 8, 23034), **{"nvidia.com/gpu.replicas": "4"}))]
    )
    assert make_plan(model, whole).fits and make_plan(model, whole).gpus_per_replica == 2
    refused = make_plan(model, shares)
    assert not refused.fits and refused.gpus_per_replica <= 1
    explicit = make_plan(model, shares, PlanRequest(gpus_per_replica=2))
    assert not explicit.fits and "cannot combine" in explicit.reason


# --------------------------------------------------------------------------------------------------
# free GPUs, taints and required affinity


def _pod(
    node: str | None, gpus: int, *, phase: str = "Running", labels: dict[str, str] | None = None
) -> dict:  # type: ignore[type-arg]
    return {
        "metadata": {"labels": labels or {}},
        "spec": {
            "nodeName": node,
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}, {"resources": {}}],
        },
        "status": {"phase": phase},
    }


def test_gpus_held_by_other_pods_are_not_free() -> None:
    pods = [
        _pod("a", 1),
        _pod("a", 2, phase="Pending"),  # scheduled, not yet running: holds its GPUs all the same
        _pod("a", 4, phase="Succeeded"),  # done: holds nothing
        _pod(None, 8),  # not scheduled: holds nothing yet
        _pod("b", 1, labels={"parallama.dev/model-deployment": "chat"}),
    ]
    assert requested_gpus(pods) == {"a": 3, "b": 1}
    # re-planning "chat" counts its own replicas' GPUs as its own
    assert requested_gpus(pods, ignore={"parallama.dev/model-deployment": "chat"}) == {"a": 3}
    inventory = [
        node_gpus(gfd_node("a", "NVIDIA-L20", 4, 46068)),
        node_gpus(gfd_node("b", "NVIDIA-L4", 1, 23034)),
    ]
    nodes = planner_nodes(inventory, requested=requested_gpus(pods))
    assert [(n.name, n.gpu_count) for n in nodes] == [("a", 1)]  # b's only GPU is taken


def test_taints_need_tolerations() -> None:
    node = gfd_node("tainted", "NVIDIA-L4", 1, 23034)
    node["spec"]["taints"] = [{"key": "dedicated", "value": "llm", "effect": "NoSchedule"}]  # type: ignore[index]
    gpus = node_gpus(trim_node(node))
    assert planner_nodes([gpus]) == []
    assert (
        planner_nodes([gpus], tolerations=[{"key": "dedicated", "value": "other", "effect": "NoSchedule"}])
        == []
    )
    tolerated = planner_nodes([gpus], tolerations=[{"key": "dedicated", "operator": "Equal", "value": "llm"}])
    assert [n.name for n in tolerated] == ["tainted"]
    assert planner_nodes([gpus], tolerations=[{"operator": "Exists"}])
    # PreferNoSchedule only prefers
    node["spec"]["taints"] = [{"key": "x", "effect": "PreferNoSchedule"}]  # type: ignore[index]
    assert planner_nodes([node_gpus(node)])


def test_required_node_affinity_decides_where_replicas_may_go() -> None:
    zone_a = gfd_node("a", "NVIDIA-L4", 1, 23034)
    zone_a["metadata"]["labels"]["topology.kubernetes.io/zone"] = "a"  # type: ignore[index]
    zone_b = gfd_node("b", "NVIDIA-L4", 1, 23034)
    zone_b["metadata"]["labels"]["topology.kubernetes.io/zone"] = "b"  # type: ignore[index]
    inventory = [node_gpus(zone_a), node_gpus(zone_b)]

    def affinity(*expressions: dict[str, object]) -> dict[str, object]:
        terms = [{"matchExpressions": list(expressions)}]
        return {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
        }

    def names(aff: dict[str, object]) -> list[str]:
        return [n.name for n in planner_nodes(inventory, affinity=aff)]

    zone = "topology.kubernetes.io/zone"
    assert names(affinity({"key": zone, "operator": "In", "values": ["b"]})) == ["b"]
    assert names(affinity({"key": zone, "operator": "NotIn", "values": ["b"]})) == ["a"]
    assert names(affinity({"key": "gpu-class", "operator": "Exists"})) == []
    assert names(affinity({"key": "gpu-class", "operator": "DoesNotExist"})) == ["a", "b"]
    assert names(affinity({"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["20000"]})) == [
        "a",
        "b",
    ]
    assert names({}) == ["a", "b"]
