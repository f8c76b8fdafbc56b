"""Export correctness: a randomly initialised tiny Qwen3MoeForCausalLM written to GGUF through
`training.export` and loaded back by transformers gives the checkpoint's logits; SparkInfer's
numpy reference (NEOX RoPE, no Q/K permutation) agrees as well."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf_file = pytest.importorskip("sparkinfer.gguf_file", reason="sparkinfer.gguf_file (write_model) is not importable yet")

from training import export as E  # noqa: E402
from training import train_tokenizer as T  # noqa: E402
from training.train import Arch, hf_config  # noqa: E402

TEXT = [
    "import os\nimport sys\n\n\ndef main(argv=None):\n    return 0\n",
    "class Path(object):\n    def __init__(self, name):\n        self.name = name\n",
] * 8
ARCH = Arch(n_layers=2, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=4, n_experts_used=2,
            expert_ffn=256, context_length=256)


@pytest.fixture(scope="module")
def spec():
    return T.vocab_spec_dict(T.train_bpe(TEXT, 300))


@pytest.fixture(scope="module")
def model(spec):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    m = Qwen3MoeForCausalLM(hf_config(ARCH, len(spec["tokens"]), spec["eos_id"]))
    # every tensor distinct and far from its init (norms at 1, router at 0 would hide swapped names)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * noise)
            elif "mlp.gate." in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def tokens(spec):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, len(spec["tokens"]), (2, 48), generator=g)


@pytest.fixture(scope="module")
def f32_file(model, spec, tmp_path_factory):
    return E.export_model(model, spec, tmp_path_factory.mktemp("gguf"), ["f32"], name="tiny")["f32"]


def test_fused_experts_layout(model):
    sd = model.state_dict()
    gu = sd["model.layers.0.mlp.experts.gate_up_proj"]
    assert tuple(gu.shape) == (ARCH.n_experts, 2 * ARCH.expert_ffn, ARCH.hidden)
    assert tuple(sd["model.layers.0.mlp.experts.down_proj"].shape) == (ARCH.n_experts, ARCH.hidden, ARCH.expert_ffn)


def test_names_and_shapes(model, spec):
    cfg = E.model_config(model.config, len(spec["tokens"]))
    w = E.gguf_weights(model.state_dict(), cfg.n_layers, cfg.n_experts, cfg.expert_ffn)
    specs = gguf_file.expected_tensors(cfg)
    assert set(w) == set(specs)
    for name, s in specs.items():
        assert w[name].shape == s.shape, name
        assert w[name].dtype == np.float32
    sd = model.state_dict()
    gu = sd["model.layers.1.mlp.experts.gate_up_proj"].numpy()
    np.testing.assert_array_equal(w["blk.1.ffn_gate_exps.weight"], gu[:, : ARCH.expert_ffn])
    np.testing.assert_array_equal(w["blk.1.ffn_up_exps.weight"], gu[:, ARCH.expert_ffn :])
    np.testing.assert_array_equal(w["blk.1.attn_q.weight"], sd["model.layers.1.self_attn.q_proj.weight"].numpy())


def test_per_expert_layout_gives_same_tensors(model, spec):
    cfg = E.model_config(model.config, len(spec["tokens"]))
    sd = dict(model.state_dict())
    fused = E.gguf_weights(sd, cfg.n_layers, cfg.n_experts, cfg.expert_ffn)
    split = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e in range(cfg.n_experts):
                split[f"{base}{e}.gate_proj.weight"] = v[e, : cfg.expert_ffn]
                split[f"{base}{e}.up_proj.weight"] = v[e, cfg.expert_ffn :]
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(cfg.n_experts):
                split[f"{base}{e}.down_proj.weight"] = v[e]
        else:
            split[k] = v
    other = E.gguf_weights(split, cfg.n_layers, cfg.n_experts, cfg.expert_ffn)
    assert set(other) == set(fused)
    for k in fused:
        np.testing.assert_array_equal(other[k], fused[k])


def test_unknown_tensor_refused(model):
    sd = dict(model.state_dict())
    sd["model.layers.0.mlp.shared_expert.up_proj.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="no GGUF tensor"):
        E.gguf_weights(sd, ARCH.n_layers, ARCH.n_experts, ARCH.expert_ffn)


def test_tied_embeddings_refused(model):
    import copy

    c = copy.deepcopy(model.config)
    c.tie_word_embeddings = True
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        E.model_config(c)


def test_transformers_loads_same_logits(model, f32_file, tokens):
    want = E.logits_of(model, tokens)
    hf = E.load_gguf_in_transformers(f32_file)
    got = E.logits_of(hf, tokens)
    cmp = E.compare_logits(want, got)
    assert cmp["logit_range"] > 5  # the test model is far from uniform
    assert cmp["max_abs_diff"] < 1e-4, cmp
    assert cmp["top1_agreement"] == 1.0


def test_reference_model_agrees_without_qk_permutation(model, f32_file, tokens):
    """An interleaved (LLaMA-style) Q/K permutation would be needed only for non-NEOX RoPE;
    the reference forward, written from llama.cpp's qwen3moe graph, confirms none is."""
    reference = pytest.importorskip("sparkinfer.reference")
    g = gguf_file.GGUFModel.open(f32_file)
    got = reference.ReferenceModel(g.config, g).prefill(tokens[0].tolist())
    want = E.logits_of(model, tokens[:1])[0]
    cmp = E.compare_logits(want, torch.from_numpy(np.asarray(got)))
    assert cmp["max_abs_diff"] < 1e-3, cmp


def test_check_passes_on_f16_and_q4_k_m(model, spec, tmp_path):
    paths = E.export_model(model, spec, tmp_path, ["f16", "q4_k_m"], name="tiny")
    r = gguf_file.GGUFModel.open(paths["q4_k_m"])
    assert r.metadata["general.name"] == "tiny"
    report = E.check(model, spec, paths, n_windows=1, seq_len=32, corpus_tar=tmp_path / "none.tar.gz",
                     reference_tokens=16, quantized_max_mean_kl=None)
    assert report["ok"], report
    assert np.isfinite(report["q4_k_m"]["vs_checkpoint"]["mean_kl"])
    assert report["f16"]["vs_rounded_checkpoint"]["max_abs_diff"] <= E.STRICT_MAX_ABS
