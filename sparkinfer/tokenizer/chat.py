"""Chat templates: the jinja2 program a GGUF stores in `tokenizer.chat_template`, rendered as
transformers' `apply_chat_template` renders it, so prompts match the ones the model was tuned on."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sparkinfer.errors import ChatTemplateError, MetadataError

# Qwen's ChatML, without the default system prompt Qwen2.5 adds: each turn is
# `<|im_start|>role\ncontent<|im_end|>\n`, and the prompt ends with an open assistant turn.
CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


Message = dict[str, Any]


def render_chat(
    template: str | None,
    messages: list[Message],
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render `messages` with `template`. `extra` reaches the template as variables
    (`bos_token`, `eos_token`, `tools`, `enable_thinking`, ...)."""
    if template is None:
        raise MetadataError(
            "the model has no chat template (GGUF metadata key 'tokenizer.chat_template' is missing); "
            "send a raw prompt instead of chat messages"
        )
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template failed: {err}") from err


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise MetadataError(f"tokenizer.chat_template is not a valid jinja2 template: {err}") from err


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Templates come from downloaded files: the sandbox keeps them from reaching python internals.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; transformers' does not, and templates
    # (Qwen3's tool list) were tuned on transformers' output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    # Llama-3-style templates put today's date in the system prompt.
    return datetime.now().strftime(format)
