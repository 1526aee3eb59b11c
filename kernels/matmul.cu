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
//   when added to dbias). The plain one-pass version, for any OC and alignment (the launcher's fallback
//   when OC is not a multiple of x128::size): every column is summed by one block. Deterministic.
//   Each block owns 32 consecutive columns (one per lane), and its warps split the rows: warp w
//   adds rows w, w + warps, ... in order (four loads in flight, one accumulator), each read a
//   coalesced 32 elements; the per-warp sums meet in shared memory and warp 0 adds them up in warp
//   order (llm.c's matmul_backward_bias_kernel4, with a bounds check so OC need not be a multiple
//   of 32). It is latency-bound: GPT-2 124M's OC = 768 / 2304 / 3072 give 24 / 72 / 96 blocks, and
//   each warp has 2-byte loads (bf16) in flight; ~130-360 us per launch at d12 B=16 T=1024 on an H100.
//   launch: grid = ceil_div(OC, 32), block = 1024 (a multiple of 32, <= 1024; declared
//   __launch_bounds__(1024)), dynamic shared memory = block*sizeof(float) bytes.
//
// The GPU-filling version: two kernels, rows AND columns split across blocks (in the spirit of llm.c's
// matmul_backward_bias_kernel9 + reduce_add_sum_kernel). Deterministic: every float is added in an
// order fixed by the launch shape (no atomics), so a run gives the same bits every time.
//
// matmul_backward_bias_partial_kernel(float* scratch, const floatX* dout, int N, int OC, int rows_per_block)
//   scratch (gridDim.y, OC) = the column sums of dout over each block row's rows_per_block rows
//   (written, fp32). Block (x, y) owns the columns [x*32*P, (x+1)*32*P) (P = x128::size: 8 in bf16,
//   4 in fp32; lane l of every warp reads the P columns from (x*32 + l)*P with one 128-bit load, a
//   warp 512 contiguous bytes of a row) and the rows [y*R, min(N, (y+1)*R)), R = rows_per_block.
//   Warp w adds the rows y*R + w, + warps, ... in order, four independent 128-bit loads in flight per
//   thread (load128cs: dout is read once here); the warps' sums meet in shared memory and are added
//   in warp order, one thread per column. Requires OC a multiple of P and dout 16-byte aligned.
//   launch: grid = (ceil_div(OC, 32*P), ceil_div(N, R)), block = 256 (any multiple of 32, <= 1024),
//   dynamic shared memory = block*P*sizeof(float) bytes (8 KiB in bf16, 4 KiB in fp32);
//   scratch >= gridDim.y * OC floats. train_gpt2_cuda.py's matmul_bias_grid picks R, a multiple of
//   32 (8 warps x 4 loads), so that the grid is about one full wave of 256-thread blocks on an H100
//   (2048 threads x 132 SMs / 256 = 1056 blocks, as llm.c sizes its grid): at d12 B=16 T=1024 (N =
//   16384) OC = 768 / 2304 / 3072 give 3x256 / 9x103 / 12x86 blocks in bf16 (768 / 927 / 1032; fp32:
//   6x171 / 18x57 / 24x43), 6-8 blocks per SM with 4 x 16 bytes in flight per thread.
//
// matmul_backward_bias_sum_kernel(floatX* dbias, const float* scratch, int row_blocks, int OC)
//   dbias (OC) += the sum of scratch (row_blocks, OC) over its rows, rounded once to floatX: the
//   plain kernel's order on the partials (32 columns per block, warp w adds the row blocks w, w +
//   warps, ... in order, then the warps' sums in warp order). launch: grid = ceil_div(OC, 32),
//   block = 1024 (a multiple of 32, <= 1024; __launch_bounds__(1024)), dynamic shared memory =
//   block*sizeof(float) bytes. With <= ~1056/ceil_div(OC, 32*P) row blocks a thread adds a few.
//
//   So each column's sum is: within a block row, per warp in row order, then the warps in order;
//   then the block rows' partials, per warp of the sum kernel in order, then its warps in order.
//   That order differs from the plain kernel's (the fp32 sums agree to rounding, ~1e-6 relative);
//   both are fixed by their launch shapes.
//   Modeled at d12 B=16 T=1024 on an H100 (3.35 TB/s; bytes = dout once + the scratch written and
//   read): bf16 OC = 768 / 2304 / 3072: 25.2 + 1.6 / 75.5 + 1.9 / 100.7 + 2.1 MB = 8.0 / 23.1 / 30.7
//   us (fp32 2x dout: 15.3 / 45.4 / 60.4 us), against the plain kernel's ~130-360 us. The sum kernel's
//   threads each add a handful of partials (<= 8 per warp lane at these shapes): a few us of latency.
//   What the emulator cannot show: the timing, and that the grid fills the GPU.
//
// matmul_backward_bias_x128_kernel(floatX* dbias, float* scratch, unsigned int* counters, const floatX* dout,
//                                  int N, int OC, int rows_per_block)
//   The two kernels above in ONE launch (the trainer's choice: one launch a bias instead of two). Each block
//   first does exactly what matmul_backward_bias_partial_kernel's block does (its column sums to scratch);
//   then it makes those stores visible GPU-wide (__threadfence), and thread 0 takes a ticket from
//   counters[blockIdx.x] (atomicAdd): the block that takes the last ticket of its column block (gridDim.y - 1)
//   is the one that sees every block row's partials of those columns written, and it adds them into dbias,
//   in matmul_backward_bias_sum_kernel's order: per column, the 32 chains of row blocks w, w + 32, ... (that
//   kernel's 32 warps of 1024 threads), each in row order, then the chains in order w = 0 .. 31. So dbias
//   has the same bits as the two-kernel pair, whichever block comes last: deterministic. The partials
//   cross blocks as atomics: stored with atomicExch, read with atomicAdd(bits, 0) (the same bits back), at
//   L2, where a plain load could meet a stale L1 line; and two atomics never race (the emulator's race
//   checker, which orders no blocks, sees them so too). The last block resets its counter to 0 for the
//   next launch. One thread per column (32*P of them, 256 in bf16), 8 chains' reads in flight together: 45
//   registers on sm_80/sm_90 (5 blocks of 256 per SM; the partial kernel alone: 32, 8 per SM; 4 chains: 40;
//   all 32 at once: ~130). The reads are atomics (4 bytes each), not 128-bit loads: the price of the race
//   checker's rule, paid in the tail only.
//   Requires counters (>= gridDim.x unsigned ints) all 0 at the launch (train_gpt2_cuda.py keeps them at
//   the end of the zero-allocated scratch; every launch leaves them 0), and what the partial kernel
//   requires. launch: the partial kernel's grid and block, the same dynamic shared memory.
//   At d12 B=16 T=1024 bf16 the last block of a column block adds 256 / 103 / 86 row blocks (OC = 768 /
//   2304 / 3072): 32 / 16 / 12 rounds of 8 atomic reads at L2 per thread, ~5-15 us after the other blocks
//   (L2 latency), in place of a second launch; the trainer's OC = 768 biases (attproj, fcproj) come from the
//   LayerNorm backward instead. No GPU has timed it yet: dev/check_kernel.py does, beside the pair.
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

// column_sum_by_warps: the sum of column col of x (rows, OC), for the block's 32 columns (one per
// lane). Warp w adds rows w, w + warps, ... in order, four loads issued before their adds (so four
// are in flight; the sum is the plain loop's, bit for bit); the warps' sums meet in shared (>=
// blockDim.x floats) and warp 0 adds them in warp order. The result is valid in warp 0 where col < OC.
template <class T>
__device__ float column_sum_by_warps(const T* x, int rows, int col, int OC, float* shared) {
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int warps = blockDim.x / 32;
    float sum = 0.0f;
    if (col < OC) {
        int row = warp;
        for (; row + 3 * warps < rows; row += 4 * warps) {
            float a = (float)x[row * OC + col];
            float b = (float)x[(row + warps) * OC + col];
            float c = (float)x[(row + 2 * warps) * OC + col];
            float d = (float)x[(row + 3 * warps) * OC + col];
            sum += a; sum += b; sum += c; sum += d;
        }
        for (; row < rows; row += warps) { sum += (float)x[row * OC + col]; }
    }
    shared[warp * 32 + lane] = sum;                  // (warps, 32): one row per warp
    __syncthreads();
    float total = 0.0f;
    if (warp == 0) {
        for (int w = 0; w < warps; w++) { total += shared[w * 32 + lane]; }
    }
    return total;
}

extern "C" __global__ void __launch_bounds__(1024) matmul_backward_bias_kernel(floatX* dbias, const floatX* dout,
                                                                            int N, int OC) {
    extern __shared__ float partial[];
    int col = blockIdx.x * 32 + threadIdx.x % 32;     // this lane's column of dout
    float total = column_sum_by_warps(dout, N, col, OC, partial);
    if (threadIdx.x < 32 && col < OC) { dbias[col] = (floatX)((float)dbias[col] + total); }
}

// One block's share of matmul_backward_bias_partial_kernel (see there): its column sums into scratch.
__device__ void bias_block_partials(float* scratch, const floatX* dout, int N, int OC, int rows_per_block,
                                    float* partial, bool atomic_store) {
    constexpr int P = x128::size;
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int warps = blockDim.x / 32;
    int col = (blockIdx.x * 32 + lane) * P;           // the first of this lane's P columns
    int first_row = blockIdx.y * rows_per_block;       // this block row's rows: [first_row, row_end)
    int row_end = min(N, first_row + rows_per_block);
    float sum[P];
    for (int k = 0; k < P; k++) { sum[k] = 0.0f; }
    if (col < OC) {                                   // OC is a multiple of P: all P columns are in
        int row = first_row + warp;
        for (; row + 3 * warps < row_end; row += 4 * warps) {   // four independent 128-bit loads in flight
            x128 a = load128cs(dout + row * OC + col);
            x128 b = load128cs(dout + (row + warps) * OC + col);
            x128 c = load128cs(dout + (row + 2 * warps) * OC + col);
            x128 d = load128cs(dout + (row + 3 * warps) * OC + col);
            for (int k = 0; k < P; k++) {
                sum[k] += (float)a[k]; sum[k] += (float)b[k]; sum[k] += (float)c[k]; sum[k] += (float)d[k];
            }
        }
        for (; row < row_end; row += warps) {
            x128 a = load128cs(dout + row * OC + col);
            for (int k = 0; k < P; k++) { sum[k] += (float)a[k]; }
        }
    }
    for (int k = 0; k < P; k++) { partial[warp * 32 * P + lane * P + k] = sum[k]; }
    __syncthreads();
    for (int c = threadIdx.x; c < 32 * P; c += blockDim.x) {   // one thread per column of the block
        int column = blockIdx.x * 32 * P + c;
        if (column >= OC) { break; }
        float total = 0.0f;
        for (int w = 0; w < warps; w++) { total += partial[w * 32 * P + c]; }
        if (atomic_store) {                            // (the one-launch kernel: see there)
            atomicExch(reinterpret_cast<int*>(scratch + blockIdx.y * OC + column), __float_as_int(total));
        } else {
            scratch[blockIdx.y * OC + column] = total;
        }
    }
}

extern "C" __global__ void matmul_backward_bias_partial_kernel(float* scratch, const floatX* dout, int N, int OC,
                                                               int rows_per_block) {
    extern __shared__ float partial[];                // (warps, 32*P): each warp's sums of the block's columns
    bias_block_partials(scratch, dout, N, OC, rows_per_block, partial, false);
}

// A partial written by another block of this launch, read at L2 by an atomic that returns its bits unchanged.
__device__ float partial_of(float* address) {
    return __uint_as_float(atomicAdd(reinterpret_cast<unsigned int*>(address), 0u));
}

extern "C" __global__ void matmul_backward_bias_x128_kernel(floatX* dbias, float* scratch, unsigned int* counters,
                                                            const floatX* dout, int N, int OC, int rows_per_block) {
    extern __shared__ float partial[];
    __shared__ unsigned int ticket;
    constexpr int P = x128::size;
    constexpr int SUM_WARPS = 32;                     // matmul_backward_bias_sum_kernel's warps: its order
    bias_block_partials(scratch, dout, N, OC, rows_per_block, partial, true);

    __threadfence();                                  // this block's partials visible to every block
    __syncthreads();                                  // ... all of them, before the ticket
    if (threadIdx.x == 0) { ticket = atomicAdd(&counters[blockIdx.x], 1u); }
    __syncthreads();
    if (ticket != gridDim.y - 1) { return; }          // not the last block row of these columns to finish
    __threadfence();

    int row_blocks = gridDim.y;
    for (int c = threadIdx.x; c < 32 * P; c += blockDim.x) {
        int column = blockIdx.x * 32 * P + c;
        if (column >= OC) { break; }
        constexpr int GROUP = 8;                      // chains summed side by side: 8 reads in flight
        float total = 0.0f;
        for (int w = 0; w < SUM_WARPS; w += GROUP) {  // chain j: the row blocks j, j + 32, ... in order
            float chain[GROUP];
            for (int j = 0; j < GROUP; j++) { chain[j] = 0.0f; }
            for (int r = w; r < row_blocks; r += SUM_WARPS) {
                float v[GROUP];
                for (int j = 0; j < GROUP; j++) {
                    if (r + j < row_blocks) { v[j] = partial_of(scratch + (r + j) * OC + column); }
                }
                for (int j = 0; j < GROUP; j++) {
                    if (r + j < row_blocks) { chain[j] += v[j]; }
                }
            }
            for (int j = 0; j < GROUP; j++) { total += chain[j]; }   // the chains in order
        }
        dbias[column] = (floatX)((float)dbias[column] + total);
    }
    if (threadIdx.x == 0) { atomicExch(reinterpret_cast<int*>(counters + blockIdx.x), 0); }   // for the next launch
}

extern "C" __global__ void __launch_bounds__(1024) matmul_backward_bias_sum_kernel(floatX* dbias, const float* scratch,
                                                                                int row_blocks, int OC) {
    extern __shared__ float partial[];
    int col = blockIdx.x * 32 + threadIdx.x % 32;     // this lane's column of scratch and dbias
    float total = column_sum_by_warps(scratch, row_blocks, col, OC, partial);
    if (threadIdx.x < 32 && col < OC) { dbias[col] = (floatX)((float)dbias[col] + total); }
}
