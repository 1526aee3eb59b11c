// gelu.cu: GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
//
// Mirrors train_gpt2.py's gelu_forward / gelu_backward (llm.c train_gpt2_fp32.cu gelu_forward_kernel
// and gelu_backward_kernel).
//
// gelu_forward_kernel(float* out, const float* inp, int N)
//   out (N) = gelu(inp), written.
// gelu_backward_kernel(float* dinp, const float* inp, const float* dout, int N)
//   dinp (N) = gelu'(inp) * dout, WRITTEN (not accumulated, unlike the NumPy layer), so that it
//   may run in place with dinp == dout as llm.c does with its scratch buffer.
// launch (both): grid = ceil_div(N, block), block = 256 (any size). Assumes N < 2^31.

#include "common.cuh"

#define GELU_SCALING_FACTOR 0.7978845608028654f  // sqrt(2 / pi)

extern "C" __global__ void gelu_forward_kernel(floatX* out, const floatX* inp, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    float x = (float)inp[i];
    float cube = 0.044715f * x * x * x;
    out[i] = (floatX)(0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube))));
}

extern "C" __global__ void gelu_backward_kernel(floatX* dinp, const floatX* inp, const floatX* dout, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    float x = (float)inp[i];
    float cube = 0.044715f * x * x * x;
    float tanh_arg = GELU_SCALING_FACTOR * (x + cube);
    float tanh_out = tanhf(tanh_arg);
    float cosh_out = coshf(tanh_arg);
    float sech_out = 1.0f / (cosh_out * cosh_out);
    float local_grad = 0.5f * (1.0f + tanh_out)
                     + x * 0.5f * sech_out * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
    dinp[i] = (floatX)(local_grad * (float)dout[i]);
}
