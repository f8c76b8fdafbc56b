"""Byte-level BPE tokenizers from GGUF metadata, chat templates, streaming detokenization and
synthetic vocabularies. See docs/ARCHITECTURE.md for the contract."""

from sparkinfer.tokenizer.bpe import Tokenizer
from sparkinfer.tokenizer.chat import CHATML_TEMPLATE, ChatTemplateError, render_chat
from sparkinfer.tokenizer.stream import StreamDecoder
from sparkinfer.tokenizer.synthetic import synthetic_vocab
from sparkinfer.tokenizer.vocab import VocabSpec

__all__ = [
    "CHATML_TEMPLATE",
    "ChatTemplateError",
    "StreamDecoder",
    "Tokenizer",
    "VocabSpec",
    "render_chat",
    "synthetic_vocab",
]
