"""Evaluate a CRD's OpenAPI schema offline: API-server style defaulting, schema checks, CEL rules.

The API server defaults, then validates the schema, then runs the x-kubernetes-validations rules
of every node the object has. This mirrors that order with jsonschema and cel-expr-python so the
CRD can be tested without a cluster.
"""

from __future__ import annotations

import copy
from typing import Any

import cel_expr_python.cel as cel
import jsonschema

_ENV = cel.NewEnv(variables={"self": cel.Type.DYN})


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    obj = copy.deepcopy(obj)

    def walk(node: dict[str, Any], value: Any) -> Any:
        if isinstance(value, dict):
            for name, sub in (node.get("properties") or {}).items():
                if name not in value and "default" in sub:
                    value[name] = copy.deepcopy(sub["default"])
                if name in value:
                    value[name] = walk(sub, value[name])
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                for key in value:
                    value[key] = walk(extra, value[key])
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            return [walk(node["items"], item) for item in value]
        return value

    return walk(schema, obj)


def schema_errors(schema: dict[str, Any], obj: Any) -> list[str]:
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]


def cel_errors(schema: dict[str, Any], obj: Any) -> list[str]:
    errors: list[str] = []

    def walk(node: dict[str, Any], value: Any, where: str) -> None:
        for rule in node.get("x-kubernetes-validations") or []:
            result = _ENV.compile(rule["rule"]).eval(data={"self": value}).value()
            if result is not True:
                errors.append(f"{where or '.'}: {rule['message']}")
        if isinstance(value, dict):
            for name, sub in (node.get("properties") or {}).items():
                if name in value:
                    walk(sub, value[name], f"{where}.{name}")
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for i, item in enumerate(value):
                walk(node["items"], item, f"{where}[{i}]")

    walk(schema, obj, "")
    return errors


def admit(schema: dict[str, Any], obj: Any) -> tuple[Any, list[str]]:
    """(the defaulted object, every error the API server would report)."""
    defaulted = apply_defaults(schema, obj)
    return defaulted, schema_errors(schema, defaulted) + cel_errors(schema, defaulted)
