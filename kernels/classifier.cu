// classifier.cu: softmax + cross-entropy + their backward in one pass over the logits.
//
// Mirrors train_gpt2.py's softmax_forward + crossentropy_forward (write_dlogits = 0) and, with
// write_dlogits = 1, also crossentropy_softmax_backward (llm.c train_gpt2_fp32.cu
// fused_classifier_kernel3). The probabilities are never stored: each pass recomputes them.
// floatX (common.cuh) is float, or bf16 when compiled with -DENABLE_BF16: the logits (and the
// dlogits written over them) are floatX, read into float; the softmax statistics, the losses and
// dlosses are float; each dlogit is rounded once (to nearest) at its store.
//
// fused_classifier_kernel(floatX* logits, float* losses, const float* dlosses, const int* targets,
//                         int B, int T, int V, int Vp, int write_dlogits)
//   logits (B,T,Vp): only the first V columns are real, the Vp-V pad columns are ignored.
//   losses (B,T) = -log softmax(logits[b,t,:V])[targets[b,t]], written. targets in [0, V).
//   The loss is taken from the log-sum-exp, log(sum_i exp(x_i - max)) - (x_target - max), never as
//   -log(exp(x_target - max) / sum): CuPy compiles with -ftz=true, which flushes an exp below
//   2^-126 (a target ~87 below the row's max) to 0, and -log(0) is inf. The loss's own terms are
//   the sum (>= 1) and a difference, so flushing cannot reach it; elsewhere a flushed exp is a
//   probability below 2^-126, where 0 is as good an answer.
//   write_dlogits != 0: logits[b,t,i] is OVERWRITTEN with (p_i - [i == target]) * dloss for i < V
//   and 0 for the pad columns, where dloss = dlosses[b,t], or 1/(B*T) when dlosses is NULL
//   (the gradient of the mean loss). Forward calls it with 0 so the logits stay readable;
//   backward calls it again with 1.
//   launch: one block per row: grid = B*T, block = 1024 (a multiple of 32, <= 1024; the kernel
//   is declared __launch_bounds__(1024) so the compiler keeps it within a 1024-thread block's
//   registers), static shared memory 32 floats (one partial per warp).
//   The plain version: each thread keeps one floatX load in flight per step of both passes
//   (latency-bound: ~3 ms a step at d12 B=16 T=1024 on an H100, against ~1.5 ms at bandwidth); the
//   launcher's fallback when Vp is not a multiple of x128::size or logits is not 16-byte aligned.
//
// fused_classifier_x128_kernel(floatX* logits, float* losses, const float* dlosses, const int* targets,
//                              int B, int T, int V, int Vp, int write_dlogits)
//   The same outputs, read and written in 128-bit packs (P = x128::size: 8 bf16 or 4 floats; llm.c
//   mainline's fused_classifier_kernel5). Requires Vp a multiple of P and logits 16-byte aligned, so
//   every row starts on a pack (GPT-2: Vp = 50304 = 393 x 128). Thread t takes the packs t, t + block,
//   ... in order, issuing four independent loads before it uses them (4 x 16 bytes in flight).
//   1. over the ceil_div(V, P) packs that hold real columns (the last also holds pad columns when V is
//      not a multiple of P; they are skipped): per pack its max m over the real columns, then the
//      running max M' = max(M, m) and sum S' = S * exp(M - M') + sum_k exp(x_k - M') (one rescale per
//      pack, not per element). load128: the row (100 KB in bf16) stays in L2 for pass 2.
//   2. over all Vp/P packs: the real columns' dlogits, exactly the plain kernel's formula; the pad
//      columns (the tail of the last real pack and every pack after it, which is not read) get 0;
//      load128cs (the last read), store128 (the dlogits GEMM reads them next).
//   The loss from the log-sum-exp and the barrier before the overwrite as in the plain kernel (the
//   max's own pack adds exp(0) = 1 to its thread's S, and no later rescale shrinks it, so sum >= 1).
//   Not bit-identical to the plain kernel: the sum of exponentials is added in another order (per pack,
//   then per thread), so the losses agree to a few fp32 ulp and the dlogits to the rounding of floatX
//   (tests/test_classifier_x128.py states the bounds). Deterministic (the order is fixed).
//   launch: as the plain kernel: grid = B*T, block = 1024 (a multiple of 32, <= 1024), static shared
//   memory 32 floats.
//   Modeled at d12 B=16 T=1024 bf16 on an H100 (3.35 TB/s), every access counted: pass 1 reads
//   16384 x 100,528 B = 1.65 GB, pass 2 reads 1.65 GB and writes 1.65 GB: 4.94 GB = 1.47 ms for the
//   backward call (0.98 ms if pass 2's reads hit L2: ~2 rows of 100 KB per SM, 26 MB), 0.49 ms for a
//   forward-only call (write_dlogits = 0); fp32 twice that. Before: ~3 ms (estimated for the earlier three-pass kernel).
//
// Changes from llm.c's kernel: the loss from the log-sum-exp (above); the write_dlogits switch
// (llm.c always overwrites, and has an optional probs output instead); pad columns zeroed; and a
// barrier between thread 0 reading logits[target] for the loss and the threads overwriting the
// row (llm.c has none, a race).
//
// Assumes B*T*Vp < 2^31 (rows are addressed with 64-bit offsets anyway). block_sum, block_max
// and FLOAT_LOWEST come from common.cuh.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024) fused_classifier_kernel(
        floatX* logits, float* losses, const float* dlosses, const int* targets, int B, int T, int V, int Vp,
        int write_dlogits) {
    __shared__ float shared[32];
    int row = blockIdx.x;                              // (b, t) flattened
    floatX* x = logits + (long long)row * Vp;          // (Vp,)

    // online softmax statistics: running max and sum of exp(x - max) per thread
    float maxval = FLOAT_LOWEST;
    float sumval = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float xi = (float)x[i];
        float newmax = fmaxf(maxval, xi);
        sumval = sumval * expf(maxval - newmax) + expf(xi - newmax);
        maxval = newmax;
    }
    float gmax = block_max(maxval, shared);
    float sum = block_sum(sumval * expf(maxval - gmax), shared);   // >= 1: the max's own term is 1
    float norm = 1.0f / sum;

    int target = targets[row];
    if (threadIdx.x == 0) {
        losses[row] = logf(sum) - ((float)x[target] - gmax);  // -log(exp(x_target - gmax) / sum)
    }
    if (write_dlogits == 0) { return; }                // same for the whole block
    __syncthreads();                                   // x[target] is read before anyone overwrites it

    float dloss = (dlosses != nullptr) ? dlosses[row] : 1.0f / (B * T);
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        if (i < V) {
            float prob = expf((float)x[i] - gmax) * norm;
            float indicator = (i == target) ? 1.0f : 0.0f;
            x[i] = (floatX)((prob - indicator) * dloss);
        } else {
            x[i] = (floatX)0.0f;                       // pad columns get no gradient
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024) fused_classifier_x128_kernel(
        floatX* logits, float* losses, const float* dlosses, const int* targets, int B, int T, int V, int Vp,
        int write_dlogits) {
    __shared__ float shared[32];
    constexpr int P = x128::size;                      // floatX per 128-bit load
    constexpr int U = 4;                               // loads in flight per thread
    int row = blockIdx.x;                              // (b, t) flattened
    floatX* x = logits + (long long)row * Vp;          // (Vp,): starts on a pack, Vp % P == 0
    int step = blockDim.x;
    int real_packs = (V + P - 1) / P;                  // packs with a real column; the last may hold pad too

    // 1. online softmax statistics, a pack at a time: running max and sum of exp(x - max) per thread
    float maxval = FLOAT_LOWEST;
    float sumval = 0.0f;
    for (int i = threadIdx.x; i < real_packs; i += U * step) {
        x128 pack[U];
        for (int u = 0; u < U; u++) {                  // U independent loads, then their use in order
            if (i + u * step < real_packs) { pack[u] = load128(x + (i + u * step) * P); }
        }
        for (int u = 0; u < U && i + u * step < real_packs; u++) {
            int first = (i + u * step) * P;            // the pack's first column
            float packmax = FLOAT_LOWEST;
            for (int k = 0; k < P; k++) {
                if (first + k < V) { packmax = fmaxf(packmax, (float)pack[u][k]); }
            }
            float newmax = fmaxf(maxval, packmax);
            float packsum = 0.0f;
            for (int k = 0; k < P; k++) {
                if (first + k < V) { packsum += expf((float)pack[u][k] - newmax); }
            }
            sumval = sumval * expf(maxval - newmax) + packsum;
            maxval = newmax;
        }
    }
    float gmax = block_max(maxval, shared);
    float sum = block_sum(sumval * expf(maxval - gmax), shared);   // >= 1: the max's own term is 1
    float norm = 1.0f / sum;

    int target = targets[row];
    if (threadIdx.x == 0) {
        losses[row] = logf(sum) - ((float)x[target] - gmax);  // -log(exp(x_target - gmax) / sum)
    }
    if (write_dlogits == 0) { return; }                // same for the whole block
    __syncthreads();                                   // x[target] is read before anyone overwrites it

    // 2. dlogits over the whole padded row, a pack at a time, each pack read and written by one thread
    float dloss = (dlosses != nullptr) ? dlosses[row] : 1.0f / (B * T);
    int packs = Vp / P;
    for (int i = threadIdx.x; i < packs; i += U * step) {
        x128 pack[U];
        for (int u = 0; u < U; u++) {                  // U independent loads (pad-only packs are not read)
            if (i + u * step < real_packs) { pack[u] = load128cs(x + (i + u * step) * P); }
        }
        for (int u = 0; u < U && i + u * step < packs; u++) {
            int first = (i + u * step) * P;
            x128 dlogit;
            for (int k = 0; k < P; k++) {
                int col = first + k;
                if (col < V) {
                    float prob = expf((float)pack[u][k] - gmax) * norm;
                    float indicator = (col == target) ? 1.0f : 0.0f;
                    dlogit[k] = (floatX)((prob - indicator) * dloss);
                } else {
                    dlogit[k] = (floatX)0.0f;          // pad columns get no gradient
                }
            }
            store128(x + first, dlogit);
        }
    }
}
