"""Which JSON Schema keywords llama-cpp-python's schema converter enforces, and a copy of a schema
in the form it converts exactly.

The converter (``llama_cpp.llama_grammar.SchemaConverter``, llama.cpp's Python converter) dispatches
on a schema's keywords in a fixed order (``$ref``, ``oneOf``/``anyOf``, a list of types, ``const``,
``enum``, an object with ``properties``, ``allOf``, an array with ``items``, a string ``pattern``,
the string formats, string lengths, any object, a primitive type) and ignores every keyword the
branch it takes does not read. :class:`SchemaWalker` follows the same dispatch and records each
keyword that would be ignored while it constrains the value (``minimum`` on a number), so that the
API can refuse the schema naming them instead of answering with JSON that does not validate. A
keyword for another type than the branch produces is no constraint at all (``maxLength`` on a
number: JSON Schema applies it to strings only) and is not reported.

The copy it builds (:meth:`SchemaWalker.normalized`) differs where the converter would go wrong:
annotations are dropped (``{"description": ...}`` would otherwise not count as the empty schema);
a list of types becomes an ``anyOf`` of one schema per type (the converter would drop the other
keywords); ``const``/``enum`` keep only the values of the schema's ``type``; a one-element ``allOf``
is its element; an empty schema is ``{"type": "object"}`` (what the converter makes of it: an
object is a valid instance of "anything", and the non-empty form survives the converter's
``items or prefixItems``); every ``$ref`` target, resolved here (local JSON pointers only), is
copied under ``$defs`` with a fresh name (the converter names rules after a reference's last path
segment and mixes up targets that share one); ``oneOf`` becomes ``anyOf`` once its alternatives
are shown to exclude each other; a ``pattern`` is rewritten into the subset of regular expressions
the converter translates, restricted to characters a JSON string holds unescaped (see
:func:`translate_pattern`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

__all__ = ["MAX_DEPTH", "REPETITION_LIMIT", "PatternError", "SchemaWalker", "translate_pattern"]

MAX_DEPTH = 64
"""Deepest nesting of subschemas (through ``$ref`` too). The converter recurses in Python once per
level and llama.cpp's grammar machinery once per rule level; no useful schema comes near this."""

REPETITION_LIMIT = 1000
"""Largest count in ``minLength``/``maxLength``, ``minItems``/``maxItems`` and ``{m,n}`` in patterns
(for ``n - m`` and ``m``). The converter writes ``x{0,n}`` as n nested optional groups, and
llama.cpp refuses a rule whose repetition generates more than 2000 rules (about 1000 levels)."""

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        # OpenAPI's hint for a oneOf whose alternatives a property tells apart (pydantic writes
        # it); the alternatives' const values are what constrains
        "discriminator",
        # containers of subschemas, reached through $ref only
        "$defs",
        "definitions",
    }
)
"""Keywords that constrain nothing. ``$id`` is one too at the root (a subschema's would change what
``$ref`` means inside it) and so are ``x-`` extensions."""

JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

_STRING = frozenset({"minLength", "maxLength", "pattern", "format", "contentEncoding", "contentMediaType"})
_NUMBER = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_ARRAY = frozenset(
    {
        "items",
        "prefixItems",
        "additionalItems",
        "minItems",
        "maxItems",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "unevaluatedItems",
    }
)
_OBJECT = frozenset(
    {
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "propertyNames",
        "minProperties",
        "maxProperties",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "unevaluatedProperties",
    }
)
_APPLIES: dict[str, frozenset[str]] = {
    **dict.fromkeys(_STRING, frozenset({"string"})),
    **dict.fromkeys(_NUMBER, frozenset({"number", "integer"})),
    **dict.fromkeys(_ARRAY, frozenset({"array"})),
    **dict.fromkeys(_OBJECT, frozenset({"object"})),
}
"""The instance types a keyword constrains; any keyword not listed constrains every type."""
_ALL_TYPES = frozenset(JSON_TYPES)

_FORMATS = {"date", "time", "date-time"}
_UUID = re.compile(r"^uuid[1-5]?$")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def json_type(value: Any) -> str:
    """The JSON Schema type of a JSON value (integers are numbers too; see :func:`_matches`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _matches(value: Any, types: Iterable[str]) -> bool:
    kind = json_type(value)
    return any(kind == t or (t == "number" and kind == "integer") for t in types)


def _instance_types(value: Any) -> frozenset[str]:
    kind = json_type(value)
    return frozenset({kind, "number"}) if kind == "integer" else frozenset({kind})


def _value_key(value: Any) -> str:
    """Equal for values JSON Schema's ``const``/``enum`` call equal (1 and 1.0; not true and 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json.dumps(value, sort_keys=True)
    return repr(float(value))


class SchemaWalker:
    """One walk over a schema: :attr:`problems` (path of each keyword the converter would not
    enforce, with why) and :meth:`normalized` (the copy to convert)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.root = schema
        self.problems: dict[str, str] = {}
        self.defs: dict[str, Any] = {}
        self._ref_names: dict[str, str] = {}
        self._resolving: set[str] = set()

    def normalized(self) -> dict[str, Any]:
        top = self.visit(self.root, "", 0)
        for _ in range(len(self.defs)):
            if "$ref" not in top:
                break
            # the converter looks for references only below nodes without one: a reference at the
            # root would hide those in $defs
            top = dict(self.defs.get(top["$ref"].rsplit("/", 1)[-1]) or {})
        return {**top, "$defs": self.defs} if self.defs else top

    def flag(self, path: str, why: str = "") -> None:
        self.problems.setdefault(path or "(the schema itself)", why)

    # ------------------------------------------------------------------ dispatch

    def visit(self, node: Any, path: str, depth: int) -> dict[str, Any]:
        """The normalized copy of ``node``; problems are recorded as they are found."""
        if depth > MAX_DEPTH:
            self.flag(path, f"nested deeper than {MAX_DEPTH} levels")
            return {}
        if not isinstance(node, Mapping):
            self.flag(path, "a boolean schema" if isinstance(node, bool) else "not a schema object")
            return {}
        node = {k: v for k, v in node.items() if not self._annotation(k, path) and not _vacuous(k, v)}
        keys = list(node)
        schema_type = node.get("type")
        if "$ref" in node:
            self._ignored(node, path, keys, {"$ref"}, _ALL_TYPES, "beside $ref")
            return self._ref(node["$ref"], _join(path, "$ref"), depth)
        if "oneOf" in node or "anyOf" in node:
            return self._union(node, path, keys, depth)
        if isinstance(schema_type, list):
            if not schema_type or any(t not in JSON_TYPES for t in schema_type):
                self.flag(_join(path, "type"), "not a list of JSON types")
                return {}
            if "const" not in node and "enum" not in node:
                rest = {k: node[k] for k in keys if k != "type"}
                kinds = list(dict.fromkeys(schema_type))
                if len(kinds) == 1:
                    return self.visit({**rest, "type": kinds[0]}, path, depth)
                return {"anyOf": [self.visit({**rest, "type": t}, path, depth) for t in kinds]}
        elif schema_type is not None and schema_type not in JSON_TYPES:
            self.flag(_join(path, "type"), f"{schema_type!r} is not a JSON type")
            return {}
        types = [schema_type] if isinstance(schema_type, str) else schema_type
        if "const" in node:
            return self._const(node, path, keys, types)
        if "enum" in node:
            return self._enum(node, path, keys, types)
        if schema_type in (None, "object") and (
            "properties" in node
            or ("additionalProperties" in node and node["additionalProperties"] is not True)
        ):
            return self._object(node, path, keys, depth)
        if schema_type in (None, "object") and "allOf" in node:
            return self._all_of(node, path, keys, depth)
        if schema_type in (None, "array") and ("items" in node or "prefixItems" in node):
            return self._array(node, path, keys, depth)
        fmt = node.get("format")
        if schema_type in (None, "string") and "pattern" in node:
            return self._pattern(node, path, keys)
        if schema_type in (None, "string") and isinstance(fmt, str) and (fmt in _FORMATS or _UUID.match(fmt)):
            self._ignored(node, path, keys, {"type", "format"}, frozenset({"string"}), f"beside format {fmt}")
            return {"type": "string", "format": fmt}
        if schema_type == "string" and ("minLength" in node or "maxLength" in node):
            return self._string_length(node, path, keys)
        if schema_type == "object" or not keys:
            return self._any_object(node, path, keys)
        if schema_type is None:
            for key in keys:
                self.flag(_join(path, key), "needs a type" if key in _APPLIES else "")
            return {}
        return self._primitive(node, path, keys, schema_type)

    def _annotation(self, key: str, path: str) -> bool:
        return key in ANNOTATIONS or key.startswith("x-") or (key == "$id" and not path)

    def _ignored(
        self,
        node: Mapping[str, Any],
        path: str,
        keys: Iterable[str],
        used: set[str],
        produced: frozenset[str],
        why: str,
    ) -> None:
        """Flag the keywords of ``node`` the branch does not read and that constrain a type the
        branch can produce; the others constrain nothing there."""
        for key in keys:
            if key in used:
                continue
            if _APPLIES.get(key, _ALL_TYPES) & produced:
                self.flag(_join(path, key), f"ignored {why}" if why else "")

    # ------------------------------------------------------------------ branches

    def _ref(self, ref: Any, path: str, depth: int) -> dict[str, Any]:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            self.flag(path, "only references inside the schema (#/...) are resolved")
            return {}
        name = self._ref_names.get(ref)
        if name is None:
            target = self._resolve(ref)
            if target is None:
                self.flag(path, f"{ref} does not point into the schema")
                return {}
            name = self._ref_names[ref] = f"ref{len(self._ref_names)}"
            self._resolving.add(ref)
            self.defs[name] = self.visit(target, ref[2:].replace("/", "."), depth + 1)
            self._resolving.discard(ref)
        return {"$ref": f"#/$defs/{name}"}

    def _resolve(self, ref: str) -> Any:
        target: Any = self.root
        for raw in ref[2:].split("/") if ref != "#" else ():
            part = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                return None
        return target

    def _union(self, node: Mapping[str, Any], path: str, keys: list[str], depth: int) -> dict[str, Any]:
        kind, other = ("oneOf", "anyOf") if "oneOf" in node else ("anyOf", "oneOf")
        if other in node:
            self.flag(_join(path, other), f"ignored beside {kind}")
        self._ignored(node, path, keys, {kind, other}, _ALL_TYPES, f"beside {kind}")
        alternatives = node.get(kind)
        where = _join(path, kind)
        if not isinstance(alternatives, list) or not alternatives:
            self.flag(where, "must be a non-empty list of schemas")
            return {}
        out = [self.visit(alt, f"{where}[{i}]", depth + 1) for i, alt in enumerate(alternatives)]
        if kind == "oneOf" and not self._exclusive(out):
            self.flag(where, "alternatives that may overlap: a value could match several (use anyOf)")
        return {"anyOf": out}

    def _const(
        self, node: Mapping[str, Any], path: str, keys: list[str], types: list[Any] | None
    ) -> dict[str, Any]:
        value = node["const"]
        if types and not _matches(value, types):
            self.flag(_join(path, "const"), "not of the schema's type")
        self._ignored(node, path, keys, {"const", "type"}, _instance_types(value), "beside const")
        return {"const": value}

    def _enum(
        self, node: Mapping[str, Any], path: str, keys: list[str], types: list[Any] | None
    ) -> dict[str, Any]:
        values = node["enum"]
        if not isinstance(values, list) or not values:
            self.flag(_join(path, "enum"), "must be a non-empty list")
            return {}
        kept = [v for v in values if not types or _matches(v, types)]
        if not kept:
            self.flag(_join(path, "enum"), "no value of the schema's type")
            return {}
        produced = frozenset().union(*(_instance_types(v) for v in kept))
        self._ignored(node, path, keys, {"enum", "type"}, produced, "beside enum")
        return {"enum": kept}

    def _object(self, node: Mapping[str, Any], path: str, keys: list[str], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "object"}
        properties = node.get("properties", {})
        if not isinstance(properties, Mapping):
            self.flag(_join(path, "properties"), "must be an object of schemas")
            properties = {}
        if not path and "" in properties:
            self.flag(_join(path, "properties"), 'a property named "" at the top level')
        out["properties"] = {
            name: self.visit(sub, _join(_join(path, "properties"), name), depth + 1)
            for name, sub in properties.items()
        }
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            self.flag(_join(path, "required"), "must be a list of property names")
            required = []
        for name in required:
            if name not in properties:
                self.flag(_join(path, "required"), f"{name} is required but not in properties")
        out["required"] = list(dict.fromkeys(required))
        extra = node.get("additionalProperties", False)
        if extra is not False:
            if properties:
                self.flag(
                    _join(path, "additionalProperties"),
                    "beside properties: an extra key could repeat a property's name",
                )
            elif extra is not True:
                out["additionalProperties"] = self.visit(
                    extra, _join(path, "additionalProperties"), depth + 1
                )
        used = {"type", "properties", "required", "additionalProperties"}
        used |= self._property_counts(node, len(required), None if extra is not False else len(properties))
        self._ignored(node, path, keys, used, frozenset({"object"}), "beside properties")
        return out

    def _property_counts(self, node: Mapping[str, Any], least: int, most: int | None) -> set[str]:
        """``minProperties``/``maxProperties`` the produced objects always satisfy: at least the
        required properties, at most the declared ones when no other key can appear."""
        met = set()
        low, high = node.get("minProperties"), node.get("maxProperties")
        if isinstance(low, int) and low <= least:
            met.add("minProperties")
        if isinstance(high, int) and most is not None and high >= most:
            met.add("maxProperties")
        return met

    def _all_of(self, node: Mapping[str, Any], path: str, keys: list[str], depth: int) -> dict[str, Any]:
        parts = node["allOf"]
        where = _join(path, "allOf")
        if not isinstance(parts, list) or not parts:
            self.flag(where, "must be a non-empty list of schemas")
            return {}
        if len(parts) == 1 and set(keys) == {"allOf"}:
            return self.visit(parts[0], f"{where}[0]", depth + 1)
        self._ignored(node, path, keys, {"allOf", "type"}, frozenset({"object"}), "beside allOf")
        out, seen = [], set[str]()
        for i, part in enumerate(parts):
            copy = self.visit(part, f"{where}[{i}]", depth + 1)
            original = self._resolve(part["$ref"]) if isinstance(part, Mapping) and "$ref" in part else part
            if isinstance(original, Mapping) and original.get("additionalProperties") is False:
                # alone it forbids the other parts' properties, which the converter merges in
                self.flag(f"{where}[{i}].additionalProperties", "false in a part of allOf")
            shape = self.defs.get(copy["$ref"].rsplit("/", 1)[-1]) if "$ref" in copy else copy
            if not isinstance(shape, Mapping) or set(shape) != {"type", "properties", "required"}:
                # the converter merges only the properties of object schemas
                self.flag(f"{where}[{i}]", "only objects with properties (and no other keyword) are merged")
            else:
                names = set(shape["properties"])
                if names & seen:
                    self.flag(f"{where}[{i}]", "declares a property another part declares too")
                seen |= names
            out.append(copy)
        return {"type": "object", "allOf": out}

    def _array(self, node: Mapping[str, Any], path: str, keys: list[str], depth: int) -> dict[str, Any]:
        items, prefix = node.get("items"), node.get("prefixItems")
        used = {"type", "items", "prefixItems", "additionalItems"}
        out: dict[str, Any] = {"type": "array"}
        if isinstance(items, Mapping):
            if prefix is not None:
                self.flag(_join(path, "prefixItems"), "ignored beside items")
            out["items"] = self.visit(items, _join(path, "items"), depth + 1)
            low, high = self._counts(node, path, "minItems", "maxItems")
            out["minItems"] = low
            if high is not None:
                out["maxItems"] = high
            used |= {"minItems", "maxItems"}
        else:
            if isinstance(items, list):
                tuple_key, entries = "items", items
                if prefix is not None:
                    self.flag(_join(path, "prefixItems"), "ignored beside a list of items")
            elif isinstance(prefix, list) and (items is None or isinstance(items, bool)):
                tuple_key, entries = "prefixItems", prefix
            else:
                self.flag(_join(path, "items"), "must be a schema or a list of schemas")
                return {}
            if not entries:
                self.flag(_join(path, tuple_key), "an empty list of items")
                return {}
            where = _join(path, tuple_key)
            out["prefixItems"] = [self.visit(e, f"{where}[{i}]", depth + 1) for i, e in enumerate(entries)]
            low, high = node.get("minItems", 0), node.get("maxItems")
            if isinstance(low, int) and low <= len(entries):
                used.add("minItems")
            if high is None or (isinstance(high, int) and high >= len(entries)):
                used.add("maxItems")
        self._ignored(node, path, keys, used, frozenset({"array"}), "")
        return out

    def _counts(
        self, node: Mapping[str, Any], path: str, low_key: str, high_key: str
    ) -> tuple[int, int | None]:
        low, high = node.get(low_key, 0), node.get(high_key)
        if not _count(low) or low > REPETITION_LIMIT:
            self.flag(_join(path, low_key), f"an integer up to {REPETITION_LIMIT} is enforced")
            low = 0
        if high is not None and (not _count(high) or high < low or high - low > REPETITION_LIMIT):
            self.flag(_join(path, high_key), f"an integer up to {low_key} + {REPETITION_LIMIT} is enforced")
            high = None
        return low, high

    def _pattern(self, node: Mapping[str, Any], path: str, keys: list[str]) -> dict[str, Any]:
        where = _join(path, "pattern")
        pattern = node["pattern"]
        out: dict[str, Any] = {"type": "string"}
        try:
            out["pattern"] = translate_pattern(pattern)
        except PatternError as error:
            self.flag(where, str(error))
        self._ignored(node, path, keys, {"type", "pattern"}, frozenset({"string"}), "beside pattern")
        return out

    def _string_length(self, node: Mapping[str, Any], path: str, keys: list[str]) -> dict[str, Any]:
        low, high = self._counts(node, path, "minLength", "maxLength")
        fmt = node.get("format")
        if fmt is not None:
            self.flag(_join(path, "format"), _format_why(fmt))
        self._ignored(
            node, path, keys, {"type", "minLength", "maxLength", "format"}, frozenset({"string"}), ""
        )
        out: dict[str, Any] = {"type": "string", "minLength": low}
        if high is not None:
            out["maxLength"] = high
        return out

    def _any_object(self, node: Mapping[str, Any], path: str, keys: list[str]) -> dict[str, Any]:
        used = {"type"}
        used |= self._property_counts(node, 0, None)
        self._ignored(node, path, keys, used, frozenset({"object"}), "")
        return {"type": "object"}

    def _primitive(
        self, node: Mapping[str, Any], path: str, keys: list[str], schema_type: str
    ) -> dict[str, Any]:
        used = {"type"}
        if schema_type == "string" and "format" in node:
            self.flag(_join(path, "format"), _format_why(node["format"]))
            used.add("format")
        produced = frozenset({schema_type, "number"} if schema_type == "integer" else {schema_type})
        self._ignored(node, path, keys, used, produced, "")
        return {"type": schema_type}

    # ------------------------------------------------------------------ oneOf

    def _exclusive(self, alternatives: list[dict[str, Any]]) -> bool:
        """Whether no value the grammar produces for one alternative is valid under another: their
        types differ, their const/enum values differ, or (objects) a property both require has
        const/enum values that differ (a discriminator)."""
        shapes = [self._shape(alt) for alt in alternatives]
        for i, a in enumerate(shapes):
            for b in shapes[i + 1 :]:
                if not _apart(a, b, self._shape):
                    return False
        return True

    def _shape(self, schema: Any) -> Any:
        """``schema`` with a ``$ref`` followed (None while its target is still being built)."""
        seen = 0
        while isinstance(schema, Mapping) and "$ref" in schema and seen < MAX_DEPTH:
            schema = self.defs.get(schema["$ref"].rsplit("/", 1)[-1])
            seen += 1
        return schema


_VACUOUS: dict[str, Any] = {
    "additionalProperties": True,
    "unevaluatedProperties": True,
    "items": True,
    "additionalItems": True,
    "unevaluatedItems": True,
    "uniqueItems": False,
    "required": [],
    "minItems": 0,
    "minLength": 0,
    "minProperties": 0,
    "dependentRequired": {},
    "patternProperties": {},
}
"""Keyword values that constrain nothing (JSON Schema's defaults)."""


def _vacuous(key: str, value: Any) -> bool:
    return key in _VACUOUS and value == _VACUOUS[key] and type(value) is type(_VACUOUS[key])


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _format_why(fmt: Any) -> str:
    return f"only date, time, date-time and uuid formats are, not {fmt!r}"


def _kinds(schema: Any) -> frozenset[str] | None:
    """The JSON types a normalized schema's grammar produces (None: unknown)."""
    if not isinstance(schema, Mapping):
        return None
    if "const" in schema:
        return _instance_types(schema["const"])
    if "enum" in schema:
        return frozenset().union(*(_instance_types(v) for v in schema["enum"]))
    if "anyOf" in schema:
        parts = [_kinds(alt) for alt in schema["anyOf"]]
        return None if any(p is None for p in parts) else frozenset().union(*parts)  # type: ignore[arg-type]
    kind = schema.get("type")
    if kind == "integer":
        return frozenset({"integer", "number"})
    if kind == "number":
        return frozenset({"integer", "number"})  # "1" is a number that is also an integer
    if isinstance(kind, str):
        return frozenset({kind})
    return None


def _values(schema: Any) -> set[str] | None:
    if isinstance(schema, Mapping) and "const" in schema:
        return {_value_key(schema["const"])}
    if isinstance(schema, Mapping) and "enum" in schema:
        return {_value_key(v) for v in schema["enum"]}
    return None


def _apart(a: Any, b: Any, follow: Any) -> bool:
    kinds_a, kinds_b = _kinds(a), _kinds(b)
    if kinds_a is not None and kinds_b is not None and not kinds_a & kinds_b:
        return True
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None:
        return not values_a & values_b
    if isinstance(a, Mapping) and isinstance(b, Mapping) and "properties" in a and "properties" in b:
        for name in set(a.get("required", ())) & set(b.get("required", ())):
            tags_a = _values(follow(a["properties"].get(name)))
            tags_b = _values(follow(b["properties"].get(name)))
            if tags_a is not None and tags_b is not None and not tags_a & tags_b:
                return True
    return False


# ---------------------------------------------------------------------- patterns


class PatternError(ValueError):
    """Why a ``pattern`` cannot be enforced."""


_UNSAFE = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))
"""Code points a JSON string cannot hold unescaped (controls, quote, backslash). The converter writes
a pattern's characters into the string as they are, so a pattern may only produce the others."""

_DOT = '[^"\\\\\\x00-\\x1F\\x7F-\\x9F\\u2028\\u2029]'
"""``.`` without what JSON needs escaped; also without C1 controls and line separators, which some
regex engines' ``.`` does not match either."""

_SHORTHANDS = {
    "d": [(0x30, 0x39)],
    "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "s": [(0x20, 0x20)],
}
"""ASCII subsets of ``\\d``, ``\\w``, ``\\s`` (Python's are Unicode-aware; a subset only narrows the
strings produced). ``\\s`` keeps the space only: its other members need escaping in JSON."""

_SIMPLE_ESCAPES = {"a": 0x07, "b": 0x08, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B}
_LITERAL_SAFE = re.compile(r"[^|.()\[\]{}*+?^$\\\"\x00-\x1F]")


def _code(cp: int) -> str:
    """A code point as a GBNF escape the converter copies through unchanged."""
    if cp < 0x100:
        return f"\\x{cp:02X}"
    if cp < 0x10000:
        return f"\\u{cp:04X}"
    return f"\\U{cp:08X}"


def _subtract(ranges: list[tuple[int, int]], holes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    for lo_h, hi_h in holes:
        kept: list[tuple[int, int]] = []
        for lo, hi in ranges:
            if hi < lo_h or lo > hi_h:
                kept.append((lo, hi))
                continue
            if lo < lo_h:
                kept.append((lo, lo_h - 1))
            if hi > hi_h:
                kept.append((hi_h + 1, hi))
        ranges = kept
    return ranges


def _class(ranges: Iterable[tuple[int, int]], *, negated: bool = False) -> str:
    body = "".join(_code(lo) if lo == hi else f"{_code(lo)}-{_code(hi)}" for lo, hi in ranges)
    return f"[{'^' if negated else ''}{body}]"


def translate_pattern(pattern: Any) -> str:
    """``pattern`` rewritten for the converter: anchored, every character it can produce one a JSON
    string holds unescaped, written in the syntax the converter translates.

    The strings the result matches are a subset of those ``pattern`` matches (Python's ``re``
    semantics, which jsonschema uses): a missing ``^``/``$`` is added (a full match is also a
    match), ``\\d``/``\\w``/``\\s`` become ASCII subsets, ``.`` and negated classes also exclude
    what JSON escapes, positive classes lose those characters, ``(?:...)``/``(?P<name>...)`` are
    plain groups and lazy or possessive quantifiers greedy. Refused (:class:`PatternError`):
    lookarounds, backreferences, inline flags, word boundaries, inner anchors, ``\\D``/``\\W``/
    ``\\S``, a class that has nothing left, a literal character JSON escapes, and counts above
    :data:`REPETITION_LIMIT`."""
    if not isinstance(pattern, str):
        raise PatternError("must be a string")
    try:
        re.compile(pattern)
    except re.error as error:
        raise PatternError(f"not a valid regular expression ({error})") from None
    # one group around it all: the converter writes the body between the string's quotes without
    # parentheses, and a top-level | would bind the quotes to the first and last alternatives only
    return "^(" + _Translator(pattern).run() + ")$"


class _Translator:
    def __init__(self, pattern: str) -> None:
        self.src = pattern
        self.i = 0
        self.end = len(pattern)
        if pattern.startswith("^"):
            self.i = 1
        if pattern.endswith("$") and not _escaped(pattern, len(pattern) - 1) and self.end > self.i:
            self.end -= 1

    def run(self) -> str:
        out: list[str] = []
        src = self.src
        while self.i < self.end:
            c = src[self.i]
            if c == "\\":
                out.append(self._escape())
            elif c == "[":
                out.append(self._class())
            elif c == "(":
                out.append(self._group())
            elif c in ")|":
                out.append(c)
                self.i += 1
            elif c in "*+?":
                out.append(c)
                self.i += 1
                self._lazy()
            elif c == "{":
                out.append(self._count())
            elif c == ".":
                out.append(_DOT)
                self.i += 1
            elif c in "^$":
                raise PatternError(f"an anchor ({c}) inside the pattern is not supported")
            elif _LITERAL_SAFE.match(c):
                out.append(c)
                self.i += 1
            else:
                raise PatternError(f"the character {c!r} cannot appear unescaped in a JSON string")
        return "".join(out)

    def _lazy(self) -> None:
        if self.i < self.end and self.src[self.i] in "?+":
            self.i += 1  # lazy or possessive: the same strings match

    def _count(self) -> str:
        close = self.src.find("}", self.i)
        match = re.fullmatch(r"\{(\d*)(,?)(\d*)\}", self.src[self.i : close + 1]) if close > 0 else None
        if match is None or not (match.group(1) or match.group(3)):
            raise PatternError("a { that is not a {m,n} count")
        low = int(match.group(1) or 0)
        high = int(match.group(3)) if match.group(3) else (low if not match.group(2) else None)
        if low > REPETITION_LIMIT or (high is not None and high - low > REPETITION_LIMIT):
            raise PatternError(f"counts above {REPETITION_LIMIT}")
        self.i = close + 1
        self._lazy()
        return (
            "{"
            + str(low)
            + ("," if high != low else "")
            + (str(high) if high not in (None, low) else "")
            + "}"
        )

    def _group(self) -> str:
        src = self.src
        self.i += 1
        if src.startswith("?:", self.i):
            self.i += 2
        elif src.startswith("?P<", self.i):
            self.i = src.index(">", self.i) + 1
        elif src.startswith("?", self.i):
            raise PatternError("lookarounds, inline flags and other (?...) groups are not supported")
        return "("

    def _escape(self) -> str:
        cp = self._escaped_char(in_class=False)
        if isinstance(cp, list):
            return _class(cp)
        return _class(self._safe([(cp, cp)]))

    def _escaped_char(self, *, in_class: bool) -> int | list[tuple[int, int]]:
        """The code point (or shorthand's ranges) of the escape at ``i``; advances past it."""
        src = self.src
        if self.i + 1 >= len(src):
            raise PatternError("a trailing backslash")
        e = src[self.i + 1]
        self.i += 2
        if e in _SHORTHANDS:
            return list(_SHORTHANDS[e])
        if e in "DWS":
            raise PatternError(f"\\{e} is not supported; write a character class")
        if e in _SIMPLE_ESCAPES and (e != "b" or in_class):
            return _SIMPLE_ESCAPES[e]
        if e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = src[self.i : self.i + width]
            self.i += width
            return int(digits, 16)
        if e.isdigit() or e in "bBAZzgkpPN":
            raise PatternError(f"\\{e} (anchors, word boundaries, backreferences) is not supported")
        return ord(e)

    def _safe(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        kept = _subtract(ranges, _UNSAFE)
        if not kept:
            raise PatternError("it matches only characters a JSON string cannot hold unescaped")
        return kept

    def _class(self) -> str:
        src = self.src
        self.i += 1
        negated = src.startswith("^", self.i)
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.i >= len(src):
                raise PatternError("an unterminated character class")
            c = src[self.i]
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "[":
                raise PatternError("nested sets and POSIX classes are not supported")
            low = self._class_atom(negated)
            if isinstance(low, list):
                ranges.extend(low)
                continue
            if src.startswith("-", self.i) and self.i + 1 < len(src) and src[self.i + 1] != "]":
                self.i += 1
                high = self._class_atom(negated)
                if isinstance(high, list) or high < low:
                    raise PatternError("a character range that is not one")
                ranges.append((low, high))
            else:
                ranges.append((low, low))
        if negated:
            return _class(list(ranges) + list(_UNSAFE), negated=True)
        return _class(self._safe(ranges))

    def _class_atom(self, negated: bool) -> int | list[tuple[int, int]]:
        if self.src[self.i] != "\\":
            self.i += 1
            return ord(self.src[self.i - 1])
        atom = self._escaped_char(in_class=True)
        if isinstance(atom, list) and negated:
            # [^\d] excludes Unicode digits too: an ASCII subset would let them through
            raise PatternError("shorthands (\\d, \\w, \\s) in a negated class are not supported")
        return atom


def _escaped(text: str, index: int) -> bool:
    """Whether the character at ``index`` is escaped (an odd run of backslashes before it)."""
    run = 0
    while index - run - 1 >= 0 and text[index - run - 1] == "\\":
        run += 1
    return run % 2 == 1
