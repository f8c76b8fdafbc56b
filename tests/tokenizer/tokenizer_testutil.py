"""Shared by the tokenizer tests: sample texts and a metadata-only GGUF round trip."""

from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType, GGUFWriter

# Each stresses one rule of the qwen2 split or of byte-level BPE.
SAMPLES = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'LL say it's fine, DON'T you think?",
    "Numbers 1234567 and 3.14159, dates 2024-05-01.",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\nline five\r\nwindows\r\n",
    "tabs\tand\t\tmixed \t \n whitespace runs          end",
    "def forward(self, x):\n    if x is None:\n        return 0\n    return x + 1\n",
    "Unicode: café naïve über señor Ærøskøbing ﬁ",
    "中文：你好，世界！日本語のテキスト。한국어 텍스트.",
    "Emoji 🎉🙂👩‍👩‍👧 and flags 🇯🇵, symbols ✓ → ∑ 𝄞",
    "Combining e\u0301 and zero\u200bwidth and RTL שלום مرحبا",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|><|im_end|>",
    "<|im_start partial <| im_end |> not special",
    "control chars \x00\x01\x7f and \u00ad soft hyphen",
]


def write_tokenizer_gguf(path: Path, metadata: dict[str, Any]) -> None:
    """A GGUF holding only metadata, typed as llama.cpp types these keys (ids uint32, token types int32)."""
    writer = GGUFWriter(str(path), "qwen3")
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_key_value(key, value, GGUFValueType.BOOL)
        elif isinstance(value, int):
            writer.add_key_value(key, value, GGUFValueType.UINT32)
        elif isinstance(value, str):
            writer.add_key_value(key, value, GGUFValueType.STRING)
        elif all(isinstance(item, str) for item in value):
            writer.add_key_value(key, value, GGUFValueType.ARRAY, GGUFValueType.STRING)
        else:
            writer.add_key_value(key, value, GGUFValueType.ARRAY, GGUFValueType.INT32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
