"""Numpy float32 reference forward of Qwen3-MoE (``qwen3moe``) and dense Qwen3 (``qwen3``).

This is the oracle every kernel and the compiled model are checked against, so it
is written to be read: one function per operation, the formulas spelled out, the
shapes in numpy order (see docs/ARCHITECTURE.md). It is vectorised over the tokens
of a prefill and over the tokens routed to each expert, which keeps a tiny model at
a few milliseconds per token.

One transformer block (``blk.{i}.*``), for a hidden state ``x[T, hidden]``::

    h = rms_norm(x, attn_norm)
    q, k, v = h @ attn_q.T, h @ attn_k.T, h @ attn_v.T          # [T, heads*head_dim] ...
    q, k = rms_norm(q, attn_q_norm), rms_norm(k, attn_k_norm)    # per head, over head_dim
    q, k = rope_neox(q, pos), rope_neox(k, pos)                  # rotate halves, all head_dim dims
    x = x + causal_gqa_attention(q, K_cache, V_cache) @ attn_output.T
    h = rms_norm(x, ffn_norm)
    qwen3moe: p = softmax(h @ ffn_gate_inp.T); top-k of p; w = p_topk / sum(p_topk)
              x = x + sum_j w_j * down_e(silu(gate_e(h)) * up_e(h))   (e = j-th chosen expert)
    qwen3:    x = x + ffn_down(silu(ffn_gate(h)) * ffn_up(h))

then ``logits = rms_norm(x, output_norm) @ output.T`` (``token_embd`` when ``output``
is absent, i.e. tied embeddings).

Weights come either from a dict of GGUF tensor names to float32 arrays (experts as
``[n_experts, rows, cols]``), or from a ``sparkinfer.gguf_file.GGUFModel``, which is
dequantized lazily: dense tensors once, on first use; experts one at a time, on
demand, through ``expert_f32``, kept in a byte-bounded LRU cache; embedding rows only
for the tokens seen.

``int8_inputs`` (an ``Int8Inputs``) makes it the oracle of a compiled step whose GEMVs read
int8 activations (the step variants ``activations`` / ``projection_activations`` /
``head_activations`` "q8"): the inputs of those matmuls are rounded to the values the int8
blocks hold (``sparkinfer.quant.q8_1``), the products stay float.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparkinfer import quant
from sparkinfer.quant.q8_1 import round_q8_1_reference

__all__ = [
    "Int8Inputs",
    "ReferenceModel",
    "rms_norm",
    "rope_cos_sin",
    "rope_neox",
    "softmax",
    "silu",
    "swiglu",
    "causal_gqa_attention",
    "route_topk",
]

# ---------------------------------------------------------------------------
# Building blocks (pure functions, float32 in, float32 out)
# ---------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: ``x / sqrt(mean(x**2) + eps) * weight``."""
    x = np.asarray(x, dtype=np.float32)
    mean_sq = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (np.float32(1.0) / np.sqrt(mean_sq + np.float32(eps)))) * weight


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables ``[T, head_dim]`` of NEOX RoPE for the given positions.

    Frequency ``i`` (of ``head_dim/2``) is ``theta ** (-2i / head_dim)``; the table holds the
    angles ``pos * freq`` twice over (``[f0..f_{d/2-1}, f0..f_{d/2-1}]``), matching
    rotate-halves. Angles are computed in float64 and rounded once.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (float(theta) ** (np.arange(half, dtype=np.float64) * 2.0 / head_dim))
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NEOX-style RoPE ("rotate halves") of ``x[T, heads, head_dim]`` with tables ``[T, head_dim]``.

    With ``x = [x1, x2]`` (first and second half of each head):
    ``out = [x1*cos - x2*sin, x2*cos + x1*sin]``, i.e. ``x*cos + rotate_half(x)*sin``.
    """
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (max subtracted); ``-inf`` entries get probability 0."""
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)``."""
    return x / (np.float32(1.0) + np.exp(-x))


def swiglu(h: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray,
           act_input: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """SwiGLU FFN: ``(silu(h @ w_gate.T) * (h @ w_up.T)) @ w_down.T``.

    ``h[T, hidden]``, ``w_gate``/``w_up`` ``[ffn, hidden]``, ``w_down`` ``[hidden, ffn]``;
    ``act_input``: what the down projection reads of the activations (None: them as they are).
    """
    act = silu(h @ w_gate.T) * (h @ w_up.T)
    return (act if act_input is None else act_input(act)) @ w_down.T


def causal_gqa_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_start: int) -> np.ndarray:
    """Causal grouped-query attention.

    ``q[T, n_heads, d]`` are the queries at positions ``q_start .. q_start+T-1``;
    ``k, v [S, n_kv_heads, d]`` hold every position ``0 .. S-1`` (``S = q_start + T``).
    Query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``. Scale ``1/sqrt(d)``;
    query ``t`` sees keys ``s <= q_start + t``. Returns ``[T, n_heads * d]``.
    """
    t_len, n_heads, d = q.shape
    s_len, n_kv, _ = k.shape
    group = n_heads // n_kv
    qg = q.reshape(t_len, n_kv, group, d).transpose(1, 2, 0, 3)  # [kv, g, T, d]
    kt = k.transpose(1, 2, 0)[:, None]  # [kv, 1, d, S]
    vt = v.transpose(1, 0, 2)[:, None]  # [kv, 1, S, d]
    scores = (qg @ kt) * np.float32(1.0 / np.sqrt(d))  # [kv, g, T, S]
    q_pos = q_start + np.arange(t_len)
    future = np.arange(s_len)[None, :] > q_pos[:, None]  # [T, S]
    scores = np.where(future, np.float32(-np.inf), scores)
    out = softmax(scores, axis=-1) @ vt  # [kv, g, T, d]
    return out.transpose(2, 0, 1, 3).reshape(t_len, n_heads * d)


def route_topk(router_logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-MoE router: softmax over all experts, top-k, renormalise the k weights to sum 1.

    ``router_logits[T, n_experts]`` -> ``(ids int64[T, k], weights float32[T, k])``,
    ids ordered by descending probability (ties: lower id first).
    """
    probs = softmax(router_logits.astype(np.float32), axis=-1)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, ids, axis=-1)
    return ids, (top / np.sum(top, axis=-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------
# Weight access
# ---------------------------------------------------------------------------


class _DictWeights:
    """Weights given as GGUF name -> float32 array (experts ``[n_experts, rows, cols]``)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = {name: np.asarray(a, dtype=np.float32) for name, a in tensors.items()}

    def has(self, name: str) -> bool:
        return name in self._t

    def dense(self, name: str) -> np.ndarray:
        return self._t[name]

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self._t[name][ids]

    def expert(self, name: str, e: int) -> np.ndarray:
        return self._t[name][e]


class _GGUFWeights:
    """Lazily dequantized weights of a ``GGUFModel``.

    Dense tensors are dequantized once and kept. Experts are dequantized one at a time
    (``expert_f32``) into an LRU cache bounded by ``expert_cache_bytes``. Embedding rows are
    dequantized per lookup, so a 151936-row ``token_embd`` is never expanded unless it is
    also the LM head (tied embeddings).
    """

    def __init__(self, model: Any, expert_cache_bytes: int):
        self._m = model
        self._dense: dict[str, np.ndarray] = {}
        self._experts: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._expert_bytes = 0
        self.expert_cache_bytes = int(expert_cache_bytes)

    def has(self, name: str) -> bool:
        return name in self._m.tensors

    def dense(self, name: str) -> np.ndarray:
        a = self._dense.get(name)
        if a is None:
            a = np.ascontiguousarray(self._m.tensor_f32(name), dtype=np.float32)
            self._dense[name] = a
        return a

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        if name in self._dense:
            return self._dense[name][ids]
        info = self._m.tensors[name]
        cols = int(info.shape[-1])
        data = np.asarray(info.data)
        return quant.dequantize(info.ggml_type, data[ids], (len(ids), cols)).astype(np.float32, copy=False)

    def expert(self, name: str, e: int) -> np.ndarray:
        key = (name, int(e))
        a = self._experts.get(key)
        if a is not None:
            self._experts.move_to_end(key)
            return a
        a = np.ascontiguousarray(self._m.expert_f32(name, int(e)), dtype=np.float32)
        self._experts[key] = a
        self._expert_bytes += a.nbytes
        while self._expert_bytes > self.expert_cache_bytes and len(self._experts) > 1:
            _, old = self._experts.popitem(last=False)
            self._expert_bytes -= old.nbytes
        return a

    @property
    def cached_expert_bytes(self) -> int:
        return self._expert_bytes


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Inputs:
    """Where a compiled step's matmuls read their input as int8 blocks, which the reference then
    rounds to the blocks' values: Q, K, V and O of the layers in ``projections``, the experts'
    gate/up and down (or the dense FFN's) of those in ``experts``, and the LM head if ``head``.
    ``sparkinfer.model.qwen3moe.int8_inputs`` says which a step's variants give."""

    projections: frozenset[int] = frozenset()
    experts: frozenset[int] = frozenset()
    head: bool = False


def _int8_if(rounded: bool) -> Callable[[np.ndarray], np.ndarray] | None:
    return round_q8_1_reference if rounded else None


def _seen(x: np.ndarray, how: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    return x if how is None else how(x).astype(np.float32)


class ReferenceModel:
    """Float32 numpy forward of a ``qwen3moe`` or ``qwen3`` model, with a KV cache.

    ``config`` is a ``sparkinfer.gguf_file.ModelConfig`` (anything with its attributes);
    ``weights`` a ``GGUFModel`` (dequantized lazily) or a dict GGUF name -> float32 array.

    ``prefill(tokens)`` appends ``tokens`` at the current position and returns their logits
    ``[T, vocab]``; ``decode(token)`` appends one token and returns ``[vocab]``. The two are the
    same computation (prefill of T tokens == T decodes). ``reset()`` empties the cache;
    ``position`` is the number of tokens in it.

    ``int8_inputs``: see the module docstring (None: every matmul reads float32).

    ``capture``: pass a dict to ``prefill``/``decode`` to receive named intermediates of that
    call (float32, per layer ``blk.{i}.``: ``attn_in`` (after attn_norm), ``q``/``k`` (after
    Q/K norm and RoPE, ``[T, heads, head_dim]``), ``v``, ``attn`` (attention output before
    ``attn_output``), ``attn_res`` (residual stream after attention), ``ffn_in`` (after
    ffn_norm), ``router_logits``, ``expert_ids``, ``expert_weights``, ``ffn_out``, ``out``
    (residual after the FFN); then ``output_norm``).
    """

    def __init__(self, config: Any, weights: Any, *, expert_cache_bytes: int = 1 << 30,
                 int8_inputs: Int8Inputs | None = None):
        self.config = config
        self.int8 = int8_inputs or Int8Inputs()
        if config.arch not in ("qwen3moe", "qwen3"):
            raise ValueError(f"reference forward supports qwen3moe and qwen3, not {config.arch!r}")
        self.is_moe = config.arch == "qwen3moe"
        if isinstance(weights, Mapping):
            self.weights: _DictWeights | _GGUFWeights = _DictWeights(weights)
        elif hasattr(weights, "tensor_f32"):
            self.weights = _GGUFWeights(weights, expert_cache_bytes)
        else:
            raise TypeError("weights must be a GGUFModel or a dict of GGUF name -> float32 array")
        self.eps = float(config.rms_eps)
        self.n_heads = int(config.n_heads)
        self.n_kv = int(config.n_kv_heads)
        self.head_dim = int(config.head_dim)
        if self.n_heads % self.n_kv:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv}")
        self.lm_head_name = "output.weight" if self.weights.has("output.weight") else "token_embd.weight"
        self._k: list[np.ndarray] = []
        self._v: list[np.ndarray] = []
        self._pos = 0
        self.reset()

    # -- state ---------------------------------------------------------------

    @property
    def position(self) -> int:
        """Number of tokens in the KV cache (the position the next token gets)."""
        return self._pos

    def reset(self) -> None:
        """Empty the KV cache."""
        self._pos = 0
        shape = (0, self.n_kv, self.head_dim)
        self._k = [np.zeros(shape, np.float32) for _ in range(self.config.n_layers)]
        self._v = [np.zeros(shape, np.float32) for _ in range(self.config.n_layers)]

    def snapshot(self) -> tuple[int, list[np.ndarray], list[np.ndarray]]:
        """The KV cache as it is now, for ``restore`` (copies: later calls do not change it)."""
        return self._pos, [k[: self._pos].copy() for k in self._k], [v[: self._pos].copy() for v in self._v]

    def restore(self, snapshot: tuple[int, list[np.ndarray], list[np.ndarray]]) -> None:
        """Go back to a ``snapshot``: the next token gets its position, the cache its contents."""
        pos, k, v = snapshot
        self._pos, self._k, self._v = pos, [a.copy() for a in k], [a.copy() for a in v]

    def _append_kv(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v ``[T, n_kv, d]`` at the current position; grows capacity by doubling."""
        start, end = self._pos, self._pos + k.shape[0]
        if end > self._k[layer].shape[0]:
            cap = max(end, 2 * self._k[layer].shape[0], 64)
            for cache in (self._k, self._v):
                grown = np.zeros((cap, self.n_kv, self.head_dim), np.float32)
                grown[:start] = cache[layer][:start]
                cache[layer] = grown
        self._k[layer][start:end] = k
        self._v[layer][start:end] = v
        return self._k[layer][:end], self._v[layer][:end]

    # -- forward -------------------------------------------------------------

    def prefill(self, tokens: Sequence[int] | np.ndarray, capture: dict | None = None) -> np.ndarray:
        """Run ``tokens`` at positions ``position ..``; returns float32 logits ``[T, vocab]``."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("prefill needs at least one token")
        vocab = int(self.config.vocab_size)
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token id out of range [0, {vocab})")
        x = self.weights.rows("token_embd.weight", ids).astype(np.float32)
        cos, sin = rope_cos_sin(self._pos + np.arange(ids.size), self.head_dim, self.config.rope_theta)
        for i in range(self.config.n_layers):
            x = self._block(i, x, cos, sin, capture)
        self._pos += ids.size
        h = rms_norm(x, self.weights.dense("output_norm.weight"), self.eps)
        if capture is not None:
            capture["output_norm"] = h
        head_in = _seen(h, _int8_if(self.int8.head))
        return (head_in @ self.weights.dense(self.lm_head_name).T).astype(np.float32)

    def decode(self, token: int, capture: dict | None = None) -> np.ndarray:
        """Run one token; returns float32 logits ``[vocab]``."""
        return self.prefill([int(token)], capture)[0]

    def greedy_generate(self, prompt_tokens: Sequence[int], n: int) -> list[int]:
        """Reset, prefill the prompt, then pick the argmax ``n`` times; returns the ``n`` new ids."""
        self.reset()
        if n <= 0:
            return []
        return self.greedy_continue(self.prefill(prompt_tokens)[-1], n)

    def greedy_continue(self, last_logits: np.ndarray, n: int) -> list[int]:
        """Greedy ``n`` tokens from the cache as it is, ``last_logits`` being those of its last token."""
        if n <= 0:
            return []
        out = [int(np.argmax(last_logits))]
        while len(out) < n:
            out.append(int(np.argmax(self.decode(out[-1]))))
        return out

    def _block(self, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, cap: dict | None) -> np.ndarray:
        w = self.weights.dense
        p = f"blk.{i}."
        t = x.shape[0]
        # attention
        h = rms_norm(x, w(p + "attn_norm.weight"), self.eps)
        seen = _int8_if(i in self.int8.projections)
        hq = _seen(h, seen)
        q = (hq @ w(p + "attn_q.weight").T).reshape(t, self.n_heads, self.head_dim)
        k = (hq @ w(p + "attn_k.weight").T).reshape(t, self.n_kv, self.head_dim)
        v = (hq @ w(p + "attn_v.weight").T).reshape(t, self.n_kv, self.head_dim)
        q = rope_neox(rms_norm(q, w(p + "attn_q_norm.weight"), self.eps), cos, sin)
        k = rope_neox(rms_norm(k, w(p + "attn_k_norm.weight"), self.eps), cos, sin)
        k_all, v_all = self._append_kv(i, k, v)
        a = causal_gqa_attention(q, k_all, v_all, self._pos)
        x = x + _seen(a, seen) @ w(p + "attn_output.weight").T
        if cap is not None:
            cap.update({p + "attn_in": h, p + "q": q, p + "k": k, p + "v": v, p + "attn": a, p + "attn_res": x})
        # feed-forward
        h = rms_norm(x, w(p + "ffn_norm.weight"), self.eps)
        if self.is_moe:
            f = self._moe(i, h, cap)
        else:
            seen = _int8_if(i in self.int8.experts)
            f = swiglu(_seen(h, seen), w(p + "ffn_gate.weight"), w(p + "ffn_up.weight"), w(p + "ffn_down.weight"),
                       seen)
        x = x + f
        if cap is not None:
            cap.update({p + "ffn_in": h, p + "ffn_out": f, p + "out": x})
        return x

    def _moe(self, i: int, h: np.ndarray, cap: dict | None) -> np.ndarray:
        p = f"blk.{i}."
        logits = h @ self.weights.dense(p + "ffn_gate_inp.weight").T  # [T, n_experts]; the router reads float
        seen = _int8_if(i in self.int8.experts)
        ids, weights = route_topk(logits, int(self.config.n_experts_used))
        if cap is not None:
            cap.update({p + "router_logits": logits, p + "expert_ids": ids, p + "expert_weights": weights})
        out = np.zeros_like(h)
        # Each expert runs once, on the tokens that chose it.
        for e in np.unique(ids):
            tok, slot = np.nonzero(ids == e)
            y = swiglu(
                _seen(h[tok], seen),
                self.weights.expert(p + "ffn_gate_exps.weight", e),
                self.weights.expert(p + "ffn_up_exps.weight", e),
                self.weights.expert(p + "ffn_down_exps.weight", e),
                seen,
            )
            out[tok] += weights[tok, slot][:, None] * y  # a token picks an expert at most once
        return out
