"""Every kernel factory a model may call, registered explicitly: `use.kernel_factory` finds a
KernelUse's factory here (a (family, factory) pair is the factory's module and function name).
A new factory is added to FACTORIES; a step that calls an unlisted one fails to build, naming it.
"""

from sparkinfer.kernels import (
    attention,
    chunk,
    embedding,
    gemm,
    gemv,
    gemv_q8,
    logits,
    moe,
    moe_chunk,
    moe_q8,
    norm,
    prefill_attention,
    rope,
    router,
    sampling,
)
from sparkinfer.kernels.use import KernelFactory

FACTORIES: dict[tuple[str, str], KernelFactory] = {
    (f.__module__.rsplit(".", 1)[1], f.__name__): f
    for f in (
        # the decode step
        embedding.embedding,
        norm.rms_norm,
        norm.add_rms_norm,
        gemv.gemv,
        gemv.gemv_qkv,
        rope.qk_norm_rope_kv_append,
        attention.paged_decode_attention,
        attention.attention_combine,
        router.router_topk,
        moe.moe_gate_up_silu,
        moe.moe_down_residual,
        # the decode step's int8-activation variant (activations="q8")
        gemv_q8.quantize_q8_1,
        gemv_q8.add_rms_norm_q8_1,  # the FFN input's norm and quantizer in one launch
        gemv_q8.gemv_q8,
        moe_q8.moe_gate_up_silu_q8,
        moe_q8.moe_gate_up_silu_q8_routed,  # with router_merge="gate_up"
        moe_q8.moe_gate_up_silu_q8_routed_prefetch,  # and expert_prefetch="down" (CUDA only)
        moe_q8.moe_down_residual_q8,
        # and the int8 attention projections (projection_activations="q8")
        gemv_q8.rms_norm_q8_1,
        gemv_q8.gemv_qkv_q8,
        gemv_q8.attention_combine_q8_1,
        # the int8 kernels' lane form (int8_dots="lanes", cpu only)
        gemv_q8.gemv_q8_lanes,
        gemv_q8.gemv_qkv_q8_lanes,
        moe_q8.moe_gate_up_silu_q8_lanes,
        moe_q8.moe_gate_up_silu_q8_routed_lanes,
        moe_q8.moe_down_residual_q8_lanes,
        # with attention_norm="prologue" (CUDA only): the attention norm inside Q/K/V
        gemv_q8.gemv_qkv_q8_normed,
        gemv_q8.gemv_q8_normed,
        # the decode step's fewer-launches variant (decode_launches="fused")
        gemv.gemv_normed,
        gemv.gemv_qkv_normed,
        gemv.gemv_residual,
        moe.moe_gate_up_silu_routed,
        # the decode step's last-block merge (merge="last_block", CUDA only)
        attention.paged_decode_attention_merged,
        # the decode step's tensor-core attention (decode_attention="mma", CUDA only)
        attention.paged_decode_attention_mma,
        attention.paged_decode_attention_mma_merged,  # with merge="last_block"
        # the router's last-block top-k (router_merge="last_block", CUDA only)
        router.router_gemv_topk,
        logits.process_logits,
        logits.count_token,
        sampling.sample_candidates,
        sampling.sample_token,
        sampling.advance,
        # the T-token step
        embedding.embedding_rows,
        norm.rms_norm_rows,
        norm.add_rms_norm_rows,
        gemm.gemm,
        prefill_attention.qk_norm_rope_kv_append_rows,
        prefill_attention.causal_prefill_attention,
        prefill_attention.causal_prefill_attention_registers,  # attention_form="registers"
        gemv_q8.round_q8_1_rows,  # chunk_activations="q8" (cpu only): GEMM inputs as int8 GEMVs see them
        router.router_topk_rows,
        moe_chunk.moe_sort,
        moe_chunk.grouped_gemm,
        moe_chunk.grouped_gemm_f16,
        moe_chunk.grouped_gate_up_silu_f16,
        moe_chunk.silu_mul,
        moe_chunk.moe_combine_residual,
        chunk.take_row,
        chunk.advance_chunk,
        chunk.advance_pos,
    )
}
