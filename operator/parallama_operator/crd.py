"""Generate the ModelDeployment CRD from the pydantic models: ``python -m parallama_operator.crd``.

pydantic writes JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3.0 schema. The
translation here inlines ``$ref``, drops ``null`` branches (optional fields are simply omitted),
turns ``exclusiveMinimum`` numbers into ``minimum``, removes ``additionalProperties: false/true``
(structural schemas prune unknown fields instead) and gives every optional nested object a ``{}``
default (when nothing inside is required) so that the API server applies the defaults inside it:
CEL rules can then rely on them.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from .resources import (
    GROUP,
    KIND,
    NAME_RULES,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
)

__all__ = ["crd_manifest", "crd_yaml", "openapi_schema", "structural"]

_DROP = {"title", "$defs"}


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Translate a pydantic JSON schema into a structural OpenAPI v3.0 schema."""
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            target: dict[str, Any] = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            target.update(rest)  # a field's description/default wins over the class's
            return target
        return node

    def walk(node: dict[str, Any]) -> dict[str, Any]:
        node = resolve(node)
        if "anyOf" in node:
            branches = [b for b in node["anyOf"] if b.get("type") != "null"]
            if len(branches) != 1:
                raise ValueError(f"unsupported union in CRD schema: {node['anyOf']}")
            merged = {k: v for k, v in node.items() if k != "anyOf"}
            inner = resolve(branches[0])
            merged = {**inner, **merged}
            if merged.get("default", ...) is None:
                del merged["default"]
            node = merged
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP:
                continue
            if key == "properties":
                out[key] = {name: walk(sub) for name, sub in value.items()}
            elif key == "items":
                out[key] = walk(value)
            elif key == "additionalProperties":
                if isinstance(value, dict) and value:
                    out[key] = walk(value)
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                if node.get("type") == "integer":
                    out[bound] = value + 1 if bound == "minimum" else value - 1
                else:
                    out[bound] = value
                    out[key] = True
            else:
                out[key] = value
        if (
            out.get("type") == "object"
            and "additionalProperties" in node
            and node["additionalProperties"] is True
        ):
            out["x-kubernetes-preserve-unknown-fields"] = True
        if "x-kubernetes-preserve-unknown-fields" in out:
            out.pop("additionalProperties", None)
        if "enum" in out and "type" not in out:
            out["type"] = "string"
        for name, sub in out.get("properties", {}).items():
            optional = name not in out.get("required", []) and not sub.get("required")
            if sub.get("type") == "object" and "properties" in sub and "default" not in sub and optional:
                sub["default"] = {}
        return out

    return walk(schema)


def openapi_schema() -> dict[str, Any]:
    spec = structural(ModelDeploymentSpec.model_json_schema(by_alias=True, mode="validation"))
    status = structural(ModelDeploymentStatus.model_json_schema(by_alias=True, mode="serialization"))
    status.pop("required", None)  # the operator writes status piecemeal
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    spec.pop("description", None)
    status.pop("description", None)
    return {
        "type": "object",
        "required": ["spec"],
        "x-kubernetes-validations": [dict(rule) for rule in NAME_RULES],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {"description": "The model to serve and how its parallelism is planned.", **spec},
            "status": {"description": "The plan the operator chose, and why.", **status},
        },
    }


def crd_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "parallama", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["all", "parallama"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri", "priority": 1},
                        {"name": "Task", "type": "string", "jsonPath": ".status.plan.task"},
                        {"name": "Slots", "type": "integer", "jsonPath": ".status.plan.numParallel"},
                        {"name": "GPUs", "type": "integer", "jsonPath": ".status.plan.gpusPerReplica"},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `python -m parallama_operator.crd` from resources.py; do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)


def main() -> int:
    sys.stdout.write(crd_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
