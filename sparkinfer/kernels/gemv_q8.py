"""Int8-activation GEMVs: x quantized once to blocks of 32 int8 (llama.cpp's q8_1), then integer
dot products of the weights' quant codes with those int8 values, four at a time (`dp4a`).

`quantize_q8_1(k, rows)` turns x f32[(rows,) k] into
  xq int32[(rows,) k/4]  the int8 values q = round(x / d), four to a little-endian word
  xd f32[(rows,) k/32]   d = max|x| / 127 of each block of 32
  xs f32[(rows,) k/32]   d * sum(q) of each block: the block's sum of x as the GEMV sees it
so that x is approximated by x̂ = d * q. Every K-quant and Q8_0 sub-block lies inside one block
of 32 (Q6_K's sub-blocks of 16 are half of one), so a sub-block's contribution is

  xd[block] * (scale(W) * idot) + min(W) * xs[block]     (the min term only for Q4_K/Q5_K)

with idot the int32 sum over the sub-block of code * q, formed from packed words: a word of 4
weight codes (`_CODE_WORDS`, built from the GGUF bytes as they lie: Q4_K's 4 consecutive QS bytes
give 4 codes with one mask and shift; Q6_K also from its planar re-layout, Q6_K_PLANAR, whose
words are 4-byte aligned) against a word of 4 activations. The scale and min
decoders are the float GEMV's (`kernels.gemv.FORMATS`), applied once per sub-block.

`tirx.dp4a(a, b, acc)` (TVM's intrinsic: acc + the dot product of a's and b's 4 signed bytes)
carries the 4-wide product. TVM 0.27 lowers it for no target and its loop vectorizer scalarizes
any loop that holds it; this module marks it vectorizable and registers the lowerings
(`register_dp4a_lowering`): CUDA's `__dp4a` (one IDP4A instruction); for LLVM (the CPU), on
vectors of 4, 8 or 16 words the x86 VNNI `vpdpbusd` where the CPU has it (`_vnni_intrinsic`: one
where the weight codes' bytes are below 128, Q4_K's and Q5_K's, else two), else integer
arithmetic on sign-extended bytes, lane by lane in the vector registers.

The sums come in two forms (INT8_DOTS): each sub-block's dot product an int32 that its scale then
multiplies (`q8_terms`, every CUDA kernel), or the lane form (`q8_lane_sum`, the `_lanes`
factories, the cpu's), a lane per word of each block of 32 scaled and summed in float across the
whole row, the lanes reduced once a row.

Where a kernel makes the activations, it quantizes them itself, so that no launch is added:
`add_rms_norm_q8_1` and `rms_norm_q8_1` (the FFN's and the attention's input norms),
`attention_combine_q8_1` (the O projection's input) and `moe_q8.moe_gate_up_silu_q8` (the SiLU
activations); `gemv_qkv_q8` is `gemv.gemv_qkv` on int8 activations. `gemv_q8_normed` and
`gemv_qkv_q8_normed` normalize and quantize their input themselves, each thread block the
whole of it (`normed_q8_1_stages`): the attention input's norm without a launch of its own.
`round_q8_1_rows` gives the T-token step's float GEMMs the same values, x̂ = d * q, in float32.

The numpy oracle is exact in meaning: the float GEMV's reference on x̂
(`gemv_q8_reference`), since d * sum(q) is sum(x̂); the blocks' numpy definition is
`sparkinfer.quant.q8_1`.
"""

import functools
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType
from tvm import te, tirx

from sparkinfer.errors import TensorShapeError, UnsupportedQuantTypeError
from sparkinfer.kernels.attention import attention_combine_reference, combine_inputs, combine_splits
from sparkinfer.kernels.gemv import (
    GemvFormat,
    gemv_format,
    gemv_reference,
    qkv_outputs,
    qkv_row,
    qkv_row_space,
    qkv_rows,
)
from sparkinfer.kernels.norm import add_rms_norm_reference, inverse_rms, normalize, rms_norm_reference, sum_of_squares
from sparkinfer.quant import layouts as L
from sparkinfer.quant.q8_1 import (  # the numpy definition of the blocks, also the kernels' oracle
    Q8_BLOCK,
    Q8_MAX,
    check_k,
    dequantize_q8_1,
    quantize_q8_1_reference,
    round_q8_1_reference,
)

_T = GGMLQuantizationType
Expr = tirx.Expr
Row = Callable[[Expr], Expr]
# The int8 values a word holds.
WORD = 4


def _u32(v: int) -> Expr:
    return tirx.const(v, "uint32")


# ---------------------------------------------------------------------------------------
# dp4a: TVM's intrinsic, lowered per target
# ---------------------------------------------------------------------------------------


def _signed_byte(word: Expr, i: int) -> Expr:
    """Byte i of an int32 word, sign-extended (arithmetic shift right)."""
    return (word << tirx.const(24 - 8 * i, "int32")) >> tirx.const(24, "int32")


# Every byte of a word with only its top bit set: a ^ _TOP_BITS is a's signed bytes plus 128,
# as unsigned bytes.
_TOP_BITS = -0x7F7F7F80  # 0x80808080 as int32


@functools.cache
def _vnni_intrinsic(lanes: int) -> str | None:
    """The LLVM intrinsic of x86 `vpdpbusd` on `lanes` int32 lanes where the CPU the "cpu" arch
    compiles for has it (AVX512-VNNI with AVX512-VL: 4, 8 or 16 lanes; AVX-VNNI: 4 or 8), else
    None. That target is LLVM with -mcpu=<this CPU> (compiler.targets.target_for("cpu"), a layer
    this one may not import: docs/ARCHITECTURE.md). dp4a only occurs in the cpu arch's kernels
    and in CUDA device code, never in host code."""
    import tvm
    from tvm.target import codegen

    if lanes not in (4, 8, 16):
        return None
    cpu = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    if codegen.llvm_cpu_has_features(["avx512vnni", "avx512vl"], cpu):
        return f"llvm.x86.avx512.vpdpbusd.{lanes * 32}"
    if lanes < 16 and codegen.llvm_cpu_has_features(["avxvnni"], cpu):
        return f"llvm.x86.avxvnni.vpdpbusd.{lanes * 32}"
    return None


_ALL_BITS = 0xFFFFFFFF


def _bits_that_may_be_set(e: Expr) -> int:
    """The bits of the 32-bit word(s) e that may be 1, as far as its outermost masks, ors and
    constant shifts show (all 32 where they show nothing): enough to see that a weight format's
    code words (`_nibbles` & 0x0F0F0F0F, Q5_K's | its high bits) hold bytes below 128."""
    if isinstance(e, tirx.Broadcast):
        return _bits_that_may_be_set(e.value)
    if isinstance(e, tirx.IntImm):
        return int(e.value) & _ALL_BITS
    if isinstance(e, tirx.Cast) and e.ty.dtype.bits == 32 and e.value.ty.dtype.bits == 32:
        return _bits_that_may_be_set(e.value)
    if isinstance(e, tirx.BitwiseAnd):
        return _bits_that_may_be_set(e.a) & _bits_that_may_be_set(e.b)
    if isinstance(e, tirx.BitwiseOr):
        return _bits_that_may_be_set(e.a) | _bits_that_may_be_set(e.b)
    if isinstance(e, (tirx.LShift, tirx.RShift)):
        shift = e.b.value if isinstance(e.b, tirx.Broadcast) else e.b
        if isinstance(shift, tirx.IntImm):
            bits = _bits_that_may_be_set(e.a)
            if isinstance(e, tirx.LShift):
                return (bits << int(shift.value)) & _ALL_BITS
            if str(e.a.ty.dtype).startswith("uint") or not bits >> 31:  # no sign bit to shift in
                return bits >> int(shift.value)
    return _ALL_BITS


def _dp4a_llvm(call: Expr) -> Expr:
    a, b, acc = call.args
    lanes = call.ty.dtype.lanes
    intrinsic = _vnni_intrinsic(lanes)
    if intrinsic is None:
        total = acc
        for i in range(WORD):
            total = total + _signed_byte(a, i) * _signed_byte(b, i)
        return total
    word, word_bytes = f"int32x{lanes}", f"int8x{lanes * WORD}"
    b_bytes = tirx.reinterpret(word_bytes, b)
    if not _bits_that_may_be_set(a) & 0x80808080:
        # a's bytes are below 128 (Q4_K's and Q5_K's codes): signed and unsigned alike, one vpdpbusd
        return tirx.call_llvm_pure_intrin(word, intrinsic, acc, tirx.reinterpret(word_bytes, a), b_bytes)
    # vpdpbusd multiplies unsigned bytes by signed ones: a's bytes go in offset by 128, and the
    # 128 * sum(b) this adds comes off with a second vpdpbusd. Exact: each product fits the
    # instruction's int16 intermediates (255 * -128 >= -2^15) and the sums are int32, unsaturated.
    top_bits = tirx.Broadcast(tirx.const(_TOP_BITS, "int32"), lanes)
    zero = tirx.Broadcast(tirx.const(0, "int32"), lanes)
    offset = tirx.call_llvm_pure_intrin(word, intrinsic, acc, tirx.reinterpret(word_bytes, a ^ top_bits), b_bytes)
    return offset - tirx.call_llvm_pure_intrin(word, intrinsic, zero, tirx.reinterpret(word_bytes, top_bits), b_bytes)


def _dp4a_cuda(call: Expr) -> Expr:
    lanes = call.ty.dtype.lanes
    if lanes != 1:
        raise ValueError(f"dp4a on {lanes} lanes in CUDA code: __dp4a takes one word; "
                         f"a CUDA schedule must not vectorize a loop of dp4a")
    return tirx.call_pure_extern("int32", "__dp4a", *call.args)


@functools.cache
def register_dp4a_lowering() -> None:
    """Lowerings of `tirx.dp4a` for LLVM and CUDA, registered once per process, by the first
    kernel that uses the op (not on import: runtime-only TVM, on the GPU machine, has no op
    registry, and the runtime imports this module for ACTIVATIONS); and the op marked
    vectorizable (the CPU rules vectorize their dots over words, `schedule.cpu.vectorized_dots`)."""
    from tvm.ir import Op

    op = Op.get("tirx.dp4a")
    for target, lower in (("llvm", _dp4a_llvm), ("cuda", _dp4a_cuda)):
        if op.get_attr(f"{target}.FLowerIntrinsic") is None:
            tirx.op.register_intrin_lowering("tirx.dp4a", target, f=lower)
    if not op.get_attr("TVectorizable"):
        op.set_attr("TVectorizable", True)


def dp4a(a: Expr, b: Expr) -> Expr:
    """The int32 dot product of the 4 signed bytes of words a and b."""
    register_dp4a_lowering()
    return tirx.dp4a(a.astype("int32"), b.astype("int32"), tirx.const(0, "int32"))


# ---------------------------------------------------------------------------------------
# Weight codes, four to a word, straight from the GGUF bytes (layouts in quant/layouts.py)
# ---------------------------------------------------------------------------------------


def _word_at(row: Row, word_bytes: int, byte: Expr) -> Expr:
    """The little-endian uint32 at byte offset `byte` of the row (a multiple of word_bytes)."""
    if word_bytes == 4:
        return row(byte // 4).astype("uint32")
    low = row(byte // 2).astype("uint32")
    return low | (row(byte // 2 + 1).astype("uint32") << _u32(16))


def _nibbles(word: Expr, high: Expr) -> Expr:
    """The low (high = 0) or high (high = 1) nibbles of a word's 4 bytes, one per byte."""
    return (word >> (high.astype("uint32") * _u32(4))) & _u32(0x0F0F0F0F)


def _k_nibble_word(type_size: int, qs: L.Span, row: Row, c: Expr, p: Expr, g: Expr) -> Expr:
    """Q4_K/Q5_K: chunk c (64 weights) of block c//4 holds sub-block 2(c%4)+p in the low (p=0)
    or high (p=1) nibbles of QS bytes 32(c%4)..; word g covers weights 4g..4g+3."""
    byte = c // 4 * type_size + qs.start + c % 4 * 32 + g * WORD
    return _nibbles(_word_at(row, 4, byte), p)


def _q4_k_words(row: Row, c: Expr, p: Expr, g: Expr) -> Expr:
    return _k_nibble_word(L.Q4_K_TYPE_SIZE, L.Q4_K_QS, row, c, p, g)


def _q5_k_words(row: Row, c: Expr, p: Expr, g: Expr) -> Expr:
    low = _k_nibble_word(L.Q5_K_TYPE_SIZE, L.Q5_K_QS, row, c, p, g)
    qh = _word_at(row, 4, c // 4 * L.Q5_K_TYPE_SIZE + L.Q5_K_QH.start + g * WORD)
    sub_block = (c % 4 * 2 + p).astype("uint32")
    return low | (((qh >> sub_block) & _u32(0x01010101)) << _u32(4))


def _q6_k_words(row: Row, c: Expr, p: Expr, g: Expr) -> Expr:
    """Chunk c is half c%2 of block c//2; part p (16 weights) is in quarter p//2, at position
    16(p%2).. of it."""
    block, half = c // 2 * L.Q6_K_TYPE_SIZE, c % 2
    quarter, pos = p // 2, p % 2 * 16 + g * WORD
    ql = _word_at(row, 2, block + L.Q6_K_QL.start + 64 * half + 32 * (quarter % 2) + pos)
    qh = _word_at(row, 2, block + L.Q6_K_QH.start + 32 * half + pos)
    return _signed_q6_k(ql, qh, quarter)


def _q6_k_planar_words(row: Row, c: Expr, p: Expr, g: Expr) -> Expr:
    """`_q6_k_words` on planar Q6_K rows (layouts.py): chunk c is the 96-byte run at 96c, its
    64 QL bytes then its 32 QH bytes, so that every word is 4-byte aligned and a lane's chunk is
    six 16-byte loads (the GGUF blocks of 210 bytes are read 16 bits at a time)."""
    run, quarter, pos = c * L.PLANAR_Q6_K_RUN, p // 2, p % 2 * 16 + g * WORD
    ql = _word_at(row, 4, run + L.PLANAR_Q6_K_HALF_QL.start + 32 * (quarter % 2) + pos)
    qh = _word_at(row, 4, run + L.PLANAR_Q6_K_HALF_QH.start + pos)
    return _signed_q6_k(ql, qh, quarter)


def _signed_q6_k(ql: Expr, qh: Expr, quarter: Expr) -> Expr:
    """Four 6-bit codes from a QL and a QH word, as q - 32 per byte without borrows between
    bytes: set each byte's top bit, subtract 32 from every byte, flip the top bit back."""
    low = (ql >> (quarter // 2 * 4).astype("uint32")) & _u32(0x0F0F0F0F)
    high = (qh >> (quarter * 2).astype("uint32")) & _u32(0x03030303)
    q = low | (high << _u32(4))
    return ((q | _u32(0x80808080)) - _u32(0x20202020)) ^ _u32(0x80808080)


def _q8_0_words(row: Row, c: Expr, p: Expr, g: Expr) -> Expr:
    return _word_at(row, 2, c * L.Q8_0_TYPE_SIZE + L.Q8_0_QS.start + g * WORD)


# (weight format id, words of 4 signed codes: (row, chunk, part, word) -> uint32): the ggml
# types, and Q6_K re-laid out at upload (kernels.gemv Q6_K_PLANAR, the step variant
# q6_k_layout="planar").
_CODE_WORDS: dict[GGMLQuantizationType | L.RelaidType, Callable[[Row, Expr, Expr, Expr], Expr]] = {
    _T.Q4_K: _q4_k_words,
    _T.Q5_K: _q5_k_words,
    _T.Q6_K: _q6_k_words,
    _T.Q8_0: _q8_0_words,
    L.Q6_K_PLANAR: _q6_k_planar_words,
}
# The file types with an int8 form (the ggml types among _CODE_WORDS' formats).
Q8_TYPES: tuple[GGMLQuantizationType, ...] = tuple(t for t in _CODE_WORDS if isinstance(t, GGMLQuantizationType))
# Model-level variants of the decode step's activations (model.qwen3moe.build_decode_step): float32,
# or int8 blocks of 32 (this module), for the expert GEMVs (`activations`) and for the attention
# projections Q, K, V and O (`projection_activations`). The first is the default.
ACTIVATIONS = ("f32", "q8")
# The form of the int8 GEMVs' sums, a model-level variant too: "sub_block", each sub-block's dot
# product an int32 before its scale (`q8_terms`; every CUDA kernel), or "lanes", a lane per word
# of a block of 32 kept across the row (`q8_lane_sum`, the `_lanes` factories; the cpu's).
INT8_DOTS = ("sub_block", "lanes")


def q8_format(ggml_type: int) -> GemvFormat:
    """The float GEMV's format of a weight format the int8 path takes (a ggml type of Q8_TYPES,
    or Q6_K_PLANAR): its chunking, scale and min."""
    if ggml_type not in _CODE_WORDS:
        supported = ", ".join(t.name for t in _CODE_WORDS)
        raise UnsupportedQuantTypeError(
            f"no int8-activation GEMV for quant type {GGMLQuantizationType(ggml_type).name} "
            f"(supported: {supported})"
        )
    return gemv_format(ggml_type)


def q8_activations_misfit(hidden: int, ffn: int) -> str | None:
    """Why the int8 decode step (activations="q8") cannot serve a model of this hidden size and
    FFN width (an expert's, or the dense FFN's; None: it can): its activations come in blocks of
    32, and the gate/up kernel's thread block holds one block of 32 rows."""
    for what, k in (("hidden size", hidden), ("FFN width", ffn)):
        if k % Q8_BLOCK:
            return f"its {what} {k} is not a multiple of the int8 blocks' {Q8_BLOCK}"
    return None


def q8_projections_misfit(hidden: int, head_dim: int) -> str | None:
    """Why int8 attention projections (projection_activations="q8") cannot serve a model of this
    hidden size and head dim (None: they can): Q, K and V read the hidden state in blocks of 32,
    and O the attention's output, whose combine kernel quantizes a head's values as whole blocks."""
    for what, k in (("hidden size", hidden), ("head dim", head_dim)):
        if k % Q8_BLOCK:
            return f"its {what} {k} is not a multiple of the int8 blocks' {Q8_BLOCK}"
    return None


# ---------------------------------------------------------------------------------------
# The activation quantizer
# ---------------------------------------------------------------------------------------


def quantize_q8_1_symbol(k: int, rows: int) -> str:
    return f"quantize_q8_1_{rows}x{k}" if rows else f"quantize_q8_1_{k}"


def quantize_q8_1(k: int, rows: int = 0) -> tirx.PrimFunc:
    """x f32[(rows,) k] -> xq int32[(rows,) k/4], xd f32[(rows,) k/32], xs f32[(rows,) k/32]
    (module docstring); rows = 0 takes a 1-D x. Rounds halves away from zero (llama.cpp's
    roundf)."""
    check_k(k, "quantize_q8_1")
    lead: tuple[int, ...] = (rows,) if rows else ()
    x = te.placeholder(lead + (k,), "float32", name="x")
    xq, xd, xs = q8_1_stages(lead, k, lambda ax, i: x[ax + (i,)])
    func = te.create_prim_func([x, xq, xd, xs])
    return func.with_attr("global_symbol", quantize_q8_1_symbol(k, rows))


def round_q8_1_rows_symbol(rows: int, k: int) -> str:
    return f"round_q8_1_{rows}x{k}"


def round_q8_1_rows(rows: int, k: int) -> tirx.PrimFunc:
    """x f32[rows, k] -> x̂ f32[rows, k]: each value as the int8 GEMVs see it, d * q with d and q
    of its block of 32 as `quantize_q8_1` makes them, in float32. The T-token step's GEMMs read
    their inputs so where the decode step's kernels read int8 blocks (the step variant
    `chunk_activations` "q8"): float GEMMs on x̂ compute what the int8 GEMVs do, so that the
    logits of a prompt and of the same tokens decoded agree to float32 rounding."""
    check_k(k, "round_q8_1_rows")
    x = te.placeholder((rows, k), "float32", name="x")
    l = te.reduce_axis((0, Q8_BLOCK), name="l")
    amax = te.compute((rows, k // Q8_BLOCK), lambda r, b: te.max(tirx.abs(x[r, b * Q8_BLOCK + l]), axis=l),
                      name="amax")
    inv = te.compute((rows, k // Q8_BLOCK), lambda r, b: _q8_inverse(amax[r, b]), name="inv")

    def rounded(r: Expr, i: Expr) -> Expr:
        b = i // Q8_BLOCK
        return amax[r, b] / tirx.const(Q8_MAX, "float32") * _q8_round(x[r, i] * inv[r, b])

    y = te.compute((rows, k), rounded, name="rounded")
    return te.create_prim_func([x, y]).with_attr("global_symbol", round_q8_1_rows_symbol(rows, k))


def add_rms_norm_q8_1_symbol(h: int) -> str:
    return f"add_rms_norm_q8_1_{h}"


def add_rms_norm_q8_1(h: int, eps: float) -> tirx.PrimFunc:
    """`norm.add_rms_norm` with `quantize_q8_1` of its output as the epilogue: sum = x + r,
    y = rmsnorm(sum) * w, and y as int8 blocks of 32 (xq, xd, xs), in one launch instead of two.

    The quantizer's stages compute each y they read again from the inputs, with the norm's own
    operations and 1 / rms (so the values are y's bit for bit): on a GPU a thread
    quantizes whole blocks of 32, whose sum and y other threads of the block wrote.

    Params (x, r, w f32[h], sum f32[h], y f32[h], xq int32[h/4], xd f32[h/32], xs f32[h/32]).
    """
    check_k(h, "add_rms_norm_q8_1")
    x = te.placeholder((h,), "float32", name="x")
    r = te.placeholder((h,), "float32", name="r")
    w = te.placeholder((h,), "float32", name="w")
    total = te.compute((h,), lambda i: x[i] + r[i], name="residual")
    sumsq = sum_of_squares(h, total)
    # a stage: each thread computes it once, not once a value (`norm.normalize`'s operations)
    inv_rms = te.compute((), lambda: inverse_rms(h, eps, sumsq), name="inv_rms")
    y = te.compute((h,), lambda i: total[i] * inv_rms[()] * w[i], name="norm")
    xq, xd, xs = q8_1_stages((), h, lambda ax, i: (x[i] + r[i]) * inv_rms[()] * w[i])
    func = te.create_prim_func([x, r, w, total, y, xq, xd, xs])
    return func.with_attr("global_symbol", add_rms_norm_q8_1_symbol(h))


def rms_norm_q8_1_symbol(h: int) -> str:
    return f"rms_norm_q8_1_{h}"


def rms_norm_q8_1(h: int, eps: float) -> tirx.PrimFunc:
    """`norm.rms_norm`'s y = rmsnorm(x) * w, written only as int8 blocks of 32 (xq, xd, xs): the
    input of int8 attention projections (projection_activations="q8"), which read no float y.
    Each y the quantizer reads is computed again from x and w with the norm's own operations
    and 1 / rms as a stage, as in `add_rms_norm_q8_1`.

    Params (x f32[h], w f32[h], xq int32[h/4], xd f32[h/32], xs f32[h/32]).
    """
    check_k(h, "rms_norm_q8_1")
    x = te.placeholder((h,), "float32", name="x")
    w = te.placeholder((h,), "float32", name="w")
    sumsq = sum_of_squares(h, x)
    inv_rms = te.compute((), lambda: inverse_rms(h, eps, sumsq), name="inv_rms")
    xq, xd, xs = q8_1_stages((), h, lambda ax, i: x[i] * inv_rms[()] * w[i])
    func = te.create_prim_func([x, w, xq, xd, xs])
    return func.with_attr("global_symbol", rms_norm_q8_1_symbol(h))


def attention_combine_q8_1_symbol(n_heads: int, splits: int, head_dim: int) -> str:
    return f"attention_combine_q8_1_{n_heads}x{splits}x{head_dim}"


def attention_combine_q8_1(n_heads: int, splits: int, head_dim: int) -> tirx.PrimFunc:
    """`attention.attention_combine` written only as int8 blocks of 32 of its output (the input
    of the int8 O projection). A head's head_dim values are whole blocks of 32, so a GPU thread
    block that merges a head's splits quantizes them too.

    Params (o_part f32[NH, S, D], lse f32[NH, S], xq int32[NH*D/4], xd, xs f32[NH*D/32]).
    """
    if head_dim % Q8_BLOCK:
        raise TensorShapeError(f"attention_combine_q8_1 needs a head dim that is a multiple of {Q8_BLOCK}, "
                               f"got {head_dim}")
    o_part, lse = combine_inputs(n_heads, splits, head_dim)
    out = combine_splits(o_part, lse)
    xq, xd, xs = q8_1_stages((), n_heads * head_dim, lambda ax, i: out[i])
    func = te.create_prim_func([o_part, lse, xq, xd, xs])
    return func.with_attr("global_symbol", attention_combine_q8_1_symbol(n_heads, splits, head_dim))


def _q8_inverse(amax: Expr) -> Expr:
    """127 / max|x| of a block (0 for an all-zero block, whose values all quantize to 0)."""
    return tirx.Select(amax > 0.0, tirx.const(Q8_MAX, "float32") / amax, tirx.const(0.0, "float32"))


def _q8_round(v: Expr) -> Expr:
    """x * 127 / max|x| rounded to the int8 value, still float32. Halves away from zero, like
    llama.cpp's roundf (tirx.round rounds halves to even)."""
    return tirx.copysign(tirx.floor(tirx.abs(v) + tirx.const(0.5, "float32")), v)


def q8_1_stages(lead: tuple[int, ...], k: int, value: Callable[[tuple[Expr, ...], Expr], Expr],
                max_once: bool = False) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """xq, xd, xs of the activations value(lead axes, i) for i < k. Each block's max|x| and
    127 / max are stages of their own, twice: `amax_q` / `inv_q` for the words and `amax` /
    `inv` for the scale and sum block (xd and xs as one two-output block, `scales`), so that a GPU
    thread keeps either pair in registers beside its consumer, computed once a block, instead of
    sharing one through global memory or dividing for every value. `max_once`: only `amax` /
    `inv`, which the words read too (a kernel that keeps them in shared memory), and xd and xs
    as stages of their own, `scales` and `sums`."""
    nb = k // Q8_BLOCK

    def element(block: Expr, l: Expr) -> Expr:
        """Index of the l-th value a reduction over `block` visits. With `max_once` from a start
        rotated by the block, so that threads reducing consecutive blocks in shared memory read
        32 different banks at each step (a max and an integer sum: the order changes nothing)."""
        return block * Q8_BLOCK + ((l + block) % Q8_BLOCK if max_once else l)

    def block_max(name: str) -> te.Tensor:
        l = te.reduce_axis((0, Q8_BLOCK), name="l")
        return te.compute(lead + (nb,), lambda *ax: te.max(
            tirx.abs(value(ax[:-1], element(ax[-1], l))), axis=l), name=name)

    def inverse(amax: te.Tensor, name: str) -> te.Tensor:
        return te.compute(lead + (nb,), lambda *ax: _q8_inverse(amax[ax]), name=name)

    def q(inv: te.Tensor, ax: tuple[Expr, ...], block: Expr, i: Expr) -> Expr:
        """The int8 value of element i of x, in block `block` (its index is passed, not
        derived from i, so that a block's reads of inv are plain for the scheduler)."""
        return _q8_round(value(ax, i) * inv[ax + (block,)]).astype("int32")

    amax = block_max("amax")
    inv = inverse(amax, "inv")
    inv_q = inv if max_once else inverse(block_max("amax_q"), "inv_q")

    def word(*ax: Expr) -> Expr:
        lead_ax, w = ax[:-1], ax[-1]
        packed = _u32(0)
        for b in range(WORD):
            byte = q(inv_q, lead_ax, w // (Q8_BLOCK // WORD), w * WORD + b).astype("uint32") & _u32(0xFF)
            packed = packed | (byte << _u32(8 * b))
        return tirx.reinterpret("int32", packed)

    # "words", not "xq": a kernel may read an xq of its own (moe_q8.moe_gate_up_silu_q8_1)
    xq = te.compute(lead + (k // WORD,), word, name="words")
    l_sum = te.reduce_axis((0, Q8_BLOCK), name="l")
    qsum = te.compute(lead + (nb,), lambda *ax: te.sum(
        q(inv, ax[:-1], ax[-1], element(ax[-1], l_sum)), axis=l_sum), name="qsum")

    def scale_and_sum(*ax: Expr) -> list[Expr]:
        d = amax[ax] / Q8_MAX
        return [d, d * qsum[ax].astype("float32")]

    if max_once:  # apart, so that a kernel that reads no sums (no weight mins) has no sum stages
        xd = te.compute(lead + (nb,), lambda *ax: scale_and_sum(*ax)[0], name="scales")
        xs = te.compute(lead + (nb,), lambda *ax: scale_and_sum(*ax)[1], name="sums")
        return xq, xd, xs
    xd, xs = te.compute(lead + (nb,), scale_and_sum, name="scales")
    return xq, xd, xs


# ---------------------------------------------------------------------------------------
# The int8 dot and its scaled sub-block terms (shared by the GEMV and the MoE forms)
# ---------------------------------------------------------------------------------------

# (lead axes, word index) -> int32 word of 4 activations; (lead axes, block) -> float32
XqAt = Callable[[tuple[Expr, ...], Expr], Expr]
XfAt = Callable[[tuple[Expr, ...], Expr], Expr]
# (lead axes, row) -> that row's words
RowOf = Callable[[tuple[Expr, ...], Expr], Row]
# (lead axes, row, chunk, part) -> float32 contribution of that sub-block
Term = Callable[[tuple[Expr, ...], Expr, Expr, Expr], Expr]


def q8_terms(
    fmt: GemvFormat,
    lead: tuple[int, ...],
    n: int,
    k: int,
    row_of: RowOf,
    xq_at: XqAt,
    xd_at: XfAt,
    xs_at: XfAt,
    dot_name: str,
    scale_row_of: RowOf | None = None,
) -> Term:
    """The block `dot_name`[*lead, n, chunk, part] (int32 per sub-block, by dp4a over its words)
    and the term that scales it: xd * (scale * dot) + min * xs. `row_of(lead, r)` reads row r's
    words (and `scale_row_of`, where given, those the scale and min decoders read); xq/xd/xs
    readers take the lead axes so a per-slot activation (MoE down) can use them."""
    words = fmt.sub // WORD
    code_words = _CODE_WORDS[fmt.id]

    def first_word(c: Expr, p: Expr) -> Expr:
        return (c * fmt.chunk + p * fmt.sub) // WORD

    g = te.reduce_axis((0, words), name="g")

    def dot_value(*ax: Expr) -> Expr:
        e, r, c, p = ax[:-3], ax[-3], ax[-2], ax[-1]
        return te.sum(dp4a(code_words(fmt.row_view(row_of(e, r), k), c, p, g),
                           xq_at(e, first_word(c, p) + g)), axis=g)

    dot = te.compute(lead + (n, k // fmt.chunk, fmt.parts), dot_value, name=dot_name)

    def term(e: tuple[Expr, ...], r: Expr, c: Expr, p: Expr) -> Expr:
        block = (c * fmt.chunk + p * fmt.sub) // Q8_BLOCK
        row = fmt.row_view((scale_row_of or row_of)(e, r), k)
        assert fmt.scale is not None
        value = xd_at(e, block) * (fmt.scale(row, c, p) * dot[e + (r, c, p)].astype("float32"))
        if fmt.min is not None:
            value = value + fmt.min(row, c, p) * xs_at(e, block)
        return value

    return term


# Lanes of the lane form (the `_lanes` factories, the cpu's): a lane per word of a block of 32, so
# that one SIMD register of int32 holds a block's dot products, word by word.
LANES = Q8_BLOCK // WORD
# slot -> float32 weight of its rows in a sum over slots (the MoE down projection's expert weights)
SlotWeight = Callable[[Expr], Expr]


def q8_lane_sum(
    fmt: GemvFormat,
    lead: tuple[int, ...],
    n: int,
    k: int,
    row_of: RowOf,
    xq_at: XqAt,
    xd_at: XfAt,
    xs_at: XfAt,
    name: str,
    scale_row_of: RowOf | None = None,
    slot_weight: SlotWeight | None = None,
) -> te.Tensor:
    """`name`[*lead, n]: each row's sum of `q8_terms`' terms, in lanes that last the whole row.

      {name}_lanes[*lead, n, l] = sum over (c, g) of xd * scale * dp4a(word l of block g of chunk c, x's)
      {name}_mins[*lead, n]     = sum over (c, p) of min * xs            (formats with mins)
      name[*lead, n]            = sum over l of {name}_lanes, plus {name}_mins

    Every sub-block holds whole words (16 or 32 weights), so each lane's word has one scale, which
    multiplies its int32 product before the float sum: the LANES int32 products of a block are one
    SIMD register (x86 `vpdpbusd`), scaled and summed into LANES float sums, reduced once a row.
    The sub-block form (`q8_terms`) reduces its lanes at every sub-block instead, a horizontal
    sum each 32 weights (bench/NOTES.md, "Session 27"). With `slot_weight` the lead is one slot axis,
    summed over: name[n] = sum over s of slot_weight(s) * (...) (the MoE down projection)."""
    groups, chunks = fmt.chunk // Q8_BLOCK, k // fmt.chunk
    code_words = _CODE_WORDS[fmt.id]
    out_lead = () if slot_weight is not None else lead

    def lane_term(e: tuple[Expr, ...], r: Expr, c: Expr, g: Expr, l: Expr) -> Expr:
        at = g * Q8_BLOCK + l * WORD  # the lane's word, as the first of its weights in chunk c
        p, word = at // fmt.sub, at % fmt.sub // WORD
        block = c * groups + g
        dot = dp4a(code_words(fmt.row_view(row_of(e, r), k), c, p, word), xq_at(e, block * LANES + l))
        scale = fmt.scale(fmt.row_view((scale_row_of or row_of)(e, r), k), c, p)
        return xd_at(e, block) * (scale * dot.astype("float32"))

    def min_term(e: tuple[Expr, ...], r: Expr, c: Expr, p: Expr) -> Expr:
        assert fmt.min is not None
        row = fmt.row_view((scale_row_of or row_of)(e, r), k)
        return fmt.min(row, c, p) * xs_at(e, (c * fmt.chunk + p * fmt.sub) // Q8_BLOCK)

    def summed(term: Callable[..., Expr], per_chunk: int, label: str, lane: bool) -> te.Tensor:
        """Block {name}_{label}: term summed over the row's chunks and their `per_chunk` blocks of
        32 (lane) or sub-blocks (slots too where weighted)."""
        c = te.reduce_axis((0, chunks), name="c")
        g = te.reduce_axis((0, per_chunk), name="g" if lane else "p")
        shape = out_lead + (n,) + ((LANES,) if lane else ())

        def value(*ax: Expr) -> Expr:
            e, (r, *lane_ax) = ax[:len(out_lead)], ax[len(out_lead):]
            if slot_weight is None:
                return te.sum(term(e, r, c, g, *lane_ax), axis=[c, g])
            s = te.reduce_axis((0, lead[0]), name="s")
            return te.sum(slot_weight(s) * term((s,), r, c, g, *lane_ax), axis=[s, c, g])

        return te.compute(shape, value, name=f"{name}_{label}")

    assert fmt.scale is not None
    lanes = summed(lane_term, groups, "lanes", lane=True)
    mins = summed(min_term, fmt.parts, "mins", lane=False) if fmt.min is not None else None
    l = te.reduce_axis((0, LANES), name="l")

    def total(*ax: Expr) -> Expr:
        if mins is None:
            return te.sum(lanes[ax + (l,)], axis=l)
        # the mins join lane 0's sum: one reduction over the lanes, the block's only loop
        return te.sum(lanes[ax + (l,)] + tirx.Select(l == 0, mins[ax], tirx.const(0.0, "float32")), axis=l)

    return te.compute(out_lead + (n,), total, name=name)


def q8_inputs(k: int, lead: tuple[int, ...] = (), prefix: str = "x") -> tuple[te.Tensor, ...]:
    """Placeholders xq int32[*lead, k/4], xd and xs f32[*lead, k/32] (quantize_q8_1's outputs)."""
    return (te.placeholder(lead + (k // WORD,), "int32", name=f"{prefix}q"),
            te.placeholder(lead + (k // Q8_BLOCK,), "float32", name=f"{prefix}d"),
            te.placeholder(lead + (k // Q8_BLOCK,), "float32", name=f"{prefix}s"))


def gemv_q8_symbol(ggml_type: int, n: int, k: int) -> str:
    return f"gemv_q8_{q8_format(ggml_type).name.lower()}_{n}x{k}"


def gemv_q8(ggml_type: int, n: int, k: int) -> tirx.PrimFunc:
    """y[n] = W[n, k] . x̂: params (W words [n, row_words], xq, xd, xs as quantize_q8_1(k) makes
    them, y f32[n]). Blocks dot (int32 per sub-block) and gemv, as the float GEMV's."""
    check_k(k, "gemv_q8")
    xq, xd, xs = q8_inputs(k)
    func = _gemv_q8_te(ggml_type, n, k, [xq, xd, xs], (xq, xd, xs))
    return func.with_attr("global_symbol", gemv_q8_symbol(ggml_type, n, k))


def gemv_q8_lanes_symbol(ggml_type: int, n: int, k: int) -> str:
    return gemv_q8_symbol(ggml_type, n, k).replace("gemv_q8_", "gemv_q8_lanes_", 1)


def gemv_q8_lanes(ggml_type: int, n: int, k: int) -> tirx.PrimFunc:
    """`gemv_q8` in the lane form (`q8_lane_sum`; the step variant int8_dots "lanes", the cpu's):
    the same parameters and oracle, blocks gemv_lanes (, gemv_mins) and gemv."""
    check_k(k, "gemv_q8_lanes")
    xq, xd, xs = q8_inputs(k)
    func = _gemv_q8_te(ggml_type, n, k, [xq, xd, xs], (xq, xd, xs), lanes=True)
    return func.with_attr("global_symbol", gemv_q8_lanes_symbol(ggml_type, n, k))


def gemv_q8_normed_symbol(ggml_type: int, n: int, k: int) -> str:
    return f"gemv_q8_normed_{q8_format(ggml_type).name.lower()}_{n}x{k}"


def gemv_q8_normed(ggml_type: int, n: int, k: int, eps: float) -> tirx.PrimFunc:
    """`gemv_q8` of rmsnorm(h) * norm_w, normalized and quantized by the kernel itself
    (`normed_q8_1_stages`): params (W words, h f32[k], norm_w f32[k], y f32[n]). The attention
    input of the step variant attention_norm "prologue", without the `rms_norm_q8_1` launch."""
    check_k(k, "gemv_q8_normed")
    h, norm_w, x8 = normed_q8_1_stages(k, eps)
    func = _gemv_q8_te(ggml_type, n, k, [h, norm_w], x8)
    return func.with_attr("global_symbol", gemv_q8_normed_symbol(ggml_type, n, k))


def _gemv_q8_te(ggml_type: int, n: int, k: int, x_params: list[te.Tensor],
                x8: tuple[te.Tensor, te.Tensor, te.Tensor], lanes: bool = False) -> tirx.PrimFunc:
    """The int8 GEMV's blocks on activations x8 = (xq, xd, xs), parameters or stages, with
    parameters (W, *x_params, y); in the lane form where `lanes`."""
    fmt = q8_format(ggml_type)
    w = te.placeholder((n, fmt.row_words(k)), fmt.word_dtype, name="W")
    y = _q8_rows(fmt, n, k, lambda e, r: (lambda i: w[r, i]), x8, lanes)
    return te.create_prim_func([w, *x_params, y])


def _q8_rows(fmt: GemvFormat, n: int, k: int, row_of: RowOf, x8: tuple[te.Tensor, te.Tensor, te.Tensor],
             lanes: bool, scale_row_of: RowOf | None = None) -> te.Tensor:
    """Block `gemv`: the n rows' dot products with the activations x8 = (xq, xd, xs), summed by
    `q8_terms` (its `dot` block) or, where `lanes`, by `q8_lane_sum`."""
    xq, xd, xs = x8
    readers = (lambda e, i: xq[i], lambda e, b: xd[b], lambda e, b: xs[b])
    if lanes:
        return q8_lane_sum(fmt, (), n, k, row_of, *readers, "gemv", scale_row_of=scale_row_of)
    term = q8_terms(fmt, (), n, k, row_of, *readers, "dot", scale_row_of=scale_row_of)
    c = te.reduce_axis((0, k // fmt.chunk), name="c")
    p = te.reduce_axis((0, fmt.parts), name="p")
    return te.compute((n,), lambda r: te.sum(term((), r, c, p), axis=[c, p]), name="gemv")


def gemv_qkv_q8_symbol(ggml_type: int, n_q: int, n_k: int, n_v: int, k: int) -> str:
    name = q8_format(ggml_type).name.lower()
    return f"gemv_qkv_q8_{name}_{n_q}x{n_k}x{n_v}x{k}" if n_v else f"gemv_qk_q8_{name}_{n_q}x{n_k}x{k}"


def gemv_qkv_q8(ggml_type: int, n_q: int, n_k: int, n_v: int, k: int) -> tirx.PrimFunc:
    """`gemv.gemv_qkv` on int8 activations: q, k, v = Wq . x̂, Wk . x̂, Wv . x̂ in one kernel.
    Params (Wq, Wk[, Wv] words, xq, xd, xs as quantize_q8_1(k) makes them, q, k[, v] f32);
    n_v = 0 gives the Q+K form, as the float kernel's."""
    check_k(k, "gemv_qkv_q8")
    xq, xd, xs = q8_inputs(k)
    func = _gemv_qkv_q8_te(ggml_type, (n_q, n_k, n_v), k, [xq, xd, xs], (xq, xd, xs))
    return func.with_attr("global_symbol", gemv_qkv_q8_symbol(ggml_type, n_q, n_k, n_v, k))


def gemv_qkv_q8_lanes_symbol(ggml_type: int, n_q: int, n_k: int, n_v: int, k: int) -> str:
    return gemv_qkv_q8_symbol(ggml_type, n_q, n_k, n_v, k).replace("_q8_", "_q8_lanes_", 1)


def gemv_qkv_q8_lanes(ggml_type: int, n_q: int, n_k: int, n_v: int, k: int) -> tirx.PrimFunc:
    """`gemv_qkv_q8` in the lane form (`q8_lane_sum`; the step variant int8_dots "lanes", the cpu's):
    the same parameters and oracle."""
    check_k(k, "gemv_qkv_q8_lanes")
    xq, xd, xs = q8_inputs(k)
    func = _gemv_qkv_q8_te(ggml_type, (n_q, n_k, n_v), k, [xq, xd, xs], (xq, xd, xs), lanes=True)
    return func.with_attr("global_symbol", gemv_qkv_q8_lanes_symbol(ggml_type, n_q, n_k, n_v, k))


def gemv_qkv_q8_normed_symbol(ggml_type: int, n_q: int, n_k: int, n_v: int, k: int) -> str:
    return gemv_qkv_q8_symbol(ggml_type, n_q, n_k, n_v, k).replace("_q8_", "_q8_normed_", 1)


def gemv_qkv_q8_normed(ggml_type: int, n_q: int, n_k: int, n_v: int, k: int, eps: float) -> tirx.PrimFunc:
    """`gemv_qkv_q8` of rmsnorm(h) * norm_w, normalized and quantized by the kernel itself
    (`normed_q8_1_stages`): params (Wq, Wk[, Wv] words, h f32[k], norm_w f32[k], q, k[, v] f32).
    The attention input of the step variant attention_norm "prologue", without the
    `rms_norm_q8_1` launch."""
    check_k(k, "gemv_qkv_q8_normed")
    h, norm_w, x8 = normed_q8_1_stages(k, eps)
    func = _gemv_qkv_q8_te(ggml_type, (n_q, n_k, n_v), k, [h, norm_w], x8)
    return func.with_attr("global_symbol", gemv_qkv_q8_normed_symbol(ggml_type, n_q, n_k, n_v, k))


def _gemv_qkv_q8_te(ggml_type: int, rows: tuple[int, int, int], k: int, x_params: list[te.Tensor],
                    x8: tuple[te.Tensor, te.Tensor, te.Tensor], lanes: bool = False) -> tirx.PrimFunc:
    """The int8 Q/K/V kernel's blocks on activations x8 = (xq, xd, xs), parameters or stages, with
    parameters (Wq, Wk[, Wv], *x_params, q, k[, v]); in the lane form where `lanes`."""
    fmt = q8_format(ggml_type)
    ns = qkv_rows(*rows)
    weights, w = qkv_row_space(fmt, ns, k)
    y = _q8_rows(fmt, sum(ns), k, lambda e, r: (lambda i: w[r, i]), x8, lanes,
                 scale_row_of=lambda e, r: qkv_row(weights, r))
    return te.create_prim_func([*(wt for wt, _, _ in weights), *x_params, *qkv_outputs(y, ns)])


def normed_q8_1_stages(k: int, eps: float) -> tuple[te.Tensor, te.Tensor, tuple[te.Tensor, te.Tensor, te.Tensor]]:
    """Placeholders h and norm_w f32[k], and the int8 blocks (words, scales) of rmsnorm(h) *
    norm_w as stages: `norm.normalize`'s (sumsq, norm), then `q8_1_stages` reading norm (each
    block's max once), the same arithmetic as `rms_norm_q8_1` (1 / rms here inlined in each value)."""
    h = te.placeholder((k,), "float32", name="h")
    norm_w = te.placeholder((k,), "float32", name="norm_w")
    x = normalize(k, eps, h, norm_w)
    return h, norm_w, q8_1_stages((), k, lambda ax, i: x[i], max_once=True)


# ---------------------------------------------------------------------------------------
# numpy oracles
# ---------------------------------------------------------------------------------------


def add_rms_norm_q8_1_reference(
    x: npt.NDArray[np.float32], r: npt.NDArray[np.float32], w: npt.NDArray[np.float32], eps: float,
) -> tuple[np.ndarray, np.ndarray, npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(sum, y, xq, xd, xs): `norm.add_rms_norm`'s oracle, then `quantize_q8_1`'s on its y."""
    total, y = add_rms_norm_reference(x, r, w, eps)
    return (total, y, *quantize_q8_1_reference(y))


def rms_norm_q8_1_reference(
    x: npt.NDArray[np.float32], w: npt.NDArray[np.float32], eps: float,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(xq, xd, xs): `quantize_q8_1`'s oracle on `norm.rms_norm`'s."""
    return quantize_q8_1_reference(rms_norm_reference(x, w, eps))


def attention_combine_q8_1_reference(
    o_part: npt.NDArray[np.float32], lse: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(xq, xd, xs): `quantize_q8_1`'s oracle on `attention.attention_combine`'s."""
    return quantize_q8_1_reference(attention_combine_reference(o_part, lse))


def gemv_q8_reference(
    ggml_type: int, data: npt.NDArray[np.uint8], xq: npt.NDArray[np.int32],
    xd: npt.NDArray[np.float32],
) -> np.ndarray:
    """The float GEMV's oracle on x̂ (float64 products)."""
    q8_format(ggml_type)
    return gemv_reference(ggml_type, data, dequantize_q8_1(xq, xd))


def gemv_qkv_q8_reference(
    ggml_type: int, datas: list[npt.NDArray[np.uint8]], xq: npt.NDArray[np.int32],
    xd: npt.NDArray[np.float32],
) -> tuple[np.ndarray, ...]:
    """(q, k[, v]): `gemv_q8_reference` of each weight."""
    return tuple(gemv_q8_reference(ggml_type, data, xq, xd) for data in datas)


def gemv_q8_normed_reference(
    ggml_type: int, data: npt.NDArray[np.uint8], h: npt.NDArray[np.float32], norm_w: npt.NDArray[np.float32],
    eps: float,
) -> np.ndarray:
    """`gemv_q8_reference` on `rms_norm_q8_1_reference`'s blocks of rmsnorm(h) * norm_w."""
    xq, xd, _ = rms_norm_q8_1_reference(h, norm_w, eps)
    return gemv_q8_reference(ggml_type, data, xq, xd)


def gemv_qkv_q8_normed_reference(
    ggml_type: int, datas: list[npt.NDArray[np.uint8]], h: npt.NDArray[np.float32],
    norm_w: npt.NDArray[np.float32], eps: float,
) -> tuple[np.ndarray, ...]:
    """(q, k[, v]): `gemv_qkv_q8_reference` on `rms_norm_q8_1_reference`'s blocks."""
    xq, xd, _ = rms_norm_q8_1_reference(h, norm_w, eps)
    return gemv_qkv_q8_reference(ggml_type, datas, xq, xd)
