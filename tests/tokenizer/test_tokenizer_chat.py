from dataclasses import replace

import pytest

from sparkinfer.errors import MetadataError
from sparkinfer.tokenizer import CHATML_TEMPLATE, ChatTemplateError, Tokenizer, render_chat

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!\nHow are you?"},
]


def test_chatml() -> None:
    expected = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!\nHow are you?<|im_end|>\n"
    assert render_chat(CHATML_TEMPLATE, MESSAGES, add_generation_prompt=False) == expected
    assert render_chat(CHATML_TEMPLATE, MESSAGES) == expected + "<|im_start|>assistant\n"


def test_tokenizer_applies_its_template(tiny_tokenizer: Tokenizer) -> None:
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES)
    assert prompt == render_chat(CHATML_TEMPLATE, MESSAGES)
    ids = tiny_tokenizer.encode(prompt)
    im_start = tiny_tokenizer.spec.tokens.index("<|im_start|>")
    assert ids.count(im_start) == 3 and ids.count(tiny_tokenizer.eos_id) == 2


def test_special_token_variables(tiny_tokenizer: Tokenizer) -> None:
    spec = replace(tiny_tokenizer.spec, chat_template="{{ bos_token }}|{{ eos_token }}|{{ flavour }}")
    assert Tokenizer.from_vocab(spec).apply_chat_template([], flavour="x") == "<|endoftext|>|<|im_end|>|x"


def test_trim_and_lstrip_blocks() -> None:
    template = (
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    )
    assert render_chat(template, MESSAGES) == "[Hi!\nHow are you?]\n"


def test_tojson_does_not_escape_html() -> None:
    tools = [{"name": "lt", "description": "a < b & c > 'd' 你好"}]
    out = render_chat("{{ tools | tojson }}", [], tools=tools)
    assert out == '[{"name": "lt", "description": "a < b & c > \'d\' 你好"}]'


def test_no_template_is_a_metadata_error() -> None:
    message = r"the model has no chat template \(GGUF metadata key 'tokenizer.chat_template' is missing\)"
    with pytest.raises(MetadataError, match=message):
        render_chat(None, MESSAGES)


def test_raise_exception_reaches_the_caller() -> None:
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="chat template failed: Conversation must start with user"):
        render_chat(template, MESSAGES)


def test_broken_template_is_a_metadata_error() -> None:
    with pytest.raises(MetadataError, match="tokenizer.chat_template is not a valid jinja2 template"):
        render_chat("{% for m in messages %}", MESSAGES)


def test_sandbox_blocks_python_internals() -> None:
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat("{{ ''.__class__.__mro__ }}", MESSAGES)
