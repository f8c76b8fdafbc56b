"""The numbers the accuracy gate compares (numpy only, no TVM).

Position `t` of a scored sequence `tokens[0..N-1]` is the prediction of `tokens[t+1]` from
`tokens[0..t]`, so N tokens give N-1 positions. Per position:
  - KL(ref || ours) = sum_v p_ref(v) (log p_ref(v) - log p_ours(v)), in nats;
  - top-1 agreement: argmax of ours == argmax of the reference;
  - the negative log-likelihood of the actual next token under each, whose mean gives the
    perplexity exp(mean NLL) of each and their ratio ppl_ours / ppl_ref.

A reference distribution is either full log-probs `[P, V]` (float32, or float16 as saved), or
its top-k (`ids [P, k]`, `logprobs [P, k]`) plus a uniform random sample of the other V-k
tokens (`tail_ids [P, m]`, `tail_logprobs [P, m]`). The KL is then estimated term by term in
its Bregman form, sum_v [p log(p/q) - p + q], which equals the KL when both p and q sum to 1
and whose every term is >= 0 and second order in log(p/q): the top-k terms exactly, the tail's
sum as (V-k)/m times the sample's sum. Without that form the sampled first-order terms
(p log(p/q) alone, which cancel only over the whole vocabulary) would swamp a KL of 1e-9 on a
flat distribution, such as the synthetic models' (their top-64 holds <1 % of the mass).
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-probs over the last axis, computed in float64, returned as float32."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return (z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))).astype(np.float32)


def renormalise(logprobs: np.ndarray) -> np.ndarray:
    """Full log-probs (e.g. rounded to float16) shifted so each row sums to probability 1."""
    return log_softmax(np.asarray(logprobs, dtype=np.float32))


def kl_full(ref_logprobs: np.ndarray, ours_logprobs: np.ndarray) -> np.ndarray:
    """KL(ref || ours) per row, nats, float64 [P]."""
    lr = np.asarray(ref_logprobs, np.float64)
    lo = np.asarray(ours_logprobs, np.float64)
    return np.sum(np.exp(lr) * (lr - lo), axis=-1)


def _bregman_terms(ref_logprobs: np.ndarray, ours_logprobs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """p log(p/q) - p + q for the entries `ids [P, n]` of each row (p: reference, q: ours)."""
    lr = np.asarray(ref_logprobs, np.float64)
    lo = np.take_along_axis(np.asarray(ours_logprobs, np.float64), np.asarray(ids, np.int64), axis=-1)
    pr = np.exp(lr)
    return pr * (lr - lo) - pr + np.exp(lo)


def kl_topk_tail(ref_ids: np.ndarray, ref_logprobs: np.ndarray, tail_ids: np.ndarray, tail_logprobs: np.ndarray,
                 ours_logprobs: np.ndarray) -> np.ndarray:
    """KL(ref || ours) per row, nats, float64 [P]: the reference's top-k exactly, the other
    V-k tokens estimated from the uniform sample `tail_ids` (unbiased; see the module docstring)."""
    vocab = np.asarray(ours_logprobs).shape[-1]
    head = _bregman_terms(ref_logprobs, ours_logprobs, ref_ids).sum(-1)
    tail = _bregman_terms(tail_logprobs, ours_logprobs, tail_ids)
    scale = (vocab - np.asarray(ref_ids).shape[-1]) / max(tail.shape[-1], 1)
    return head + scale * tail.sum(-1)


def perplexity(nll: np.ndarray) -> float:
    """exp of the mean negative log-likelihood (nats)."""
    return float(np.exp(np.mean(np.asarray(nll, np.float64))))


def first_divergence(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists (== len when one is a prefix of the other)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def summary(kl: np.ndarray, top1_match: np.ndarray, nll_ref: np.ndarray, nll_ours: np.ndarray) -> dict:
    """The teacher-forced numbers of the report, from per-position arrays."""
    kl = np.asarray(kl, np.float64)
    ppl_ref, ppl_ours = perplexity(nll_ref), perplexity(nll_ours)
    return {
        "positions": int(kl.size),
        "mean_kl": float(kl.mean()),
        "median_kl": float(np.median(kl)),
        "p99_kl": float(np.quantile(kl, 0.99)),
        "max_kl": float(kl.max()),
        "max_kl_position": int(kl.argmax()),
        "top1_agreement": float(np.mean(top1_match)),
        "nll_ref": float(np.mean(nll_ref)),
        "nll_ours": float(np.mean(nll_ours)),
        "ppl_ref": ppl_ref,
        "ppl_ours": ppl_ours,
        "ppl_ratio": ppl_ours / ppl_ref,
    }


__all__ = ["first_divergence", "kl_full", "kl_topk_tail", "log_softmax", "perplexity", "renormalise", "summary"]
