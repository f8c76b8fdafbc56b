"""transformers (the accuracy oracle) loads what the writer writes, with the same weights."""

from pathlib import Path

import numpy as np
import pytest

from sparkinfer.gguf_file import GGUFModel, preset_config, synth_model, transformers_overrides

pytestmark = pytest.mark.slow  # importing torch and transformers alone takes several seconds


@pytest.mark.parametrize(
    ("preset", "file_type", "pairs"),
    [
        (
            "tiny",
            "q4_k_m",
            {
                "model.layers.1.self_attn.q_proj.weight": "blk.1.attn_q.weight",
                "model.layers.0.self_attn.k_norm.weight": "blk.0.attn_k_norm.weight",
                "model.layers.1.mlp.gate.weight": "blk.1.ffn_gate_inp.weight",
                "model.layers.1.mlp.experts.down_proj": "blk.1.ffn_down_exps.weight",
                "lm_head.weight": "output.weight",
            },
        ),
        (
            "tiny-dense",
            "q8_0",
            {
                "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
                "model.layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight",
                "model.embed_tokens.weight": "token_embd.weight",
            },
        ),
    ],
)
def test_transformers_loads_the_same_weights(tmp_path: Path, preset: str, file_type: str, pairs: dict[str, str]) -> None:
    # Imported here, not at collection, so deselected runs do not pay for torch.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = preset_config(preset)
    synth_model(tmp_path / "m.gguf", config, file_type)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32, **transformers_overrides(config)
    )
    ours = GGUFModel.open(tmp_path / "m.gguf")
    state = hf.state_dict()
    for hf_name, gguf_name in pairs.items():
        np.testing.assert_array_equal(state[hf_name].numpy(), ours.tensor_f32(gguf_name), err_msg=hf_name)
    if config.is_moe:
        # transformers fuses gate and up: [experts, 2 * expert_ffn, hidden], gate first.
        gate_up = state["model.layers.0.mlp.experts.gate_up_proj"].numpy()
        np.testing.assert_array_equal(gate_up[:, : config.expert_ffn], ours.tensor_f32("blk.0.ffn_gate_exps.weight"))
        np.testing.assert_array_equal(gate_up[:, config.expert_ffn :], ours.tensor_f32("blk.0.ffn_up_exps.weight"))
    logits = hf(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, config.vocab_size) and torch.isfinite(logits).all()
