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
