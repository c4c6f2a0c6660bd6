"""A kmock KubernetesEmulator with the few API-server behaviours kopf and the operator rely on.

kmock 0.8 emulates object storage and watch streams, but (as of this version):

1. assigns no ``metadata.resourceVersion`` (kopf's consistency checks and JSON-patch ``test`` ops need
   one), no ``uid``, ``generation`` or ``creationTimestamp`` -> stamped on create and patch here;
2. ignores ``labelSelector`` on lists -> simple equality selectors are applied here;
3. applies a JSON patch (a list) as if it were a merge patch and answers a failed ``test`` op with
   500 instead of 422 -> RFC 6902 patches are applied here, with 422 on a failed test;
4. replays every existing object as ADDED on each watch, even one that resumes from a list's
   resourceVersion -> only objects newer than the requested version are replayed;
5. cannot parse ``GET /api/v1/namespaces`` (its path parser expects a namespace name after
   ``namespaces``) -> answered here from the stored Namespace objects;
6. ignores ``metadata.generateName`` (every kopf Event after the first then conflicts) -> a name is
   generated here;
7. discovers only resources it has objects or reactions for, while kopf waits for ``v1/namespaces``
   to be discoverable -> the bundled built-in resource list and the ModelDeployment CRD are loaded;
8. has no server-side apply (``PATCH`` with ``application/apply-patch+yaml``) -> a minimal one here:
   the object is created when absent; otherwise every leaf the same field manager applied last time
   and omits now is removed, then the new object is merged in (maps recursively, lists replaced
   whole). Ownership is tracked per manager as its last applied object (not as a real fieldsV1 set;
   no conflicts between managers, ``force`` is accepted and ignored), and
   ``metadata.managedFields`` gets an ``Apply`` entry naming the manager, which is what the operator
   reads. Enough to prove that dropped fields disappear; not a full SSA implementation;
9. runs no admission: ``refuse(plural, name, status, message)`` makes the next writes of one object
   fail like an admission or validation error would.

Everything else is kmock's own behaviour. Nothing here knows about parallama.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import enums, rendering

__all__ = ["Cluster", "ClusterEmulator", "apply_json_patch", "gfd_node", "running_operator"]


class JSONPatchTestFailed(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def apply_json_patch(doc: Any, ops: list[Mapping[str, Any]]) -> Any:
    """RFC 6902 add/remove/replace/test, enough for kopf's finalizer and annotation patches."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1] if parts else None
        kind = op["op"]
        if kind == "test":
            current = parent
            if last is not None:
                current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise JSONPatchTestFailed(f"test of {op['path']} failed: {current!r} != {op.get('value')!r}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last or 0), op["value"])
                else:
                    parent[int(last or 0)] = op["value"]
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last or 0)]
            else:
                del parent[last]
        else:
            raise ValueError(f"unsupported JSON-patch op {kind}")
    return doc


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """Maps merge recursively; lists and scalars replace (no list-map keys in this emulation)."""
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _remove_dropped(target: dict[str, Any], before: Any, now: Any) -> None:
    """Remove from ``target`` what the manager applied ``before`` and no longer applies ``now``."""
    if not isinstance(before, Mapping):
        return
    for key, old in before.items():
        if not isinstance(now, Mapping) or key not in now:
            target.pop(key, None)
        elif isinstance(old, Mapping) and isinstance(target.get(key), dict):
            _remove_dropped(target[key], old, now[key])


def _selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _applied: dict[tuple[Any, str | None, str | None, str], Any] = attrs.field(factory=dict, init=False)
    _refusals: dict[tuple[str, str], tuple[int, str]] = attrs.field(factory=dict, init=False)

    def refuse(self, plural: str, name: str, status: int, message: str) -> None:
        """Answer every create/patch of ``plural/name`` with ``status`` until :meth:`allow`."""
        self._refusals[plural, name] = (status, message)

    def allow(self, plural: str, name: str) -> None:
        self._refusals.pop((plural, name), None)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        self.resources["parallama.dev/v1alpha1/modeldeployments"] = kmock.ResourceInfo(
            kind="ModelDeployment",
            singular="modeldeployment",
            namespaced=True,
            shortnames={"mdep"},
            verbs={"get", "list", "watch", "create", "patch", "delete"},
            subresources={"status", "scale"},
        )

    def declare_service_monitors(self) -> None:
        self.resources["monitoring.coreos.com/v1/servicemonitors"] = kmock.ResourceInfo(
            kind="ServiceMonitor",
            namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "delete"},
        )

    def forget_policy_v1(self) -> None:
        """Serve no ``policy/v1``, as a Kubernetes 1.20 API server (no PodDisruptionBudget v1)."""
        for key in [k for k in self.resources if (k.group, k.version) == ("policy", "v1")]:
            del self.resources[key]

    def _next_version(self) -> str:
        return str(next(self._versions))

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path.rstrip("/") == "/api/v1/namespaces" and raw_request.method == "GET":
            if raw_request.query.get("watch") == "true":
                return await self._idle_stream(raw_request)
            items = [
                obj.raw
                for (resource, _ns, _name), obj in self._objects.items()
                if resource.plural == "namespaces" and not obj.deleted
            ]
            return aiohttp.web.json_response(
                {
                    "kind": "NamespaceList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": "1"},
                    "items": items,
                }
            )
        return await super().__call__(raw_request)

    async def _idle_stream(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """A namespace watch that never reports anything; it ends when the client disconnects."""
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        await asyncio.Event().wait()
        return response

    def _stamp(self, request: rendering.Request) -> None:
        data = request.data
        if not isinstance(data, dict):
            return
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = self._next_version()
        if request.action == enums.action.CREATE:
            if not meta.get("name") and meta.get("generateName"):  # kopf's events use generateName
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
            meta.setdefault(
                "creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            )
            if request.namespace and "namespace" not in meta:
                meta["namespace"] = request.namespace
        elif request.action == enums.action.UPDATE and request.subresource is None and "spec" in data:
            key = (request.resource, request.namespace, request.name)
            if key in self._objects and not self._objects[key].deleted:
                current = self._objects[key].raw.get("metadata", {}).get("generation", 1)
                meta["generation"] = int(current) + 1

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        is_update = request.resource is not None and request.action == enums.action.UPDATE
        if request.resource is not None and request.action in (enums.action.CREATE, enums.action.UPDATE):
            name = request.name or ((request.data or {}).get("metadata") or {}).get("name")
            refusal = self._refusals.get((request.resource.plural, name or ""))
            if refusal is not None and request.subresource is None:
                raise kmock.KubernetesError(status=refusal[0], reason="Invalid", message=refusal[1])
        content_type = request.headers.get("Content-Type", "")
        if is_update and content_type.startswith("application/apply-patch"):
            return await self._server_side_apply(request)
        if is_update and isinstance(request.data, list):
            return await self._json_patch(request)
        if request.resource is not None and request.action in (enums.action.CREATE, enums.action.UPDATE):
            self._stamp(request)
        return await super()._handle(request)

    async def _json_patch(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            try:
                new = apply_json_patch(self._objects[key].raw, request.data)
            except JSONPatchTestFailed as error:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(error)) from error
            except (KeyError, IndexError, ValueError) as error:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=repr(error)) from error
            new.setdefault("metadata", {})["resourceVersion"] = self._next_version()
            self._objects[key].create(new)
            meta = new["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                self._objects[key].delete()
                await self._buses[request.resource].put({"type": "DELETED", "object": new})
            else:
                await self._buses[request.resource].put({"type": "MODIFIED", "object": new})
        return aiohttp.web.json_response(new)

    async def _server_side_apply(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None and isinstance(request.data, dict)
        manager = request.params.get("fieldManager")
        if not manager:
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="fieldManager is required")
        key = (request.resource, request.namespace, request.name)
        owner_key = (request.resource, request.namespace, request.name, manager)
        applied = copy.deepcopy(request.data)
        async with self._lock:
            exists = key in self._objects and not self._objects[key].deleted
            if exists:
                new = copy.deepcopy(self._objects[key].raw)
                _remove_dropped(new, self._applied.get(owner_key), applied)
                _merge(new, applied)
            else:
                new = copy.deepcopy(applied)
                meta = new.setdefault("metadata", {})
                meta["uid"] = str(uuid.uuid4())
                meta["generation"] = 1
                meta["creationTimestamp"] = _timestamp()
                meta.setdefault("namespace", request.namespace)
            meta = new.setdefault("metadata", {})
            old_spec = self._objects[key].raw.get("spec") if exists else None
            if exists and new.get("spec") != old_spec:
                meta["generation"] = int(meta.get("generation") or 1) + 1
            others = [f for f in meta.get("managedFields") or [] if f.get("manager") != manager]
            entry = {"manager": manager, "operation": "Apply", "apiVersion": new.get("apiVersion")}
            meta["managedFields"] = [*others, {**entry, "time": _timestamp(), "fieldsType": "FieldsV1"}]
            meta["resourceVersion"] = self._next_version()
            self._applied[owner_key] = applied
            if exists:
                self._objects[key].create(new)
            else:
                self._objects[key] = new
            await self._buses[request.resource].put(
                {"type": "MODIFIED" if exists else "ADDED", "object": new}
            )
        return aiohttp.web.json_response(new, status=200 if exists else 201)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        result: dict[str, Any] = await super()._serve_list(request)  # type: ignore[assignment]
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [
                i
                for i in result["items"]
                if _selector_matches(selector, i.get("metadata", {}).get("labels") or {})
            ]
        result["metadata"] = {"resourceVersion": str(self._current_version())}
        return result

    def _current_version(self) -> int:
        return max(
            (
                int(obj.raw.get("metadata", {}).get("resourceVersion") or 0)
                for _k, obj in self._objects.items()
                if not obj.deleted
            ),
            default=0,
        )

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        since = request.params.get("resourceVersion")
        selector = request.params.get("labelSelector")
        async for item in super()._serve_watch(request):
            if isinstance(item, dict) and since and since.isdigit():
                # kmock replays the existing objects first; a resumed watch only wants newer ones
                version = item.get("object", {}).get("metadata", {}).get("resourceVersion") or "0"
                if item.get("type") == "ADDED" and int(version) <= int(since):
                    continue
            if isinstance(item, dict) and selector:
                labels = item.get("object", {}).get("metadata", {}).get("labels") or {}
                if not _selector_matches(selector, labels):
                    continue
            yield item

    def requests_made(self) -> list[rendering.Request]:
        return list(self._requests)

    def objects_of(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Live (not deleted) objects of one resource, for assertions."""
        wanted = kmock.resource(resource)
        return [
            copy.deepcopy(obj.raw)
            for (res, ns, _name), obj in self._objects.items()
            if res == wanted and (namespace is None or ns == namespace) and not obj.deleted
        ]

    def dump(self) -> str:
        return json.dumps(
            {f"{r}/{ns}/{n}": o.raw for (r, ns, n), o in self._objects.items() if not o.deleted},
            indent=1,
            default=str,
        )


# --------------------------------------------------------------------------------------------------
# test helpers


def gfd_node(
    name: str,
    product: str,
    count: int,
    memory_mib: int | None,
    *,
    ready: bool = True,
    unschedulable: bool = False,
) -> dict[str, Any]:
    """A Node as GPU Feature Discovery and the NVIDIA device plugin leave it."""
    labels = {
        "kubernetes.io/hostname": name,
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.count": str(count),
    }
    if memory_mib is not None:
        labels["nvidia.com/gpu.memory"] = str(memory_mib)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": str(count)},
            "capacity": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": str(count)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class Cluster:
    """The emulator plus helpers that go through its HTTP API (so watches see every change)."""

    def __init__(self, emulator: ClusterEmulator, url: str) -> None:
        self.emulator = emulator
        self.url = url.rstrip("/")

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                self.url + path,
                data=None if body is None else json.dumps(body),
                headers={"Content-Type": content_type},
            ) as response,
        ):
            text = await response.text()
            assert response.status < 400, f"{method} {path}: {response.status} {text[:300]}"
            return await response.json(content_type=None) if text else None

    async def add_node(self, node: dict[str, Any]) -> None:
        await self.request("POST", "/api/v1/nodes", node)

    async def delete_node(self, name: str) -> None:
        await self.request("DELETE", f"/api/v1/nodes/{name}")

    async def create_md(self, name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        body = {
            "apiVersion": "parallama.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        result: dict[str, Any] = await self.request(
            "POST", f"/apis/parallama.dev/v1alpha1/namespaces/{namespace}/modeldeployments", body
        )
        return result

    async def patch(self, path: str, patch: dict[str, Any]) -> Any:
        return await self.request("PATCH", path, patch, "application/merge-patch+json")

    async def delete(self, path: str) -> None:
        await self.request("DELETE", path)

    def get(self, resource: str, name: str, namespace: str | None = "default") -> dict[str, Any] | None:
        for obj in self.emulator.objects_of(resource, namespace):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    def md(self, name: str, namespace: str = "default") -> dict[str, Any]:
        obj = self.get("parallama.dev/v1alpha1/modeldeployments", name, namespace)
        assert obj is not None, f"ModelDeployment {name} is gone"
        return obj

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        events = self.emulator.objects_of("v1/events")
        return [e for e in events if name is None or e.get("involvedObject", {}).get("name") == name]

    async def wait_for(self, check: Callable[[], Any], within: float = 20.0, what: str = "condition") -> Any:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                result = check()
            except (AssertionError, KeyError, TypeError):
                result = None
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; objects:\n{self.emulator.dump()[:6000]}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running_operator() -> AsyncIterator[None]:
    """The real operator (every handler of ``parallama_operator``) in this event loop."""
    import kopf

    # the handlers module, not the package: this venv's editable install maps parallama_operator as a
    # namespace package, so its __init__ (which imports the handlers) may not run
    import parallama_operator.handlers  # noqa: F401

    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # no CRD/namespace scanning against the emulator
    settings.posting.enabled = True
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(clusterwide=True, standalone=True, settings=settings, stop_flag=stop, ready_flag=ready)
    )
    try:
        await asyncio.wait_for(ready.wait(), 20)
        yield
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(task, 15)
