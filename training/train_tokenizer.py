"""Byte-level BPE for the demo model, trained with Hugging Face `tokenizers`.

The pre-tokenizer is exactly the runtime's (`sparkinfer.tokenizer`, llama.cpp's `qwen2`):
Split on Qwen2's regex (isolated), then ByteLevel(add_prefix_space=False, use_regex=False).
No normalizer (llama.cpp applies none). Merges learned on that split give the same ids in
SparkInfer, transformers and llama.cpp.

The vocabulary holds ``vocab_size - 3`` learned tokens (the 256 byte characters first) and
then, like Qwen's, the special tokens at the end: ``<|endoftext|>`` (bos, eos and pad of this
base model), ``<|im_start|>``, ``<|im_end|>`` (ChatML markers for the chat template).

Output folder (``save``):
  tokenizer.json         the HF `tokenizers` file (``tokenizers.Tokenizer.from_file``)
  tokenizer_config.json  so ``transformers.AutoTokenizer.from_pretrained(folder)`` works
  vocab_spec.json        the fields of ``sparkinfer.tokenizer.VocabSpec`` (tokens in GPT-2
                         byte-unicode form, token types, merges "a b", ids, chat template)

    python -m training.train_tokenizer --out training/runs/tok [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Same text as sparkinfer.tokenizer.vocab.QWEN2_SPLIT (kept here so training needs no sparkinfer;
# tests/training checks the two agree).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# GGUF token types (gguf.TokenType): NORMAL = 1, CONTROL = 3.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3

# ChatML, as Qwen's models use (without tools or thinking). The demo model is a base model
# trained on code; the template is there so chat endpoints have something well-formed to render.
CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

DEFAULT_VOCAB_SIZE = 4096


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer of at most ``vocab_size`` tokens, special tokens last."""
    n_learned = vocab_size - len(SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_learned < len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the 256 byte tokens and {len(SPECIAL_TOKENS)} specials")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=sorted(alphabet),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def vocab_spec_dict(tok: Tokenizer) -> dict:
    """The fields of ``sparkinfer.tokenizer.VocabSpec`` for a tokenizer made by ``train_bpe``."""
    state = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError("token ids are not contiguous")
    tokens = [t for t, _ in by_id]
    specials = set(SPECIAL_TOKENS)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    eot = vocab[ENDOFTEXT]
    return {
        "tokens": tokens,
        "token_types": [TOKEN_TYPE_CONTROL if t in specials else TOKEN_TYPE_NORMAL for t in tokens],
        "merges": merges,
        "bos_id": eot,
        "eos_id": eot,
        "pad_id": eot,
        "chat_template": CHAT_TEMPLATE,
        "model": "gpt2",
        "pre": "qwen2",
        "add_bos": False,
    }


def to_vocab_spec(spec: dict):
    """A ``sparkinfer.tokenizer.VocabSpec`` from ``vocab_spec_dict`` output (needs sparkinfer)."""
    from sparkinfer.tokenizer import VocabSpec

    return VocabSpec(**spec)


def hf_tokenizer_config(spec: dict, model_max_length: int) -> dict:
    eot = spec["tokens"][spec["eos_id"]]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eot,
        "pad_token": eot,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": spec["chat_template"],
    }


def save(tok: Tokenizer, out_dir: Path | str, model_max_length: int = 1024) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    spec = vocab_spec_dict(tok)
    (out / "vocab_spec.json").write_text(json.dumps(spec, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(hf_tokenizer_config(spec, model_max_length), indent=1) + "\n", encoding="utf-8"
    )
    return spec


def load(tok_dir: Path | str) -> tuple[Tokenizer, dict]:
    d = Path(tok_dir)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    spec = json.loads((d / "vocab_spec.json").read_text(encoding="utf-8"))
    return tok, spec


def main(argv: list[str] | None = None) -> int:
    from training.corpus import load_corpus, load_manifest, MANIFEST_PATH

    ap = argparse.ArgumentParser(prog="python -m training.train_tokenizer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--manifest", type=Path, default=MANIFEST_PATH)
    ap.add_argument("--corpus", type=Path, default=None, help="corpus tarball (default training/.corpus/<archive>)")
    args = ap.parse_args(argv)
    corpus = load_corpus(args.corpus, load_manifest(args.manifest))
    tok = train_bpe((d.text for d in corpus.train), args.vocab_size, args.min_frequency)
    spec = save(tok, args.out)
    held = "".join(d.text for d in corpus.heldout)
    n = len(tok.encode(held).ids)
    print(f"{args.out}: {len(spec['tokens'])} tokens, {len(spec['merges'])} merges; "
          f"held-out text {len(held.encode())} bytes -> {n} tokens ({len(held.encode()) / n:.2f} bytes/token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
