// adamw.cu: the optimizer step and the gradient norm for clipping.
//
// Mirrors train_gpt2.py's gpt2_update and gpt2_calculate_grad_norm (llm.c train_gpt2_fp32.cu
// adamw_kernel2; llm.c's global_norm_squared kernels, made deterministic). floatX (common.cuh) is
// float, or bf16 when compiled with -DENABLE_BF16: params and grads are floatX; master_params, m, v,
// the norm's partials and all the arithmetic are float.
//
// adamw_kernel(floatX* params, float* master_params, const floatX* grads, float* m, float* v,
//              long long num_parameters, long long w_stride, long long s_stride, float learning_rate,
//              float beta1, float beta2, float beta1_correction, float beta2_correction, float eps,
//              float weight_decay, float grad_scale, unsigned int seed)
//   llm.c's adamw_kernel3: grid row y (blockIdx.y) updates num_parameters elements starting at
//   params + y * w_stride and grads + y * w_stride (one layer's slice of a tensor, or this rank's
//   ZeRO-1 piece of it) and at m, v, master_params + y * s_stride (the optimizer state, compact).
//   For each i < num_parameters of a row, with g = grad_scale * grads[i] and w the weight before the
//   step (master_params[i] when master_params is not NULL, else params[i] as a float):
//     m = beta1 m + (1-beta1) g;  v = beta2 v + (1-beta2) g^2          (stored back, fp32)
//     w' = w - learning_rate * (m/beta1_correction / (sqrt(v/beta2_correction) + eps) + weight_decay * w)
//     params[i] = w' stochastically rounded to floatX (llm.c's mainline; common.cuh's
//     stochastic_round with `seed`; in an fp32 build simply w'); master_params[i] = w' (if given).
//   beta1_correction = 1 - beta1^t, beta2_correction = 1 - beta2^t (computed on the host).
//   PyTorch decays only the 2-D weights: launch once per tensor (as llm.c, one seed per tensor) and
//   pass weight_decay = 0 for biases and LayerNorm parameters. grad_scale applies gradient clipping
//   and the 1/micro-steps average without rewriting grads (1.0 for none).
//   The rounding's random bits depend on (threadIdx.x, blockIdx.x, blockIdx.y) and seed, as llm.c's:
//   an element's draw is fixed by its place in its layer's slice and its layer, so a checkpoint's
//   master weights re-round to the same bf16 weights (init_from_master_kernel, same launch).
//   launch: grid = (ceil_div(num_parameters, block), rows), block = 512 (llm.c's: the draws need it).
//
// adamw_multi_tensor_kernel(floatX* params, float* master_params, const floatX* grads, float* m,
//                           float* v, const long long* table, int table_rows, const unsigned int* seeds,
//                           float learning_rate, float beta1, float beta2, float beta1_correction,
//                           float beta2_correction, float eps, float weight_decay, float grad_scale)
//   The whole update in ONE launch: every adamw_kernel launch of a step (one per tensor) laid end to
//   end on a 1-D grid, each element computed and rounded with exactly the arithmetic and the random
//   draw adamw_kernel gives it. table holds table_rows (a power of two) rows of ADAMW_FIELDS long longs,
//   row t for tensor t: [first block, blocks per layer row, elements per row (part), the first row's
//   offset into params / grads, the row stride there, the first row's offset into m / v / master_params,
//   decay (1: weight_decay applies, 0: it is 0 for this tensor), unused]; rows past the tensors have
//   first block = LLONG_MAX. seeds[t] is tensor t's seed of this update. Block b belongs to the last
//   tensor t whose first block <= b (a binary search of log2(table_rows) reads by thread 0); local block
//   k = b - first is layer k / blocks-per-row, block k % blocks-per-row of that row, and the draw uses
//   those two as adamw_kernel's blockIdx.y and blockIdx.x. Global reads per block beyond the elements':
//   (log2(table_rows) + 7) * 8 bytes of table and 4 of seed, all by thread 0.
//   launch: grid = the tensors' blocks in all (sum of blocks per row * rows), block = 512 (ADAMW_BLOCK).
//
// init_from_master_kernel(floatX* params, const float* master_params, long long num_parameters,
//                         long long w_stride, long long s_stride, unsigned int seed)
//   params[y * w_stride + i] = master_params[y * s_stride + i] rounded as adamw_kernel rounds it with the
//   same seed and launch (llm.c's init_from_master: the bf16 weights rebuilt from a checkpoint's master
//   weights and its generator's state before the last update). launch: as adamw_kernel's.
//
// global_norm_squared_kernel(float* out, const floatX* data, long long count)
//   out[blockIdx.x] = sum of data[i]^2 over the i this block visits (grid-stride loop), WRITTEN;
//   the host sums out[:grid] (and takes the sqrt). Deterministic for a given grid: no atomics.
//   launch: any grid G (e.g. min(ceil_div(count, block), 1024)), block = 512 (a multiple of 32,
//   <= 1024), out holds >= G floats, static shared memory 32 floats.
//
// block_sum comes from common.cuh.

#include "common.cuh"

__device__ float adamw_lerp(float start, float end, float weight) {
    return fmaf(weight, end, fmaf(-weight, start, start));  // weight*end + (1-weight)*start
}

extern "C" __global__ void adamw_kernel(floatX* params, float* master_params, const floatX* grads,
                                        float* m, float* v, long long num_parameters, long long w_stride,
                                        long long s_stride, float learning_rate, float beta1, float beta2,
                                        float beta1_correction, float beta2_correction, float eps,
                                        float weight_decay, float grad_scale, unsigned int seed) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= num_parameters) { return; }
    long long w = blockIdx.y * w_stride + i, s = blockIdx.y * s_stride + i;   // this row's element
    float grad = grad_scale * (float)grads[w];
    float mi = adamw_lerp(grad, m[s], beta1);          // first moment
    float vi = adamw_lerp(grad * grad, v[s], beta2);   // second moment
    m[s] = mi;
    v[s] = vi;
    float m_hat = mi / beta1_correction;
    float v_hat = vi / beta2_correction;
    // the weight before the step: the fp32 master copy when there is one, else the floatX parameter
    float old = (master_params != nullptr) ? master_params[s] : (float)params[w];
    float updated = old - learning_rate * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * old);
    stochastic_round(updated, &params[w], seed);       // bf16: rounded stochastically; fp32: stored
    if (master_params != nullptr) { master_params[s] = updated; }
}

// the bf16 rounding of adamw_kernel at an explicit block position (x = block in its row, y = layer):
// thread_noise's hash with blockIdx replaced, so the one-launch update draws what the per-tensor one does
__device__ void adamw_round_at(float value, float* out, unsigned int seed, unsigned int bx, unsigned int by) {
    *out = value;                                      // fp32: nothing to round
}

#ifdef ENABLE_BF16
__device__ void adamw_round_at(float value, __nv_bfloat16* out, unsigned int seed, unsigned int bx,
                               unsigned int by) {
    unsigned int position = threadIdx.x + 198491317u * (bx * blockDim.x + by);   // thread_noise's
    unsigned int threshold = noise_hash(position, seed) & 0xFFFFu;
    unsigned int bits = __float_as_uint(value);
    bits = ((bits & 0xFFFFu) > threshold) ? (bits | 0xFFFFu) : (bits & ~0xFFFFu);
    *out = __float2bfloat16_rn(__uint_as_float(bits));
}
#endif

#define ADAMW_FIELDS 8   // long longs per tensor row of adamw_multi_tensor_kernel's table

extern "C" __global__ void adamw_multi_tensor_kernel(floatX* params, float* master_params, const floatX* grads,
                                                     float* m, float* v, const long long* table, int table_rows,
                                                     const unsigned int* seeds, float learning_rate, float beta1,
                                                     float beta2, float beta1_correction, float beta2_correction,
                                                     float eps, float weight_decay, float grad_scale) {
    __shared__ long long row[ADAMW_FIELDS];            // this block's tensor's row; row[7] holds its seed
    if (threadIdx.x == 0) {
        // the last tensor starting at or before this block: a fixed number of reads (table_rows is a
        // power of two, padded with rows that start at LLONG_MAX)
        long long b = blockIdx.x;
        int t = 0;
        for (int half = table_rows / 2; half >= 1; half /= 2) {
            if (table[(t + half) * ADAMW_FIELDS] <= b) { t += half; }
        }
        for (int f = 0; f < 7; f++) { row[f] = table[t * ADAMW_FIELDS + f]; }
        row[7] = seeds[t];
    }
    __syncthreads();
    long long local = (long long)blockIdx.x - row[0];
    long long layer = local / row[1], bx = local % row[1];   // adamw_kernel's blockIdx.y and blockIdx.x
    long long i = bx * blockDim.x + threadIdx.x;
    if (i >= row[2]) { return; }
    long long w = row[3] + layer * row[4] + i, s = row[5] + layer * row[2] + i;
    float decay = row[6] ? weight_decay : 0.0f;
    // from here adamw_kernel's arithmetic, operation for operation
    float grad = grad_scale * (float)grads[w];
    float mi = adamw_lerp(grad, m[s], beta1);
    float vi = adamw_lerp(grad * grad, v[s], beta2);
    m[s] = mi;
    v[s] = vi;
    float m_hat = mi / beta1_correction;
    float v_hat = vi / beta2_correction;
    float old = (master_params != nullptr) ? master_params[s] : (float)params[w];
    float updated = old - learning_rate * (m_hat / (sqrtf(v_hat) + eps) + decay * old);
    adamw_round_at(updated, &params[w], (unsigned int)row[7], (unsigned int)bx, (unsigned int)layer);
    if (master_params != nullptr) { master_params[s] = updated; }
}

extern "C" __global__ void init_from_master_kernel(floatX* params, const float* master_params,
                                                   long long num_parameters, long long w_stride,
                                                   long long s_stride, unsigned int seed) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= num_parameters) { return; }
    stochastic_round(master_params[blockIdx.y * s_stride + i], &params[blockIdx.y * w_stride + i], seed);
}

extern "C" __global__ void global_norm_squared_kernel(float* out, const floatX* data, long long count) {
    __shared__ float shared[32];                        // one partial per warp
    float sum = 0.0f;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
        float x = (float)data[i];
        sum += x * x;
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) { out[blockIdx.x] = sum; }
}
