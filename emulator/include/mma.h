// mma.h: the emulator's stand-in for CUDA's <mma.h>: warp matrix functions (nvcuda::wmma), bf16 16x16x16.
//
// A kernel writes `#include <mma.h>` as for nvcc; g++ finds this file (emulator/include/ is on its include
// path) and emulator.h, force-included before the kernel, supplies what it builds on: __nv_bfloat16, the
// fibers and their warp operations. What exists here, with CUDA's names and signatures:
//   fragment<matrix_a|matrix_b, 16, 16, 16, __nv_bfloat16, row_major|col_major>   8 bf16 per lane
//   fragment<accumulator, 16, 16, 16, float>                                      8 floats per lane
//   fill_fragment, load_matrix_sync (operands; the accumulator with a layout_t), store_matrix_sync
//   (the accumulator), mma_sync(d, a, b, c) (d may be c).
// Any other fragment (fp16, tf32, int8, other shapes, a/b without a layout) is an incomplete type: a
// compile error, never a silently wrong result.
//
// The element-to-lane mapping is OPAQUE in CUDA (the programming guide leaves it unspecified), so here it
// is deliberately a scrambled permutation, unlike any GPU's: a kernel that reads x[i] as a particular
// (row, col) gets wrong numbers. What works as on a GPU: the same operation on every x[i] of a fragment
// (scaling, converting, fill_fragment). The maps (kMaps below):
//   matrix_a  slot p = lane*8+i holds element e = (83p + 29) mod 256 of the tile, row e/16, col e%16
//   matrix_b  slot p holds element (109p + 71) mod 256, row (the k index) e/16, col e%16
//   accumulator  lane L holds 2 rows x 4 cols of the 16x16 result: with q = (13L + 5) mod 32, rows
//     R(2(q/4)), R(2(q/4)+1), cols C(4(q%4) + t), t = 0..3, where R(j) = (7j+3) mod 16 and
//     C(j) = (5j+11) mod 16; slot i is row number i%2 and col number (i/2 + L) mod 4 of those.
//   (2 rows x 4 columns: a lane's 8 sums are two 4-wide vector sums over one row of A each)
//
// Warp-collective: load_matrix_sync, store_matrix_sync and mma_sync each take two warp steps, warp
// operations of the emulator (emu::warp_op SYNCWARP, the machinery of __syncwarp), so each call is a
// synchronization point of the warp, and all 32 lanes must make it together: a lane waiting at
// __syncthreads instead is the emulator's deadlock error; a lane that has returned (or a block whose size is
// not a multiple of 32), or one at another warp operation, is an error naming the call. At the first step
// every lane publishes which call it is in (the warp operation's argument) and, for mma_sync, where its a
// and b fragments are; between the steps each lane loads or stores its own elements, or (mma_sync) lane 0
// gathers the warp's A and B from all the lanes' fragments; after the second step, which keeps every lane
// from changing a fragment before the gather, each lane computes its own 8 outputs. fill_fragment is per
// lane, as in CUDA.
//
// Arithmetic: d[r][n] = c[r][n] + sum over k = 0..15 of a[r][k]*b[k][n], in float, summed in the order
// k = 0, 1, ..., 15 starting from c (16 roundings); each product of two bf16 is exact in float. A GPU's order
// and internal precision are unspecified, so compare with the fp32 summation bound: |error| <=
// 16 * 2^-24 / (1 - 16 * 2^-24) * (|c| + sum |a||b|). With the emulator's flush-to-zero a product below
// 2^-126 is 0.
//
// Memory: each lane loads and stores only its own 8 elements, with ordinary (instrumented) loads and stores,
// so the traffic counter counts the whole tile once (512 bytes for a bf16 operand, 1 KiB for the
// accumulator) and the race checker sees every access as the lane's own. CUDA's documentation requires the
// pointer to be 256-bit (32-byte) aligned and ldm (in elements) a multiple of 16 bytes: 8 for bf16, 4 for
// float. The emulator checks ldm, and 16-byte alignment only: an unguarded NumPy array is just 16-byte
// aligned (cudaMalloc's are 256), so a 32-byte check would fail correct kernels. Either is an error raised
// after the launch (a GPU may fault or load garbage).

#pragma once

#if !defined(EMU_HIDDEN)
#error "emulator/include/mma.h is the emulator's stand-in: compile through emulator.RawModule (emulator.h first)"
#endif

namespace emu {
namespace wmma_impl {

// the three element maps: slot (lane*8 + i) <-> element (row*16 + col) of the 16x16 tile
struct Maps {
    unsigned char a_elem[256], b_elem[256], c_elem[256];
    unsigned char c_rows[32][2], c_cols[32][4];    // an accumulator lane's rows and columns
    unsigned char c_pick[32][8];                   // slot i -> (row number << 2) | col number
    unsigned char c_colbase[32];                   // 4 * (q % 4): where a lane's 4 columns start in C's order
    unsigned char c_colpos[16];                    // column n -> j with C(j) = n
};

constexpr Maps make_maps() {
    Maps m{};
    for (int p = 0; p < 256; p++) {
        int ea = (83 * p + 29) & 255, eb = (109 * p + 71) & 255;
        m.a_elem[p] = static_cast<unsigned char>(ea);
        m.b_elem[p] = static_cast<unsigned char>(eb);
    }
    for (int lane = 0; lane < 32; lane++) {
        int q = (13 * lane + 5) & 31;
        for (int s = 0; s < 2; s++) {
            m.c_rows[lane][s] = static_cast<unsigned char>((7 * (2 * (q >> 2) + s) + 3) & 15);
        }
        for (int t = 0; t < 4; t++) {
            int j = 4 * (q & 3) + t, n = (5 * j + 11) & 15;
            m.c_cols[lane][t] = static_cast<unsigned char>(n);
            m.c_colpos[n] = static_cast<unsigned char>(j);
        }
        m.c_colbase[lane] = static_cast<unsigned char>(4 * (q & 3));
        for (int i = 0; i < 8; i++) {
            int rs = i & 1, cs = ((i >> 1) + lane) & 3;
            m.c_pick[lane][i] = static_cast<unsigned char>((rs << 2) | cs);
            m.c_elem[lane * 8 + i] = static_cast<unsigned char>(m.c_rows[lane][rs] * 16 + m.c_cols[lane][cs]);
        }
    }
    return m;
}
inline constexpr Maps kMaps = make_maps();

// what a lane shows the others at a warp step: which call it is in, and (mma_sync) its operands
// (the call itself goes in the warp operation's argument, a field of the lane's Fiber: checking it reads
// no other fiber's stack, whose lines all compete for the same cache sets)
struct Published {
    int magic;
    const __nv_bfloat16* a;
    const __nv_bfloat16* b;
};
static const int kMagicLoad = 0x574D4C44, kMagicStore = 0x574D5354, kMagicMma = 0x574D4D41;

static inline void wmma_fail(const char* what, const char* msg) {
    char buf[320];
    const dim3& t = tls_fiber->thread_idx;
    snprintf(buf, sizeof buf, " thread (%u,%u,%u): wmma::%s: %s", t.x, t.y, t.z, what, msg);
    fail(tls_worker->launch, block_name(tls_worker) + buf);
}

static inline int lane_id() {
    const dim3& t = tls_fiber->thread_idx;
    const dim3& b = tls_worker->launch->block;
    return static_cast<int>((t.x + b.x * (t.y + b.y * t.z)) & 31u);
}

// The two warp steps every warp-collective call here takes, each a warp operation as __syncwarp is
// (emu::warp_op SYNCWARP), with a pointer to what the lane publishes as its value:
//   enter: wait until every live lane of the warp is at a warp operation, then check that all 32 lanes are
//     alive and in this same call (its magic): a lane that has returned, or one at another warp operation,
//     is an error. No lane can be past the call's second step yet (it waits for all), so what the lanes
//     published is still in place, and a lane of this call cannot have returned since the first step.
//   leave: wait until every lane has done its part, so none changes a fragment another still reads.
// enter fills lanes[32] (unless null) with what each lane published; false: the launch failed (the error
// is recorded).
static inline bool warp_enter(const Published* me, const char* what, const Published** lanes) {
    warp_op<uint64_t>(SYNCWARP, reinterpret_cast<uintptr_t>(me), me->magic, 32);
    Fiber* f = tls_fiber;
    char msg[200];
    if (f->warp * 32 + 32 > tls_worker->nthreads) {
        snprintf(msg, sizeof msg, "needs all 32 lanes of a warp, but warp %d has only %d threads (the block size "
                 "%d is not a multiple of 32)", f->warp, tls_worker->nthreads - f->warp * 32, tls_worker->nthreads);
        wmma_fail(what, msg);
        return false;
    }
    Fiber* const* warp = tls_worker->fibers.data() + f->warp * 32;
    for (int l = 0; l < 32; l++) {
        const Fiber* g = warp[l];
        if (g->state != DONE && g->op == SYNCWARP && g->op_arg == me->magic && g->op_value != 0) {
            if (lanes != nullptr) { lanes[l] = reinterpret_cast<const Published*>(g->op_value); }
            continue;
        }
        // a lane that returned may have been at this step and gone on (only a later step could let it
        // past), so it did not make the call with the others: either way an error
        snprintf(msg, sizeof msg, "lane %d of warp %d %s (all 32 lanes of the warp must make the same call "
                 "together)", l, f->warp, g->state == DONE ? "has returned" : "is at another warp operation");
        wmma_fail(what, msg);
        return false;
    }
    return true;
}

static inline void warp_leave(const Published* me) {
    warp_op<uint64_t>(SYNCWARP, reinterpret_cast<uintptr_t>(me), me->magic, 32);
}

// CUDA's documented requirements on a matrix in memory
static inline bool check_matrix(const void* p, unsigned ldm, unsigned elem_bytes, const char* what) {
    char msg[200];
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        snprintf(msg, sizeof msg, "the matrix pointer %p is not 16-byte aligned (CUDA requires 32 bytes: align "
                 "the array, e.g. __align__(32), and start tiles at multiples of 32 bytes)", p);
        wmma_fail(what, msg);
        return false;
    }
    if (ldm == 0 || (ldm * elem_bytes) % 16 != 0) {
        snprintf(msg, sizeof msg, "ldm %u (in elements) must be a positive multiple of %u (16 bytes), as CUDA "
                 "requires", ldm, 16 / elem_bytes);
        wmma_fail(what, msg);
        return false;
    }
    return true;
}

static inline bool check_layout(int layout, const char* what) {
    if (layout == 0 || layout == 1) { return true; }
    wmma_fail(what, "layout must be wmma::mem_row_major or wmma::mem_col_major");
    return false;
}

// this lane's elements between memory and its slots (elem: the map; col_major: memory layout)
template <typename T>
static inline void load_slots(T* x, const T* p, unsigned ldm, bool col_major, const unsigned char* elem) {
    for (int i = 0; i < 8; i++) {
        unsigned e = elem[i], r = e >> 4, c = e & 15u;
        x[i] = p[col_major ? c * ldm + r : r * ldm + c];
    }
}
template <typename T>
static inline void store_slots(T* p, const T* x, unsigned ldm, bool col_major, const unsigned char* elem) {
    for (int i = 0; i < 8; i++) {
        unsigned e = elem[i], r = e >> 4, c = e & 15u;
        p[col_major ? c * ldm + r : r * ldm + c] = x[i];
    }
}

// the multiply, in two parts. Lane 0 gathers the warp's A and B from every lane's fragments into floats
// on this OS thread (one pair of tiles per warp of the block); then each lane computes its 8 outputs of
// d = a*b + c from those tiles. B's columns are stored in the order C(0), C(1), ..., so that a lane's 4
// columns are 4 consecutive floats of each row: its 2 rows x 4 columns are two 4-wide vector sums.
struct Tiles {
    float a[256];                 // a[r*16 + k]
    alignas(16) float b[256];     // b[k*16 + j] = B[k][C(j)]
};
static thread_local Tiles warp_tiles[32];

// The gather and the multiply stand for register work on a GPU, so the race checker and the traffic counter
// (both builds with -fsanitize=thread) must not see them: the tiles lie in this thread's thread_local block,
// where the race checker looks for static __shared__ variables, and checking their every access cost more
// than the multiply. The loads and stores of load/store_matrix_sync stay instrumented.
#define EMU_WMMA_REGISTERS static __attribute__((no_sanitize("thread"), noinline))

EMU_WMMA_REGISTERS void gather(Tiles& t, const Published* const* lanes) {
    const Maps& m = kMaps;
    for (int l = 0; l < 32; l++) {
        const __nv_bfloat16* a = lanes[l]->a;
        const __nv_bfloat16* b = lanes[l]->b;
        for (int i = 0; i < 8; i++) {
            t.a[m.a_elem[l * 8 + i]] = static_cast<float>(a[i]);
            int eb = m.b_elem[l * 8 + i];                 // (k, n) = (eb / 16, eb % 16)
            t.b[(eb & ~15) + m.c_colpos[eb & 15]] = static_cast<float>(b[i]);
        }
    }
}

typedef float emu_float4v __attribute__((vector_size(16)));   // GCC's portable vectors (SSE on x86-64)

EMU_WMMA_REGISTERS void mma_lane(float* d, const float* c, const Tiles& t, int lane) {
    const Maps& m = kMaps;
    float init[2][4];
    for (int i = 0; i < 8; i++) { int pick = m.c_pick[lane][i]; init[pick >> 2][pick & 3] = c[i]; }
    emu_float4v acc0, acc1, bk;
    memcpy(&acc0, init[0], 16);
    memcpy(&acc1, init[1], 16);
    const float* a0 = t.a + m.c_rows[lane][0] * 16;
    const float* a1 = t.a + m.c_rows[lane][1] * 16;
    const float* b = t.b + m.c_colbase[lane];
    for (int k = 0; k < 16; k++) {                     // each sum: c + p0 + p1 + ... + p15, in that order
        memcpy(&bk, b + k * 16, 16);
        acc0 += a0[k] * bk;                            // exact products: fused or not, the same sums
        acc1 += a1[k] * bk;
    }
    float out[2][4];
    memcpy(out[0], &acc0, 16);
    memcpy(out[1], &acc1, 16);
    for (int i = 0; i < 8; i++) { int pick = m.c_pick[lane][i]; d[i] = out[pick >> 2][pick & 3]; }  // d may be c
}

// mma_sync: the first step (every lane publishes its a and b), lane 0 gathers them, the second step (no
// lane changes a fragment before the gather), then every lane computes its own outputs. The tiles stay
// intact until all have computed: lane 0's next gather waits for the next call's first step.
static inline void mma(float* d, const __nv_bfloat16* a, const __nv_bfloat16* b, const float* c) {
    Published me{kMagicMma, a, b};
    const Published* lanes[32];
    int lane = lane_id();
    if (!warp_enter(&me, "mma_sync", lane == 0 ? lanes : nullptr)) { return; }
    Tiles& t = warp_tiles[tls_fiber->warp];
    if (lane == 0) { gather(t, lanes); }
    warp_leave(&me);
    mma_lane(d, c, t, lane);
}

}  // namespace wmma_impl
}  // namespace emu

namespace nvcuda {
namespace wmma {

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;

enum layout_t { mem_row_major, mem_col_major };

template <typename T, int size>
struct alignas(8) emu_frag_base {
    enum { num_elements = size };
    enum { num_storage_elements = size };
    typedef T element_type;
    typedef T storage_element_type;
    T x[size];
};

// only these exist; any other combination is an incomplete type (a compile error)
template <typename Use, int m, int n, int k, typename T, typename Layout = void> class fragment;
template <> class fragment<matrix_a, 16, 16, 16, __nv_bfloat16, row_major> : public emu_frag_base<__nv_bfloat16, 8> {};
template <> class fragment<matrix_a, 16, 16, 16, __nv_bfloat16, col_major> : public emu_frag_base<__nv_bfloat16, 8> {};
template <> class fragment<matrix_b, 16, 16, 16, __nv_bfloat16, row_major> : public emu_frag_base<__nv_bfloat16, 8> {};
template <> class fragment<matrix_b, 16, 16, 16, __nv_bfloat16, col_major> : public emu_frag_base<__nv_bfloat16, 8> {};
template <> class fragment<accumulator, 16, 16, 16, float> : public emu_frag_base<float, 8> {};

template <typename T> struct emu_type_identity { typedef T type; };

// per lane, no warp step: CUDA's fill_fragment is not a synchronization point either
template <typename T, int size>
static inline void fill_fragment(emu_frag_base<T, size>& f, const typename emu_type_identity<T>::type& v) {
    for (int i = 0; i < size; i++) { f.x[i] = v; }
}

template <typename Use, typename Layout>
using emu_bf16_operand = fragment<Use, 16, 16, 16, __nv_bfloat16, Layout>;

namespace emu_detail {
using emu::wmma_impl::Published;

// a load or store: the two warp steps around this lane's own 8 elements (see warp_enter)
template <typename Body>
static inline void collective(int magic, const char* what, const void* p, unsigned ldm, unsigned elem_bytes,
                              int layout, Body body) {
    using namespace emu::wmma_impl;
    Published me{magic, nullptr, nullptr};
    if (!warp_enter(&me, what, nullptr)) { return; }
    if (!check_matrix(p, ldm, elem_bytes, what) || !check_layout(layout, what)) { return; }
    body(lane_id());
    warp_leave(&me);
}

template <typename Use, typename Layout>
static inline void load_operand(emu_bf16_operand<Use, Layout>& a, const __nv_bfloat16* p, unsigned ldm) {
    using namespace emu::wmma_impl;
    const unsigned char* map = std::is_same<Use, matrix_a>::value ? kMaps.a_elem : kMaps.b_elem;
    bool col = std::is_same<Layout, col_major>::value;
    collective(kMagicLoad, "load_matrix_sync", p, ldm, 2, 0, [&](int lane) {
        load_slots(a.x, p, ldm, col, map + lane * 8);
    });
}
}  // namespace emu_detail

static inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, __nv_bfloat16, row_major>& a,
                                    const __nv_bfloat16* p, unsigned ldm) { emu_detail::load_operand(a, p, ldm); }
static inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, __nv_bfloat16, col_major>& a,
                                    const __nv_bfloat16* p, unsigned ldm) { emu_detail::load_operand(a, p, ldm); }
static inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, __nv_bfloat16, row_major>& a,
                                    const __nv_bfloat16* p, unsigned ldm) { emu_detail::load_operand(a, p, ldm); }
static inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, __nv_bfloat16, col_major>& a,
                                    const __nv_bfloat16* p, unsigned ldm) { emu_detail::load_operand(a, p, ldm); }

static inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& a, const float* p, unsigned ldm,
                                    layout_t layout) {
    using namespace emu::wmma_impl;
    emu_detail::collective(kMagicLoad, "load_matrix_sync", p, ldm, 4, layout, [&](int lane) {
        load_slots(a.x, p, ldm, layout == mem_col_major, kMaps.c_elem + lane * 8);
    });
}

static inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& a, unsigned ldm,
                                     layout_t layout) {
    using namespace emu::wmma_impl;
    emu_detail::collective(kMagicStore, "store_matrix_sync", p, ldm, 4, layout, [&](int lane) {
        store_slots(p, a.x, ldm, layout == mem_col_major, kMaps.c_elem + lane * 8);
    });
}

template <typename LA, typename LB>
static inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                            const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA>& a,
                            const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB>& b,
                            const fragment<accumulator, 16, 16, 16, float>& c) {
    emu::wmma_impl::mma(d.x, a.x, b.x, c.x);
}

}  // namespace wmma
}  // namespace nvcuda
