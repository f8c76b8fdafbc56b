import random

import pytest
from tokenizer_testutil import SAMPLES

from sparkinfer.tokenizer import StreamDecoder, Tokenizer


def stream(tokenizer: Tokenizer, ids: list[int], **kwargs: bool) -> list[str]:
    decoder = StreamDecoder(tokenizer, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def is_whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("text", SAMPLES)
def test_pieces_join_to_the_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_split_characters_are_held_back(tiny_tokenizer: Tokenizer) -> None:
    text = "😀 中文 𝄞"
    ids = tiny_tokenizer.encode(text)
    # The tiny vocabulary has no merges for these, so every character is cut across byte tokens.
    assert not any(is_whole_utf8(tiny_tokenizer.token_bytes(i)) for i in ids if tiny_tokenizer.token_bytes(i) != b" ")
    pieces = stream(tiny_tokenizer, ids)
    assert [p for p in pieces if p] == ["😀", " ", "中", "文", " ", "𝄞"]


def test_part_character_token(qwen3_tokenizer: Tokenizer) -> None:
    # The big vocabulary has two-byte tokens that are the start of a CJK character.
    tok = qwen3_tokenizer
    head = next(i for i in range(256, tok.vocab_size) if len(tok.token_bytes(i)) == 2 and tok.token_bytes(i)[0] >= 0xE4)
    last = next(i for i in range(256) if is_whole_utf8(tok.token_bytes(head) + tok.token_bytes(i)))
    decoder = StreamDecoder(tok)
    assert decoder.push(head) == ""
    assert decoder.push(last) == (tok.token_bytes(head) + tok.token_bytes(last)).decode()


def test_bytes_that_cannot_complete_are_not_held(tiny_tokenizer: Tokenizer) -> None:
    continuation = next(i for i in range(256) if tiny_tokenizer.token_bytes(i) == b"\x80")
    assert StreamDecoder(tiny_tokenizer).push(continuation) == "\ufffd"


def test_cut_off_character_is_flushed_as_replacement(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("ok😀")[:-1]
    pieces = stream(tiny_tokenizer, ids)
    assert "".join(pieces[:-1]) == "ok" and pieces[-1] == "\ufffd"


def test_skip_special(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("Hi<|im_end|>")
    assert "".join(stream(tiny_tokenizer, ids, skip_special=True)) == "Hi"


def test_random_ids_match_full_decode(tiny_tokenizer: Tokenizer) -> None:
    # Arbitrary (often invalid) byte sequences: same U+FFFD placement as the one-shot decode.
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tiny_tokenizer.vocab_size - 3) for _ in range(rng.randint(1, 12))]
        assert "".join(stream(tiny_tokenizer, ids)) == tiny_tokenizer.decode(ids)
