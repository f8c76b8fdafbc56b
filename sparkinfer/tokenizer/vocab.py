"""The tokenizer a GGUF file describes, as plain data (`VocabSpec`), and its metadata keys."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from gguf import Keys, TokenType

from sparkinfer.errors import MetadataError

# Qwen2's split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX, llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2).
# Unlike GPT-2's it splits digits one by one and keeps a single non-letter glued to the word after it.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> split regex. A vocabulary's merges are only right for the split it was
# trained with, so an unknown name is refused rather than tokenized some other way.
PRE_TOKENIZER_SPLITS = {"qwen2": QWEN2_SPLIT}

SUPPORTED_MODEL = "gpt2"  # llama.cpp's name for byte-level BPE

# Tokens matched whole in text rather than built by merges.
SPECIAL_TYPES = frozenset({int(TokenType.CONTROL), int(TokenType.USER_DEFINED)})

_TOKENIZER_NAMES = {
    "llama": "SentencePiece ('llama')",
    "t5": "Unigram ('t5')",
    "bert": "WordPiece ('bert')",
    "rwkv": "RWKV ('rwkv')",
}


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in GPT-2's order (printable bytes first).

    Byte-level BPE vocabularies spell every token in these characters, so a token never holds a
    raw space or control byte (space is 'Ġ', newline 'Ċ').
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def check_supported(model: str, pre: str) -> None:
    """Raise `MetadataError` unless we tokenize exactly as llama.cpp would for this (model, pre)."""
    if model != SUPPORTED_MODEL:
        name = _TOKENIZER_NAMES.get(model, repr(model))
        raise MetadataError(
            f"{Keys.Tokenizer.MODEL} is {name}: unsupported tokenizer model; "
            f"only byte-level BPE ('{SUPPORTED_MODEL}') is supported"
        )
    if pre not in PRE_TOKENIZER_SPLITS:
        raise MetadataError(
            f"{Keys.Tokenizer.PRE} is {pre!r}: unsupported pre-tokenizer; supported: {sorted(PRE_TOKENIZER_SPLITS)}"
        )


@dataclass(frozen=True)
class VocabSpec:
    """A byte-level BPE vocabulary as stored in GGUF metadata (llama.cpp's conventions)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None
    model: str = SUPPORTED_MODEL
    pre: str = "qwen2"
    # llama.cpp prepends BOS when this is set; Qwen files set it false.
    add_bos: bool = False

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> VocabSpec:
        """Read and validate the tokenizer keys of a GGUF metadata dict (key -> python value)."""
        model = _get(metadata, Keys.Tokenizer.MODEL, str)
        pre = _get(metadata, Keys.Tokenizer.PRE, str)
        check_supported(model, pre)
        tokens = _get_list(metadata, Keys.Tokenizer.LIST, str)
        token_types = _get_list(metadata, Keys.Tokenizer.TOKEN_TYPE, int)
        if len(token_types) != len(tokens):
            raise MetadataError(
                f"{Keys.Tokenizer.TOKEN_TYPE} has {len(token_types)} entries "
                f"but {Keys.Tokenizer.LIST} has {len(tokens)}"
            )
        merges = _get_list(metadata, Keys.Tokenizer.MERGES, str)
        _check_merges(merges, tokens)
        return cls(
            tokens=tokens,
            token_types=token_types,
            merges=merges,
            bos_id=_get_token_id(metadata, Keys.Tokenizer.BOS_ID, len(tokens)),
            eos_id=_get_token_id(metadata, Keys.Tokenizer.EOS_ID, len(tokens)),
            pad_id=_get_token_id(metadata, Keys.Tokenizer.PAD_ID, len(tokens)),
            chat_template=_get(metadata, Keys.Tokenizer.CHAT_TEMPLATE, str, required=False),
            model=model,
            pre=pre,
            add_bos=bool(_get(metadata, Keys.Tokenizer.ADD_BOS, bool, required=False)),
        )

    def to_metadata(self) -> dict[str, Any]:
        """The GGUF keys for this vocabulary. Ids and flags are python int/bool (GGUF uint32/bool);
        token types are int32 in GGUF. Absent ids and template are left out, as llama.cpp does."""
        metadata: dict[str, Any] = {
            Keys.Tokenizer.MODEL: self.model,
            Keys.Tokenizer.PRE: self.pre,
            Keys.Tokenizer.LIST: list(self.tokens),
            Keys.Tokenizer.TOKEN_TYPE: list(self.token_types),
            Keys.Tokenizer.MERGES: list(self.merges),
            Keys.Tokenizer.ADD_BOS: self.add_bos,
        }
        for key, token_id in (
            (Keys.Tokenizer.BOS_ID, self.bos_id),
            (Keys.Tokenizer.EOS_ID, self.eos_id),
            (Keys.Tokenizer.PAD_ID, self.pad_id),
        ):
            if token_id is not None:
                metadata[key] = token_id
        if self.chat_template is not None:
            metadata[Keys.Tokenizer.CHAT_TEMPLATE] = self.chat_template
        return metadata


def _get(metadata: dict[str, Any], key: str, kind: type, required: bool = True) -> Any:
    if key not in metadata:
        if required:
            raise MetadataError(f"GGUF metadata key {key!r} is missing; the tokenizer cannot be built without it")
        return None
    value = metadata[key]
    # bool is an int subclass: a flag stored as a number (or an id stored as a flag) is still wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MetadataError(f"GGUF metadata key {key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def _get_list(metadata: dict[str, Any], key: str, kind: type) -> list:
    value = _get(metadata, key, list)
    if not all(isinstance(item, kind) for item in value):
        raise MetadataError(f"GGUF metadata key {key!r} should be a list of {kind.__name__}")
    return value


def _get_token_id(metadata: dict[str, Any], key: str, n_vocab: int) -> int | None:
    token_id = _get(metadata, key, int, required=False)
    if token_id is not None and not 0 <= token_id < n_vocab:
        raise MetadataError(f"GGUF metadata key {key!r} is {token_id}, outside the vocabulary of {n_vocab} tokens")
    return token_id


def _check_merges(merges: list[str], tokens: list[str]) -> None:
    """Every merge must join two tokens into a third; `tokenizers` would fail later with a less clear message."""
    known = set(tokens)
    for rank, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or parts[0] not in known or parts[1] not in known or parts[0] + parts[1] not in known:
            raise MetadataError(
                f"{Keys.Tokenizer.MERGES}[{rank}] = {merge!r} does not join two tokens of the vocabulary into a third"
            )
