import dataclasses

import pytest
from gguf import TokenType
from tokenizer_testutil import SAMPLES

from sparkinfer.tokenizer import Tokenizer, VocabSpec


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_with_specials_as_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, allow_special=False)
    assert not any(tokenizer.is_special(i) for i in ids)
    assert tokenizer.decode(ids) == text


def test_special_tokens_encode_whole(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.spec.tokens
    im_start, im_end = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert ids.count(im_start) == ids.count(im_end) == 1
    assert tokenizer.encode("<|im_end|>") == [tokenizer.eos_id]


def test_decode_can_skip_specials(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>assistant\nHello!<|im_end|>")
    assert tokenizer.decode(ids, skip_special=True) == "assistant\nHello!"


def test_digits_split_one_by_one(tokenizer: Tokenizer) -> None:
    # Qwen2's split isolates each digit, whatever merges exist.
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2024")] == ["2", "0", "2", "4"]


def test_byte_tokens_cover_every_byte(tokenizer: Tokenizer) -> None:
    assert sorted(tokenizer.token_bytes(i) for i in range(256)) == [bytes([b]) for b in range(256)]


def test_properties(tiny_tokenizer: Tokenizer, tiny_vocab: VocabSpec) -> None:
    assert tiny_tokenizer.vocab_size == 512
    assert tiny_tokenizer.eos_id == tiny_vocab.eos_id == 511
    assert tiny_tokenizer.bos_id == tiny_vocab.bos_id == 509
    assert tiny_tokenizer.token_bytes(511) == b"<|im_end|>"


def test_token_id_outside_vocabulary(tiny_tokenizer: Tokenizer) -> None:
    with pytest.raises(IndexError, match="token id 512 is outside the vocabulary of 512 tokens"):
        tiny_tokenizer.token_bytes(512)
    with pytest.raises(IndexError):
        tiny_tokenizer.token_bytes(-1)


def test_add_bos_is_honoured(tiny_vocab: VocabSpec) -> None:
    tokenizer = Tokenizer.from_vocab(dataclasses.replace(tiny_vocab, add_bos=True))
    assert tokenizer.encode("hi")[0] == tiny_vocab.bos_id


def test_plain_text_tokens_decode_as_written(tiny_vocab: VocabSpec) -> None:
    # Some converters store an added token as plain text ("a b") instead of in the byte alphabet.
    tokens = list(tiny_vocab.tokens)
    tokens[300] = "<think> now"
    tokenizer = Tokenizer.from_vocab(dataclasses.replace(tiny_vocab, tokens=tokens, merges=[]))
    assert tokenizer.token_bytes(300) == b"<think> now"
    assert tokenizer.decode([300]) == "<think> now"


def test_user_defined_tokens_match_whole_but_are_not_special(tiny_vocab: VocabSpec) -> None:
    # Like Qwen3's <think>: llama.cpp matches it in any text, and it survives skip_special.
    spec = dataclasses.replace(
        tiny_vocab,
        tokens=[*tiny_vocab.tokens, "<think>"],
        token_types=[*tiny_vocab.token_types, int(TokenType.USER_DEFINED)],
    )
    tokenizer = Tokenizer.from_vocab(spec)
    think = len(spec.tokens) - 1
    for allow_special in (True, False):
        assert tokenizer.encode("a<think>b", allow_special=allow_special).count(think) == 1
    assert tokenizer.decode(tokenizer.encode("<think>x<|im_end|>"), skip_special=True) == "<think>x"
