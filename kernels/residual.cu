// residual.cu: the residual connection, out = inp1 + inp2.
//
// Mirrors train_gpt2.py's residual_forward (llm.c train_gpt2_fp32.cu residual_forward_kernel; the
// packed twin is llm.c mainline's, x128 per thread). There is no backward kernel: as in llm.c,
// train_gpt2_cuda.py keeps one gradient buffer for the residual stream, which layernorm_backward
// adds into (+=), so the two branches meet there. floatX (common.cuh) is float, or bf16 when
// compiled with -DENABLE_BF16: the sum is taken in float and rounded once to floatX.
// (layernorm.cu's fused_residual_layernorm_forward_kernel does this sum and the LayerNorm that
// follows it in one pass; gpt2_forward uses it wherever a LayerNorm reads the new residual.)
//
// residual_forward_kernel(floatX* out, const floatX* inp1, const floatX* inp2, int N)
//   out (N) = inp1 + inp2, written. out may alias inp1 or inp2 (so residual_forward_kernel(a, a, b, N)
//   is a += b).
//   launch: one thread per element: grid = ceil_div(N, block), block = 256 (any size).
//
// residual_forward_packed_kernel(floatX* out, const floatX* inp1, const floatX* inp2, int N)
//   The same (aliasing too), one thread per x128 (8 elements in bf16, 4 in fp32) with 128-bit
//   loads and stores; bit-identical to residual_forward_kernel. Requires N a multiple of
//   x128::size and the three pointers 16-byte aligned (else a "misaligned address" launch error);
//   train_gpt2_cuda.py's launcher checks that and takes the per-element kernel otherwise.
//   launch: grid = ceil_div(N, block * x128::size), block = 256 (any size).
//
// Assumes N < 2^31.

#include "common.cuh"

extern "C" __global__ void residual_forward_kernel(floatX* out, const floatX* inp1, const floatX* inp2, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    out[i] = (floatX)((float)inp1[i] + (float)inp2[i]);
}

extern "C" __global__ void residual_forward_packed_kernel(floatX* out, const floatX* inp1, const floatX* inp2,
                                                          int N) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * x128::size;   // this thread's first element
    if (i >= N) { return; }
    x128 a = load128cs(inp1 + i);                     // both read before the store: out may alias them
    x128 b = load128cs(inp2 + i);
    x128 sum;
    for (int k = 0; k < x128::size; k++) { sum[k] = (floatX)((float)a[k] + (float)b[k]); }
    store128(out + i, sum);
}
