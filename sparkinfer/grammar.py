"""Grammar-constrained decoding: JSON schemas and tool calls as token masks, with llguidance.

Why llguidance (over xgrammar): it installs from PyPI as one abi3 wheel with no dependencies
(xgrammar pulls in torch, transformers and triton), builds its tokenizer straight from the
`tokenizers` JSON our `Tokenizer` already holds, computes a mask in tens of microseconds with
no per-schema precompilation, takes Lark grammars with JSON schemas inside (`%json{...}`:
"a tool call or a JSON answer" is one grammar), and is kept by the guidance-ai team and used
by vLLM, SGLang and llama.cpp.

`Grammars(tokenizer, eos)` compiles per model: `json_schema(schema)`, `json_object()`,
`tool_calls(tools, ...)`; each gives a `Grammar` whose `constraint()` is the per-request
`TokenConstraint` the engine drives (runtime/processing.py). A schema or grammar llguidance
cannot handle raises GrammarError saying why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sparkinfer.errors import SparkInferError

# A token mask is one bit a token, 32 to an int32 word (llguidance's bitmask layout), as
# kernels/logits.py reads it on the device and the step's `token_mask` input holds it.
MASK_BITS = 32


def mask_words(vocab: int) -> int:
    """int32 words of a token mask over `vocab` tokens."""
    return -(-vocab // MASK_BITS)


class GrammarError(SparkInferError):
    """A JSON schema, tool definition or grammar that cannot constrain decoding."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise GrammarError("constrained decoding needs llguidance (a dependency of sparkinfer): pip install llguidance") from None
    return llguidance


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model family writes a tool call: `open` + {"name": ..., "arguments": {...}} +
    `close`. Qwen's (and Hermes') `<tool_call>` form is the one known today, and what the
    server falls back to for a chat template that does not render tools."""

    open: str = "<tool_call>\n"
    close: str = "\n</tool_call>"
    separator: str = "\n"

    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.open.strip()) + r"\s*(.*?)\s*" + re.escape(self.close.strip()), re.S)

    def render(self, name: str, arguments: Any) -> str:
        return self.open + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + self.close


class Grammar:
    """One compiled grammar (llguidance's serialised form, checked against the tokenizer)."""

    def __init__(self, grammars: Grammars, source: str) -> None:
        self._grammars = grammars
        self.source = source

    def constraint(self) -> GrammarConstraint:
        return GrammarConstraint(self._grammars.matcher(self.source))


class GrammarConstraint:
    """The per-request matcher: the engine asks for the mask before each sampled token and
    hands back the token sampled."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill_mask(self, mask: np.ndarray) -> None:
        self._matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        self._check()

    def accept(self, token: int) -> None:
        if not self._matcher.is_stopped():
            self._matcher.consume_token(int(token))
            self._check()

    @property
    def finished(self) -> bool:
        return bool(self._matcher.is_stopped() or self._matcher.is_accepting())

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"constrained decoding failed: {self._matcher.get_error()}")


class Grammars:
    """The grammar compiler for one tokenizer. `eos`: the tokens that end the text once the
    grammar is complete (the engine's stop tokens)."""

    def __init__(self, tokenizer: Any, eos: Sequence[int]) -> None:
        llg = _llguidance()
        self._llg = llg
        if not eos:
            raise GrammarError("constrained decoding needs an end-of-text token, and the model names none")
        self.tokenizer = llg.LLTokenizer(tokenizer._backend.to_str(), n_vocab=tokenizer.vocab_size,
                                         eos_token=list(eos))

    def matcher(self, source: str) -> Any:
        matcher = self._llg.LLMatcher(self.tokenizer, source, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher

    def _compile(self, source: str) -> Grammar:
        error = self._llg.LLMatcher.validate_grammar(source, self.tokenizer)
        if error:
            raise GrammarError(error)
        return Grammar(self, source)

    def json_schema(self, schema: Any) -> Grammar:
        """Output that is one JSON value valid under `schema` (bounded: see `bounded`)."""
        check_schema(schema)
        try:
            source = self._llg.LLMatcher.grammar_from_json_schema(json.dumps(bounded(schema)),
                                                                  defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"the JSON schema cannot be used: {e}") from None
        return self._compile_schema(source)

    def json_object(self) -> Grammar:
        """Any JSON object (response_format json_object), bounded as `bounded` bounds schemas."""
        return self._compile(self._llg.LLMatcher.grammar_from_lark(_json_object_lark()))

    def tool_calls(self, tools: Sequence[dict[str, Any]], fmt: ToolCallFormat, *, name: str | None = None,
                   parallel: bool = True, answer: Any = None) -> Grammar:
        """One tool call of `name` (or of any tool; with `parallel`, one or more), each in `fmt`
        with arguments valid under the function's parameters. `answer`: the other choice
        besides calls (tool_choice auto with a response_format), a JSON schema or
        "json_object"; None: calls only."""
        chosen = [t for t in tools if name is None or t["function"]["name"] == name]
        alternatives = [f"%json{_inline(_call_schema(t['function']))}" for t in chosen]
        lines = [
            f"start: {'calls' if answer is None else 'calls | answer'}",
            f"calls: call ({json.dumps(fmt.separator)} call)*" if parallel and name is None else "calls: call",
            f"call: {json.dumps(fmt.open)} body {json.dumps(fmt.close)}",
            "body: " + " | ".join(alternatives),
        ]
        if answer == "json_object":
            lines += ["answer: object0", *_json_object_lark().split("\n")[1:]]
        elif answer is not None:
            check_schema(answer)
            lines.append(f"answer: %json{_inline(answer)}")
        return self._compile_schema(self._llg.LLMatcher.grammar_from_lark("\n".join(lines)))

    def _compile_schema(self, source: str) -> Grammar:
        try:
            return self._compile(source)
        except GrammarError as e:
            raise GrammarError(f"the JSON schema cannot be used: {e}") from None


# Whitespace as json.dumps writes it and nowhere else: free whitespace between tokens is where
# a small model wanders until max_tokens.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                 "coerce_one_of": True}


# What `bounded` gives what a schema leaves open, so that every constrained output ends.
MAX_STRING = 64  # characters
MAX_ITEMS = 8  # array items, object members
MAX_MAGNITUDE = 10**9  # numbers
MAX_DECIMALS = 6  # fraction digits of a number
MAX_DEPTH = 3  # nesting of a free-form JSON object


def bounded(schema: Any) -> Any:
    """`schema` with what it leaves unbounded bounded: strings without maxLength, pattern, enum,
    const or format get maxLength MAX_STRING; numbers without a bound get +-MAX_MAGNITUDE, and
    without multipleOf MAX_DECIMALS fraction digits (a multipleOf of the grammar only: the
    output is checked against `schema`, which has none, so no float division is involved);
    arrays without maxItems get MAX_ITEMS (or minItems); objects that do not say
    additionalProperties are closed to the properties they list. Every value valid under the
    result is valid under `schema`; without this a model can write one string, number or
    list forever (a small one does), and the output never ends in valid JSON."""
    if isinstance(schema, list):
        return [bounded(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
        if isinstance(out.get(key), dict):
            out[key] = {k: bounded(v) for k, v in out[key].items()}
    for key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems", "contains", "then", "else"):
        if key in out:
            out[key] = bounded(out[key])
    types = out.get("type")
    types = {types} if isinstance(types, str) else set(types or ())
    if not types and "properties" in out:
        types = {"object"}
    if "string" in types and not any(k in out for k in ("maxLength", "pattern", "enum", "const", "format")):
        out["maxLength"] = max(int(out.get("minLength", 0)), MAX_STRING)
    if types & {"integer", "number"}:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = min(-MAX_MAGNITUDE, _number(out.get("maximum", out.get("exclusiveMaximum", 0))) - 1)
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = max(MAX_MAGNITUDE, _number(out.get("minimum", out.get("exclusiveMinimum", 0))) + 1)
        if "number" in types and "multipleOf" not in out:
            out["multipleOf"] = 10.0**-MAX_DECIMALS
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max(int(out.get("minItems", 0)), MAX_ITEMS)
    if "object" in types and "additionalProperties" not in out and "patternProperties" not in out:
        listed = set(out.get("properties", {}))
        if set(out.get("required", ())) <= listed:
            out["additionalProperties"] = False
    return out


def _inline(schema: Any) -> str:
    """A schema for Lark's %json{...}: bounded, with the JSON options inside (x-guidance)."""
    out = bounded(schema)
    if isinstance(out, bool):
        out = {} if out else {"not": {}}
    return json.dumps({**out, "x-guidance": _JSON_OPTIONS})


def _number(value: Any) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _json_object_lark() -> str:
    """A Lark grammar of JSON objects nested at most MAX_DEPTH deep, MAX_ITEMS members or items
    each, keys identifiers, strings and numbers bounded as `bounded` bounds them."""
    scalar = 'STRING | NUMBER | "true" | "false" | "null"'
    rules = ["start: object0"]
    for d in range(MAX_DEPTH):
        value = f"object{d + 1} | array{d + 1} | {scalar}" if d + 1 < MAX_DEPTH else scalar
        rules += [f"value{d}: {value}",
                  f'object{d}: "{{" (pair{d} (", " pair{d}){{0,{MAX_ITEMS - 1}}})? "}}"',
                  f'pair{d}: KEY ": " value{d}',
                  f'array{d}: "[" (value{d} (", " value{d}){{0,{MAX_ITEMS - 1}}})? "]"']
    digits = len(str(MAX_MAGNITUDE)) - 1
    rules += [f'KEY: /"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_STRING // 2 - 1}}}"/',
              r'STRING: /"([^"\\\x00-\x1f]|\\["\\bfnrt])' + f'{{0,{MAX_STRING}}}"/',
              rf"NUMBER: /-?(0|[1-9][0-9]{{0,{digits - 1}}})(\.[0-9]{{1,6}})?/"]
    return "\n".join(rules)


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def check_schema(schema: Any) -> None:
    """GrammarError unless `schema` is a JSON schema (an object or a boolean) that is itself
    valid under its metaschema (Draft 2020-12 unless it names another)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema is an object, got {type(schema).__name__}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise GrammarError(f"invalid JSON schema{f' at {where}' if where else ''}: {e.message}") from None


__all__ = ["Grammar", "GrammarConstraint", "GrammarError", "Grammars", "ToolCallFormat", "check_schema"]
