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
