"""Token sampling on the device: unscheduled compute + a numpy reference that is the same
algorithm, operation for operation, so that the two pick the same token for the same seed.

`sample_candidates(V)`: (logits f32[V], sample_params f32[3], rng uint32[2]) ->
    best uint64[B], cand uint64[B, K_MAX]: per block of SLICE logits (B = ceil(V / SLICE)),
    its winner of an unfiltered draw and, when the draw will use them, its K_MAX highest
    packed keys, sorted.
`sample_token(V)`: (logits f32[V], sample_params f32[3] = (temperature, top_p, top_k),
    rng uint32[2] = (seed, counter), best, cand) -> next int32[1], path int32[1], and
    rng[1] += 1 in place. The decode step calls the two back to back (model/qwen3moe.py,
    `sample`); `path` says how the token was drawn (PATH_*).
`advance()`: (next int32[1], token int32[1], pos int32[1]) -> token = next, pos += 1 in place.

In-place convention: a mutated buffer is an ordinary parameter that the kernel reads and
writes; parameters are the inputs in order, then the fresh outputs. Relax calls these with
`call_tir_inplace`:
    sample_token: args (logits, sample_params, rng, best, cand), inplace_indices [-1, 2, -1],
                  out_sinfo [next, rng, path]  -> PrimFunc (logits, sample_params, rng, best,
                                                            cand, next, path)
    advance:      args (next, token, pos), inplace_indices [1, 2], out_sinfo [token, pos]

The distribution (every step exact or in integers, so that it does not depend on the
summation order; keys are packed (order_key(logit) << 32 | ~index) uint64 values, whose max
is the highest logit with ties to the lowest index):
  1. greedy: the highest packed key. temperature <= 0 (or NaN) stops here.
  2. top-k (0 < k < V, k = int(top_k)): the k-th highest order key t (the smallest t with
     #{i: key_i > t} < k). Kept: key_i >= t, so tokens tied with the k-th are all kept (as
     Hugging Face's TopKLogitsWarper does).
  3. top-p (top_p < 1): over the top-k survivors, masses q_i = uint64(exp((l_i - max) / T)
     * 2^32) (exact integer sums, below 2^50 so exact in float64 too); a survivor is kept iff
     the mass of the keys strictly above its key is < top_p * sum_{survivors} q_i (float64),
     and the top key always: the smallest nucleus reaching top_p, ties at its edge all kept.
  4. sample: Gumbel-max, argmax over kept i of l_i / T + g_i with g_i = -log(-log1p(-u_i)),
     u_i uniform from a counter-based hash: fmix32(i ^ fmix32(counter ^ fmix32(seed ^ phi)))
     (MurmurHash3's finaliser; no generator state, so every token's noise is independent of
     the thread that computes it). The argmax is a draw from softmax(l / T) restricted to
     the kept tokens, without normalising or any prefix sum. Ties to the lowest index.

How the kernels compute it (three paths, `path`):
  PATH_WINNERS (greedy, or sampling with no filter): sample_candidates' blocks each reduce
    their slice to one winner (the highest key, or the highest packed Gumbel score), and
    sample_token takes the best of the B winners.
  PATH_CANDIDATES (sampling with 0 < k <= K_MAX, k < V, with or without top-p): each block
    finds its slice's K_MAX highest keys, sorted (a bitonic top-k in place); sample_token merges
    the B sorted lists highest first (a k-way merge, one block-wide max a round) until past
    the k-th key and every key tied with it (K_MAX + 1 rounds at most), runs step 3 down the
    merged list (a scan of at most K_MAX entries) and step 4 over the kept ones. Exact when
    the candidates hold every kept token, which sample_token checks.
  PATH_ONE_BLOCK (the fallback, slow: up to 64 passes over V on one SM): the candidates
    cannot prove the kept set, and sample_token runs steps 1-4 over the whole vocabulary in
    one block, the bisections by counts: top-k by bisection over the 2^32 order keys (32
    rounds, each a parallel count), then top-p by bisection over the keys with the masses
    (the smallest key t >= the top-k cut with sum_{key_i > t} q_i < top_p * total), kept:
    key_i >= t. It runs when
      - top-p without top-k (top_k = 0 or >= V, top_p < 1): the kept set can reach any
        token, and the total mass needs all of them;
      - top-k with k > K_MAX;
      - a block's K_MAX candidates are all >= the cut (it may hold more kept tokens: ties at
        the k-th key), or more than K_MAX tokens are >= the cut over all blocks (ties).
    The first two follow from the settings alone: `sampler_path` (sampling_params.py) tells
    them, and `sparkinfer run` reports it.
Determinism: given the same float32 exp/log/log1p results, the kernels and the reference
agree bit for bit. Across implementations (numpy, LLVM's libm, CUDA) those functions may
differ in the last bit, which changes the token only when two Gumbel keys, or a mass and
its threshold, are within a few ulps: measure-zero in practice, and the tests say so.
"""

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from tvm import tirx

# How `sample_token` drew the token (its `path` output), and which a setting takes: defined
# beside the sampling arguments, where the runtime reads them without importing kernels.
from sparkinfer.sampling_params import (  # noqa: F401 - re-exported
    PATH_CANDIDATES,
    PATH_NAMES,
    PATH_ONE_BLOCK,
    PATH_WINNERS,
    SAMPLER_K_MAX,
    sampler_path,
)

Expr = tirx.Expr

# Bisection over uint32 keys: 32 halvings take any range down to one key.
SEARCH_ROUNDS = 32
# q_i = p_i * 2^32 with p_i = exp(z_i) <= 1: a vocabulary's sum stays below 2^50, exact in
# uint64 and in float64; tokens with p_i < 2^-32 of the top one carry no mass (<4e-5 in all).
_MASS_SCALE = 2.0**32
_GOLDEN = 0x9E3779B9
_FMIX1, _FMIX2 = 0x85EBCA6B, 0xC2B2AE35
_SIGN = 0x80000000
_U32 = 0xFFFFFFFF
# Candidates: blocks of SLICE logits each keep their K_MAX highest; a top-k of k <= K_MAX over
# them is exact (the module docstring says when it is not proven and what runs instead).
SLICE = 2048
K_MAX = SAMPLER_K_MAX
# Lanes of a bitonic sort step (a CUDA block's threads at most); more pairs go several a lane.
SORT_LANES = 1024


# ---- TIR expressions --------------------------------------------------------------------
# Plain tirx, not TVMScript: runtime-only TVM (the GPU machines) lacks the script parser, and
# this module must import there (the tests look kernels up by `sample_token_symbol`).


def _u32(value: int) -> Expr:
    return tirx.const(value, "uint32")


def _let(value: Expr, body: Callable[[Expr], Expr], dtype: str = "uint32") -> Expr:
    """body(v) with v bound to value once. Using an expression twice would duplicate its
    tree (exponentially so in nested hashes) and any Let inside it, which is ill-formed."""
    var = tirx.Var("v", dtype)
    return tirx.Let(var, value, body(var))


def _order_key(x: Expr) -> Expr:
    """float32 -> uint32 with the same order (-inf < ... < -0.0 < +0.0 < ... < +inf)."""
    return _let(tirx.reinterpret("uint32", x), lambda bits: tirx.Select(
        bits >= _u32(_SIGN), bits ^ _u32(_U32), bits | _u32(_SIGN)))


def _from_order_key(key: Expr) -> Expr:
    return _let(key, lambda k: tirx.reinterpret("float32", tirx.Select(
        k >= _u32(_SIGN), k ^ _u32(_SIGN), k ^ _u32(_U32))))


def _pack(key: Expr, index: Expr) -> Expr:
    """(key, index) as one uint64 whose max is the max key, ties to the lowest index."""
    low = _u32(_U32) - index.astype("uint32")
    return (key.astype("uint64") << tirx.const(32, "uint64")) | low.astype("uint64")


def _unpack_index(packed: Expr) -> Expr:
    low = (packed & tirx.const(_U32, "uint64")).astype("uint32")
    return (_u32(_U32) - low).astype("int32")


def _high_key(packed: Expr) -> Expr:
    return (packed >> tirx.const(32, "uint64")).astype("uint32")


def _mul32(a: Expr, b: int) -> Expr:
    """a * b mod 2^32 for uint32 a. TVM's LLVM backend emits unsigned arithmetic of 32 bits
    and more with `nuw` (wrapping is undefined, and LLVM folds on that), so the wrapping
    product is formed in uint64, where it cannot overflow, and truncated."""
    product = a.astype("uint64") * tirx.const(b, "uint64")
    return (product & tirx.const(_U32, "uint64")).astype("uint32")


def _fmix32(x: Expr) -> Expr:
    """MurmurHash3's 32-bit finaliser: a bijection with full avalanche."""
    return _let(x, lambda x0: _let(
        _mul32(x0 ^ (x0 >> _u32(16)), _FMIX1), lambda b: _let(
            _mul32(b ^ (b >> _u32(13)), _FMIX2), lambda c: c ^ (c >> _u32(16)))))


def _draw_key(seed: Expr, counter: Expr) -> Expr:
    return _fmix32(counter ^ _fmix32(seed ^ _u32(_GOLDEN)))


def _gumbel(key: Expr, index: Expr) -> Expr:
    """Gumbel noise for token `index` of the draw with key `key`: u in (0, 1] from a hash of
    (index, key), and -log1p(-u) is Exp(1) with full precision near 0, where the large
    (winning) noise values come from."""
    bits = _fmix32(index.astype("uint32") ^ key)
    half, scale = tirx.const(0.5, "float32"), tirx.const(2.0**-32, "float32")
    u = (bits.astype("float32") + half) * scale
    return -tirx.log(-tirx.log1p(-u))


def _share(top_p: Expr, total: Expr) -> Expr:
    """top_p * total in float64: total < 2^50 converts exactly, so the product is one
    rounding, the same in every implementation."""
    return top_p.astype("float64") * total.astype("float64")


def _score(logit: Expr, temperature: Expr, key: Expr, index: Expr) -> Expr:
    """The Gumbel-max score l / T + g of a token."""
    return logit / temperature + _gumbel(key, index)


def _packed_score(logit: Expr, temperature: Expr, key: Expr, index: Expr) -> Expr:
    """A token's Gumbel-max score packed with its index (`_pack`): the max of these is the
    draw, ties to the lowest index. Every path's draw goes through it, so all draw alike."""
    return _pack(_order_key(_score(logit, temperature, key, index)), index)


def _mass(logit: Expr, lmax: Expr, temperature: Expr) -> Expr:
    """q = uint64(exp((logit - lmax) / T) * 2^32), the token's integer mass."""
    p = tirx.exp((logit - lmax) / temperature)
    return (p * tirx.const(_MASS_SCALE, "float32")).astype("uint64")


def _increment(counter: Expr) -> Expr:
    """counter + 1 mod 2^32, widened: the uint32 increment's wrap is undefined on LLVM."""
    one, mask = tirx.const(1, "uint64"), tirx.const(_U32, "uint64")
    return ((counter.astype("uint64") + one) & mask).astype("uint32")


def sample_token_symbol(vocab: int) -> str:
    """The kernel name of `sample_token(vocab)`; needs no compiler (runtime-only TVM)."""
    return f"sample_token_{vocab}"


def sample_candidates_symbol(vocab: int) -> str:
    """The kernel name of `sample_candidates(vocab)`."""
    return f"sample_candidates_{vocab}"


# ---- kernels ----------------------------------------------------------------------------


def _top_k(sample_params: tirx.Buffer, vocab: int) -> Expr:
    """k = int(top_k) clamped to [0, V], as the reference truncates it."""
    k = tirx.max(tirx.min(sample_params[2], tirx.const(vocab, "float32")), tirx.const(0.0, "float32"))
    return k.astype("int32")


def uses_candidates(sample_params: tirx.Buffer, vocab: int, k_max: int) -> Expr:
    """Whether the draw is over the blocks' candidates: sampling (temperature > 0) with a
    top-k cut (0 < k < V) that the candidates hold (k <= k_max)."""
    k = _top_k(sample_params, vocab)
    return tirx.all(sample_params[0] > tirx.const(0.0, "float32"), k > 0, k < vocab, k <= k_max)


def slices(vocab: int, slice_: int) -> int:
    """Candidate blocks: slices of `slice_` logits covering the vocabulary."""
    return -(-vocab // slice_)


def _pair_low(pair: Expr, log_half: Expr) -> Expr:
    """The lower index of compare-exchange pair `pair` at stride 2^log_half: `pair` with a 0
    bit inserted at position log_half."""
    one = tirx.const(1, "int32")
    return ((pair >> log_half) << (log_half + one)) | (pair & ((one << log_half) - one))


def _bitonic_top(size: int, top: int) -> Callable[..., None]:
    """A T.macro leaving in keys[0:top] the `top` highest of keys[0:size] (uint64, both powers
    of two), sorted descending; the rest of keys is scratch. Bitonic top-k:
      1. runs of `top` sorted: the first log2(top) phases of a bitonic sort in the form whose
         first step of each phase compares element i with its mirror in the pair of runs
         being merged (so every run sorts the same way);
      2. log2(size / top) halvings: runs 2j and 2j + 1 -> run j, element i the max of run 2j's
         i-th and run 2j + 1's mirror: a bitonic run holding the top of both, sorted by
         log2(top) half-cleaner steps.
    A step's work is dealt to lanes (SORT_LANES at most, up to size / 2 items each a step):
    a lane reads all its items before writing any, so that a parallel schedule needs one
    barrier between the reads and the writes of a step and one after; lanes with no item in
    a step skip it inside the step, never around it (a barrier under a condition that some
    threads do not take would hang)."""
    from tvm.script import tirx as T

    pairs = size // 2
    lanes = sort_lanes(size)
    per_lane = pairs // lanes
    log_top = top.bit_length() - 1
    rounds = (size // top).bit_length() - 1

    @T.macro
    def compare_exchange(keys, pair, log_half, mirror, active, vl):
        # pair t: element t with a 0 bit inserted at log_half, and that one xor mirror
        for u in range(per_lane):
            if u * lanes + vl < active[0]:
                pair[2 * u] = keys[_pair_low(u * lanes + vl, log_half[0])]
                pair[2 * u + 1] = keys[_pair_low(u * lanes + vl, log_half[0]) ^ mirror[0]]
        for u in range(per_lane):
            if u * lanes + vl < active[0]:
                keys[_pair_low(u * lanes + vl, log_half[0])] = T.max(pair[2 * u], pair[2 * u + 1])
                keys[_pair_low(u * lanes + vl, log_half[0]) ^ mirror[0]] = T.min(pair[2 * u], pair[2 * u + 1])

    @T.macro
    def sort_top(keys, pair, log_half, mirror, active):
        active[0] = pairs
        for p in range(log_top):
            for q in range(p + 1):
                log_half[0] = p - q
                # the phase's first step pairs i with its mirror, the others with i + 2^(p-q)
                mirror[0] = T.Select(q == 0, T.shift_left(2, p) - 1, T.shift_left(1, p - q))
                for lane in range(lanes):
                    with T.sblock("sort_runs"):
                        vl = T.axis.spatial(lanes, lane)
                        compare_exchange(keys, pair, log_half, mirror, active, vl)
        for r in range(rounds):
            # item t of the size >> (r + 1) kept: element t % top of run t // top
            active[0] = T.shift_right(size, r + 1)
            for lane in range(lanes):
                with T.sblock("halve"):
                    vl = T.axis.spatial(lanes, lane)
                    for u in range(per_lane):
                        if u * lanes + vl < active[0]:
                            pair[2 * u] = keys[((u * lanes + vl) // top) * 2 * top + (u * lanes + vl) % top]
                            pair[2 * u + 1] = keys[((u * lanes + vl) // top) * 2 * top + 2 * top - 1
                                                   - (u * lanes + vl) % top]
                    for u in range(per_lane):
                        if u * lanes + vl < active[0]:
                            keys[u * lanes + vl] = T.max(pair[2 * u], pair[2 * u + 1])
            active[0] = T.shift_right(size, r + 2)
            for q in range(log_top):
                log_half[0] = log_top - 1 - q
                mirror[0] = T.shift_left(1, log_top - 1 - q)
                for lane in range(lanes):
                    with T.sblock("merge_runs"):
                        vl = T.axis.spatial(lanes, lane)
                        compare_exchange(keys, pair, log_half, mirror, active, vl)

    return sort_top


def sort_lanes(size: int) -> int:
    """The lanes of `_bitonic_top(size, ...)`'s steps (a schedule binds them to threads)."""
    return min(size // 2, SORT_LANES)


def sample_candidates(vocab: int, slice_: int = SLICE, k_max: int = K_MAX) -> tirx.PrimFunc:
    """Params (logits f32[V], sample_params f32[3], rng uint32[2], best uint64[B],
    cand uint64[B, k_max]), B = ceil(V / slice_) blocks of `slice_` logits.

    best[b]: block b's winner of an unfiltered draw as a packed uint64: the highest
    (order_key(l_i / T + g_i), ~i) when sampling, the highest (order_key(l_i), ~i) when greedy.
    cand[b]: when `uses_candidates`, block b's k_max highest (order_key(l_i), ~i), descending
    (a short last block is padded with 0, below every token); otherwise not written.
    """
    from tvm.script import tirx as T

    n, s, kk = vocab, slice_, k_max
    nb = slices(vocab, slice_)
    assert s & (s - 1) == 0 and kk & (kk - 1) == 0 and kk <= s, (s, kk)
    sort_top = _bitonic_top(s, kk)
    per_lane = s // 2 // sort_lanes(s)

    # fmt: off
    @T.prim_func(s_tir=True)
    def candidates(logits: T.Buffer((n,), "float32"), sample_params: T.Buffer((3,), "float32"),
                   rng: T.Buffer((2,), "uint32"), best: T.Buffer((nb,), "uint64"),
                   cand: T.Buffer((nb, kk), "uint64")):
        for blk in range(nb):
            with T.sblock("slice"):
                vb = T.axis.spatial(nb, blk)
                # all the block's own (a CPU schedule runs the blocks in parallel)
                keys = T.sblock_alloc_buffer((s,), "uint64")
                key = T.sblock_alloc_buffer((1,), "uint32", scope="local")
                pair = T.sblock_alloc_buffer((2 * per_lane,), "uint64", scope="local")
                log_half = T.sblock_alloc_buffer((1,), "int32", scope="local")
                mirror = T.sblock_alloc_buffer((1,), "int32", scope="local")
                active = T.sblock_alloc_buffer((1,), "int32", scope="local")
                top = T.sblock_alloc_buffer((1,), "uint64", scope="local")
                drawn = T.sblock_alloc_buffer((1,), "uint64", scope="local")
                # the winner: greedy's plain max apart, so that it stays a few loads a token
                # (each reduction into its own register: one writer each, an allreduce each)
                if sample_params[0] > T.float32(0.0):
                    key[0] = _draw_key(rng[0], rng[1])
                    for i in range(s):
                        with T.sblock("best"):
                            vi = T.axis.reduce(s, i)
                            with T.init():
                                drawn[0] = T.uint64(0)
                            drawn[0] = T.max(drawn[0], T.if_then_else(vb * s + vi < n, _packed_score(
                                logits[vb * s + vi], sample_params[0], key[0], vb * s + vi),
                                T.uint64(0)))
                    best[vb] = drawn[0]
                else:
                    for i in range(s):
                        with T.sblock("top"):
                            vi = T.axis.reduce(s, i)
                            with T.init():
                                top[0] = T.uint64(0)
                            top[0] = T.max(top[0], T.if_then_else(
                                vb * s + vi < n, _pack(_order_key(logits[vb * s + vi]), vb * s + vi), T.uint64(0)))
                    best[vb] = top[0]
                # the same in every thread: steps with barriers may run under it
                if T.tvm_thread_invariant(uses_candidates(sample_params, n, kk)):
                    for i in range(s):
                        with T.sblock("load"):
                            vi = T.axis.spatial(s, i)
                            keys[vi] = T.if_then_else(vb * s + vi < n, _pack(
                                _order_key(logits[vb * s + vi]), vb * s + vi), T.uint64(0))
                    sort_top(keys, pair, log_half, mirror, active)
                    for j in range(kk):
                        with T.sblock("emit"):
                            vj = T.axis.spatial(kk, j)
                            cand[vb, vj] = keys[vj]
    # fmt: on

    return candidates.with_attr("global_symbol", sample_candidates_symbol(vocab))


def sample_token(vocab: int, slice_: int = SLICE, k_max: int = K_MAX) -> tirx.PrimFunc:
    """Params (logits f32[V], sample_params f32[3], rng uint32[2] (in place), best uint64[B],
    cand uint64[B, k_max] (`sample_candidates`' outputs for the same logits), next int32[1],
    path int32[1]).

    One outer unit loop holds everything, so that a schedule can make it one thread block;
    the scalar state is per-thread ("local") and updated by plain statements that every
    thread runs alike, between the block-wide steps. `path` records which way the token was
    drawn (the module docstring's PATH_WINNERS, PATH_CANDIDATES or PATH_ONE_BLOCK); the
    one-block steps run only on PATH_ONE_BLOCK.
    """
    from tvm.script import tirx as T

    n, kk, sl = vocab, k_max, slice_
    nb = slices(vocab, slice_)

    # fmt: off
    @T.prim_func(s_tir=True)
    def sample(logits: T.Buffer((n,), "float32"), sample_params: T.Buffer((3,), "float32"),
               rng: T.Buffer((2,), "uint32"), best: T.Buffer((nb,), "uint64"),
               cand: T.Buffer((nb, kk), "uint64"), next_token: T.Buffer((1,), "int32"),
               path: T.Buffer((1,), "int32")):
        top = T.sblock_alloc_buffer((1,), "uint64", scope="local")
        count = T.sblock_alloc_buffer((1,), "int32", scope="local")
        mass = T.sblock_alloc_buffer((1,), "uint64", scope="local")
        total = T.sblock_alloc_buffer((1,), "uint64", scope="local")
        win = T.sblock_alloc_buffer((1,), "uint64", scope="local")
        # Scalars every thread keeps alike: search bounds, cuts, the draw's key, result.
        lo = T.sblock_alloc_buffer((1,), "uint32", scope="local")
        hi = T.sblock_alloc_buffer((1,), "uint32", scope="local")
        mid = T.sblock_alloc_buffer((1,), "uint32", scope="local")
        cut = T.sblock_alloc_buffer((1,), "uint32", scope="local")
        lmax = T.sblock_alloc_buffer((1,), "float32", scope="local")
        k = T.sblock_alloc_buffer((1,), "int32", scope="local")
        key = T.sblock_alloc_buffer((1,), "uint32", scope="local")
        counter = T.sblock_alloc_buffer((1,), "uint32", scope="local")
        choice = T.sblock_alloc_buffer((1,), "int32", scope="local")
        mode = T.sblock_alloc_buffer((1,), "int32", scope="local")
        winner = T.sblock_alloc_buffer((1,), "uint64", scope="local")
        unproven = T.sblock_alloc_buffer((1,), "int32", scope="local")
        drawn = T.sblock_alloc_buffer((1,), "uint64", scope="local")
        run = T.sblock_alloc_buffer((1,), "uint64", scope="local")
        above = T.sblock_alloc_buffer((1,), "uint64", scope="local")
        this_key = T.sblock_alloc_buffer((1,), "uint32", scope="local")
        prev_key = T.sblock_alloc_buffer((1,), "uint32", scope="local")
        front = T.sblock_alloc_buffer((1,), "uint64", scope="local")
        more = T.sblock_alloc_buffer((1,), "int32", scope="local")
        # the merged candidates (the highest k_max + 1, descending), each block's next one
        # to merge, and the survivors' masses
        merged = T.sblock_alloc_buffer((kk + 1,), "uint64")
        heads = T.sblock_alloc_buffer((nb,), "int32")
        masses = T.sblock_alloc_buffer((kk,), "uint64")
        for _ in range(1):
            # Read before any thread can write it back (the reductions below are barriers).
            counter[0] = rng[1]
            # 1. greedy, or a draw with no filter: the best of the blocks' winners.
            for b in range(nb):
                with T.sblock("winner"):
                    vb = T.axis.reduce(nb, b)
                    with T.init():
                        winner[0] = T.uint64(0)
                    winner[0] = T.max(winner[0], best[vb])
            choice[0] = _unpack_index(winner[0])
            mode[0] = PATH_WINNERS
            if sample_params[0] > T.float32(0.0):
                k[0] = _top_k(sample_params, n)
                if uses_candidates(sample_params, n, kk):
                    mode[0] = PATH_CANDIDATES
                elif (k[0] > 0 and k[0] < n) or sample_params[1] < T.float32(1.0):
                    mode[0] = PATH_ONE_BLOCK
            # 2. top-k (and top-p) over the merged candidates, when they prove the kept set.
            if T.tvm_thread_invariant(mode[0] == PATH_CANDIDATES):
                for j in range(kk + 1):
                    with T.sblock("clear"):
                        vj = T.axis.spatial(kk + 1, j)
                        merged[vj] = T.uint64(0)
                for b in range(nb):
                    with T.sblock("heads"):
                        vb = T.axis.spatial(nb, b)
                        heads[vb] = 0
                # Merge the blocks' sorted lists, highest first, until past the k-th and
                # below its key: the k-th's key is the cut; k_max + 1 at most.
                more[0] = 1
                for r in range(kk + 1):
                    if T.tvm_thread_invariant(more[0] == 1):
                        for b in range(nb):
                            with T.sblock("front"):
                                vb = T.axis.reduce(nb, b)
                                with T.init():
                                    front[0] = T.uint64(0)
                                front[0] = T.max(front[0], T.if_then_else(
                                    heads[vb] < kk, cand[vb, T.min(heads[vb], kk - 1)], T.uint64(0)))
                        merged[r] = front[0]
                        for b in range(nb):
                            with T.sblock("advance_head"):
                                vb = T.axis.spatial(nb, b)
                                heads[vb] = heads[vb] + T.Select(_unpack_index(front[0]) // sl == vb, 1, 0)
                        if r == k[0] - 1:
                            cut[0] = _high_key(front[0])
                        more[0] = T.Select(T.Or(r + 1 < k[0], _high_key(front[0]) >= cut[0]), 1, 0)
                for b in range(nb):
                    with T.sblock("unproven"):
                        vb = T.axis.reduce(nb, b)
                        with T.init():
                            unproven[0] = 0
                        unproven[0] = unproven[0] + T.Select(_high_key(cand[vb, kk - 1]) >= cut[0], 1, 0)
                # a block whose k_max candidates are all kept may hold more kept tokens; the
                # (k_max + 1)-th merged one kept too means more kept tokens than k_max
                if unproven[0] > 0 or more[0] == 1:
                    mode[0] = PATH_ONE_BLOCK
            if T.tvm_thread_invariant(mode[0] == PATH_CANDIDATES):
                if T.tvm_thread_invariant(sample_params[1] < T.float32(1.0)):
                    lmax[0] = _from_order_key(_high_key(merged[0]))
                    for j in range(kk):
                        with T.sblock("masses"):
                            vj = T.axis.spatial(kk, j)
                            masses[vj] = T.if_then_else(
                                _high_key(merged[vj]) >= cut[0],
                                _mass(_from_order_key(_high_key(merged[vj])), lmax[0], sample_params[0]),
                                T.uint64(0))
                    total[0] = T.uint64(0)
                    for j in range(kk):
                        total[0] = total[0] + masses[j]
                    # Down the sorted survivors: a key is kept iff the mass strictly above it
                    # is short of top_p (the top key always); the last kept key is the cut.
                    run[0] = T.uint64(0)
                    above[0] = T.uint64(0)
                    hi[0] = _high_key(merged[0])
                    for j in range(kk):
                        this_key[0] = _high_key(merged[j])
                        prev_key[0] = _high_key(merged[T.max(j - 1, 0)])
                        if this_key[0] != prev_key[0]:
                            above[0] = run[0]
                        if this_key[0] >= cut[0] and T.Cast("float64", above[0]) < _share(
                                sample_params[1], total[0]):
                            hi[0] = this_key[0]
                        run[0] = run[0] + masses[j]
                    cut[0] = hi[0]
                key[0] = _draw_key(rng[0], counter[0])
                for j in range(kk):
                    with T.sblock("draw"):
                        vj = T.axis.reduce(kk, j)
                        with T.init():
                            drawn[0] = T.uint64(0)
                        drawn[0] = T.max(drawn[0], T.if_then_else(
                            _high_key(merged[vj]) >= cut[0],
                            _packed_score(_from_order_key(_high_key(merged[vj])), sample_params[0], key[0],
                                          _unpack_index(merged[vj])),
                            T.uint64(0)))
                choice[0] = _unpack_index(drawn[0])
            # 3. otherwise the whole vocabulary in this block (steps 1-4 below).
            if mode[0] == PATH_ONE_BLOCK:
                for i in range(n):
                    with T.sblock("top"):
                        vi = T.axis.reduce(n, i)
                        with T.init():
                            top[0] = T.uint64(0)
                        top[0] = T.max(top[0], _pack(_order_key(logits[vi]), vi))
                choice[0] = _unpack_index(top[0])
                if sample_params[0] > T.float32(0.0):
                    lmax[0] = _from_order_key(_high_key(top[0]))
                    # top-k cut: smallest key t with fewer than k keys above it.
                    k[0] = T.Cast("int32", T.max(T.min(sample_params[2], T.float32(n)), T.float32(0)))
                    lo[0] = T.uint32(0)
                    hi[0] = T.uint32(0)
                    if k[0] > 0 and k[0] < n:
                        hi[0] = _high_key(top[0])
                    for _r in range(SEARCH_ROUNDS):
                        if lo[0] < hi[0]:
                            mid[0] = lo[0] + ((hi[0] - lo[0]) >> T.uint32(1))
                            for i in range(n):
                                with T.sblock("topk_count"):
                                    vi = T.axis.reduce(n, i)
                                    with T.init():
                                        count[0] = 0
                                    count[0] = count[0] + T.Select(
                                        _order_key(logits[vi]) > mid[0], 1, 0)
                            if count[0] < k[0]:
                                hi[0] = mid[0]
                            else:
                                lo[0] = mid[0] + T.uint32(1)
                    cut[0] = lo[0]
                    # top-p cut over the top-k survivors, in integer masses.
                    if sample_params[1] < T.float32(1.0):
                        for i in range(n):
                            with T.sblock("topp_total"):
                                vi = T.axis.reduce(n, i)
                                with T.init():
                                    total[0] = T.uint64(0)
                                total[0] = total[0] + T.if_then_else(
                                    _order_key(logits[vi]) >= cut[0],
                                    _mass(logits[vi], lmax[0], sample_params[0]), T.uint64(0))
                        hi[0] = _high_key(top[0])
                        for _r in range(SEARCH_ROUNDS):
                            if lo[0] < hi[0]:
                                mid[0] = lo[0] + ((hi[0] - lo[0]) >> T.uint32(1))
                                for i in range(n):
                                    with T.sblock("topp_mass"):
                                        vi = T.axis.reduce(n, i)
                                        with T.init():
                                            mass[0] = T.uint64(0)
                                        mass[0] = mass[0] + T.if_then_else(
                                            _order_key(logits[vi]) > mid[0],
                                            _mass(logits[vi], lmax[0], sample_params[0]), T.uint64(0))
                                if T.Cast("float64", mass[0]) < _share(sample_params[1], total[0]):
                                    hi[0] = mid[0]
                                else:
                                    lo[0] = mid[0] + T.uint32(1)
                        cut[0] = lo[0]
                    key[0] = _draw_key(rng[0], counter[0])
                    for i in range(n):
                        with T.sblock("sample"):
                            vi = T.axis.reduce(n, i)
                            with T.init():
                                win[0] = T.uint64(0)
                            win[0] = T.max(win[0], T.if_then_else(
                                _order_key(logits[vi]) >= cut[0],
                                _packed_score(logits[vi], sample_params[0], key[0], vi),
                                T.uint64(0)))
                    choice[0] = _unpack_index(win[0])
            with T.sblock("write"):
                next_token[0] = choice[0]
                rng[1] = _increment(counter[0])
                path[0] = mode[0]
    # fmt: on

    return sample.with_attr("global_symbol", sample_token_symbol(vocab))


def advance() -> tirx.PrimFunc:
    """Params (next int32[1], token int32[1] (in place), pos int32[1] (in place))."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def advance_(next_token: T.Buffer((1,), "int32"), token: T.Buffer((1,), "int32"),
                 pos: T.Buffer((1,), "int32")):
        T.func_attr({"global_symbol": "advance"})
        # pos is read into a register first: a block that reads and writes the same buffer
        # cannot be scheduled (bound to a thread), one that reads `old` and writes pos can.
        old = T.sblock_alloc_buffer((1,), "int32", scope="local")
        for _ in range(1):
            old[0] = pos[0]
            with T.sblock("advance"):
                token[0] = next_token[0]
                pos[0] = old[0] + 1

    return advance_


# ---- numpy reference --------------------------------------------------------------------


def _order_key_np(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    bits = np.asarray(x, np.float32).view(np.uint32)
    return np.where(bits >= _SIGN, bits ^ np.uint32(_U32), bits | np.uint32(_SIGN))


def _fmix32_np(x: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(_FMIX1)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(_FMIX2)
    return x ^ (x >> np.uint32(16))


def gumbel_reference(seed: int, counter: int, vocab: int) -> npt.NDArray[np.float32]:
    """The noise g_i the kernel adds for draw (seed, counter), float32[vocab]."""
    seed_mix = _fmix32_np(np.array([seed], np.uint32) ^ np.uint32(_GOLDEN))
    key = _fmix32_np(np.array([counter], np.uint32) ^ seed_mix)
    bits = _fmix32_np(np.arange(vocab, dtype=np.uint32) ^ key)
    u = (bits.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-32)
    with np.errstate(divide="ignore"):  # u rounded to 1: -inf noise, as in the kernel
        return -np.log(-np.log1p(-u))


def _packed_np(keys: npt.NDArray[np.uint32], index: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    return (keys.astype(np.uint64) << np.uint64(32)) | (np.uint64(_U32) - index.astype(np.uint64))


def sample_candidates_reference(
    logits: npt.NDArray[np.float32], sample_params: npt.NDArray[np.float32], seed: int, counter: int,
    slice_: int = SLICE, k_max: int = K_MAX,
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """numpy oracle of sample_candidates: (best uint64[B], cand uint64[B, k_max]); cand as
    the kernel writes it when the draw uses the candidates (it is left alone otherwise)."""
    logits = np.asarray(logits, np.float32)
    vocab = len(logits)
    blocks = slices(vocab, slice_)
    index = np.arange(blocks * slice_)
    keys = np.zeros(blocks * slice_, np.uint64)
    keys[:vocab] = _packed_np(_order_key_np(logits), index[:vocab])
    temperature = np.float32(sample_params[0])
    if temperature > 0:
        scores = logits / temperature + gumbel_reference(seed, counter, vocab)
        drawn = np.zeros(blocks * slice_, np.uint64)
        drawn[:vocab] = _packed_np(_order_key_np(scores), index[:vocab])
    else:
        drawn = keys
    best = drawn.reshape(blocks, slice_).max(axis=1)
    cand = np.sort(keys.reshape(blocks, slice_), axis=1)[:, ::-1][:, :k_max].copy()
    return best, cand


def _bisect(lo: int, hi: int, below: Callable[[int], bool]) -> int:
    """Smallest t in [lo, hi] with below(t), below monotone and true at hi; SEARCH_ROUNDS
    halvings, as the kernel does them."""
    for _ in range(SEARCH_ROUNDS):
        if lo < hi:
            mid = lo + ((hi - lo) >> 1)
            if below(mid):
                hi = mid
            else:
                lo = mid + 1
    return lo


def kept_tokens_reference(
    logits: npt.NDArray[np.float32], temperature: float, top_p: float, top_k: float
) -> npt.NDArray[np.bool_]:
    """The tokens that survive top-k and top-p (steps 2 and 3), bool[V]; temperature > 0."""
    logits = np.asarray(logits, np.float32)
    vocab = len(logits)
    keys = _order_key_np(logits).astype(np.int64)
    top_key = int(keys.max())
    lmax = logits[int(np.argmax(keys))]
    k = int(np.float32(max(min(np.float32(top_k), np.float32(vocab)), np.float32(0.0))))
    cut = 0
    if 0 < k < vocab:
        cut = _bisect(0, top_key, lambda t: int(np.count_nonzero(keys > t)) < k)
    if np.float32(top_p) < np.float32(1.0):
        with np.errstate(under="ignore"):
            p = np.exp((logits - lmax) / np.float32(temperature))
        q = (p * np.float32(_MASS_SCALE)).astype(np.uint64)
        total = int(q[keys >= cut].sum())
        limit = np.float64(np.float32(top_p)) * np.float64(total)
        cut = _bisect(cut, top_key, lambda t: np.float64(int(q[keys > t].sum())) < limit)
    return keys >= cut


def sample_token_reference(
    logits: npt.NDArray[np.float32], sample_params: npt.NDArray[np.float32], seed: int, counter: int
) -> int:
    """numpy oracle of sample_token: the token it writes for draw (seed, counter)."""
    logits = np.asarray(logits, np.float32)
    temperature, top_p, top_k = (np.float32(v) for v in sample_params)
    keys = _order_key_np(logits)
    if not temperature > 0:
        return int(np.flatnonzero(keys == keys.max())[0])
    kept = kept_tokens_reference(logits, temperature, top_p, top_k)
    scores = _order_key_np(logits / temperature + gumbel_reference(seed, counter, len(logits)))
    scores = np.where(kept, scores.astype(np.int64), -1)
    return int(np.flatnonzero(scores == scores.max())[0])
