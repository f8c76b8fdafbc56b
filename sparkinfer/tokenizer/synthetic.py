"""Synthetic Qwen2-style vocabularies for test models: real byte-level BPE structure, no download.

The first merges are learned (real BPE training) on a small generated corpus of English prose,
Python and a little CJK, so ordinary text encodes to word-sized tokens even in a vocabulary of a
few hundred. The rest, up to any size, spell English-looking words and CJK characters at random (seeded):
Qwen3's 151936 take about a second, and every merge still joins two existing tokens into a new one.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from itertools import accumulate
from operator import itemgetter

from gguf import TokenType

from sparkinfer.tokenizer.bpe import pre_tokenizer
from sparkinfer.tokenizer.chat import CHATML_TEMPLATE
from sparkinfer.tokenizer.vocab import VocabSpec, byte_to_unicode

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# Most frequent first: the corpus samples them with Zipf weights, so early merges are English's.
_WORDS = """
the of and to a in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there one all we their been has when who will more no if out
so said what up its about into than them can only other new some time could these two may then
do first any my now such like our over man me even most made after also did many before must
through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being
under never day same another know while last might us great old year off come since against go
came right used take three user assistant system model token text code data value file line list
string number return self def class import print none true false else elif range len append
result input output error key name type test function args kwargs
""".split()
_CODE = """
def {w}(self, {v}):
    if {v} is None:
        return {w}
    for i in range(len({v})):
        result.append({v}[i] + {n})
    return result
"""
_FOREIGN = "你好 世界 我们 中国 模型 数据 日本語 こんにちは café naïve über señor 🙂 🎉 ✓ →".split()
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_LETTER_CUM_WEIGHTS = list(
    accumulate([127, 91, 82, 75, 70, 67, 63, 61, 60, 43, 40, 28, 28, 24, 24, 22, 20, 20, 19, 15, 10, 8, 2, 2, 1, 1])
)
_PUNCT = [".", ".", ".", ",", ",", "!", "?", ";", ":", " -", " (", ")", '"', "'s", "n't", "...", "\n", "\n\n"]


def synthetic_vocab(n_vocab: int, seed: int = 0) -> VocabSpec:
    """A valid Qwen2-style vocabulary of exactly `n_vocab` tokens: 256 byte tokens, one merge per
    further token, then `<|endoftext|>` (bos, pad), `<|im_start|>`, `<|im_end|>` (eos) as control tokens."""
    if n_vocab < MIN_VOCAB:
        raise ValueError(f"a byte-level vocabulary needs at least {MIN_VOCAB} tokens, got {n_vocab}")
    rng = random.Random(seed)
    builder = _MergeBuilder(list(byte_to_unicode().values()), limit=n_vocab - MIN_VOCAB, reserved=SPECIAL_TOKENS)
    _learn_merges(builder, _corpus_pieces(rng))
    _fill_merges(builder, rng)
    tokens = builder.tokens + list(SPECIAL_TOKENS)
    token_types = [int(TokenType.NORMAL)] * len(builder.tokens) + [int(TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    return VocabSpec(
        tokens=tokens,
        token_types=token_types,
        merges=[f"{a} {b}" for a, b in builder.merges],
        bos_id=tokens.index(ENDOFTEXT),
        eos_id=tokens.index(IM_END),
        pad_id=tokens.index(ENDOFTEXT),
        chat_template=CHATML_TEMPLATE,
    )


class _MergeBuilder:
    """Tokens and merges so far; refuses a merge whose result exists or once the budget is spent."""

    def __init__(self, base: list[str], limit: int, reserved: tuple[str, ...]) -> None:
        self.tokens = list(base)
        self.merges: list[tuple[str, str]] = []
        self.limit = limit
        self._seen = set(base) | set(reserved)

    @property
    def full(self) -> bool:
        return len(self.merges) >= self.limit

    def add(self, left: str, right: str) -> bool:
        merged = left + right
        if self.full or merged in self._seen:
            return False
        self._seen.add(merged)
        self.tokens.append(merged)
        self.merges.append((left, right))
        return True

    def has(self, token: str) -> bool:
        return token in self._seen


def _corpus_pieces(rng: random.Random) -> Counter[str]:
    """Pre-tokenized pieces (GPT-2 characters) of a generated corpus, with their counts."""
    weights = [1.0 / (rank + 1) for rank in range(len(_WORDS))]
    parts: list[str] = []
    for _ in range(1500):
        words = rng.choices(_WORDS, weights=weights, k=rng.randint(3, 12))
        words[0] = words[0].capitalize()
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), rng.choice(_FOREIGN))
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), str(rng.randrange(10000)))
        parts.append(" ".join(words) + rng.choice(_PUNCT) + " ")
        if rng.random() < 0.05:
            parts.append(_CODE.format(w=rng.choice(_WORDS), v=rng.choice(_WORDS), n=rng.randrange(100)))
    pieces = pre_tokenizer("qwen2").pre_tokenize_str("".join(parts))
    return Counter(piece for piece, _ in pieces)


def _learn_merges(builder: _MergeBuilder, pieces: Counter[str]) -> None:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair across the pieces."""
    words = [list(piece) for piece in pieces]
    counts = list(pieces.values())
    pair_count: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_count[pair] += counts[i]
            where[pair].add(i)
    while pair_count and not builder.full:
        pair = max(pair_count.items(), key=itemgetter(1))[0]
        del pair_count[pair]
        if not builder.add(*pair):
            continue  # same string as an earlier token by another split: leave these pieces unmerged
        for i in where.pop(pair):
            old = words[i]
            words[i] = _merge_pair(old, pair)
            for stale in zip(old, old[1:]):
                if stale in pair_count:
                    pair_count[stale] -= counts[i]
                    if pair_count[stale] <= 0:
                        del pair_count[stale]
            for fresh in zip(words[i], words[i][1:]):
                pair_count[fresh] += counts[i]
                where[fresh].add(i)


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _fill_merges(builder: _MergeBuilder, rng: random.Random) -> None:
    """Seeded merges until the budget is spent: mostly English-looking words, some CJK."""
    cjk_chars: list[str] = []
    while not builder.full:
        if rng.random() < 0.85:
            _add_word(builder, _pseudo_word(rng))
        elif rng.random() < 0.5 or len(cjk_chars) < 2:
            _add_cjk_char(builder, rng, cjk_chars)
        else:
            builder.add(rng.choice(cjk_chars), rng.choice(cjk_chars))


def _pseudo_word(rng: random.Random) -> str:
    """2-10 letters at English frequencies, often capitalized or after a space, as a BPE piece would be."""
    letters = rng.choices(_LETTERS, cum_weights=_LETTER_CUM_WEIGHTS, k=rng.randint(2, 10))
    if rng.random() < 0.15:
        letters[0] = letters[0].upper()
    space = byte_to_unicode()[ord(" ")] if rng.random() < 0.6 else ""
    return space + "".join(letters)


def _add_word(builder: _MergeBuilder, word: str) -> None:
    """Every prefix of the word as a token, each the merge of the one before and a letter,
    so tokens stay word-sized and every merge's parts exist."""
    for end in range(2, len(word) + 1):
        if not builder.has(word[:end]) and not builder.add(word[: end - 1], word[end - 1]):
            return


def _add_cjk_char(builder: _MergeBuilder, rng: random.Random, cjk_chars: list[str]) -> None:
    """A common CJK ideograph as a token, built via its first two bytes: a part-character token,
    as real vocabularies have."""
    b0, b1, b2 = (byte_to_unicode()[b] for b in chr(rng.randint(0x4E00, 0x9FA5)).encode("utf-8"))
    if not builder.has(b0 + b1):
        builder.add(b0, b1)
    if builder.has(b0 + b1) and builder.add(b0 + b1, b2):
        cjk_chars.append(builder.tokens[-1])
