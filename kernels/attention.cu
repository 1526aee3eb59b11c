// attention.cu: the non-GEMM kernels of causal multi-head self-attention.
//
// llm.c's train_gpt2_fp32.cu attention_forward: permute qkv into q, k, v (B,NH,T,hs); preatt =
// q @ k^T (cuBLAS strided-batched GEMM, UNSCALED); att = softmax(scale * preatt) with the causal
// mask; vaccum = att @ v (GEMM); unpermute vaccum (B,NH,T,hs) -> out (B,T,C). The backward runs
// the same chain in reverse. The GEMMs are the host's; these kernels do the rest. Together they
// mirror train_gpt2.py's attention_forward / attention_backward, with one difference to keep in
// mind: here preatt/dpreatt are the UNSCALED q.k^T and its gradient (the scale 1/sqrt(hs) lives
// inside the softmax kernels), while the NumPy layer's preatt is already scaled.
// Shapes: C = NH*hs; qkv (B,T,3C) laid out as (B,T,3,NH,hs); q, k, v (B,NH,T,hs);
// att, preatt (B,NH,T,T). Everything here is written (=), not accumulated: in llm.c these are
// scratch buffers overwritten each step (the host adds the final dinp into the real gradient).
// floatX (common.cuh) is float, or bf16 when compiled with -DENABLE_BF16: every tensor here is
// floatX (the GEMMs are bf16 in and out with fp32 compute); the permutes copy elements as they are
// (no rounding), the softmax kernels compute in float and round once per element at the store.
//
// permute_kernel(floatX* q, floatX* k, floatX* v, const floatX* inp, int B, int T, int NH, int hs)
//   inp (B,T,3C) -> q, k, v (B,NH,T,hs).
//   launch: grid = ceil_div(B*NH*T*hs, block), block = 256 (any size).
// unpermute_kernel(floatX* out, const floatX* inp, int B, int T, int NH, int hs)
//   inp (B,NH,T,hs) -> out (B,T,C). launch as permute_kernel.
// softmax_forward_kernel(floatX* att, const floatX* preatt, float scale, int B, int NH, int T)
//   att[b,h,t,:] = softmax(scale * preatt[b,h,t,:t+1]) and 0 for t2 > t (the causal mask).
//   One warp per row, online softmax (running max and rescaled sum in one read, as llm.c's
//   softmax_forward_kernel5, minus its float4 loads, so T need not be a multiple of 4; and unlike
//   it, the masked entries are written as 0 rather than left as they were, because the att @ v
//   GEMM reads the whole row). launch: block = 256 (a multiple of 32),
//   grid = ceil_div(B*NH*T*32, block), no shared memory.
// softmax_autoregressive_backward_kernel(floatX* dpreatt, const floatX* datt, const floatX* att,
//                                        float scale, int B, int NH, int T)
//   dpreatt[t2] = scale * att[t2] * (datt[t2] - sum_{t3<=t} att[t3]*datt[t3]) for t2 <= t, 0 above
//   the diagonal. One warp per row; launch as softmax_forward_kernel.
// permute_backward_kernel(floatX* dinp, const floatX* dq, const floatX* dk, const floatX* dv,
//                         int B, int T, int NH, int hs)
//   dq, dk, dv (B,NH,T,hs) -> dinp (B,T,3C). launch as permute_kernel.
// unpermute_backward_kernel(floatX* dinp, const floatX* dout, int B, int T, int NH, int hs)
//   dout (B,T,C) -> dinp (B,NH,T,hs). launch as permute_kernel.
//
// Assumes B*NH*T*T < 2^31. warp_sum, warp_max and FLOAT_LOWEST come from common.cuh.

#include "common.cuh"

// The element at flat index idx of a (B,NH,T,hs) tensor is [b, nh, t, d]; return the flat index
// of [b, t, 0, nh, d] in a tensor laid out (B,T,groups,NH,hs): groups = 3 for qkv (B,T,3C), where
// k and v follow q at +C and +2C, and groups = 1 for the attention output (B,T,C).
__device__ int btnh_index(int idx, int T, int NH, int hs, int groups) {
    int d = idx % hs;
    int t = (idx / hs) % T;
    int nh = (idx / (hs * T)) % NH;
    int b = idx / (hs * T * NH);
    return ((b * T + t) * groups * NH + nh) * hs + d;
}

extern "C" __global__ void permute_kernel(floatX* q, floatX* k, floatX* v, const floatX* inp,
                                          int B, int T, int NH, int hs) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // flat index into q (B,NH,T,hs)
    if (idx >= B * NH * T * hs) { return; }
    int C = NH * hs;
    int q_idx = btnh_index(idx, T, NH, hs, 3);        // inp[b, t, 0, nh, d]
    q[idx] = inp[q_idx];
    k[idx] = inp[q_idx + C];                           // inp[b, t, 1, nh, d]
    v[idx] = inp[q_idx + 2 * C];                       // inp[b, t, 2, nh, d]
}

extern "C" __global__ void unpermute_kernel(floatX* out, const floatX* inp, int B, int T, int NH, int hs) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // flat index into inp (B,NH,T,hs)
    if (idx >= B * NH * T * hs) { return; }
    out[btnh_index(idx, T, NH, hs, 1)] = inp[idx];    // out[b, t, nh, d]
}

extern "C" __global__ void softmax_forward_kernel(floatX* att, const floatX* preatt, float scale,
                                                  int B, int NH, int T) {
    int lane = threadIdx.x % 32;
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;  // (b, h, t) flattened
    if (row >= B * NH * T) { return; }                 // a whole warp leaves together
    int t = row % T;
    const floatX* x = preatt + row * T;
    floatX* y = att + row * T;

    // one pass: each lane keeps the max of its scaled values and the sum of exp(value - max)
    float maxval = FLOAT_LOWEST;
    float sumval = 0.0f;
    for (int i = lane; i <= t; i += 32) {
        float xi = scale * (float)x[i];
        float newmax = fmaxf(maxval, xi);
        sumval = sumval * expf(maxval - newmax) + expf(xi - newmax);
        maxval = newmax;
    }
    float gmax = warp_max(maxval);
    sumval *= expf(maxval - gmax);                     // rescale each lane's sum to the row max
    float norm = 1.0f / warp_sum(sumval);

    for (int i = lane; i < T; i += 32) {
        y[i] = (floatX)((i <= t) ? expf(scale * (float)x[i] - gmax) * norm : 0.0f);
    }
}

extern "C" __global__ void softmax_autoregressive_backward_kernel(floatX* dpreatt, const floatX* datt,
                                                                  const floatX* att, float scale,
                                                                  int B, int NH, int T) {
    int lane = threadIdx.x % 32;
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (row >= B * NH * T) { return; }
    int t = row % T;
    const floatX* a = att + row * T;
    const floatX* da = datt + row * T;
    floatX* dp = dpreatt + row * T;

    float local = 0.0f;                                // sum_t3 att[t3] * datt[t3]
    for (int i = lane; i <= t; i += 32) { local += (float)a[i] * (float)da[i]; }
    local = warp_sum(local);

    for (int i = lane; i < T; i += 32) {
        dp[i] = (floatX)((i <= t) ? scale * (float)a[i] * ((float)da[i] - local) : 0.0f);
    }
}

extern "C" __global__ void permute_backward_kernel(floatX* dinp, const floatX* dq, const floatX* dk,
                                                   const floatX* dv, int B, int T, int NH, int hs) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // flat index into dq (B,NH,T,hs)
    if (idx >= B * NH * T * hs) { return; }
    int C = NH * hs;
    int q_idx = btnh_index(idx, T, NH, hs, 3);        // dinp[b, t, 0, nh, d]
    dinp[q_idx] = dq[idx];
    dinp[q_idx + C] = dk[idx];
    dinp[q_idx + 2 * C] = dv[idx];
}

extern "C" __global__ void unpermute_backward_kernel(floatX* dinp, const floatX* dout,
                                                     int B, int T, int NH, int hs) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // flat index into dinp (B,NH,T,hs)
    if (idx >= B * NH * T * hs) { return; }
    dinp[idx] = dout[btnh_index(idx, T, NH, hs, 1)];  // dout[b, t, nh, d]
}
