"""Node inventory: GPU Feature Discovery labels -> planner nodes (pure)."""

from __future__ import annotations

from harness import gfd_node
from parallama_operator.inventory import node_gpus, planner_nodes, trim_node

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
