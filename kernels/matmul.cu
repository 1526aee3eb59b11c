// matmul.cu: the non-GEMM parts of the linear layer.
//
// The GEMMs themselves (out = inp @ weight^T; dinp = dout @ weight; dweight += dout^T @ inp)
// are cuBLAS calls made by the host (train_gpt2_cuda.py's gemm: sgemm in fp32; in bf16
// cublasGemmStridedBatchedEx with bf16 in and out and fp32 compute), as in llm.c's matmul_backward;
// llm.c's hand-tiled matmul_forward_kernel4 is not ported. These kernels mirror the bias parts of
// train_gpt2.py's matmul_forward / matmul_backward. floatX (common.cuh) is float, or bf16 when
// compiled with -DENABLE_BF16: sums are taken in float and rounded once to floatX at the store.
//
// The fp32 trainer adds the bias after the GEMM with these; the bf16 one does not use them: it copies
// the bias into the output and lets the GEMM add onto it (beta = 1), one rounding of product + bias
// (llm.c's cuBLASLt bias epilogue), since a second rounding after the GEMM's drops small biases.
//
// add_bias_kernel(floatX* out, const floatX* bias, int N, int OC)
//   out (N,OC) += bias (OC) broadcast over rows; N = B*T.
//   launch: grid = ceil_div(N*OC, block), block = 256 (any size); one thread per element.
//
// add_bias_packed_kernel(floatX* out, const floatX* bias, int N, int OC)
//   The same, one thread per x128 (8 elements in bf16, 4 in fp32, all in one row as OC is a
//   multiple of the pack) with 128-bit loads and stores; bit-identical to add_bias_kernel.
//   Requires OC a multiple of x128::size and out, bias 16-byte aligned (else a "misaligned
//   address" launch error); train_gpt2_cuda.py's launcher checks that and takes the per-element
//   kernel otherwise. launch: grid = ceil_div(N*OC, block * x128::size), block = 256 (any size).
//
// matmul_backward_bias_kernel(floatX* dbias, const floatX* dout, int N, int OC)
//   dbias (OC) += column sums of dout (N,OC) (accumulates; the sum in float, rounded once to floatX
//   when added to dbias). Deterministic (no atomics): every column is summed by one block, in an
//   order fixed by the block size.
//   Each block owns 32 consecutive columns (one per lane), and its warps split the rows: warp w
//   reads rows w, w + warps, ..., each read a coalesced 128 bytes; the per-warp sums meet in
//   shared memory and warp 0 adds them up in warp order (llm.c's matmul_backward_bias_kernel4,
//   with a bounds check so OC need not be a multiple of 32). A 1024-thread block keeps 32 rows
//   in flight per block: GPT-2 124M's OC = 768 / 2304 / 3072 give 24 / 72 / 96 blocks, so on a
//   132-SM GPU each busy SM runs 32 warps (128-thread blocks ran 4). Splitting the rows across
//   blocks too, with a deterministic second pass, would fill the idle SMs; not done here.
//   launch: grid = ceil_div(OC, 32), block = 1024 (a multiple of 32, <= 1024; declared
//   __launch_bounds__(1024)), dynamic shared memory = block*sizeof(float) bytes.
//
// Assumes N*OC < 2^31.

#include "common.cuh"

extern "C" __global__ void add_bias_kernel(floatX* out, const floatX* bias, int N, int OC) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // flat index into out (N,OC)
    if (idx >= N * OC) { return; }
    out[idx] = (floatX)((float)out[idx] + (float)bias[idx % OC]);
}

extern "C" __global__ void add_bias_packed_kernel(floatX* out, const floatX* bias, int N, int OC) {
    int idx = (blockIdx.x * blockDim.x + threadIdx.x) * x128::size;  // first of this thread's elements
    if (idx >= N * OC) { return; }
    x128 x = load128cs(out + idx);                     // read once, then overwritten
    x128 b = load128(bias + idx % OC);                 // bias is read by every row: keep it cached
    x128 y;
    for (int k = 0; k < x128::size; k++) { y[k] = (floatX)((float)x[k] + (float)b[k]); }
    store128(out + idx, y);
}

extern "C" __global__ void __launch_bounds__(1024) matmul_backward_bias_kernel(floatX* dbias, const floatX* dout,
                                                                            int N, int OC) {
    extern __shared__ float partial[];               // (blockDim.x/32, 32): one row per warp
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int warps = blockDim.x / 32;
    int col = blockIdx.x * 32 + lane;                 // this lane's column of dout
    float sum = 0.0f;
    if (col < OC) {
        for (int row = warp; row < N; row += warps) { sum += (float)dout[row * OC + col]; }
    }
    partial[warp * 32 + lane] = sum;
    __syncthreads();
    if (warp == 0 && col < OC) {
        float total = 0.0f;
        for (int w = 0; w < warps; w++) { total += partial[w * 32 + lane]; }
        dbias[col] = (floatX)((float)dbias[col] + total);
    }
}
