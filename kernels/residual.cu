// residual.cu: the residual connection, out = inp1 + inp2.
//
// Mirrors train_gpt2.py's residual_forward (llm.c train_gpt2_fp32.cu residual_forward_kernel).
// There is no backward kernel: as in llm.c, train_gpt2_cuda.py keeps one gradient buffer for the
// residual stream, which layernorm_backward adds into (+=), so the two branches meet there.
//
// residual_forward_kernel(float* out, const float* inp1, const float* inp2, int N)
//   out (N) = inp1 + inp2, written. out may alias inp1 or inp2 (so residual_forward_kernel(a, a, b, N)
//   is a += b).
// launch: grid = ceil_div(N, block), block = 256 (any size). Assumes N < 2^31.

#include "common.cuh"

extern "C" __global__ void residual_forward_kernel(floatX* out, const floatX* inp1, const floatX* inp2, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    out[i] = (floatX)((float)inp1[i] + (float)inp2[i]);
}
