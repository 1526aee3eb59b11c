// common.cuh: the warp and block reductions the kernel files share.
//
// Every kernels/<file>.cu starts with `#include "common.cuh"`, so each file compiles alone:
// `nvcc -I kernels --ptx kernels/<file>.cu`. NVRTC (cupy.RawModule) and the emulator get the same
// file as one text instead: llmc/cuda_common.py's kernel_source(file) replaces the #include line
// with this file, between #line directives, so compiler messages keep both files' line numbers.
// Expanding it there, rather than passing -I, keeps the compile caches honest: CuPy and the
// emulator key their caches on the source text, so an edit here recompiles every module.
// The include guard makes a second #include (or the textual copy plus an #include) harmless.

#ifndef LLMC_COMMON_CUH
#define LLMC_COMMON_CUH

// floatX: the type of parameters, gradients and activations, chosen when the file is compiled, as
// llm.c's PRECISION: -DENABLE_BF16 gives bf16 (__nv_bfloat16, train_gpt2_cuda.py's default on
// SM >= 80), no define gives float. Everything else (LayerNorm mean/rstd, losses, AdamW's m, v
// and master weights, every sum) stays float, so a kernel reads floatX, computes in float and
// rounds once when it stores floatX. In an fp32 build the casts are no-ops: the same text is the
// fp32 kernel, bit for bit.
#ifdef ENABLE_BF16
#include <cuda_bf16.h>
typedef __nv_bfloat16 floatX;
#else
typedef float floatX;
#endif

// Packed128<T>: 16 bytes of T (8 bf16 or 4 floats) moved by one 128-bit load or store, the
// widest a thread can issue; a warp then reads 512 contiguous bytes per instruction. The address
// must be a multiple of 16 bytes (buffers from cudaMalloc are 256-byte aligned, so an offset that
// is a multiple of Packed128<T>::size elements is): the kernels that use it say so in their spec.
// load128cs / store128cs add the "streaming" cache hint (read or written once: do not keep in L2).
template <class T>
struct alignas(16) Packed128 {
    static constexpr int size = 16 / sizeof(T);
    T payload[size];
    __device__ T& operator[](int i) { return payload[i]; }
    __device__ const T& operator[](int i) const { return payload[i]; }
};

template <class T>
__device__ Packed128<T> load128(const T* address) {
    int4 bits = __ldg(reinterpret_cast<const int4*>(address));
    Packed128<T> out;
    *reinterpret_cast<int4*>(&out) = bits;             // the 16 bytes as they are
    return out;
}

template <class T>
__device__ Packed128<T> load128cs(const T* address) {
    int4 bits = __ldcs(reinterpret_cast<const int4*>(address));
    Packed128<T> out;
    *reinterpret_cast<int4*>(&out) = bits;             // the 16 bytes as they are
    return out;
}

template <class T>
__device__ void store128(T* address, const Packed128<T>& value) {
    int4 bits = *reinterpret_cast<const int4*>(&value);
    __stcg(reinterpret_cast<int4*>(address), bits);
}

template <class T>
__device__ void store128cs(T* address, const Packed128<T>& value) {
    int4 bits = *reinterpret_cast<const int4*>(&value);
    __stcs(reinterpret_cast<int4*>(address), bits);
}

typedef Packed128<floatX> x128;
typedef Packed128<float> f128;

// Stochastic rounding of a float to bf16 (AdamW's parameter update, as llm.c): round up with the
// probability that the dropped low 16 bits are of one bf16 step, so the rounding is unbiased on
// average and small updates are not all lost. The randomness is a hash of the thread's place in
// the launch and a per-launch seed (llm.c uses Squirrel Eiserloh's "SquirrelNoise5" hash): every
// thread of every launch gets its own 32 bits, and the same launch with the same seed gets the same
// bits, so a run is repeatable. In an fp32 build the value is stored as it is.

__device__ unsigned int noise_hash(unsigned int position, unsigned int seed) {
    // five rounds of multiply / add a constant / xor with a shift of itself: every input bit
    // reaches every output bit (the constants are SquirrelNoise5's)
    unsigned int h = position * 0xd2a80a3fu;
    h += seed;
    h ^= h >> 9;
    h += 0xa884f197u;
    h ^= h >> 11;
    h *= 0x6c736f4bu;
    h ^= h >> 13;
    h += 0xb79f3abbu;
    h ^= h >> 15;
    h *= 0x1b56c4f5u;
    h ^= h >> 17;
    return h;
}

__device__ unsigned int thread_noise(unsigned int seed) {
    // a 2-D position: the thread in its block, and the block (x, y) flattened with blockDim.x as llm.c
    unsigned int x = threadIdx.x;
    unsigned int y = blockIdx.x * blockDim.x + blockIdx.y;
    return noise_hash(x + 198491317u * y, seed);
}

__device__ void stochastic_round(float value, float* out, unsigned int seed) {
    *out = value;                                      // fp32: nothing to round
}

#ifdef ENABLE_BF16
__device__ void stochastic_round(float value, __nv_bfloat16* out, unsigned int seed) {
    // the low 16 bits of the float are what bf16 drops; compare them with 16 random bits: above,
    // set them all (the round to nearest below then goes up), else clear them (it stays down)
    unsigned int threshold = thread_noise(seed) & 0xFFFFu;
    unsigned int bits = __float_as_uint(value);
    bits = ((bits & 0xFFFFu) > threshold) ? (bits | 0xFFFFu) : (bits & ~0xFFFFu);
    *out = __float2bfloat16_rn(__uint_as_float(bits));
}
#endif

// warp_sum(v), warp_max(v): a butterfly over the 32 lanes with __shfl_xor_sync. Lane k receives
// the v of lane k ^ offset for offsets 16, 8, 4, 2, 1, so afterwards EVERY lane holds the sum
// (max) over the warp and no broadcast is needed. All 32 lanes must take part (full mask): a
// kernel whose last warp is partly past the data returns it as a whole, never lane by lane.

__device__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) { v += __shfl_xor_sync(0xffffffff, v, offset); }
    return v;
}

__device__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset /= 2) { v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset)); }
    return v;
}

// FLOAT_LOWEST: -FLT_MAX, the start of a running max (NVRTC has no <cfloat>).
constexpr float FLOAT_LOWEST = -3.402823466e+38f;

// block_sum(v, shared), block_max(v, shared): the sum (max) of v over the whole block, returned to
// EVERY thread. shared holds >= 32 floats (one partial per warp); blockDim.x is a multiple of 32,
// <= 1024, and every thread of the block calls it (it has __syncthreads). The barrier before the
// write lets one shared buffer serve consecutive calls.

__device__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x % 32;
    int warp = threadIdx.x / 32;
    v = warp_sum(v);
    __syncthreads();                                   // shared may still be read by the last call
    if (lane == 0) { shared[warp] = v; }
    __syncthreads();
    v = (lane < blockDim.x / 32) ? shared[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v, float* shared) {
    int lane = threadIdx.x % 32;
    int warp = threadIdx.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) { shared[warp] = v; }
    __syncthreads();
    v = (lane < blockDim.x / 32) ? shared[lane] : FLOAT_LOWEST;
    return warp_max(v);
}

#endif  // LLMC_COMMON_CUH
