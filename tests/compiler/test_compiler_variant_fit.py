"""An arch's schedules file picks step variants for the models it was measured on
(sparkinfer/data/schedules/sm_90.json: the register prefill attention, the tensor-core decode
attention, int8 expert activations); a model whose attention heads or widths those kernels cannot
serve gets the default form instead, and the compile says so (compiler/pipeline.py
`fitting_variants`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sparkinfer.compiler.pipeline import compile_model, fitting_variants
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import misfit_variants
from sparkinfer.schedule.schedules import SchedulesFile

TINY = preset_config("tiny")  # 4 query heads over 2 KV heads, head dim 64: both forms fit
WIDE_GROUP = dataclasses.replace(TINY, n_heads=32, n_kv_heads=2)  # 16 query heads a KV head
HEAD_DIM_96 = dataclasses.replace(TINY, head_dim=96)
FAST = {"attention_form": "registers", "decode_attention": "mma"}


def test_the_forms_name_what_they_cannot_serve() -> None:
    assert misfit_variants(TINY, FAST) == {}
    assert misfit_variants(preset_config("qwen3-30b-a3b"), FAST) == {}
    assert misfit_variants(WIDE_GROUP, FAST) == {
        "decode_attention": "the tensor-core decode attention needs at most 8 query heads per KV head (got 16) "
                            "and a head dim that is a multiple of 64 (got 64)"}
    assert set(misfit_variants(HEAD_DIM_96, FAST)) == {"decode_attention", "attention_form"}
    assert misfit_variants(HEAD_DIM_96, {"attention_form": "compact", "decode_attention": "simt"}) == {}
    assert misfit_variants(TINY, {"activations": "q8"}) == {}
    assert misfit_variants(dataclasses.replace(TINY, expert_ffn=48), {"activations": "q8"}) == {
        "activations": "its FFN width 48 is not a multiple of the int8 blocks' 32"}
    dense = preset_config("tiny-dense")
    assert misfit_variants(dataclasses.replace(dense, hidden=80), {"activations": "q8"}) == {
        "activations": "its hidden size 80 is not a multiple of the int8 blocks' 32"}
    assert misfit_variants(TINY, {"projection_activations": "q8"}) == {}
    assert misfit_variants(dataclasses.replace(TINY, head_dim=48), {"projection_activations": "q8"}) == {
        "projection_activations": "its head dim 48 is not a multiple of the int8 blocks' 32"}


def test_a_misfit_variant_goes_back_to_its_default_and_says_so() -> None:
    said: list[str] = []
    chosen = SchedulesFile("sm_90", {}, step=dict(FAST))
    assert fitting_variants(HEAD_DIM_96, "sm_90", chosen, said.append) == {
        "chunk_operands": "f16", "attention_form": "read_ahead", "decode_attention": "simt"}
    assert said == [
        "sm_90: step variant attention_form='registers' does not fit this model (the register attention needs the "
        "2 query heads per KV head to divide 64 and the head dim (96) to be a multiple of 64): the step uses the "
        "slower attention_form='read_ahead'",
        "sm_90: step variant decode_attention='mma' does not fit this model (the tensor-core decode attention needs "
        "at most 8 query heads per KV head (got 2) and a head dim that is a multiple of 64 (got 96)): the step uses "
        "the slower decode_attention='simt'"]
    said.clear()
    assert fitting_variants(TINY, "sm_90", chosen, said.append)["decode_attention"] == "mma" and said == []


def test_the_packaged_sm_90_choice_compiles_a_wide_group_model_with_the_simt_attention(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = compile_model(WIDE_GROUP, type_map(WIDE_GROUP, "q4_k_m"), "sm_90", tmp_path, prefill_chunks=())
    factories = {k["factory"] for k in result.manifest.kernels}
    assert "paged_decode_attention" in factories and "paged_decode_attention_mma" not in factories
    assert ("sm_90: step variant decode_attention='mma' does not fit this model (the tensor-core decode attention "
            "needs at most 8 query heads per KV head (got 16)") in capsys.readouterr().err
