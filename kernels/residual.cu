// residual.cu: the residual connection, out = inp1 + inp2.
//
// Mirrors train_gpt2.py's residual_forward / residual_backward (llm.c train_gpt2_fp32.cu
// residual_forward_kernel; llm.c's CUDA trainer needs no residual backward kernel because its
// residual gradient buffer is shared, the kernel here is for a trainer that keeps them apart).
//
// residual_forward_kernel(float* out, const float* inp1, const float* inp2, int N)
//   out (N) = inp1 + inp2, written. out may alias inp1 or inp2 (so residual_forward_kernel(a, a, b, N)
//   is a += b).
// residual_backward_kernel(float* dinp1, float* dinp2, const float* dout, int N)
//   dinp1 += dout; dinp2 += dout (accumulates, like the NumPy layer).
// launch (both): grid = ceil_div(N, block), block = 256 (any size). Assumes N < 2^31.

extern "C" __global__ void residual_forward_kernel(float* out, const float* inp1, const float* inp2, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    out[i] = inp1[i] + inp2[i];
}

extern "C" __global__ void residual_backward_kernel(float* dinp1, float* dinp2, const float* dout, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    dinp1[i] += dout[i];
    dinp2[i] += dout[i];
}
