"""Small random Qwen3 / Qwen3-MoE weights as GGUF-name -> float32 arrays, for reference tests."""

from __future__ import annotations

import numpy as np

from sparkinfer.gguf_file import ModelConfig


_TINY_MOE = dict(
    arch="qwen3moe", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=300,
    context_length=512, rms_eps=1e-6, rope_theta=10000.0, n_experts=8, n_experts_used=2, expert_ffn=32,
)
_TINY_DENSE_FFN = 96


def tiny_config(**overrides: object) -> ModelConfig:
    """A small ModelConfig: qwen3moe by default; arch="qwen3" gives the dense form (no experts)."""
    fields: dict[str, object] = dict(_TINY_MOE)
    if overrides.get("arch") == "qwen3":
        fields.update(n_experts=0, n_experts_used=0, expert_ffn=0, ffn=_TINY_DENSE_FFN)
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def random_weights(
    cfg,
    seed: int = 0,
    *,
    embd_std: float = 0.5,
    out_gain: float = 2.4,
    w_gain: float = 2.0,
    router_gain: float = 4.0,
    tied: bool = False,
) -> dict[str, np.ndarray]:
    """Random float32 weights in numpy order ([out, in]; experts [n_experts, out, in]).

    Matrices get std ``gain / sqrt(fan_in)``, so the scales mean the same at any width.
    Norm weights are near 1 (not exactly, so a wrong norm weight shows). The defaults are
    far larger than a real model's 0.02: the layers then move the residual stream enough
    that greedy text does not fall into a 2-token loop, and the LM head and router spread
    their logits enough that top-1 tokens and top-k experts are decisive (margins far above
    float32 noise), so comparisons cannot pass or fail on ties.
    """
    rng = np.random.default_rng(seed)

    def n(*shape, std=None, gain=None):
        std = gain / np.sqrt(shape[-1]) if gain is not None else std
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(d):
        return (1.0 + 0.2 * rng.standard_normal(d)).astype(np.float32)

    h, d, hq, hkv = cfg.hidden, cfg.head_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    w = {"token_embd.weight": n(cfg.vocab_size, h, std=embd_std), "output_norm.weight": norm(h)}
    if not tied:
        w["output.weight"] = n(cfg.vocab_size, h, gain=out_gain)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(h)
        w[p + "attn_q.weight"] = n(hq, h, gain=w_gain)
        w[p + "attn_k.weight"] = n(hkv, h, gain=w_gain)
        w[p + "attn_v.weight"] = n(hkv, h, gain=w_gain)
        w[p + "attn_output.weight"] = n(h, hq, gain=w_gain)
        w[p + "attn_q_norm.weight"] = norm(d)
        w[p + "attn_k_norm.weight"] = norm(d)
        w[p + "ffn_norm.weight"] = norm(h)
        if cfg.arch == "qwen3moe":
            e, f = cfg.n_experts, cfg.expert_ffn
            w[p + "ffn_gate_inp.weight"] = n(e, h, gain=router_gain)
            w[p + "ffn_gate_exps.weight"] = n(e, f, h, gain=w_gain)
            w[p + "ffn_up_exps.weight"] = n(e, f, h, gain=w_gain)
            w[p + "ffn_down_exps.weight"] = n(e, h, f, gain=w_gain)
        else:
            w[p + "ffn_gate.weight"] = n(cfg.ffn, h, gain=w_gain)
            w[p + "ffn_up.weight"] = n(cfg.ffn, h, gain=w_gain)
            w[p + "ffn_down.weight"] = n(h, cfg.ffn, gain=w_gain)
    return w
