"""Ground truth: the numpy reference against Hugging Face transformers on the same GGUF file.

A tiny model is written with the project's writer (float weights, synthetic vocabulary),
then read by both: the reference through `GGUFModel` + `sparkinfer.quant`, transformers
through its own GGUF loader (gguf-py's dequantize). Three files:

- ``moe-f16`` / ``dense-f16``: F16 matrices (norms and router F32), so quantization is
  not the question: both sides see bit-identical weights.
- ``moe-q4_k_m``: the ``tiny`` preset's shapes with llama.cpp's Q4_K_M type map (Q4_K,
  Q5_K, Q6_K, Q8_0 and F32 all present), checking the reader and dequantizers end to end.

Tolerances (measured on the CPU machine, transformers 5.24 / torch 2.13, seed 0):
- logits: max |ref - hf| / max |hf| < LOGITS_REL_TOL = 1e-4. Measured: prefill 9e-7 (moe F16),
  9e-7 (dense F16), 3e-6 (Q4_K_M); along the 32 greedy steps up to 3.6e-6; max abs <= 3.5e-5
  on logits of magnitude ~10.
- greedy: 32 new tokens identical, with the reference's top-1 beating top-2 by at least
  MIN_TOP1_MARGIN = 1e-3 at every step (measured >= 1.3e-2) and every router choice decided
  by at least MIN_ROUTER_GAP = 1e-4 in logit (measured >= 2e-3): far above the float32
  noise, so the test can neither pass by luck nor fail on a tie.
- weights: transformers' dequantized tensors equal the reader's to 1e-6 of their max
  (measured: bit-identical for F16, Q4_K, Q5_K, Q6_K and Q8_0).

transformers quirks handled here:
- its GGUF config mapping ignores ``qwen3moe.expert_feed_forward_length`` (default 768):
  pass ``moe_intermediate_size``;
- for dense ``qwen3`` it also ignores ``attention.key_length`` (default head_dim 128):
  pass ``head_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparkinfer.gguf_file import GGUFModel, ModelConfig, preset_config, write_model  # noqa: E402
from sparkinfer.reference import ReferenceModel  # noqa: E402
from sparkinfer.tokenizer import synthetic_vocab  # noqa: E402

from ._tiny import random_weights  # noqa: E402

LOGITS_REL_TOL = 1e-4
MIN_TOP1_MARGIN = 1e-3
MIN_ROUTER_GAP = 1e-4
N_GREEDY = 32
PROMPT_LEN = 16

_SMALL = dict(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=320,
              context_length=256, rope_theta=1e6, rms_eps=1e-6)
CASES = {
    "moe-f16": (ModelConfig(arch="qwen3moe", n_experts=8, n_experts_used=2, expert_ffn=32, **_SMALL), "f16"),
    "dense-f16": (ModelConfig(arch="qwen3", ffn=96, **_SMALL), "f16"),
    "moe-q4_k_m": (preset_config("tiny", context_length=256), "q4_k_m"),
}


@dataclass
class Pair:
    config: ModelConfig
    gguf: GGUFModel
    ref: ReferenceModel
    hf: object


def _load_hf(path: Path, config: ModelConfig):
    # transformers' GGUF mapping drops these keys; without them the shapes mismatch.
    extra = {"moe_intermediate_size": config.expert_ffn} if config.is_moe else {"head_dim": config.head_dim}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **extra
    )
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny matmuls: torch's thread pool costs more than it gains (~7x slower on 2 busy cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory) -> Pair:
    config, types = CASES[request.param]
    path = tmp_path_factory.mktemp("hf") / f"{request.param}.gguf"
    write_model(path, config, random_weights(config, seed=0), synthetic_vocab(config.vocab_size), types)
    gguf = GGUFModel.open(path)
    assert gguf.config == config
    transformers.logging.set_verbosity_error()
    return Pair(config, gguf, ReferenceModel(gguf.config, gguf), _load_hf(path, config))


def _prompt(config: ModelConfig) -> list[int]:
    return np.random.default_rng(1).integers(0, config.vocab_size, PROMPT_LEN).tolist()


def _hf_logits(hf, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


def _rel_err(ref: np.ndarray, hf: np.ndarray) -> float:
    return float(np.abs(ref - hf).max() / np.abs(hf).max())


def _hf_name(name: str) -> str:
    glob = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
    if name in glob:
        return glob[name]
    _, i, kind, _ = name.split(".")
    per_layer = {
        "attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
        "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
        "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
        "attn_q_norm": "self_attn.q_norm.weight", "attn_k_norm": "self_attn.k_norm.weight",
        "ffn_gate_inp": "mlp.gate.weight", "ffn_down_exps": "mlp.experts.down_proj",
        "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight", "ffn_down": "mlp.down_proj.weight",
    }
    return f"model.layers.{i}.{per_layer[kind]}"


def test_hf_reads_the_same_config(pair):
    c, hc = pair.config, pair.hf.config
    assert (hc.num_hidden_layers, hc.hidden_size, hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim,
            hc.vocab_size) == (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size)
    assert hc.rope_parameters["rope_theta"] == pytest.approx(c.rope_theta)
    assert hc.rms_norm_eps == pytest.approx(c.rms_eps)
    if c.is_moe:
        assert (hc.num_experts, hc.num_experts_per_tok, hc.norm_topk_prob) == (c.n_experts, c.n_experts_used, True)


def test_weights_dequantize_identically(pair):
    """Every tensor as transformers holds it equals the reader's float32 (measured: bit-identical)."""
    state = pair.hf.state_dict()
    for name in pair.gguf.tensors:
        if name.endswith("ffn_up_exps.weight"):
            continue  # compared with its gate below
        ours = pair.gguf.tensor_f32(name)
        if name.endswith("ffn_gate_exps.weight"):  # transformers fuses gate and up: [E, 2F, H]
            layer = name.split(".")[1]
            ours = np.concatenate([ours, pair.gguf.tensor_f32(f"blk.{layer}.ffn_up_exps.weight")], axis=1)
            theirs = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"].numpy()
        else:
            theirs = state[_hf_name(name)].numpy()
        assert theirs.shape == ours.shape, name
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6 * np.abs(ours).max(), err_msg=name)


def test_prefill_logits_match_hf(pair):
    tokens = _prompt(pair.config)
    pair.ref.reset()
    ref = pair.ref.prefill(tokens)
    hf = _hf_logits(pair.hf, tokens)
    assert ref.shape == hf.shape == (PROMPT_LEN, pair.config.vocab_size)
    assert _rel_err(ref, hf) < LOGITS_REL_TOL


def test_greedy_32_tokens_match_hf(pair):
    """The reference decodes with its KV cache; transformers recomputes the whole sequence each step."""
    cfg, ref = pair.config, pair.ref
    prompt = _prompt(cfg)
    ref.reset()
    captures: list[dict] = []
    logits, tokens = [], []
    for step in range(N_GREEDY):
        cap: dict = {}
        row = ref.prefill(prompt, capture=cap)[-1] if step == 0 else ref.decode(tokens[-1], capture=cap)
        captures.append(cap)
        logits.append(row)
        tokens.append(int(np.argmax(row)))
    assert ref.greedy_generate(prompt, N_GREEDY) == tokens

    # The comparison is only meaningful if nothing is near a tie.
    top2 = np.sort(np.stack(logits), axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > MIN_TOP1_MARGIN
    if cfg.is_moe:
        k = cfg.n_experts_used
        for cap in captures:
            for i in range(cfg.n_layers):
                r = np.sort(cap[f"blk.{i}.router_logits"], axis=-1)
                assert (r[:, -k] - r[:, -k - 1]).min() > MIN_ROUTER_GAP

    seq = list(prompt)
    hf_tokens, hf_logits = [], []
    for _ in range(N_GREEDY):
        row = _hf_logits(pair.hf, seq)[-1]
        hf_logits.append(row)
        hf_tokens.append(int(np.argmax(row)))
        seq.append(hf_tokens[-1])
    assert hf_tokens == tokens
    assert _rel_err(np.stack(logits), np.stack(hf_logits)) < LOGITS_REL_TOL
    assert len(set(tokens)) > N_GREEDY // 4, "greedy text fell into a short loop: weights too tame"
