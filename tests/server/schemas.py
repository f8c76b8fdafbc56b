"""JSON schemas for the structured-output tests: nested objects, arrays, enums, numbers with and
without bounds, optional fields, unions, references, constants, patterns. 24 written out, and
30 objects generated from a grid of field kinds (three fields each, one of them optional)."""

from __future__ import annotations

import itertools
from typing import Any

WRITTEN: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}, "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                             "y": {"type": "integer"}},
                                                "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 5},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    {"type": "boolean"},
    {"type": "null"},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}}, "required": ["id"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}]}},
     "required": ["v"]},
    {"type": "object", "properties": {"kind": {"const": "event"}, "at": {"type": "integer"}}, "required": ["kind", "at"]},
    {"$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                        "required": ["sku", "qty"]}},
     "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1}},
     "required": ["items"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}, "required": ["c"]}}, "required": ["b"]}},
     "required": ["a"]},
    {"type": "object", "properties": {"name": {"type": "string", "minLength": 2, "maxLength": 8},
                                      "nick": {"type": "string"}}, "required": ["name"]},
    {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "number"}, "minItems": 3,
                                                 "maxItems": 3}}, "required": ["values"]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]},
    {"type": "object", "properties": {"maybe": {"type": ["string", "null"]}}, "required": ["maybe"]},
    {"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                                               "items": False}}, "required": ["pair"]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]},
                                      "note": {"type": "string", "maxLength": 20}}, "required": ["level", "note"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 3, "items": {
        "type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": -5, "maximum": 5}}}}, "required": ["matrix"]},
]

_KINDS: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "pos": {"type": "integer", "minimum": 1, "maximum": 1000},
    "num": {"type": "number"},
    "bool": {"type": "boolean"},
    "enum": {"enum": ["alpha", "beta", 3, None]},
    "list": {"type": "array", "items": {"type": "integer"}},
    "obj": {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]},
    "short": {"type": "string", "maxLength": 4},
    "nullable": {"type": ["integer", "null"]},
}


def _generated() -> list[dict[str, Any]]:
    out = []
    for i, (a, b, c) in enumerate(itertools.islice(itertools.combinations(sorted(_KINDS), 3), 0, 120, 4)):
        props = {f"f_{a}": _KINDS[a], f"f_{b}": _KINDS[b], f"f_{c}": _KINDS[c]}
        out.append({"type": "object", "properties": props, "required": [f"f_{a}", f"f_{b}"] if i % 2 else list(props)})
    return out


SCHEMAS = WRITTEN + _generated()
