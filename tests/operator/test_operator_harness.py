"""The harness's fixes to kmock behave like an API server (the operator tests rely on them)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from harness import Cluster, apply_json_patch, gfd_node

PODS = "/api/v1/namespaces/default/pods"


def pod(name: str, **labels: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}, "spec": {}}


async def raw(
    cluster: Cluster, method: str, path: str, body: object, content_type: str
) -> tuple[int, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, cluster.url + path, data=json.dumps(body), headers={"Content-Type": content_type}
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_resource_versions_uids_and_generations(cluster: Cluster) -> None:
    created = await cluster.request("POST", PODS, pod("a"))
    meta = created["metadata"]
    assert meta["uid"] and meta["generation"] == 1 and meta["namespace"] == "default"
    patched = await cluster.patch(f"{PODS}/a", {"spec": {"nodeName": "n"}})
    assert int(patched["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert patched["metadata"]["generation"] == 2
    status_only = await cluster.patch(f"{PODS}/a/status", {"status": {"phase": "Running"}})
    assert status_only["metadata"]["generation"] == 2


async def test_json_patch_test_failure_is_422(cluster: Cluster) -> None:
    created = await cluster.request("POST", PODS, pod("a"))
    version = created["metadata"]["resourceVersion"]
    ok = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": version},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
    ]
    status, body = await raw(cluster, "PATCH", f"{PODS}/a", ok, "application/json-patch+json")
    assert status == 200 and body["metadata"]["finalizers"] == ["x/y"]
    status, _ = await raw(cluster, "PATCH", f"{PODS}/a", ok, "application/json-patch+json")
    assert status == 422  # the resourceVersion moved on


async def test_label_selectors_on_lists(cluster: Cluster) -> None:
    await cluster.request("POST", PODS, pod("a", app="x", tier="web"))
    await cluster.request("POST", PODS, pod("b", app="y"))
    result = await cluster.request("GET", f"{PODS}?labelSelector=app%3Dx")
    assert [i["metadata"]["name"] for i in result["items"]] == ["a"]
    result = await cluster.request("GET", f"{PODS}?labelSelector=app!%3Dx")
    assert [i["metadata"]["name"] for i in result["items"]] == ["b"]


async def test_resumed_watch_does_not_replay_older_objects(cluster: Cluster) -> None:
    await cluster.add_node(gfd_node("old", "NVIDIA-L4", 1, 23034))
    listing = await cluster.request("GET", "/api/v1/nodes")
    since = listing["metadata"]["resourceVersion"]
    seen: list[str] = []

    async def watch() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{cluster.url}/api/v1/nodes?watch=true&resourceVersion={since}") as response,
        ):
            async for line in response.content:
                if line.strip():
                    seen.append(json.loads(line)["object"]["metadata"]["name"])

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    await cluster.add_node(gfd_node("new", "NVIDIA-L4", 1, 23034))
    await asyncio.sleep(0.3)
    task.cancel()
    assert seen == ["new"]


async def test_namespaces_can_be_listed(cluster: Cluster) -> None:
    result = await cluster.request("GET", "/api/v1/namespaces")
    assert [i["metadata"]["name"] for i in result["items"]] == ["default"]


def test_json_patch_ops() -> None:
    doc = {"a": {"b": [1, 2]}, "c": 1}
    out = apply_json_patch(
        doc,
        [
            {"op": "add", "path": "/a/b/-", "value": 3},
            {"op": "remove", "path": "/c"},
            {"op": "replace", "path": "/a/b/0", "value": 0},
        ],
    )
    assert out == {"a": {"b": [0, 2, 3]}} and doc["c"] == 1
