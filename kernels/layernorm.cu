// layernorm.cu: LayerNorm over the last axis (C), eps = 1e-5, biased variance.
//
// Mirrors train_gpt2.py's layernorm_forward / layernorm_backward (llm.c train_gpt2_fp32.cu:
// layernorm_forward_kernel3, and layernorm_backward_kernel2's warp per row for dinp; warp
// reductions written with __shfl_xor_sync instead of cooperative groups). Unlike that kernel the
// backward has no atomics: per-block partial sums of dweight/dbias go to a scratch buffer and a
// second kernel adds them in block order, so the whole backward is deterministic (as llm.c's
// mainline train_gpt2.cu, whose LayerNorm backward also sums per-block partials from a scratch buffer).
// floatX (common.cuh) is float, or bf16 when compiled with -DENABLE_BF16: inputs, outputs,
// parameters and their gradients are floatX; mean, rstd and the scratch stay float; every sum is
// taken in float and each floatX output is rounded once (to nearest) at its store.
//
// layernorm_forward_kernel(floatX* out, float* mean, float* rstd, const floatX* inp,
//                          const floatX* weight, const floatX* bias, int N, int C)
//   N = B*T rows. out (N,C) = (inp - mean) * rstd * weight + bias; mean, rstd (N) are written
//   for the backward pass (either may be NULL, e.g. for inference). All written, not accumulated.
//   launch: one warp per row: block = 256 (a multiple of 32), grid = ceil_div(N*32, block),
//   no shared memory. A warp whose row is past N returns as a whole before any shuffle.
//
// fused_residual_layernorm_forward_kernel(floatX* residual, floatX* normed, float* mean, float* rstd,
//                                         const floatX* inp1, const floatX* inp2, const floatX* weight,
//                                         const floatX* bias, int N, int C)
//   residual (N,C) = inp1 + inp2, rounded to floatX (residual.cu's residual_forward_kernel), then
//   normed (N,C), mean, rstd (N) = the LayerNorm of that ROUNDED residual, exactly as
//   layernorm_forward_kernel computes it: the same per-lane sums in the same order, so the two
//   launches it replaces and this one give the same bits in fp32 and in bf16 (llm.c mainline's
//   fused_residual_forward5 idea: one read of the new residual fewer, one launch fewer; here with
//   plain per-element loads, to keep that equality). mean, rstd may be NULL; all written.
//   residual may alias inp1 or inp2 (each element is read and then written by the same lane).
//   launch: as layernorm_forward_kernel: one warp per row, block = 256 (a multiple of 32),
//   grid = ceil_div(N*32, block), no shared memory.
//
// layernorm_backward_kernel(floatX* dinp, float* scratch, const floatX* dout, const floatX* inp,
//                           const floatX* weight, const float* mean, const float* rstd,
//                           int B, int T, int C)
//   dinp (B,T,C) ACCUMULATES (+=, in float, rounded once). scratch (gridDim.x, 2, C) floats is
//   WRITTEN: row 2*blk of it holds block blk's share of dbias (the sum of dout over its rows), row
//   2*blk+1 its share of dweight (the sum of norm * dout), for layernorm_backward_sum_kernel to add up.
//   launch: block = 512 (a multiple of 32; rows_per_block = block/32), grid = ceil_div(32*B*T, block),
//   no shared memory. Two phases, no barrier between them (the second reads only inputs):
//   1. one warp per row: the row's two means by warp_sum, then dinp. A warp past the last row
//      skips this phase as a whole.
//   2. the block's threads split the C channels (thread x owns x, x + block, ...) and each sums
//      the block's rows in row order for its channels, into registers, then writes the scratch.
//   Every float of the partials is added in one fixed order by one thread: no atomics, no
//   shared memory, so dweight/dbias come out bit-identical run to run (and so does dinp).
//
// layernorm_backward_sum_kernel(floatX* dweight, floatX* dbias, const float* scratch,
//                               int num_blocks, int C)
//   dweight (C) += sum over blk of scratch[blk, 1, :]; dbias (C) += sum over blk of scratch[blk, 0, :],
//   in block order 0, 1, ..., num_blocks-1, in float, rounded once to floatX (ACCUMULATES;
//   deterministic). num_blocks is the grid of the layernorm_backward_kernel launch that wrote scratch.
//   launch: grid = ceil_div(C, block), block = 256 (any size); one thread per channel.
//
// Assumes N*C < 2^31. warp_sum (every lane gets the sum over the warp) comes from common.cuh.

#include "common.cuh"

// The rest of a row's LayerNorm once its mean m is known (one warp, every lane calls it): the variance
// about m, rstd, mean and rstd stored by lane 0 (either pointer may be NULL), and o (C,) = the normalized
// row times weight plus bias, each rounded once to floatX. Shared by the two forward kernels below, so
// that the fused one gives layernorm_forward_kernel's bits.
__device__ void normalize_row(floatX* o, float* mean, float* rstd, const floatX* x, const floatX* weight,
                              const floatX* bias, float m, int row, int C, int lane) {
    float sq = 0.0f;
    for (int i = lane; i < C; i += 32) { float d = (float)x[i] - m; sq += d * d; }
    float s = rsqrtf(warp_sum(sq) / C + 1e-5f);

    if (lane == 0) {
        if (mean != nullptr) { mean[row] = m; }
        if (rstd != nullptr) { rstd[row] = s; }
    }
    for (int i = lane; i < C; i += 32) {
        o[i] = (floatX)(s * ((float)x[i] - m) * (float)weight[i] + (float)bias[i]);
    }
}

extern "C" __global__ void layernorm_forward_kernel(floatX* out, float* mean, float* rstd,
                                                    const floatX* inp, const floatX* weight,
                                                    const floatX* bias, int N, int C) {
    int lane = threadIdx.x % 32;
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;  // one warp per row
    if (row >= N) { return; }
    const floatX* x = inp + row * C;                           // (C,)

    float sum = 0.0f;
    for (int i = lane; i < C; i += 32) { sum += (float)x[i]; }
    float m = warp_sum(sum) / C;

    normalize_row(out + row * C, mean, rstd, x, weight, bias, m, row, C, lane);
}

extern "C" __global__ void layernorm_backward_kernel(floatX* dinp, float* scratch, const floatX* dout,
                                                     const floatX* inp, const floatX* weight,
                                                     const float* mean, const float* rstd,
                                                     int B, int T, int C) {
    int N = B * T;
    int rows_per_block = blockDim.x / 32;
    int first_row = blockIdx.x * rows_per_block;      // this block's rows: first_row .. first_row + rows_per_block
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;

    // 1. dinp, one warp per row
    int row = first_row + warp;
    if (row < N) {
        const floatX* dout_row = dout + row * C;
        const floatX* x = inp + row * C;
        floatX* dinp_row = dinp + row * C;
        float m = mean[row];
        float s = rstd[row];

        // the two means the gradient needs: mean(dnorm) and mean(dnorm * norm)
        float dnorm_mean = 0.0f;
        float dnorm_norm_mean = 0.0f;
        for (int i = lane; i < C; i += 32) {
            float norm = ((float)x[i] - m) * s;
            float dnorm = (float)weight[i] * (float)dout_row[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean = warp_sum(dnorm_mean) / C;
        dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;

        for (int i = lane; i < C; i += 32) {
            float norm = ((float)x[i] - m) * s;
            float dnorm = (float)weight[i] * (float)dout_row[i];
            dinp_row[i] = (floatX)((float)dinp_row[i] + (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s);
        }
    }

    // 2. this block's share of dbias and dweight, one thread per channel, rows in order
    int last_row = min(first_row + rows_per_block, N);
    float* dbias_part = scratch + (2 * blockIdx.x) * C;           // scratch[blk, 0, :]
    float* dweight_part = scratch + (2 * blockIdx.x + 1) * C;     // scratch[blk, 1, :]
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float dbias_sum = 0.0f;
        float dweight_sum = 0.0f;
        for (int r = first_row; r < last_row; r++) {
            float d = (float)dout[r * C + i];
            dbias_sum += d;                                       // out = ... + bias
            dweight_sum += ((float)inp[r * C + i] - mean[r]) * rstd[r] * d;  // out = norm * weight + ...
        }
        dbias_part[i] = dbias_sum;
        dweight_part[i] = dweight_sum;
    }
}

extern "C" __global__ void layernorm_backward_sum_kernel(floatX* dweight, floatX* dbias, const float* scratch,
                                                         int num_blocks, int C) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;    // channel
    if (i >= C) { return; }
    float dbias_sum = 0.0f;
    float dweight_sum = 0.0f;
    for (int blk = 0; blk < num_blocks; blk++) {      // block order: the same sum every run
        dbias_sum += scratch[(2 * blk) * C + i];
        dweight_sum += scratch[(2 * blk + 1) * C + i];
    }
    dbias[i] = (floatX)((float)dbias[i] + dbias_sum);
    dweight[i] = (floatX)((float)dweight[i] + dweight_sum);
}

extern "C" __global__ void fused_residual_layernorm_forward_kernel(floatX* residual, floatX* normed,
                                                                   float* mean, float* rstd,
                                                                   const floatX* inp1, const floatX* inp2,
                                                                   const floatX* weight, const floatX* bias,
                                                                   int N, int C) {
    int lane = threadIdx.x % 32;
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;  // one warp per row
    if (row >= N) { return; }
    const floatX* a = inp1 + row * C;
    const floatX* b = inp2 + row * C;
    floatX* x = residual + row * C;                            // (C,): written first, then normalized

    // residual_forward, and the mean of what it stored (the rounded values, as layernorm_forward reads)
    float sum = 0.0f;
    for (int i = lane; i < C; i += 32) {
        floatX r = (floatX)((float)a[i] + (float)b[i]);
        x[i] = r;
        sum += (float)r;
    }
    float m = warp_sum(sum) / C;

    // from here on, layernorm_forward_kernel's own code (each lane rereads its own elements)
    normalize_row(normed + row * C, mean, rstd, x, weight, bias, m, row, C, lane);
}
