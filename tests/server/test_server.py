"""The OpenAI-compatible server on the CPU: the `openai` client against it (chat and completions,
streaming and not, stop sequences, usage), malformed requests, the context limit, a burst of
clients against the bounded queue, and clients that go away mid-generation."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import QUEUE_SIZE, Server

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture()
def client(server: Server) -> openai.OpenAI:
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    yield c
    c.close()
    server.wait_idle()


def reference(server: Server, prompt: Any, max_tokens: int, **options: Any) -> Any:
    """What the API gives for the same request (the server is idle between requests)."""
    server.wait_idle()
    return server.llm.complete(prompt, max_tokens, **options)


# -- health and models ---------------------------------------------------------------------


def test_health_and_models(server: Server, http: httpx.Client, client: openai.OpenAI) -> None:
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == server.llm.name
    assert health["queue_size"] == QUEUE_SIZE and health["busy"] is False
    models = client.models.list()
    assert [m.id for m in models.data] == [server.llm.name]
    assert models.data[0].owned_by == "sparkinfer"
    assert http.get(f"/v1/models/{server.llm.name}").json()["context_length"] == 256
    r = http.get("/v1/models/gpt-9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# -- the openai client ---------------------------------------------------------------------


def test_chat_completion(server: Server, client: openai.OpenAI) -> None:
    want = reference(server, MESSAGES, 12)
    r = client.chat.completions.create(model="anything", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == server.llm.name
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        want.prompt_tokens, 12, want.prompt_tokens + 12)


def test_not_busy_once_a_reply_has_arrived(http: httpx.Client) -> None:
    for _ in range(5):  # the race it guards against (busy until the worker's loop turned) was rare
        r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 200
        assert http.get("/health").json()["busy"] is False


def test_chat_completion_streaming(server: Server, client: openai.OpenAI) -> None:
    want = reference(server, MESSAGES, 12)
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens


def test_completion_and_token_prompts(server: Server, client: openai.OpenAI) -> None:
    want = reference(server, "Once upon a time", 10)
    r = client.completions.create(model="m", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    ids = server.llm.tokenize("Once upon a time")
    r = client.completions.create(model="m", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model="m", prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_completion_streaming(server: Server, client: openai.OpenAI) -> None:
    want = reference(server, "Once upon a time", 10)
    chunks = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequences(server: Server, client: openai.OpenAI) -> None:
    whole = reference(server, MESSAGES, 30).text
    stop = whole[8:11]
    cut = whole[: whole.find(stop)]
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=30, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    prompt_text = server.llm.apply_chat_template(MESSAGES)
    r = client.completions.create(model="m", prompt=prompt_text, max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"


def test_sampling_parameters(server: Server, client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, temperature=1.0, top_p=0.9,
                                           seed=seed, extra_body={"top_k": 40})
        return r.choices[0].message.content

    assert ask(3) == ask(3) == reference(server, MESSAGES, 16, temperature=1.0, top_p=0.9, top_k=40, seed=3).text
    assert len({ask(s) for s in range(4)}) > 1


def test_an_error_from_the_client_library(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=-1)
    assert e.value.status_code == 400
    assert e.value.body["message"] == "max_tokens must be an integer >= 0, got -1"
    assert e.value.body["param"] == "max_tokens"


# -- malformed requests --------------------------------------------------------------------

CHAT = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    ("bad json", CHAT, b'{"messages": [', None, "could not parse the request body as JSON: "),
    ("empty body", CHAT, b"", None, "the request body is empty: send a JSON object"),
    ("not an object", CHAT, b"[1, 2]", None, "the request body must be a JSON object, got list"),
    ("missing messages", CHAT, {"model": "m"}, "messages", "missing required parameter: 'messages'"),
    ("no messages", CHAT, {"messages": []}, "messages",
     "invalid value for 'messages': List should have at least 1 item"),
    ("messages not a list", CHAT, {"messages": "hi"}, "messages",
     "invalid value for 'messages': Input should be a valid list (got \"hi\")"),
    ("message without role", CHAT, {"messages": [{"content": "hi"}]}, "messages[0].role",
     "missing required parameter: 'messages[0].role'"),
    ("unknown role", CHAT, {"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role",
     "invalid value for 'messages[0].role': Input should be 'system', 'developer', 'user', 'assistant', 'tool' or "
     "'function' (got \"bot\")"),
    ("content not text", CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "invalid value for 'messages[0].content': must be a string, null, or a list of text parts (got 5)"),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content",
     "invalid value for 'messages[0].content': only text content is supported, got a part of type 'image_url'"),
    ("negative max_tokens", CHAT, {"messages": OK_MESSAGES, "max_tokens": -5}, "max_tokens",
     "max_tokens must be an integer >= 0, got -5"),
    ("max_tokens a string", CHAT, {"messages": OK_MESSAGES, "max_tokens": "many"}, "max_tokens",
     "invalid value for 'max_tokens': Input should be a valid integer"),
    ("temperature a string", CHAT, {"messages": OK_MESSAGES, "temperature": "hot"}, "temperature",
     "invalid value for 'temperature': Input should be a valid number"),
    ("temperature too high", CHAT, {"messages": OK_MESSAGES, "temperature": 9}, "temperature",
     "temperature must be in [0, 2], got 9"),
    ("top_p above 1", CHAT, {"messages": OK_MESSAGES, "top_p": 1.5}, "top_p",
     "top_p must be in [0, 1], got 1.5"),
    ("negative top_k", CHAT, {"messages": OK_MESSAGES, "top_k": -1}, "top_k",
     "top_k must be an integer >= 0 (0: no top-k cut), got -1"),
    ("stop a number", CHAT, {"messages": OK_MESSAGES, "stop": 5}, "stop",
     "invalid value for 'stop': must be a string or a list of strings (got 5)"),
    ("n=2", CHAT, {"messages": OK_MESSAGES, "n": 2}, "n", "only n=1 is supported (one sequence at a time), got n=2"),
    ("stream not a bool", CHAT, {"messages": OK_MESSAGES, "stream": "maybe"}, "stream",
     "invalid value for 'stream': Input should be a valid boolean"),
    ("missing prompt", "/v1/completions", {"model": "m"}, "prompt", "missing required parameter: 'prompt'"),
    ("prompt a number", "/v1/completions", {"prompt": 3.5}, "prompt",
     "invalid value for 'prompt': must be a string or a list of token ids (got 3.5)"),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, "prompt",
     "invalid value for 'prompt': only one prompt per request is supported, got 2"),
    ("token outside the vocabulary", "/v1/completions", {"prompt": [1, 100000]}, "prompt",
     "token id 100000 is outside the vocabulary of 512 tokens"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, "prompt", "the prompt is empty: give at least one token"),
    ("echo", "/v1/completions", {"prompt": "hi", "echo": True}, "echo", "echo is not supported by this server"),
]


@pytest.mark.parametrize("name, path, body, param, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_malformed_requests_get_400_with_an_openai_error(http: httpx.Client, name: str, path: str, body: Any,
                                                         param: str | None, message: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith(message), error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_unknown_routes_and_methods(http: httpx.Client) -> None:
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"] == "no route GET /v1/chat/completions"
    r = http.post("/v1/embeddings", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_a_prompt_too_long_names_the_limits(server: Server, http: httpx.Client) -> None:
    long_text = "the sea " * 200
    n = len(server.llm.tokenize(long_text))
    assert n > 256
    r = http.post("/v1/completions", json={"prompt": long_text, "max_tokens": 8})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == (f"prompt ({n} tokens) + max_tokens (8) = {n + 8} tokens exceeds the context of "
                                f"256 tokens")
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    # A prompt that fits, with too many tokens asked for.
    n = len(server.llm.prompt_tokens(OK_MESSAGES))
    r = http.post(CHAT, json={"messages": OK_MESSAGES, "max_tokens": 250})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        f"prompt ({n} tokens) + max_tokens (250) = {n + 250} tokens exceeds the context of 256 tokens")
    # No max_tokens: the prompt alone must leave room.
    r = http.post(CHAT, json={"messages": [{"role": "user", "content": long_text}]})
    assert r.status_code == 400 and "leaves no room for max_tokens (at least 1) in the context of 256 tokens" \
        in r.json()["error"]["message"]
    # Streaming requests are refused before any event is sent.
    r = http.post(CHAT, json={"messages": OK_MESSAGES, "max_tokens": 250, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # Without max_tokens, a chat reply may fill the rest of the context.
    r = http.post(CHAT, json={"messages": OK_MESSAGES, "temperature": 0, "stop": []})
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert usage["total_tokens"] <= 256 and usage["prompt_tokens"] == n


# -- scheduling ----------------------------------------------------------------------------


def test_a_burst_is_served_in_order_or_refused_with_503(server: Server) -> None:
    """Six clients at once while the first generation is held: one runs, QUEUE_SIZE wait, the
    rest get 503 at once; released, the waiting ones are served in the order they arrived."""
    n_clients = 6
    results: list[dict[str, Any]] = [{} for _ in range(n_clients)]
    barrier = threading.Barrier(n_clients)

    def one(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            barrier.wait()
            r = c.post("/v1/completions", json={"prompt": f"request {i}", "max_tokens": 8, "temperature": 0})
            results[i] = {"status": r.status_code, "body": r.json(), "done": time.monotonic()}

    counts = server.worker.counts
    accepted0, rejected0 = counts["accepted"], counts["rejected"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_clients)]
    with server.paused():
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while counts["accepted"] - accepted0 + counts["rejected"] - rejected0 < n_clients:
            assert time.monotonic() < deadline, "the burst was not answered"
            time.sleep(0.01)
        refused = [i for i in range(n_clients) if results[i]]
        # Answered while the first request is still held: the refusals, and only those.
        deadline = time.monotonic() + 10
        while len(refused) < n_clients - 1 - QUEUE_SIZE and time.monotonic() < deadline:
            time.sleep(0.01)
            refused = [i for i in range(n_clients) if results[i]]
        assert counts["accepted"] - accepted0 == 1 + QUEUE_SIZE
        assert len(refused) == n_clients - 1 - QUEUE_SIZE
        health = httpx.get(f"{server.url}/health").json()
        assert health["busy"] and health["waiting"] == QUEUE_SIZE
    for t in threads:
        t.join(30)
    for i in refused:
        assert results[i]["status"] == 503
        error = results[i]["body"]["error"]
        assert error["code"] == "queue_full" and error["type"] == "server_error"
        assert error["message"] == ("the server is busy: one request is running and 2 are waiting (the queue holds "
                                    "2); retry later")
    served = [i for i in range(n_clients) if i not in refused]
    assert all(results[i]["status"] == 200 for i in served)
    records = {r.id: r for r in server.worker.history}
    by_arrival = sorted(served, key=lambda i: records[results[i]["body"]["id"]].seq)
    done = [results[i]["done"] for i in by_arrival]
    assert done == sorted(done), "served in arrival order"
    ran = [r.seq for r in server.worker.history if r.seq >= accepted0]
    assert ran == sorted(ran) and len(ran) == 1 + QUEUE_SIZE
    assert httpx.get(f"{server.url}/health").json()["rejected"] >= len(refused)


def test_the_event_loop_answers_while_a_generation_runs(server: Server, http: httpx.Client) -> None:
    with server.slow(0.02):
        t = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/completions", timeout=30,
                                                       json={"prompt": "hi", "max_tokens": 60, "temperature": 0}))
        t.start()
        while server.worker.running is None:
            time.sleep(0.01)
        start = time.monotonic()
        health = http.get("/health").json()
        assert time.monotonic() - start < 0.5
        assert health["busy"] is True
        t.join(30)


def test_a_client_that_drops_mid_stream_cancels_its_generation(server: Server, http: httpx.Client) -> None:
    with server.slow(0.02):
        # Greedy: this prompt does not reach EOS within 200 tokens, so only the drop can end it early.
        body = {"messages": OK_MESSAGES, "max_tokens": 200, "stream": True, "temperature": 0}
        with http.stream("POST", CHAT, json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            request_id = json.loads(first[6:])["id"]
            next(line for line in lines if line.startswith("data: "))  # one token
        record = server.record(request_id)
    assert record.finish_reason == "cancelled" and record.completion_tokens < 100
    assert record.run_s < 3
    after(server, http)


def test_a_non_streaming_client_that_gives_up_cancels_its_generation(server: Server, http: httpx.Client) -> None:
    with server.slow(0.02):
        before = server.worker.counts["accepted"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", timeout=0.5,
                       json={"prompt": "hi", "max_tokens": 200, "temperature": 0})  # greedy: no EOS in 200
        deadline = time.monotonic() + 10
        while not (records := [r for r in server.worker.history if r.seq >= before]):
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.02)
    assert len(records) == 1
    assert records[0].finish_reason == "cancelled" and records[0].completion_tokens < 150
    after(server, http)


def after(server: Server, http: httpx.Client) -> None:
    """The server is healthy and serves the next request as if nothing happened."""
    assert http.get("/health").json()["status"] == "ok"
    want = reference(server, MESSAGES, 8)
    r = http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want.text


def test_an_internal_error_is_a_500_body_and_the_server_lives_on(server: Server, http: httpx.Client) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    server.llm.start = broken  # what the worker calls for every generation
    try:
        r = http.post(CHAT, json={"messages": OK_MESSAGES, "max_tokens": 4})
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "internal server error: RuntimeError: boom", "type": "server_error",
                                      "param": None, "code": None}}
        # Streaming: the headers are out, so the error is an event, then the stream ends properly.
        r = http.post(CHAT, json={"messages": OK_MESSAGES, "max_tokens": 4, "stream": True})
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["message"] == "internal server error: RuntimeError: boom"
    finally:
        del server.llm.start
    after(server, http)
