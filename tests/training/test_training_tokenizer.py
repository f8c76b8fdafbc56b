"""The tokenizer trainer gives a consistent, deterministic VocabSpec that SparkInfer's
tokenizer reads back to the same ids."""

import json

import pytest

from training import train_tokenizer as T

TEXT = [
    "import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Entry point.\"\"\"\n    return 0\n",
    "class Path(object):\n    def __init__(self, name):\n        self.name = name  # 1234\n",
    "for i in range(10):\n    print(i, 'done', \"x=%d\" % i)\n\tpass\r\n",
    "caf\u00e9 = '\u00fcber'  # na\u00efve \u4e2d\u6587\n",
] * 4
VOCAB = 320


@pytest.fixture(scope="module")
def trained():
    tok = T.train_bpe(TEXT, VOCAB)
    return tok, T.vocab_spec_dict(tok)


def test_layout(trained):
    tok, spec = trained
    n = len(spec["tokens"])
    assert 256 + len(T.SPECIAL_TOKENS) < n <= VOCAB
    assert len(spec["token_types"]) == n
    assert spec["tokens"][-3:] == list(T.SPECIAL_TOKENS)
    assert spec["token_types"][-3:] == [T.TOKEN_TYPE_CONTROL] * 3
    assert set(spec["token_types"][:-3]) == {T.TOKEN_TYPE_NORMAL}
    eot = spec["tokens"].index(T.ENDOFTEXT)
    assert spec["bos_id"] == spec["eos_id"] == spec["pad_id"] == eot
    assert spec["model"] == "gpt2" and spec["pre"] == "qwen2" and spec["add_bos"] is False
    assert len(set(spec["tokens"])) == n


def test_tokens_are_byte_unicode_and_merges_join_tokens(trained):
    _, spec = trained
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    assert len(alphabet) == 256 and alphabet <= set(spec["tokens"])
    for t in spec["tokens"][:-3]:
        assert set(t) <= alphabet, t
    known = set(spec["tokens"])
    assert len(spec["merges"]) == len(spec["tokens"]) - 256 - 3
    for m in spec["merges"]:
        a, b = m.split(" ")
        assert a in known and b in known and a + b in known


def test_deterministic(trained):
    tok, spec = trained
    tok2 = T.train_bpe(TEXT, VOCAB)
    assert tok2.to_str() == tok.to_str()
    assert T.vocab_spec_dict(tok2) == spec


def test_save_load(trained, tmp_path):
    tok, spec = trained
    saved = T.save(tok, tmp_path / "tok", model_max_length=512)
    tok2, spec2 = T.load(tmp_path / "tok")
    assert saved == spec2 == spec
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == T.ENDOFTEXT and cfg["model_max_length"] == 512
    assert tok2.encode(TEXT[0]).ids == tok.encode(TEXT[0]).ids


def test_matches_runtime_tokenizer(trained):
    tok, spec = trained
    pytest.importorskip("sparkinfer.tokenizer")
    from sparkinfer.tokenizer import CHATML_TEMPLATE, Tokenizer, VocabSpec
    from sparkinfer.tokenizer.vocab import QWEN2_SPLIT

    assert T.QWEN2_SPLIT == QWEN2_SPLIT
    assert T.CHAT_TEMPLATE == CHATML_TEMPLATE
    vs = T.to_vocab_spec(spec)
    assert isinstance(vs, VocabSpec)
    VocabSpec.from_metadata(vs.to_metadata())  # validates merges and ids as a GGUF reader would
    rt = Tokenizer.from_vocab(vs)
    samples = TEXT[:4] + [
        "x = 3.14159 + 2e10\n\n\n    \n",
        "<|im_start|>user\nhello<|im_end|>\n<|endoftext|>",
        "  leading spaces and trailing   ",
        "emoji \U0001F600 and tabs\t\tend",
    ]
    for s in samples:
        ids = tok.encode(s).ids
        assert rt.encode(s) == ids, s
        assert rt.decode(ids) == s
    assert rt.encode("<|im_end|>") == [spec["tokens"].index(T.IM_END)]


def test_vocab_too_small():
    with pytest.raises(ValueError, match="no room"):
        T.train_bpe(TEXT, 200)
