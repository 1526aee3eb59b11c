// flash_attention.cu: causal multi-head attention that never writes the (B,NH,T,T) scores
// (FlashAttention-2, Dao 2023), forward and backward, bf16 on the tensor cores through nvcuda::wmma.
//
// Shapes: C = NH*hs; qkv (B,T,3C) laid out (B,T,3,NH,hs) as attention.cu reads it; out (B,T,C);
// lse, D (B,NH,T) fp32; dqkv (B,T,3C) like qkv. scale = 1/sqrt(hs). Everything is written (=).
//
// flash_attention_forward_kernel(floatX* out, float* lse, const floatX* qkv, int B, int T, int NH, int hs)
//   out[b,t,h,:] = sum_{s<=t} softmax_s(scale q_t.k_s) v_s, lse[b,h,t] = log sum_{s<=t} exp(scale q_t.k_s).
// flash_attention_backward_dq_kernel(floatX* dqkv, float* D, const floatX* dout, const floatX* qkv,
//                                    const floatX* out, const float* lse, int B, int T, int NH, int hs)
//   D[b,h,t] = sum_d dout[b,t,h,d] out[b,t,h,d], then dq (the first C of each dqkv row).
// flash_attention_backward_dkdv_kernel(floatX* dqkv, const floatX* dout, const floatX* qkv, const float* lse,
//                                      const float* D, int B, int T, int NH, int hs)
//   dk and dv (the second and third C of each dqkv row); reads the D the dq kernel wrote: launch it after.
//
// Math. With s_ts = scale q_t.k_s (s <= t), P = softmax by rows, O = P V:
//   forward, online softmax over key tiles: per row keep the running max m and sum l of exp(s - m) and
//   the unnormalized output o; a new tile with scores s_j gives m' = max(m, max_j s_j), p_j = exp(s_j - m'),
//   l' = l exp(m - m') + sum_j p_j, o' = o exp(m - m') + sum_j p_j v_j; after the last tile O = o / l and
//   L = m + log l, so that P_ts = exp(s_ts - L_t) can be recomputed without m or l. Any m >= the true
//   max minus a little works (it cancels in o / l and in L): here m moves only when a tile's max exceeds
//   it by more than MAX_SLACK = 8, so p <= e^8 and most tiles need no rescale of o at all.
//   backward (dO given): dV = P^T dO; dP = dO V^T; dS = P * (dP - D) with D_t = sum_s P_ts dP_ts
//   = sum_d dO_td O_td (the softmax Jacobian); dQ = scale dS K, dK = scale dS^T Q. P and dS round to bf16
//   before they enter a product, as the materialized path's att and dpreatt do.
//
// Tiles. BC = 32 keys per tile, one per lane in the row work. The forward takes BR = 64 query rows
// for hs = 64 and 32 for hs = 128; the backward BR = 32 for both. A block walks only the key tiles
// that start before the end of its query tile (the causal skip) and masks keys after the query in
// the diagonal ones; rows t >= T and keys s >= T load as zeros, are masked, and are never stored.
// Products are 16x16x16 wmma fragments (bf16 in, float accumulate); the fragments' element-to-lane
// layout is never used: S and dP go to shared memory with store_matrix_sync, the per-row work runs
// on plain threads (a warp per row, a lane per key, warp_max/warp_sum), and P and dS come back as
// matrix_a fragments. The forward keeps o in accumulator fragments; on a tile where some row's m moves,
// they make a round trip through shared memory, where plain threads scale the rows by exp(m - m').
// The backward keeps dQ, or dK and dV, in accumulator fragments for the whole walk.
//
// Shared memory (dynamic, bytes; all under the 48 KiB default, so no opt-in is needed). Rows are padded
// by 16 bytes (hs + 8 bf16, hs + 4 or 36 floats) so that fragment loads and stores avoid bank conflicts;
// p is written over s, and ds over dp, row by row, once a row is read (LDP = 72 bf16 per row):
//   forward:  q (BR,hs+8) bf16 + k, v (BC,hs+8) bf16 + s/p (BR,36) f32 + o (BR,hs+4) f32 (the staging
//             area of a rescale and of the end) + m, l, alpha (BR) f32 = 45,824 (hs 64, BR 64) and 48,000
//             (hs 128, BR 32).
//   backward: q, dout (BR,hs+8) bf16 + k, v (BC,hs+8) bf16 + s/p, dp/ds (BR,36) f32 + lse, D (BR) f32
//             = 27,904 (hs 64) and 44,288 (hs 128); both kernels use the same layout, and stage their
//             (32,hs+4) f32 results where q and dout were.
//   train_gpt2_cuda.py's flash_shared_bytes computes the same sums.
// Launch: block = 128 (4 warps); grid = (B*NH, ceil(T/BR)) for the forward and dq kernels (query
// tiles), (B*NH, ceil(T/BC)) for dkdv (key tiles). Blocks start in order of x + y*gridDim.x, so every
// head's longest walk comes first: query tiles are numbered from the last, key tiles from the first.
// Backward = 2 launches: dq (writing D as it goes), then dkdv. The price of having no atomics: both
// recompute S and dP, 7 tile products per (query tile, key tile) pair where FlashAttention-2's one
// kernel with atomic dQ adds needs 5.
//
// Determinism: no atomics. Each output element is written by one thread of one block, each sum runs
// over its tiles in a fixed order, so the bits are the same in every run and thread order.
// Assumes: hs in {64, 128} (other head sizes: the kernels return at once; the launcher refuses them),
// qkv and dout 16-byte aligned (16-byte tile loads), 1 <= T <= 65535*32 (grid.y), B*NH < 2^31. Global
// offsets are 64-bit, so B*T*3C may exceed 2^31.
// fp32 build: the kernels' bodies exist only with -DENABLE_BF16 (empty otherwise), since wmma has no
// 16x16x16 fragment for float inputs (tf32 would be another kernel); an fp32 trainer runs attention.cu.
// The grid covers B*NH heads, so B itself is unused (kept for the usual argument list).
// Emulator: needs emulator/include/mma.h (warp-collective wmma with an opaque fragment layout).

#include "common.cuh"

#ifdef ENABLE_BF16
#include <mma.h>

namespace flash {

namespace wmma = nvcuda::wmma;

constexpr int THREADS = 128;              // 4 warps
constexpr int WARPS = THREADS / 32;
constexpr int BC = 32;                    // keys per tile: one per lane in the row work
constexpr int BWD_BR = 32;                // query rows per tile in the backward
// Row strides in shared memory, padded by 16 bytes: a row of hs bf16 (128 or 256 bytes) or of 32 floats
// would start every row on the same bank, and a fragment load or store (8 rows of 16 bytes at a time)
// would hit one bank 8 times; with the pad, consecutive rows start 4 banks apart.
constexpr int LDS = BC + 4;               // floats per row of s and dp
constexpr int LDP = 2 * LDS;              // bf16 per row of p and ds, which overwrite s and dp in place
template <int HS> struct Ld {
    static constexpr int H = HS + 8;      // bf16 per row of q, k, v, dout
    static constexpr int O = HS + 4;      // floats per row of o and of the results' staging
};

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, floatX, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, floatX, wmma::col_major> FragAT;   // a transposed
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, floatX, wmma::row_major> FragB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, floatX, wmma::col_major> FragBT;   // b transposed
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

// rows [row0, row0 + ROWS) of one head's q, k, v or dout into a (ROWS, HS) bf16 tile (row stride
// Ld<HS>::H), 16 bytes per access; rows at or past T become zeros
template <int HS, int ROWS>
__device__ void load_tile(floatX* tile, const floatX* head, size_t row_stride, int row0, int T) {
    constexpr int PER_ROW = HS / 8;       // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * PER_ROW; c += THREADS) {
        int r = c / PER_ROW, col = (c % PER_ROW) * 8;
        int4 v = make_int4(0, 0, 0, 0);
        if (row0 + r < T) { v = *reinterpret_cast<const int4*>(head + (size_t)(row0 + r) * row_stride + col); }
        *reinterpret_cast<int4*>(tile + r * Ld<HS>::H + col) = v;
    }
}

// s (M,BC) f32 (row stride LDS) = a (M,HS) bf16 @ b^T, b (BC,HS) bf16 (both row stride Ld<HS>::H): the
// score-like products S = Q K^T and dP = dO V^T, each warp taking 16x16 output tiles in turn
template <int M, int HS>
__device__ void matmul_abt(float* s, const floatX* a, const floatX* b, int warp) {
    constexpr int LD = Ld<HS>::H;
    for (int t = warp; t < (M / 16) * (BC / 16); t += WARPS) {
        int i = t / (BC / 16), j = t % (BC / 16);
        FragC acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int kk = 0; kk < HS / 16; kk++) {
            FragA fa;
            FragBT fb;
            wmma::load_matrix_sync(fa, a + i * 16 * LD + kk * 16, LD);
            wmma::load_matrix_sync(fb, b + j * 16 * LD + kk * 16, LD);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(s + i * 16 * LDS + j * 16, acc, LDS, wmma::mem_row_major);
    }
}

// ---------------------------------------------------------------------------------------------
// forward

template <int HS, int BR>
struct ForwardSmem {
    floatX* q; floatX* k; floatX* v; float* s; floatX* p; float* o; float* m; float* l; float* alpha;
    __device__ explicit ForwardSmem(unsigned char* base) {
        q = reinterpret_cast<floatX*>(base);
        k = q + BR * Ld<HS>::H;
        v = k + BC * Ld<HS>::H;
        s = reinterpret_cast<float*>(v + BC * Ld<HS>::H);
        p = reinterpret_cast<floatX*>(s);                  // row r of p in the first half of row r of s
        o = s + BR * LDS;
        m = o + BR * Ld<HS>::O;
        l = m + BR;
        alpha = l + BR;
    }
};

// The running max moves only when a tile's max exceeds it by more than this (natural-log units), so
// that most tiles leave every row's max alone and o, kept in accumulator fragments, needs no rescaling
// (a rescale is a round trip through shared memory). p = exp(s - m) is then at most e^8 ~ 3000: fine
// in bf16 and fp32, and lse = m + log l is the same number whichever m it was computed with.
constexpr float MAX_SLACK = 8.0f;

// one key tile's online-softmax step for the rows of this warp: p = exp(s - m'), m and l updated, and
// alpha = exp(m - m') (exactly 1 where m stays), by which o must be rescaled
template <int HS, int BR>
__device__ void forward_rows(const ForwardSmem<HS, BR>& sm, int q0, int k0, int T, float scale, int warp, int lane) {
    for (int r = warp; r < BR; r += WARPS) {
        int qi = q0 + r, kj = k0 + lane;
        bool valid = kj <= qi && kj < T;
        float s = valid ? sm.s[r * LDS + lane] * scale : FLOAT_LOWEST;
        float m_old = sm.m[r];
        float tile_max = warp_max(s);                      // finite on the first tile: key 0 is in it
        float m_new = tile_max > m_old + MAX_SLACK ? tile_max : m_old;
        float p = valid ? expf(s - m_new) : 0.0f;
        sm.p[r * LDP + lane] = (floatX)p;                  // over s: every lane read its s before warp_max
        float p_sum = warp_sum(p);                         // l sums p in fp32; the tensor cores get it rounded
        float alpha = m_new == m_old ? 1.0f : expf(m_old - m_new);   // 0 on the first tile
        if (lane == 0) {                                   // every lane read m and l before the shuffles
            sm.l[r] = sm.l[r] * alpha + p_sum;
            sm.m[r] = m_new;
            sm.alpha[r] = alpha;
        }
    }
}

// o *= alpha by rows, when some row's max moved (every warp reads the same alphas, so every thread of
// the block takes the same branch and the barriers inside are reached by all): the fragments go to
// shared memory, the rows are scaled there by plain threads, and the fragments come back
template <int HS, int BR, int N>
__device__ void forward_rescale(const ForwardSmem<HS, BR>& sm, FragC (&o)[N], int warp, int lane) {
    constexpr int LDO = Ld<HS>::O;
    float moved = 0.0f;
    for (int r = lane; r < BR; r += 32) { moved = fmaxf(moved, sm.alpha[r] != 1.0f ? 1.0f : 0.0f); }
    if (warp_max(moved) == 0.0f) { return; }
    for (int n = 0; n < N; n++) {
        int t = warp + n * WARPS, i = t / (HS / 16), j = t % (HS / 16);
        wmma::store_matrix_sync(sm.o + i * 16 * LDO + j * 16, o[n], LDO, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < BR * HS; e += THREADS) { sm.o[(e / HS) * LDO + e % HS] *= sm.alpha[e / HS]; }
    __syncthreads();
    for (int n = 0; n < N; n++) {
        int t = warp + n * WARPS, i = t / (HS / 16), j = t % (HS / 16);
        wmma::load_matrix_sync(o[n], sm.o + i * 16 * LDO + j * 16, LDO, wmma::mem_row_major);
    }
}

// o (BR,HS) f32 += p (BR,BC) bf16 @ v (BC,HS) bf16, o in this warp's accumulator fragments
template <int HS, int BR, int N>
__device__ void forward_pv(const ForwardSmem<HS, BR>& sm, FragC (&o)[N], int warp) {
    constexpr int LDH = Ld<HS>::H;
    for (int n = 0; n < N; n++) {
        int t = warp + n * WARPS, i = t / (HS / 16), j = t % (HS / 16);
        for (int kk = 0; kk < BC / 16; kk++) {
            FragA fa;
            FragB fb;
            wmma::load_matrix_sync(fa, sm.p + i * 16 * LDP + kk * 16, LDP);
            wmma::load_matrix_sync(fb, sm.v + kk * 16 * LDH + j * 16, LDH);
            wmma::mma_sync(o[n], fa, fb, o[n]);
        }
    }
}

template <int HS, int BR>
__device__ void forward(unsigned char* smem, floatX* out, float* lse, const floatX* qkv, int T, int NH) {
    constexpr int N = (BR / 16) * (HS / 16) / WARPS, LDO = Ld<HS>::O;
    ForwardSmem<HS, BR> sm(smem);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int q0 = (gridDim.y - 1 - blockIdx.y) * BR;            // the longest walks start first
    int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    size_t C = (size_t)NH * HS;
    const floatX* q_head = qkv + (size_t)b * T * 3 * C + (size_t)h * HS;
    float scale = 1.0f / sqrtf((float)HS);

    load_tile<HS, BR>(sm.q, q_head, 3 * C, q0, T);
    for (int r = threadIdx.x; r < BR; r += THREADS) { sm.m[r] = FLOAT_LOWEST; sm.l[r] = 0.0f; }
    FragC o[N];
    for (int n = 0; n < N; n++) { wmma::fill_fragment(o[n], 0.0f); }
    int key_end = min(q0 + BR, T);                         // keys past the tile's last row are all masked
    for (int k0 = 0; k0 < key_end; k0 += BC) {
        load_tile<HS, BC>(sm.k, q_head + C, 3 * C, k0, T);
        load_tile<HS, BC>(sm.v, q_head + 2 * C, 3 * C, k0, T);
        __syncthreads();
        matmul_abt<BR, HS>(sm.s, sm.q, sm.k, warp);        // s = q k^T
        __syncthreads();
        forward_rows<HS, BR>(sm, q0, k0, T, scale, warp, lane);
        __syncthreads();
        if (k0 > 0) { forward_rescale<HS, BR, N>(sm, o, warp, lane); }   // o is still 0 on the first tile
        forward_pv<HS, BR, N>(sm, o, warp);                // o += p v
        __syncthreads();                                   // before the next tile overwrites k, v, s, p, alpha
    }
    for (int n = 0; n < N; n++) {
        int t = warp + n * WARPS, i = t / (HS / 16), j = t % (HS / 16);
        wmma::store_matrix_sync(sm.o + i * 16 * LDO + j * 16, o[n], LDO, wmma::mem_row_major);
    }
    __syncthreads();
    floatX* out_head = out + (size_t)b * T * C + (size_t)h * HS;
    for (int r = warp; r < BR && q0 + r < T; r += WARPS) {
        float inv_l = 1.0f / sm.l[r];
        for (int c = lane; c < HS; c += 32) {
            out_head[(size_t)(q0 + r) * C + c] = (floatX)(sm.o[r * LDO + c] * inv_l);
        }
        if (lane == 0) { lse[(size_t)bh * T + q0 + r] = sm.m[r] + logf(sm.l[r]); }
    }
}

// ---------------------------------------------------------------------------------------------
// backward

template <int HS>
struct BackwardSmem {
    static constexpr int BR = BWD_BR;
    floatX* q; floatX* dout; floatX* k; floatX* v; float* s; float* dp; floatX* p; floatX* ds;
    float* lse; float* D;
    __device__ explicit BackwardSmem(unsigned char* base) {
        q = reinterpret_cast<floatX*>(base);
        dout = q + BR * Ld<HS>::H;
        k = dout + BR * Ld<HS>::H;
        v = k + BC * Ld<HS>::H;
        s = reinterpret_cast<float*>(v + BC * Ld<HS>::H);
        dp = s + BR * LDS;
        p = reinterpret_cast<floatX*>(s);                  // p over s and ds over dp, row by row
        ds = reinterpret_cast<floatX*>(dp);
        lse = dp + BR * LDS;
        D = lse + BR;
    }
    // (BR,HS) floats (row stride Ld<HS>::O) where q and dout were: the results' staging area after the walk
    __device__ float* staging() const { return reinterpret_cast<float*>(q); }
};

// s = q k^T and dp = dout v^T, then per row: p = exp(scale s - lse), masked; ds = p (dp - D) scale
template <int HS>
__device__ void backward_scores(const BackwardSmem<HS>& sm, int q0, int k0, int T, float scale, int warp, int lane) {
    constexpr int BR = BackwardSmem<HS>::BR;
    matmul_abt<BR, HS>(sm.s, sm.q, sm.k, warp);
    matmul_abt<BR, HS>(sm.dp, sm.dout, sm.v, warp);
    __syncthreads();
    for (int r = warp; r < BR; r += WARPS) {
        int qi = q0 + r, kj = k0 + lane;
        bool valid = kj <= qi && kj < T && qi < T;
        float s = sm.s[r * LDS + lane], dp = sm.dp[r * LDS + lane];
        __syncwarp();                                      // the row is read before p and ds overwrite it
        float p = valid ? expf(s * scale - sm.lse[r]) : 0.0f;
        sm.p[r * LDP + lane] = (floatX)p;
        sm.ds[r * LDP + lane] = (floatX)(p * (dp - sm.D[r]) * scale);
    }
    __syncthreads();
}

// a (ROWS,HS) fp32 result in accumulator fragments (tile t = warp + n*WARPS) -> bf16 rows of dqkv
template <int HS, int ROWS, int N>
__device__ void store_result(const BackwardSmem<HS>& sm, FragC (&acc)[N], floatX* head, size_t row_stride,
                             int row0, int T, int warp) {
    constexpr int LDO = Ld<HS>::O;
    float* staging = sm.staging();
    for (int n = 0; n < N; n++) {
        int t = warp + n * WARPS, i = t / (HS / 16), j = t % (HS / 16);
        wmma::store_matrix_sync(staging + i * 16 * LDO + j * 16, acc[n], LDO, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < ROWS * HS; e += THREADS) {
        int r = e / HS, c = e % HS;
        if (row0 + r < T) { head[(size_t)(row0 + r) * row_stride + c] = (floatX)staging[r * LDO + c]; }
    }
    __syncthreads();                                       // the staging area may be reused
}

template <int HS>
__device__ void backward_dq(unsigned char* smem, floatX* dqkv, float* D, const floatX* dout, const floatX* qkv,
                            const floatX* out, const float* lse, int T, int NH) {
    constexpr int BR = BWD_BR, N = (BR / 16) * (HS / 16) / WARPS, LDH = Ld<HS>::H;
    BackwardSmem<HS> sm(smem);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int q0 = (gridDim.y - 1 - blockIdx.y) * BR;            // the longest walks start first
    int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    size_t C = (size_t)NH * HS;
    const floatX* q_head = qkv + (size_t)b * T * 3 * C + (size_t)h * HS;
    const floatX* dout_head = dout + (size_t)b * T * C + (size_t)h * HS;
    const floatX* out_head = out + (size_t)b * T * C + (size_t)h * HS;
    float scale = 1.0f / sqrtf((float)HS);

    load_tile<HS, BR>(sm.q, q_head, 3 * C, q0, T);
    load_tile<HS, BR>(sm.dout, dout_head, C, q0, T);
    __syncthreads();
    for (int r = warp; r < BR; r += WARPS) {               // D = rowsum(dout * out), a warp per row
        int qi = q0 + r;
        float d = 0.0f;
        if (qi < T) {
            for (int c = lane; c < HS; c += 32) { d += (float)sm.dout[r * LDH + c] * (float)out_head[(size_t)qi * C + c]; }
        }
        d = warp_sum(d);
        if (lane == 0) {
            sm.D[r] = d;
            sm.lse[r] = qi < T ? lse[(size_t)bh * T + qi] : 0.0f;
            if (qi < T) { D[(size_t)bh * T + qi] = d; }
        }
    }
    FragC acc[N];
    for (int n = 0; n < N; n++) { wmma::fill_fragment(acc[n], 0.0f); }
    int key_end = min(q0 + BR, T);
    for (int k0 = 0; k0 < key_end; k0 += BC) {
        load_tile<HS, BC>(sm.k, q_head + C, 3 * C, k0, T);
        load_tile<HS, BC>(sm.v, q_head + 2 * C, 3 * C, k0, T);
        __syncthreads();
        backward_scores<HS>(sm, q0, k0, T, scale, warp, lane);
        for (int n = 0; n < N; n++) {                      // dq += ds k
            int t = warp + n * WARPS, i = t / (HS / 16), j = t % (HS / 16);
            for (int kk = 0; kk < BC / 16; kk++) {
                FragA fa;
                FragB fb;
                wmma::load_matrix_sync(fa, sm.ds + i * 16 * LDP + kk * 16, LDP);
                wmma::load_matrix_sync(fb, sm.k + kk * 16 * LDH + j * 16, LDH);
                wmma::mma_sync(acc[n], fa, fb, acc[n]);
            }
        }
        __syncthreads();                                   // before the next tile overwrites k, v, ds
    }
    store_result<HS, BR, N>(sm, acc, dqkv + (size_t)b * T * 3 * C + (size_t)h * HS, 3 * C, q0, T, warp);
}

// acc[n] += a^T @ b for a (BR,BC) bf16 (row stride LDP) and b (BR,HS) bf16: dV += P^T dO, dK += dS^T Q
template <int HS, int N>
__device__ void accumulate_atb(FragC (&acc)[N], const floatX* a, const floatX* b, int warp) {
    constexpr int LDH = Ld<HS>::H;
    for (int n = 0; n < N; n++) {
        int t = warp + n * WARPS, i = t / (HS / 16), j = t % (HS / 16);
        for (int kk = 0; kk < BWD_BR / 16; kk++) {
            FragAT fa;
            FragB fb;
            wmma::load_matrix_sync(fa, a + kk * 16 * LDP + i * 16, LDP);
            wmma::load_matrix_sync(fb, b + kk * 16 * LDH + j * 16, LDH);
            wmma::mma_sync(acc[n], fa, fb, acc[n]);
        }
    }
}

template <int HS>
__device__ void backward_dkdv(unsigned char* smem, floatX* dqkv, const floatX* dout, const floatX* qkv,
                              const float* lse, const float* D, int T, int NH) {
    constexpr int BR = BWD_BR, N = (BC / 16) * (HS / 16) / WARPS;
    BackwardSmem<HS> sm(smem);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int k0 = blockIdx.y * BC;                              // the first key tiles walk the most queries
    int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    size_t C = (size_t)NH * HS;
    const floatX* q_head = qkv + (size_t)b * T * 3 * C + (size_t)h * HS;
    const floatX* dout_head = dout + (size_t)b * T * C + (size_t)h * HS;
    float scale = 1.0f / sqrtf((float)HS);

    load_tile<HS, BC>(sm.k, q_head + C, 3 * C, k0, T);
    load_tile<HS, BC>(sm.v, q_head + 2 * C, 3 * C, k0, T);
    FragC dk[N], dv[N];
    for (int n = 0; n < N; n++) { wmma::fill_fragment(dk[n], 0.0f); wmma::fill_fragment(dv[n], 0.0f); }
    for (int q0 = k0 / BR * BR; q0 < T; q0 += BR) {       // query tiles from the diagonal down
        load_tile<HS, BR>(sm.q, q_head, 3 * C, q0, T);
        load_tile<HS, BR>(sm.dout, dout_head, C, q0, T);
        for (int r = threadIdx.x; r < BR; r += THREADS) {
            bool in = q0 + r < T;
            sm.lse[r] = in ? lse[(size_t)bh * T + q0 + r] : 0.0f;
            sm.D[r] = in ? D[(size_t)bh * T + q0 + r] : 0.0f;
        }
        __syncthreads();
        backward_scores<HS>(sm, q0, k0, T, scale, warp, lane);
        accumulate_atb<HS, N>(dv, sm.p, sm.dout, warp);    // dv += p^T dout
        accumulate_atb<HS, N>(dk, sm.ds, sm.q, warp);      // dk += ds^T q
        __syncthreads();                                   // before the next tile overwrites q, dout, p, ds
    }
    floatX* dk_head = dqkv + (size_t)b * T * 3 * C + C + (size_t)h * HS;
    store_result<HS, BC, N>(sm, dk, dk_head, 3 * C, k0, T, warp);
    store_result<HS, BC, N>(sm, dv, dk_head + C, 3 * C, k0, T, warp);
}

}  // namespace flash

#endif  // ENABLE_BF16

// The entry points exist in both builds, so every tool that lists a file's kernels (NVRTC's, the
// emulator's, the header test) sees the same three; in an fp32 build their bodies are empty and the
// launchers never call them (flash_check refuses fp32 arrays).

extern "C" __global__ void flash_attention_forward_kernel(floatX* out, float* lse, const floatX* qkv, int B, int T, int NH, int hs) {
#ifdef ENABLE_BF16
    extern __shared__ __align__(32) unsigned char flash_smem[];
    if (hs == 64) { flash::forward<64, 64>(flash_smem, out, lse, qkv, T, NH); }
    if (hs == 128) { flash::forward<128, 32>(flash_smem, out, lse, qkv, T, NH); }
#endif
}

extern "C" __global__ void flash_attention_backward_dq_kernel(floatX* dqkv, float* D, const floatX* dout, const floatX* qkv,
                                                              const floatX* out, const float* lse, int B, int T, int NH, int hs) {
#ifdef ENABLE_BF16
    extern __shared__ __align__(32) unsigned char flash_smem[];
    if (hs == 64) { flash::backward_dq<64>(flash_smem, dqkv, D, dout, qkv, out, lse, T, NH); }
    if (hs == 128) { flash::backward_dq<128>(flash_smem, dqkv, D, dout, qkv, out, lse, T, NH); }
#endif
}

extern "C" __global__ void flash_attention_backward_dkdv_kernel(floatX* dqkv, const floatX* dout, const floatX* qkv, const float* lse,
                                                                const float* D, int B, int T, int NH, int hs) {
#ifdef ENABLE_BF16
    extern __shared__ __align__(32) unsigned char flash_smem[];
    if (hs == 64) { flash::backward_dkdv<64>(flash_smem, dqkv, dout, qkv, lse, D, T, NH); }
    if (hs == 128) { flash::backward_dkdv<128>(flash_smem, dqkv, dout, qkv, lse, D, T, NH); }
#endif
}
