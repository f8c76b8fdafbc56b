"""Dequantizing GEMV, y = W . x, straight from GGUF blocks: unscheduled compute + numpy reference.

Weights stay in the GGUF byte layout (`sparkinfer.quant.layouts`); the kernel only views the
row bytes as little-endian words (`weight_view`), a zero-copy reinterpretation:

| type | words             | why that word size                                      |
|------|-------------------|---------------------------------------------------------|
| Q4_K | uint32, 36/block  | 144 B blocks: every block and its QS are 16-byte aligned |
| Q5_K | uint32, 44/block  | 176 B blocks: likewise                                   |
| Q6_K | uint16, 105/block | 210 B blocks start at even offsets only                  |
| Q6_K planar | uint32       | the upload's re-layout (layouts.py): 16-byte aligned runs |
| Q8_0 | uint16, 17/block  | 34 B blocks start at even offsets only                   |
| F16  | float16           |                                                         |
| BF16 | uint16            | widening to f32 is a 16-bit shift; no bf16 math needed   |
| F32  | float32           |                                                         |

x and y are float32 and every sum is float32. At batch 1, x is 8-16 KiB against megabytes of
weights, so halving it buys nothing measurable, while float32 is what the norms produce and
what the numpy oracle computes (fp16 x would add ~1e-3 relative error before any sum).

K is cut into chunks (the bytes one GPU lane loads at once), each of `parts` sub-blocks of
`sub` weights sharing one scale (see GemvFormat). The compute is three blocks:
  dot[n, c, p]  = sum_l code(W, n, c, p, l) * x[c, p, l]     quant codes times x, per sub-block
  xsum[c, p]    = sum_l x[c, p, l]                           only where there is a min (K-quants)
  gemv[n]       = sum_{c,p} scale(W, n, c, p) * dot[n, c, p] + min(W, n, c, p) * xsum[c, p]
so scales and mins are decoded once per sub-block, never per weight. Float types take the same
shape with no scale, so one schedule (`sparkinfer.schedule.gemv`) covers every type.

`gemv_qkv` is the attention-input form: Wq, Wk (and Wv) of one type, sharing x, as one row
space of n_q + n_k + n_v rows (one GPU launch). Row r reads the weight it falls in through
a lazy if_then_else on r, with clamped indices so every access is provably in bounds; the
quant codes go through a stage `W` (that row space, as the dot reads it) which the schedule
keeps in registers, and the three outputs are copied out of the combined `gemv` stage.

The fused-launch forms (the decode step's `decode_launches="fused"`) add a prologue or an
epilogue to these, not a second copy: `gemv_normed` / `gemv_qkv_normed` take h and a norm
weight and compute x = rmsnorm(h) * w first (`norm.normalize`: stages sumsq and norm, the dots
reading norm), `gemv_residual` adds r to each row's sum (stage residual).

Q6_K_PLANAR is a weight format beside the ggml types: Q6_K rows re-laid out at upload
(`quant.kquants.q6_k_to_planar`, the step variant q6_k_layout="planar") so that a lane's
chunk is one 16-byte-aligned 96-byte run. Its id stands where a ggml type does (factory
arguments, schedule rules, tuning keys); its decoders share Q6_K's arithmetic
(`_q6_k_value`, `_q6_k_sub_scale`) and address the planes of layouts.py. The scale and d
planes start at offsets that depend on the row's block count, so every kernel reads a row
through `GemvFormat.row_view(words, k)`, which for the planar format carries that count.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType
from tvm import te, tirx

from sparkinfer import quant
from sparkinfer.errors import TensorShapeError, UnsupportedQuantTypeError
from sparkinfer.kernels.norm import normalize, rms_norm_reference
from sparkinfer.quant import kquants
from sparkinfer.quant import layouts as L

_T = GGMLQuantizationType
Expr = tirx.Expr
# Model-level variants of the decode step's launches (model.qwen3moe.build_decode_step):
# "split" runs each norm and residual add as a launch of its own, "fused" folds them into
# the GEMVs around them (gemv_normed, gemv_qkv_normed, gemv_residual).
DECODE_LAUNCHES = ("split", "fused")
# The step variant q6_k_layout: how Q6_K weights the decode GEMVs read sit in device memory,
# "gguf" as the file has them, "planar" re-laid out at upload (Q6_K_PLANAR).
Q6_K_LAYOUTS = ("gguf", "planar")
Q6_K_PLANAR = L.Q6_K_PLANAR  # the weight-format id of planar Q6_K
# A row accessor: word index within the row -> that word (uint16/uint32/float).
Row = Callable[[Expr], Expr]


@dataclass(frozen=True)
class GemvFormat:
    """How the kernel reads one ggml type: word view, chunking and decoders.

    K is cut into chunks of `parts` sub-blocks of `sub` weights. A chunk is the unit whose
    bytes a GPU lane loads at once (e.g. Q4_K: 32 QS bytes carry two sub-blocks, one per
    nibble); a sub-block is the unit sharing one scale. `code(row, c, p, l)` is weight l of
    part p of chunk c as float32 before scaling (an integer for quant types, the weight for
    float types); `scale(row, c, p)` multiplies that sub-block's dot product and
    `min(row, c, p)` multiplies its sum of x.
    """

    ggml_type: GGMLQuantizationType
    word_dtype: str
    block_bytes: int
    block_size: int
    sub: int
    parts: int
    code: Callable[[Row, Expr, Expr, Expr], Expr]
    scale: Callable[[Row, Expr, Expr], Expr] | None = None
    min: Callable[[Row, Expr, Expr], Expr] | None = None
    planar: bool = False  # the Q6_K planar re-layout of the upload, not the file's blocks

    @property
    def id(self) -> GGMLQuantizationType | L.RelaidType:
        """What kernel factories take for this format: the ggml type, or Q6_K_PLANAR."""
        return Q6_K_PLANAR if self.planar else self.ggml_type

    @property
    def name(self) -> str:
        return self.ggml_type.name + ("_PLANAR" if self.planar else "")

    @property
    def chunk(self) -> int:
        return self.sub * self.parts

    @property
    def word_bytes(self) -> int:
        return np.dtype(self.word_dtype).itemsize

    def row_words(self, k: int) -> int:
        if k % self.block_size != 0 or k % self.chunk != 0:
            raise TensorShapeError(
                f"a {self.name} row must hold a multiple of {max(self.block_size, self.chunk)} "
                f"weights, got {k}"
            )
        n_blocks = k // self.block_size
        row_bytes = L.q6_k_planar_row_bytes(n_blocks) if self.planar else n_blocks * self.block_bytes
        return row_bytes // self.word_bytes

    def row_view(self, words: Row, k: int) -> Row:
        """Row accessor the decoders take for a row of k weights whose words are `words`:
        `words` itself, or for the planar format a PlanarRow that knows its block count."""
        return PlanarRow(words, k // self.block_size) if self.planar else words


@dataclass(frozen=True)
class PlanarRow:
    """A planar Q6_K row: its words (uint32) and its block count, which places the scale and
    d planes (layouts.py, "Q6_K planar")."""

    words: Row
    n_blocks: int

    def __call__(self, i: Expr) -> Expr:
        return self.words(i)


def _u32(v: Expr | int) -> Expr:
    return v.astype("uint32") if isinstance(v, Expr) else tirx.const(v, "uint32")


def _byte(row: Row, word_bytes: int, byte_index: Expr) -> Expr:
    """Byte `byte_index` of the row (little-endian words), as uint32."""
    word = row(byte_index // word_bytes).astype("uint32")
    return (word >> _u32(byte_index % word_bytes * 8)) & _u32(0xFF)


def _f16(row: Row, word_bytes: int, byte_index: Expr) -> Expr:
    """The f16 at even byte offset `byte_index` of the row, as float32."""
    word = row(byte_index // word_bytes).astype("uint32")
    half = (word >> _u32(byte_index % word_bytes * 8)) & _u32(0xFFFF)
    return tirx.reinterpret("float16", half.astype("uint16")).astype("float32")


def _to_f32(q: Expr, offset: int = 0) -> Expr:
    """The unsigned integer q minus offset, as float32. A plain convert: OR-ing q into the
    mantissa of 2^23 (no I2F) measured no faster on an H200; loads and latency bound these
    kernels, not conversions."""
    return (q.astype("int32") - offset).astype("float32")


def _int8_to_f32(byte: Expr) -> Expr:
    """A byte holding an int8, as float32 (flipping the sign bit makes it offset-binary)."""
    return _to_f32(byte ^ _u32(0x80), 128)


# Q4_K and Q5_K: chunk c is 64 weights, the two sub-blocks whose 4-bit quants share the 32
# QS bytes 32*(c%4).. of block c//4 (part 0: low nibbles, part 1: high nibbles).
_K_CHUNKS = L.QK_K // 64


def _k_scale_min(row: Row, block_byte: Expr, j: Expr) -> tuple[Expr, Expr]:
    """6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block (kquants.unpack_scale_min)."""

    def packed(i: Expr) -> Expr:
        return _byte(row, 4, block_byte + L.Q4_K_SCALES.start + i)

    low = j < 4
    # For j < 4 the else-branch index j - 4 would be negative; (j + 8) % 12 equals j - 4
    # where that branch is taken and stays in range where it is not (Select evaluates both).
    sc = tirx.Select(low, packed(j) & _u32(63),
                     (packed(j + 4) & _u32(0xF)) | ((packed((j + 8) % 12) >> _u32(6)) << _u32(4)))
    m = tirx.Select(low, packed(j + 4) & _u32(63),
                    (packed(j + 4) >> _u32(4)) | ((packed(j) >> _u32(6)) << _u32(4)))
    return _to_f32(sc), _to_f32(m)


def _k_scale_decoders(type_size: int) -> tuple[Callable, Callable]:
    """scale and min decoders shared by Q4_K and Q5_K (same header, same packing)."""

    def scale(row: Row, c: Expr, p: Expr) -> Expr:
        block_byte = c // _K_CHUNKS * type_size
        sc, _ = _k_scale_min(row, block_byte, c % _K_CHUNKS * 2 + p)
        return _f16(row, 4, block_byte + L.Q4_K_D.start) * sc

    def min_(row: Row, c: Expr, p: Expr) -> Expr:
        block_byte = c // _K_CHUNKS * type_size
        _, m = _k_scale_min(row, block_byte, c % _K_CHUNKS * 2 + p)
        return -_f16(row, 4, block_byte + L.Q4_K_DMIN.start) * m

    return scale, min_


def _q4_k_code(row: Row, c: Expr, p: Expr, l: Expr) -> Expr:
    byte = c // _K_CHUNKS * L.Q4_K_TYPE_SIZE + L.Q4_K_QS.start + c % _K_CHUNKS * 32 + l
    return _to_f32((_byte(row, 4, byte) >> _u32(p * 4)) & _u32(0xF))


def _q5_k_code(row: Row, c: Expr, p: Expr, l: Expr) -> Expr:
    block_byte = c // _K_CHUNKS * L.Q5_K_TYPE_SIZE
    low = _byte(row, 4, block_byte + L.Q5_K_QS.start + c % _K_CHUNKS * 32 + l) >> _u32(p * 4)
    high = _byte(row, 4, block_byte + L.Q5_K_QH.start + l) >> _u32(c % _K_CHUNKS * 2 + p)
    return _to_f32((low & _u32(0xF)) | ((high & _u32(1)) << _u32(4)))


# Q6_K: chunk c is one half (128 weights) of block c//2, the 8 sub-blocks of 16 that share
# QL bytes 64*h.. and QH bytes 32*h.. (layouts.py); part p is in quarter p//2.
_Q6_K_HALF = 128


def _q6_k_value(low: Expr, high: Expr, quarter: Expr) -> Expr:
    """A Q6_K weight's code q - 32 from its QL byte `low` and QH byte `high` (quarter 0..3)."""
    low_bits = (low >> _u32(quarter // 2 * 4)) & _u32(0xF)
    high_bits = (high >> _u32(quarter * 2)) & _u32(3)
    return _to_f32(low_bits | (high_bits << _u32(4)), 32)


def _q6_k_sub_scale(d: Expr, scale_byte: Expr) -> Expr:
    """d * the int8 scale in `scale_byte`: a Q6_K sub-block's scale."""
    return d * _int8_to_f32(scale_byte)


def _q6_k_code(row: Row, c: Expr, p: Expr, l: Expr) -> Expr:
    block_byte, h = c // 2 * L.Q6_K_TYPE_SIZE, c % 2
    quarter, pos = p // 2, p % 2 * 16 + l
    low = _byte(row, 2, block_byte + L.Q6_K_QL.start + 64 * h + 32 * (quarter % 2) + pos)
    high = _byte(row, 2, block_byte + L.Q6_K_QH.start + 32 * h + pos)
    return _q6_k_value(low, high, quarter)


def _q6_k_scale(row: Row, c: Expr, p: Expr) -> Expr:
    block_byte = c // 2 * L.Q6_K_TYPE_SIZE
    return _q6_k_sub_scale(_f16(row, 2, block_byte + L.Q6_K_D.start),
                           _byte(row, 2, block_byte + L.Q6_K_SCALES.start + c % 2 * 8 + p))


# Planar Q6_K: chunk c (a half-block) is the 96-byte run at 96 c, its QL then its QH.
def _q6_k_planar_code(row: Row, c: Expr, p: Expr, l: Expr) -> Expr:
    run, quarter, pos = c * L.PLANAR_Q6_K_RUN, p // 2, p % 2 * 16 + l
    low = _byte(row, 4, run + L.PLANAR_Q6_K_HALF_QL.start + 32 * (quarter % 2) + pos)
    high = _byte(row, 4, run + L.PLANAR_Q6_K_HALF_QH.start + pos)
    return _q6_k_value(low, high, quarter)


def _q6_k_planar_scale(row: Row, c: Expr, p: Expr) -> Expr:
    if not isinstance(row, PlanarRow):
        raise TypeError("planar Q6_K rows are read through GemvFormat.row_view (a PlanarRow)")
    n_blocks = row.n_blocks  # half c's 8 scales are bytes 8c.. of the scale plane
    return _q6_k_sub_scale(_f16(row, 4, n_blocks * L.Q6_K_D.start + c // 2 * 2),
                           _byte(row, 4, n_blocks * L.Q6_K_SCALES.start + c * 8 + p))


def _q8_0_code(row: Row, c: Expr, p: Expr, l: Expr) -> Expr:
    return _int8_to_f32(_byte(row, 2, c * L.Q8_0_TYPE_SIZE + L.Q8_0_QS.start + l))


def _q8_0_scale(row: Row, c: Expr, p: Expr) -> Expr:
    return _f16(row, 2, c * L.Q8_0_TYPE_SIZE + L.Q8_0_D.start)


# Float types: a chunk is 16 bytes, one vector load, with no scale.
def _float_code(chunk: int) -> Callable[[Row, Expr, Expr, Expr], Expr]:
    return lambda row, c, p, l: row(c * chunk + l).astype("float32")


def _bf16_code(row: Row, c: Expr, p: Expr, l: Expr) -> Expr:
    return tirx.reinterpret("float32", row(c * 8 + l).astype("uint32") << _u32(16))


_q4_k_scale, _q4_k_min = _k_scale_decoders(L.Q4_K_TYPE_SIZE)
_q5_k_scale, _q5_k_min = _k_scale_decoders(L.Q5_K_TYPE_SIZE)

FORMATS: dict[int, GemvFormat] = {
    f.id: f
    for f in (
        GemvFormat(_T.Q4_K, "uint32", L.Q4_K_TYPE_SIZE, L.QK_K, L.Q4_K_SUB_BLOCK, 2,
                   _q4_k_code, _q4_k_scale, _q4_k_min),
        GemvFormat(_T.Q5_K, "uint32", L.Q5_K_TYPE_SIZE, L.QK_K, L.Q5_K_SUB_BLOCK, 2,
                   _q5_k_code, _q5_k_scale, _q5_k_min),
        GemvFormat(_T.Q6_K, "uint16", L.Q6_K_TYPE_SIZE, L.QK_K, L.Q6_K_SUB_BLOCK,
                   _Q6_K_HALF // L.Q6_K_SUB_BLOCK, _q6_k_code, _q6_k_scale),
        GemvFormat(_T.Q6_K, "uint32", L.Q6_K_TYPE_SIZE, L.QK_K, L.Q6_K_SUB_BLOCK,
                   _Q6_K_HALF // L.Q6_K_SUB_BLOCK, _q6_k_planar_code, _q6_k_planar_scale, planar=True),
        GemvFormat(_T.Q8_0, "uint16", L.Q8_0_TYPE_SIZE, L.QK8_0, L.QK8_0, 1,
                   _q8_0_code, _q8_0_scale),
        GemvFormat(_T.F16, "float16", 2, 1, 8, 1, _float_code(8)),
        GemvFormat(_T.BF16, "uint16", 2, 1, 8, 1, _bf16_code),
        GemvFormat(_T.F32, "float32", 4, 1, 4, 1, _float_code(4)),
    )
}


def gemv_format(ggml_type: int) -> GemvFormat:
    """The format of a ggml type, or of Q6_K_PLANAR."""
    fmt = FORMATS.get(int(ggml_type))
    if fmt is None:
        supported = ", ".join(f.name for f in FORMATS.values())
        raise UnsupportedQuantTypeError(
            f"no GEMV kernel for quant type {GGMLQuantizationType(ggml_type).name} "
            f"(supported: {supported})"
        )
    return fmt


def weight_format(ggml_type: GGMLQuantizationType, q6_k_layout: str) -> GGMLQuantizationType | L.RelaidType:
    """What kernels take for a weight of `ggml_type` under the step variant `q6_k_layout`
    (Q6_K_LAYOUTS): Q6_K_PLANAR for Q6_K re-laid out, else the type itself."""
    return Q6_K_PLANAR if q6_k_layout == "planar" and ggml_type == _T.Q6_K else ggml_type


def _gemv_input(k: int, norm_eps: float | None) -> tuple[list[te.Tensor], te.Tensor]:
    """The GEMV's input x f32[k] and the parameters it comes from: x itself, or with
    `norm_eps` (the normed forms) h and norm_w, x = rmsnorm(h) * norm_w computed inside the
    kernel by `norm.normalize` (stages sumsq and norm: the same arithmetic as `norm.rms_norm`)."""
    if norm_eps is None:
        x = te.placeholder((k,), "float32", name="x")
        return [x], x
    h = te.placeholder((k,), "float32", name="h")
    norm_w = te.placeholder((k,), "float32", name="norm_w")
    return [h, norm_w], normalize(k, norm_eps, h, norm_w)


def _gemv_te(fmt: GemvFormat, n: int, k: int, norm_eps: float | None = None,
             residual: bool = False) -> tirx.PrimFunc:
    w, x_params, y = gemv_tensors(fmt, n, k, norm_eps)
    if not residual:
        return te.create_prim_func([w, *x_params, y])
    # The residual add of `norm.add_rms_norm` (its x + r, here W.x + r) in the epilogue.
    r_in = te.placeholder((n,), "float32", name="r")
    total = te.compute((n,), lambda i: y[i] + r_in[i], name="residual")
    return te.create_prim_func([w, *x_params, r_in, total])


def gemv_tensors(fmt: GemvFormat, n: int, k: int, norm_eps: float | None = None
                 ) -> tuple[te.Tensor, list[te.Tensor], te.Tensor]:
    """The GEMV's stages (module docstring) as te tensors: (W, its x parameters, y = gemv):
    for `_gemv_te`'s kernels and `router.router_gemv_topk`, which ranks y in the same kernel."""
    n_chunks = k // fmt.chunk
    w = te.placeholder((n, fmt.row_words(k)), fmt.word_dtype, name="W")
    x_params, x = _gemv_input(k, norm_eps)

    def row(r: Expr) -> Row:
        return fmt.row_view(lambda i: w[r, i], k)

    def x_at(c: Expr, p: Expr, l: Expr) -> Expr:
        return x[c * fmt.chunk + p * fmt.sub + l]

    l_dot = te.reduce_axis((0, fmt.sub), name="l")
    dot = te.compute(
        (n, n_chunks, fmt.parts),
        lambda r, c, p: te.sum(fmt.code(row(r), c, p, l_dot) * x_at(c, p, l_dot), axis=l_dot),
        name="dot",
    )
    xsum = None
    if fmt.min is not None:
        l_sum = te.reduce_axis((0, fmt.sub), name="l")
        xsum = te.compute((n_chunks, fmt.parts), lambda c, p: te.sum(x_at(c, p, l_sum), axis=l_sum), name="xsum")

    c = te.reduce_axis((0, n_chunks), name="c")
    p = te.reduce_axis((0, fmt.parts), name="p")

    def term(r: Expr) -> Expr:
        value = dot[r, c, p]
        if fmt.scale is not None:
            value = fmt.scale(row(r), c, p) * value
        if fmt.min is not None and xsum is not None:
            value = value + fmt.min(row(r), c, p) * xsum[c, p]
        return value

    y = te.compute((n,), lambda r: te.sum(term(r), axis=[c, p]), name="gemv")
    return w, x_params, y


QkvWeights = list[tuple[te.Tensor, int, int]]


def qkv_row(weights: QkvWeights, r: Expr) -> Row:
    """Row r of the concatenated row space of `weights` ((buffer, first row, rows) each):
    a lazy if_then_else chain on r; each index is clamped into its buffer so that TVM can
    bound it (the untaken branches are never loaded on the GPU)."""

    def word(i: Expr) -> Expr:
        value = None
        for w, first, n in reversed(weights):
            local = tirx.max(tirx.min(r - first, n - 1), 0)
            load = w[local, i]
            value = load if value is None else tirx.if_then_else(r < first + n, load, value)
        return value

    return word


def _first_rows(ns: tuple[int, ...]) -> list[int]:
    """Where each of Q, K (, V) starts in the concatenated row space."""
    return [sum(ns[:j]) for j in range(len(ns))]


def qkv_row_space(fmt: GemvFormat, ns: tuple[int, ...], k: int) -> tuple[QkvWeights, te.Tensor]:
    """The weight placeholders Wq, Wk (, Wv) of a Q/K/V kernel as (buffer, first row, rows) each,
    and the stage W: their rows concatenated, as the dot products read them (the schedule caches
    a lane's chunk of it in registers; the scale decoders read the buffers, `qkv_row`)."""
    ws = [te.placeholder((n, fmt.row_words(k)), fmt.word_dtype, name=f"W{name}")
          for name, n in zip(("q", "k", "v"), ns)]
    weights = list(zip(ws, _first_rows(ns), ns))
    w = te.compute((sum(ns), fmt.row_words(k)), lambda r, i: qkv_row(weights, r)(i), name="W")
    return weights, w


def qkv_outputs(y: te.Tensor, ns: tuple[int, ...]) -> list[te.Tensor]:
    """q, k (, v): the rows of y f32[sum(ns)] that each weight gave, as stages of their own."""

    def copy_out(first: int) -> Callable[[Expr], Expr]:
        return lambda i: y[i + first]

    return [te.compute((n,), copy_out(first), name=name)
            for name, first, n in zip(("q", "k", "v"), _first_rows(ns), ns)]


def _gemv_qkv_te(fmt: GemvFormat, ns: tuple[int, ...], k: int, norm_eps: float | None = None) -> tirx.PrimFunc:
    n_chunks = k // fmt.chunk
    n_total = sum(ns)
    weights, w = qkv_row_space(fmt, ns, k)
    x_params, x = _gemv_input(k, norm_eps)

    def x_at(c: Expr, p: Expr, l: Expr) -> Expr:
        return x[c * fmt.chunk + p * fmt.sub + l]

    l_dot = te.reduce_axis((0, fmt.sub), name="l")
    dot = te.compute(
        (n_total, n_chunks, fmt.parts),
        lambda r, c, p: te.sum(fmt.code(fmt.row_view(lambda i: w[r, i], k), c, p, l_dot) * x_at(c, p, l_dot),
                               axis=l_dot),
        name="dot",
    )
    xsum = None
    if fmt.min is not None:
        l_sum = te.reduce_axis((0, fmt.sub), name="l")
        xsum = te.compute((n_chunks, fmt.parts),
                          lambda c, p: te.sum(x_at(c, p, l_sum), axis=l_sum), name="xsum")
    c = te.reduce_axis((0, n_chunks), name="c")
    p = te.reduce_axis((0, fmt.parts), name="p")

    def term(r: Expr) -> Expr:
        row = fmt.row_view(qkv_row(weights, r), k)  # scales and mins: read once a sub-block, from W*
        value = dot[r, c, p]
        if fmt.scale is not None:
            value = fmt.scale(row, c, p) * value
        if fmt.min is not None and xsum is not None:
            value = value + fmt.min(row, c, p) * xsum[c, p]
        return value

    y = te.compute((n_total,), lambda r: te.sum(term(r), axis=[c, p]), name="gemv")
    return te.create_prim_func([*(wt for wt, _, _ in weights), *x_params, *qkv_outputs(y, ns)])


def gemv_symbol(ggml_type: int, n: int, k: int) -> str:
    """The kernel name of `gemv(ggml_type, n, k)`; needs no compiler (runtime-only TVM)."""
    return f"gemv_{gemv_format(ggml_type).name.lower()}_{n}x{k}"


def gemv(ggml_type: int, n: int, k: int) -> tirx.PrimFunc:
    """y[n] = W[n, k] . x[k] for W in `ggml_type`; params (W words, x f32[k], y f32[n])."""
    func = _gemv_te(gemv_format(ggml_type), n, k)
    return func.with_attr("global_symbol", gemv_symbol(ggml_type, n, k))


def gemv_qkv_symbol(ggml_type: int, n_q: int, n_k: int, n_v: int, k: int) -> str:
    name = gemv_format(ggml_type).name.lower()
    return f"gemv_qkv_{name}_{n_q}x{n_k}x{n_v}x{k}" if n_v else f"gemv_qk_{name}_{n_q}x{n_k}x{k}"


def qkv_rows(n_q: int, n_k: int, n_v: int) -> tuple[int, ...]:
    if n_q <= 0 or n_k <= 0 or n_v < 0:
        raise TensorShapeError(f"gemv_qkv needs n_q, n_k > 0 and n_v >= 0, got {n_q}, {n_k}, {n_v}")
    return (n_q, n_k, n_v) if n_v else (n_q, n_k)


def gemv_qkv(ggml_type: int, n_q: int, n_k: int, n_v: int, k: int) -> tirx.PrimFunc:
    """q, k, v = Wq . x, Wk . x, Wv . x in one kernel, all three weights in `ggml_type`.

    Params (Wq words [n_q, row_words], Wk [n_k, ..], Wv [n_v, ..], x f32[k], q f32[n_q],
    k f32[n_k], v f32[n_v]). n_v = 0 gives the Q+K form (Wq, Wk, x, q, k): for a V of
    another type, which then takes its own `gemv`.
    """
    func = _gemv_qkv_te(gemv_format(ggml_type), qkv_rows(n_q, n_k, n_v), k)
    return func.with_attr("global_symbol", gemv_qkv_symbol(ggml_type, n_q, n_k, n_v, k))


def gemv_normed_symbol(ggml_type: int, n: int, k: int) -> str:
    return f"gemv_normed_{gemv_format(ggml_type).name.lower()}_{n}x{k}"


def gemv_normed(ggml_type: int, n: int, k: int, eps: float) -> tirx.PrimFunc:
    """y = W . (rmsnorm(h) * norm_w): `gemv` with `norm.rms_norm` as its prologue (the
    decode step's fused launches). Params (W words, h f32[k], norm_w f32[k], y f32[n])."""
    func = _gemv_te(gemv_format(ggml_type), n, k, norm_eps=eps)
    return func.with_attr("global_symbol", gemv_normed_symbol(ggml_type, n, k))


def gemv_residual_symbol(ggml_type: int, n: int, k: int) -> str:
    return f"gemv_residual_{gemv_format(ggml_type).name.lower()}_{n}x{k}"


def gemv_residual(ggml_type: int, n: int, k: int) -> tirx.PrimFunc:
    """y = W . x + r: `gemv` with the residual add as its epilogue (the attention output
    projection of the decode step's fused launches). Params (W words, x f32[k], r f32[n],
    y f32[n])."""
    func = _gemv_te(gemv_format(ggml_type), n, k, residual=True)
    return func.with_attr("global_symbol", gemv_residual_symbol(ggml_type, n, k))


def gemv_qkv_normed_symbol(ggml_type: int, n_q: int, n_k: int, n_v: int, k: int) -> str:
    return gemv_qkv_symbol(ggml_type, n_q, n_k, n_v, k).replace("gemv_", "gemv_normed_", 1)


def gemv_qkv_normed(ggml_type: int, n_q: int, n_k: int, n_v: int, k: int, eps: float) -> tirx.PrimFunc:
    """`gemv_qkv` of x = rmsnorm(h) * norm_w computed in the kernel (`gemv_normed`).
    Params (Wq, Wk[, Wv], h f32[k], norm_w f32[k], q, k[, v])."""
    func = _gemv_qkv_te(gemv_format(ggml_type), qkv_rows(n_q, n_k, n_v), k, norm_eps=eps)
    return func.with_attr("global_symbol", gemv_qkv_normed_symbol(ggml_type, n_q, n_k, n_v, k))


def weight_view(ggml_type: int, data: npt.NDArray[np.uint8]) -> np.ndarray:
    """GGUF row bytes uint8[..., row_bytes] -> the word array the kernels take (a view of the
    same memory when `data` is contiguous, as a GGUF memmap is)."""
    fmt = gemv_format(ggml_type)
    data = np.ascontiguousarray(data)
    if data.dtype != np.uint8 or data.shape[-1] % fmt.word_bytes != 0:
        raise TensorShapeError(
            f"{fmt.name} weights must be uint8 rows of a multiple of {fmt.word_bytes} bytes, "
            f"got {data.dtype} {data.shape}"
        )
    return data.view(np.dtype(fmt.word_dtype))


def dequantize_rows(ggml_type: int, data: npt.NDArray[np.uint8], k: int) -> np.ndarray:
    """Rows uint8[..., row_bytes] of k weights in format `ggml_type` (a ggml type or
    Q6_K_PLANAR) -> float32[..., k]."""
    if int(ggml_type) == Q6_K_PLANAR:
        return kquants.dequantize_q6_k_planar(data, k)
    return quant.dequantize(ggml_type, data, (*data.shape[:-1], k))


def gemv_reference(
    ggml_type: int, data: npt.NDArray[np.uint8], x: npt.NDArray[np.float32]
) -> np.ndarray:
    """numpy oracle: dequantize the rows uint8[n, row_bytes] (GGUF blocks, or planar Q6_K for
    Q6_K_PLANAR), multiply in float64."""
    w = dequantize_rows(ggml_type, data, x.shape[-1])
    return (w.astype(np.float64) @ x.astype(np.float64)).astype(np.float32)


def gemv_experts_reference(
    ggml_type: int,
    data: npt.NDArray[np.uint8],
    ids: npt.NDArray[np.int32],
    x: npt.NDArray[np.float32],
) -> np.ndarray:
    """numpy oracle of the MoE kernels' per-expert GEMVs (`kernels.moe`): y[i] = W[ids[i]] . x
    (or . x[i]) for data uint8[E, n, row_bytes], x f32[k] or f32[n_used, k]."""
    xs = x if x.ndim == 2 else np.broadcast_to(x, (len(ids), x.shape[-1]))
    return np.stack([gemv_reference(ggml_type, data[e], xi) for e, xi in zip(ids, xs)])


def gemv_qkv_reference(
    ggml_type: int,
    q_data: npt.NDArray[np.uint8],
    k_data: npt.NDArray[np.uint8],
    v_data: npt.NDArray[np.uint8] | None,
    x: npt.NDArray[np.float32],
) -> tuple[np.ndarray, ...]:
    """numpy oracle of gemv_qkv: (q, k, v), or (q, k) where v_data is None (the n_v = 0 form)."""
    datas = [q_data, k_data] + ([] if v_data is None else [v_data])
    return tuple(gemv_reference(ggml_type, d, x) for d in datas)


def gemv_normed_reference(
    ggml_type: int, data: npt.NDArray[np.uint8], h: npt.NDArray[np.float32],
    norm_w: npt.NDArray[np.float32], eps: float,
) -> np.ndarray:
    """numpy oracle of gemv_normed (and, per weight, of gemv_qkv_normed)."""
    return gemv_reference(ggml_type, data, rms_norm_reference(h, norm_w, eps))


def gemv_residual_reference(
    ggml_type: int, data: npt.NDArray[np.uint8], x: npt.NDArray[np.float32], r: npt.NDArray[np.float32]
) -> np.ndarray:
    """numpy oracle of gemv_residual: the GEMV in float64, the add in float32 (add_rms_norm's)."""
    return (gemv_reference(ggml_type, data, x) + r).astype(np.float32)
