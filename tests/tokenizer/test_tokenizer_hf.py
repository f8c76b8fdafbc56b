"""Agreement with transformers, the reference for GGUF tokenizers (it builds one from the same metadata)."""

import random
from pathlib import Path

import pytest
from tokenizer_testutil import SAMPLES, read_gguf_metadata, write_tokenizer_gguf

from sparkinfer.tokenizer import Tokenizer, VocabSpec, render_chat

transformers = pytest.importorskip("transformers")

# Qwen3-style: tools as JSON, a namespace scan over reversed messages, string methods, tool turns.
TOOL_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\\n# Tools\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(found=false, last_user=-1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' and not ns.found %}
        {%- set ns.found = true %}
        {%- set ns.last_user = (messages|length - 1) - loop.index0 %}
    {%- endif %}
{%- endfor %}
{% for message in messages %}
    {% if message.role == 'assistant' and '</think>' in message.content %}
        {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
    {% else %}
        {%- set content = message.content %}
    {% endif %}
    {%- if message.role == 'tool' and (loop.first or messages[loop.index0 - 1].role != 'tool') %}
{{ '<|im_start|>user\\n<tool_response>' + content.strip() + '</tool_response>' }}
    {%- elif message.role != 'tool' %}
{{ '<|im_start|>' + message.role + '\\n' + content }}
    {%- endif %}
    {%- if message.tool_calls is defined %}
        {%- for call in message.tool_calls %}
            {{- '\\n<tool_call>' + call.function | tojson + '</tool_call>' }}
        {%- endfor %}
    {%- endif %}
    {%- if loop.index0 == ns.last_user %}{{ ' (last query)' }}{% endif %}
{{ '<|im_end|>' }}
{% endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "<think>\nneed a tool\n</think>\n\nChecking.",
        "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": '  {"temp": 21}\n'},
    {"role": "user", "content": "Thanks! 你好 <b>&</b>"},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Now & <later>", "parameters": {}}}]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Text mixing the character classes the qwen2 split treats differently."""
    pool = list("abcXYZ  \t\n\r'0123456789.,!?-_()[]{}\"éüß中文字😀🎉\u0301")
    pool += ["'s", "'LL", "<|im_end|>", "\r\n", "   "]
    rng = random.Random(seed)
    return ["".join(rng.choices(pool, k=rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_vocab: VocabSpec) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tokenizer_gguf(path, tiny_vocab.to_metadata())
    return path


@pytest.fixture(scope="module")
def hf_tiny(tiny_gguf: Path):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)


def test_vocab_survives_a_gguf_file(tiny_gguf: Path, tiny_vocab: VocabSpec) -> None:
    assert VocabSpec.from_metadata(read_gguf_metadata(tiny_gguf)) == tiny_vocab


def test_ids_match_transformers(hf_tiny, tiny_tokenizer: Tokenizer) -> None:
    for text in SAMPLES + random_texts(300):
        ids = tiny_tokenizer.encode(text)
        assert ids == hf_tiny.encode(text), repr(text)
        assert tiny_tokenizer.decode(ids) == hf_tiny.decode(ids), repr(text)
        assert tiny_tokenizer.decode(ids, skip_special=True) == hf_tiny.decode(ids, skip_special_tokens=True)


def test_special_tokens_match_transformers(hf_tiny, tiny_tokenizer: Tokenizer) -> None:
    assert hf_tiny.eos_token_id == tiny_tokenizer.eos_id
    assert hf_tiny.bos_token_id == tiny_tokenizer.bos_id
    assert hf_tiny.pad_token_id == tiny_tokenizer.spec.pad_id
    assert len(hf_tiny) == tiny_tokenizer.vocab_size


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_matches_transformers(hf_tiny, tiny_tokenizer: Tokenizer, add_generation_prompt: bool) -> None:
    messages = CONVERSATION[:2]
    ours = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt)
    assert ours == hf_tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("extra", [{}, {"enable_thinking": False}, {"tools": TOOLS}])
def test_complex_template_matches_transformers(hf_tiny, extra: dict) -> None:
    ours = render_chat(TOOL_TEMPLATE, CONVERSATION, True, **extra)
    theirs = hf_tiny.apply_chat_template(
        CONVERSATION, chat_template=TOOL_TEMPLATE, tokenize=False, add_generation_prompt=True, **extra
    )
    assert ours == theirs


def test_full_size_ids_match_transformers(qwen3_vocab: VocabSpec, qwen3_tokenizer: Tokenizer) -> None:
    # A 151936-token GGUF takes ~20 s to read back with gguf-py, so hand transformers the metadata
    # directly: this is the converter AutoTokenizer runs after reading the file.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    metadata = qwen3_vocab.to_metadata()
    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {name: metadata[f"tokenizer.{k}"] for k, name in renames.items() if f"tokenizer.{k}" in metadata}
    backend, _ = convert_gguf_tokenizer("qwen3", tokenizer_dict)
    for text in SAMPLES + random_texts(300, seed=1):
        assert qwen3_tokenizer.encode(text) == backend.encode(text).ids, repr(text)
