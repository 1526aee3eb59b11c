// layernorm.cu: LayerNorm over the last axis (C), eps = 1e-5, biased variance.
//
// Mirrors train_gpt2.py's layernorm_forward / layernorm_backward (llm.c train_gpt2_fp32.cu:
// layernorm_forward_kernel3, and layernorm_backward_kernel2's warp per row for dinp; warp
// reductions written with __shfl_xor_sync instead of cooperative groups). Unlike that kernel the
// backward has no atomics: per-block partial sums of dweight/dbias go to a scratch buffer and a
// second kernel adds them in a fixed order, so the whole backward is deterministic (as llm.c's
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
//   The plain version, the launcher's fallback when C is not a multiple of 4 (or scratch is not
//   16-byte aligned). launch: grid = ceil_div(C, block), block = 256 (any size); one thread per channel.
//   At d12 that is 3 blocks of 256 threads, each thread adding 1024 partials one after the other:
//   latency-bound, ~60-160 us per launch on an H100 (~1.5-4 ms over 25 launches a step).
//
// layernorm_backward_sum_split_kernel(floatX* dweight, floatX* dbias, const float* scratch,
//                                     int num_blocks, int C)
//   The same sums, GPU-filling: the rows of the partials split across the threads of a block, and
//   the columns across blocks. scratch (num_blocks, 2, C) is seen as rows of 2C floats, cut into
//   packs of 4 (f128: one 128-bit load); block p owns pack p, the columns [4p, 4p + 4) of every row
//   (dbias's when 4p < C, else dweight's 4p - C ...). Thread t adds the rows t, t + block, ... in
//   order, four independent 128-bit loads in flight (issued before their adds, so the sum is the
//   plain loop's over those rows), into 4 floats; each warp adds its 32 lanes' sums with warp_sum
//   (the xor butterfly, offsets 16, 8, 4, 2, 1), and thread k < 4 adds the warps' sums of column
//   4p + k in warp order, then into dweight/dbias, rounded once to floatX (ACCUMULATES).
//   Requires C a multiple of 4 (so no pack straddles dbias and dweight, and every row starts on a
//   16-byte boundary) and scratch 16-byte aligned. No atomics: every float is added in an order fixed
//   by the launch shape, the same bits every run; not the plain kernel's order (one running sum
//   over the blocks), so the two agree to fp32 rounding (tests/test_layernorm_sum.py states how far).
//   launch: grid = C/2 (one block per pack: 2C/4), block = 128 (a multiple of 32, <= 1024), static
//   shared memory 32*4 floats (one row of 4 per warp).
//   At d12 B=16 T=1024 C=768: layernorm_backward_kernel's grid is 1024 blocks, so scratch is (1024,
//   2, 768) floats, 6.3 MB; this kernel runs 384 blocks of 128 threads (~3 per SM of an H100's 132),
//   each thread 8 rows, two rounds of 4 x 16 bytes in flight (3.1 MB in flight over the GPU).
//   Modeled: 6.3 MB / 3.35 TB/s = 1.9 us per launch (and the scratch was just written: it sits in
//   the 50 MB L2), ~47 us for the step's 25 launches, against ~1.5-4 ms for the plain kernel.
//
// layernorm_backward_kernel's own grid at d12: ceil_div(32 * 16384, 512) = 1024 blocks of 512 threads,
// ~7.8 per SM, 4 resident per SM at 2048 threads: about two full waves, so it fills the GPU.
//
// layernorm_forward_x128_kernel(floatX* out, float* mean, float* rstd, const floatX* inp,
//                               const floatX* weight, const floatX* bias, int N, int C)
// fused_residual_layernorm_forward_x128_kernel(floatX* residual, floatX* normed, float* mean, float* rstd,
//                                              const floatX* inp1, const floatX* inp2, const floatX* weight,
//                                              const floatX* bias, int N, int C)
// layernorm_backward_x128_kernel(floatX* dinp, float* scratch, const floatX* dout, const floatX* inp,
//                                const floatX* weight, const float* mean, const float* rstd,
//                                int B, int T, int C, int dinp_sums)
//   (the launch shapes of their plain twins above; the backward has one parameter more, dinp_sums, below):
//   the same computations with
//   128-bit loads and stores. Lane k of a row's warp owns the packs of P = x128::size elements (8 bf16, 4
//   floats) at k*P, k*P + 32P, ... instead of the elements k, k + 32, ..., and issues two packs' loads
//   before it uses them (visit_lane_packs; the sums still run over the packs in increasing order). At d12
//   (C = 768, bf16) that is 3 packs a lane: the row's 1.5 KB in two rounds of 16-byte loads instead of 24
//   dependent 2-byte ones. Requires C a multiple of P and every array 16-byte aligned; the launchers
//   (train_gpt2_cuda.py: packable) take the plain kernels otherwise. A lane's share of each row sum changes,
//   so mean, rstd, out (and the backward's dinp) are not the plain kernels' bits, only within fp32
//   rounding of them (tests/test_layernorm_x128.py states how far); the fused x128 kernel gives exactly the
//   bits of residual_forward_packed_kernel + layernorm_forward_x128_kernel, as the plain pair does.
//   layernorm_backward_x128_kernel's second phase (the per-block partials) is the plain kernel's sum per
//   channel, the block's rows in order, with thread j owning the channels [jP, jP + P): the same scratch
//   bits, so dweight and dbias are unchanged.
//   Loads that may see this kernel's own stores (the fused residual, dinp's +=) go through the
//   coherent path (load128_coherent), not load128's read-only __ldg.
//   layernorm_backward_x128_kernel takes one more parameter, int dinp_sums: 1 makes scratch (gridDim.x, 3, C)
//   instead of (gridDim.x, 2, C), its third row per block the column sums of the block's dinp rows AS STORED
//   after the += (after a __syncthreads: phase 1's warps wrote them), the rows in order, two in flight. In
//   the trainer dinp is the residual stream's gradient, and those sums are the bias gradient of the linear
//   layer whose output joined the stream there (attproj after ln2, the previous layer's fcproj after ln1,
//   the last fcproj after lnf): its matmul_backward_bias launch and its read of dresidual are saved.
//
// layernorm_backward_sum3_split_kernel(floatX* dweight, floatX* dbias, floatX* dlinear_bias, const float* scratch,
//                                      int num_blocks, int C)
//   layernorm_backward_sum_split_kernel for the (num_blocks, 3, C) scratch of dinp_sums = 1: the same sum
//   per column (so dweight and dbias get the 2-row kernel's bits from the same partials), the third row's
//   into dlinear_bias (ACCUMULATES, rounded once). That sum adds the same floatX values matmul_backward_bias
//   would, in another fixed order: 16 rows per block, then this kernel's order (tests/test_layernorm_x128.py
//   states how far apart). launch: grid = 3C/4, block = 128, static shared memory 32*4 floats; C a multiple
//   of 4 and scratch 16-byte aligned. At d12: 576 blocks, 9.4 MB of partials.
//
// layernorm_backward_onepass_kernel(floatX* dinp, floatX* dweight, floatX* dbias, floatX* dlinear_bias,
//                                   float* scratch, unsigned int* counters, const floatX* dout, const floatX* inp,
//                                   const floatX* weight, const float* mean, const float* rstd, int B, int T, int C)
//   The trainer's LayerNorm backward, ONE launch: layernorm_backward_x128_kernel's rows (dinp_sums = 1 when
//   dlinear_bias is not NULL), its partials stored as atomics, then the sums in the same launch. Each block
//   takes a ticket from counters[group] (group = blockIdx.x / 32, GROUP blocks a group); the last block of a
//   group adds the group's partial rows in block order (a thread per column, 8 reads in flight) into the
//   group's row of scratch, resets its counter and takes a ticket from counters[groups]; the last group adds
//   the group rows in group order into dbias, dweight (and dlinear_bias), rounded once (ACCUMULATES), and
//   resets that counter. The partials and group rows cross blocks as atomics (atomicExch stores, atomicAdd(0)
//   reads: the same bits, at L2; two atomics never race, which is how the emulator's race checker, ordering
//   no blocks, sees them too); no float is added atomically: the order is fixed by the grid, so the bits are
//   too (not the split kernels': tests/test_layernorm_x128.py holds them to a NumPy model of this order).
//   scratch: (gridDim.x + groups) rows of (2 + dinp_sums) * C floats; counters: groups + 1 unsigned ints, all 0
//   at the launch, all 0 after it (train_gpt2_cuda.py keeps them at the end of the zero-allocated scratch).
//   launch: as layernorm_backward_kernel (block = 512; grid = ceil_div(32*B*T, block)); C a multiple of P,
//   dinp, dout, inp, weight 16-byte aligned. 64 registers (2 blocks of 512 per SM, as the x128 kernel's 48).
//   At d12: 1024 blocks in 32 groups; each group's last block reads 32 x 2304 floats (144 per thread, 18
//   rounds of 8 atomic reads), the last group's the same again: ~10-20 us of L2 latency after the other
//   blocks, in place of the second launch (the split sum, ~3 us plus a launch). No GPU has timed it yet.
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

// The sum of the split kernels below for the 4 columns [col, col + 4) of scratch, seen as num_blocks rows of
// `stride` floats: thread t adds rows t, t + block, ... (four 128-bit loads in flight), each warp its lanes by
// warp_sum, then the warps in order. Returns column col + threadIdx.x's total in threads 0..3 (others: 0).
__device__ float split_column_sum(const float* scratch, int num_blocks, long long stride, int col, float* warp_sums) {
    constexpr int P = f128::size;                       // 4 floats per 128-bit load
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int warps = blockDim.x / 32;
    const float* x = scratch + col;
    float sum[P] = {0.0f, 0.0f, 0.0f, 0.0f};
    int row = threadIdx.x;
    int step = blockDim.x;
    for (; row + 3 * step < num_blocks; row += 4 * step) {   // four independent 128-bit loads in flight
        f128 a = load128cs(x + row * stride);
        f128 b = load128cs(x + (row + step) * stride);
        f128 c = load128cs(x + (row + 2 * step) * stride);
        f128 d = load128cs(x + (row + 3 * step) * stride);
        for (int k = 0; k < P; k++) { sum[k] += a[k]; sum[k] += b[k]; sum[k] += c[k]; sum[k] += d[k]; }
    }
    for (; row < num_blocks; row += step) {
        f128 a = load128cs(x + row * stride);
        for (int k = 0; k < P; k++) { sum[k] += a[k]; }
    }
    for (int k = 0; k < P; k++) {
        float w = warp_sum(sum[k]);                     // every lane takes part: the butterfly's fixed order
        if (lane == 0) { warp_sums[warp * P + k] = w; }
    }
    __syncthreads();
    float total = 0.0f;
    if (threadIdx.x < P) {
        for (int w = 0; w < warps; w++) { total += warp_sums[w * P + threadIdx.x]; }   // warps in order
    }
    return total;
}

extern "C" __global__ void layernorm_backward_sum_split_kernel(floatX* dweight, floatX* dbias, const float* scratch,
                                                               int num_blocks, int C) {
    __shared__ float warp_sums[32 * 4];                 // (warps, 4): each warp's sums of the block's 4 columns
    int col = blockIdx.x * 4;                           // this block's pack: columns col .. col+3 of a 2C row
    float total = split_column_sum(scratch, num_blocks, 2LL * C, col, warp_sums);
    if (threadIdx.x < 4) {
        int i = col + threadIdx.x;                      // column of the (2, C) row: dbias first, then dweight
        floatX* out = (i < C) ? dbias + i : dweight + (i - C);
        *out = (floatX)((float)*out + total);
    }
}

extern "C" __global__ void layernorm_backward_sum3_split_kernel(floatX* dweight, floatX* dbias, floatX* dlinear_bias,
                                                                const float* scratch, int num_blocks, int C) {
    __shared__ float warp_sums[32 * 4];
    int col = blockIdx.x * 4;                           // columns col .. col+3 of a 3C row
    float total = split_column_sum(scratch, num_blocks, 3LL * C, col, warp_sums);
    if (threadIdx.x < 4) {
        int i = col + threadIdx.x;                      // dbias, dweight, then the linear layer's dbias
        floatX* out = (i < C) ? dbias + i : (i < 2 * C) ? dweight + (i - C) : dlinear_bias + (i - 2 * C);
        *out = (floatX)((float)*out + total);
    }
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

// ---- the x128 twins (the launchers' choice where C is a multiple of x128::size and the rows are 16-byte
// aligned). A lane owns the packs lane*P, lane*P + 32P, ... of a row (P = x128::size) instead of the
// elements lane, lane + 32, ...: each load moves 16 bytes, and two are issued before either is used.

constexpr int X128 = x128::size;

// A 128-bit load through the ordinary (coherent) path: it sees what this kernel stored before it (the fused
// kernel's residual, the backward's dinp), which the read-only path of load128 (__ldg) need not.
__device__ x128 load128_coherent(const floatX* address) {
    x128 out;
    *reinterpret_cast<int4*>(&out) = *reinterpret_cast<const int4*>(address);
    return out;
}

// Visits the packs `lane` owns in a row of C in increasing order, visit(offset, pack), two loads in flight:
// the loads of two packs are issued, then both are visited, so the visits (and any sum in them) happen in
// the order of a plain loop over the packs.
template <class Visit>
__device__ void visit_lane_packs(const floatX* row, int C, int lane, Visit visit) {
    int i = lane * X128;
    for (; i + 32 * X128 < C; i += 64 * X128) {
        x128 a = load128_coherent(row + i);
        x128 b = load128_coherent(row + i + 32 * X128);
        visit(i, a);
        visit(i + 32 * X128, b);
    }
    if (i < C) { visit(i, load128_coherent(row + i)); }
}

// normalize_row's x128 twin: the variance and the output from x128 packs; lane 0 stores mean and rstd.
__device__ void normalize_row_x128(floatX* o, float* mean, float* rstd, const floatX* x, const floatX* weight,
                                   const floatX* bias, float m, int row, int C, int lane) {
    float sq = 0.0f;
    visit_lane_packs(x, C, lane, [&](int, const x128& v) {
        for (int k = 0; k < X128; k++) { float d = (float)v[k] - m; sq += d * d; }
    });
    float s = rsqrtf(warp_sum(sq) / C + 1e-5f);

    if (lane == 0) {
        if (mean != nullptr) { mean[row] = m; }
        if (rstd != nullptr) { rstd[row] = s; }
    }
    visit_lane_packs(x, C, lane, [&](int i, const x128& v) {
        x128 w = load128(weight + i);                  // weight and bias: read by every row, kept in cache
        x128 b = load128(bias + i);
        x128 r;
        for (int k = 0; k < X128; k++) { r[k] = (floatX)(s * ((float)v[k] - m) * (float)w[k] + (float)b[k]); }
        store128(o + i, r);
    });
}

extern "C" __global__ void layernorm_forward_x128_kernel(floatX* out, float* mean, float* rstd,
                                                         const floatX* inp, const floatX* weight,
                                                         const floatX* bias, int N, int C) {
    int lane = threadIdx.x % 32;
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;  // one warp per row
    if (row >= N) { return; }
    const floatX* x = inp + row * C;

    float sum = 0.0f;
    visit_lane_packs(x, C, lane, [&](int, const x128& v) {
        for (int k = 0; k < X128; k++) { sum += (float)v[k]; }
    });
    float m = warp_sum(sum) / C;

    normalize_row_x128(out + row * C, mean, rstd, x, weight, bias, m, row, C, lane);
}

extern "C" __global__ void fused_residual_layernorm_forward_x128_kernel(floatX* residual, floatX* normed,
                                                                        float* mean, float* rstd,
                                                                        const floatX* inp1, const floatX* inp2,
                                                                        const floatX* weight, const floatX* bias,
                                                                        int N, int C) {
    int lane = threadIdx.x % 32;
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;  // one warp per row
    if (row >= N) { return; }
    const floatX* a = inp1 + row * C;
    const floatX* b = inp2 + row * C;
    floatX* x = residual + row * C;

    // residual_forward a pack at a time, and the mean of the rounded values it stores; the lane's packs in
    // order with two pairs of loads in flight (residual may alias inp1 or inp2: each pack is read, then
    // written, by the same lane)
    float sum = 0.0f;
    auto add = [&](int i, const x128& u, const x128& v) {
        x128 r;
        for (int k = 0; k < X128; k++) { r[k] = (floatX)((float)u[k] + (float)v[k]); sum += (float)r[k]; }
        store128(x + i, r);
    };
    int i = lane * X128;
    for (; i + 32 * X128 < C; i += 64 * X128) {
        x128 u0 = load128_coherent(a + i), v0 = load128_coherent(b + i);
        x128 u1 = load128_coherent(a + i + 32 * X128), v1 = load128_coherent(b + i + 32 * X128);
        add(i, u0, v0);
        add(i + 32 * X128, u1, v1);
    }
    if (i < C) { add(i, load128_coherent(a + i), load128_coherent(b + i)); }
    float m = warp_sum(sum) / C;

    // layernorm_forward_x128_kernel's own code from here (each lane rereads the packs it stored)
    normalize_row_x128(normed + row * C, mean, rstd, x, weight, bias, m, row, C, lane);
}

// A float of this launch's partials: stored plainly, or (the one-launch kernel, whose last blocks read other
// blocks' partials) as an atomic exchange of its bits, read back by an atomic that returns them unchanged.
__device__ void put_partial(float* address, float value, bool atomic) {
    if (atomic) {
        atomicExch(reinterpret_cast<int*>(address), __float_as_int(value));
    } else {
        *address = value;
    }
}

__device__ float get_partial(float* address) {
    return __uint_as_float(atomicAdd(reinterpret_cast<unsigned int*>(address), 0u));
}

// layernorm_backward_x128_kernel's body (see there); atomic_partials: its partials stored with put_partial's atomic.
__device__ void layernorm_backward_x128_rows(floatX* dinp, float* scratch, const floatX* dout, const floatX* inp,
                                             const floatX* weight, const float* mean, const float* rstd,
                                             int B, int T, int C, int dinp_sums, bool atomic_partials) {
    int N = B * T;
    int rows_per_block = blockDim.x / 32;
    int first_row = blockIdx.x * rows_per_block;
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;

    // 1. dinp, one warp per row, the lane's packs (x, weight, dout: three loads per pack)
    int row = first_row + warp;
    if (row < N) {
        const floatX* dout_row = dout + row * C;
        const floatX* x = inp + row * C;
        floatX* dinp_row = dinp + row * C;
        float m = mean[row];
        float s = rstd[row];

        float dnorm_mean = 0.0f;
        float dnorm_norm_mean = 0.0f;
        visit_lane_packs(x, C, lane, [&](int i, const x128& v) {
            x128 w = load128(weight + i);
            x128 g = load128(dout_row + i);
            for (int k = 0; k < X128; k++) {
                float norm = ((float)v[k] - m) * s;
                float dnorm = (float)w[k] * (float)g[k];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
        });
        dnorm_mean = warp_sum(dnorm_mean) / C;
        dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;

        visit_lane_packs(x, C, lane, [&](int i, const x128& v) {
            x128 w = load128(weight + i);
            x128 g = load128(dout_row + i);
            x128 d = load128_coherent(dinp_row + i);      // += : read, then written by this lane
            for (int k = 0; k < X128; k++) {
                float norm = ((float)v[k] - m) * s;
                float dnorm = (float)w[k] * (float)g[k];
                d[k] = (floatX)((float)d[k] + (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s);
            }
            store128(dinp_row + i, d);
        });
    }

    // 2. this block's share of dbias and dweight: thread j owns the pack of channels [jP, jP + P) and adds
    // the block's rows in order, as the plain kernel does per channel (the same bits), two rows' loads in flight;
    // with dinp_sums, also the column sums of the dinp rows phase 1 stored (the barrier: other warps wrote them)
    int last_row = min(first_row + rows_per_block, N);
    int parts = dinp_sums ? 3 : 2;                          // scratch rows per block
    float* dbias_part = scratch + (parts * blockIdx.x) * C;
    float* dweight_part = scratch + (parts * blockIdx.x + 1) * C;
    if (dinp_sums) {
        __syncthreads();                                    // (every thread gets here: phase 1 has no return)
        float* dinp_part = scratch + (parts * blockIdx.x + 2) * C;
        for (int i = threadIdx.x * X128; i < C; i += blockDim.x * X128) {
            float total[X128];
            for (int k = 0; k < X128; k++) { total[k] = 0.0f; }
            int r = first_row;
            for (; r + 1 < last_row; r += 2) {
                x128 d0 = load128_coherent(dinp + r * C + i), d1 = load128_coherent(dinp + (r + 1) * C + i);
                for (int k = 0; k < X128; k++) { total[k] += (float)d0[k]; total[k] += (float)d1[k]; }
            }
            if (r < last_row) {
                x128 d0 = load128_coherent(dinp + r * C + i);
                for (int k = 0; k < X128; k++) { total[k] += (float)d0[k]; }
            }
            for (int k = 0; k < X128; k++) { put_partial(dinp_part + i + k, total[k], atomic_partials); }
        }
    }
    for (int i = threadIdx.x * X128; i < C; i += blockDim.x * X128) {
        float dbias_sum[X128];
        float dweight_sum[X128];
        for (int k = 0; k < X128; k++) { dbias_sum[k] = 0.0f; dweight_sum[k] = 0.0f; }
        auto add = [&](int r, const x128& g, const x128& v) {
            float m = mean[r];                            // once per row and pack, not per channel
            float s = rstd[r];
            for (int k = 0; k < X128; k++) {
                float d = (float)g[k];
                dbias_sum[k] += d;
                dweight_sum[k] += ((float)v[k] - m) * s * d;
            }
        };
        int r = first_row;
        for (; r + 1 < last_row; r += 2) {
            x128 g0 = load128(dout + r * C + i), v0 = load128(inp + r * C + i);
            x128 g1 = load128(dout + (r + 1) * C + i), v1 = load128(inp + (r + 1) * C + i);
            add(r, g0, v0);
            add(r + 1, g1, v1);
        }
        if (r < last_row) { add(r, load128(dout + r * C + i), load128(inp + r * C + i)); }
        for (int k = 0; k < X128; k++) {
            put_partial(dbias_part + i + k, dbias_sum[k], atomic_partials);
            put_partial(dweight_part + i + k, dweight_sum[k], atomic_partials);
        }
    }
}

extern "C" __global__ void layernorm_backward_x128_kernel(floatX* dinp, float* scratch, const floatX* dout,
                                                          const floatX* inp, const floatX* weight,
                                                          const float* mean, const float* rstd,
                                                          int B, int T, int C, int dinp_sums) {
    layernorm_backward_x128_rows(dinp, scratch, dout, inp, weight, mean, rstd, B, T, C, dinp_sums, false);
}

// The sum over `rows` rows of `width` floats from `from` (row stride `width`), column by column (a thread per
// column, the rows in order, 8 reads in flight), each column's total handed to out(column, total).
template <class Out>
__device__ void sum_rows_in_order(float* from, int rows, int width, Out out) {
    constexpr int AHEAD = 8;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float total = 0.0f;
        for (int r = 0; r < rows; r += AHEAD) {
            float v[AHEAD];
            for (int j = 0; j < AHEAD; j++) {
                if (r + j < rows) { v[j] = get_partial(from + (long long)(r + j) * width + c); }
            }
            for (int j = 0; j < AHEAD; j++) {
                if (r + j < rows) { total += v[j]; }
            }
        }
        out(c, total);
    }
}

extern "C" __global__ void layernorm_backward_onepass_kernel(floatX* dinp, floatX* dweight, floatX* dbias,
                                                             floatX* dlinear_bias, float* scratch,
                                                             unsigned int* counters, const floatX* dout,
                                                             const floatX* inp, const floatX* weight,
                                                             const float* mean, const float* rstd,
                                                             int B, int T, int C) {
    __shared__ unsigned int ticket;
    constexpr int GROUP = 32;                             // blocks per group: the first level of the sum
    int dinp_sums = dlinear_bias != nullptr;
    int width = (2 + dinp_sums) * C;                      // floats per row of partials
    int groups = (gridDim.x + GROUP - 1) / GROUP;
    int group = blockIdx.x / GROUP;
    int first = group * GROUP;
    int members = min(GROUP, (int)gridDim.x - first);
    float* group_rows = scratch + (long long)gridDim.x * width;    // (groups, width) after the blocks' rows
    layernorm_backward_x128_rows(dinp, scratch, dout, inp, weight, mean, rstd, B, T, C, dinp_sums, true);

    // the last block of each group adds its group's rows, in block order, into the group's row
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) { ticket = atomicAdd(&counters[group], 1u); }
    __syncthreads();
    if (ticket != (unsigned int)(members - 1)) { return; }
    __threadfence();
    sum_rows_in_order(scratch + (long long)first * width, members, width, [&](int c, float total) {
        put_partial(group_rows + (long long)group * width + c, total, true);
    });

    // the last group to finish adds the group rows, in group order, into dbias, dweight (and dlinear_bias)
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        atomicExch(reinterpret_cast<int*>(counters + group), 0);      // ready for the next launch
        ticket = atomicAdd(&counters[groups], 1u);
    }
    __syncthreads();
    if (ticket != (unsigned int)(groups - 1)) { return; }
    __threadfence();
    sum_rows_in_order(group_rows, groups, width, [&](int c, float total) {
        floatX* out = (c < C) ? dbias + c : (c < 2 * C) ? dweight + (c - C) : dlinear_bias + (c - 2 * C);
        *out = (floatX)((float)*out + total);
    });
    if (threadIdx.x == 0) { atomicExch(reinterpret_cast<int*>(counters + groups), 0); }
}
