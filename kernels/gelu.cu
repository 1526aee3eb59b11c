// gelu.cu: GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
//
// Mirrors train_gpt2.py's gelu_forward / gelu_backward (llm.c train_gpt2_fp32.cu gelu_forward_kernel
// and gelu_backward_kernel; the packed twins are llm.c mainline's gelu kernels, x128 per thread).
// floatX (common.cuh) is float, or bf16 when compiled with -DENABLE_BF16: each element is read as
// floatX, computed in float, and rounded once to floatX when it is stored.
//
// gelu_forward_kernel(floatX* out, const floatX* inp, int N)
//   out (N) = gelu(inp), written.
// gelu_backward_kernel(floatX* dinp, const floatX* inp, const floatX* dout, int N)
//   dinp (N) = gelu'(inp) * dout, WRITTEN (not accumulated, unlike the NumPy layer), so that it
//   may run in place with dinp == dout as llm.c does with its scratch buffer.
// launch (both): one thread per element: grid = ceil_div(N, block), block = 256 (any size).
//
// gelu_forward_packed_kernel(floatX* out, const floatX* inp, int N)
// gelu_backward_packed_kernel(floatX* dinp, const floatX* inp, const floatX* dout, int N)
//   The same, one thread per x128 (common.cuh's Packed128<floatX>: 8 elements in bf16, 4 in fp32),
//   moved by 128-bit loads and stores; each element goes through the same float operations
//   (gelu_value, gelu_grad below), so the results are bit-identical to the per-element kernels.
//   In place (dinp == dout) is fine: a thread reads its pack whole before it writes it.
//   Requires N a multiple of x128::size and out, inp, dinp, dout 16-byte aligned (a misaligned
//   128-bit access is a "misaligned address" launch error); train_gpt2_cuda.py's launchers check
//   that and take the per-element kernels otherwise.
//   launch: grid = ceil_div(N, block * x128::size), block = 256 (any size).
//
// Assumes N < 2^31. No shared memory, no barriers: the emulator runs them as they are.

#include "common.cuh"

#define GELU_SCALING_FACTOR 0.7978845608028654f  // sqrt(2 / pi)

__device__ float gelu_value(float x) {
    float cube = 0.044715f * x * x * x;
    return 0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube)));
}

__device__ float gelu_grad(float x) {                 // d gelu(x) / dx
    float cube = 0.044715f * x * x * x;
    float tanh_arg = GELU_SCALING_FACTOR * (x + cube);
    float tanh_out = tanhf(tanh_arg);
    float cosh_out = coshf(tanh_arg);
    // 1/cosh^2, not 1 - tanh^2, which cancels in float32 as tanh nears +-1 (6x the error: tests/test_layers.py)
    float sech_out = 1.0f / (cosh_out * cosh_out);
    return 0.5f * (1.0f + tanh_out) + x * 0.5f * sech_out * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
}

extern "C" __global__ void gelu_forward_kernel(floatX* out, const floatX* inp, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    out[i] = (floatX)gelu_value((float)inp[i]);
}

extern "C" __global__ void gelu_backward_kernel(floatX* dinp, const floatX* inp, const floatX* dout, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    dinp[i] = (floatX)(gelu_grad((float)inp[i]) * (float)dout[i]);
}

extern "C" __global__ void gelu_forward_packed_kernel(floatX* out, const floatX* inp, int N) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * x128::size;   // this thread's first element
    if (i >= N) { return; }
    x128 x = load128cs(inp + i);                      // read once: stream it past L2
    x128 y;
    for (int k = 0; k < x128::size; k++) { y[k] = (floatX)gelu_value((float)x[k]); }
    store128(out + i, y);
}

extern "C" __global__ void gelu_backward_packed_kernel(floatX* dinp, const floatX* inp, const floatX* dout, int N) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= N) { return; }
    x128 x = load128cs(inp + i);
    x128 d = load128cs(dout + i);                     // both loaded before the store: dinp may be dout
    x128 g;
    for (int k = 0; k < x128::size; k++) { g[k] = (floatX)(gelu_grad((float)x[k]) * (float)d[k]); }
    store128(dinp + i, g);
}
