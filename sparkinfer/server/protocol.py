"""The OpenAI wire format: request bodies (pydantic), error bodies, response objects.

Requests are validated here with messages that name the parameter, turned into an
`APIError` (status + OpenAI-style `{"error": {"message", "type", "param", "code"}}`) by
`parse_request`. Fields OpenAI defines that change nothing for one sequence on one device
(user, ...) are accepted and ignored; ones whose meaning we cannot honour (n > 1, echo,
non-text content) are refused with 400 rather than silently dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sparkinfer.errors import InvalidParameterError
from sparkinfer.sampling_params import check_max_tokens, check_sampling


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- requests ------------------------------------------------------------------------------


class _Request(BaseModel):
    """Sampling and stopping, shared by both endpoints. null means the default, as in OpenAI's API."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    # Types here; ranges in common_checks (sparkinfer.sampling_params, shared with the CLI and API).
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (llama.cpp, vLLM)
    seed: int | None = None
    stop: Any = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)  # extension (vLLM)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("must be a string or a list of strings")
        if len(value) > 16:
            raise ValueError(f"at most 16 stop sequences, got {len(value)}")
        return [s for s in value if s]

    def common_checks(self) -> None:
        try:
            self.check_sampling_and_length()
        except InvalidParameterError as e:
            raise APIError(400, str(e), param=e.param) from None
        if self.n not in (None, 1):
            raise APIError(400, f"only n=1 is supported (one sequence at a time), got n={self.n}", param="n")

    def check_sampling_and_length(self) -> None:
        """null is the default, which is always valid."""
        check_sampling(temperature=_or(self.temperature, 0.0), top_p=_or(self.top_p, 1.0), top_k=_or(self.top_k, 0),
                       seed=self.seed)
        check_max_tokens(self.max_tokens)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Any = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str:
        """A string, null, or a list of text parts ({"type": "text", "text": ...}) joined."""
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError("content parts must be objects with a 'type'")
                if part["type"] != "text":
                    raise ValueError(f"only text content is supported, got a part of type '{part['type']}'")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string 'text'")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string, null, or a list of text parts")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    class Function(BaseModel):
        name: str

    type: Literal["function"]
    function: Function


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None  # extension (vLLM): variables for the template

    def check_sampling_and_length(self) -> None:
        super().check_sampling_and_length()
        check_max_tokens(self.max_completion_tokens, "max_completion_tokens")

    def common_checks(self) -> None:
        super().common_checks()
        names = [t.function.name for t in self.tools or []]
        for name in names:
            if names.count(name) > 1:
                raise APIError(400, f"two tools are named '{name}': tool names must be unique", param="tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function '{choice.function.name}', which is not among "
                           f"the tools ({', '.join(names) or 'none given'})", param="tool_choice")
        if choice == "required" and not names:
            raise APIError(400, "tool_choice is 'required' but no tools are given", param="tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise APIError(400, "response_format of type 'json_schema' needs a 'json_schema' object "
                           "({\"name\": ..., \"schema\": {...}})", param="response_format.json_schema")

    def top_logprobs_wanted(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as the chat template (and the model) sees them."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def tools_active(self) -> bool:
        """Whether the model may call tools (and its output is read for calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_messages(self) -> list[dict[str, Any]]:
        out = []
        for m in self.messages:
            d = {**(m.model_extra or {}), "role": m.role, "content": m.content}
            out.append(d)
        return out

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: Any = Field(...)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int]:
        """A string or a list of token ids; a list of one of either is that one (batches of
        several prompts are refused: one sequence at a time)."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            raise ValueError(f"only one prompt per request is supported, got {len(value)}")
        raise ValueError("must be a string or a list of token ids")

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def common_checks(self) -> None:
        super().common_checks()
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, f"only best_of=1 is supported, got {self.best_of}", param="best_of")


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()

MAX_BODY_BYTES = 16 << 20


def parse_request(raw: bytes, model: type[_Request]) -> Any:
    """The validated request, or APIError(400) whose message names the offending parameter."""
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {len(raw)} bytes, more than the {MAX_BODY_BYTES} allowed")
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"could not parse the request body as JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    request.common_checks()
    return request


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    param = _param(err["loc"])
    kind = err["type"]
    if kind == "missing":
        return APIError(400, f"missing required parameter: '{param}'", param=param)
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    got = err.get("input")
    shown = json.dumps(got)[:80] if _jsonable(got) else repr(got)[:80]
    return APIError(400, f"invalid value for '{param}': {message} (got {shown})", param=param)


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# -- responses -----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
