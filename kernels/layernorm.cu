// layernorm.cu: LayerNorm over the last axis (C), eps = 1e-5, biased variance.
//
// Mirrors train_gpt2.py's layernorm_forward / layernorm_backward (llm.c train_gpt2_fp32.cu:
// layernorm_forward_kernel3 and layernorm_backward_kernel2; warp reductions written with
// __shfl_xor_sync instead of cooperative groups).
//
// layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* inp,
//                          const float* weight, const float* bias, int N, int C)
//   N = B*T rows. out (N,C) = (inp - mean) * rstd * weight + bias; mean, rstd (N) are written
//   for the backward pass (either may be NULL, e.g. for inference). All written, not accumulated.
//   launch: one warp per row: block = 256 (a multiple of 32), grid = ceil_div(N*32, block),
//   no shared memory. A warp whose row is past N returns as a whole before any shuffle.
//
// layernorm_backward_kernel(float* dinp, float* dweight, float* dbias, const float* dout,
//                           const float* inp, const float* weight, const float* mean,
//                           const float* rstd, int B, int T, int C)
//   dinp (B,T,C), dweight (C), dbias (C) all ACCUMULATE (+=). One warp per row; each block
//   first sums its rows' dweight/dbias in shared memory, then adds them to global memory with
//   atomicAdd (so dweight/dbias are not bit-deterministic run to run; dinp is).
//   launch: block = 512 (a multiple of 32), grid = ceil_div(32*B*T, block),
//   dynamic shared memory = 2*C*sizeof(float) bytes (C <= 6144 within the default 48 KiB).
//
// Assumes N*C < 2^31. warp_sum (every lane gets the sum over the warp) comes from common.cuh.

#include "common.cuh"

extern "C" __global__ void layernorm_forward_kernel(float* out, float* mean, float* rstd,
                                                    const float* inp, const float* weight,
                                                    const float* bias, int N, int C) {
    int lane = threadIdx.x % 32;
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;  // one warp per row
    if (row >= N) { return; }
    const float* x = inp + row * C;                            // (C,)

    float sum = 0.0f;
    for (int i = lane; i < C; i += 32) { sum += x[i]; }
    float m = warp_sum(sum) / C;

    float sq = 0.0f;
    for (int i = lane; i < C; i += 32) { float d = x[i] - m; sq += d * d; }
    float s = rsqrtf(warp_sum(sq) / C + 1e-5f);

    if (lane == 0) {
        if (mean != nullptr) { mean[row] = m; }
        if (rstd != nullptr) { rstd[row] = s; }
    }
    float* o = out + row * C;
    for (int i = lane; i < C; i += 32) { o[i] = s * (x[i] - m) * weight[i] + bias[i]; }
}

extern "C" __global__ void layernorm_backward_kernel(float* dinp, float* dweight, float* dbias,
                                                     const float* dout, const float* inp,
                                                     const float* weight, const float* mean,
                                                     const float* rstd, int B, int T, int C) {
    extern __shared__ float shared[];           // 2*C floats: this block's dbias, then dweight
    float* dbias_shared = shared;
    float* dweight_shared = shared + C;
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + warp;  // one warp per row

    for (int i = threadIdx.x; i < C; i += blockDim.x) { dbias_shared[i] = 0.0f; dweight_shared[i] = 0.0f; }
    __syncthreads();

    if (row < B * T) {                          // no return here: every thread meets both barriers
        const float* dout_row = dout + row * C;
        const float* x = inp + row * C;
        float* dinp_row = dinp + row * C;
        float m = mean[row];
        float s = rstd[row];

        // the two means the gradient needs: mean(dnorm) and mean(dnorm * norm)
        float dnorm_mean = 0.0f;
        float dnorm_norm_mean = 0.0f;
        for (int i = lane; i < C; i += 32) {
            float norm = (x[i] - m) * s;
            float dnorm = weight[i] * dout_row[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean = warp_sum(dnorm_mean) / C;
        dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;

        for (int i = lane; i < C; i += 32) {
            float norm = (x[i] - m) * s;
            float dnorm = weight[i] * dout_row[i];
            atomicAdd(&dbias_shared[i], dout_row[i]);           // out = ... + bias
            atomicAdd(&dweight_shared[i], norm * dout_row[i]);  // out = norm * weight + ...
            dinp_row[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        atomicAdd(&dbias[i], dbias_shared[i]);
        atomicAdd(&dweight[i], dweight_shared[i]);
    }
}
