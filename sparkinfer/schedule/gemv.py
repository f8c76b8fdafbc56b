"""Hand-made GPU schedule for the dequantizing GEMV of `sparkinfer.kernels.gemv`.

Layout of the work (same for the plain and the MoE form, whose expert slot is blockIdx.y):
  - a row of W is shared by `lanes` threads (threadIdx.x); lane t takes chunks t, t+lanes, ...
    so a warp sweeps consecutive bytes of a row (or of 32/lanes rows) together;
  - `rows` thread rows per block (threadIdx.y), each thread working on `rows_per_thread` rows
    at once so that the x it loaded serves them all;
  - per chunk, a lane loads the chunk's quant bytes into registers (16-byte loads where the
    format keeps chunks 16-byte aligned), loads the matching x as float4, forms the
    sub-block dot products and x sums, and decodes each sub-block's scale and min once;
  - the lanes' partial sums (rfactor) meet in a warp-shuffle allreduce;
  - the normed forms first normalize h into shared memory, once per thread block
    (`normalize_in_shared`); the residual form adds r to each row's sum in registers.

Measured on an H200 with ncu, L2 flushed, default schedules: 4096x2048 Q4_K 6.9 us,
2048x4096 Q4_K 9.2 us, 8 of 128 experts 768x2048 Q4_K 8.7 us, 8 experts 2048x768 Q6_K
13.7 us, lm_head 151936x2048 Q6_K 203 us (1.26 TB/s). Small GEMVs are latency-bound
(a few MB per kernel); the Q6_K path (2-byte loads, 2-byte aligned blocks) is the slowest.
"""

from collections.abc import Callable
from dataclasses import dataclass
from abc import abstractmethod
from typing import Any

from gguf import GGMLQuantizationType
from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.s_tir.schedule import _ffi_api as _schedule_ffi
from tvm.tirx import IndexMap

from sparkinfer.kernels.gemv import GemvFormat, gemv_format
from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts, floor_pow2
from sparkinfer.schedule.space import Knobs, ScheduleRule

_T = GGMLQuantizationType

# Formats whose per-chunk quant bytes are one contiguous, 16-byte aligned run of words that
# the dot block alone reads (Q4_K: 32 QS bytes at 16 + 32*c of a 144-byte block; floats: 16
# bytes; planar Q6_K: its 96-byte run at 96*c). Q5_K's chunk also needs QH (two runs), GGUF
# Q6_K and Q8_0 blocks are 2-byte aligned only.
VECTOR_CHUNKS = frozenset({_T.Q4_K, _T.F16, _T.BF16, _T.F32})


def vector_chunks(fmt: GemvFormat) -> bool:
    """Whether a lane loads its chunk's quant bytes in 16-byte loads (VECTOR_CHUNKS)."""
    return fmt.planar or fmt.ggml_type in VECTOR_CHUNKS
VECTOR_BYTES = 16
WARP = 32
# Threads a block aims at by default: 4 warps.
BLOCK_THREADS = 128
# Explicit-unroll budgets (statements) of a lane's chunk loop; 256 is the default.
UNROLL_STEPS = (16, 64, 256, 1024)
DEFAULT_UNROLL = 256


def powers_of_two(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... <= limit."""
    return tuple(1 << i for i in range(max(1, limit).bit_length()))


def min_blocks(facts: ArchFacts) -> int:
    """Blocks a GEMV needs to have enough loads in flight to cover DRAM latency: two per SM
    (a power of two: 256 on the H100/H200's 132 SMs, where this was measured)."""
    return floor_pow2(2 * facts.sms)


def min_short_blocks(facts: ArchFacts) -> int:
    """Blocks a short GEMV (the MoE router's 128 rows) keeps by taking thinner blocks: one
    per SM (a power of two: 128 on 132 SMs)."""
    return floor_pow2(facts.sms)


@dataclass(frozen=True)
class GemvKnobs(Knobs):
    """lanes: threads per row (threadIdx.x); rows: thread rows per block (threadIdx.y);
    rows_per_thread: rows each thread works on at once, sharing the x it loaded (a block
    covers rows * rows_per_thread rows; structural: whether the row loop exists); unroll:
    explicit-unroll budget (statements) for a lane's loop over its chunks; vector_header: 1 to
    load each row-chunk's K-quant block header (d, dmin, scales) in one 16-byte load into
    registers (`header_in_registers`), 0 to let the scale decoders read its words where they
    use them (structural)."""

    lanes: Any
    rows: Any
    rows_per_thread: int
    unroll: Any
    vector_header: int


def even_lanes(*chunk_counts: int) -> int:
    """The most lanes (a power of two, up to a warp) that split every reduction's chunk
    count evenly, so no lane idles on a tail."""
    lanes = 1
    while lanes < WARP and all(c % (lanes * 2) == 0 for c in chunk_counts):
        lanes *= 2
    return lanes


def lanes_rows_space(*chunk_counts: int, wide: tuple[int, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Lanes that split every chunk count evenly (powers of two up to a warp, then the `wide`
    counts), and thread rows that keep a block within 1024 threads at the most lanes."""
    lanes = (*powers_of_two(even_lanes(*chunk_counts)), *wide)
    return {"lanes": lanes, "rows": powers_of_two(1024 // max(lanes))}


# A thread's weight words a chunk, over all its rows, that every dense form holds without
# spilling (ptxas gives each word a register, Q6_K's and Q8_0's 2-byte words too). sm_90 ptxas
# (bench/NOTES.md, "Dense GEMVs: x shared across rows"): Q4_K 4 x 9 words 96 registers, Q5_K
# 4 x 11 167, planar Q6_K 4 x 27 168, Q6_K 2 x 53 166, but Q6_K 4 x 53 255 and 72 bytes of spills
# (the 151936-row LM head's old default).
THREAD_CHUNK_WORDS = 128
# How far above the mean (over the SMs) a GEMV's busiest SM may work before it takes thinner
# blocks (`default_knobs`).
MAX_BUSIEST_SM_SHARE = 1.125


def chunk_bytes(fmt: GemvFormat) -> int:
    """The weight bytes of one chunk of a row (what a lane loads per row and chunk)."""
    return fmt.block_bytes * fmt.chunk // fmt.block_size


def chunk_words(fmt: GemvFormat) -> int:
    """The weight words of one chunk of a row (what a lane holds in registers per row and chunk)."""
    return -(-chunk_bytes(fmt) // fmt.word_bytes)


def busiest_sm_rows(facts: ArchFacts, n_rows: int, block_rows: int) -> int:
    """The rows of the busiest SM when `n_rows` rows go out in blocks of `block_rows`, spread
    evenly over the SMs."""
    blocks = -(-n_rows // block_rows)
    return -(-blocks // facts.sms) * block_rows


def most_rows_per_thread(facts: ArchFacts, n_rows: int, rows: int, fits: Callable[[int], bool]) -> int:
    """The most rows a thread works on (up to 4) that still leaves min_blocks blocks of `rows`
    thread rows over `n_rows` rows, and that `fits(rows_per_thread)` a thread's registers.
    Sharing x across rows cut a 4096x2048 Q4_K GEMV from 11.5 to 7.1 us and the 151936x2048
    Q6_K lm_head from 380 to 207 us on an H200, but fewer blocks than that starve the memory
    system (2048x4096 Q4_K: 8.8 us at 256 blocks, 10.6 at 128)."""
    per_thread = 1
    while per_thread < 4 and n_rows // (rows * per_thread * 2) >= min_blocks(facts) and fits(per_thread * 2):
        per_thread *= 2
    return per_thread


def default_knobs(facts: ArchFacts, weight_format: int, n: int, k: int, batch: int = 1,
                  vector_header: bool = False) -> GemvKnobs:
    """For `batch` GEMVs of n rows (the MoE slots) of k weights; `vector_header` where the
    rule's layout can take it.

    lanes: the most (up to a warp) that split a row's chunks evenly, so no lane idles on a
    tail; rows: enough for BLOCK_THREADS threads a block, halved while that leaves fewer than
    min_short_blocks (the F32 router, 128 x 2048, ran as 32 blocks on 32 of the H100's 132
    SMs: 5.7 us for 1 MB); rows_per_thread: `most_rows_per_thread` within THREAD_CHUNK_WORDS.

    Then, where the grid has min_blocks, x is shared by as many rows as the registers allow: a
    block keeps its rows (so its count of blocks) while a thread takes twice the rows and the
    block half the thread rows, down to a warp (a short GEMV keeps its warps). Each row
    re-reading its chunk of x (4 bytes a weight against Q4_K's 0.56, 32 L1 wavefronts a float4
    load) kept these kernels waiting on L1 with DRAM at 12-21 % (bench/NOTES.md).

    Last, the most thread rows a block (down to a warp) that keep the busiest SM's rows within
    MAX_BUSIEST_SM_SHARE of the mean, or where none does the fewest: waiting on L1, the SM with
    the most blocks sets the time (Q/K/V's 320 blocks of 16 rows on 132 SMs put 3 on some
    where the mean is 2.4; 640 of 8, 5 of 4.8).
    """
    fmt = gemv_format(weight_format)
    n_rows = batch * n
    lanes = even_lanes(k // fmt.chunk)
    rows = max(1, BLOCK_THREADS // lanes)
    while rows > 1 and n_rows // rows < min_short_blocks(facts):
        rows //= 2

    def fits(per_thread: int) -> bool:
        return per_thread * chunk_words(fmt) <= THREAD_CHUNK_WORDS

    per_thread = most_rows_per_thread(facts, n_rows, rows, fits)
    warp_rows = max(1, WARP // lanes)
    while (per_thread < 4 and rows > warp_rows and fits(per_thread * 2)
           and n_rows // (rows * per_thread) >= min_blocks(facts)):
        rows, per_thread = rows // 2, per_thread * 2
    thinner = [rows >> i for i in range(rows.bit_length()) if rows >> i >= warp_rows] or [rows]

    def busiest(r: int) -> int:
        return busiest_sm_rows(facts, n_rows, r * per_thread)

    balanced = [r for r in thinner if busiest(r) <= MAX_BUSIEST_SM_SHARE * n_rows / facts.sms]
    rows = balanced[0] if balanced else min(thinner, key=lambda r: (busiest(r), -r))
    return GemvKnobs(lanes=lanes, rows=rows, rows_per_thread=per_thread, unroll=DEFAULT_UNROLL,
                     vector_header=int(vector_header))


def stage_names(sch: s_tir.Schedule) -> list[str]:
    """The names of the PrimFunc's stages (the root block's children), in order."""
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


def loops_below(sch: s_tir.Schedule, block: SBlockRV, loop: LoopRV) -> list[LoopRV]:
    """The loops of `block` nested inside `loop`, outermost first."""
    loops = sch.get_loops(block)
    anchor = sch.get(loop)
    index = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(anchor))
    return loops[index + 1 :]


def _read_index(sch: s_tir.Schedule, block: SBlockRV, buffer: str) -> int:
    reads = sch.get(block).reads
    return next(i for i, region in enumerate(reads) if region.source.name == buffer)


def cache_in_registers(
    sch: s_tir.Schedule, consumers: list[SBlockRV], buffer: str, at: LoopRV, vector: int
) -> None:
    """Copy what `consumers` read of `buffer` under loop `at` into registers, `vector`
    elements per load, all copy loops unrolled so that every index is a constant."""
    cache = sch.cache_read(consumers[0], _read_index(sch, consumers[0], buffer), "local",
                           consumer_blocks=consumers)
    sch.compute_at(cache, at)
    *outer, inner = loops_below(sch, cache, at)
    rest, vec = sch.split(inner, [None, vector])
    sch.vectorize(vec)
    for loop in (*outer, rest):
        sch.unroll(loop)


def cache_chunk_in_registers(
    sch: s_tir.Schedule, fmt: GemvFormat, dot: SBlockRV, xsum: SBlockRV | None, it: LoopRV,
    weight: str, x: str, part: LoopRV,
) -> None:
    """Registers for a lane's chunk (loop `it`) of a dequantizing dot product: the chunk's
    quant bytes of `weight` in vector loads where the format allows, and `x` (4 bytes a
    weight) a whole chunk at a time where `xsum` shares it, else one sub-block at a time
    under `part` (the dot's part loop, or `it` for a one-part format), to stay inside the
    register file."""
    if vector_chunks(fmt):
        cache_in_registers(sch, [dot], weight, it, VECTOR_BYTES // fmt.word_bytes)
    if xsum is None:
        cache_in_registers(sch, [dot], x, part, 4)
    else:
        cache_in_registers(sch, [dot, xsum], x, it, 4)


def has_vector_header(fmt: GemvFormat) -> bool:
    """Whether the scale decoders read only a 16-byte aligned 16-byte header of each block:
    Q4_K and Q5_K (d, dmin and 12 scale bytes at the start of 144 and 176-byte blocks)."""
    return not fmt.planar and fmt.ggml_type in (_T.Q4_K, _T.Q5_K)


HEADER_WORDS = 4  # a K-quant block header's 16 bytes in uint32 words


def declare_header_reads(sch: s_tir.Schedule, fmt: GemvFormat, reduction: SBlockRV, weight: str) -> None:
    """Declare that `reduction` (a GEMV's scaling reduction, its chunk the next-to-last iter
    var, before its chunk loop is split) reads of `weight` only the header of each chunk's
    block, which is what its scale decoders read (`has_vector_header` formats): in the last
    dimension, where the other dimensions (row, expert) keep their regions. TVM's own region
    of those reads, a Select on the sub-block index, gets a lane-dependent extent once the
    chunks are split over lanes, which no register cache can take (bench/NOTES.md, "Dense
    GEMVs: x shared across rows"). Declared on the unsplit block, the region holds for any
    lanes a design space draws. TVM 0.27's Python `annotate_buffer_access` wants one range per
    iter var, not per buffer dimension, so this calls the schedule primitive itself."""
    block = sch.get(reduction)
    iter_vars = [iv.var for iv in block.iter_vars]
    index = _read_index(sch, reduction, weight)
    base = iter_vars[-2] // (fmt.block_size // fmt.chunk) * (fmt.block_bytes // fmt.word_bytes)
    kept = [bound for r in block.reads[index].region[:-1] for bound in (r.min, r.min + r.extent)]
    region = IndexMap(initial_indices=iter_vars, final_indices=[*kept, base, base + HEADER_WORDS],
                      inverse_index_map=None)
    _schedule_ffi.ScheduleAnnotateBufferAccess(sch, reduction, index, 0, region)


def header_in_registers(sch: s_tir.Schedule, partial: SBlockRV, row: LoopRV, weight: str) -> None:
    """The header `declare_header_reads` declared, in registers under the lanes' partial sums'
    row loop `row`: one 16-byte load a row and chunk, where the decoders' own reads are 7
    32-bit loads (SASS, bench/NOTES.md)."""
    cache = sch.cache_read(partial, _read_index(sch, partial, weight), "local", consumer_blocks=[partial])
    sch.compute_at(cache, row)
    *outer, inner = loops_below(sch, cache, row)
    rest, vec = sch.split(inner, [None, HEADER_WORDS])
    sch.vectorize(vec)
    for loop in (*outer, rest):
        sch.unroll(loop)


def unroll_chunk_loop(sch: s_tir.Schedule, it: LoopRV, blocks: list[SBlockRV], unroll: int) -> None:
    """Unroll every loop of `blocks` inside a lane's chunk loop `it`, and `it` itself
    explicitly up to `unroll` statements."""
    for block in blocks:
        for loop in loops_below(sch, block, it):
            sch.unroll(loop)
    sch.annotate(it, "pragma_auto_unroll_max_step", unroll)
    sch.annotate(it, "pragma_unroll_explicit", 1)


def x_buffer(normed: bool) -> str:
    """The buffer a GEMV's dot products read x from: the parameter x, or in the normed forms
    (`kernels.gemv.gemv_normed`) the prologue's stage norm."""
    return "norm" if normed else "x"


# What a normed GEMV's thread blocks compute before their dots: (schedule, the blockIdx loop, its
# threads' (threadIdx.y, threadIdx.x) extents) -> None.
Prologue = Callable[[s_tir.Schedule, LoopRV, tuple[Any, Any]], None]


def normalize_in_shared(sch: s_tir.Schedule, at: LoopRV, threads: tuple[Any, Any]) -> None:
    """The normed forms' prologue (stages sumsq and norm, `kernels.norm.normalize`) once per
    thread block, under its blockIdx loop `at`: x = rmsnorm(h) * w into shared memory, the
    block's threads (threadIdx.y, threadIdx.x extents `threads`) each taking every
    (rows * lanes)-th element, unrolled, the sum of squares a block-wide allreduce. Every block
    reads h and w (2 * 4 * H bytes, from L2 after the first) for a launch less per norm."""
    sumsq, norm = sch.get_sblock("sumsq"), sch.get_sblock("norm")
    sch.compute_at(norm, at)
    sch.compute_at(sumsq, at)
    for block in (sumsq, norm):
        (loop,) = loops_below(sch, block, at)
        each, ty, tx = sch.split(loop, [None, *threads])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        # unrolled, so that a thread's loads of h and w are all in flight at once: a loop
        # waits for each before the next (16 values a thread at 128 threads: ~16 L2 round trips,
        # ~10 µs a block on an H200, bench/NOTES.md "Session 25")
        sch.unroll(each)
    sch.set_scope(sumsq, 0, "local")  # the allreduce leaves the sum in every thread
    sch.set_scope(norm, 0, "shared")


def schedule_gemv(sch: s_tir.Schedule, fmt: GemvFormat, knobs: GemvKnobs, normed: bool = False,
                   residual: bool = False) -> None:
    """A `gemv` PrimFunc (or its normed / residual form) for a CUDA target; the residual add
    runs right after each row's warp reduction, on the sum in registers."""

    def cache_weight(dot: SBlockRV, xsum: SBlockRV | None, it: LoopRV, part: LoopRV) -> None:
        cache_chunk_in_registers(sch, fmt, dot, xsum, it, "W", x_buffer(normed), part)

    gemv, row = _schedule_rows(sch, fmt, knobs, cache_weight, normalize_in_shared if normed else None)
    if residual:
        sch.set_scope(gemv, 0, "local")
        sch.reverse_compute_at(sch.get_sblock("residual"), row)


def schedule_gemv_qkv(sch: s_tir.Schedule, fmt: GemvFormat, knobs: GemvKnobs, x: str,
                      prologue: "Prologue | None" = None) -> None:
    """A `gemv_qkv` PrimFunc (Q, K and V, or Q and K, in one launch; or its int8 form, whose dot
    products read `x` "xq", or "words" where its `prologue` quantizes) for CUDA: the
    `schedule_gemv` layout over the concatenated row space. The `W` stage (row r of Wq, Wk or Wv, picked by a lazy select on r) becomes the
    lane's register copy of its chunk, in 16-byte loads where the format allows, else is
    inlined into the dot; each output copy runs right after its row's warp reduction,
    predicated to the rows it owns."""
    w = sch.get_sblock("W")

    def cache_weight(dot: SBlockRV, xsum: SBlockRV | None, it: LoopRV, part: LoopRV) -> None:
        if vector_chunks(fmt):
            sch.compute_at(w, it)
            sch.set_scope(w, 0, "local")
            *outer, inner = loops_below(sch, w, it)
            rest, vec = sch.split(inner, [None, VECTOR_BYTES // fmt.word_bytes])
            sch.vectorize(vec)
            for loop in (*outer, rest):
                sch.unroll(loop)
        else:
            sch.compute_inline(w)
        if xsum is None:
            cache_in_registers(sch, [dot], x, part, 4)
        else:
            cache_in_registers(sch, [dot, xsum], x, it, 4)

    gemv, row = _schedule_rows(sch, fmt, knobs, cache_weight, prologue)
    # The sum stays in the thread's registers; q/k/v copy it out under the row loop.
    sch.set_scope(gemv, 0, "local")
    stages = stage_names(sch)
    for name in ("q", "k", "v"):
        if name in stages:  # no v in the n_v = 0 form
            sch.reverse_compute_at(sch.get_sblock(name), row)


class _GemvCudaRule(ScheduleRule):
    """The GEMV layout of the module docstring, for the factories whose kernels it fits."""

    target_kind = "cuda"
    family = "gemv"
    knobs_type = GemvKnobs


    @abstractmethod
    def shape(self, use: KernelUse) -> tuple[int, int, int, int]:
        """(ggml_type, rows n, row length k, batch of GEMVs) of the kernel."""

    def vector_header(self, use: KernelUse) -> bool:
        """Whether the kernel's layout can load its blocks' headers in 16 bytes (the plain,
        normed and residual forms of `has_vector_header` formats)."""
        return has_vector_header(gemv_format(self.shape(use)[0]))

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        ggml_type, _, k, _ = self.shape(use)
        return {**lanes_rows_space(k // gemv_format(ggml_type).chunk),
                "rows_per_thread": (1, 2, 4), "unroll": UNROLL_STEPS,
                "vector_header": (0, 1) if self.vector_header(use) else (0,)}

    def structural(self) -> tuple[str, ...]:
        return ("rows_per_thread", "vector_header")

    def default(self, use: KernelUse, facts: ArchFacts) -> GemvKnobs:
        return default_knobs(facts, *self.shape(use), vector_header=self.vector_header(use))

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, GemvKnobs)
        schedule_gemv(sch, gemv_format(self.shape(use)[0]), knobs)


class GemvCudaRule(_GemvCudaRule):
    factory = "gemv"

    def shape(self, use: KernelUse) -> tuple[int, int, int, int]:
        ggml_type, n, k = factory_args(use)
        return ggml_type, n, k, 1


class GemvQkvCudaRule(_GemvCudaRule):
    factory = "gemv_qkv"

    def vector_header(self, use: KernelUse) -> bool:
        return False  # its scale decoders read the W stage, a select over Wq, Wk and Wv

    def shape(self, use: KernelUse) -> tuple[int, int, int, int]:
        ggml_type, n_q, n_k, n_v, k = factory_args(use)
        return ggml_type, n_q + n_k + n_v, k, 1

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, GemvKnobs)
        schedule_gemv_qkv(sch, gemv_format(self.shape(use)[0]), knobs, x_buffer(False))


class GemvNormedCudaRule(GemvCudaRule):
    """`gemv_normed`: the GEMV layout, the norm computed first by each thread block."""

    factory = "gemv_normed"

    def shape(self, use: KernelUse) -> tuple[int, int, int, int]:
        ggml_type, n, k, _ = factory_args(use)
        return ggml_type, n, k, 1

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, GemvKnobs)
        schedule_gemv(sch, gemv_format(self.shape(use)[0]), knobs, normed=True)


class GemvResidualCudaRule(GemvCudaRule):
    """`gemv_residual`: the GEMV layout, the residual added to each row's sum in registers."""

    factory = "gemv_residual"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, GemvKnobs)
        schedule_gemv(sch, gemv_format(self.shape(use)[0]), knobs, residual=True)


class GemvQkvNormedCudaRule(GemvQkvCudaRule):
    """`gemv_qkv_normed`: the `gemv_qkv` layout, the norm computed first by each thread block."""

    factory = "gemv_qkv_normed"

    def shape(self, use: KernelUse) -> tuple[int, int, int, int]:
        ggml_type, n_q, n_k, n_v, k, _ = factory_args(use)
        return ggml_type, n_q + n_k + n_v, k, 1

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, GemvKnobs)
        schedule_gemv_qkv(sch, gemv_format(self.shape(use)[0]), knobs, x_buffer(True), normalize_in_shared)


def thread_rows_in_registers(
    sch: s_tir.Schedule,
    fmt: GemvFormat,
    partial: SBlockRV,
    at: LoopRV,
    rows_per_thread: int,
    unroll: Any,
    producers: tuple[SBlockRV, SBlockRV | None],
    cache_weight: Callable[[SBlockRV, SBlockRV | None, LoopRV, LoopRV], None],
) -> None:
    """A thread's work under its threadIdx.y loop `at`: the lanes' partial sums (block
    `partial`, from rfactor of the lane loop) over its `rows_per_thread` rows, with the
    (dot, xsum) producers per chunk in registers and `cache_weight(dot, xsum, it, part)`
    putting a lane's chunk into registers."""
    dot, xsum = producers
    sch.compute_at(partial, at, preserve_unit_loops=True)
    # rfactor put the lane axis first, then the expert slot (MoE forms), row, chunk, part.
    lane, *_, row, it, part = loops_below(sch, partial, at)
    # Chunk loop outside the row loop: a chunk's x is loaded once for all the thread's rows.
    sch.reorder(it, row)
    sch.bind(lane, "threadIdx.x")
    sch.set_scope(partial, 0, "local")

    blocks = [dot] if xsum is None else [dot, xsum]
    for block in blocks:
        # Unit loops must go: a kept expert-slot loop under `it` would be relaxed when the
        # W cache's region is inferred, and ids[slot] then spans every expert (128x the
        # registers and the DRAM traffic).
        sch.compute_at(block, it, preserve_unit_loops=False)
        sch.set_scope(block, 0, "local")
    *dot_outer, _ = loops_below(sch, dot, it)  # [row if several][part if several], l
    dot_part = dot_outer[-1] if fmt.parts > 1 else None
    if dot_part is not None and rows_per_thread > 1:
        # x one sub-block at a time above the row loop, so the thread's rows share it.
        sch.reorder(dot_part, dot_outer[0])

    cache_weight(dot, xsum, it, it if dot_part is None else dot_part)
    unroll_chunk_loop(sch, it, [*blocks, partial], unroll)


def _schedule_rows(
    sch: s_tir.Schedule,
    fmt: GemvFormat,
    config: GemvKnobs,
    cache_weight: Callable[[SBlockRV, SBlockRV | None, LoopRV, LoopRV], None],
    prologue: "Prologue | None" = None,
) -> tuple[SBlockRV, LoopRV]:
    """The GEMV layout (module docstring) on blocks dot, xsum (K-quants) and gemv, with the
    normed forms' `prologue` per thread block (`normalize_in_shared`, or the int8 forms'
    `gemv_q8.quantize_normed_in_shared`);
    `cache_weight(dot, xsum, it, part)` puts a lane's chunk into registers, and
    `header_in_registers` each chunk's block header where the knobs say so. Returns the gemv
    block and its per-thread row loop."""
    dot, gemv = sch.get_sblock("dot"), sch.get_sblock("gemv")
    xsum = sch.get_sblock("xsum") if fmt.min is not None else None
    if config.vector_header:
        declare_header_reads(sch, fmt, gemv, "W")
    *_, n, c, p = sch.get_loops(gemv)

    # Lanes' partial sums go through rfactor: TIR's cross-thread reduction needs the
    # thread-bound reduction loop innermost, which a thread's own row loop would break.
    bx, ty, r = sch.split(n, [None, config.rows, config.rows_per_thread])
    it, tx = sch.split(c, [None, config.lanes])
    sch.reorder(bx, ty, tx, it, r, p)
    partial = sch.rfactor(tx, factor_axis=0)
    *final_lead, final_bx, final_ty, final_tx, final_r = sch.get_loops(gemv)
    sch.reorder(final_r, final_tx)
    for loop in final_lead:
        sch.bind(loop, "blockIdx.y")
    sch.bind(final_bx, "blockIdx.x")
    sch.bind(final_ty, "threadIdx.y")
    sch.bind(final_tx, "threadIdx.x")

    thread_rows_in_registers(sch, fmt, partial, final_ty, config.rows_per_thread, config.unroll,
                             (dot, xsum), cache_weight)
    if config.vector_header:
        # The partial sums' loops: lane, chunk, row, part.
        header_in_registers(sch, partial, sch.get_loops(partial)[-2], "W")
    if prologue is not None:
        prologue(sch, final_bx, (config.rows, config.lanes))
    return gemv, final_r
