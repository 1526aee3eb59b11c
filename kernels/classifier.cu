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
