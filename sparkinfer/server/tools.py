"""Tool calls in chat: rendering tools and calls into the prompt where the chat template does not,
finding the calls in the generated text, and streaming them as `delta.tool_calls`.

A chat template that renders tools (it mentions `tools`) gets them as the `tools` variable and
the messages as they came (assistant `tool_calls`, `role: tool` results), as transformers
passes them. One that does not (the shipped model's plain ChatML) gets the Qwen/Hermes
convention spelled into the messages: the tools listed in a system message, past calls
written into the assistant's content, results wrapped in <tool_response>. The calls are read
back in `ToolCallFormat` (grammar.py), which the decoding grammar also writes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from sparkinfer.grammar import ToolCallFormat


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's wire format)
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def template_renders_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tools_prompt(tools: Sequence[dict[str, Any]], fmt: ToolCallFormat) -> str:
    """The system text that lists the tools and how to call them (Qwen's wording)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    example = fmt.open + '{"name": <function-name>, "arguments": <args-json-object>}' + fmt.close
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{fmt.open.strip()}{fmt.close.strip()} XML tags:\n{example}")


def spell_tools(messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                fmt: ToolCallFormat) -> list[dict[str, Any]]:
    """`messages` with tools, past calls and tool results written as text, for a chat template
    that does not render them."""
    out = []
    for m in messages:
        m = dict(m)
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [fmt.render(c["function"]["name"], _arguments_value(c["function"].get("arguments")))
                     for c in m.pop("tool_calls") if isinstance(c, dict) and isinstance(c.get("function"), dict)]
            m["content"] = "\n".join(([m["content"]] if m["content"] else []) + calls)
        elif m["role"] == "tool":
            m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
        out.append(m)
    if tools:
        text = tools_prompt(tools, fmt)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _arguments_value(arguments: Any) -> Any:
    """A call's arguments as a value: OpenAI sends them as a JSON string."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def parse_tool_calls(text: str, fmt: ToolCallFormat) -> tuple[str | None, list[ToolCall]]:
    """(the text outside the calls or None, the calls) of a generated text. A block that is not
    a JSON object with a string "name" stays in the content: it was not a call."""
    calls: list[ToolCall] = []
    content: list[str] = []
    last = 0
    for match in fmt.pattern().finditer(text):
        call = _call_of(match.group(1))
        if call is None:
            continue
        content.append(text[last:match.start()])
        last = match.end()
        calls.append(call)
    content.append(text[last:])
    rest = "".join(content).strip()
    return (rest or None) if calls else (text or None), calls


def _call_of(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """Splits streamed text into content to pass on now and tool calls found at the end: text
    is passed on until the opening of a call appears (a tail that could be its start is held
    back); from there on everything is held and parsed when the generation ends."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.fmt = fmt
        self._tag = fmt.open.strip()
        self._held = ""
        self._calling = False

    def push(self, text: str) -> str:
        """The part of `text` that is content for sure."""
        self._held += text
        if self._calling:
            return ""
        at = self._held.find(self._tag)
        if at >= 0:
            self._calling = True
            out, self._held = self._held[:at], self._held[at:]
            return out
        keep = 0
        for k in range(min(len(self._tag) - 1, len(self._held)), 0, -1):
            if self._held.endswith(self._tag[:k]):
                keep = k
                break
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still held, the calls) at the end of the generation."""
        held, self._held = self._held, ""
        if not self._calling:
            return held, []
        content, calls = parse_tool_calls(held, self.fmt)
        return content or "", calls
