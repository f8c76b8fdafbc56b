"""The reference's building blocks against formulas written out element by element."""

import math

import numpy as np

from sparkinfer.reference import causal_gqa_attention, rms_norm, rope_cos_sin, rope_neox, route_topk, softmax


def test_rms_norm_matches_direct_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32) * 3
    w = rng.standard_normal(16).astype(np.float32)
    eps = 1e-5
    got = rms_norm(x, w, eps)
    want = np.empty_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx].astype(np.float64)
        rms = math.sqrt(sum(v * v for v in row) / len(row) + eps)
        want[idx] = [row[j] / rms * w[j] for j in range(len(row))]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rms_norm_eps_matters_for_tiny_inputs():
    x = np.full((1, 4), 1e-4, np.float32)
    w = np.ones(4, np.float32)
    # mean(x^2) = 1e-8: with eps 1e-6 the output is 1e-4 / sqrt(1.01e-6), not 1.
    np.testing.assert_allclose(rms_norm(x, w, 1e-6), 1e-4 / math.sqrt(1e-8 + 1e-6), rtol=1e-5)


def test_rope_neox_matches_pairwise_rotation():
    """NEOX: dims (i, i + d/2) form the pair rotated by angle pos * theta**(-2i/d)."""
    rng = np.random.default_rng(2)
    d, heads, theta = 16, 3, 1e6
    pos = np.array([0, 1, 7, 1000, 40000])
    x = rng.standard_normal((len(pos), heads, d)).astype(np.float32)
    cos, sin = rope_cos_sin(pos, d, theta)
    got = rope_neox(x, cos, sin)
    want = np.empty((len(pos), heads, d))
    for t, p in enumerate(pos):
        for h in range(heads):
            for i in range(d // 2):
                ang = p * theta ** (-2.0 * i / d)
                a, b = float(x[t, h, i]), float(x[t, h, i + d // 2])
                want[t, h, i] = a * math.cos(ang) - b * math.sin(ang)
                want[t, h, i + d // 2] = b * math.cos(ang) + a * math.sin(ang)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # position 0 is the identity; rotation keeps each head's norm
    np.testing.assert_array_equal(got[0], x[0])
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    d = 32
    q = rng.standard_normal((1, 1, d)).astype(np.float32)
    k = rng.standard_normal((1, 1, d)).astype(np.float32)

    def score(pq, pk):
        cq, sq = rope_cos_sin(np.array([pq]), d, 10000.0)
        ck, sk = rope_cos_sin(np.array([pk]), d, 10000.0)
        return float(np.sum(rope_neox(q, cq, sq) * rope_neox(k, ck, sk)))

    assert abs(score(5, 2) - score(105, 102)) < 1e-4
    assert abs(score(5, 2) - score(6, 2)) > 1e-3


def test_causal_gqa_attention_matches_loops():
    rng = np.random.default_rng(4)
    t, n_heads, n_kv, d, start = 3, 6, 2, 8, 4
    s = start + t
    q = rng.standard_normal((t, n_heads, d)).astype(np.float32)
    k = rng.standard_normal((s, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((s, n_kv, d)).astype(np.float32)
    got = causal_gqa_attention(q, k, v, start)
    want = np.zeros((t, n_heads, d))
    for i in range(t):
        for h in range(n_heads):
            kv = h // (n_heads // n_kv)
            visible = start + i + 1
            sc = np.array([q[i, h] @ k[j, kv] / math.sqrt(d) for j in range(visible)], np.float64)
            p = np.exp(sc - sc.max())
            p /= p.sum()
            want[i, h] = sum(p[j] * v[j, kv] for j in range(visible))
    np.testing.assert_allclose(got, want.reshape(t, n_heads * d), rtol=1e-5, atol=1e-5)


def test_route_topk_softmax_then_renormalise():
    logits = np.array([[0.0, 2.0, 1.0, -1.0, 2.5]], np.float32)
    ids, w = route_topk(logits, 2)
    assert ids.tolist() == [[4, 1]]
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(w[0], [p[4] / (p[4] + p[1]), p[1] / (p[4] + p[1])], rtol=1e-6)
    assert abs(float(w.sum()) - 1.0) < 1e-6


def test_softmax_masks_minus_inf():
    x = np.array([1.0, -np.inf, 1.0], np.float32)
    np.testing.assert_allclose(softmax(x), [0.5, 0.0, 0.5])
