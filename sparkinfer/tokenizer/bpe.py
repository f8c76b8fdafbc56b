"""Byte-level BPE (`tokenizer.ggml.model = gpt2`) on Hugging Face `tokenizers`, built the way
transformers builds it from a GGUF, so ids agree with both transformers and llama.cpp."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import tokenizers
from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from sparkinfer.tokenizer.chat import Message, render_chat
from sparkinfer.tokenizer.vocab import (
    PRE_TOKENIZER_SPLITS,
    SPECIAL_TYPES,
    VocabSpec,
    byte_to_unicode,
    check_supported,
    unicode_to_byte,
)


def pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split a vocabulary's merges were learned on, then bytes -> GPT-2 characters."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


class Tokenizer:
    """Encode text to token ids and back, for one `VocabSpec`."""

    def __init__(self, spec: VocabSpec) -> None:
        check_supported(spec.model, spec.pre)
        self.spec = spec
        self._backend = _build_backend(spec, parse_special=True)
        self._byte_of = unicode_to_byte()
        self._special_ids = frozenset(i for i, t in enumerate(spec.token_types) if t == TokenType.CONTROL)

    @classmethod
    def from_vocab(cls, spec: VocabSpec) -> Tokenizer:
        return cls(spec)

    @property
    def vocab_size(self) -> int:
        return len(self.spec.tokens)

    @property
    def bos_id(self) -> int | None:
        return self.spec.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.spec.eos_id

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`. With `allow_special=False`, control tokens written in the text
        (`<|im_start|>` typed by a user) are encoded as plain text, not as the control token."""
        backend = self._backend if allow_special else self._literal_backend
        ids = backend.encode(text, add_special_tokens=False).ids
        if self.spec.add_bos and self.spec.bos_id is not None:
            ids.insert(0, self.spec.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for; may be part of a UTF-8 character."""
        if not 0 <= token_id < len(self.spec.tokens):
            raise IndexError(f"token id {token_id} is outside the vocabulary of {len(self.spec.tokens)} tokens")
        token = self.spec.tokens[token_id]
        if set(token) <= self._byte_of.keys():
            return bytes(self._byte_of[c] for c in token)
        # Stored as plain text (some converters do this for added tokens), as transformers reads it.
        return token.encode("utf-8")

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        special = {"bos_token": self.spec.bos_id, "eos_token": self.spec.eos_id}
        names = {name: self.spec.tokens[i] for name, i in special.items() if i is not None}
        return render_chat(self.spec.chat_template, messages, add_generation_prompt, **{**names, **extra})

    @cached_property
    def _literal_backend(self) -> tokenizers.Tokenizer:
        # `encode_special_tokens` is state on the backend; a second one keeps encode() thread-safe.
        return _build_backend(self.spec, parse_special=False)


def _build_backend(spec: VocabSpec, parse_special: bool) -> tokenizers.Tokenizer:
    vocab = {_respell(token): i for i, token in enumerate(spec.tokens)}
    merges = [tuple(merge.split(" ")) for merge in spec.merges]
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=False, fuse_unk=False, byte_fallback=False)
    )
    backend.pre_tokenizer = pre_tokenizer(spec.pre)
    backend.decoder = decoders.ByteLevel()
    _add_whole_tokens(backend, spec)
    backend.encode_special_tokens = not parse_special
    return backend


def _respell(token: str) -> str:
    """A token stored as plain text, spelled in the byte alphabet like its neighbours (as transformers does)."""
    alphabet = unicode_to_byte()
    if set(token) <= alphabet.keys():
        return token
    spelling = byte_to_unicode()
    return "".join(spelling[b] for b in token.encode("utf-8"))


def _add_whole_tokens(backend: tokenizers.Tokenizer, spec: VocabSpec) -> None:
    """Control and user-defined tokens are matched whole in the text before BPE, as llama.cpp does.

    Only those spelled in the byte alphabet: one that is not is a mislabelled normal token
    (transformers skips it too), and adding it would give it a new id past the vocabulary.
    """
    alphabet = unicode_to_byte().keys()
    special, user = [], []
    for token, token_type in zip(spec.tokens, spec.token_types):
        if token_type in SPECIAL_TYPES and set(token) <= alphabet:
            is_control = token_type == TokenType.CONTROL
            (special if is_control else user).append(AddedToken(token, normalized=False, special=is_control))
    backend.add_special_tokens(special)
    backend.add_tokens(user)
