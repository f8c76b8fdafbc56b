"""The FastAPI application: OpenAI-compatible /v1/chat/completions, /v1/completions,
/v1/models, and /health.

Requests are served one at a time, in arrival order, by one worker thread (`worker.Worker`);
up to `queue_size` wait, more get 503. The event loop only parses, tokenizes, enqueues and
relays text, so it answers /health (and refuses) while a generation runs. A client that goes
away cancels its generation: a streaming one when Starlette sees the disconnect, a
non-streaming one by polling `request.is_disconnected()`. Every error, including ones in
our own code, is a JSON body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparkinfer.api import LLM, Completion
from sparkinfer.errors import ContextLengthError, SparkInferError
from sparkinfer.grammar import Grammar, GrammarError, ToolCallFormat
from sparkinfer.runtime.processing import TokenLogprob
from sparkinfer.server import protocol as p
from sparkinfer.server.tools import ToolCallStream, parse_tool_calls, spell_tools, template_renders_tools
from sparkinfer.server.worker import Job, QueueFull, Worker

log = logging.getLogger("sparkinfer.server")

DISCONNECT_POLL_S = 0.1


class _EventStream(StreamingResponse):
    """An SSE response that always runs `on_close` when it ends, however it ends (done,
    client gone, server shutting down)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def create_app(llm: LLM, *, model_name: str | None = None, queue_size: int = 16) -> FastAPI:
    """The application serving `llm` (which it does not close). The worker thread starts with
    the app's lifespan (uvicorn's startup) and stops, cancelling what runs, at shutdown."""
    name = model_name or llm.name
    worker = Worker(llm, queue_size=queue_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="SparkInfer", summary="OpenAI-compatible API for one batch-1 model", lifespan=lifespan)
    app.state.worker = worker
    app.state.llm = llm
    app.state.model_name = name
    try:
        created = int(os.path.getmtime(llm.engine.model.path))
    except (OSError, AttributeError, TypeError):
        created = p.now()

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "sparkinfer",
                "context_length": llm.context}

    # -- errors: always the OpenAI body ----------------------------------------------------

    @app.exception_handler(p.APIError)
    async def _api_error(request: Request, e: p.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = (f"no route {request.method} {request.url.path}" if e.status_code in (404, 405)
                   else str(e.detail))
        return JSONResponse(p.error_body(message, kind, None, None), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(p.error_body(f"invalid request: {e.errors()[0].get('msg')}"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(p.error_body(f"internal server error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    # -- small endpoints -------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        c = worker.counts
        return {"status": "ok", "model": name, "busy": worker.running is not None, "waiting": worker.waiting,
                "queue_size": worker.queue_size, "served": c["finished"], "cancelled": c["cancelled"],
                "rejected": c["rejected"]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise p.APIError(404, f"the model '{model_id}' does not exist; this server serves '{name}'",
                             param="model", code="model_not_found")
        return model_card()

    # -- generation ------------------------------------------------------------------------

    def sampling(req: Any) -> dict[str, Any]:
        return {
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "top_k": req.top_k or 0,
            "seed": req.seed,
            "stop": req.stop,
            "presence_penalty": req.presence_penalty or 0.0,
            "frequency_penalty": req.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
            "logprobs": req.top_logprobs_wanted(),
        }

    def check_fits(n_prompt: int, max_tokens: int | None, param: str) -> int:
        if n_prompt == 0:
            raise p.APIError(400, "the prompt is empty: give at least one token", param=param)
        try:
            return llm.check_length(n_prompt, max_tokens)
        except ContextLengthError as e:
            raise p.APIError(400, str(e), param=param, code="context_length_exceeded") from None

    def submit(request_id: str, prompt: list[int], max_tokens: int, options: dict[str, Any]) -> Job:
        job = Job(request_id, prompt, max_tokens, options, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull as e:
            raise p.APIError(503, str(e), "server_error", code="queue_full", headers={"Retry-After": "1"}) from None
        return job

    def tokens_of(fn: Callable[[], list[int]], param: str) -> list[int]:
        try:
            return fn()
        except SparkInferError as e:  # a chat template's raise_exception, a token id outside the vocabulary
            raise p.APIError(400, str(e), param=param) from None

    def grammar_of(fn: Callable[[], Grammar], param: str) -> Grammar:
        try:
            return fn()
        except GrammarError as e:
            raise p.APIError(400, f"{param}: {e}", param=param) from None

    def chat_grammar(req: p.ChatCompletionRequest) -> Grammar | None:
        """The grammar a chat request's output must follow: tool calls where the request forces
        one (tool_choice required or a named function), a JSON answer where response_format asks
        for one (or either, with tools on auto), none otherwise."""
        tools = req.tool_dicts() if req.tools_active() else []
        for i, tool in enumerate(tools):  # each schema on its own, so that an error names it
            grammar_of(lambda: llm.grammars.json_schema(tool["function"].get("parameters") or {"type": "object"}),
                       f"tools[{i}].function.parameters")
        fmt = req.response_format
        answer: Any = None
        if fmt is not None and fmt.type == "json_object":
            answer = "json_object"
        elif fmt is not None and fmt.type == "json_schema":
            answer = fmt.json_schema.schema_
        choice = req.tool_choice
        if tools and (choice == "required" or isinstance(choice, p.NamedToolChoice)):
            name = choice.function.name if isinstance(choice, p.NamedToolChoice) else None
            return grammar_of(lambda: llm.grammars.tool_calls(tools, TOOL_FORMAT, name=name,
                                                              parallel=req.parallel_tool_calls is not False), "tools")
        if answer is None:
            return None
        param = "response_format" if answer == "json_object" else "response_format.json_schema.schema"
        if tools:
            return grammar_of(lambda: llm.grammars.tool_calls(tools, TOOL_FORMAT, answer=answer,
                                                              parallel=req.parallel_tool_calls is not False), param)
        if answer == "json_object":
            return grammar_of(llm.grammars.json_object, param)
        return grammar_of(lambda: llm.grammars.json_schema(answer), param)

    def chat_prompt(req: p.ChatCompletionRequest) -> list[int]:
        extra = {k: v for k, v in (req.chat_template_kwargs or {}).items()
                 if k not in ("messages", "add_generation_prompt")}
        messages = req.template_messages()
        if template_renders_tools(llm.tokenizer.spec.chat_template):
            if req.tools_active():
                extra["tools"] = req.tool_dicts()
        else:
            messages = spell_tools(messages, req.tool_dicts() if req.tools_active() else None, TOOL_FORMAT)
        return tokens_of(lambda: llm.tokenize(llm.apply_chat_template(messages, True, **extra)), "messages")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = p.parse_request(await request.body(), p.ChatCompletionRequest)
        prompt = chat_prompt(req)
        limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = check_fits(len(prompt), req.limit(), "messages" if req.limit() is None else limit_param)
        options = sampling(req)
        # Off the event loop: the first grammar builds llguidance's tokenizer (a second for a
        # large vocabulary), and a large schema takes milliseconds to compile.
        grammar = await asyncio.to_thread(chat_grammar, req)
        if grammar is not None:
            options["grammar"] = grammar
        rid = p.new_id("chatcmpl")
        job = submit(rid, prompt, max_tokens, options)
        created = p.now()
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        wants_logprobs = req.logprobs is True
        tools = req.tools_active()

        if req.stream:
            return event_stream(job, head, prompt, include_usage, ChatChunks(llm, tools, wants_logprobs))

        completion = await collect(request, job)
        content, calls = parse_tool_calls(completion.text, TOOL_FORMAT) if tools else (completion.text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.to_json() for c in calls]
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": message,
                         "logprobs": {"content": chat_logprobs(llm, completion.logprobs), "refusal": None}
                         if wants_logprobs else None,
                         "finish_reason": "tool_calls" if calls else finish_reason(completion)}],
            "usage": usage_of(completion, prompt),
            "timings": timings(completion),
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = p.parse_request(await request.body(), p.CompletionRequest)
        prompt = tokens_of(lambda: llm.prompt_tokens(req.prompt), "prompt")
        # OpenAI's default for this endpoint is 16 tokens.
        max_tokens = check_fits(len(prompt), 16 if req.max_tokens is None else req.max_tokens,
                                "prompt" if req.max_tokens is None else "max_tokens")
        rid = p.new_id("cmpl")
        job = submit(rid, prompt, max_tokens, sampling(req))
        created = p.now()
        head = {"id": rid, "object": "text_completion", "created": created, "model": name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        wants_logprobs = req.logprobs is not None

        if req.stream:
            return event_stream(job, head, prompt, include_usage, TextChunks(llm, wants_logprobs))

        completion = await collect(request, job)
        return {
            **head,
            "choices": [{"index": 0, "text": completion.text,
                         "logprobs": text_logprobs(llm, completion.logprobs) if wants_logprobs else None,
                         "finish_reason": finish_reason(completion)}],
            "usage": usage_of(completion, prompt),
            "timings": timings(completion),
        }

    return app


TOOL_FORMAT = ToolCallFormat()


def token_text(llm: LLM, token: int) -> tuple[str, list[int]]:
    """A token's text (U+FFFD for part of a character) and its bytes, as OpenAI reports them."""
    return llm.detokenize([token]), list(llm.tokenizer.token_bytes(token))


def chat_logprobs(llm: LLM, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's chat `logprobs.content` entries."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        text, raw = token_text(llm, token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


def text_logprobs(llm: LLM, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_text(llm, e.token)[0] for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(llm, t)[0]: lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}


class TextChunks:
    """The choice fields of /v1/completions' stream chunks."""

    def __init__(self, llm: LLM, logprobs: bool) -> None:
        self.llm, self.logprobs, self.offset = llm, logprobs, 0

    def opening(self) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        fields: dict[str, Any] = {"text": text}
        if self.logprobs:
            fields["logprobs"] = text_logprobs(self.llm, entries, self.offset)
            self.offset += sum(len(t) for t in fields["logprobs"]["tokens"])
        return [fields]

    def finish(self, completion: Completion | None, entries: list[TokenLogprob]) -> tuple[list[dict[str, Any]], str]:
        last = self.delta("", entries)[0]
        return [last], finish_reason(completion)


class ChatChunks:
    """The choice fields of /v1/chat/completions' stream chunks: content deltas, and, with tools,
    `delta.tool_calls` once the generation has ended (a call is held until it is complete)."""

    def __init__(self, llm: LLM, tools: bool, logprobs: bool) -> None:
        self.llm, self.logprobs = llm, logprobs
        self.calls = ToolCallStream(TOOL_FORMAT) if tools else None

    def opening(self) -> list[dict[str, Any]]:
        return [{"delta": {"role": "assistant", "content": ""}}]

    def _content(self, text: str, entries: list[TokenLogprob]) -> dict[str, Any]:
        fields: dict[str, Any] = {"delta": {"content": text} if text else {}}
        if self.logprobs:
            fields["logprobs"] = {"content": chat_logprobs(self.llm, entries), "refusal": None}
        return fields

    def delta(self, text: str, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        if self.calls is not None:
            text = self.calls.push(text)
        if not text and not (self.logprobs and entries):
            return []
        return [self._content(text, entries)]

    def finish(self, completion: Completion | None, entries: list[TokenLogprob]) -> tuple[list[dict[str, Any]], str]:
        rest, calls = self.calls.finish() if self.calls is not None else ("", [])
        out = [self._content(rest, entries)] if rest or (self.logprobs and entries) else []
        for i, call in enumerate(calls):
            # As OpenAI streams them: the id, type and name first, then the arguments.
            out.append({"delta": {"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                                  "function": {"name": call.name, "arguments": ""}}]}})
            out.append({"delta": {"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]}})
        out.append({"delta": {}})
        return out, "tool_calls" if calls else finish_reason(completion)


def event_stream(job: Job, head: dict[str, Any], prompt: list[int], include_usage: bool,
                 chunks: TextChunks | ChatChunks) -> _EventStream:
    """A streamed job's server-sent events: the opening choice fields, a chunk per text delta
    (with its tokens' logprobs when asked), the finishing chunks, the usage chunk when asked
    (or an error chunk if the job fails), then [DONE]."""
    def chunk(fields: dict[str, Any], finish: str | None) -> str:
        body = {**head, "choices": [{"index": 0, "logprobs": None, **fields, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return p.sse(body)

    async def events() -> AsyncIterator[str]:
        for fields in chunks.opening():
            yield chunk(fields, None)
        sent = 0  # logprobs entries sent
        async for kind, value in relay(job):
            if kind == "delta":
                text, entries = value
                sent += len(entries)
                for fields in chunks.delta(text, entries):
                    yield chunk(fields, None)
            elif kind == "done":
                rest = value.logprobs[sent:] if value is not None else []
                finishing, reason = chunks.finish(value, rest)
                for i, fields in enumerate(finishing):
                    yield chunk(fields, reason if i == len(finishing) - 1 else None)
                if include_usage:
                    yield p.sse({**head, "choices": [], "usage": usage_of(value, prompt)})
            else:
                yield p.sse(stream_error(value))
        yield p.sse("[DONE]")

    return _EventStream(events(), job.cancel)


async def relay(job: Job) -> AsyncIterator[tuple[str, Any]]:
    """The job's events up to and including the last ("done" or "error")."""
    while True:
        kind, value = await job.events.get()
        yield kind, value
        if kind != "delta":
            return


async def collect(request: Request, job: Job) -> Completion:
    """Wait for a non-streaming job, cancelling it if the client disconnects meanwhile."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for kind, value in relay(job):
            if kind == "error":  # the worker logged it; answer without tearing down the connection
                body = stream_error(value)["error"]
                raise p.APIError(400 if isinstance(value, SparkInferError) else 500, body["message"], body["type"])
            if kind == "done":
                if value is None:
                    raise p.APIError(499, "the request was cancelled", code="cancelled")
                return value
        raise AssertionError("unreachable")
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once done; stops the generation if this coroutine was cancelled


def finish_reason(completion: Completion | None) -> str:
    # "cancelled" reaches no client (it went away); "length" if the server stopped it.
    reason = completion.finish_reason if completion is not None else "length"
    return reason if reason in ("stop", "length") else "length"


def usage_of(completion: Completion | None, prompt: list[int]) -> dict[str, int]:
    return p.usage(len(prompt), completion.completion_tokens if completion else 0)


def timings(c: Completion) -> dict[str, Any]:
    """Extension (as llama.cpp's server): where the time went."""
    return {"prompt_tokens_reused": c.reused_tokens, "time_to_first_token_ms": round(c.time_to_first_token_s * 1e3, 3),
            "total_ms": round(c.elapsed_s * 1e3, 3), "decode_tokens_per_s": round(c.decode_tokens_per_s, 2),
            "seed": c.seed}


def stream_error(e: BaseException) -> dict[str, Any]:
    if isinstance(e, SparkInferError):
        return p.error_body(str(e))
    return p.error_body(f"internal server error: {type(e).__name__}: {e}", "server_error")
