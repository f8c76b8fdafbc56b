import pytest

from sparkinfer.tokenizer import Tokenizer, VocabSpec, synthetic_vocab

TINY_VOCAB = 512
QWEN3_VOCAB = 151936


@pytest.fixture(scope="session")
def tiny_vocab() -> VocabSpec:
    return synthetic_vocab(TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_vocab: VocabSpec) -> Tokenizer:
    return Tokenizer.from_vocab(tiny_vocab)


@pytest.fixture(scope="session")
def qwen3_vocab() -> VocabSpec:
    return synthetic_vocab(QWEN3_VOCAB)


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_vocab: VocabSpec) -> Tokenizer:
    return Tokenizer.from_vocab(qwen3_vocab)


@pytest.fixture(scope="session", params=["tiny", "qwen3"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")
