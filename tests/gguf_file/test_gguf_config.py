import pytest

from sparkinfer.errors import MetadataError, UnsupportedArchitectureError
from sparkinfer.gguf_file import PRESETS, ModelConfig, preset_config, transformers_overrides


def _metadata(config: ModelConfig) -> dict:
    return {**config.to_metadata(), "tokenizer.ggml.tokens": ["t"] * config.vocab_size}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_metadata_round_trip(preset: str) -> None:
    config = PRESETS[preset]
    assert ModelConfig.from_metadata(_metadata(config)) == config


def test_float_fields_hold_their_float32_value() -> None:
    # A GGUF FLOAT32 gives back 9.99999997e-07 for 1e-6; the config must still compare and hash equal.
    metadata = _metadata(PRESETS["tiny"])
    metadata["qwen3moe.attention.layer_norm_rms_epsilon"] = 9.999999974752427e-07
    config = ModelConfig.from_metadata(metadata)
    assert config.rms_eps == 1e-6
    assert config.hparams_hash() == PRESETS["tiny"].hparams_hash()


def test_hparams_hash_is_stable_and_sensitive() -> None:
    tiny = PRESETS["tiny"]
    assert tiny.hparams_hash() == preset_config("tiny").hparams_hash()
    assert len(tiny.hparams_hash()) == 16
    assert tiny.hparams_hash() != tiny.replace(n_layers=3).hparams_hash()
    assert tiny.hparams_hash() != tiny.replace(rope_theta=1e4).hparams_hash()


def test_head_dim_defaults_to_hidden_over_heads() -> None:
    metadata = _metadata(PRESETS["tiny-dense"])
    del metadata["qwen3.attention.key_length"], metadata["qwen3.attention.value_length"]
    assert ModelConfig.from_metadata(metadata).head_dim == 256 // 4


def test_vocab_size_key_wins_over_token_list() -> None:
    metadata = {**_metadata(PRESETS["tiny"]), "qwen3moe.vocab_size": 2048}
    assert ModelConfig.from_metadata(metadata).vocab_size == 2048


@pytest.mark.parametrize(
    "key", ["qwen3moe.expert_used_count", "qwen3moe.block_count", "qwen3moe.attention.layer_norm_rms_epsilon"]
)
def test_missing_key_is_named(key: str) -> None:
    metadata = _metadata(PRESETS["tiny"])
    del metadata[key]
    with pytest.raises(MetadataError, match=f"metadata key '{key}' is missing"):
        ModelConfig.from_metadata(metadata)


def test_wrong_value_type_is_named() -> None:
    metadata = {**_metadata(PRESETS["tiny"]), "qwen3moe.block_count": "two"}
    with pytest.raises(MetadataError, match="'qwen3moe.block_count' should be int, found str"):
        ModelConfig.from_metadata(metadata)


def test_dense_needs_feed_forward_length() -> None:
    metadata = _metadata(PRESETS["tiny-dense"])
    del metadata["qwen3.feed_forward_length"]
    with pytest.raises(MetadataError, match="'qwen3.feed_forward_length' is missing"):
        ModelConfig.from_metadata(metadata)


def test_unsupported_architecture_lists_supported() -> None:
    metadata = {**_metadata(PRESETS["tiny"]), "general.architecture": "llama"}
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'llama': SparkInfer runs qwen3moe, qwen3"):
        ModelConfig.from_metadata(metadata)


def test_invalid_values_are_refused() -> None:
    with pytest.raises(MetadataError, match="n_experts_used must be in 1..8, got 9"):
        PRESETS["tiny"].replace(n_experts_used=9)
    with pytest.raises(MetadataError, match="n_heads \\(4\\) must be a multiple of n_kv_heads \\(3\\)"):
        PRESETS["tiny"].replace(n_kv_heads=3)
    with pytest.raises(MetadataError, match="n_layers must be positive"):
        preset_config("tiny", n_layers=0)


def test_value_length_must_equal_key_length() -> None:
    metadata = {**_metadata(PRESETS["tiny"]), "qwen3moe.attention.value_length": 32}
    with pytest.raises(MetadataError, match="value_length \\(32\\) differs from attention.key_length \\(64\\)"):
        ModelConfig.from_metadata(metadata)


def test_parameter_counts_of_qwen3_30b_a3b() -> None:
    config = PRESETS["qwen3-30b-a3b"]
    assert round(config.n_params / 1e9, 2) == 30.53
    assert round(config.n_active_params / 1e9, 2) == 3.35


def test_transformers_overrides() -> None:
    assert transformers_overrides(PRESETS["tiny"]) == {"moe_intermediate_size": 256}
    assert transformers_overrides(PRESETS["tiny-dense"]) == {"head_dim": 64}
