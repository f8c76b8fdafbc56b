"""The reference model against itself: prefill == decode, chunking, reset, lazy weights."""

import time

import numpy as np
import pytest

from sparkinfer.reference import ReferenceModel

from ._tiny import random_weights, tiny_config

CONFIGS = {
    "moe": tiny_config(),
    "dense": tiny_config(arch="qwen3", n_kv_heads=4),
    "moe_mqa_tied": tiny_config(n_kv_heads=1, n_experts=6, n_experts_used=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_equals_step_by_step_decode(name):
    cfg = CONFIGS[name]
    m = ReferenceModel(cfg, random_weights(cfg, seed=5, tied=name.endswith("tied")))
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, 13)
    full = m.prefill(tokens)
    assert full.shape == (13, cfg.vocab_size) and full.dtype == np.float32
    assert m.position == 13
    m.reset()
    assert m.position == 0
    steps = np.stack([m.decode(int(t)) for t in tokens])
    np.testing.assert_allclose(steps, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    # chunked prefill (a prompt continued later) lands on the same logits
    m.reset()
    chunks = np.concatenate([m.prefill(tokens[:5]), m.prefill(tokens[5:9]), m.prefill(tokens[9:])])
    np.testing.assert_allclose(chunks, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_history_matters_and_reset_forgets():
    cfg = CONFIGS["moe"]
    m = ReferenceModel(cfg, random_weights(cfg, seed=7))
    a = m.prefill([1, 2, 3])[-1]
    b = m.decode(3)  # same token, later position, longer history
    assert np.abs(a - b).max() > 1e-3
    m.reset()
    np.testing.assert_array_equal(m.prefill([1, 2, 3])[-1], a)


def test_greedy_generate_matches_manual_loop_and_is_fast():
    cfg = CONFIGS["moe"]
    m = ReferenceModel(cfg, random_weights(cfg, seed=8))
    t0 = time.perf_counter()
    out = m.greedy_generate([5, 6, 7], 100)
    elapsed = time.perf_counter() - t0
    assert len(out) == 100 and m.position == 3 + 99
    m.reset()
    manual = [int(np.argmax(m.prefill([5, 6, 7])[-1]))]
    for _ in range(9):
        manual.append(int(np.argmax(m.decode(manual[-1]))))
    assert manual == out[:10]
    assert elapsed < 10, f"100 tokens took {elapsed:.1f} s"


def test_snapshot_restore_returns_to_the_same_cache():
    cfg = CONFIGS["moe"]
    m = ReferenceModel(cfg, random_weights(cfg, seed=9))
    last = m.prefill([5, 6, 7])[-1]
    snap = m.snapshot()
    m.prefill(np.arange(40) % cfg.vocab_size)  # grows (reallocates) the cache past the snapshot
    m.restore(snap)
    assert m.position == 3
    resumed = m.greedy_continue(last, 12)
    assert resumed == m.greedy_generate([5, 6, 7], 12)
    m.restore(snap)  # a snapshot survives the use of a restore
    assert m.greedy_continue(last, 12) == resumed


def test_capture_exposes_routing():
    cfg = CONFIGS["moe"]
    m = ReferenceModel(cfg, random_weights(cfg, seed=9))
    cap: dict = {}
    m.prefill([3, 4, 5, 6], capture=cap)
    ids, w = cap["blk.1.expert_ids"], cap["blk.1.expert_weights"]
    assert ids.shape == (4, cfg.n_experts_used) and w.shape == ids.shape
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert cap["blk.0.q"].shape == (4, cfg.n_heads, cfg.head_dim)
    assert cap["output_norm"].shape == (4, cfg.hidden)


class _FakeGGUF:
    """Quacks like GGUFModel for the lazy path: tensors, tensor_f32, expert_f32 (counted)."""

    def __init__(self, weights):
        self._w = weights
        self.tensors = dict.fromkeys(weights)
        self.expert_loads = 0

    def tensor_f32(self, name):
        assert "_exps" not in name, "experts must be dequantized one at a time"
        return self._w[name].copy()

    def expert_f32(self, name, e):
        self.expert_loads += 1
        return self._w[name][e].copy()


def test_lazy_expert_cache_is_bounded_and_exact(monkeypatch):
    cfg = CONFIGS["moe"]
    w = random_weights(cfg, seed=10)
    fake = _FakeGGUF(w)
    one_expert = cfg.expert_ffn * cfg.hidden * 4
    m = ReferenceModel(cfg, fake, expert_cache_bytes=5 * one_expert)
    # embedding rows: serve them from the dense tensor for this fake (no quantized blocks)
    monkeypatch.setattr(m.weights, "rows", lambda name, ids: w[name][ids])
    tokens = [1, 9, 4, 4, 200, 17, 3]
    got = m.prefill(tokens)
    assert m.weights.cached_expert_bytes <= 5 * one_expert
    assert fake.expert_loads > 0
    np.testing.assert_array_equal(got, ReferenceModel(cfg, w).prefill(tokens))


def test_gguf_file_path_equals_dict_path(tmp_path):
    """Through a real F32 file (lazy dense, row-wise embedding, bounded expert cache) == the dict."""
    from sparkinfer.gguf_file import GGUFModel, ModelConfig, write_model
    from sparkinfer.tokenizer import synthetic_vocab

    cfg = ModelConfig(arch="qwen3moe", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16,
                      vocab_size=320, context_length=256, n_experts=8, n_experts_used=2, expert_ffn=32)
    w = random_weights(cfg, seed=11)
    write_model(tmp_path / "m.gguf", cfg, w, synthetic_vocab(cfg.vocab_size), "f32")
    one_expert = cfg.expert_ffn * cfg.hidden * 4
    lazy = ReferenceModel(cfg, GGUFModel.open(tmp_path / "m.gguf"), expert_cache_bytes=4 * one_expert)
    tokens = [7, 300, 12, 12, 99, 0, 319]
    np.testing.assert_array_equal(lazy.prefill(tokens), ReferenceModel(cfg, w).prefill(tokens))
    assert lazy.weights.cached_expert_bytes <= 4 * one_expert
    assert "token_embd.weight" not in lazy.weights._dense  # embedding rows only, never the whole table
