"""A small async Kubernetes client for the handlers: get, create, server-side apply, merge-patch and
delete of plain dicts.

The credentials come from the official ``kubernetes`` package (in-cluster service account, else
``KUBECONFIG``/``~/.kube/config``), the requests go through aiohttp so that no handler blocks the
event loop or needs a thread per call. Children are plain dicts from the builders, so a generic
path-based client is all we need; typed API classes would only add conversions.

Every request carries ``User-Agent: parallama-operator/<version>`` (what ``managedFields`` and the
audit log show for Update operations; apply requests name their field manager explicitly), and an
:class:`ApiError` names the request that failed (method, path, status) so that logs say which call
and which child it was.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp

__all__ = ["FIELD_MANAGER", "USER_AGENT", "ApiError", "KubeClient", "resource_path"]

FIELD_MANAGER = "parallama"
"""The server-side-apply field manager of every child the operator writes."""


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("parallama")
    except PackageNotFoundError:  # a source checkout without an installed distribution
        return "0.0.0"


USER_AGENT = f"parallama-operator/{_version()}"

_PATHS = {
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("v1", "Pod"): "/api/v1/namespaces/{ns}/pods",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{ns}/deployments",
    ("policy/v1", "PodDisruptionBudget"): "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    (
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
    ): "/apis/monitoring.coreos.com/v1/namespaces/{ns}/servicemonitors",
    (
        "parallama.dev/v1alpha1",
        "ModelDeployment",
    ): "/apis/parallama.dev/v1alpha1/namespaces/{ns}/modeldeployments",
}


class ApiError(Exception):
    """An HTTP error answer; ``str()`` names the request: ``PATCH /apis/... -> 422: message``."""

    def __init__(self, status: int, message: str, *, method: str = "", path: str = "") -> None:
        where = f"{method} {path} -> " if method else ""
        super().__init__(f"{where}HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.method = method
        self.path = path

    @property
    def permanent(self) -> bool:
        """A refusal that repeating the same request cannot change (400, 403, 404, 422, ...):
        not a conflict, a rate limit, a timeout or an expired token, which a retry may cure."""
        return 400 <= self.status < 500 and self.status not in (401, 408, 409, 425, 429)


def resource_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    base = _PATHS[(api_version, kind)].format(ns=namespace)
    return f"{base}/{name}" if name else base


class KubeClient:
    """One aiohttp session per operator; ``from_environment`` picks in-cluster or kubeconfig."""

    def __init__(
        self,
        host: str,
        *,
        headers_fn: Any = None,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> None:
        self.host = host.rstrip("/")
        self._headers_fn = headers_fn
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls) -> KubeClient:
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            # read KUBECONFIG now: the kubernetes package only reads it once, at its import
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
            )

        def headers() -> dict[str, str]:
            # asked on every request: the in-cluster token is rotated and re-read by this hook
            auth = configuration.auth_settings().get("BearerToken")
            return {"Authorization": str(auth["value"])} if auth and auth.get("value") else {}

        context: ssl.SSLContext | bool
        if configuration.host.startswith("https"):
            if configuration.verify_ssl:
                context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            else:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
        else:
            context = False
        return cls(configuration.host, headers_fn=headers, ssl_context=context)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        headers: dict[str, str] = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self._headers_fn is not None:
            headers.update(self._headers_fn())
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        async with self._session.request(
            method, self.host + path, data=data, headers=headers, params=params, ssl=self._ssl
        ) as response:
            text = await response.text()
            if response.status >= 400:
                try:
                    message = json.loads(text).get("message", text)
                except (ValueError, AttributeError):
                    message = text
                raise ApiError(response.status, str(message)[:500], method=method, path=path)
            return json.loads(text) if text else None

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            result: dict[str, Any] = await self.request("GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise
        return result

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "PATCH", path, dict(patch), content_type="application/merge-patch+json"
        )
        return result

    async def apply(self, path: str, body: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply (creates the object when absent). ``force`` takes over fields another
        manager changed: the operator is the only author of its children's desired state."""
        params = {"fieldManager": FIELD_MANAGER}
        if force:
            params["force"] = "true"
        result: dict[str, Any] = await self.request(
            "PATCH", path, dict(body), content_type="application/apply-patch+yaml", params=params
        )
        return result

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", path, dict(body))
        return result

    async def delete(self, path: str) -> bool:
        try:
            await self.request("DELETE", path)
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True

    async def has_api(self, group_version: str) -> bool:
        """Whether the API server serves ``group/version`` (e.g. the ServiceMonitor CRD is installed)."""
        try:
            await self.request("GET", f"/apis/{group_version}")
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True
