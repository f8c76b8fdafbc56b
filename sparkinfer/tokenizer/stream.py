"""Incremental detokenization for streaming: byte-level tokens can end mid-character
(an emoji is often two or more tokens), so text is released only once its bytes are complete."""

from __future__ import annotations

import codecs

from sparkinfer.tokenizer.bpe import Tokenizer


class StreamDecoder:
    """Turn a stream of token ids into text pieces that are always whole UTF-8 characters.

    The concatenation of everything `push` and `flush` return equals `tokenizer.decode(ids)`.
    Bytes that can never become a character are released at once as U+FFFD rather than held.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is still partial)."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back at the end of the stream (a cut-off character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
