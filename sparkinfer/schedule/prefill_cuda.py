"""CUDA schedules of the T-token step's kernels (bench/NOTES.md, "Session 5", has each one's
time on an H200 and what the next step is):

  - gemm: with float16 operands dlight's tensor-core (WMMA) matmul, the dequantization fused
    into its shared-memory tile loads, K split over blocks where the output tiles are fewer than
    the SMs (`GemmKnobs`); with float32 weights (the router) register tiles on CUDA cores, K
    split over blocks too (`schedule_float_gemm`), dlight's SIMT Matmul for partial tiles;
  - the row kernels (norms, router top-k, RoPE + KV append, the MoE combine, the sort) have
    hand-made rules: the decode kernels' schedules a thread block per row (schedule/norm.py,
    schedule/router.py), or below;
  - grouped_gemm: a block per (expert, 16-output tile) that decodes each K tile of its weights
    once into shared memory and multiplies it by the expert's rows staged there, a thread
    accumulating 2 rows x 1 output in registers (GroupedGemmCudaRule says why);
  - grouped_gate_up_silu_f16 / grouped_gemm_f16 (the experts with float16 operands): the same
    shared-memory tiles as float16, multiplied on tensor cores (WMMA fragments, 32- or 64-row
    tiles of an expert's rows, a crowded expert's tiles over several blocks;
    `_GroupedGemmF16CudaRule`, knobs `GroupedF16Knobs`);
  - causal_prefill_attention: a block per (KV head, query tile), the tile's Q, K, V, S and
    softmax state in shared memory, S's sums and the output in registers (the rule's docstring);
    causal_prefill_attention_registers (attention_form "registers") comes scheduled;
  - the rest (embedding rows, silu_mul, take_row) take dlight's GPU rules, replayed as a trace;
    advance_chunk and advance_pos are one thread.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import tvm
from gguf import GGMLQuantizationType
from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from sparkinfer.errors import SparkInferError
from sparkinfer.kernels.gemv import gemv_format
from sparkinfer.kernels.moe_chunk import (
    F16_ROW_SHARES,
    F16_ROW_TILES,
    F16_TILE_N,
    ROW_BLOCK,
    SORT_ROW_ALIGN_BYTES,
    SORT_RUN_ALIGN_BYTES,
    TILE_N,
    f16_row_tile,
    k_tile,
)
from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts, cuda_target_attrs
from sparkinfer.schedule.attention import _read_index
from sparkinfer.schedule.rope import schedule_head_blocks
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule


class _CudaRule(FixedRule):
    target_kind = "cuda"


def apply_dlight(sch: s_tir.Schedule, use: KernelUse, facts: ArchFacts, rules: tuple[Any, ...]) -> None:
    """The first of dlight's GPU `rules` that takes the kernel, its trace replayed onto `sch`."""
    target = tvm.target.Target(cuda_target_attrs(facts))
    func = sch.mod["main"]
    for rule in rules:
        with target:
            found = rule.apply(func, target, False)
        if found is None:
            continue
        found = found[0] if isinstance(found, list) else found
        found.trace.apply_to_schedule(sch, remove_postproc=False)
        return
    raise SparkInferError(f"kernel {use.name}: no dlight GPU rule takes it")


def spread_over_threads(sch: s_tir.Schedule, loops: list[LoopRV], threads: int) -> LoopRV:
    """The loops' iterations over a block's `threads` (consecutive ones on consecutive threads,
    a predicate where they do not divide); returns the per-thread loop."""
    outer, lane = sch.split(sch.fuse(*loops) if len(loops) > 1 else loops[0], [None, threads])
    sch.bind(lane, "threadIdx.x")
    return outer


class DlightCudaRule(_CudaRule):
    """dlight's first GPU rule that takes the kernel; one instance per factory it serves."""

    def __init__(self, family: str, factory: str) -> None:
        self.family, self.factory = family, factory

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        from tvm.s_tir import dlight as dl

        apply_dlight(sch, use, facts, (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback()))


@dataclasses.dataclass(frozen=True)
class GemmKnobs(Knobs):
    """k_splits: thread blocks sharing each output tile's K (split-K; tensor-core form only):
    block s sums its K / k_splits into tile s of a float32 workspace [k_splits, T, N], and a
    second kernel adds the k_splits partial tiles into y (1: one kernel, no workspace).
    Structural: it changes the grid and adds the kernel and the workspace."""

    k_splits: int


class GemmCudaRule(_CudaRule):
    """The dense dequantizing GEMM: with float16 operands (`kernels.gemm`'s half_operands) on
    tensor cores (`schedule_tensor_core_gemm`: dlight's WMMA matmul, split-K by `GemmKnobs`);
    else dlight's SIMT Matmul (~6.8 TFLOP/s on an H200 at 128 x 2048 x 4096, bench/NOTES.md),
    or `schedule_float_gemm` for whole tiles of float32 weights (the router)."""

    family, factory = "gemm", "gemm"
    knobs_type = GemmKnobs
    K_SPLITS: ClassVar[tuple[int, ...]] = (1, 2, 4, 8, 16, 32)

    @staticmethod
    def _half_operands(use: KernelUse) -> bool:
        return len(use.args) > 4 and bool(use.args[4])

    @staticmethod
    def _float_tiles(use: KernelUse) -> bool:
        """float32 weights in whole `schedule_float_gemm` tiles (the router)."""
        ggml_type, t, n = factory_args(use)[:3]
        rows, cols, _ = FLOAT_GEMM_TILE
        return ggml_type == GGMLQuantizationType.F32 and t % rows == 0 and n % cols == 0

    def _tile(self, use: KernelUse) -> tuple[int, int, int] | None:
        """The block's output tile and K step of the form the kernel takes; None: dlight's."""
        if self._half_operands(use):
            return TC_GEMM_TILE
        return FLOAT_GEMM_TILE if self._float_tiles(use) else None

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        """Split-K: the K_SPLITS that leave every split a whole number of at least two K steps
        (float16 operands: the software pipeline's two stages) of the form's tile; dlight's
        SIMT Matmul (float32 weights in partial tiles): 1."""
        k = factory_args(use)[3]
        tile = self._tile(use)
        if tile is None:
            return {"k_splits": (1,)}
        least = 2 * tile[2]
        return {"k_splits": (1,) + tuple(s for s in self.K_SPLITS[1:] if k % (s * least) == 0)}

    def structural(self) -> tuple[str, ...]:
        return ("k_splits",)

    def default(self, use: KernelUse, facts: ArchFacts) -> GemmKnobs:
        """Float16 operands: the most splits whose blocks still fit one wave (one block an SM:
        the WMMA tile's 512 threads at 128 registers take an SM's 64 K registers): at 512
        tokens on an H100 K and V (16 output tiles) split 8 ways, O (64 tiles, K = 4096) 2 ways,
        Q (128 tiles) not at all (bench/NOTES.md, "Split-K for the dense GEMMs").
        Float32 tiles (the router): the splits whose blocks come nearest (as a ratio) to two an
        SM, several of its 256-thread blocks fitting an SM to hide each other's loads: 16 at 512
        tokens on an H100 (256 blocks), 4 at 2048, 32 at 128; 8 at 512 on sm_121's 48 SMs
        (bench/NOTES.md, "Q projection and router GEMMs")."""
        t, n = factory_args(use)[1:3]
        splits = self.space(use, facts)["k_splits"]
        tile = self._tile(use)
        if tile is None:
            return GemmKnobs(1)
        rows, cols, _ = tile
        tiles = math.ceil(t / rows) * math.ceil(n / cols)
        if tile == FLOAT_GEMM_TILE:
            return GemmKnobs(min(splits, key=lambda s: abs(math.log2(tiles * s / (2 * facts.sms)))))
        return GemmKnobs(max(s for s in splits if s == 1 or tiles * s <= facts.sms))

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        from tvm.s_tir import dlight as dl

        assert isinstance(knobs, GemmKnobs)
        if self._half_operands(use):
            schedule_tensor_core_gemm(sch, knobs.k_splits)
        elif self._float_tiles(use):
            schedule_float_gemm(sch, knobs.k_splits)
        else:
            apply_dlight(sch, use, facts, (dl.gpu.Matmul(),))


# The tensor-core GEMM's thread block: TC_GEMM_WARPS warps (rows x columns) each owning
# TC_GEMM_FRAGMENTS 16 x 16 accumulator fragments, so a 128 x 128 output tile, over K tiles of
# 64 (dlight's MatmulTensorization's configuration, measured in bench/NOTES.md).
TC_GEMM_WARPS = (4, 4)
TC_GEMM_FRAGMENTS = (2, 2)
TC_GEMM_TILE = (128, 128, 64)  # rows, columns, K: the warps' fragments
WMMA = 16  # a fragment's side
TC_GEMM_SUM_THREADS = 256  # the split-K sum's threads a block, an output each


def schedule_tensor_core_gemm(sch: s_tir.Schedule, k_splits: int) -> None:
    """`gemm` with float16 operands on WMMA 16x16x16 fragments (float32 accumulators), as dlight's
    MatmulTensorization schedules it (its steps, replayed here so that K can be split and the
    MMAs issued before the weights' decode): a block
    of 16 warps per 128 x 128 output tile, K tiles of 64 double-buffered in dynamic shared memory
    (the x rows and the weights, each dequantized on its way in: the decode is inlined into the
    tile loads), each warp 2 x 2 accumulator fragments, stored through shared memory.

    With k_splits > 1 the reduction over K is first split (rfactor): the tensor-core kernel gets
    k_splits blocks per output tile (blockIdx.z the split, x the row tile, y the column), block s
    summing K range s into the workspace gemm_rf[s] (TVM allocates it in the host function:
    TVMBackendAllocWorkspace), and a second kernel sums the splits into y, a thread an output.
    Why: a 128 x 128 tile is one block an SM (128 registers a thread, bench/NOTES.md), so a
    GEMM of few output tiles leaves SMs idle however long its K: at 512 tokens K and V (N = 512)
    are 16 blocks on an H100's 132 SMs, O (N = 2048, K = 4096) 64 blocks, 74 and 142 us a launch
    where Q (128 blocks) takes 74 us for as many FLOPs as O. (Other tile shapes are not offered:
    TVM 0.27's shared-memory merge typed the float32 accumulator staging as float16 for every
    tile but 128 x 128 tried, failing the WMMA store's pointer check.)"""
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_producers, get_index_map
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    main = total = sch.get_sblock("gemm")
    if k_splits > 1:
        main = split_k_partials(sch, main, k_splits)
    # C[S, I, J] += A[S, I, K] B[S, J, K] (S: the split, or a unit batch), padded to whole tiles
    reindex_a, reindex_b = sch.reindex(main, ("read", 0)), sch.reindex(main, ("read", 1))
    reindex_c = sch.reindex(main, ("write", 0))
    index_maps = get_index_map(sch.get(main))
    assert index_maps is not None
    matmul_map, a_map, b_map, c_map = index_maps
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main, matmul_map)
    rows, cols, k_tile = TC_GEMM_TILE
    sch.pad_einsum(main, [1, rows, cols, k_tile])

    batch, i, j, k = sch.get_loops(main)
    i, i16 = sch.split(i, [None, WMMA])
    j, j16 = sch.split(j, [None, WMMA])
    k, k16 = sch.split(k, [None, WMMA])
    sch.reorder(i, j, k, i16, j16, k16)
    mma = sch.blockize(i16)
    warps_i, warps_j = TC_GEMM_WARPS
    frags_i, frags_j = TC_GEMM_FRAGMENTS
    # (row tile, 1, warp, fragment) and (1, column tile, warp, fragment), as dlight splits them
    i0, i1, i2, i3 = sch.split(i, [None, 1, warps_i, frags_i])
    j0, j1, j2, j3 = sch.split(j, [1, None, warps_j, frags_j])
    k0, k1 = sch.split(k, [None, k_tile // WMMA])
    # The software pipeline over K tiles. k0's body, once TVM has made each tile load two steps
    # (global -> registers -> shared) and pipelined k1: x load, x store, W load (the decode
    # inlined: registers hold decoded halves), W store, k1's prologue, body and epilogue; the
    # loads and stores of tile k0 + 1 (stage 0) around the MMAs of tile k0 (stage 1). dlight's
    # order puts both loads before the MMAs ([0, 3, 1, 4, 5, 2, 6]): the W decode, written
    # right after its loads, then waits out their latency before the MMAs issue (sm_90a SASS,
    # bench/NOTES.md "Q projection and router GEMMs"). Here the MMAs of k1's body come between
    # the x load and the W load: nvcc still issues the W loads ahead of the MMAs, and the decode
    # that waits for them comes after.
    sch.annotate(k0, "software_pipeline_order", [0, 3, 2, 4, 5, 1, 6])
    sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
    sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
    sch.reorder(i0, j0, i1, j1, j2, i2, k0, k1, i3, j3)
    sch.bind(batch, "blockIdx.z")  # the split
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")  # the row tile
    sch.bind(sch.fuse(i1, j1), "blockIdx.y")  # the column tile
    warp = sch.fuse(j2, i2)
    sch.bind(warp, "threadIdx.y")
    warps = warps_i * warps_j
    vector = 4

    def fetch_to_shared(index: int) -> None:
        """Operand `index`'s K tile into dynamic shared memory, 4 elements a thread a load (its
        producers, the decode or the float16 rounding, inlined into the load)."""
        tile = sch.cache_read(mma, index, "shared.dyn")
        sch.compute_at(tile, k0)
        _, ty, tx, vec = sch.split(sch.fuse(*sch.get_loops(tile)[-2:]), [None, warps, 32, vector])
        sch.bind(tx, "threadIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.vectorize(vec)
        sch.storage_align(tile, 0, axis=-2, factor=16, offset=8)  # rows 16 bytes off: fragment loads
        sch.annotate(tile, "tirx.manifest_shared_memory_local_stage", 1)
        sch.annotate(tile, "double_buffer_scope", 0)
        auto_inline_producers(sch, tile)

    fetch_to_shared(0)
    fetch_to_shared(1)
    a_frag = sch.cache_read(mma, 0, "wmma.matrix_a")
    b_frag = sch.cache_read(mma, 1, "wmma.matrix_b")
    sch.compute_at(a_frag, k1)
    sch.compute_at(b_frag, k1)
    staged = sch.cache_write(mma, 0, "shared.dyn")  # the accumulators, through shared memory
    store = sch.cache_write(mma, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, warp)
    sch.reverse_compute_at(staged, warp)
    si, sj = sch.get_loops(store)[-2:]
    si0, si1 = sch.split(si, [None, WMMA])
    sj0, sj1 = sch.split(sj, [None, WMMA])
    sch.reorder(si0, sj0, si1, sj1)
    init = sch.decompose_reduction(mma, k0)

    intrins = get_wmma_intrin_group(load_scope="shared.dyn", store_scope="shared.dyn", in_dtype="float16",
                                    out_dtype="float32", trans_b=True)
    for block, name in ((a_frag, "load_a"), (b_frag, "load_b")):
        fi, fj = sch.get_loops(block)[-2:]
        fi0, fi1 = sch.split(fi, [None, WMMA])
        fj0, fj1 = sch.split(fj, [None, WMMA])
        sch.reorder(fi0, fj0, fi1, fj1)
        sch.unroll(fi0)
        sch.unroll(fj0)
        sch.tensorize(fi1, intrins[name])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrins["init"])
    sch.tensorize(sch.get_loops(store)[-2], intrins["store"])
    sch.tensorize(sch.get_loops(main)[-3], intrins["compute"])
    # the staged tile written out 4 floats a thread, straight into y or the split's partial
    # tile (the copies out of C's reindex buffer and the padding inlined)
    while copies := [c for c in sch.get_consumers(staged) if k_splits == 1 or not sch.get(c).same_as(sch.get(total))]:
        for copy in copies:
            sch.reverse_compute_inline(copy)
    _, tx, vec = sch.split(sch.fuse(*sch.get_loops(staged)[-2:]), [None, 32, vector])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)
    if k_splits > 1:
        schedule_split_sum(sch, total)


# The float32 GEMM's thread block (the router): FLOAT_GEMM_THREADS (rows x columns) threads, each
# owning FLOAT_GEMM_REGISTERS (rows x columns) outputs in registers, so a 32-token x 128-output
# tile (all of the router's experts), over K steps of 32 staged in shared memory.
FLOAT_GEMM_THREADS = (8, 32)
FLOAT_GEMM_REGISTERS = (4, 4)
FLOAT_GEMM_TILE = (32, 128, 32)  # rows (tokens), columns (outputs), K a step


def schedule_float_gemm(sch: s_tir.Schedule, k_splits: int) -> None:
    """`gemm` of float32 weights (the router: T x 128 x 2048) in float32 on CUDA cores: a block per
    32-token x 128-output tile and K range (`k_splits` of them, the split-K of
    `schedule_tensor_core_gemm`: partial tiles to the workspace gemm_rf, summed by a second
    kernel), 256 threads each summing 4 tokens x 4 outputs in registers (outputs 32 apart: the
    W reads of a warp on 32 banks, the x reads a broadcast), x and W through shared memory 32
    of K at a time (a W row padded by a word: a K step's rows on distinct banks).
    Why (bench/NOTES.md, "Q projection and router GEMMs"): a thread an output over all of K in
    a 8 x 32 tile made 64 K steps a block, each a global round trip then 32 dependent FMAs of
    two shared loads each: 52.5 us for 0.27 GFLOP on an H100. Whole tiles only (T a multiple of
    32, N of 128; a partial tile's shared-memory rows came out wrong through the emulator):
    other shapes (the tiny models' routers) keep dlight's Matmul."""
    rows, cols, k_step = FLOAT_GEMM_TILE
    threads_i, threads_j = FLOAT_GEMM_THREADS
    regs_i, regs_j = FLOAT_GEMM_REGISTERS
    sch.compute_inline(sch.get_sblock("wdq"))
    main = total = sch.get_sblock("gemm")
    if k_splits > 1:
        main = split_k_partials(sch, main, k_splits)
        split, i, j, k = sch.get_loops(main)
        blocks: list[LoopRV] = [split]
    else:
        i, j, k = sch.get_loops(main)
        blocks = []
    i_out, ty, i_reg = sch.split(i, [None, threads_i, regs_i])
    j_out, j_reg, tx = sch.split(j, [None, regs_j, threads_j])
    k_out, k_in = sch.split(k, [None, k_step])
    sch.reorder(*blocks, i_out, j_out, j_reg, ty, tx, k_out, k_in, i_reg)
    sch.bind(sch.fuse(*blocks, i_out, j_out), "blockIdx.x")
    sch.bind(j_reg, "vthread.x")  # a thread's outputs 32 apart, each its own registers
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    partial = sch.cache_write(main, 0, "local")
    sch.reverse_compute_at(partial, tx)
    for index in (0, 1):  # the step's x rows, then its W rows
        tile = sch.cache_read(main, index, "shared")
        sch.compute_at(tile, k_out)
        _, fy, fx = sch.split(sch.fuse(*sch.get_loops(tile)[-2:]), [None, threads_i, threads_j])
        sch.bind(fy, "threadIdx.y")
        sch.bind(fx, "threadIdx.x")
        if index == 1:
            sch.storage_align(tile, 0, axis=0, factor=k_step, offset=1)
    sch.decompose_reduction(main, k_out)
    if k_splits > 1:
        schedule_split_sum(sch, total)


def split_k_partials(sch: s_tir.Schedule, gemm: SBlockRV, k_splits: int) -> SBlockRV:
    """Split `gemm`'s K loop into k_splits ranges by rfactor: the returned block writes the
    partial sums gemm_rf[s, i, j] over loops (s, i, j, k) in that order (its iters in loop order,
    as transform_block_layout needs); `gemm` then sums them over s (schedule_split_sum)."""
    _, _, k = sch.get_loops(gemm)
    split, _ = sch.split(k, [k_splits, None])
    partials = sch.rfactor(split, factor_axis=0)
    i, j, split, k = sch.get_loops(partials)
    sch.reorder(split, i, j, k)
    return partials


def schedule_split_sum(sch: s_tir.Schedule, total: SBlockRV) -> None:
    """The split-K sum (y = the sum over s of gemm_rf[s]): a thread an output, in a register."""
    i, j, _ = sch.get_loops(total)
    blocks, threads = sch.split(sch.fuse(i, j), [None, TC_GEMM_SUM_THREADS])
    sch.bind(blocks, "blockIdx.x")
    sch.bind(threads, "threadIdx.x")
    in_register = sch.cache_write(total, 0, "local")
    sch.reverse_compute_at(in_register, threads)


DLIGHT_RULES: tuple[DlightCudaRule, ...] = tuple(
    DlightCudaRule(family, factory) for family, factory in (
        ("embedding", "embedding_rows"),
        ("moe_chunk", "silu_mul"),
        ("chunk", "take_row"),
    )
)


class QkNormRopeKvAppendRowsCudaRule(_CudaRule):
    """`rope.QkNormRopeKvAppendCudaRule` a row at a time: a thread block per (row, head), a
    thread per head dim, the head's sum of squares a block-wide allreduce; the row's cos / sin
    table (half a head's dims) is computed by the block into shared memory (each head's block
    computes it again: 64 cos/sin pairs, less than a global round trip). dlight's fallback made
    three kernels of it, the sum of squares a serial loop per (row, head)."""

    family, factory = "prefill_attention", "qk_norm_rope_kv_append_rows"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        row, head, dim = sch.get_loops(sch.get_sblock("rope"))
        block = sch.fuse(row, head)
        schedule_head_blocks(sch, block, dim)
        angle = sch.get_sblock("angle")
        sch.compute_at(angle, block)
        sch.set_scope(angle, 0, "shared")  # cos
        sch.set_scope(angle, 1, "shared")  # sin
        # Half a head's dims over the head's threads: the split's predicate idles the other half
        # (a loop bound to threadIdx.x without it would run past the table).
        _, lane = sch.split(sch.get_loops(angle)[-1], [None, sch.get(dim).extent])
        sch.bind(lane, "threadIdx.x")


class MoeCombineResidualCudaRule(_CudaRule):
    """A thread block per token, its threads over the hidden dims; each output's sum over the
    token's KU expert rows in registers (dlight gave it 321 us a launch at 128 tokens, 2048 wide,
    top 8 on an H200)."""

    family, factory = "moe_chunk", "moe_combine_residual"
    THREADS: ClassVar[int] = 256

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        out = sch.get_sblock("h_out")
        token, dim = sch.get_loops(out)
        sch.bind(token, "blockIdx.x")
        _, lane = sch.split(dim, [None, self.THREADS])
        sch.bind(lane, "threadIdx.x")
        ffn = sch.get_sblock("ffn")
        sch.compute_at(ffn, lane)
        sch.set_scope(ffn, 0, "local")


class _OneThreadRule(_CudaRule):
    """A serial kernel whose work is one block `block` under one unit loop: one thread."""

    block: ClassVar[str]
    enable_check = False  # the block holds plain loops, not block iters

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        sch.bind(sch.get_loops(sch.get_sblock(self.block))[0], "blockIdx.x")


class MoeSortCudaRule(_CudaRule):
    """One thread block of THREADS threads running `moe_chunk.moe_sort`'s stages one after the
    other, each spread over them: a thread per chunk for the chunks' two passes, a thread per
    expert for the rows' prefix sums, every thread for the copy and the clears. The staged
    experts, the matrices, the totals and the starts are in shared memory, so TVM puts a
    barrier between the stages. The matrices' rows are padded by a word: a thread per expert
    walking its row then hits its own bank (an unpadded row is a multiple of 32 words, so a
    warp's 32 rows would all start in one bank), while a chunk's column stays its thread.

    Why: a thread per expert scanning all T * KU pairs twice (the ids staged in shared memory)
    took 106 us at T = 512 on an H100 (bench/NOTES.md), each thread's 8192 shared loads with one
    warp a scheduler to hide them; here each pair is read twice in all, by its chunk's thread,
    and the chains of T * KU / C steps bound the kernel ("moe_sort by chunks" in
    bench/NOTES.md has the prediction)."""

    family, factory = "moe_chunk", "moe_sort"
    enable_check = False  # the stages' plain loops and data-dependent stores
    # The most a block holds: the copy's global loads (4 a thread at T = 512) all in flight at
    # once, the clears' stores 8 a thread.
    THREADS: ClassVar[int] = 1024

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        sch.bind(sch.get_loops(sch.get_sblock("experts"))[0], "blockIdx.x")
        for block, buffer in (("experts", "expert_of"), ("zero_counts", "count"), ("chunk_starts", "fill"),
                              ("chunk_starts", "total"), ("expert_starts", "start")):
            sch.set_scope(sch.get_sblock(block), buffer, "shared")
        # The matrices' rows an odd number of words apart (the first buffer these blocks write:
        # count, fill); the chunks' runs of experts an odd number of 16 bytes apart, so that the
        # 8 threads of a quarter warp reading 16 bytes each of theirs hit all 32 banks.
        for block, unit_bytes in (("zero_counts", SORT_ROW_ALIGN_BYTES), ("chunk_starts", SORT_ROW_ALIGN_BYTES),
                                  ("experts", SORT_RUN_ALIGN_BYTES)):
            unit = unit_bytes * 8 // tvm.DataType(sch.get(sch.get_sblock(block)).writes[0].source.dtype).bits
            sch.storage_align(sch.get_sblock(block), 0, axis=0, factor=2 * unit, offset=unit)
        for name in ("experts", "zero_counts", "count", "chunk_starts", "expert_starts", "place", "clear_rows",
                     "clear_pairs"):
            spread_over_threads(sch, sch.get_loops(sch.get_sblock(name))[1:], self.THREADS)


class AdvanceChunkCudaRule(_OneThreadRule):
    family, factory, block = "chunk", "advance_chunk", "advance"


class AdvancePosCudaRule(_OneThreadRule):
    family, factory, block = "chunk", "advance_pos", "advance"


class GroupedGemmCudaRule(_CudaRule):
    """A block per (expert, TILE_N-output tile) of TILE_N x ROW_BLOCK / THREAD_ROWS threads
    (64): threadIdx.x an output, threadIdx.y THREAD_ROWS rows of the row block.

    Per K tile the block decodes the tile's weights once, cooperatively, into a shared float32
    tile [TILE_N, K_TILE] (16 KiB; consecutive threads decode consecutive k of one weight row,
    so a warp's quant-word reads coalesce; the scales and mins, decoded once per block, are
    shared too); then for each ROW_BLOCK rows of the expert it stages their x K-tile in shared
    memory (8 KiB, coalesced likewise) and each thread accumulates its THREAD_ROWS x 1 outputs
    in registers from shared memory only. The partial sums cross K tiles through y (the
    kernel's structure, shared with the CPU rule). Under 33 KiB of static shared memory a
    block: no dynamic shared memory, 6 blocks an SM on an H200.

    Why: the first version decoded every weight in every thread that multiplied it, once per
    ROW_BLOCK rows, straight from global memory (11.8 ms a gate/up launch at T = 128 on an
    H200). Now a weight is decoded once per block, and the multiply-add loop is bound by
    shared-memory wavefronts: per X_RUN k steps a thread loads a 16-byte run of each of its
    rows' x (a warp's lanes share them: 1 wavefront each) and of its output's weights (16
    lanes, 2 wavefronts; nvcc merges the unrolled reads, the tiles' rows being K_TILE + X_RUN
    floats apart: runs 16-byte aligned, a warp's rows on other banks), each weight serving
    THREAD_ROWS rows: 0.5 wavefronts per warp multiply-add (2 with one row per thread and
    scalar reads). TILE_N and ROW_BLOCK are the kernel's (the CPU's vector width and register
    block), which caps the register tile."""

    family, factory = "moe_chunk", "grouped_gemm"
    enable_check = False  # the K-tile and rows loops' trip counts are read from `offsets`

    THREAD_ROWS: ClassVar[int] = 2  # rows of the row block a thread accumulates
    X_RUN: ClassVar[int] = 4  # k steps unrolled: nvcc loads an x row's 4 floats at once

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        threads_y = ROW_BLOCK // self.THREAD_ROWS
        e, t = sch.get_loops(sch.get_sblock("tile"))
        sch.bind(sch.fuse(e, t), "blockIdx.x")
        scale = sch.get_sblock("scale")
        sch.set_scope(scale, 0, "shared")  # the tile's scales,
        sch.set_scope(scale, 1, "shared")  # its mins
        for index in (0, 1):  # [chunk, part, output]: the 16 outputs' threads write 16 banks
            sch.transform_layout(scale, ("write", index), lambda i, c, p: (c, p, i))
        # Bound at the block's top level, threadIdx.y is one thread variable for every stage
        # below, so the accumulators compact to the thread's own (registers, not local memory).
        i, c, p = sch.get_loops(scale)[-3:]
        sch.bind(i, "threadIdx.x")
        sch.bind(sch.split(sch.fuse(c, p), [None, threads_y])[1], "threadIdx.y")
        dequant, xload = sch.get_sblock("dequant"), sch.get_sblock("xload")
        sch.set_scope(dequant, 0, "shared")
        sch.set_scope(xload, 0, "shared")
        # The weight tile [output, k], decoded along k: a warp reads consecutive quant words of
        # one weight row (coalesced) and writes consecutive floats.
        sch.transform_layout(dequant, ("write", 0), lambda k, i: (i, k))
        sch.reorder(*reversed(sch.get_loops(dequant)[-2:]))
        # Rows K_TILE + X_RUN floats apart: X_RUN-float runs 16-byte aligned, and the rows of
        # one 16-byte load on the other banks.
        for block in (dequant, xload):
            sch.storage_align(block, 0, axis=0, factor=32, offset=self.X_RUN)
        # Every thread a share of each tile, k fastest; the x rows' copy X_RUN floats (16
        # bytes) a thread at once where the threads' runs tile a row.
        x_run = self.X_RUN if ROW_BLOCK * k_tile(factory_args(use)[4]) % (threads_y * TILE_N * self.X_RUN) == 0 else 1
        for block, run in ((dequant, 1), (xload, x_run)):
            _, ty, tx, vec = sch.split(sch.fuse(*sch.get_loops(block)[-2:]), [None, threads_y, TILE_N, run])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            if run > 1:
                sch.vectorize(vec)
        for name in ("init", "store"):
            ri, i = sch.get_loops(sch.get_sblock(name))[-2:]
            ty, j = sch.split(ri, [threads_y, self.THREAD_ROWS])  # (no reorder: opaque iters)
            sch.bind(ty, "threadIdx.y")
            sch.bind(i, "threadIdx.x")  # TILE_N outputs
            sch.unroll(j)
        kk, ri, i = sch.get_loops(sch.get_sblock("fma"))[-3:]
        ty, j = sch.split(ri, [threads_y, self.THREAD_ROWS])
        ko, ki = sch.split(kk, [None, self.X_RUN])
        sch.reorder(ty, i, ko, ki, j)  # threads outermost, each thread's K tile loop inside
        sch.bind(ty, "threadIdx.y")
        sch.bind(i, "threadIdx.x")
        sch.unroll(ki)
        sch.unroll(j)  # each weight read serves the thread's rows


WORD_BYTES = 4  # weights a quant word's bytes hold, one a byte in each part of a chunk


@dataclasses.dataclass(frozen=True)
class GroupedF16Knobs(Knobs):
    """row_splits: thread blocks sharing an (expert, output tile)'s row tiles (blockIdx.y: block
    j takes row tiles j, j + row_splits, ...; a block with none exits at once); warps_m: warps
    along the row tile (each row tile / 16 / warps_m WMMA fragments high; WARPS_N warps along
    the outputs); k_tile: weights of a K tile decoded into shared memory at once (a barrier pair
    each); word_runs: 1 a thread decodes the weights a quant word packs (Q4_K: a word's 4 bytes,
    low and high nibbles: 8 weights of 2 sub-blocks, constant shifts), 0 DEQUANT_RUN consecutive
    weights (a per-thread shift). All structural: they change the grid, the block, the shared
    tiles and the decode's loads."""

    row_splits: int
    warps_m: int
    k_tile: int
    word_runs: int


class _GroupedGemmF16CudaRule(_CudaRule):
    """The float16-operand grouped expert GEMMs (`moe_chunk.grouped_gemm_f16`,
    `grouped_gate_up_silu_f16`) on tensor cores: a block of warps_m x WARPS_N warps per (expert,
    64-output tile, share of the expert's row tiles: `GroupedF16Knobs`), and per row tile of the
    expert's sorted rows (a loop with the expert's trip count; 32 or 64 rows, the kernel's
    `moe_chunk.f16_row_tile`):
      - per K tile of k_tile weights the block decodes the tile's scales and mins, then its
        weights as float16, into shared memory ([weight, output, k]: gate and up side by side;
        a thread the weights of a quant word's run in every part of its chunk, or DEQUANT_RUN
        consecutive ones: word_runs), and gathers the row tile's x values into shared memory
        as float16 ([row, k], 4 a thread): each weight decoded once a row tile, each x value
        converted once;
      - each warp owns a (row tile / warps_m)-row x 32-output share of the tile (float32 WMMA
        accumulator fragments, registers across the K tiles) and per 16 of k loads its A and B
        fragments from shared memory and issues the 16x16x16 MMAs (TVM's WMMA intrinsics through
        `tensorize`, as dlight's MatmulTensorization);
      - the accumulators go to a shared float32 tile, and the block writes the rows the expert
        has (never a row past its count: those belong to the next expert), applying SiLU(gate)
        * up on the float32 sums in the fused form.
    The K tiles of weights and x are dynamic shared memory (52 KiB for gate/up at 64 rows and
    K tiles of 128), the scales, mins and sums static (TVM lays the sums over the mins: 34 KiB);
    the K tiles' rows are padded by 8 halves against bank conflicts. (The sums in the dynamic
    room too, TVM's merge gave them the float16 tiles' type and the WMMA store failed its
    pointer check.) Why the knobs (bench/NOTES.md, "Grouped expert GEMM v3"): one block per
    (expert, output tile) looped over all of the expert's 32-row tiles, so with routing as
    uneven as the synthetic model's (DRAM reads say ~30 of 128 experts a layer, up to the
    chunk's 512 rows for one) the most crowded expert's blocks ran up to 16 row tiles x 32 K
    tiles one after the other, each K tile two exposed global-load latencies and two barriers
    (~2.9 us a K tile: 1461 us a gate/up launch on an H100). row_splits deals a crowded
    expert's row tiles over blocks; 64-row tiles decode each weight once per 64 rows; larger K
    tiles halve the barriers and latencies per weight; word runs load a quant word once for
    all the weights it packs. Not done: double buffering the K tiles, the routing weight in
    the down's epilogue (moe_combine_residual applies it)."""

    family = "moe_chunk"
    knobs_type = GroupedF16Knobs
    enable_check = False  # the row tiles' trip count is read from `offsets`

    WARPS_N: ClassVar[int] = 2  # warps along the output tile (32 outputs each: 2 fragments)
    LANES: ClassVar[int] = 32
    # Consecutive weights a thread decodes: nvcc loads their shared quant words and their
    # sub-block's scale and min once (a Q4_K word holds 4 of them; a sub-block 16 or 32).
    DEQUANT_RUN: ClassVar[int] = 8
    ROW_SPLITS: ClassVar[tuple[int, ...]] = tuple(2**n for n in range(F16_ROW_SHARES.bit_length()))
    WARPS_M: ClassVar[tuple[int, ...]] = (1, 2, 4)
    K_TILES: ClassVar[tuple[int, ...]] = (64, 128, 256)

    def _shape(self, use: KernelUse) -> tuple[int, int, int, int]:
        """(weights, row tile, n, k) of the kernel."""
        args = factory_args(use)
        weights, first = (1, 1) if self.factory == "grouped_gemm_f16" else (2, 2)
        experts, rows, n, k = args[first:first + 4]
        explicit = args[first + 5 if weights == 2 else first + 4:]
        return weights, explicit[0] if explicit else f16_row_tile(rows, experts), n, k

    def shared_bytes(self, use: KernelUse, knobs: GroupedF16Knobs) -> tuple[int, int]:
        """At most a block's shared memory, (static, dynamic): the K tiles of x and weights
        (float16, rows padded by 8 halves; dynamic), the float32 sums and a scale and a min per
        16 weights (static: TVM may lay the sums over the mins, which this does not count on)."""
        weights, row_tile, _, _ = self._shape(use)
        tiles = 2 * (knobs.k_tile + 8) * (row_tile + weights * F16_TILE_N)
        sums = 4 * weights * row_tile * F16_TILE_N
        scales = 2 * 4 * weights * F16_TILE_N * max(1, knobs.k_tile // 16)
        return sums + scales, tiles

    def launches(self, use: KernelUse, knobs: GroupedF16Knobs, facts: ArchFacts) -> bool:
        """Whether a block of these knobs' shared memory can launch: within the 48 KiB a launch
        allows, or at 48 KiB or more dynamic (TVM's runtime then opts the launch in) and within
        the arch's opt-in limit (compiler/targets.py check_shared_memory checks the lowered kernel)."""
        static, dynamic = self.shared_bytes(use, knobs)
        plain = facts.shared_memory_per_block
        return static + dynamic <= plain or (dynamic >= plain and static + dynamic <= facts.shared_memory_optin_per_block)

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        """K tiles of K_TILES that divide k and whose shared memory a launch allows (`launches`;
        a k that none divides: the largest multiple of 16 that divides it under K_TILES[0])."""
        _, row_tile, _, k = self._shape(use)
        k_tiles = tuple(t for t in self.K_TILES if k % t == 0 and self.launches(use, GroupedF16Knobs(1, 1, t, 1), facts))
        return {"row_splits": self.ROW_SPLITS,
                "warps_m": tuple(w for w in self.WARPS_M if row_tile % (16 * w) == 0),
                "k_tile": k_tiles or (math.gcd(k, self.K_TILES[0]),),
                "word_runs": (0, 1)}

    def structural(self) -> tuple[str, ...]:
        return ("row_splits", "warps_m", "k_tile", "word_runs")

    def default(self, use: KernelUse, facts: ArchFacts) -> GroupedF16Knobs:
        """row_splits 4 with 64-row tiles and at most 16 output tiles (gate/up at 512 tokens: an
        expert that all of them chose, 8 row tiles, takes 2 a block), else 2 (the downs' 32
        output tiles already give an expert 32 blocks: 4 row tiles a block at most, and half
        the blocks that find no row tile; 128 tokens: 4 row tiles at most); a warp per 16 rows (8 warps at 64 rows: 16 warps an SM for gate/up, whose 87 KB
        of shared memory allow 2 blocks; 4 warps, 8 an SM, made 168 registers a thread);
        the largest K tile up to 128 whose shared memory a launch allows (`launches`: gate/up at
        32-row tiles and the downs at 64 take 64); word runs (sm_90 SASS a warp a
        K tile of gate/up: 659 instructions, 817 with runs of 8)."""
        _, row_tile, n, _ = self._shape(use)
        space = self.space(use, facts)
        splits = 4 if row_tile == F16_ROW_TILES[-1] and n // F16_TILE_N <= 16 else 2
        k_tile = max(t for t in space["k_tile"] if t <= 128)
        return GroupedF16Knobs(row_splits=splits, warps_m=row_tile // 16, k_tile=k_tile, word_runs=1)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

        assert isinstance(knobs, GroupedF16Knobs)
        k_tile = knobs.k_tile
        warps = knobs.warps_m * self.WARPS_N
        e, tile = sch.get_loops(sch.get_sblock("tile"))
        sch.bind(sch.fuse(e, tile), "blockIdx.x")
        if knobs.row_splits > 1:
            # thread block j takes the shares j, j + row_splits, ...: row tiles j, j + row_splits, ...
            shares, split = sch.split(sch.get_loops(sch.get_sblock("share"))[-1], [None, knobs.row_splits])
            sch.reorder(split, shares)
            sch.bind(split, "blockIdx.y")

        gemm = sch.get_sblock("gemm")
        g, i, j, kk = sch.get_loops(gemm)[-4:]
        i_warp, i_frag, i16 = sch.split(i, [knobs.warps_m, None, 16])
        j_warp, j_frag, j16 = sch.split(j, [self.WARPS_N, None, 16])
        k_outer, k_frag, k16 = sch.split(kk, [None, k_tile // 16, 16])
        sch.reorder(i_warp, j_warp, k_outer, k_frag, g, i_frag, j_frag, i16, j16, k16)
        mma = sch.blockize(i16)  # one 16x16x16 product
        warp = sch.fuse(i_warp, j_warp)
        sch.bind(warp, "threadIdx.y")

        # The accumulators: WMMA fragments (the warp's own), stored to the shared float32 tile
        # that the block's epilogue reads.
        frag_store = sch.cache_write(mma, 0, "wmma.accumulator")
        sch.set_scope(frag_store, 0, "shared")
        sch.reverse_compute_at(frag_store, warp)

        def read_index(block: Any, name: str) -> int:
            return next(n for n, r in enumerate(sch.get(block).reads) if r.source.name == name)

        a_frag = sch.cache_read(mma, read_index(mma, "xh"), "wmma.matrix_a")
        b_frag = sch.cache_read(mma, read_index(mma, "wh"), "wmma.matrix_b")
        sch.compute_at(a_frag, k_frag)
        sch.compute_at(b_frag, k_frag)
        init = sch.decompose_reduction(mma, k_outer)

        # The K tile's stages in shared memory, computed by the whole block (compute_at relaxes a
        # shared buffer's region over the warps: the block's tile), every thread a share.
        for name in ("dequant", "xload"):
            block = sch.get_sblock(name)
            sch.set_scope(block, 0, "shared.dyn")
            sch.compute_at(block, k_outer)
            # rows 8 halves (16 bytes) off a multiple of 16 apart: a fragment load's 16 rows on other banks
            sch.storage_align(block, 0, axis=-2, factor=16, offset=8)
        scale = sch.get_sblock("scale")
        for index in range(len(sch.get(scale).writes)):  # the scales, and the mins where a weight has them
            sch.set_scope(scale, index, "shared")
        sch.compute_at(scale, k_outer)
        def own_loops(name: str) -> list[LoopRV]:
            """The stage's loops under the K tile's (compute_at made no loop for a unit extent:
            the down's one weight)."""
            loops = sch.get_loops(sch.get_sblock(name))
            tile_loop = next(n for n, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(k_outer)))
            return loops[tile_loop + 1:]

        def spread(loops: list[LoopRV], run: int = 1) -> LoopRV:
            """The loops over the block's threads, `run` consecutive iterations a thread."""
            _, ty, tx, inner = sch.split(sch.fuse(*loops), [None, warps, self.LANES, run])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            return inner

        sch.unroll(spread(own_loops("scale")))
        own = own_loops("dequant")
        if len(own) == 3:
            # gate and up one after the other, that loop unrolled: each copy reads one weight's
            # words (a constant test), so nvcc shares a run's loads
            sch.unroll(own[0])
            own = own[1:]
        fmt = gemv_format(factory_args(use)[0])
        parts = min(fmt.parts, k_tile // fmt.sub)  # the sub-blocks of a chunk a K tile holds (0: under one)
        if knobs.word_runs and fmt.sub % WORD_BYTES == 0 and parts > 0:
            # k = (chunk, part, word, byte): a thread the WORD_BYTES weights of a word's run in
            # every part of its chunk, which K-quants pack in the same bytes (Q4_K: the low and
            # the high nibbles of a word's bytes), so the shifts are constants and a word is
            # loaded once for all of them
            output, kk = own
            chunk, part, word, byte = sch.split(kk, [None, parts, fmt.sub // WORD_BYTES, WORD_BYTES])
            sch.reorder(output, chunk, word, part, byte)
            runs, ty, tx = sch.split(sch.fuse(output, chunk, word), [None, warps, self.LANES])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.unroll(runs)
            sch.unroll(part)
            sch.vectorize(byte)
        else:
            sch.unroll(spread(own, self.DEQUANT_RUN))
        # x: 4 floats a thread (a 16-byte load, 8 bytes of float16 stored): the factory's k is a
        # multiple of 16, so the runs stay in a row and aligned
        sch.vectorize(spread(own_loops("xload"), 4))
        ri, i = sch.get_loops(sch.get_sblock("store"))[-2:]
        _, ty, tx = sch.split(sch.fuse(ri, i), [None, warps, self.LANES])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")

        intrins = get_wmma_intrin_group(load_scope="shared.dyn", store_scope="shared", in_dtype="float16",
                                        out_dtype="float32", trans_b=True)

        def tensorize_tiles(block: Any, name: str) -> None:
            """The block's last two loops cut into 16 x 16 tiles, each one intrinsic call."""
            rows, cols = sch.get_loops(block)[-2:]
            r0, r1 = sch.split(rows, [None, 16])
            c0, c1 = sch.split(cols, [None, 16])
            sch.reorder(r0, c0, r1, c1)
            sch.unroll(r0)
            sch.unroll(c0)
            sch.tensorize(r1, intrins[name])

        tensorize_tiles(a_frag, "load_a")
        tensorize_tiles(b_frag, "load_b")
        tensorize_tiles(frag_store, "store")
        sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrins["init"])
        sch.tensorize(sch.get_loops(gemm)[-3], intrins["compute"])


class GroupedGemmF16CudaRule(_GroupedGemmF16CudaRule):
    factory = "grouped_gemm_f16"


class GroupedGateUpSiluF16CudaRule(_GroupedGemmF16CudaRule):
    factory = "grouped_gate_up_silu_f16"


WARP_ROWS = 16  # rows of a tile a warp multiplies: one WMMA fragment high
P_UNROLL = 8  # P entries a thread computes side by side (of 32 a key tile at 64 rows x 64 keys)
PADDED_TILES = ("q_half", "k_half", "v_half", "p_half")  # the WMMA operands (S and P V: _tensorize_product)


def schedule_tensor_core_attention(sch: s_tir.Schedule, facts: ArchFacts, compact: bool = False) -> None:
    """`prefill_attention.causal_prefill_attention_half` on tensor cores: a thread block per
    (KV head, query tile), HALF_ROWS / WARP_ROWS warps (128 threads at 64 rows), warp w owning
    rows 16w .. 16w + 15 of both products.

    The two products are tensorized with TVM's WMMA intrinsics (s_tir/tensor_intrin/cuda.py:
    16x16x16, f16 in, f32 accumulators), the way dlight's MatmulTensorization does a GEMM
    (blockize the 16x16x16 inner loops, cache the operands into wmma.matrix_a / matrix_b
    fragments, cache_write the result into wmma.accumulator, decompose the init into a fill):
      - S = Q K^T: per key tile, warp w's 16 x 64 strip of S in 4 accumulators over D / 16
        k-steps (K read as a column-major B), stored to shared memory;
      - P V: 16 x D in D / 16 accumulators from 0 over the tile's 64 keys, stored to shared
        memory; the threads then do O = O alpha + P V element-wise. (A WMMA accumulator's
        elements have no documented row, so O alpha cannot be done on the fragment; and
        TVM 0.27 prints no layout for a load_matrix_sync into an accumulator, so O cannot be
        loaded into one from shared memory either.)
    Why tensorize rather than hand-written TIR: the factory stays the one definition (the CPU
    builds and checks the same blocks), and TVM places the barriers.

    Softmax by the block's threads: a thread per row for the tile's max and sum (each
    accumulated in a register by cache_write to local, then one shared store), every (row,
    key) for P, every (row, dim) for the Q load, K and V 8 halves (16 bytes) a thread a load
    (each key's row through the page table, 0 past the tile's keys), one key tile ahead into
    registers (the factory's k_next and v_next: 64 a thread), copied to shared memory at the top
    of the next tile, so no key tile waits out its loads' global latency. O is registers: thread = head dim,
    its 64 rows unrolled (indexed by constants), so the update O = O alpha + P V reads shared
    memory only. Shared memory: Q, S and the P V tile dynamic (50 KiB at D = 128: TVM merges
    them, P V reusing S's room), K, V, P and the row state static (44.3 KiB), so that the P
    step reads one kind and writes the other: TVM's barrier planner takes every dynamic buffer
    for one and would put a barrier in each iteration of a step that reads one and writes
    another; with K and V static it also puts none between P V and its store, nor at the top
    of the key loop (8 barriers a key tile, not 10). Every tile's rows are 16 bytes longer than
    its data (storage_align), so the 16 rows of a fragment load or store, and the rows that a
    row-per-thread step reads side by side, spread over the banks. ~94 KiB a block: two blocks
    an SM on an H100 / H200 (241 registers a thread on sm_90a, no spills). With 8 warps an SM
    nothing hides a step's latency, so the steps are unrolled for overlap: P's entries
    (P_UNROLL a thread side by side: their exp chains, exp2f's ex2 since session 11), the
    tile's max and sum (their loads), and pos and n_valid read once into registers
    (bench/NOTES.md, "Prefill attention at long context" and "Prefill attention v3"). The row
    state is one buffer a block (alpha, sum, max) because the planner cannot see through the
    let-bound (threadIdx.y, threadIdx.x) index that a row's thread writes and then reads its
    own slot.

    `compact` (the factory's compact form, the step variant attention_form): no read-ahead
    registers: K, and V after S = Q K^T, go from global memory straight to shared memory (8
    halves a thread a load, as above), V into K's room (TVM's StorageRewrite reuses it; the
    comment at the products says what that takes). P V a 64-column part at a time, its f32
    tile in S's room. O is registers
    as [part, row, column]: thread = (row half, column), its 32 rows of each part unrolled (64
    registers a thread at head dim 128, as above), every thread busy in each part's update.
    Q, K/V and S/P V dynamic (51 KiB at D = 128, enough dynamic memory for the launch rule
    below), P and the row state static (10.3 KiB): 61.3 KiB a block; with the factory's
    launch bound of 3 blocks an SM, 164 registers a thread on sm_90a (no spills): 3 blocks an SM
    on an H100 by both. The price: S stored a column at a time with a barrier before and after
    each store (18 barriers a key tile, not 8; bench/NOTES.md "Prefill attention v4").
    """
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    blk = sch.get_sblock
    kv, it = sch.get_loops(blk("tile"))
    sch.bind(sch.fuse(kv, it), "blockIdx.x")
    # K and V: static beside the read-ahead form's registers; the compact form's dynamic
    kv_scope = "shared.dyn" if compact else "shared"
    kv_tiles = (("k_load", "k_half", kv_scope), ("v_load", "v_half", kv_scope))
    kv_registers = () if compact else (("k_first", "k_next", "local"), ("v_first", "v_next", "local"))
    tiles = (("q_load", "q_half", "shared.dyn"), *kv_tiles, ("qk", "s", "shared.dyn"), ("pv", "pv", "shared.dyn"),
             *kv_registers, ("weight", "p_half", "shared"),
             ("acc_init", "acc", "local"), ("state_init", "row_max", "shared"),
             ("state_init", "row_sum", "shared"), ("tile_max", "tile_max", "shared"),
             ("tile_sum", "tile_sum", "shared"), ("alpha", "alpha", "shared"))
    # A block's static shared memory plus the dynamic part may exceed the arch's plain limit
    # (48 KiB) only when the launch raises it, which TVM's CUDA runtime does only for a dynamic
    # part of that much or more: below it, the static tiles go dynamic too (at head dim 64, 44
    # KiB of dynamic tiles and 10.3 KiB of static ones failed to launch on an H200:
    # CUDA_ERROR_INVALID_VALUE; compiler/targets.py check_shared_memory).
    plain = facts.shared_memory_per_block
    static_scope = "shared" if _dynamic_tile_bytes(sch, tiles) >= plain else "shared.dyn"
    for block, buffer, scope in tiles:
        b = blk(block)
        index = next(i for i, w in enumerate(sch.get(b).writes) if w.source.name == buffer)
        sch.set_scope(b, index, static_scope if scope == "shared" else scope)
        tile = sch.get(b).writes[index].source
        if buffer in PADDED_TILES:
            # rows 16 bytes longer: a fragment's 16 rows (and a row-per-thread step's rows) fall
            # on different banks, not all on one; fragment starts stay 32-byte aligned
            row = int(tile.shape[-1])
            sch.storage_align(b, index, axis=0, factor=row, offset=_row_padding(tile))
    rows = int(sch.get(sch.get_loops(blk("state_init"))[-1]).extent)
    warps = rows // WARP_ROWS
    _scalars_in_registers(sch, ("pos", "n_valid"))

    def spread(loops: list[LoopRV]) -> None:
        _, warp, lane = sch.split(sch.fuse(*loops) if len(loops) > 1 else loops[0], [None, warps, 32])
        sch.bind(warp, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")

    spread(sch.get_loops(blk("q_load"))[-2:])
    # P: the thread's (row, key) entries P_UNROLL at a time, unrolled, so that their loads and
    # exp chains overlap (a loop of one entry a trip waited out each chain's latency)
    spread(sch.get_loops(blk("weight"))[-2:])
    _, unrolled = sch.split(sch.get_loops(blk("weight"))[-3], [None, P_UNROLL])
    sch.unroll(unrolled)
    loads = ("k_load", "v_load") if compact else ("k_first", "v_first", "k_ahead", "v_ahead", "k_load", "v_load")
    for name in loads:
        # 8 halves (16 bytes) a thread a load, 16 lanes on a row's 256 bytes (coalesced; the
        # stores to shared memory conflict-free); a warp's loads in its own 16 rows, so that a
        # thread's part of the read-ahead tiles (K and V of the next key tile) is 64 registers
        warp, _, lane, vector = sch.split(sch.fuse(*sch.get_loops(blk(name))[-2:]), [warps, None, 32, 8])
        sch.bind(warp, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")
        sch.vectorize(vector)
    if compact:
        _output_by_row_groups(sch, warps * 32)
    else:
        for name in ("acc_init", "accumulate", "store"):  # O: thread = head dim, its rows unrolled (registers)
            r, d = sch.get_loops(blk(name))[-2:]
            sch.reorder(d, r)
            spread([d])
            sch.unroll(r)
    for name in ("state_init", "alpha", "sum_update", "max_update"):
        spread(sch.get_loops(blk(name))[-1:])
    for name in ("tile_max", "tile_sum"):  # a thread per row, the row's keys in a register
        block = blk(name)
        in_register = sch.cache_write(block, 0, "local")
        spread(sch.get_loops(block)[-2:-1])
        sch.reverse_compute_at(in_register, sch.get_loops(block)[-2])
        sch.unroll(sch.get_loops(block)[-1])  # the loads side by side, not a branch a key
    # the tile max's S row into registers 16 bytes a load first: 4 wavefronts a warp a load on
    # S's 68-float rows, not 4-way conflicts a key (not in the compact form: 64 more registers
    # a thread at the tile max, 237 against 201 on sm_90a)
    if not compact:
        block = blk("tile_max")
        s_tile = _read_index(sch, block, "s_shared.dyn")  # S as set_scope renamed it
        s_row = sch.cache_read(block, s_tile, "local", consumer_blocks=[block])
        sch.compute_at(s_row, sch.get_loops(block)[-2])
        sch.vectorize(sch.split(sch.get_loops(s_row)[-1], [None, 4])[1])
    for name, a_scope, b_transposed in (("qk", "shared.dyn", True), ("pv", static_scope, False)):
        def intrin(load_scope: str) -> dict[str, str]:
            return get_wmma_intrin_group(load_scope=load_scope, store_scope="shared.dyn", in_dtype="float16",
                                         out_dtype="float32", trans_b=b_transposed)  # noqa: B023

        # B (K or V) static, as the softmax's tiles (the compact form's: dynamic). The compact
        # form stores S a column at a time, in the statement that reads K's fragments, so that
        # TVM's StorageRewrite, which gives a new buffer the room of one freed by an earlier
        # statement, gives K's room to V (float16 too) rather than to S (float32: a
        # tvm_access_ptr of one dtype into the other's room fails to lower); its P V stores after
        # all its columns (4 accumulators live a part)
        _tensorize_product(sch, name, {**intrin("shared.dyn"), "load_a": intrin(a_scope)["load_a"],
                                       "load_b": intrin("shared.dyn" if compact else static_scope)["load_b"]},
                           store_each_column=(name == "pv") != compact)


def _output_by_row_groups(sch: s_tir.Schedule, threads: int) -> None:
    """The compact form's O ([part, row, column]) over the block's `threads`: thread = (row
    group, column), the group's rows and the parts unrolled, so a thread's O is registers
    indexed by constants (accumulate's part loop is P V's too: both unrolled)."""
    blk = sch.get_sblock
    for name in ("acc_init", "accumulate", "store"):
        part, r, d = sch.get_loops(blk(name))[-3:]
        columns = int(sch.get(d).extent)
        group, row = sch.split(r, [threads // columns, None])
        if name == "accumulate":
            sch.reorder(group, d, row)
        else:
            sch.reorder(group, d, part, row)
        _, warp, lane = sch.split(sch.fuse(group, d), [None, threads // 32, 32])
        sch.bind(warp, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")
        sch.unroll(row)
        sch.unroll(part)


def _scalars_in_registers(sch: s_tir.Schedule, names: tuple[str, ...]) -> None:
    """Each one-element parameter of `names` read once a thread into a register at the top of
    the tile, for every step that reads it (nvcc kept the causal mask's pos[0] a global load
    in each trip of the tile's max loop)."""
    tile = sch.get_sblock("tile")
    for name in names:
        readers = [b for b in sch.get_child_blocks(tile) if any(r.source.name == name for r in sch.get(b).reads)]
        sch.cache_read(readers[0], _read_index(sch, readers[0], name), "local", consumer_blocks=readers)


def _row_padding(tile: tvm.tirx.Buffer) -> int:
    """Elements that make a tile's row 16 bytes longer (storage_align's offset)."""
    return 16 // (tile.dtype.bits // 8)


def _dynamic_tile_bytes(sch: s_tir.Schedule, tiles: tuple[tuple[str, str, str], ...]) -> int:
    """Bytes of dynamic shared memory that the "shared.dyn" `tiles` take once TVM merges them
    (side by side, P V reusing S's room), every row 16 bytes longer (PADDED_TILES
    here, S and P V in _tensorize_product)."""
    sizes = {}
    for block, buffer, scope in tiles:
        if scope != "shared.dyn":
            continue
        tile = next(w.source for w in sch.get(sch.get_sblock(block)).writes if w.source.name == buffer)
        shape = [int(n) for n in tile.shape]
        shape[-1] += _row_padding(tile)
        sizes[buffer] = math.prod(shape) * tile.dtype.bits // 8
    return sum(sizes.values()) - min(sizes["s"], sizes["pv"])


def _tensorize_product(sch: s_tir.Schedule, name: str, intrin: dict[str, str],
                       store_each_column: bool = False) -> None:
    """Block `name`, C[i, j] (+)= A[i, k] B[k, j] (or B[j, k]: `intrin`'s choice) over shared
    memory, on WMMA fragments: i's 16-row fragments on threadIdx.y (a warp each), j and k
    serial; C's accumulators stored back to C's shared buffer, after all of a warp's j
    fragments or (`store_each_column`) each j fragment when done: one accumulator live, not
    all (P V's 8 at D = 128 are 64 registers a thread, which with the read-ahead K and V tiles
    left sm_120a 12 bytes of spills; its A fragments are then loaded again for each j)."""
    block = sch.get_sblock(name)
    i, j, k = sch.get_loops(block)[-3:]
    (i_o, i_i), (j_o, j_i), (k_o, k_i) = (sch.split(loop, [None, 16]) for loop in (i, j, k))
    sch.reorder(i_o, j_o, k_o, i_i, j_i, k_i)
    outer = sch.blockize(i_i)
    sch.bind(i_o, "threadIdx.y")
    a = sch.cache_read(outer, 0, "wmma.matrix_a", consumer_blocks=[outer])
    b = sch.cache_read(outer, 1, "wmma.matrix_b", consumer_blocks=[outer])
    sch.compute_at(a, k_o)
    sch.compute_at(b, k_o)
    store = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, j_o if store_each_column else i_o)
    si, sj = sch.get_loops(store)[-2:]
    (si_o, si_i), (sj_o, sj_i) = sch.split(si, [None, 16]), sch.split(sj, [None, 16])
    sch.reorder(si_o, sj_o, si_i, sj_i)
    init = sch.decompose_reduction(outer, k_o)
    sch.tensorize(sch.get_loops(a)[-2], intrin["load_a"])
    sch.tensorize(sch.get_loops(b)[-2], intrin["load_b"])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrin["init"])
    tile = sch.get(store).writes[0].source
    store = sch.blockize(si_i)
    sch.tensorize(store, intrin["store"])
    sch.storage_align(store, 0, axis=0, factor=int(tile.shape[-1]), offset=_row_padding(tile))  # as the PADDED_TILES
    sch.tensorize(sch.get_loops(sch.get_sblock(name))[-3], intrin["compute"])


class CausalPrefillAttentionCudaRule(_CudaRule):
    """A thread block per (KV head, query tile) (the kernel's tile: R = QUERY_TILE * G rows),
    a thread per entry of the [BK, R] score tile (512 at full size); the tile's
    flash-attention steps each spread over the block:
      - Q^T (scaled), the K and V tiles (widened from fp16), S (then P, in place) and the
        softmax state live in shared memory: Q once per block, K and V once per key tile
        (consecutive threads on consecutive head dims: coalesced);
      - S = Q K^T: thread t sums entry t over D. Its shared-memory slot is indexed by t alone,
        so TVM's barrier planner puts no barrier in the sum and nvcc keeps the partial sum in
        a register (the kernel writes P over S, so a cache_write cannot take S: two writers);
      - per-row bookkeeping (max, rescale factor, sum): a thread per row; P = exp(S - max):
        thread t, entry t;
      - the output accumulator is registers: thread (row group, d) owns column d of R * D /
        threads consecutive rows (8 at full size; 50 registers on sm_90a, no spills), so the
        rescale and O += P V need no exchange (each V[j, d] serves 8 rows, P rows are read
        as 16-byte broadcasts).
    TVM places the barriers between the steps (5 a key tile). The key loop's trip count
    depends on the tile (blockIdx) only, so every thread of a block reaches every barrier. At
    T = 128: NKV * T / QUERY_TILE = 128 blocks of 16 warps (the previous rule: a thread per
    tile, 128 threads in all, [R, D] in local memory). Per key tile a warp issues 256 FMAs
    and ~210 shared loads: shared-load bound, ~20 TFLOP/s at best on an H200. Not done: key
    tiles larger than the CPU's 16 (fewer barriers a key), register tiles of several S
    entries a thread (needs S apart from P in the kernel: the CPU measured slower so),
    splitting a tile's keys over blocks (T = 128 gives one block an SM). With float16 operands
    (the factory's half_operands) the tile goes to the tensor cores instead:
    `schedule_tensor_core_attention`."""

    family, factory = "prefill_attention", "causal_prefill_attention"
    enable_check = False  # the key loop's trip count is read from pos and n_valid

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        if len(use.args) > 6 and bool(use.args[6]):  # half_operands (and the compact form)
            schedule_tensor_core_attention(sch, facts, len(use.args) > 7 and bool(use.args[7]))
            return
        blk = sch.get_sblock
        kv, it = sch.get_loops(blk("tile"))
        sch.bind(sch.fuse(kv, it), "blockIdx.x")
        for block, buffer in (("q_load", "q_tile"), ("k_load", "k_tile"), ("v_load", "v_tile"), ("qk", "s"),
                              ("state_init", "row_max"), ("state_init", "row_sum"), ("max_init", "new_max"),
                              ("rescale_state", "alpha")):
            b = blk(block)
            sch.set_scope(b, next(i for i, w in enumerate(sch.get(b).writes) if w.source.name == buffer), "shared")
        d, jj, r = sch.get_loops(blk("qk"))[-3:]
        keys, rows, head_dim = (int(sch.get(loop).extent) for loop in (jj, r, d))
        threads = keys * rows
        if threads > facts.max_threads_per_block:
            raise SparkInferError(f"kernel {use.name}: a {keys} x {rows} score tile is more than a block's threads")

        def spread(loops: list[LoopRV]) -> LoopRV:
            return spread_over_threads(sch, loops, threads)

        for name in ("q_load", "k_load", "v_load", "weight"):
            spread(sch.get_loops(blk(name))[-2:])
        for name in ("state_init", "max_init", "rescale_state"):
            spread(sch.get_loops(blk(name))[-1:])
        for name in ("max", "sum"):  # loops (key, row): a thread per row, its keys serial
            spread(sch.get_loops(blk(name))[-1:])  # (the key loop stays outside: "max" has an opaque iter)
        # S: entry t's sum on thread t, the head dims serial (by 4: K's four are one 16-byte load)
        qk = blk("qk")
        sch.reorder(jj, r, d)
        spread([jj, r])
        sch.decompose_reduction(qk, d)
        sch.unroll(sch.split(d, [None, 4])[1])
        # The accumulator's blocks: thread = (row group, head dim), the group's rows unrolled
        # (registers)
        groups = max(1, threads // head_dim)

        def rows_by_thread(block: str) -> LoopRV:
            """Splits the block's row loop into (thread's group, row in the group) and binds
            (group, head dim); returns the row-in-group loop."""
            loops = sch.get_loops(blk(block))
            r, d = loops[-3] if block == "pv" else loops[-2], loops[-1]
            group, row = sch.split(r, [groups, None])
            if block == "pv":
                sch.reorder(group, d, loops[-2], row)
            else:
                sch.reorder(group, d, row)
            spread([group, d])
            sch.unroll(row)
            return row

        for name in ("acc_init", "rescale", "store", "pv"):
            rows_by_thread(name)
        sch.unroll(sch.get_loops(blk("pv"))[-2])  # the tile's keys


class CausalPrefillAttentionRegistersCudaRule(_CudaRule):
    """`prefill_attention.causal_prefill_attention_registers` (the step variant attention_form
    "registers"): the factory writes the kernel already scheduled (threads, mma.sync and ldmatrix
    on registers, shuffles; its docstring says why), so the rule leaves it as it is."""

    family, factory = "prefill_attention", "causal_prefill_attention_registers"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        pass


CUDA_RULES: tuple[ScheduleRule, ...] = (
    *DLIGHT_RULES,
    GemmCudaRule(),
    QkNormRopeKvAppendRowsCudaRule(),
    MoeCombineResidualCudaRule(),
    MoeSortCudaRule(),
    AdvanceChunkCudaRule(),
    AdvancePosCudaRule(),
    GroupedGemmCudaRule(),
    GroupedGemmF16CudaRule(),
    GroupedGateUpSiluF16CudaRule(),
    CausalPrefillAttentionCudaRule(),
    CausalPrefillAttentionRegistersCudaRule(),
)
