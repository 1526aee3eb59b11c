// encoder.cu: token + position embedding, forward and backward.
//
// Mirrors train_gpt2.py's encoder_forward / encoder_backward (llm.c train_gpt2_fp32.cu:
// encoder_forward_kernel3 and encoder_backward_kernel, without the float4 packing).
//
// encoder_forward_kernel(float* out, const int* inp, const float* wte, const float* wpe,
//                        int B, int T, int C)
//   out (B,T,C) = wte[inp[b,t], :] + wpe[t, :]       (written, not accumulated)
//   inp (B,T) int32 token ids in [0, Vp); wte (Vp,C); wpe (maxT,C), T <= maxT.
//   launch: grid = ceil_div(B*T*C, block), block = 256 (any size); one thread per output float.
//
// encoder_backward_kernel(float* dwte, float* dwpe, const float* dout, const int* inp,
//                         int B, int T, int C)
//   dwte[inp[b,t], :] += dout[b,t,:]; dwpe[t, :] += dout[b,t,:]   (accumulates)
//   launch: same as the forward. A token that appears twice adds twice, through atomicAdd,
//   so the order of the float additions is NOT deterministic (llm.c's fp32 kernel is the same).
//
// Assumes B*T*C < 2^31. No shared memory, no barriers: the emulator runs it as is.

#include "common.cuh"

extern "C" __global__ void encoder_forward_kernel(float* out, const int* inp, const float* wte,
                                                  const float* wpe, int B, int T, int C) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // flat index into out (B,T,C)
    if (idx >= B * T * C) { return; }
    int bt = idx / C;                                  // row b*T + t
    int c = idx % C;
    int t = bt % T;
    int ix = inp[bt];                                  // token id at (b,t)
    out[idx] = wte[ix * C + c] + wpe[t * C + c];
}

extern "C" __global__ void encoder_backward_kernel(float* dwte, float* dwpe, const float* dout,
                                                   const int* inp, int B, int T, int C) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // flat index into dout (B,T,C)
    if (idx >= B * T * C) { return; }
    int bt = idx / C;
    int c = idx % C;
    int t = bt % T;
    int ix = inp[bt];
    float d = dout[idx];
    atomicAdd(&dwte[ix * C + c], d);                   // inverts out = wte[ix] + ...
    atomicAdd(&dwpe[t * C + c], d);                    // ... + wpe[t] (every b adds into row t)
}
