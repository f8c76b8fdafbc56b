"""The reference side of the accuracy gate: what the numpy forward (`sparkinfer.reference`) of a
GGUF file says about a token sequence, computed now or loaded from a file saved earlier.

A `Reference` holds, for the scored tokens `tokens[0..N-1]` (positions 0..N-2, see `metrics`):
  - `target_logprob[P]` (float32): log p_ref of the actual next token (the reference's perplexity);
  - `top1[P]` (int32): the reference's argmax;
  - its distributions, for the KL: full log-probs `logprobs[P, V]`, or the top-k
    (`topk_ids[P, k]` int32, `topk_logprobs[P, k]` float32) with a uniform sample of the rest
    (`tail_ids[P, m]`, `tail_logprobs[P, m]`);
  - `greedy_prompt[Pp]` and `greedy_tokens[G]`: the reference's greedy continuation of the prompt;
  - `meta`: what it was made from (the model's `hparams_hash`, a hash of its vocabulary, the text,
    the reference model file) so that reusing it with another model or text fails clearly.

Saved file (`save`/`load`): a numpy `.npz` (zip, deflate) of those arrays plus `meta` as a JSON
string; it loads without pickle. The distributions are stored by vocabulary size:
  - V <= FULL_MAX_VOCAB (16384): full log-softmax in float16 ("full-f16"), renormalised on load.
    The KL is then exact up to float16 rounding of log-probs: near log p = 0, where the mass
    is, the spacing is 2^-11 or finer, so the rounding moves a position's KL by ~1e-4 at most
    and the mean over hundreds of positions by ~1e-5 (the gate's KL limits are 1e-2-ish).
    The demo model (V = 4096) at 511 positions: 4.2 MB raw.
  - larger vocabularies (Qwen3: 151936, i.e. 155 MB per 511 positions in float16): the top
    TOPK (64) log-probs in float32 with their ids, and TAIL_SAMPLE (1024) of the other ids
    drawn uniformly without replacement (seeded by position) with theirs ("topk"): 4.4 MB per
    511 positions. The KL is then exact over the top-64 and an unbiased estimate over the
    rest (`metrics.kl_topk_tail`), which matters for flat distributions such as a synthetic
    model's, where the top-64 hold under 1 % of the mass.
  In both, `target_logprob` and `top1` are stored exactly (float32 / int32), so perplexity
  and top-1 agreement do not depend on the storage.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparkinfer.accuracy.metrics import kl_full, kl_topk_tail, log_softmax, renormalise
from sparkinfer.errors import SparkInferError

KIND = "sparkinfer-accuracy-reference"
FORMAT = 2  # 2: "topk" storage carries the tail sample
FULL_MAX_VOCAB = 16384
TOPK = 64
TAIL_SAMPLE = 1024
STORAGES = ("auto", "full-f16", "topk")

_ARRAYS = ("tokens", "target_logprob", "top1", "greedy_prompt", "greedy_tokens")
_TOPK_ARRAYS = ("topk_ids", "topk_logprobs", "tail_ids", "tail_logprobs")


class ReferenceFileError(SparkInferError):
    """A saved reference file is missing, unreadable, or made for another model or text."""


def vocab_hash(vocab: Any) -> str:
    """16 hex digits over a `VocabSpec`'s tokens, types and merges (what encoding depends on)."""
    canonical = json.dumps([list(vocab.tokens), list(vocab.token_types), list(vocab.merges)], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_identity(model: Any) -> dict[str, Any]:
    """What the gate records of a GGUF model (no hash of its bytes: a 17 GB file takes a minute)."""
    return {
        "file": Path(model.path).name,
        "bytes": int(model.file_size),
        "name": str(model.metadata.get("general.name", "")),
        "file_type": model.metadata.get("general.file_type"),
        "hparams_hash": model.config.hparams_hash(),
        "vocab_hash": vocab_hash(model.vocab),
    }


@dataclass
class Reference:
    tokens: np.ndarray
    target_logprob: np.ndarray
    top1: np.ndarray
    greedy_prompt: np.ndarray
    greedy_tokens: np.ndarray
    logprobs: np.ndarray | None = None  # [P, V], float32 when computed, float16 when loaded
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    tail_ids: np.ndarray | None = None
    tail_logprobs: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return int(self.target_logprob.size)

    @property
    def storage(self) -> str:
        """"full" (float32, computed here), "full-f16" (loaded) or "topk"."""
        if self.logprobs is None:
            return "topk"
        return "full-f16" if self.logprobs.dtype == np.float16 else "full"

    def kl(self, ours_logprobs: np.ndarray) -> np.ndarray:
        """KL(ref || ours) per position (nats) against our log-probs `[P, V]`."""
        if self.logprobs is not None:
            lr = self.logprobs if self.logprobs.dtype == np.float32 else renormalise(self.logprobs)
            return kl_full(lr, ours_logprobs)
        return kl_topk_tail(self.topk_ids, self.topk_logprobs, self.tail_ids, self.tail_logprobs, ours_logprobs)

    def with_storage(self, storage: str = "auto", k: int = TOPK, tail: int = TAIL_SAMPLE) -> Reference:
        """This reference as it will be saved: "full-f16", "topk" (top `k` and a sample of `tail`
        other ids), or "auto" (full when the vocabulary has at most FULL_MAX_VOCAB tokens)."""
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        if self.logprobs is None:
            if storage == "full-f16":
                raise ReferenceFileError("this reference holds only top-k log-probs: it cannot be saved in full")
            return self
        vocab = self.logprobs.shape[-1]
        if storage == "auto":
            storage = "full-f16" if vocab <= FULL_MAX_VOCAB else "topk"
        meta = {**self.meta, "storage": storage}
        common = dict(tokens=self.tokens, target_logprob=self.target_logprob, top1=self.top1,
                      greedy_prompt=self.greedy_prompt, greedy_tokens=self.greedy_tokens)
        if storage == "full-f16":
            return Reference(**common, logprobs=self.logprobs.astype(np.float16), meta=meta)
        k = min(int(k), vocab)
        lp = np.asarray(self.logprobs, np.float32)
        order = np.argsort(-lp, axis=-1, kind="stable").astype(np.int32)
        ids, rest = order[:, :k], order[:, k:]
        m = min(int(tail), vocab - k)
        picks = np.stack([np.random.default_rng([FORMAT, p]).choice(vocab - k, m, replace=False)
                          for p in range(lp.shape[0])]) if lp.shape[0] else np.zeros((0, m), np.int64)
        tail_ids = np.take_along_axis(rest, picks, axis=-1)
        meta.update(topk=k, tail_sample=m)
        return Reference(**common, topk_ids=ids, topk_logprobs=np.take_along_axis(lp, ids, axis=-1),
                         tail_ids=tail_ids, tail_logprobs=np.take_along_axis(lp, tail_ids, axis=-1), meta=meta)


# -----------------------------------------------------------------------------------------
# Computing
# -----------------------------------------------------------------------------------------


def compute_reference(model: Any, tokens: Sequence[int], *, prompt_tokens: int, greedy_tokens: int,
                      text: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> Reference:
    """The numpy float32 forward of `model` (an open GGUFModel) on `tokens` (teacher-forced), and
    its greedy continuation (`greedy_tokens` ids) of the first `prompt_tokens` of them."""
    from sparkinfer.reference import ReferenceModel

    log = log or (lambda message: None)
    ids = np.asarray(tokens, np.int32)
    ref = ReferenceModel(model.config, model)
    prompt = ids[:prompt_tokens] if greedy_tokens > 0 else ids[:0]
    # The greedy prompt is a prefix of the scored tokens (tokens_of checks that): its KV cache is
    # kept from the teacher-forced pass rather than computed twice, which on the full-size model
    # saves one pass over all its experts (minutes of dequantization).
    split = prompt.size if 0 < prompt.size < ids.size else 0
    t0 = time.perf_counter()
    parts = [ref.prefill(ids[:split])] if split else []
    after_prompt = ref.snapshot() if split else None
    if split < ids.size - 1:  # a prompt of all but the last token leaves nothing to add
        parts.append(ref.prefill(ids[split:-1]))
    logits = np.concatenate(parts)
    lp = log_softmax(logits)
    target = lp[np.arange(lp.shape[0]), ids[1:]]
    top1 = np.argmax(logits, axis=-1).astype(np.int32)
    t1 = time.perf_counter()
    if after_prompt is not None:
        ref.restore(after_prompt)
        greedy = ref.greedy_continue(logits[split - 1], greedy_tokens)
    else:
        greedy = ref.greedy_generate(prompt.tolist(), greedy_tokens) if greedy_tokens > 0 else []
    t2 = time.perf_counter()
    log(f"reference: numpy forward of {Path(model.path).name}: {ids.size - 1} positions in {t1 - t0:.1f} s, "
        f"{len(greedy)} greedy tokens in {t2 - t1:.1f} s")
    meta = {
        "kind": KIND,
        "format": FORMAT,
        "hparams_hash": model.config.hparams_hash(),
        "vocab_hash": vocab_hash(model.vocab),
        "vocab_size": int(model.config.vocab_size),
        "reference_model": model_identity(model),
        "text": text or {},
        "n_tokens": int(ids.size),
        "prompt_tokens": int(prompt.size),
        "greedy_tokens": len(greedy),
        "seconds": {"forward": round(t1 - t0, 3), "greedy": round(t2 - t1, 3)},
    }
    return Reference(tokens=ids, target_logprob=target.astype(np.float32), top1=top1, greedy_prompt=prompt,
                     greedy_tokens=np.asarray(greedy, np.int32), logprobs=lp, meta=meta)


# -----------------------------------------------------------------------------------------
# Saving and loading
# -----------------------------------------------------------------------------------------


def save_reference(ref: Reference, path: str | Path, storage: str = "auto", k: int = TOPK,
                   tail: int = TAIL_SAMPLE) -> Reference:
    """Write `ref` to `path` (exactly that name; see the module docstring for the format).
    Returns the reference as stored (what `load_reference` will give back)."""
    import sparkinfer

    stored = ref.with_storage(storage, k, tail)
    meta = {**stored.meta, "sparkinfer_version": sparkinfer.__version__}
    arrays = {name: getattr(stored, name) for name in _ARRAYS}
    if stored.logprobs is not None:
        arrays["logprobs"] = stored.logprobs
    else:
        for name in _TOPK_ARRAYS:
            arrays[name] = getattr(stored, name)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
    except OSError as e:
        raise ReferenceFileError(f"cannot write the reference to {path}: {e.strerror}") from e
    stored.meta = meta
    return stored


def load_reference(path: str | Path) -> Reference:
    path = Path(path)
    if not path.is_file():
        raise ReferenceFileError(f"reference file {path} does not exist (make one with --save-ref)")
    what = f"{path} is not a SparkInfer accuracy reference (a file written by --save-ref)"
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files") or "meta" not in z.files:
                raise ReferenceFileError(f"{what}: no 'meta' entry")
            meta = json.loads(str(z["meta"]))
            arrays = {name: z[name] for name in z.files if name != "meta"}
    except ReferenceFileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ReferenceFileError(f"{what}: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise ReferenceFileError(f"{what}: its meta has kind {meta.get('kind') if isinstance(meta, dict) else None!r}")
    if meta.get("format") != FORMAT:
        raise ReferenceFileError(f"{path} is a reference of format {meta.get('format')}, this SparkInfer reads "
                                 f"format {FORMAT}: make it again with --save-ref")
    missing = [n for n in _ARRAYS if n not in arrays]
    has_full = "logprobs" in arrays
    if not has_full and not set(_TOPK_ARRAYS) <= arrays.keys():
        missing.append("logprobs or " + "+".join(_TOPK_ARRAYS))
    if missing:
        raise ReferenceFileError(f"{path} lacks {', '.join(missing)}: it is damaged; make it again with --save-ref")
    ref = Reference(**{n: arrays[n] for n in _ARRAYS}, meta=meta,
                    logprobs=arrays.get("logprobs"), **{n: arrays.get(n) for n in _TOPK_ARRAYS})
    p = ref.tokens.size - 1
    dist = ref.logprobs if has_full else ref.topk_ids
    shapes_ok = (ref.target_logprob.shape == (p,) and ref.top1.shape == (p,) and dist.ndim == 2 and dist.shape[0] == p
                 and (has_full or (ref.topk_logprobs.shape == ref.topk_ids.shape
                                   and ref.tail_ids.shape[0] == p and ref.tail_logprobs.shape == ref.tail_ids.shape)))
    if not shapes_ok:
        raise ReferenceFileError(f"{path} has arrays of inconsistent shapes: it is damaged; make it again with "
                                 f"--save-ref")
    return ref


def check_reference(ref: Reference, source: str, *, model: Any, tokens: Sequence[int], prompt_tokens: int,
                    greedy_tokens: int, text_name: str) -> None:
    """Raise ReferenceFileError unless `ref` (from `source`, a file name or a model) describes the
    same model shape, vocabulary, token sequence and greedy settings as this run."""
    m = ref.meta
    here = model.config.hparams_hash()
    if m.get("hparams_hash") != here:
        saved = m.get("reference_model", {}).get("file", "?")
        raise ReferenceFileError(
            f"reference {source} was made for a model with hparams hash {m.get('hparams_hash')} ({saved}), "
            f"{Path(model.path).name} has {here}: they are different models; make a reference for this one "
            f"(--ref numpy, --save-ref)")
    if m.get("vocab_hash") != vocab_hash(model.vocab):
        raise ReferenceFileError(f"reference {source} was made with another vocabulary than {Path(model.path).name}'s "
                                 f"(vocab hash {m.get('vocab_hash')} vs {vocab_hash(model.vocab)})")
    want = np.asarray(tokens, np.int32)
    have = np.asarray(ref.tokens, np.int32)
    if want.shape != have.shape or not np.array_equal(want, have):
        saved_text = m.get("text", {})
        n = min(want.size, have.size)
        diff = next((i for i in range(n) if want[i] != have[i]), n)
        raise ReferenceFileError(
            f"reference {source} scores {have.size} tokens of {saved_text.get('source', '?')} "
            f"(sha256 {str(saved_text.get('sha256', '?'))[:16]}), this run {want.size} tokens of {text_name}, "
            f"first different at token {diff}: pass the --text and --tokens it was saved with, or make a new one")
    if ref.greedy_prompt.size != (prompt_tokens if greedy_tokens > 0 else 0) or ref.greedy_tokens.size != greedy_tokens:
        raise ReferenceFileError(
            f"reference {source} holds a greedy continuation of {ref.greedy_tokens.size} tokens after a "
            f"{ref.greedy_prompt.size}-token prompt, this run asks for {greedy_tokens} after {prompt_tokens}: "
            f"pass --greedy {ref.greedy_tokens.size} --prompt-tokens {ref.greedy_prompt.size}, or make a new one")


__all__ = ["FULL_MAX_VOCAB", "Reference", "ReferenceFileError", "TAIL_SAMPLE", "TOPK", "check_reference", "compute_reference",
           "load_reference", "model_identity", "save_reference", "vocab_hash"]
