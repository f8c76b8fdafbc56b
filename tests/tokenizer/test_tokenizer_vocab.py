import dataclasses
from typing import Any

import pytest

from sparkinfer.errors import MetadataError
from sparkinfer.tokenizer import Tokenizer, VocabSpec


def replaced(spec: VocabSpec, key: str, value: Any) -> dict[str, Any]:
    md = spec.to_metadata()
    md[key] = value
    return md


def test_round_trip(tiny_vocab: VocabSpec) -> None:
    assert VocabSpec.from_metadata(tiny_vocab.to_metadata()) == tiny_vocab


def test_metadata_is_plain_python(tiny_vocab: VocabSpec) -> None:
    md = tiny_vocab.to_metadata()
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "qwen2"
    assert md["tokenizer.ggml.eos_token_id"] == tiny_vocab.eos_id
    assert md["tokenizer.chat_template"] == tiny_vocab.chat_template
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert all(type(t) is int for t in md["tokenizer.ggml.token_type"])


def test_absent_ids_and_template_are_left_out(tiny_vocab: VocabSpec) -> None:
    spec = dataclasses.replace(tiny_vocab, bos_id=None, pad_id=None, chat_template=None)
    md = spec.to_metadata()
    assert "tokenizer.ggml.bos_token_id" not in md and "tokenizer.chat_template" not in md
    assert VocabSpec.from_metadata(md) == spec


@pytest.mark.parametrize(
    "key",
    [f"tokenizer.ggml.{name}" for name in ("model", "pre", "tokens", "token_type", "merges")],
)
def test_missing_key_is_named(tiny_vocab: VocabSpec, key: str) -> None:
    md = tiny_vocab.to_metadata()
    del md[key]
    with pytest.raises(MetadataError, match=f"GGUF metadata key '{key}' is missing"):
        VocabSpec.from_metadata(md)


def test_sentencepiece_is_refused(tiny_vocab: VocabSpec) -> None:
    md = replaced(tiny_vocab, "tokenizer.ggml.model", "llama")
    with pytest.raises(MetadataError) as err:
        VocabSpec.from_metadata(md)
    assert str(err.value) == (
        "tokenizer.ggml.model is SentencePiece ('llama'): unsupported tokenizer model; "
        "only byte-level BPE ('gpt2') is supported"
    )


def test_unknown_pre_tokenizer_is_refused(tiny_vocab: VocabSpec) -> None:
    message = r"tokenizer.ggml.pre is 'llama-bpe': unsupported pre-tokenizer; supported: \['qwen2'\]"
    with pytest.raises(MetadataError, match=message):
        VocabSpec.from_metadata(replaced(tiny_vocab, "tokenizer.ggml.pre", "llama-bpe"))
    with pytest.raises(MetadataError, match="unsupported pre-tokenizer"):
        Tokenizer.from_vocab(dataclasses.replace(tiny_vocab, pre="gpt-4o"))


def test_wrong_types_are_named(tiny_vocab: VocabSpec) -> None:
    with pytest.raises(MetadataError, match="'tokenizer.ggml.tokens' should be list, got str"):
        VocabSpec.from_metadata(replaced(tiny_vocab, "tokenizer.ggml.tokens", "abc"))
    with pytest.raises(MetadataError, match="'tokenizer.ggml.token_type' should be a list of int"):
        VocabSpec.from_metadata(replaced(tiny_vocab, "tokenizer.ggml.token_type", ["1"] * 512))
    with pytest.raises(MetadataError, match="'tokenizer.ggml.eos_token_id' should be int, got bool"):
        VocabSpec.from_metadata(replaced(tiny_vocab, "tokenizer.ggml.eos_token_id", True))


def test_token_type_count_must_match(tiny_vocab: VocabSpec) -> None:
    message = "tokenizer.ggml.token_type has 511 entries but tokenizer.ggml.tokens has 512"
    with pytest.raises(MetadataError, match=message):
        VocabSpec.from_metadata(replaced(tiny_vocab, "tokenizer.ggml.token_type", tiny_vocab.token_types[:-1]))


def test_bad_merge_is_named(tiny_vocab: VocabSpec) -> None:
    merges = list(tiny_vocab.merges)
    merges[7] = "Ġ zzzz"
    with pytest.raises(MetadataError, match=r"tokenizer.ggml.merges\[7\] = 'Ġ zzzz' does not join two tokens"):
        VocabSpec.from_metadata(replaced(tiny_vocab, "tokenizer.ggml.merges", merges))


def test_token_id_out_of_range(tiny_vocab: VocabSpec) -> None:
    message = "'tokenizer.ggml.bos_token_id' is 512, outside the vocabulary of 512 tokens"
    with pytest.raises(MetadataError, match=message):
        VocabSpec.from_metadata(replaced(tiny_vocab, "tokenizer.ggml.bos_token_id", 512))
