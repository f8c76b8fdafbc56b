import time

import pytest
from gguf import TokenType

from sparkinfer.tokenizer import VocabSpec, synthetic_vocab
from sparkinfer.tokenizer.vocab import byte_to_unicode


@pytest.mark.parametrize("n_vocab", [259, 512, 2048])
def test_size_is_exact(n_vocab: int) -> None:
    spec = synthetic_vocab(n_vocab)
    assert len(spec.tokens) == len(spec.token_types) == n_vocab
    assert len(spec.merges) == n_vocab - 256 - 3


def test_qwen3_size_is_exact_and_fast(qwen3_vocab: VocabSpec) -> None:
    start = time.perf_counter()
    synthetic_vocab(151936, seed=1)
    assert time.perf_counter() - start < 5.0
    assert len(qwen3_vocab.tokens) == 151936


def test_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 259 tokens"):
        synthetic_vocab(258)


def test_layout(qwen3_vocab: VocabSpec) -> None:
    spec = qwen3_vocab
    assert spec.tokens[:256] == list(byte_to_unicode().values())
    assert len(set(spec.tokens)) == len(spec.tokens)
    assert spec.tokens[-3:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert spec.token_types[-3:] == [TokenType.CONTROL] * 3
    assert set(spec.token_types[:-3]) == {TokenType.NORMAL}
    assert spec.bos_id == spec.pad_id == len(spec.tokens) - 3
    assert spec.eos_id == len(spec.tokens) - 1
    assert (spec.model, spec.pre, spec.add_bos) == ("gpt2", "qwen2", False)


def test_each_merge_creates_the_next_token_from_earlier_ones(qwen3_vocab: VocabSpec) -> None:
    index = {token: i for i, token in enumerate(qwen3_vocab.tokens)}
    for rank, merge in enumerate(qwen3_vocab.merges):
        left, right = merge.split(" ")
        new_id = 256 + rank
        assert qwen3_vocab.tokens[new_id] == left + right
        assert index[left] < new_id and index[right] < new_id


def test_is_deterministic_and_seeded() -> None:
    assert synthetic_vocab(1024, seed=3) == synthetic_vocab(1024, seed=3)
    assert synthetic_vocab(1024, seed=3).merges != synthetic_vocab(1024, seed=4).merges


def test_tokens_stay_word_sized(qwen3_vocab: VocabSpec) -> None:
    assert max(len(token) for token in qwen3_vocab.tokens[:-3]) <= 24


def test_english_encodes_to_multibyte_tokens(tiny_tokenizer, qwen3_tokenizer) -> None:
    text = "The first thing we should do is make the model work for people who have the data."
    n_bytes = len(text.encode())
    assert n_bytes / len(tiny_tokenizer.encode(text)) > 2.0
    assert n_bytes / len(qwen3_tokenizer.encode(text)) > 3.0
