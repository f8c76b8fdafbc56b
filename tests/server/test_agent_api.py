"""The agent-grade API against the shipped model on the CPU, through the official `openai`
client on loopback: tool calls (forced and named, a whole round trip, streamed and not),
structured outputs (54 schemas, every output valid), logprobs equal to the decode step's, penalties
that move the distribution as defined, reproducible seeds, 400s for malformed tools and
schemas, and the OpenAI Agents SDK running a two-step tool task.

The shipped model writes Python, not tool calls: every valid call and JSON document here is
the grammar's doing (what a small local model needs it for)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterator

import jsonschema
import numpy as np
import openai
import pytest

from sparkinfer.accuracy.metrics import log_softmax

from tests.server.conftest import Server, serving
from tests.server.schemas import SCHEMAS
from tests.server.tiny import load_shipped

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def shipped() -> Iterator[Server]:
    with serving(load_shipped()) as s:
        yield s


@pytest.fixture(scope="module")
def client(shipped: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=shipped.url + "/v1", api_key="none", max_retries=0, timeout=60)


def parameters(name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def assert_valid_calls(calls: list[Any], names: set[str]) -> None:
    assert calls, "no tool call came back"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), parameters(call.function.name))


# -- tool calls ----------------------------------------------------------------------------


def test_required_tool_choice_yields_valid_calls(client: openai.OpenAI) -> None:
    for seed in range(2):
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                           seed=seed, max_tokens=200)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert_valid_calls(choice.message.tool_calls, {"get_weather", "get_time"})


def test_named_tool_choice_calls_that_function_once(client: openai.OpenAI) -> None:
    for seed in range(2):
        r = client.chat.completions.create(
            model="m", messages=ASK, tools=TOOLS, seed=seed, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_time"}})
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"
        assert_valid_calls(calls, {"get_time"})


def run_tool(call: Any) -> str:
    args = json.loads(call.function.arguments)
    return json.dumps({"city": args.get("city"), "temperature": 21} if call.function.name == "get_weather"
                      else {"zone": args.get("zone"), "time": "12:00"})


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_tool_call_round_trip(client: openai.OpenAI, stream: bool) -> None:
    """Call, tool result, final answer; streamed through the client's own stream helper,
    which assembles `delta.tool_calls` into whole calls."""
    kwargs: dict[str, Any] = {"model": "m", "tools": TOOLS, "seed": 7, "max_tokens": 200}
    if stream:
        with client.chat.completions.stream(messages=ASK, tool_choice="required",
                                            stream_options={"include_usage": True}, **kwargs) as s:
            first = s.get_final_completion()
    else:
        first = client.chat.completions.create(messages=ASK, tool_choice="required", **kwargs)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(message.tool_calls, {"get_weather", "get_time"})
    history = ASK + [{"role": "assistant", "content": None,
                      "tool_calls": [c.model_dump(include={"id", "type", "function"}) for c in message.tool_calls]}]
    history += [{"role": "tool", "tool_call_id": c.id, "content": run_tool(c)} for c in message.tool_calls]
    # The answer (auto: the model is free, and writes text): the client's stream helper refuses
    # a "length" finish, which the model that writes Python rather than answers reaches.
    answer: dict[str, Any] = {**kwargs, "messages": history, "tool_choice": "auto", "max_tokens": 16}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **answer))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
        usage = chunks[-1].usage
    else:
        final = client.chat.completions.create(**answer)
        content, reason = final.choices[0].message.content, final.choices[0].finish_reason
        calls, usage = final.choices[0].message.tool_calls or [], final.usage
    assert reason in ("stop", "length") and not calls and content
    # The tools, the call and its result were all in the prompt.
    assert usage.prompt_tokens > first.usage.prompt_tokens + 10


def test_streamed_calls_arrive_as_indexed_deltas(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        seed=3, max_tokens=200, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), parameters("get_weather"))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_auto_tool_choice_leaves_the_model_free(client: openai.OpenAI) -> None:
    """The model writes Python, not calls: with `auto` nothing forces one, so none comes."""
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, seed=1, max_tokens=16, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


# -- structured outputs --------------------------------------------------------------------


def test_every_schema_yields_valid_json(client: openai.OpenAI) -> None:
    """54 schemas, one sampled answer each (temperature 1): all valid, all finished."""
    failures = []
    for i, schema in enumerate(SCHEMAS):
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Reply in JSON."}], seed=i, max_tokens=400,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        text = r.choices[0].message.content
        try:
            jsonschema.validate(json.loads(text), schema)
            assert r.choices[0].finish_reason == "stop"
        except (ValueError, AssertionError, jsonschema.ValidationError) as e:
            failures.append((i, text, str(e)[:200]))
    assert not failures, failures


def test_json_object_and_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "JSON please"}], seed=5,
                                       max_tokens=400, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    chunks = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "JSON please"}], seed=5, max_tokens=400, stream=True,
        response_format={"type": "json_object"})
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_python_api_json_schema(shipped: Server) -> None:
    schema = SCHEMAS[15]
    text = shipped.llm.generate("def main():", 300, temperature=1.0, seed=2, json_schema=schema)
    jsonschema.validate(json.loads(text), schema)


# -- logprobs ------------------------------------------------------------------------------


def stream_logits(llm: Any, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """The logits each of `tokens` was drawn from, teacher-forced as generation made them: the
    prompt through the T-token step, then the decode step (the token loop) on the cache it left."""
    return np.concatenate([llm.engine.forward(prompt)[-1:],
                           llm.engine.forward(tokens[:-1], reset=False, token_loop=True)])


def test_chat_logprobs_equal_the_decode_step_s(shipped: Server, client: openai.OpenAI) -> None:
    llm = shipped.llm
    r = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=12, logprobs=True,
                                       top_logprobs=3)
    entries = r.choices[0].logprobs.content
    prompt = llm.prompt_tokens(ASK)
    tokens = llm.engine.generate(prompt, 12, temperature=0.0, stop_tokens=()).all()[: len(entries)]
    # (`LLM.score` takes every position from the T-token step, which on the cpu step's int8
    # activations may round a value to another int8 value than the decode step does, and then
    # differ by ~1e-2: tests/runtime/test_runtime_prefill.py.)
    expected = log_softmax(stream_logits(llm, prompt, tokens))[np.arange(len(tokens)), tokens]
    np.testing.assert_allclose([e.logprob for e in entries], expected, atol=1e-4)
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace").startswith(r.choices[0].message.content)
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)


def test_completion_logprobs_streamed_equal_plain(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": "m", "prompt": "import os\n", "max_tokens": 10, "logprobs": 2, "seed": 4}
    plain = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **args)]
    streamed = [lp for c in chunks if c.logprobs for lp in c.logprobs.token_logprobs]
    assert streamed == plain.logprobs.token_logprobs and len(streamed) == 10
    assert plain.logprobs.text_offset[0] == 0 and "".join(plain.logprobs.tokens) == plain.text
    assert all(len(top) <= 2 for top in plain.logprobs.top_logprobs)


# -- penalties and seeds -------------------------------------------------------------------


def repeats(client: openai.OpenAI, **penalty: float) -> float:
    """The share of generated tokens that repeat one generated before, over 3 samples."""
    repeated = total = 0
    for seed in range(3):
        r = client.completions.create(model="m", prompt="def parse(line):\n", max_tokens=32, seed=seed,
                                      logprobs=0, stop=[], **penalty)
        tokens = r.choices[0].logprobs.tokens
        seen: Counter[str] = Counter()
        for t in tokens:
            repeated += seen[t] > 0
            seen[t] += 1
        total += len(tokens)
    return repeated / total


def test_penalties_move_the_distribution_as_defined(client: openai.OpenAI) -> None:
    """Positive presence/frequency penalties and a repetition penalty > 1 repeat fewer tokens
    than none; a negative presence penalty repeats more."""
    base = repeats(client)
    shares = {"frequency 2": repeats(client, frequency_penalty=2.0), "presence 2": repeats(client, presence_penalty=2.0),
              "repetition 2": repeats(client, extra_body={"repetition_penalty": 2.0}),
              "presence -2": repeats(client, presence_penalty=-2.0)}
    assert all(shares[k] < base - 0.1 for k in ("frequency 2", "presence 2", "repetition 2")), (base, shares)
    assert shares["presence -2"] > base + 0.1, (base, shares)


def test_greedy_penalised_tokens_follow_the_reference(shipped: Server) -> None:
    """Each greedy token is the argmax of the numpy reference's processed logits of the raw
    logits (Engine.forward's, the prompt chunked and the rest token by token as `complete` runs
    them) with the counts of the tokens before it."""
    from sparkinfer.kernels.logits import mask_words, process_logits_reference

    llm = shipped.llm
    prompt = llm.tokenize("class Parser:\n")
    params = np.array([0.7, 0.9, 1.5], np.float32)
    c = llm.complete(prompt, 24, presence_penalty=0.7, frequency_penalty=0.9, repetition_penalty=1.5,
                     stop_tokens=())
    logits = stream_logits(llm, prompt, c.tokens)
    counts = np.zeros(llm.config.vocab_size, np.int32)
    mask = np.full(mask_words(llm.config.vocab_size), -1, np.int32)
    for row, token in zip(logits, c.tokens):
        assert int(np.argmax(process_logits_reference(row, params, mask, counts))) == token
        counts[token] += 1


def test_seed_reproduces_with_penalties_grammar_and_logprobs(client: openai.OpenAI) -> None:
    def once() -> tuple[str, list[float]]:
        r = client.chat.completions.create(
            model="m", messages=ASK, seed=11, temperature=1.2, presence_penalty=0.5, frequency_penalty=0.5,
            max_tokens=200, logprobs=True, response_format={"type": "json_schema", "json_schema": {
                "name": "w", "schema": parameters("get_weather")}})
        return r.choices[0].message.content, [e.logprob for e in r.choices[0].logprobs.content]

    assert once() == once()


# -- bad input -----------------------------------------------------------------------------


BAD = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [WEATHER, WEATHER]}, "two tools are named 'get_weather'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters: invalid JSON schema at type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "propertyNames": {
        "maxLength": 3}}}}]}, "Unimplemented keys: [\"propertyNames\"]"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice names the function 'nope'"),
    ({"tool_choice": "required"}, "tool_choice is 'required' but no tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "needs a 'json_schema' object"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}},
     "response_format.json_schema.schema: the JSON schema cannot be used"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": 3}}},
     "response_format.json_schema.schema"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m[:40] for _, m in BAD])
def test_malformed_requests_get_a_400_naming_the_problem(client: openai.OpenAI, extra: dict[str, Any],
                                                         message: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, max_tokens=4, extra_body=extra)
    assert message in e.value.body["message"], e.value.body


def test_completion_logprobs_over_five_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", max_tokens=2, logprobs=6)
    assert "logprobs" in e.value.body["message"]


# -- an agent framework --------------------------------------------------------------------


def test_agents_sdk_runs_a_two_step_tool_task(shipped: Server) -> None:
    """The OpenAI Agents SDK, on chat completions against the server: the model must call a
    tool (tool_choice required on the first turn; the SDK then resets it to auto, which
    finishes with text), the SDK runs it and sends the result back, the model answers."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    model = agents.OpenAIChatCompletionsModel(
        model="m", openai_client=openai.AsyncOpenAI(base_url=shipped.url + "/v1", api_key="none", max_retries=0))
    agent = agents.Agent(name="weather", instructions="Answer with the weather.", model=model, tools=[get_weather],
                         model_settings=agents.ModelSettings(tool_choice="required", max_tokens=64, temperature=0.7,
                                                             extra_body={"seed": 1}))
    result = agents.Runner.run_sync(agent, "Weather in Paris?", max_turns=4)
    assert len(calls) == 1 and isinstance(calls[0], str)
    outputs = [item for item in result.new_items if item.type == "tool_call_output_item"]
    assert outputs and outputs[0].output == f"sunny in {calls[0]}"
    assert isinstance(result.final_output, str) and result.final_output
