"""The exact cluster permissions the operator uses; the Helm chart's ClusterRole is tested against this.

Every rule names a call the operator makes, so removing a rule here must remove the call:

* its own resource: watch, read, and patch (kopf's progress annotations, the autoscaler's
  ``spec.replicas``) plus the status subresource;
* the children it applies: Deployments, Services, PodDisruptionBudgets, ServiceMonitors;
* Nodes (the GPU inventory) and Pods (OOM kills, slots) are only watched, and a ModelDeployment's
  pods listed by the autoscaler (its ready replicas, whose /metrics it reads);
* core/v1 Events are created by kopf (``kopf.info``/``kopf.warn``), never updated;
* CustomResourceDefinitions are listed and watched by kopf's resource scanning (it notices CRDs
  that appear later, e.g. the ServiceMonitor CRD) and read by the ServiceMonitor availability check;
* namespaces are listed and watched because the operator runs cluster-wide.

No peering rules: the operator runs with ``settings.peering.standalone = True`` (one replica; a
Deployment with ``strategy: Recreate`` keeps it so), so kopf never touches ``clusterkopfpeerings``.
"""

from __future__ import annotations

from typing import Final

__all__ = ["CLUSTER_RULES"]

_READ_WATCH = ["get", "list", "watch"]
_APPLY = ["get", "list", "watch", "create", "patch"]

CLUSTER_RULES: Final[list[dict[str, list[str]]]] = [
    {
        "apiGroups": ["parallama.dev"],
        "resources": ["modeldeployments"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {"apiGroups": ["parallama.dev"], "resources": ["modeldeployments/status"], "verbs": ["get", "patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": _APPLY},
    {"apiGroups": [""], "resources": ["services"], "verbs": _APPLY},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": [*_APPLY, "delete"]},
    {"apiGroups": ["monitoring.coreos.com"], "resources": ["servicemonitors"], "verbs": [*_APPLY, "delete"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": _READ_WATCH},
    {"apiGroups": [""], "resources": ["pods"], "verbs": _READ_WATCH},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": _READ_WATCH},
]
