"""sparkinfer.grammar without a model: what `bounded` adds to a schema (and that it only ever
narrows it), the tool-call format, malformed schemas refused with the reason."""

import json

import jsonschema
import pytest

from sparkinfer.grammar import MAX_DECIMALS, MAX_ITEMS, MAX_MAGNITUDE, MAX_STRING, GrammarError, ToolCallFormat
from sparkinfer.grammar import bounded, check_schema


def test_bounded_bounds_what_a_schema_leaves_open() -> None:
    schema = {"type": "object", "properties": {
        "s": {"type": "string"}, "n": {"type": "number"}, "i": {"type": "integer", "minimum": 5},
        "a": {"type": "array", "items": {"type": "string", "maxLength": 3}},
        "o": {"type": "object", "properties": {"k": {"type": "string", "enum": ["x"]}}}}, "required": ["s"]}
    out = bounded(schema)
    p = out["properties"]
    assert p["s"]["maxLength"] == MAX_STRING
    assert (p["n"]["minimum"], p["n"]["maximum"], p["n"]["multipleOf"]) == (-MAX_MAGNITUDE, MAX_MAGNITUDE,
                                                                           10.0**-MAX_DECIMALS)
    assert p["i"]["minimum"] == 5 and p["i"]["maximum"] == MAX_MAGNITUDE and "multipleOf" not in p["i"]
    assert p["a"]["maxItems"] == MAX_ITEMS and p["a"]["items"] == {"type": "string", "maxLength": 3}
    assert out["additionalProperties"] is False and p["o"]["additionalProperties"] is False
    assert p["o"]["properties"]["k"] == {"type": "string", "enum": ["x"]}  # an enum is bounded already
    assert schema["properties"]["s"] == {"type": "string"}  # the input is not modified


def test_bounded_keeps_what_the_schema_says() -> None:
    schema = {"type": "object", "additionalProperties": True, "required": ["x"],
              "properties": {"l": {"type": "array", "minItems": 20}, "t": {"type": "string", "minLength": 100}}}
    out = bounded(schema)
    assert out["additionalProperties"] is True
    assert out["properties"]["l"]["maxItems"] == 20 and out["properties"]["t"]["maxLength"] == 100
    # `required` names a property it does not list: closing the object would make it unsatisfiable.
    assert "additionalProperties" not in bounded({"type": "object", "required": ["x"]})


def test_what_bounded_allows_the_schema_allows() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "number"}, "s": {"type": "string"}}}
    validator = jsonschema.Draft202012Validator(bounded(schema))
    for doc in ({"n": 0.125, "s": "x"}, {}, {"n": -3}):
        assert validator.is_valid(doc)
        jsonschema.validate(doc, schema)
    assert not validator.is_valid({"n": 0.1234567}) and not validator.is_valid({"z": 1})


@pytest.mark.parametrize("schema, message", [
    ({"type": "objekt"}, "invalid JSON schema at type"),
    ({"properties": {"a": {"minLength": -1}}}, "invalid JSON schema at properties/a/minLength"),
    ([1], "a JSON schema is an object, got list"),
])
def test_malformed_schemas_are_refused_naming_where(schema: object, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        check_schema(schema)


def test_tool_call_format_reads_what_it_writes() -> None:
    fmt = ToolCallFormat()
    text = fmt.render("f", {"a": [1, 2]})
    assert text == '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}\n</tool_call>'
    match = fmt.pattern().fullmatch(text)
    assert match is not None and json.loads(match.group(1)) == {"name": "f", "arguments": {"a": [1, 2]}}
