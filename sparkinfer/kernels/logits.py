"""Logits processing on the device, between the LM head and `sampling.sample_token`: a grammar's
token mask and the presence / frequency / repetition penalties over the generated tokens'
counts. Unscheduled compute + the numpy reference.

`process_logits(V)`: (logits f32[V], logits_params f32[3] = (presence, frequency, repetition),
token_mask int32[ceil(V / 32)], token_counts int32[V]) -> processed f32[V], where, with
c = token_counts[i] and bit i of the mask (bit i % 32 of word i // 32, llguidance's layout):
    masked out:  -inf
    c == 0:      logits[i]
    c > 0:       r(logits[i]) - presence - c * frequency,
                 r(l) = l / repetition if l > 0 else l * repetition
(OpenAI's presence/frequency penalties; the repetition penalty of CTRL, as Hugging Face's
RepetitionPenaltyLogitsProcessor). The raw logits stay as they are: the step returns them,
and log-probabilities are of the model's own distribution.

`count_token(V)`: (next int32[1] (in place), token_counts int32[V] (in place)) ->
token_counts[next] += 1. `next` passes through unchanged as an in-place output, so that the
step's `advance` depends on this call and no pass can drop it.

All of it lives in the step's device buffers (the host writes them once per request, and the
mask once per token when a grammar constrains the output), so a captured CUDA graph replays.
"""

import numpy as np
import numpy.typing as npt
from tvm import tirx

from sparkinfer.grammar import MASK_BITS, mask_words


def process_logits_symbol(vocab: int) -> str:
    return f"process_logits_{vocab}"


def count_token_symbol(vocab: int) -> str:
    return f"count_token_{vocab}"


def _penalised(logit: tirx.Expr, count: tirx.Expr, presence: tirx.Expr, frequency: tirx.Expr,
               repetition: tirx.Expr) -> tirx.Expr:
    """r(logit) - presence - count * frequency (a token generated before)."""
    zero = tirx.const(0.0, "float32")
    repeated = tirx.Select(logit > zero, logit / repetition, logit * repetition)
    return repeated - presence - count.astype("float32") * frequency


def process_logits(vocab: int) -> tirx.PrimFunc:
    """Params (logits f32[V], logits_params f32[3], token_mask int32[W], token_counts int32[V],
    processed f32[V]); one independent element per token."""
    from tvm.script import tirx as T

    n, w = vocab, mask_words(vocab)

    # fmt: off
    @T.prim_func(s_tir=True)
    def process(logits: T.Buffer((n,), "float32"), logits_params: T.Buffer((3,), "float32"),
                token_mask: T.Buffer((w,), "int32"), token_counts: T.Buffer((n,), "int32"),
                processed: T.Buffer((n,), "float32")):
        for i in range(n):
            with T.sblock("process"):
                vi = T.axis.spatial(n, i)
                processed[vi] = T.Select(
                    T.bitwise_and(T.shift_right(token_mask[vi // MASK_BITS], vi % MASK_BITS), 1) != 0,
                    T.Select(token_counts[vi] > 0,
                             _penalised(logits[vi], token_counts[vi], logits_params[0], logits_params[1],
                                        logits_params[2]),
                             logits[vi]),
                    T.float32(-np.inf))
    # fmt: on

    return process.with_attr("global_symbol", process_logits_symbol(vocab))


def count_token(vocab: int) -> tirx.PrimFunc:
    """Params (next int32[1] (in place, unchanged), token_counts int32[V] (in place))."""
    from tvm.script import tirx as T

    n = vocab

    @T.prim_func(s_tir=True)
    def count(next_token: T.Buffer((1,), "int32"), token_counts: T.Buffer((n,), "int32")):
        # The old count is read into a register first: a block that reads and writes the same
        # buffer cannot be bound to a thread (as `sampling.advance` does with pos).
        old = T.sblock_alloc_buffer((1,), "int32", scope="local")
        for _ in range(1):
            old[0] = token_counts[next_token[0]]
            with T.sblock("count"):
                token_counts[next_token[0]] = old[0] + 1

    return count.with_attr("global_symbol", count_token_symbol(vocab))


# ---- numpy reference --------------------------------------------------------------------


def mask_bits_np(mask: npt.NDArray[np.int32], vocab: int) -> npt.NDArray[np.bool_]:
    """bool[V]: which tokens a mask allows."""
    words = np.asarray(mask, np.int32).view(np.uint32)
    bits = (words[:, None] >> np.arange(MASK_BITS, dtype=np.uint32)) & np.uint32(1)
    return bits.reshape(-1)[:vocab].astype(bool)


def mask_of(allowed: npt.NDArray[np.bool_]) -> npt.NDArray[np.int32]:
    """The int32 mask words of bool[V] (the inverse of `mask_bits_np`)."""
    vocab = len(allowed)
    bits = np.zeros(mask_words(vocab) * MASK_BITS, np.uint32)
    bits[:vocab] = np.asarray(allowed, bool)
    words = (bits.reshape(-1, MASK_BITS) << np.arange(MASK_BITS, dtype=np.uint32)).sum(axis=1, dtype=np.uint64)
    return words.astype(np.uint32).view(np.int32)


def process_logits_reference(logits: npt.NDArray[np.float32], logits_params: npt.NDArray[np.float32],
                             token_mask: npt.NDArray[np.int32],
                             token_counts: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
    """numpy oracle of process_logits, in float32 operation for operation."""
    logits = np.asarray(logits, np.float32)
    presence, frequency, repetition = (np.float32(v) for v in logits_params)
    counts = np.asarray(token_counts, np.int32)
    repeated = np.where(logits > 0, logits / repetition, logits * repetition)
    penalised = repeated - presence - counts.astype(np.float32) * frequency
    out = np.where(counts > 0, penalised, logits).astype(np.float32)
    out[~mask_bits_np(token_mask, len(logits))] = -np.inf
    return out
