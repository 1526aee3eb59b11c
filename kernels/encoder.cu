// encoder.cu: token + position embedding, forward and backward.
//
// Mirrors train_gpt2.py's encoder_forward / encoder_backward. The forward is llm.c
// train_gpt2_fp32.cu's encoder_forward_kernel3 without the float4 packing; the backward is
// deterministic (no atomics), in the spirit of llm.c's mainline train_gpt2.cu: the host groups
// the B*T positions by token id, and each thread sums one token's positions in a fixed order.
//
// encoder_forward_kernel(float* out, const int* inp, const float* wte, const float* wpe,
//                        int B, int T, int C)
//   out (B,T,C) = wte[inp[b,t], :] + wpe[t, :]       (written, not accumulated)
//   inp (B,T) int32 token ids in [0, Vp); wte (Vp,C); wpe (maxT,C), T <= maxT.
//   launch: grid = ceil_div(B*T*C, block), block = 256 (any size); one thread per output float.
//
// encoder_backward_wte_kernel(float* dwte, const float* dout, const int* bucket_starts,
//                             const int* bucket_positions, const int* bucket_tokens,
//                             int num_buckets, int C)
//   dwte[token, :] += dout[b,t,:] for every position b*T+t holding that token   (accumulates)
//   The buckets come from the host (train_gpt2_cuda.py's encoder_buckets): bucket k holds the
//   token bucket_tokens[k] and the positions bucket_positions[bucket_starts[k] .. bucket_starts[k+1]),
//   in increasing order; bucket_starts has num_buckets + 1 entries, the tokens are distinct.
//   launch: grid = (ceil_div(C, block), num_buckets), block = 256 (any size); thread x of block
//   (cx, k) owns channel c = cx*block + x of bucket k: it starts from dwte[token, c] and adds the
//   bucket's dout[.., c] one position after the other, in increasing order, then writes the sum.
//   No two threads touch the same float, and each float's additions happen in one fixed order,
//   so dwte is bit-identical run to run whatever the scheduling (and equal, float for float, to
//   NumPy's np.add.at in float32, which adds in the same order). A heavy bucket (a token repeated
//   many times) is one long loop for its threads; its loads stay coalesced across c.
//
// encoder_backward_wpe_kernel(float* dwpe, const float* dout, int B, int T, int C)
//   dwpe[t, :] += sum over b of dout[b,t,:]    (accumulates)
//   launch: grid = ceil_div(T*C, block), block = 256 (any size); one thread per (t, c), which
//   adds b = 0, 1, ..., B-1 in that order to dwpe[t, c]: deterministic, no atomics.
//
// Assumes B*T*C < 2^31. No shared memory, no barriers: the emulator runs them as they are.

#include "common.cuh"

extern "C" __global__ void encoder_forward_kernel(floatX* out, const int* inp, const floatX* wte,
                                                  const floatX* wpe, int B, int T, int C) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // flat index into out (B,T,C)
    if (idx >= B * T * C) { return; }
    int bt = idx / C;                                  // row b*T + t
    int c = idx % C;
    int t = bt % T;
    int ix = inp[bt];                                  // token id at (b,t)
    out[idx] = (floatX)((float)wte[ix * C + c] + (float)wpe[t * C + c]);
}

extern "C" __global__ void encoder_backward_wte_kernel(floatX* dwte, const floatX* dout,
                                                       const int* bucket_starts,
                                                       const int* bucket_positions,
                                                       const int* bucket_tokens,
                                                       int num_buckets, int C, unsigned int seed) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;    // channel
    int k = blockIdx.y;                               // bucket: one token id
    if (c >= C || k >= num_buckets) { return; }
    floatX* dst = dwte + bucket_tokens[k] * C + c;     // inverts out = wte[ix] + ...
    float acc = (float)*dst;
    for (int i = bucket_starts[k]; i < bucket_starts[k + 1]; i++) {  // the token's positions, in order
        acc += (float)dout[bucket_positions[i] * C + c];
    }
    stochastic_round(acc, dst, seed);                  // bf16: rounded once, stochastically; fp32: stored
}

extern "C" __global__ void encoder_backward_wpe_kernel(floatX* dwpe, const floatX* dout,
                                                       int B, int T, int C, unsigned int seed) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // flat index into dwpe[:T] (T,C)
    if (idx >= T * C) { return; }
    float acc = (float)dwpe[idx];                      // inverts ... + wpe[t]: every b adds into row t
    for (int b = 0; b < B; b++) { acc += (float)dout[b * T * C + idx]; }
    stochastic_round(acc, &dwpe[idx], seed);
}
