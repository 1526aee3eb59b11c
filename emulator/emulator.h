// emulator.h: just enough of CUDA for g++ to compile and run the kernels in kernels/*.cu on the CPU.
//
// emulator/rawmodule.py force-includes this header (g++ -include emulator.h) in front of a kernel
// source, appends a launch entry per extern "C" kernel, and builds a shared library. Nothing here is
// used on a GPU: there CuPy compiles the same .cu with NVRTC.
//
// Execution model
//   * Blocks are independent, as CUDA promises: a small pool of OS threads (one per CPU core,
//     LLMC_EMULATOR_THREADS to change it, 1 for run-to-run determinism of atomics) takes blocks
//     from a shared counter. One OS thread runs one block at a time. Launches with fewer than 8192
//     threads run on the calling thread alone. A fork() child starts a pool of its own.
//   * The CUDA threads of a block are fibers (user-space threads with their own 128 KiB stack) run
//     by that OS thread: a fiber runs until it returns or reaches __syncthreads / a warp shuffle /
//     __syncwarp, then the next fiber runs. When every live thread of the block waits at
//     __syncthreads, they all go on; when every live lane of a warp waits at a warp operation, the
//     shuffles are answered and the lanes go on. A thread that has returned no longer counts, so a
//     barrier after an early `return` works.
//   DESIGN.md proposes one OS thread per CUDA thread. We measured why not: on 2 cores a block of
//   1024 OS threads costs tens of microseconds per barrier (a futex wake per thread), so the fused
//   classifier over V = 50257 or AdamW over 1.7M floats takes seconds per launch. A fiber switch is
//   a few nanoseconds (hand-written x86-64 switch; ucontext on other CPUs), which makes the
//   emulator fast enough for a tiny-model training run. Cooperative fibers also make every run of
//   a block deterministic: threads interleave in the same order each time.
//
// Thread order: a thread runs alone until it returns or reaches a synchronization point. The launch
// picks the order (rawmodule.py: fn(..., order=...)): "forward" runs every thread of the block to its
// next sync point, first to last, then releases what can go on; "reverse" does the same last to
// first; "warps" lets each warp in turn run ahead through its shuffles until it reaches __syncthreads
// or returns, as a GPU may. A result that changes with the order reveals a race between the threads
// of a block: a read of what another thread writes with no barrier between them, e.g. a missing
// __syncthreads (tests/test_kernels.py runs every kernel check in all three orders). What the orders
// cannot show: lost updates. A plain `+=` where atomicAdd is needed gives the right answer here,
// whatever the order (and a wrong one on a GPU). The race checker does (a build with -DEMU_RACECHECK,
// racecheck=True or LLMC_EMULATOR_RACECHECK=1; see "the race checker" below): it reasons on
// synchronization, not values, and names any two unordered accesses of two threads to the same bytes.
//
// What it checks (each one is an error raised in Python after the launch):
//   * deadlock: some live threads wait at __syncthreads while others wait at a warp operation
//     that can never complete (a barrier in divergent code);
//   * a shuffle that reads a lane which has exited or does not exist (block not a multiple of 32).
//   * a misaligned address in __ldg/__ldcs/__ldcg/__stcs/__stcg (a float4/int4 not on 16 bytes).
//   * with the race checker on: races in the array arguments and shared memory (RaceError).
//   * a write past the end of the launch's dynamic shared memory (a 4 KiB red zone checked after
//     each block).
//   Dynamic shared memory is filled with 0xFF bytes (NaN as float) at the start of each block so
//   reads before writes show up.
//
// What it cannot express (kernels must not use them, or say so in their header with a GPU test):
//   warp-synchronous code without __syncwarp/shuffles (lanes do NOT run in lockstep here), masks
//   other than "all live lanes of the warp" (every warp operation waits for all of them), cooperative
//   groups, clusters,
//   tensor cores other than through nvcuda::wmma (inline PTX mma/ldmatrix, wgmma, other wmma shapes and
//   types), texture memory, streams, dynamic parallelism, grid-wide sync, fp16 (half),
//   bf16 fused multiply-add, memory-access checks (an out-of-bounds access corrupts memory or crashes
//   the process; only the cache-hinted loads/stores check alignment).
//   bf16 (__nv_bfloat16, __nv_bfloat162) is supported: see the bf16 section and emulator/README.md.
//   Tensor cores through <mma.h>'s nvcuda::wmma, bf16 16x16x16 with a float accumulator, are supported:
//   emulator/include/mma.h (warp-collective, with a deliberately scrambled element-to-lane map).
//   Float arithmetic runs with flush-to-zero, as CuPy compiles it (-ftz=true): see FlushToZero.
//   `extern __shared__ T name[];` is rewritten by rawmodule.py into a pointer to the block's
//   dynamic shared memory; static `__shared__` variables become `static thread_local`.

#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(EMU_RACECHECK)
#include <link.h>                      // dl_iterate_phdr: where this thread's static __shared__ variables lie
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// EMU_ASM_SWITCH: the hand-written x86-64 context switch; elsewhere (or with -DEMU_UCONTEXT, which
// the tests use to exercise the portable path) fibers switch with ucontext's swapcontext.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

// ----------------------------------------------------------------------------------------------
// CUDA vector types and qualifiers

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

// ----------------------------------------------------------------------------------------------
// bf16: __nv_bfloat16 and __nv_bfloat162, as cuda_bf16.h defines them for what kernels use
//
// A kernel writes `#include <cuda_bf16.h>` as it must for nvcc and NVRTC; g++ finds the empty stub
// emulator/include/cuda_bf16.h (rawmodule.py puts emulator/include/ on its include path), since
// everything is defined here. A bf16 is its 16 bits (the top half of a float32). Conversions from
// float round to nearest, ties to even, keep infinities and subnormals, and turn every NaN into
// the canonical bf16 NaN 0x7FFF. Arithmetic (+ - * /, __hadd, __hmul, ...) and comparisons compute in
// double and round the result to bf16: for one operation on two bf16 values this equals a single correct
// rounding (double has more than 2*8+2 bits), i.e. what the GPU's bf16 instructions give. Double, and
// conversions that are integer bit operations, because kernels run with flush-to-zero (see FlushToZero):
// the GPU's bf16 instructions keep bf16 subnormals under -ftz=true (it is an f32 flag), and every bf16
// value, and every sum, product and quotient of two, is a normal double. Mixed bf16/float expressions
// (`x * 2.0f`) are ambiguous, as with nvcc: convert explicitly.

namespace emu {
// float -> bf16 bits: round to nearest even by adding 0x7FFF plus the lowest kept bit, then cutting
// the low 16 bits; a carry out of the mantissa moves to the next exponent (and past the largest
// finite value to infinity), as rounding must
static inline unsigned short bf16_bits_from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) { return 0x7FFF; }     // NaN
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}
// double -> bf16 bits with one rounding to nearest even, on the bits alone (no float arithmetic, which
// flush-to-zero would change): keep 8 significant bits for a normal bf16, fewer below 2^-126 (a bf16
// subnormal counts units of 2^-133); the carry of a round-up moves into the exponent, and past bf16's
// largest finite value to infinity
static inline unsigned short bf16_bits_from_double(double d) {
    uint64_t u;
    memcpy(&u, &d, 8);
    unsigned short sign = static_cast<unsigned short>((u >> 48) & 0x8000u);
    int e = static_cast<int>((u >> 52) & 0x7FF);
    uint64_t sig = u & ((uint64_t(1) << 52) - 1);
    if (e == 0x7FF) { return sig != 0 ? 0x7FFF : static_cast<unsigned short>(sign | 0x7F80u); }
    if (e == 0) { return sign; }                       // zero, or a double subnormal: far below bf16's range
    sig |= uint64_t(1) << 52;
    int exponent = e - 1023;
    int shift = 45 + (exponent < -126 ? -126 - exponent : 0);
    if (shift > 54) { return sign; }                   // under half of 2^-133: rounds to zero
    uint64_t q = sig >> shift, rem = sig & ((uint64_t(1) << shift) - 1), half = uint64_t(1) << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) { q++; }
    // q holds the implicit bit (128) for a normal result, so the exponent field goes in one lower
    uint32_t bits = (exponent < -126 ? 0u : static_cast<uint32_t>(exponent + 126) << 7) + static_cast<uint32_t>(q);
    return static_cast<unsigned short>(sign | std::min<uint32_t>(bits, 0x7F80u));
}
// bf16 bits -> double, exactly (a subnormal as its count of 2^-133, a normal double either way)
static inline double double_from_bf16_bits(unsigned short b) {
    uint64_t sign = static_cast<uint64_t>(b >> 15) << 63;
    unsigned e = (b >> 7) & 0xFFu, m = b & 0x7Fu;
    if (e == 0) { double v = static_cast<double>(m) * 0x1p-133; return sign ? -v : v; }
    uint64_t u = sign | (static_cast<uint64_t>(e == 0xFF ? 0x7FF : e - 127 + 1023) << 52) | (static_cast<uint64_t>(m) << 45);
    double d;
    memcpy(&d, &u, 8);
    return d;
}
static inline float float_from_bf16_bits(unsigned short b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
}  // namespace emu

struct alignas(2) __nv_bfloat16 {
    unsigned short bits;   // CUDA keeps these private; kernels use __bfloat16_as_ushort
    __nv_bfloat16() = default;
    // value conversions, rounded to nearest even (integers of 32 bits and less convert exactly
    // to double first; 64-bit integers beyond 2^53 round twice)
    __nv_bfloat16(float f) : bits(emu::bf16_bits_from_float(f)) {}
    __nv_bfloat16(double d) : bits(emu::bf16_bits_from_double(d)) {}
    __nv_bfloat16(int v) : bits(emu::bf16_bits_from_double(v)) {}
    __nv_bfloat16(unsigned int v) : bits(emu::bf16_bits_from_double(v)) {}
    __nv_bfloat16(short v) : bits(emu::bf16_bits_from_double(v)) {}
    __nv_bfloat16(unsigned short v) : bits(emu::bf16_bits_from_double(v)) {}
    __nv_bfloat16(long v) : bits(emu::bf16_bits_from_double(static_cast<double>(v))) {}
    __nv_bfloat16(unsigned long v) : bits(emu::bf16_bits_from_double(static_cast<double>(v))) {}
    __nv_bfloat16(long long v) : bits(emu::bf16_bits_from_double(static_cast<double>(v))) {}
    __nv_bfloat16(unsigned long long v) : bits(emu::bf16_bits_from_double(static_cast<double>(v))) {}
    operator float() const { return emu::float_from_bf16_bits(bits); }   // exact
};

struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    __nv_bfloat162() = default;
    __nv_bfloat162(__nv_bfloat16 x_, __nv_bfloat16 y_) : x(x_), y(y_) {}
};

static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__nv_bfloat162) == 4, "bf16 layout");
static_assert(std::is_trivially_copyable<__nv_bfloat16>::value, "bf16 must copy as bits (shuffles, memcpy)");

static inline __nv_bfloat16 emu_bf16_from_bits(unsigned short b) { __nv_bfloat16 h; h.bits = b; return h; }

// conversions and bit casts
static inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
static inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
static inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return emu_bf16_from_bits(b); }
static inline short __bfloat16_as_short(__nv_bfloat16 h) { return static_cast<short>(h.bits); }
static inline __nv_bfloat16 __short_as_bfloat16(short b) { return emu_bf16_from_bits(static_cast<unsigned short>(b)); }

// pairs
static inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 h) { return __nv_bfloat162(h, h); }
static inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return __nv_bfloat162(lo, hi); }
static inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return __nv_bfloat162(lo, hi); }
static inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __nv_bfloat162(f.x, f.y); }
static inline float2 __bfloat1622float2(__nv_bfloat162 p) { return float2{float(p.x), float(p.y)}; }
static inline float __low2float(__nv_bfloat162 p) { return static_cast<float>(p.x); }
static inline float __high2float(__nv_bfloat162 p) { return static_cast<float>(p.y); }
static inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 p) { return p.x; }
static inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 p) { return p.y; }

// arithmetic: in double (exact values, subnormals kept whatever MXCSR says), one rounding to bf16
static inline double emu_bf16_exact(__nv_bfloat16 h) { return emu::double_from_bf16_bits(h.bits); }
static inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(emu_bf16_exact(a) + emu_bf16_exact(b)); }
static inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(emu_bf16_exact(a) - emu_bf16_exact(b)); }
static inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(emu_bf16_exact(a) * emu_bf16_exact(b)); }
static inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(emu_bf16_exact(a) / emu_bf16_exact(b)); }
static inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return emu_bf16_from_bits(static_cast<unsigned short>(a.bits ^ 0x8000u)); }
static inline bool __hisnan(__nv_bfloat16 a) { return (a.bits & 0x7FFFu) > 0x7F80u; }
static inline __nv_bfloat16 operator+(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hadd(a, b); }
static inline __nv_bfloat16 operator-(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hsub(a, b); }
static inline __nv_bfloat16 operator*(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hmul(a, b); }
static inline __nv_bfloat16 operator/(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hdiv(a, b); }
static inline __nv_bfloat16& operator+=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a + b; }
static inline __nv_bfloat16& operator-=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a - b; }
static inline __nv_bfloat16& operator*=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a * b; }
static inline __nv_bfloat16& operator/=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a / b; }
static inline __nv_bfloat16 operator+(const __nv_bfloat16& a) { return a; }
static inline __nv_bfloat16 operator-(const __nv_bfloat16& a) { return __hneg(a); }
static inline __nv_bfloat16& operator++(__nv_bfloat16& a) { return a = a + __nv_bfloat16(1.0f); }
static inline __nv_bfloat16& operator--(__nv_bfloat16& a) { return a = a - __nv_bfloat16(1.0f); }
static inline __nv_bfloat16 operator++(__nv_bfloat16& a, int) { __nv_bfloat16 old = a; ++a; return old; }
static inline __nv_bfloat16 operator--(__nv_bfloat16& a, int) { __nv_bfloat16 old = a; --a; return old; }
// comparisons as IEEE compares (in double, so a subnormal is not 0): ordered (false with a NaN), except !=
static inline bool operator==(const __nv_bfloat16& a, const __nv_bfloat16& b) { return emu_bf16_exact(a) == emu_bf16_exact(b); }
static inline bool operator!=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return emu_bf16_exact(a) != emu_bf16_exact(b); }
static inline bool operator<(const __nv_bfloat16& a, const __nv_bfloat16& b) { return emu_bf16_exact(a) < emu_bf16_exact(b); }
static inline bool operator>(const __nv_bfloat16& a, const __nv_bfloat16& b) { return emu_bf16_exact(a) > emu_bf16_exact(b); }
static inline bool operator<=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return emu_bf16_exact(a) <= emu_bf16_exact(b); }
static inline bool operator>=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return emu_bf16_exact(a) >= emu_bf16_exact(b); }
// pairs, lane by lane
static inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(a.x + b.x, a.y + b.y); }
static inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(a.x * b.x, a.y * b.y); }
static inline __nv_bfloat162 operator+(const __nv_bfloat162& a, const __nv_bfloat162& b) { return __hadd2(a, b); }
static inline __nv_bfloat162 operator-(const __nv_bfloat162& a, const __nv_bfloat162& b) { return __nv_bfloat162(a.x - b.x, a.y - b.y); }
static inline __nv_bfloat162 operator*(const __nv_bfloat162& a, const __nv_bfloat162& b) { return __hmul2(a, b); }
static inline __nv_bfloat162 operator/(const __nv_bfloat162& a, const __nv_bfloat162& b) { return __nv_bfloat162(a.x / b.x, a.y / b.y); }

#define __global__
#define __device__
#define __host__
#define __constant__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))   // GNU form: also valid after __shared__ (static thread_local)

static constexpr int warpSize = 32;

// ----------------------------------------------------------------------------------------------
// the runtime: fibers, blocks, the worker pool

#define EMU_HIDDEN __attribute__((visibility("hidden")))

namespace emu {

enum FiberState { READY, WAIT_BLOCK, WAIT_WARP, DONE };
enum ThreadOrder { ORDER_FORWARD, ORDER_REVERSE, ORDER_WARPS };
enum WarpOp { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, SYNCWARP, BALLOT };

struct Worker;

struct Fiber {
    void* sp = nullptr;            // saved stack pointer while switched out (x86-64 switch)
#if !defined(EMU_ASM_SWITCH)
    ucontext_t uc;
#endif
    char* stack = nullptr;
    size_t stack_size = 0;
    bool guarded = false;          // its lowest page is PROT_NONE (else a canary there, see fiber_new)
    Worker* worker = nullptr;
    dim3 thread_idx;
    int lin = 0;                   // linear thread index within the block (the race checker's thread id)
    int warp = 0;                  // warp index within the block
    FiberState state = DONE;
    // the pending warp operation
    WarpOp op = SYNCWARP;
    int op_arg = 0, op_width = 32;
    uint64_t op_value = 0, op_result = 0;
};

typedef void (*Thunk)(void* kernel, void** args);

struct Launch {
    dim3 grid, block;
    size_t shared_mem = 0;
    Thunk thunk = nullptr;
    void* kernel = nullptr;
    void** args = nullptr;
    long long num_blocks = 0;
    int order = ORDER_FORWARD;      // how the threads of a block take turns (see "thread order")
    std::atomic<long long> next_block{0};
    std::atomic<bool> failed{false};
    std::atomic<unsigned long long> traffic[4] = {};  // bytes read, bytes written, loads, stores (EMU_COUNT_TRAFFIC)
    std::mutex error_mutex;
    std::string error;
};

struct Worker {
    std::vector<Fiber*> fibers;
    char* slab = nullptr;          // fiber stacks are cut from slabs of kStacksPerSlab (fiber_new)
    int slab_used = 0;
    void* sched_sp = nullptr;
#if !defined(EMU_ASM_SWITCH)
    ucontext_t sched_uc;
#endif
    Launch* launch = nullptr;
    dim3 block_idx;
    char* smem = nullptr;
    size_t smem_capacity = 0;
    int nthreads = 0, live = 0, at_barrier = 0;
    std::vector<int> warp_live, warp_waiting;   // per warp: threads not returned, threads at a warp op
    // the race checker's clocks (EMU_RACECHECK): the running block, how many __syncthreads it has
    // completed, and per warp how many warp operations (shuffles, __syncwarp, votes) completed
    long long block_linear = 0;
    uint32_t barrier_epoch = 0;
    uint32_t warp_epoch[32] = {};
};

EMU_HIDDEN thread_local Worker* tls_worker = nullptr;
EMU_HIDDEN thread_local Fiber* tls_fiber = nullptr;

// ---- the traffic counter (a library built with -DEMU_COUNT_TRAFFIC; rawmodule.py's count_traffic())
//
// The counting library is compiled with g++ -fsanitize=thread but NOT linked with libtsan: TSan's
// compiler pass turns every load and store of N bytes into a call __tsan_readN(addr) /
// __tsan_writeN(addr) before it (N = 1, 2, 4, 8, 16; __tsan_read_range(addr, N) for other sizes and
// for the 16-byte copies g++ makes of int4 / float4; unaligned_ and volatile_ variants), and those
// functions are defined below, uninstrumented. Each adds N to this OS thread's sums when addr lies in
// one of the launch's global arrays (the pointer arguments, as rawmodule.py registers them: data to
// data + nbytes, no guard bytes), so shared memory, locals and the emulator's own bookkeeping do not
// count. Each OS thread adds its sums to the launch's totals when it runs out of blocks. An access is
// counted whole where it starts (one that starts inside an array and runs past its end counts all its
// bytes). Atomics: atomicAdd / atomicCAS / atomicMax / atomicExch count one read and one write of
// their size (the read-modify-write the GPU does), however many compare-and-swap attempts the
// emulation takes; the __tsan_atomic* calls TSan makes of the emulator's own atomics perform the
// operation and count nothing. The other calls the pass inserts (function entry and exit, init,
// vptr updates) do nothing. rawmodule.py links with -Wl,--no-undefined, so a __tsan_ function g++
// starts to call that is not defined here fails the build by name.

#if defined(EMU_COUNT_TRAFFIC) || defined(EMU_RACECHECK)
#define EMU_TSAN_HOOKS 1               // the __tsan_* hooks below: shared by the counter and the race checker
#define EMU_NO_TSAN extern "C" EMU_HIDDEN __attribute__((no_sanitize("thread"), noinline))
#define EMU_NO_TSAN_INLINE static inline __attribute__((no_sanitize("thread"), always_inline))
#endif

struct RaceState;                      // the race checker's state of one launch (EMU_RACECHECK)

#if defined(EMU_COUNT_TRAFFIC)
struct TrafficRange { uintptr_t lo, size; };
static const int kMaxTrafficRanges = 64;
static TrafficRange traffic_ranges[kMaxTrafficRanges];
static int traffic_nranges = 0;
static uintptr_t traffic_lo = 0, traffic_span = 0;   // the hull of the ranges: one compare rejects the rest
struct TrafficSums { unsigned long long read_bytes, write_bytes, reads, writes; };
EMU_HIDDEN thread_local TrafficSums tls_traffic = {0, 0, 0, 0};
#endif

// ---- the race checker (a library built with -DEMU_RACECHECK; rawmodule.py's racecheck=True or
// LLMC_EMULATOR_RACECHECK=1)
//
// Built like the traffic counter (g++ -fsanitize=thread, no libtsan; the same __tsan_* hooks), but each
// load and store of a checked range updates a shadow of it: per granule (the element size of the
// array, at most 4 bytes; 2 bytes in shared memory) the last write and a summary of the reads since.
// Checked: the launch's array arguments, the block's dynamic shared memory and the kernel's static
// __shared__ variables (the module's thread_local block, found with dl_iterate_phdr, less the
// emulator's own tls_worker / tls_fiber). Locals (fiber stacks) and the emulator's bookkeeping (heap)
// lie in no range. An access is stamped with its thread's clocks: block, thread, the block's count of
// completed __syncthreads (barrier epoch) and its warp's count of completed warp operations (warp
// epoch). Two accesses to one granule by two threads, at least one a write, race unless
//   * same block, different barrier epochs (a __syncthreads between them), or
//   * same warp, different warp epochs (a shuffle, __syncwarp, vote or other warp op between them), or
//   * both atomic (atomicAdd & co.: EMU_COUNT_RMW stamps them as atomic writes).
// Blocks are never ordered (no grid sync). The rule compares clocks, not values, so a race is found
// whatever the thread order; race launches run their blocks one after another on the calling thread
// (no pool), so the shadow needs no locks. The reads since the last write are summarized in two
// records (see emu_race_granule), enough to decide whether ANY of them races with a new write.
// Accesses are clipped to their range; 1-byte elements share a 2-byte granule in shared memory (two
// threads writing neighbouring bytes there would be reported).

#if defined(EMU_RACECHECK)
enum RaceAccess { RACE_READ, RACE_WRITE, RACE_ATOMIC };
struct RaceRange {
    uintptr_t lo = 0, size = 0;
    unsigned shift = 2;             // a granule is 1 << shift bytes
    bool shared = false;            // shared memory: records of another block are stale (each block has its own)
    int id = 0;                     // argument index, -1 dynamic shared memory, -2 static __shared__
    uint64_t* shadow = nullptr;     // 3 words per granule: last write, last read, another read
    size_t shadow_bytes = 0;
};
static const int kMaxRaceRanges = 64;
// a report: kind (0 read-after-write, 1 write-after-write, 2 write-after-read), range id, byte offset,
// earlier block, earlier thread, later block, later thread (linear indices)
static const int kRaceReportWords = 7;
struct RaceState {
    RaceRange ranges[kMaxRaceRanges + 2];
    int n = 0;
    uintptr_t lo = 0, span = 0;     // the hull of the ranges: one compare rejects locals
    uintptr_t own_tls[2] = {0, 0};  // &tls_worker, &tls_fiber: in the static __shared__ block, not the kernel's
    int last = 0;                   // the range the last checked access fell in (accesses come in runs)
    static const int kMissPages = 256;
    uintptr_t miss_page[kMissPages];   // 4 KiB pages inside the hull but in no range (the emulator's heap)
    unsigned long long* reports = nullptr;
    int max_reports = 0, nreports = 0;
    unsigned long long total = 0;   // racing accesses in all
};
static RaceState* race_state = nullptr;   // the launch being checked (launches are one at a time)
static Fiber* race_fiber = nullptr;       // the fiber running now: checked launches use one OS thread, and a
                                          // global is cheaper in the hooks than tls_fiber (__tls_get_addr)
#endif

}  // namespace emu

#if defined(EMU_COUNT_TRAFFIC)
#define EMU_HOOK_READ(p, n) emu_count_read((p), (n))
#define EMU_HOOK_WRITE(p, n) emu_count_write((p), (n))
EMU_NO_TSAN_INLINE bool emu_in_arrays(const void* p) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a - emu::traffic_lo >= emu::traffic_span) { return false; }
    for (int i = 0; i < emu::traffic_nranges; i++) {
        if (a - emu::traffic_ranges[i].lo < emu::traffic_ranges[i].size) { return true; }
    }
    return false;
}
EMU_NO_TSAN_INLINE void emu_count_read(const void* p, unsigned long n) {
    if (emu_in_arrays(p)) { emu::tls_traffic.read_bytes += n; emu::tls_traffic.reads++; }
}
EMU_NO_TSAN_INLINE void emu_count_write(const void* p, unsigned long n) {
    if (emu_in_arrays(p)) { emu::tls_traffic.write_bytes += n; emu::tls_traffic.writes++; }
}
#endif

#if defined(EMU_RACECHECK)
// A record (64 bits, 0 = none): thread (bits 0-9), block + 1 (10-31, wrapping past 4M blocks), barrier
// epoch (32-47), warp epoch (48-61; epochs compare modulo their width), flags (62-63): on a last
// write bit 62 = atomic; on the second read record its kind (kRaceOther*).
static const uint64_t kRaceAtomic = uint64_t(1) << 62;
static const uint64_t kRaceOtherBlock = 1, kRaceOtherWarp = 2, kRaceSameWarp = 3;
EMU_NO_TSAN_INLINE uint64_t emu_race_thread(uint64_t r) { return r & 1023u; }
EMU_NO_TSAN_INLINE uint64_t emu_race_block(uint64_t r) { return (r >> 10) & 0x3FFFFFu; }
EMU_NO_TSAN_INLINE uint64_t emu_race_epoch(uint64_t r) { return (r >> 32) & 0xFFFFu; }
EMU_NO_TSAN_INLINE uint64_t emu_race_wepoch(uint64_t r) { return (r >> 48) & 0x3FFFu; }
EMU_NO_TSAN_INLINE uint64_t emu_race_warp(uint64_t r) { return emu_race_thread(r) >> 5; }
EMU_NO_TSAN_INLINE uint64_t emu_race_kind(uint64_t r) { return r >> 62; }
EMU_NO_TSAN_INLINE uint64_t emu_race_with_kind(uint64_t r, uint64_t k) { return (r & ~(uint64_t(3) << 62)) | (k << 62); }

EMU_NO_TSAN_INLINE uint64_t emu_race_now(const emu::Fiber* f) {
    const emu::Worker* w = f->worker;
    uint64_t blk = static_cast<uint64_t>(w->block_linear) % 0x3FFFFFu + 1;
    return static_cast<uint64_t>(f->lin) | (blk << 10) | (static_cast<uint64_t>(w->barrier_epoch & 0xFFFFu) << 32)
           | (static_cast<uint64_t>(w->warp_epoch[f->warp] & 0x3FFFu) << 48);
}

// may the access of record e and the access of record now (later) run at the same time on a GPU?
EMU_NO_TSAN_INLINE bool emu_race_concurrent(uint64_t e, uint64_t now) {
    if (emu_race_block(e) != emu_race_block(now)) { return true; }       // blocks are never ordered
    if (emu_race_thread(e) == emu_race_thread(now)) { return false; }    // one thread is in program order
    if (emu_race_epoch(e) != emu_race_epoch(now)) { return false; }      // a __syncthreads between them
    return !(emu_race_warp(e) == emu_race_warp(now) && emu_race_wepoch(e) != emu_race_wepoch(now));
}

EMU_NO_TSAN_INLINE void emu_race_report(emu::RaceState* S, const emu::RaceRange& r, uintptr_t offset, int kind,
                                        uint64_t earlier, uint64_t now, long long now_block) {
    unsigned long long e_block = emu_race_block(earlier) - 1, e_thread = emu_race_thread(earlier);
    unsigned long long n_thread = emu_race_thread(now);
    for (int i = 0; i < S->nreports; i++) {          // one report per pair of threads and range
        unsigned long long* q = S->reports + i * emu::kRaceReportWords;
        if (q[1] == static_cast<unsigned long long>(static_cast<long long>(r.id)) && q[3] == e_block
            && q[4] == e_thread && q[5] == static_cast<unsigned long long>(now_block) && q[6] == n_thread) { return; }
    }
    if (S->nreports >= S->max_reports) { return; }
    unsigned long long* q = S->reports + S->nreports++ * emu::kRaceReportWords;
    q[0] = static_cast<unsigned long long>(kind);
    q[1] = static_cast<unsigned long long>(static_cast<long long>(r.id));
    q[2] = offset;
    q[3] = e_block;
    q[4] = e_thread;
    q[5] = static_cast<unsigned long long>(now_block);
    q[6] = n_thread;
}

// Which earlier read races with a write stamped now? The reads since the last write are summarized by
// `a`, the latest read, and `o`, one other read, kept so that a write races with some read of the set
// exactly when it races with a or o: o is a read of another block than a's (kind OtherBlock: then every
// write races with a or o), else a read of a's block and barrier epoch in another warp than a's
// (OtherWarp: then every write of that epoch races), else the latest read of a's epoch and warp by
// another thread than a's (SameWarp). Reads of earlier epochs than a's are ordered before any new
// write of a's block, so they need no record.
EMU_NO_TSAN_INLINE uint64_t emu_race_read_witness(uint64_t a, uint64_t o, uint64_t now) {
    if (a == 0) { return 0; }
    if (emu_race_block(a) != emu_race_block(now)) { return a; }
    if (emu_race_kind(o) == kRaceOtherBlock) { return o; }
    if (emu_race_epoch(a) != emu_race_epoch(now)) { return 0; }
    if (emu_race_kind(o) == kRaceOtherWarp) { return emu_race_warp(a) != emu_race_warp(now) ? a : o; }
    if (emu_race_warp(a) != emu_race_warp(now)) { return a; }
    if (emu_race_thread(a) != emu_race_thread(now)) { return emu_race_wepoch(a) == emu_race_wepoch(now) ? a : 0; }
    if (emu_race_kind(o) == kRaceSameWarp && emu_race_wepoch(o) == emu_race_wepoch(now)) { return o; }
    return 0;
}

// a new read joins the summary (a, o)
EMU_NO_TSAN_INLINE void emu_race_add_read(uint64_t& a, uint64_t& o, uint64_t now) {
    if (a == 0) {
        o = 0;
    } else if (emu_race_block(a) != emu_race_block(now)) {
        o = emu_race_with_kind(a, kRaceOtherBlock);
    } else if (emu_race_kind(o) == kRaceOtherBlock) {
        // keep it: every later write races with one of the two
    } else if (emu_race_epoch(a) != emu_race_epoch(now)) {
        o = 0;                                       // a's epoch is over: ordered before what follows
    } else if (emu_race_warp(a) != emu_race_warp(now)) {
        o = emu_race_with_kind(a, kRaceOtherWarp);
    } else if (emu_race_kind(o) == kRaceOtherWarp) {
        // keep it: o's warp differs from now's as it differed from a's
    } else if (emu_race_thread(a) != emu_race_thread(now)) {
        o = emu_race_with_kind(a, kRaceSameWarp);
    }
    a = now;
}

// one granule of an access: check it against the shadow, report a race (true), update the shadow
EMU_NO_TSAN_INLINE bool emu_race_granule(emu::RaceState* S, const emu::RaceRange& r, uintptr_t g, uint64_t now,
                                         int kind, long long now_block) {
    uint64_t* s = r.shadow + 3 * g;
    uint64_t w = s[0], a = s[1], o = s[2];
    if (r.shared) {                                   // another block's shared memory is not this one's
        if (w != 0 && emu_race_block(w) != emu_race_block(now)) { w = 0; }
        if (a != 0 && emu_race_block(a) != emu_race_block(now)) { a = 0; o = 0; }
        if (o != 0 && emu_race_block(o) != emu_race_block(now)) { o = 0; }
    }
    uintptr_t offset = g << r.shift;
    bool w_races = w != 0 && emu_race_concurrent(w, now);
    if (kind == emu::RACE_READ) {
        if (w_races) { emu_race_report(S, r, offset, 0, w, now, now_block); }
        emu_race_add_read(a, o, now);
        s[0] = w;
        s[1] = a;
        s[2] = o;
        return w_races;
    }
    bool raced = true;
    if (w_races && !(kind == emu::RACE_ATOMIC && (w & kRaceAtomic))) {
        emu_race_report(S, r, offset, 1, w, now, now_block);
    } else {
        uint64_t reader = emu_race_read_witness(a, o, now);
        if (reader != 0) { emu_race_report(S, r, offset, 2, reader, now, now_block); }
        raced = reader != 0;
    }
    s[0] = now | (kind == emu::RACE_ATOMIC ? kRaceAtomic : 0);   // the reads before are ordered or reported
    s[1] = 0;
    s[2] = 0;
    return raced;
}

// an access inside the hull of the checked ranges, by a CUDA thread
EMU_NO_TSAN_INLINE void emu_race_in_range(emu::RaceState* S, const emu::RaceRange& r, uintptr_t off,
                                          unsigned long n, int kind, const emu::Fiber* f) {
    uintptr_t end = off + n < r.size ? off + n : r.size;
    uint64_t now = emu_race_now(f);
    bool raced = false;
    for (uintptr_t g = off >> r.shift; (g << r.shift) < end; g++) {
        raced |= emu_race_granule(S, r, g, now, kind, f->worker->block_linear);
    }
    S->total += raced;                               // racing accesses, however many granules each covers
}

EMU_NO_TSAN void emu_race_checked_access(uintptr_t addr, unsigned long n, int kind) {
    emu::RaceState* S = emu::race_state;
    emu::Fiber* f = emu::race_fiber;
    if (addr - reinterpret_cast<uintptr_t>(f->stack) < f->stack_size) { return; }   // a local
    if (addr == S->own_tls[0] || addr == S->own_tls[1]) { return; }                 // threadIdx, blockIdx, ...
    const emu::RaceRange& last = S->ranges[S->last];
    if (addr - last.lo < last.size) { emu_race_in_range(S, last, addr - last.lo, n, kind, f); return; }
    uintptr_t page = addr >> 12;
    uintptr_t& miss = S->miss_page[page % emu::RaceState::kMissPages];
    if (miss == page) { return; }
    for (int i = 0; i < S->n; i++) {
        const emu::RaceRange& r = S->ranges[i];
        if (addr - r.lo < r.size) {
            S->last = i;
            emu_race_in_range(S, r, addr - r.lo, n, kind, f);
            return;
        }
    }
    for (int i = 0; i < S->n; i++) {                 // no range touches this page: remember it
        if (S->ranges[i].lo < (page + 1) << 12 && S->ranges[i].lo + S->ranges[i].size > page << 12) { return; }
    }
    miss = page;
}

// every hook's first test, inlined: most accesses are the emulator's own (no fiber runs) or far away
EMU_NO_TSAN_INLINE void emu_race_access(const void* p, unsigned long n, int kind) {
    emu::RaceState* S = emu::race_state;
    uintptr_t addr = reinterpret_cast<uintptr_t>(p);
    if (S == nullptr || emu::race_fiber == nullptr || addr - S->lo >= S->span) { return; }
    emu_race_checked_access(addr, n, kind);
}
#define EMU_HOOK_READ(p, n) emu_race_access((p), (n), emu::RACE_READ)
#define EMU_HOOK_WRITE(p, n) emu_race_access((p), (n), emu::RACE_WRITE)
#endif

#if defined(EMU_TSAN_HOOKS)
#define EMU_TSAN_ACCESS(N)                                                                            \
    EMU_NO_TSAN void __tsan_read##N(void* p) { EMU_HOOK_READ(p, N); }                                 \
    EMU_NO_TSAN void __tsan_write##N(void* p) { EMU_HOOK_WRITE(p, N); }                               \
    EMU_NO_TSAN void __tsan_unaligned_read##N(void* p) { EMU_HOOK_READ(p, N); }                       \
    EMU_NO_TSAN void __tsan_unaligned_write##N(void* p) { EMU_HOOK_WRITE(p, N); }                     \
    EMU_NO_TSAN void __tsan_volatile_read##N(void* p) { EMU_HOOK_READ(p, N); }                        \
    EMU_NO_TSAN void __tsan_volatile_write##N(void* p) { EMU_HOOK_WRITE(p, N); }                      \
    EMU_NO_TSAN void __tsan_unaligned_volatile_read##N(void* p) { EMU_HOOK_READ(p, N); }              \
    EMU_NO_TSAN void __tsan_unaligned_volatile_write##N(void* p) { EMU_HOOK_WRITE(p, N); }
EMU_TSAN_ACCESS(1)
EMU_TSAN_ACCESS(2)
EMU_TSAN_ACCESS(4)
EMU_TSAN_ACCESS(8)
EMU_TSAN_ACCESS(16)
#undef EMU_TSAN_ACCESS
EMU_NO_TSAN void __tsan_read_range(void* p, unsigned long n) { EMU_HOOK_READ(p, n); }
EMU_NO_TSAN void __tsan_write_range(void* p, unsigned long n) { EMU_HOOK_WRITE(p, n); }
EMU_NO_TSAN void __tsan_init() {}
EMU_NO_TSAN void __tsan_func_entry(void* pc) { (void)pc; }
EMU_NO_TSAN void __tsan_func_exit() {}
EMU_NO_TSAN void __tsan_vptr_update(void** p, void* v) { (void)p; (void)v; }
EMU_NO_TSAN void __tsan_vptr_read(void** p) { (void)p; }
// the emulator's own atomics, performed for real (sequentially consistent: at least what was asked)
#define EMU_TSAN_ATOMIC(N, T)                                                                         \
    EMU_NO_TSAN T __tsan_atomic##N##_load(const volatile T* a, int mo) {                              \
        (void)mo; return __atomic_load_n(a, __ATOMIC_SEQ_CST); }                                      \
    EMU_NO_TSAN void __tsan_atomic##N##_store(volatile T* a, T v, int mo) {                           \
        (void)mo; __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }                                         \
    EMU_NO_TSAN T __tsan_atomic##N##_exchange(volatile T* a, T v, int mo) {                           \
        (void)mo; return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }                               \
    EMU_NO_TSAN T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int mo) {                          \
        (void)mo; return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }                                \
    EMU_NO_TSAN T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int mo) {                          \
        (void)mo; return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }                                \
    EMU_NO_TSAN T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int mo) {                          \
        (void)mo; return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }                                \
    EMU_NO_TSAN T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int mo) {                           \
        (void)mo; return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }                                 \
    EMU_NO_TSAN T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int mo) {                          \
        (void)mo; return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }                                \
    EMU_NO_TSAN T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int mo) {                         \
        (void)mo; return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); }                               \
    EMU_NO_TSAN bool __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int mo, int fmo) { \
        (void)mo; (void)fmo;                                                                          \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }     \
    EMU_NO_TSAN bool __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int mo, int fmo) { \
        (void)mo; (void)fmo;                                                                          \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }      \
    EMU_NO_TSAN T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int mo, int fmo) {  \
        (void)mo; (void)fmo;                                                                          \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return c; }
EMU_TSAN_ATOMIC(8, uint8_t)
EMU_TSAN_ATOMIC(16, uint16_t)
EMU_TSAN_ATOMIC(32, uint32_t)
EMU_TSAN_ATOMIC(64, uint64_t)
#undef EMU_TSAN_ATOMIC
EMU_NO_TSAN void __tsan_atomic_thread_fence(int mo) { (void)mo; __atomic_thread_fence(__ATOMIC_SEQ_CST); }
EMU_NO_TSAN void __tsan_atomic_signal_fence(int mo) { (void)mo; __atomic_signal_fence(__ATOMIC_SEQ_CST); }
#endif
#if defined(EMU_COUNT_TRAFFIC)
// a CUDA atomic on global memory: one read and one write of n bytes
#define EMU_COUNT_RMW(p) (emu_count_read((p), sizeof(*(p))), emu_count_write((p), sizeof(*(p))))
#elif defined(EMU_RACECHECK)
// a CUDA atomic: an atomic write (it races with plain accesses, not with other atomics)
#define EMU_COUNT_RMW(p) emu_race_access((p), sizeof(*(p)), emu::RACE_ATOMIC)
#else
#define EMU_COUNT_RMW(p) ((void)0)
#endif

namespace emu {

}  // namespace emu

extern "C" EMU_HIDDEN void emu_fiber_main(emu::Fiber* f);

#if defined(EMU_ASM_SWITCH)
// emu_switch(save, to): push the callee-saved registers, store rsp in *save, load rsp = to,
// pop the other context's registers and return into it. emu_fiber_entry starts a fresh fiber
// (its Fiber* was placed where r12 is popped from).
extern "C" EMU_HIDDEN void emu_switch(void** save, void* to);
extern "C" EMU_HIDDEN void emu_fiber_entry();
asm(R"(
    .text
    .p2align 4
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch

    .p2align 4
    .globl emu_fiber_entry
    .hidden emu_fiber_entry
    .type emu_fiber_entry, @function
emu_fiber_entry:
    movq %r12, %rdi
    call emu_fiber_main
    ud2
    .size emu_fiber_entry, .-emu_fiber_entry
)");
#endif

namespace emu {

static const size_t kStackSize = 128 * 1024;

static inline void fiber_reset(Fiber* f) {
#if defined(EMU_ASM_SWITCH)
    uintptr_t top = (reinterpret_cast<uintptr_t>(f->stack) + f->stack_size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top - 56);   // r15 r14 r13 r12 rbx rbp ret
    for (int i = 0; i < 7; i++) { sp[i] = nullptr; }
    sp[3] = f;                                         // r12 = the fiber
    sp[6] = reinterpret_cast<void*>(&emu_fiber_entry); // ret lands in emu_fiber_entry, rsp 16-aligned
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack;
    f->uc.uc_stack.ss_size = f->stack_size;
    f->uc.uc_link = nullptr;
    uintptr_t p = reinterpret_cast<uintptr_t>(f);
    makecontext(&f->uc, reinterpret_cast<void (*)()>(+[](unsigned lo, unsigned hi) {
                    emu_fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | lo));
                }), 2, unsigned(p & 0xffffffffu), unsigned(p >> 32));
#endif
}

// Fiber stacks come from slabs of 64 (one mmap each, 8 MiB, reserved lazily): a mapping and a guard page per
// stack would cost two of the process's memory maps per CUDA thread, and every module (each .so has its own
// runtime) keeps up to 1024 fibers per worker, so a test session loading dozens of modules ran out of
// vm.max_map_count (65530) and mmap failed. Each stack's lowest page is its red zone: PROT_NONE for the
// first stack of a slab (an overflow faults), a canary for the others, checked after every block
// (check_stacks): an overflow into it fails the launch with a message.
static const int kStacksPerSlab = 64;
static const uint64_t kCanary = 0x5AFEC0DE5AFEC0DEull;
static const int kCanaryWords = 8;                     // the top 64 bytes of the red zone: hit first

static inline uint64_t* fiber_canary(Fiber* f) {
    return reinterpret_cast<uint64_t*>(f->stack + 4096) - kCanaryWords;
}

static inline Fiber* fiber_new(Worker* w) {
    if (w->slab == nullptr || w->slab_used == kStacksPerSlab) {
        void* mem = mmap(nullptr, kStacksPerSlab * kStackSize, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) { fprintf(stderr, "emulator: cannot map fiber stacks\n"); abort(); }
        mprotect(mem, 4096, PROT_NONE);                // the slab's guard page
        w->slab = static_cast<char*>(mem);
        w->slab_used = 0;
    }
    Fiber* f = new Fiber();
    f->worker = w;
    f->stack_size = kStackSize;
    f->stack = w->slab + static_cast<size_t>(w->slab_used) * kStackSize;
    f->guarded = w->slab_used++ == 0;
    if (!f->guarded) {
        for (int i = 0; i < kCanaryWords; i++) { fiber_canary(f)[i] = kCanary; }
    }
    fiber_reset(f);
    return f;
}

// after a block: did a thread's stack run into its red zone? (the guarded ones would have faulted)
static inline bool stacks_intact(Worker* w, int n) {
    for (int i = 0; i < n; i++) {
        Fiber* f = w->fibers[i];
        if (f->guarded) { continue; }
        for (int k = 0; k < kCanaryWords; k++) {
            if (fiber_canary(f)[k] != kCanary) { return false; }
        }
    }
    return true;
}

// scheduler -> fiber
static inline void switch_to_fiber(Worker* w, Fiber* f) {
    tls_fiber = f;
#if defined(EMU_RACECHECK)
    race_fiber = f;
#endif
#if defined(EMU_ASM_SWITCH)
    emu_switch(&w->sched_sp, f->sp);
#else
    swapcontext(&w->sched_uc, &f->uc);
#endif
#if defined(EMU_RACECHECK)
    race_fiber = nullptr;
#endif
    tls_fiber = nullptr;
}

// fiber -> scheduler
static inline void yield_fiber(Fiber* f) {
    Worker* w = f->worker;
#if defined(EMU_ASM_SWITCH)
    emu_switch(&f->sp, w->sched_sp);
#else
    swapcontext(&f->uc, &w->sched_uc);
#endif
}

static inline void fail(Launch* L, const std::string& msg) {
    std::lock_guard<std::mutex> lock(L->error_mutex);
    if (L->error.empty()) { L->error = msg; }
    L->failed = true;
}

static inline std::string block_name(const Worker* w) {
    char buf[96];
    snprintf(buf, sizeof buf, "block (%u,%u,%u)", w->block_idx.x, w->block_idx.y, w->block_idx.z);
    return buf;
}

// every live lane of warp k waits at a warp operation: answer them all
static inline bool complete_warp(Worker* w, int k) {
    int first = k * 32;
    int count = std::min(32, w->nthreads - first);
    uint64_t ballot = 0;                               // bit l: lane l voted with a nonzero predicate
    for (int lane = 0; lane < count; lane++) {
        Fiber* f = w->fibers[first + lane];
        if (f->state == WAIT_WARP && f->op == BALLOT && f->op_value != 0) { ballot |= uint64_t(1) << lane; }
    }
    for (int lane = 0; lane < count; lane++) {
        Fiber* f = w->fibers[first + lane];
        if (f->state != WAIT_WARP) { continue; }
        f->state = READY;
        if (f->op == SYNCWARP) { continue; }
        if (f->op == BALLOT) { f->op_result = ballot; continue; }
        int width = f->op_width;
        if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
            fail(w->launch, block_name(w) + ": shuffle width must be a power of 2 <= 32");
            return false;
        }
        int base = lane & ~(width - 1);                // start of this lane's segment
        int src;
        switch (f->op) {
            case SHFL_IDX: src = base + (f->op_arg & (width - 1)); break;
            case SHFL_UP: src = lane - f->op_arg; if (src < base) { src = lane; } break;
            case SHFL_DOWN: src = lane + f->op_arg; if (src >= base + width) { src = lane; } break;
            default: src = lane ^ f->op_arg; if (src >= base + width) { src = lane; } break;  // XOR
        }
        if (src >= count || w->fibers[first + src]->state == DONE) {
            char buf[160];
            snprintf(buf, sizeof buf, ": thread %d reads lane %d of warp %d in a shuffle, and that lane has %s",
                     first + lane, src, k, src >= count ? "no thread (block size not a multiple of 32?)" : "exited");
            fail(w->launch, block_name(w) + buf);
            return false;
        }
        Fiber* s = w->fibers[first + src];
        f->op_result = (s->state == WAIT_WARP || s->state == READY) ? s->op_value : 0;
    }
    w->warp_waiting[k] = 0;
    w->warp_epoch[k]++;                                // orders the warp's accesses (race checker)
    return true;
}

static inline void ensure_fibers(Worker* w, int n) {
    while (static_cast<int>(w->fibers.size()) < n) { w->fibers.push_back(fiber_new(w)); }
}

// run one block on this OS thread; false on an error (already recorded in the launch)
// Dynamic shared memory is followed by a red zone of kSmemRedZone bytes, filled with 0xFF as the shared memory
// itself and checked after each block: a kernel that writes past the shared_mem its launch asked for (a
// launcher that sized it too small) is a launch error naming the block, instead of a corrupted heap and a
// crash somewhere later. Reads past the end read the red zone's NaNs.
static constexpr size_t kSmemRedZone = 4096;

static inline void ensure_smem(Worker* w, size_t bytes) {
    if (bytes > w->smem_capacity || w->smem == nullptr) {
        free(w->smem);
        size_t cap = (bytes + 63) & ~size_t(63);
        w->smem = static_cast<char*>(aligned_alloc(64, cap + kSmemRedZone));
        w->smem_capacity = cap;
    }
}

// the red zone: the kSmemRedZone bytes right after the launch's shared_mem (filled once per launch and OS thread)
static inline void fill_smem_red_zone(Worker* w, size_t shared_mem) {
    memset(w->smem + shared_mem, 0xFF, kSmemRedZone);
}

// whether the red zone is untouched (refilled for the next block if not)
static inline bool smem_red_zone_intact(Worker* w, size_t shared_mem) {
    const char* zone = w->smem + shared_mem;
    uint64_t all = ~uint64_t(0);
    for (size_t i = 0; i < kSmemRedZone; i += 8) {
        uint64_t word;
        memcpy(&word, zone + i, 8);
        all &= word;
    }
    if (all == ~uint64_t(0)) { return true; }
    fill_smem_red_zone(w, shared_mem);
    return false;
}

static inline bool run_block(Worker* w, long long linear_block) {
    Launch* L = w->launch;
    const dim3& g = L->grid;
    const dim3& b = L->block;
    w->block_idx = dim3(unsigned(linear_block % g.x), unsigned((linear_block / g.x) % g.y),
                        unsigned(linear_block / (static_cast<long long>(g.x) * g.y)));
    int n = static_cast<int>(b.x * b.y * b.z);
    int nwarps = (n + 31) / 32;
    ensure_fibers(w, n);
    w->nthreads = n;
    w->live = n;
    w->at_barrier = 0;
    w->warp_live.assign(nwarps, 0);
    w->warp_waiting.assign(nwarps, 0);
    w->block_linear = linear_block;
    w->barrier_epoch = 0;
    for (int k = 0; k < nwarps; k++) { w->warp_epoch[k] = 0; }
    for (int i = 0; i < n; i++) {
        Fiber* f = w->fibers[i];
        f->lin = i;
        f->warp = i / 32;
        f->thread_idx = dim3(i % b.x, (i / b.x) % b.y, i / (b.x * b.y));
        f->state = READY;
        w->warp_live[f->warp]++;
    }
    if (L->shared_mem > 0) { memset(w->smem, 0xFF, L->shared_mem); }

    for (;;) {
        if (L->order == ORDER_WARPS) {
            // each warp in turn runs ahead as far as it can: through its warp operations, up to
            // __syncthreads or its end, before the next warp starts
            for (int k = 0; k < nwarps && !L->failed; k++) {
                for (;;) {
                    for (int i = k * 32; i < std::min(n, k * 32 + 32); i++) {
                        Fiber* f = w->fibers[i];
                        if (f->state == READY) { switch_to_fiber(w, f); }
                    }
                    if (w->warp_waiting[k] == 0 || w->warp_waiting[k] != w->warp_live[k]) { break; }
                    if (!complete_warp(w, k)) { break; }
                }
            }
        } else {
            for (int j = 0; j < n; j++) {
                Fiber* f = w->fibers[L->order == ORDER_REVERSE ? n - 1 - j : j];
                if (f->state == READY) { switch_to_fiber(w, f); }
            }
        }
        if (L->failed) { break; }
        if (w->live == 0) {
            if (!smem_red_zone_intact(w, L->shared_mem)) {
                char buf[160];
                snprintf(buf, sizeof buf, ": wrote past the end of its %zu bytes of dynamic shared memory (the "
                         "launch's shared_mem is too small for what the kernel uses)", L->shared_mem);
                fail(L, block_name(w) + buf);
                break;
            }
            if (stacks_intact(w, n)) { return true; }
            fail(L, block_name(w) + ": a thread ran past the bottom of its 124 KiB stack (a large local array?)");
            for (int i = 0; i < n; i++) {
                if (!w->fibers[i]->guarded) {
                    for (int k = 0; k < kCanaryWords; k++) { fiber_canary(w->fibers[i])[k] = kCanary; }
                }
            }
            break;
        }
        bool released = false;
        for (int k = 0; k < nwarps; k++) {
            if (w->warp_waiting[k] > 0 && w->warp_waiting[k] == w->warp_live[k]) {
                if (!complete_warp(w, k)) { break; }
                released = true;
            }
        }
        if (L->failed) { break; }
        if (!released && w->at_barrier > 0 && w->at_barrier == w->live) {
            for (int i = 0; i < n; i++) {
                if (w->fibers[i]->state == WAIT_BLOCK) { w->fibers[i]->state = READY; }
            }
            w->at_barrier = 0;
            w->barrier_epoch++;                        // orders the block's accesses (race checker)
            released = true;
        }
        if (!released) {
            char buf[200];
            snprintf(buf, sizeof buf, ": deadlock, %d live threads of which %d wait at __syncthreads and the "
                     "others at a warp operation some lanes of their warp never reach (barrier in divergent code?)",
                     w->live, w->at_barrier);
            fail(L, block_name(w) + buf);
            break;
        }
    }
    // the block's fibers are stuck mid-kernel: start them afresh
    for (int i = 0; i < n; i++) { fiber_reset(w->fibers[i]); w->fibers[i]->state = DONE; }
    return false;
}

// Flush-to-zero, as CuPy compiles kernels (nvcc/NVRTC -ftz=true): float arithmetic reads a subnormal input
// as 0 (DAZ) and writes 0 for a subnormal result (FTZ). On x86-64 both are bits of MXCSR, a per-thread
// register: set while this OS thread runs blocks (a pool thread, or the caller for a small launch) and put
// back after, so NumPy in the calling thread keeps its subnormals. Fibers share their OS thread's MXCSR (the
// switch leaves it alone; ucontext saves and restores it, and fibers are made while it is set). Elsewhere
// kernels run with subnormals (not done).
struct FlushToZero {
#if defined(__x86_64__)
    unsigned saved = __builtin_ia32_stmxcsr();
    FlushToZero() { __builtin_ia32_ldmxcsr(saved | 0x8040u); }   // bit 15 FTZ, bit 6 DAZ
    ~FlushToZero() { __builtin_ia32_ldmxcsr(saved); }
#endif
};

static inline void run_blocks(Worker* w, Launch* L) {
    FlushToZero ftz;
    w->launch = L;
    ensure_smem(w, L->shared_mem);
    fill_smem_red_zone(w, L->shared_mem);
    Worker* saved = tls_worker;
    tls_worker = w;
    while (!L->failed) {
        long long blk = L->next_block.fetch_add(1);
        if (blk >= L->num_blocks) { break; }
        if (!run_block(w, blk)) { break; }
    }
    tls_worker = saved;
    w->launch = nullptr;
#if defined(EMU_COUNT_TRAFFIC)
    TrafficSums sums = tls_traffic;
    tls_traffic = TrafficSums{0, 0, 0, 0};
    L->traffic[0] += sums.read_bytes;
    L->traffic[1] += sums.write_bytes;
    L->traffic[2] += sums.reads;
    L->traffic[3] += sums.writes;
#endif
}

// the pool: helper OS threads wait for a launch, then take blocks alongside the caller
struct Pool {
    std::mutex mu;
    std::condition_variable start_cv, done_cv;
    std::vector<Worker*> workers;   // workers[0] belongs to the calling thread
    Launch* launch = nullptr;
    unsigned long long generation = 0;
    int active = 0;                 // helpers working on the current launch
};

static inline int pool_size() {
    const char* env = getenv("LLMC_EMULATOR_THREADS");
    int n = env ? atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
    return std::max(1, std::min(n, 64));
}

static inline void pool_thread(Pool* P, Worker* w) {
    unsigned long long seen = 0;
    for (;;) {
        Launch* L;
        {
            std::unique_lock<std::mutex> lock(P->mu);
            P->start_cv.wait(lock, [&] { return P->generation != seen; });
            seen = P->generation;
            L = P->launch;
            if (L == nullptr) { continue; }            // woke too late: the caller already finished it
            P->active++;
        }
        run_blocks(w, L);
        {
            std::lock_guard<std::mutex> lock(P->mu);
            if (--P->active == 0) { P->done_cv.notify_all(); }
        }
    }
}

static inline Pool* pool() {
    static Pool* P = nullptr;
    static pid_t owner = 0;
    if (P == nullptr || owner != getpid()) {          // first launch, or a fork() child: its helpers are gone
        P = new Pool();                                // never freed: helper threads live until exit
        owner = getpid();
        int n = pool_size();
        for (int i = 0; i < n; i++) { P->workers.push_back(new Worker()); }
        for (int i = 1; i < n; i++) { std::thread(pool_thread, P, P->workers[i]).detach(); }
    }
    return P;
}

static std::mutex launch_mutex;                        // one launch at a time, like one stream

#if defined(EMU_RACECHECK)
// this module's static TLS block in the calling thread (dl_iterate_phdr's dlpi_tls_data): where the
// kernel's static __shared__ variables (static thread_local) lie
struct TlsBlock { uintptr_t code = 0; uintptr_t data = 0; size_t size = 0; };
static int find_tls_block(struct dl_phdr_info* info, size_t, void* arg) {
    TlsBlock* t = static_cast<TlsBlock*>(arg);
    bool mine = false;
    size_t tls_size = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type == PT_LOAD && t->code - (info->dlpi_addr + ph.p_vaddr) < ph.p_memsz) { mine = true; }
        if (ph.p_type == PT_TLS) { tls_size = ph.p_memsz; }
    }
    if (!mine) { return 0; }
    t->data = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
    t->size = t->data != 0 ? tls_size : 0;
    return 1;
}

static inline void race_add_range(RaceState* S, uintptr_t lo, size_t size, unsigned shift, bool shared, int id) {
    if (size == 0) { return; }
    RaceRange& r = S->ranges[S->n++];
    r.lo = lo;
    r.size = size;
    r.shift = shift;
    r.shared = shared;
    r.id = id;
    r.shadow_bytes = ((size + (size_t(1) << shift) - 1) >> shift) * 3 * sizeof(uint64_t);
    void* mem = mmap(nullptr, r.shadow_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) { fprintf(stderr, "emulator: cannot map the race checker's shadow\n"); abort(); }
    r.shadow = static_cast<uint64_t*>(mem);            // zero pages: no access yet
}

static inline void race_forget_misses(RaceState* S) {
    for (int i = 0; i < RaceState::kMissPages; i++) { S->miss_page[i] = ~uintptr_t(0); }
    S->last = 0;
}

// the checked ranges of a launch: the arrays, then the dynamic and static shared memory
static inline void race_begin(RaceState* S, Worker* w, size_t shared_mem) {
    uintptr_t lo = UINTPTR_MAX, hi = 0;
    ensure_smem(w, shared_mem);
    race_add_range(S, reinterpret_cast<uintptr_t>(w->smem), shared_mem, 1, true, -1);
    static thread_local TlsBlock t;                    // found once per OS thread (it does not move)
    if (t.code == 0) {
        t.code = reinterpret_cast<uintptr_t>(&emu_fiber_main);   // taking t's address made this block exist
        dl_iterate_phdr(find_tls_block, &t);
    }
    race_add_range(S, t.data, t.size, 1, true, -2);
    S->own_tls[0] = reinterpret_cast<uintptr_t>(&tls_worker);
    S->own_tls[1] = reinterpret_cast<uintptr_t>(&tls_fiber);
    for (int i = 0; i < S->n; i++) {
        lo = std::min(lo, S->ranges[i].lo);
        hi = std::max(hi, S->ranges[i].lo + S->ranges[i].size);
    }
    S->lo = lo;
    S->span = S->n > 0 ? hi - lo : 0;
    race_forget_misses(S);
}

static inline void race_end(RaceState* S) {
    for (int i = 0; i < S->n; i++) { munmap(S->ranges[i].shadow, S->ranges[i].shadow_bytes); }
    S->n = 0;
}
#endif

// traffic (a counting library only): ranges holds nranges (address, bytes) pairs, the launch's global
// arrays; counts receives bytes read, bytes written, loads, stores
static inline std::string launch(const unsigned* grid, const unsigned* block, size_t shared_mem,
                                 Thunk thunk, void* kernel, void** args, int order,
                                 const unsigned long long* ranges = nullptr, int nranges = 0,
                                 unsigned long long* counts = nullptr, RaceState* race = nullptr) {
    std::lock_guard<std::mutex> one_at_a_time(launch_mutex);
    Pool* P = pool();
    Launch L;
#if defined(EMU_COUNT_TRAFFIC)
    if (nranges > kMaxTrafficRanges) { return "the traffic counter takes at most 64 array arguments"; }
    uintptr_t lo = UINTPTR_MAX, hi = 0;
    traffic_nranges = 0;
    for (int i = 0; i < nranges; i++) {
        TrafficRange r = {static_cast<uintptr_t>(ranges[2 * i]), static_cast<uintptr_t>(ranges[2 * i + 1])};
        if (r.size == 0) { continue; }
        traffic_ranges[traffic_nranges++] = r;
        lo = std::min(lo, r.lo);
        hi = std::max(hi, r.lo + r.size);
    }
    traffic_lo = lo;
    traffic_span = traffic_nranges > 0 ? hi - lo : 0;
#else
    (void)ranges; (void)nranges; (void)counts;
#endif
    L.grid = dim3(grid[0], grid[1], grid[2]);
    L.block = dim3(block[0], block[1], block[2]);
    L.shared_mem = shared_mem;
    L.thunk = thunk;
    L.kernel = kernel;
    L.args = args;
    L.order = order;
    L.num_blocks = static_cast<long long>(grid[0]) * grid[1] * grid[2];
    long long total_threads = L.num_blocks * block[0] * block[1] * block[2];
    int helpers = static_cast<int>(P->workers.size()) - 1;
    if (L.num_blocks < 2 || total_threads < 8192) { helpers = 0; }  // not worth waking anyone
#if defined(EMU_RACECHECK)
    if (race != nullptr) {                              // blocks one after another on this thread
        helpers = 0;
        race_begin(race, P->workers[0], shared_mem);
        race_state = race;
    }
#else
    (void)race;
#endif
    if (helpers > 0) {
        std::lock_guard<std::mutex> lock(P->mu);
        P->launch = &L;
        P->generation++;
        P->start_cv.notify_all();
    }
    run_blocks(P->workers[0], &L);                     // the caller works too, until no block is left
    if (helpers > 0) {
        std::unique_lock<std::mutex> lock(P->mu);
        P->launch = nullptr;                           // helpers that have not woken yet skip this launch
        P->done_cv.wait(lock, [&] { return P->active == 0; });
    }
#if defined(EMU_COUNT_TRAFFIC)
    traffic_nranges = 0;
    traffic_span = 0;
    for (int i = 0; i < 4; i++) { counts[i] = L.traffic[i]; }
#endif
#if defined(EMU_RACECHECK)
    if (race != nullptr) {
        race_state = nullptr;
        race_end(race);
    }
#endif
    return L.error;
}

// ---- what the kernels call

static inline void syncthreads() {
    Fiber* f = tls_fiber;
    f->state = WAIT_BLOCK;
    f->worker->at_barrier++;
    yield_fiber(f);
}

template <typename T>
static inline T warp_op(WarpOp op, T value, int arg, int width) {
    static_assert(sizeof(T) <= 8, "shuffles of types wider than 8 bytes are not emulated");
    Fiber* f = tls_fiber;
    f->op = op;
    f->op_arg = arg;
    f->op_width = width;
    f->op_value = 0;
    memcpy(&f->op_value, &value, sizeof(T));
    f->state = WAIT_WARP;
    f->worker->warp_waiting[f->warp]++;
    yield_fiber(f);
    T result;
    memcpy(&result, &f->op_result, sizeof(T));
    return result;
}

static inline void* dynamic_smem() { return tls_worker->smem; }

// ---- the launch entry rawmodule.py generates for each kernel: unpack void** args, report types

template <typename... A, size_t... I>
static inline void invoke(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <typename... A>
static void thunk(void* kernel, void** args) {
    invoke(reinterpret_cast<void (*)(A...)>(kernel), args, std::index_sequence_for<A...>{});
}

template <typename... A>
static inline const char* launch_kernel(void (*k)(A...), const unsigned* grid, const unsigned* block,
                                        unsigned long long shared_mem, void** args, int order) {
    static thread_local std::string error;
    error = launch(grid, block, shared_mem, &thunk<A...>, reinterpret_cast<void*>(k), args, order);
    return error.empty() ? nullptr : error.c_str();
}

// the counting library's entry: the same launch, with the arrays to count and the counts' place
template <typename... A>
static inline const char* launch_kernel_counted(void (*k)(A...), const unsigned* grid, const unsigned* block,
                                                unsigned long long shared_mem, void** args, int order,
                                                const unsigned long long* ranges, int nranges,
                                                unsigned long long* counts) {
    static thread_local std::string error;
    error = launch(grid, block, shared_mem, &thunk<A...>, reinterpret_cast<void*>(k), args, order,
                   ranges, nranges, counts);
    return error.empty() ? nullptr : error.c_str();
}

#if defined(EMU_RACECHECK)
// the race checker's entry: ranges holds nranges (address, bytes, log2 granule) triples, the launch's
// arrays in argument order (ids 0..nranges-1); reports receives up to max_reports races
// (kRaceReportWords each), *found how many racing accesses there were in all
template <typename... A>
static inline const char* launch_kernel_raced(void (*k)(A...), const unsigned* grid, const unsigned* block,
                                              unsigned long long shared_mem, void** args, int order,
                                              const unsigned long long* ranges, const int* ids, int nranges,
                                              unsigned long long* reports, int max_reports,
                                              unsigned long long* found) {
    static thread_local std::string error;
    if (nranges > kMaxRaceRanges) { return "the race checker takes at most 64 array arguments"; }
    static RaceState S;                                 // big: not on the stack
    static std::mutex race_mutex;                       // one checked launch at a time owns S
    std::lock_guard<std::mutex> one_at_a_time(race_mutex);
    S.n = 0;
    for (int i = 0; i < nranges; i++) {
        race_add_range(&S, ranges[3 * i], ranges[3 * i + 1], static_cast<unsigned>(ranges[3 * i + 2]), false, ids[i]);
    }
    S.reports = reports;
    S.max_reports = max_reports;
    S.nreports = 0;
    S.total = 0;
    error = launch(grid, block, shared_mem, &thunk<A...>, reinterpret_cast<void*>(k), args, order,
                   nullptr, 0, nullptr, &S);
    *found = S.total;
    return error.empty() ? nullptr : error.c_str();
}
#endif

template <typename T> struct TypeName { static const char* get() { return "?"; } };
#define EMU_TYPE_NAME(T, s) template <> struct TypeName<T> { static const char* get() { return s; } };
EMU_TYPE_NAME(float, "float")
EMU_TYPE_NAME(double, "double")
EMU_TYPE_NAME(int, "int")
EMU_TYPE_NAME(unsigned int, "unsigned int")
EMU_TYPE_NAME(long long, "long long")
EMU_TYPE_NAME(unsigned long long, "unsigned long long")
EMU_TYPE_NAME(long, "long")
EMU_TYPE_NAME(unsigned long, "unsigned long")
EMU_TYPE_NAME(short, "short")
EMU_TYPE_NAME(unsigned short, "unsigned short")
EMU_TYPE_NAME(char, "char")
EMU_TYPE_NAME(signed char, "signed char")
EMU_TYPE_NAME(unsigned char, "unsigned char")
EMU_TYPE_NAME(bool, "bool")
EMU_TYPE_NAME(float4, "float4")
EMU_TYPE_NAME(float2, "float2")
EMU_TYPE_NAME(int4, "int4")
EMU_TYPE_NAME(__nv_bfloat16, "__nv_bfloat16")
EMU_TYPE_NAME(__nv_bfloat162, "__nv_bfloat162")
EMU_TYPE_NAME(void, "void")
#undef EMU_TYPE_NAME

template <typename T>
static inline std::string type_name() {
    if constexpr (std::is_pointer_v<T>) {
        using P = std::remove_pointer_t<T>;
        return std::string(std::is_const_v<P> ? "const " : "") + TypeName<std::remove_cv_t<P>>::get() + "*";
    } else {
        return TypeName<std::remove_cv_t<T>>::get();
    }
}

// "float*,const int*,int" for void k(float*, const int*, int)
template <typename... A>
static inline const char* signature(void (*)(A...)) {
    static const std::string s = [] {
        std::string out;
        ((out += type_name<A>() + ","), ...);
        if (!out.empty()) { out.pop_back(); }
        return out;
    }();
    return s.c_str();
}

}  // namespace emu

extern "C" EMU_HIDDEN void emu_fiber_main(emu::Fiber* f) {
    for (;;) {                                          // one CUDA thread per turn of the loop
        emu::Worker* w = f->worker;
        emu::Launch* L = w->launch;
        L->thunk(L->kernel, L->args);
        f->state = emu::DONE;                          // the thread returned: it leaves every barrier
        w->live--;
        w->warp_live[f->warp]--;
        emu::yield_fiber(f);
    }
}

// ----------------------------------------------------------------------------------------------
// CUDA built-ins

#define threadIdx (emu::tls_fiber->thread_idx)
#define blockIdx (emu::tls_worker->block_idx)
#define blockDim (emu::tls_worker->launch->block)
#define gridDim (emu::tls_worker->launch->grid)

static inline void __syncthreads() { emu::syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)mask; emu::warp_op<int>(emu::SYNCWARP, 0, 0, 32); }

template <typename T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    (void)mask; return emu::warp_op<T>(emu::SHFL_IDX, v, src, width);
}
template <typename T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    (void)mask; return emu::warp_op<T>(emu::SHFL_UP, v, static_cast<int>(delta), width);
}
template <typename T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    (void)mask; return emu::warp_op<T>(emu::SHFL_DOWN, v, static_cast<int>(delta), width);
}
template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    (void)mask; return emu::warp_op<T>(emu::SHFL_XOR, v, lane_mask, width);
}

static inline unsigned __ballot_sync(unsigned mask, int predicate) {
    (void)mask; return static_cast<unsigned>(emu::warp_op<int>(emu::BALLOT, predicate != 0, 0, 32));
}
static inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
static inline int __all_sync(unsigned mask, int predicate) {
    // every live lane voted yes (lanes that exited do not vote)
    unsigned votes = __ballot_sync(mask, predicate);
    unsigned live = __ballot_sync(mask, 1);
    return votes == live;
}
static inline unsigned __activemask() { return __ballot_sync(0xffffffffu, 1); }

// atomics: real atomics, since blocks run on several OS threads at once; the traffic counter counts
// each as one read and one write of its size (EMU_COUNT_RMW)
// a compare-and-swap loop on the value's bits: U is the unsigned integer of F's size
template <typename F, typename U>
static inline F atomic_add_bits(F* address, F val) {
    U* p = reinterpret_cast<U*>(address);
    U old_bits = __atomic_load_n(p, __ATOMIC_RELAXED);
    for (;;) {
        F old;
        memcpy(&old, &old_bits, sizeof(F));
        F sum = old + val;
        U new_bits;
        memcpy(&new_bits, &sum, sizeof(F));
        if (__atomic_compare_exchange_n(p, &old_bits, new_bits, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { return old; }
    }
}
static inline float atomicAdd(float* address, float val) {
    EMU_COUNT_RMW(address);
    return atomic_add_bits<float, uint32_t>(address, val);
}
static inline double atomicAdd(double* address, double val) {
    EMU_COUNT_RMW(address);
    return atomic_add_bits<double, uint64_t>(address, val);
}
static inline int atomicAdd(int* a, int v) { EMU_COUNT_RMW(a); return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
static inline unsigned atomicAdd(unsigned* a, unsigned v) {
    EMU_COUNT_RMW(a);
    return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
static inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    EMU_COUNT_RMW(a);
    return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
static inline int atomicMax(int* a, int v) {
    EMU_COUNT_RMW(a);
    int old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return old;
}
static inline int atomicCAS(int* a, int compare, int val) {
    EMU_COUNT_RMW(a);
    __atomic_compare_exchange_n(a, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;
}
static inline int atomicExch(int* a, int v) { EMU_COUNT_RMW(a); return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// math intrinsics and cache-hinted loads/stores (hints mean nothing on a CPU); glibc itself declares
// __expf, __logf, __sinf, __cosf and __powf with the meaning CUDA gives them
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __fdividef(float x, float y) { return x / y; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }   // as CUDA's:
static inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }   // both unsigned
static inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
static inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

// Cache-hinted loads and stores (__ldg, __ldcs, __ldcg, __stcs, __stcg), for the types CUDA has them
// for that exist here: the arithmetic types, float2, float4, int4 (a 128-bit packed load of 4
// floats or 8 bf16), __nv_bfloat16 and __nv_bfloat162; any other type is a compile error, as with
// nvcc. Each one checks that the address is aligned to the type's size (16 bytes for float4/int4):
// a misaligned access is a launch error on a GPU ("misaligned address"), here an error raised after
// the launch naming the thread and the address; the access itself is then done bytewise so the
// process does not crash. A plain `*p` through a misaligned float4*/int4* is NOT checked (g++ may
// use an aligned SSE move, and the process dies with SIGSEGV).
namespace emu {
template <typename T> struct CacheHinted
    : std::integral_constant<bool, std::is_arithmetic<T>::value && !std::is_same<T, bool>::value> {};
template <> struct CacheHinted<float2> : std::true_type {};
template <> struct CacheHinted<float4> : std::true_type {};
template <> struct CacheHinted<int4> : std::true_type {};
template <> struct CacheHinted<__nv_bfloat16> : std::true_type {};
template <> struct CacheHinted<__nv_bfloat162> : std::true_type {};

template <typename T>
static inline void check_aligned(const void* p, const char* what) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a % alignof(T) == 0 || tls_worker == nullptr || tls_fiber == nullptr) { return; }
    char buf[240];
    const dim3& t = tls_fiber->thread_idx;
    snprintf(buf, sizeof buf, " thread (%u,%u,%u): misaligned address: %s of a %zu-byte %s at %p, "
             "which is not a multiple of %zu (a packed load/store needs an aligned pointer)",
             t.x, t.y, t.z, what, sizeof(T), TypeName<std::remove_cv_t<T>>::get(), p, alignof(T));
    fail(tls_worker->launch, block_name(tls_worker) + buf);
}

template <typename T>
static inline T hinted_load(const T* p, const char* what) {
    static_assert(CacheHinted<std::remove_cv_t<T>>::value, "CUDA has no cache-hinted load for this type");
    check_aligned<T>(p, what);
    T v;
    memcpy(static_cast<void*>(&v), static_cast<const void*>(p), sizeof(T));
    return v;
}

template <typename T>
static inline void hinted_store(T* p, const T& v, const char* what) {
    static_assert(CacheHinted<std::remove_cv_t<T>>::value, "CUDA has no cache-hinted store for this type");
    check_aligned<T>(p, what);
    memcpy(static_cast<void*>(p), static_cast<const void*>(&v), sizeof(T));
}
}  // namespace emu

template <typename T> static inline T __ldg(const T* p) { return emu::hinted_load(p, "__ldg"); }
template <typename T> static inline T __ldcs(const T* p) { return emu::hinted_load(p, "__ldcs"); }
template <typename T> static inline T __ldcg(const T* p) { return emu::hinted_load(p, "__ldcg"); }
template <typename T> static inline void __stcs(T* p, T v) { emu::hinted_store(p, v, "__stcs"); }
template <typename T> static inline void __stcg(T* p, T v) { emu::hinted_store(p, v, "__stcg"); }
