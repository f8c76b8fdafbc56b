// The CUDA that TVM generates, on the CPU: what tests/schedule/cuda_emulator.py compiles the
// generated kernels against with g++ (in place of cuda.h, cuda_fp16.h and mma.h, which it
// puts on the include path as files that include this one).
//
// Every CUDA thread of a block is a fiber (entered once through ucontext, then switched with
// _setjmp/_longjmp, which unlike swapcontext make no system call); the blocks of a grid run one after the
// other. A fiber runs until it reaches a barrier (__syncthreads, a warp shuffle), then the next
// one runs, so shared memory needs no locks and a block's threads interleave only where the
// kernel synchronises. Blocks alternate the order their threads run in (see run_grid), so a
// read of another thread's write with no barrier between them comes out wrong in some block. A barrier no
// thread can complete (a shuffle whose mask names lanes that never come) is reported as
// a deadlock instead of hanging.
//
// Warp-collective WMMA calls run once per warp, on lane 0: a fragment is the whole 16x16
// tile, so each warp's lane-0 fragments are the warp's (TVM reads fragments only through
// load/store/mma/fill, never element by element). ldmatrix and mma.sync (inline PTX, at the
// end) are per lane instead: their fragments' elements have documented lanes, and kernels
// read them one by one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <csetjmp>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __shared__ static

// ---- threads, blocks and the fiber scheduler ------------------------------------------------

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };

namespace emu {

struct Barrier {
  unsigned arrived = 0;
  unsigned long long generation = 0;
};

struct Fiber {
  ucontext_t context;  // the first entry
  jmp_buf resume;      // every later one
  bool started = false;
  char* stack = nullptr;
  uint3 thread;
  bool done = false;
  Barrier* waiting_on = nullptr;
  unsigned long long waiting_generation = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  jmp_buf back;  // where a fiber that yields or returns goes
  Fiber* current = nullptr;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<unsigned long long> warp_slots;  // 32 per warp, for shuffles
  std::vector<uint32_t> warp_words;  // kLaneWords per lane, for ldmatrix and mma.sync
  unsigned live = 0;
  const char* deadlock = nullptr;
};

inline Block* block = nullptr;
inline const char* error = nullptr;  // what a kernel did that its GPU would refuse (see fail)
constexpr unsigned kLaneWords = 16;  // an mma.sync's operands: 4 + 2 + 4 registers
inline void (*kernel_body)() = nullptr;
inline unsigned char dynamic_shared[232448] __attribute__((aligned(128)));

}  // namespace emu

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

inline unsigned linear_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

inline unsigned lane() { return linear_thread() % 32; }
inline unsigned warp() { return linear_thread() / 32; }

// Lanes of this thread's warp that exist and have not returned.
inline unsigned live_lanes() {
  unsigned mask = 0, first = warp() * 32;
  for (unsigned l = 0; l < 32 && first + l < block->fibers.size(); ++l)
    if (!block->fibers[first + l].done) mask |= 1u << l;
  return mask;
}

// Wait until `expected` threads (this one included) have arrived at `b`.
inline void arrive(Barrier& b, unsigned expected) {
  if (++b.arrived >= expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  Fiber* self = block->current;
  self->waiting_on = &b;
  self->waiting_generation = b.generation;
  if (_setjmp(self->resume) == 0) _longjmp(block->back, 1);
  self->waiting_on = nullptr;
}

inline void fiber_entry() {
  kernel_body();
  block->current->done = true;
  --block->live;
  // A block barrier now waits for one thread fewer.
  Barrier& b = block->block_barrier;
  if (b.arrived > 0 && b.arrived >= block->live) {
    b.arrived = 0;
    ++b.generation;
  }
  _longjmp(block->back, 1);
}

// Runs `body` for every thread of every block; returns nullptr or what went wrong.
inline const char* run_grid(dim3 grid, dim3 threads, void (*body)()) {
  gridDim = grid;
  blockDim = threads;
  kernel_body = body;
  const unsigned n = threads.x * threads.y * threads.z;
  constexpr size_t kStack = 256 * 1024;
  std::unique_ptr<char[]> stacks(new char[kStack * n]);  // one per thread, reused by every block
  // Launches alternate the order of their blocks, ascending and descending: a kernel whose
  // last block to finish does more (a merge after an atomic count) runs it in another block
  // on each call.
  static unsigned launches = 0;
  const bool grid_descending = launches++ % 2 == 1;
  const unsigned n_blocks = grid.x * grid.y * grid.z;
  for (unsigned nth = 0; nth < n_blocks; ++nth) {
        const unsigned index = grid_descending ? n_blocks - 1 - nth : nth;
        const unsigned bx = index % grid.x, by = index / grid.x % grid.y, bz = index / (grid.x * grid.y);
        Block b;
        block = &b;
        blockIdx = {bx, by, bz};
        b.fibers.resize(n);
        b.warp_barriers.resize((n + 31) / 32);
        b.warp_slots.resize(b.warp_barriers.size() * 32);
        b.warp_words.resize(b.warp_barriers.size() * 32 * kLaneWords);
        b.live = n;
        for (unsigned t = 0; t < n; ++t) {
          Fiber& f = b.fibers[t];
          f.thread = {t % threads.x, (t / threads.x) % threads.y, t / (threads.x * threads.y)};
          f.stack = stacks.get() + kStack * t;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack;
          f.context.uc_stack.ss_size = kStack;
          f.context.uc_link = &b.scheduler;
          makecontext(&f.context, fiber_entry, 0);
        }
        // Even blocks run their threads in ascending order, odd ones descending: a thread that
        // reads what another wrote with no barrier between them sees the write in one order and
        // not in the other, so a missing __syncthreads fails a grid of two or more blocks.
        const bool descending = (bx + grid.x * (by + grid.y * bz)) % 2 == 1;
        while (b.live > 0) {
          bool ran = false;
          for (unsigned i = 0; i < n; ++i) {
            Fiber& f = b.fibers[descending ? n - 1 - i : i];
            if (f.done || (f.waiting_on && f.waiting_on->generation == f.waiting_generation)) continue;
            b.current = &f;
            threadIdx = f.thread;
            if (_setjmp(b.back) == 0) {
              if (f.started) _longjmp(f.resume, 1);
              f.started = true;
              swapcontext(&b.scheduler, &f.context);
            }
            ran = true;
          }
          if (!ran) {
            block = nullptr;
            return "deadlock: every live thread waits at a barrier that cannot complete "
                   "(a shuffle mask naming lanes that never arrive, or __syncthreads under a "
                   "condition some threads skip)";
          }
        }
        block = nullptr;
        if (error) {
          const char* message = error;
          error = nullptr;
          return message;
        }
      }
  return nullptr;
}

// Records that the running thread did something its GPU would refuse; run_grid returns it.
inline void fail(const char* message) {
  if (!error) error = message;
}

// The bulk L2 prefetches (cp.async.bulk.prefetch.L2) the kernels asked for, as (address, bytes)
// in the order the threads issued them: a cache hint on a GPU, kept here for the test to read
// (cuda_emulator.py, EmulatedGpu.l2_prefetches).
inline std::vector<std::pair<const void*, unsigned>> l2_prefetches;
inline void l2_prefetch(const void* address, unsigned bytes) {
  if (reinterpret_cast<uintptr_t>(address) % 16 || bytes % 16)
    fail("a bulk L2 prefetch whose address or size is not a multiple of 16 bytes");
  l2_prefetches.emplace_back(address, bytes);
}

template <class T>
unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8);
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <class T>
T from_bits(unsigned long long bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Every lane in `mask` publishes `v`, then reads lane `source(lane)`'s value.
template <class T, class Source>
T exchange(unsigned mask, T v, Source source) {
  const unsigned w = warp(), l = lane();
  const unsigned expected = __builtin_popcount(mask);
  unsigned long long* slots = &block->warp_slots[w * 32];
  slots[l] = to_bits(v);
  arrive(block->warp_barriers[w], expected);
  const int from = source(static_cast<int>(l));
  T result = from < 0 ? v : from_bits<T>(slots[from]);
  arrive(block->warp_barriers[w], expected);
  return result;
}

}  // namespace emu

inline void __syncthreads() { emu::arrive(emu::block->block_barrier, emu::block->live); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::arrive(emu::block->warp_barriers[emu::warp()], __builtin_popcount(mask & emu::live_lanes()));
}
inline unsigned __activemask() { return emu::live_lanes(); }
// Blocks run one after another and threads switch only at barriers: an atomic is a plain
// read-modify-write, and every store is visible to every later block without a fence.
template <class T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
inline void __threadfence() {}

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return emu::exchange(mask, v, [&](int l) { return (l & ~(width - 1)) + (src & (width - 1)); });
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu::exchange(mask, v, [&](int l) {
    int to = (l & (width - 1)) + static_cast<int>(delta);
    return to < width ? l + static_cast<int>(delta) : -1;
  });
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu::exchange(mask, v, [&](int l) {
    return (l & (width - 1)) >= static_cast<int>(delta) ? l - static_cast<int>(delta) : -1;
  });
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu::exchange(mask, v, [&](int l) {
    int to = l ^ lane_mask;
    return (to & ~(width - 1)) == (l & ~(width - 1)) ? to : -1;
  });
}

// ---- arithmetic ---------------------------------------------------------------------------

template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}

// CUDA's fast-math intrinsics, at full precision (the GPU's are within a few ulp).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int __float_as_int(float x) { return emu::from_bits<int>(emu::to_bits(x)); }
inline unsigned __float_as_uint(float x) { return emu::from_bits<unsigned>(emu::to_bits(x)); }
inline float __int_as_float(int x) { return emu::from_bits<float>(emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return emu::from_bits<float>(emu::to_bits(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// Four signed bytes of a times four of b, plus c.
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i)
    c += static_cast<int>(static_cast<int8_t>(a >> (8 * i))) * static_cast<int>(static_cast<int8_t>(b >> (8 * i)));
  return c;
}
inline int __dp4a(unsigned a, unsigned b, int c) {
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
}

#define CUDART_INF_F __builtin_inff()
#define CUDART_NAN_F __builtin_nanf("")

// ---- vector types ---------------------------------------------------------------------------

#define EMU_VECTOR4(name, T, align)                                              \
  struct alignas(align) name { T x, y, z, w; };                                  \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
#define EMU_VECTOR2(name, T, align)                                              \
  struct alignas(align) name { T x, y; };                                        \
  inline name make_##name(T x, T y) { return name{x, y}; }
EMU_VECTOR4(float4, float, 16)
EMU_VECTOR4(int4, int, 16)
EMU_VECTOR4(uint4, unsigned, 16)
EMU_VECTOR4(ushort4, unsigned short, 8)
EMU_VECTOR4(char4, signed char, 4)
EMU_VECTOR4(uchar4, unsigned char, 4)
EMU_VECTOR2(float2, float, 8)
EMU_VECTOR2(int2, int, 8)
EMU_VECTOR2(uint2, unsigned, 8)
#undef EMU_VECTOR4
#undef EMU_VECTOR2

// ---- half precision -------------------------------------------------------------------------

using __half = _Float16;
using half = __half;
struct alignas(4) __half2 { __half x, y; };
using half2 = __half2;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return static_cast<__half>(f); }  // round to nearest even
inline __half __float2half_rn(float f) { return static_cast<__half>(f); }
inline bool __hgt(__half a, __half b) { return a > b; }
inline bool __hlt(__half a, __half b) { return a < b; }
inline __half hexp(__half x) { return static_cast<__half>(std::exp(static_cast<float>(x))); }

// ---- WMMA -----------------------------------------------------------------------------------

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  T x[rows * cols];  // the whole tile, row-major (meaningful on lane 0)
};

inline bool lane_zero() { return emu::lane() == 0; }

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T v) {
  if (lane_zero()) std::fill(std::begin(f.x), std::end(f.x), v);
}

template <class F, class T>
void load_tile(F& f, const T* p, unsigned ldm, bool col_major) {
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = col_major ? p[c * ldm + r] : p[r * ldm + c];
}

template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  if (lane_zero()) load_tile(f, p, ldm, std::is_same_v<Layout, col_major>);
}

template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const T* p, unsigned ldm, layout_t layout) {
  if (lane_zero()) load_tile(f, p, ldm, layout == mem_col_major);
}

template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t layout) {
  if (!lane_zero()) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
}

// d = a b + c: products of the f16 operands are exact in f32; sums in f32 in k order.
template <int M, int N, int K, class TA, class LA, class LB, class TC>
void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c) {
  if (!lane_zero()) return;
  TC out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = static_cast<float>(c.x[i * N + j]);
      for (int k = 0; k < K; ++k) acc += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
      out[i * N + j] = static_cast<TC>(acc);
    }
  std::copy(std::begin(out), std::end(out), d.x);
}

}  // namespace nvcuda::wmma

// ---- inline PTX: ldmatrix and mma.sync -------------------------------------------------------
//
// cuda_emulator.py rewrites the `asm volatile` statements TVM prints for these instructions
// (codegen of T.ptx_legacy.ldmatrix / mma) into the calls below. Each is warp-collective
// (.sync.aligned: all 32 lanes): a lane publishes its operands, waits for the warp, and takes
// its own result, with the fragment layouts of the PTX ISA ("Warp-level matrix load
// instruction: ldmatrix", "Matrix Fragments for mma.m16n8k16 with floating point type").

namespace emu {

// Every lane publishes `n` 32-bit words; `all` receives the 32 lanes' words, lane-major.
inline void warp_gather(const uint32_t* mine, unsigned n, uint32_t* all) {
  const unsigned w = warp(), l = lane();
  uint32_t* words = &block->warp_words[w * 32 * kLaneWords];
  std::memcpy(words + l * kLaneWords, mine, n * sizeof(uint32_t));
  arrive(block->warp_barriers[w], 32);
  for (unsigned i = 0; i < 32; ++i) std::memcpy(all + i * n, words + i * kLaneWords, n * sizeof(uint32_t));
  arrive(block->warp_barriers[w], 32);
}

inline uint16_t half_bits(const void* row, unsigned column) {
  uint16_t h;
  std::memcpy(&h, static_cast<const char*>(row) + 2 * column, 2);
  return h;
}

// ldmatrix.sync.aligned.m8n8.x{count}[.trans].shared.b16: lanes 8i .. 8i + 7 give the 16-byte
// rows of matrix i; a lane's register i holds matrix i's row lane / 4, columns 2 (lane % 4) and
// + 1 (low half first), or with .trans that of its transpose.
inline void ldmatrix(const void* row_address, bool transposed, unsigned count, uint32_t* const* regs) {
  if (reinterpret_cast<uintptr_t>(row_address) % 16) fail("ldmatrix: a row address is not 16-byte aligned");
  uint32_t mine[2], all[64];
  const uint64_t address = reinterpret_cast<uintptr_t>(row_address);
  mine[0] = static_cast<uint32_t>(address);
  mine[1] = static_cast<uint32_t>(address >> 32);
  warp_gather(mine, 2, all);
  const unsigned l = lane(), group = l / 4, pair = l % 4;
  auto row = [&](unsigned lane_of_row) {
    return reinterpret_cast<const void*>(all[2 * lane_of_row] | static_cast<uint64_t>(all[2 * lane_of_row + 1]) << 32);
  };
  for (unsigned i = 0; i < count; ++i) {
    uint16_t lo, hi;
    if (transposed) {
      lo = half_bits(row(8 * i + 2 * pair), group);
      hi = half_bits(row(8 * i + 2 * pair + 1), group);
    } else {
      lo = half_bits(row(8 * i + group), 2 * pair);
      hi = half_bits(row(8 * i + group), 2 * pair + 1);
    }
    *regs[i] = lo | static_cast<uint32_t>(hi) << 16;
  }
}

inline float half_of(uint32_t word, unsigned which) {
  const uint16_t bits = static_cast<uint16_t>(word >> (16 * which));
  __half h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: D (16 x 8) = A (16 x 16) B (16 x 8) + C.
// A: register r of lane (g, t) = (lane / 4, lane % 4) holds row g + 8 (r % 2), columns
// 8 (r / 2) + 2t, + 1; B: register r holds rows 8r + 2t, + 1 of column g; C and D: element e
// is row g + 8 (e / 2), column 2t + e % 2. Products of f16 are exact in f32; sums in k order.
inline void mma_m16n8k16_f32_f16(float* const* d, const uint32_t* a, const uint32_t* b, const float* c) {
  uint32_t mine[10], all[320];
  std::memcpy(mine, a, 16);
  std::memcpy(mine + 4, b, 8);
  std::memcpy(mine + 6, c, 16);
  warp_gather(mine, 10, all);
  const unsigned l = lane(), group = l / 4, pair = l % 4;
  auto a_at = [&](unsigned row, unsigned k) {
    return half_of(all[10 * ((row % 8) * 4 + (k % 8) / 2) + row / 8 + 2 * (k / 8)], k % 2);
  };
  auto b_at = [&](unsigned k, unsigned column) {
    return half_of(all[10 * (column * 4 + (k % 8) / 2) + 4 + k / 8], k % 2);
  };
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned row = group + 8 * (e / 2), column = 2 * pair + e % 2;
    float acc = c[e];
    for (unsigned k = 0; k < 16; ++k) acc += a_at(row, k) * b_at(k, column);
    *d[e] = acc;
  }
}

}  // namespace emu
