// encoder.cu: token + position embedding, forward and backward.
//
// Mirrors train_gpt2.py's encoder_forward / encoder_backward. The forward is llm.c
// train_gpt2_fp32.cu's encoder_forward_kernel3, per element, and packed (x128 per thread, as
// llm.c's mainline); the backward is deterministic (no atomics), in the spirit of llm.c's
// mainline train_gpt2.cu: the host groups the B*T positions by token id, and each thread sums one
// token's positions in a fixed order. floatX (common.cuh) is float, or bf16 when compiled with
// -DENABLE_BF16: sums are taken in float and rounded once to floatX at the store.
//
// encoder_forward_kernel(floatX* out, const int* inp, const floatX* wte, const floatX* wpe,
//                        int B, int T, int C)
//   out (B,T,C) = wte[inp[b,t], :] + wpe[t, :]       (written, not accumulated; rounded to nearest)
//   inp (B,T) int32 token ids in [0, Vp); wte (Vp,C); wpe (maxT,C), T <= maxT.
//   launch: grid = ceil_div(B*T*C, block), block = 256 (any size); one thread per output element.
//
// encoder_forward_packed_kernel(floatX* out, const int* inp, const floatX* wte, const floatX* wpe,
//                               int B, int T, int C)
//   The same, one thread per x128 (8 elements in bf16, 4 in fp32: all in one row, as C is a
//   multiple of the pack), with 128-bit loads and stores; bit-identical to encoder_forward_kernel.
//   Requires C a multiple of x128::size and out, wte, wpe 16-byte aligned (else a "misaligned
//   address" launch error); train_gpt2_cuda.py's launcher checks that and takes the per-element
//   kernel otherwise. launch: grid = ceil_div(B*T*C, block * x128::size), block = 256 (any size).
//
// encoder_backward_wte_kernel(floatX* dwte, const floatX* dout, const int* bucket_starts,
//                             const int* bucket_positions, const int* bucket_tokens,
//                             int num_buckets, int C, unsigned int seed)
//   dwte[token, :] += dout[b,t,:] for every position b*T+t holding that token   (accumulates)
//   The buckets come from the host (train_gpt2_cuda.py's encoder_buckets): bucket k holds the
//   token bucket_tokens[k] and the positions bucket_positions[bucket_starts[k] .. bucket_starts[k+1]),
//   in increasing order; bucket_starts has num_buckets + 1 entries, the tokens are distinct.
//   launch: grid = (ceil_div(C, block), num_buckets), block = 256 (any size); thread x of block
//   (cx, k) owns channel c = cx*block + x of bucket k: it starts from dwte[token, c] (as float) and
//   adds the bucket's dout[.., c] one position after the other, in increasing order, in float, then
//   stores the sum: in bf16 rounded once, STOCHASTICALLY (common.cuh's stochastic_round with
//   `seed`, one seed per launch from the model's generator, as llm.c); in fp32 as it is.
//   No two threads touch the same element, and each one's additions happen in one fixed order,
//   so dwte is bit-identical run to run whatever the scheduling (in fp32 equal, float for float, to
//   NumPy's np.add.at in float32, which adds in the same order; in bf16 for the same seed and grid).
//   A heavy bucket (a token repeated many times) is one long loop for its threads; its loads stay
//   coalesced across c.
//
// encoder_backward_wpe_kernel(floatX* dwpe, const floatX* dout, int B, int T, int C, unsigned int seed)
//   dwpe[t, :] += sum over b of dout[b,t,:]    (accumulates)
//   launch: grid = ceil_div(T*C, block), block = 256 (any size); one thread per (t, c), which
//   adds b = 0, 1, ..., B-1 in that order to dwpe[t, c] in float and stores the sum as the wte
//   kernel does (stochastically rounded with `seed` in bf16): deterministic, no atomics.
//
// encoder_backward_wpe_x128_kernel(floatX* dwpe, const floatX* dout, int B, int T, int C, unsigned int seed)
//   The same sums, one thread per x128 of dwpe[:T] (8 bf16 or 4 floats of a row), 128-bit loads of the B
//   rows of dout, four in flight (issued, then added in b order: each element's sum is the plain kernel's).
//   fp32: the same bits as encoder_backward_wpe_kernel. bf16: each element still rounded once,
//   stochastically, but element k of a thread's pack takes the noise of seed + k (one noise for the whole
//   pack would round its 8 elements up or down together), so the bits differ from the plain kernel's
//   while each stays one of the two bf16 neighbours of the same float sum.
//   Requires C a multiple of x128::size and dwpe, dout 16-byte aligned (the launcher's packable, else the
//   plain kernel). launch: grid = ceil_div(T*C, block * x128::size), block = 128: at d12 (T=1024, C=768,
//   bf16) 768 blocks, ~6 per SM of an H100's 132 (a 256-thread block would give 384, under 3 per SM).
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

extern "C" __global__ void encoder_forward_packed_kernel(floatX* out, const int* inp, const floatX* wte,
                                                         const floatX* wpe, int B, int T, int C) {
    int idx = (blockIdx.x * blockDim.x + threadIdx.x) * x128::size;  // first of this thread's elements
    if (idx >= B * T * C) { return; }
    int bt = idx / C;                                  // one row for the whole pack (C % size == 0)
    int c = idx % C;
    int t = bt % T;
    int ix = inp[bt];
    x128 token = load128(wte + ix * C + c);            // wte and wpe rows are read again: keep them cached
    x128 position = load128(wpe + t * C + c);
    x128 sum;
    for (int k = 0; k < x128::size; k++) { sum[k] = (floatX)((float)token[k] + (float)position[k]); }
    store128(out + idx, sum);
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

extern "C" __global__ void encoder_backward_wpe_x128_kernel(floatX* dwpe, const floatX* dout,
                                                            int B, int T, int C, unsigned int seed) {
    constexpr int P = x128::size;
    int idx = (blockIdx.x * blockDim.x + threadIdx.x) * P;   // first of this thread's elements of dwpe[:T]
    if (idx >= T * C) { return; }
    x128 old = load128cs(dwpe + idx);                        // (not __ldg: this thread writes it back)
    float acc[P];
    for (int k = 0; k < P; k++) { acc[k] = (float)old[k]; }
    int stride = T * C;                                       // from one b to the next
    int b = 0;
    for (; b + 3 < B; b += 4) {                               // four rows' loads in flight, then added in b order
        x128 d0 = load128cs(dout + b * stride + idx);
        x128 d1 = load128cs(dout + (b + 1) * stride + idx);
        x128 d2 = load128cs(dout + (b + 2) * stride + idx);
        x128 d3 = load128cs(dout + (b + 3) * stride + idx);
        for (int k = 0; k < P; k++) { acc[k] += (float)d0[k]; acc[k] += (float)d1[k]; acc[k] += (float)d2[k];
                                      acc[k] += (float)d3[k]; }
    }
    for (; b < B; b++) {
        x128 d = load128cs(dout + b * stride + idx);
        for (int k = 0; k < P; k++) { acc[k] += (float)d[k]; }
    }
    x128 out;
    for (int k = 0; k < P; k++) { stochastic_round(acc[k], &out[k], seed + k); }   // bf16: a noise per element
    store128(dwpe + idx, out);
}
