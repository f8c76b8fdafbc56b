"""Tool calls in text, without a model: spelling tools and calls into messages for a template
that does not render them, reading calls back, and holding a streamed call until it is whole."""

import json

from sparkinfer.grammar import ToolCallFormat
from sparkinfer.server.tools import ToolCallStream, parse_tool_calls, spell_tools, template_renders_tools

FMT = ToolCallFormat()
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_calls_are_read_out_of_the_text() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    content, calls = parse_tool_calls(text, FMT)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_a_block_that_is_not_a_call_stays_content() -> None:
    text = "<tool_call>\nnot json\n</tool_call>"
    assert parse_tool_calls(text, FMT) == (text, [])
    assert parse_tool_calls("plain", FMT) == ("plain", [])


def test_tools_and_history_are_spelled_for_a_plain_template() -> None:
    assert not template_renders_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template_renders_tools("{% if tools %}...{% endif %}")
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    out = spell_tools(messages, [TOOL], FMT)
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    assert out[2]["content"] == FMT.render("get_weather", {"city": "Paris"}) and "tool_calls" not in out[2]
    assert out[3] == {"role": "tool", "content": "<tool_response>\nsunny\n</tool_response>", "tool_call_id": "call_1"}
    assert messages[1]["tool_calls"]  # the request's own messages are left alone


def test_stream_passes_content_and_holds_calls() -> None:
    stream = ToolCallStream(FMT)
    pieces = ["Sure", ". <tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {}}\n</tool_call>"]
    passed = [stream.push(p) for p in pieces]
    assert "".join(passed) == "Sure. " and passed[1] == ". "  # "<tool" was held back, then kept
    rest, calls = stream.finish()
    assert rest == "" and [c.name for c in calls] == ["get_weather"]
    plain = ToolCallStream(FMT)
    assert plain.push("a <to") == "a " and plain.finish() == ("<to", [])
