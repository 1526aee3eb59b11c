"""The emulator's tensor cores: nvcuda::wmma (emulator/include/mma.h), bf16 16x16x16 with a float accumulator.

Small kernels multiply tiles with load_matrix_sync / mma_sync / store_matrix_sync and are checked against NumPy
float64: GEMMs of one 16x16 tile and of 32x48 (K = 32, six warps over two blocks), with the operands row- or
column-major, from global or from shared memory, accumulating into a loaded accumulator or a filled one, stored
row- or column-major, and an elementwise scale of x[]. Small-integer inputs make every sum exact, so those
compare bit for bit; random ones compare within the bound of float summation in the order mma.h states
(c + p0 + ... + p15 per call, each product of two bf16 exact): |error| <= gamma_K * (|c| + sum |a||b|),
gamma_K = K u / (1 - K u), u = 2^-24. Every check runs in the emulator's three thread orders on guarded arrays.

The element-to-lane map is opaque in CUDA and scrambled here, so a kernel that assumes the sm_80 layout must
come out wrong, and does; a warp where only some lanes call mma_sync is an error; so are a misaligned pointer,
a bad ldm and an unsupported fragment type (at compile time). The race checker sees the loads and stores of
load/store_matrix_sync (a shared tile read without the barrier after another warp writes it is a race) and
takes their warp steps as synchronization (a GEMM is clean). The same source compiles with nvcc for sm_80
and sm_90, to show the API accepted here is CUDA's.

Also here, since the same kernels show it: flush-to-zero (emulator.h's FlushToZero, as CuPy's -ftz=true). A
float product that underflows is 0 in a kernel, a subnormal input reads as 0, bf16 arithmetic keeps bf16
subnormals, and NumPy in the calling thread still has subnormals after the launch.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest

import emulator

i32, u16, f32 = np.int32, np.uint16, np.float32
ORDERS = ["forward", "reverse", "warps"]

SOURCE = r"""
#include <cuda_bf16.h>
#include <mma.h>
using namespace nvcuda;

typedef __nv_bfloat16 bf16;

// C (M x N) = A (M x K) * B (K x N) [+ C0]: warp w of block y makes output tile (y, w). A is row-major
// (lda = K) or column-major (stored K x M, lda = M), B row-major (ldb = N) or column-major (stored N x K,
// ldb = K), C0 and C row-major (ld N) or column-major (ld M).
template <typename LA, typename LB>
__device__ void tile_gemm(float* out, const bf16* a, const bf16* b, const float* c0, int M, int N, int K,
                          bool a_col, bool b_col, bool c_col, float scale) {
    int m0 = blockIdx.x * 16, n0 = (threadIdx.x / 32) * 16;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::layout_t lc = c_col ? wmma::mem_col_major : wmma::mem_row_major;
    int ldc = c_col ? M : N;
    const float* c_tile = c0 == nullptr ? nullptr : c0 + (c_col ? n0 * M + m0 : m0 * N + n0);
    if (c_tile != nullptr) { wmma::load_matrix_sync(acc, c_tile, ldc, lc); } else { wmma::fill_fragment(acc, 0.0f); }
    for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::load_matrix_sync(fa, a_col ? a + k0 * M + m0 : a + m0 * K + k0, a_col ? M : K);
        wmma::load_matrix_sync(fb, b_col ? b + n0 * K + k0 : b + k0 * N + n0, b_col ? K : N);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    for (int i = 0; i < acc.num_elements; i++) { acc.x[i] = acc.x[i] * scale; }   // elementwise: any layout
    wmma::store_matrix_sync(out + (c_col ? n0 * M + m0 : m0 * N + n0), acc, ldc, lc);
}

// layouts: bit 0 A column-major, bit 1 B column-major, bit 2 C (and C0) column-major
extern "C" __global__ void gemm(float* out, const bf16* a, const bf16* b, const float* c0, int M, int N, int K,
                                int layouts, float scale) {
    bool ac = layouts & 1, bc = layouts & 2, cc = layouts & 4;
    if (!ac && !bc) { tile_gemm<wmma::row_major, wmma::row_major>(out, a, b, c0, M, N, K, ac, bc, cc, scale); }
    if (!ac && bc) { tile_gemm<wmma::row_major, wmma::col_major>(out, a, b, c0, M, N, K, ac, bc, cc, scale); }
    if (ac && !bc) { tile_gemm<wmma::col_major, wmma::row_major>(out, a, b, c0, M, N, K, ac, bc, cc, scale); }
    if (ac && bc) { tile_gemm<wmma::col_major, wmma::col_major>(out, a, b, c0, M, N, K, ac, bc, cc, scale); }
}

// the same from shared memory: the block copies its 16 rows of A (row-major, ld K) and all of B (row-major,
// ld N) into shared arrays first; K <= 32, N <= 48
extern "C" __global__ void gemm_shared(float* out, const bf16* a, const bf16* b, int M, int N, int K) {
    __shared__ __align__(32) bf16 sa[16 * 32];
    __shared__ __align__(32) bf16 sb[32 * 48];
    int m0 = blockIdx.x * 16, n0 = (threadIdx.x / 32) * 16;
    for (int i = threadIdx.x; i < 16 * K; i += blockDim.x) { sa[i] = a[m0 * K + i]; }
    for (int i = threadIdx.x; i < K * N; i += blockDim.x) { sb[i] = b[i]; }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::load_matrix_sync(fa, sa + k0, K);
        wmma::load_matrix_sync(fb, sb + k0 * N + n0, N);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + m0 * N + n0, acc, N, wmma::mem_row_major);
}

// elementwise work on operand fragments: A doubled in bf16, B negated, after the load and before the mma
extern "C" __global__ void scaled_operands(float* out, const bf16* a, const bf16* b) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b, 16);
    for (int i = 0; i < fa.num_elements; i++) { fa.x[i] = __float2bfloat16(2.0f * __bfloat162float(fa.x[i])); }
    for (int i = 0; i < fb.num_elements; i++) { fb.x[i] = -fb.x[i]; }
    wmma::fill_fragment(acc, 1.5f);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}

// WRONG on purpose: writes the accumulator where sm_80 keeps its elements (lane / 4 + 8 * (i / 2 % 2),
// lane % 4 * 2 + i % 2 + 8 * (i / 4)) instead of calling store_matrix_sync; right on an sm_80 GPU by luck
extern "C" __global__ void assumes_sm80_layout(float* out, const bf16* a, const bf16* b) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b, 16);
    wmma::mma_sync(acc, fa, fb, acc);
    int lane = threadIdx.x % 32;
    for (int i = 0; i < 8; i++) {
        int row = lane / 4 + 8 * ((i / 2) % 2), col = (lane % 4) * 2 + (i % 2) + 8 * (i / 4);
        out[row * 16 + col] = acc.x[i];
    }
}

// only lanes below `callers` reach mma_sync; the others return (how = 0), __syncwarp (1) or __syncthreads (2)
extern "C" __global__ void partial_mma(float* out, const bf16* a, const bf16* b, int callers, int how) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b, 16);
    if ((int)(threadIdx.x % 32) < callers) {
        wmma::mma_sync(acc, fa, fb, acc);
    } else if (how == 0) {
        return;
    } else if (how == 1) {
        __syncwarp();
    } else {
        __syncthreads();
    }
    if ((int)(threadIdx.x % 32) < callers) { wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major); }
}

// warp 1 fills a 16x16 bf16 tile A in dynamic shared memory, warp 0 computes A*A from it; barrier = 0
// leaves out the __syncthreads between them: a race the race checker must name
extern "C" __global__ void tile_handoff(float* out, const bf16* a, int barrier) {
    extern __shared__ __align__(32) unsigned char smem[];
    bf16* tile = reinterpret_cast<bf16*>(smem);
    if (threadIdx.x >= 32) {
        for (int i = threadIdx.x - 32; i < 256; i += 32) { tile[i] = a[i]; }
    }
    if (barrier) { __syncthreads(); }
    if (threadIdx.x < 32) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        wmma::load_matrix_sync(fa, tile, 16);
        wmma::load_matrix_sync(fb, tile, 16);
        wmma::mma_sync(acc, fa, fb, acc);
        wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
    }
}

// a tile at an element offset and a leading dimension, to see the alignment and ldm checks
extern "C" __global__ void load_at(float* out, const bf16* a, int offset, int lda) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + offset, lda);
    float s = 0.0f;
    for (int i = 0; i < fa.num_elements; i++) { s += __bfloat162float(fa.x[i]); }
    out[threadIdx.x] = s;
}

// flush-to-zero: per thread i, out[5i..5i+4] = x[0]*y[0], normal floats whose product is a float subnormal
// (0 under -ftz=true); a subnormal input times x[1] = 1 and plus y[1] = 0 (DAZ reads it as 0; from arrays, so
// the compiler cannot fold them away); the subnormal copied (bits kept); and bf16 arithmetic on the subnormal
// rounded to bf16, which the GPU's bf16 instructions keep
extern "C" __global__ void underflow(float* out, const float* x, const float* y, const float* sub, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    float* o = out + 5 * i;
    o[0] = x[0] * y[0];
    o[1] = sub[0] * x[1];
    o[2] = sub[0] + y[1];
    o[3] = sub[0];
    __nv_bfloat16 h = __float2bfloat16(sub[0]);
    o[4] = __bfloat162float(__hadd(h, h));
}
"""

U = 2.0 ** -24


def bf16_bits(x):
    """float -> bf16 bits, round to nearest even (tests/test_emulator_bf16.py checks the same rounding)."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(u16)


def bf16_values(bits):
    return (np.asarray(bits, u16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def mod():
    return emulator.RawModule(code=SOURCE, options=("--std=c++17",))


def operands(rng, M, N, K, integers):
    if integers:   # small integers: every product and sum is exact in float
        a, b = rng.integers(-4, 5, (M, K)), rng.integers(-4, 5, (K, N))
    else:
        a, b = rng.standard_normal((M, K)), rng.standard_normal((K, N))
    return bf16_bits(a), bf16_bits(b)


def run_gemm(mod, order, M, N, K, layouts, c0=None, scale=1.0, seed=0, integers=False):
    rng = np.random.default_rng(seed)
    a, b = operands(rng, M, N, K, integers)
    a_in = np.ascontiguousarray(a.T) if layouts & 1 else a
    b_in = np.ascontiguousarray(b.T) if layouts & 2 else b
    c_in = None if c0 is None else (np.ascontiguousarray(c0.T) if layouts & 4 else c0).astype(f32)
    out = np.full((N, M) if layouts & 4 else (M, N), np.nan, f32)
    mod.get_function("gemm")(M // 16, 32 * (N // 16), (out, a_in, b_in, c_in, i32(M), i32(N), i32(K),
                                                       i32(layouts), f32(scale)), order=order, guard=True)
    got = out.T if layouts & 4 else out
    A, B = bf16_values(a), bf16_values(b)
    C = 0.0 if c0 is None else c0.astype(np.float64)
    want = (A @ B + C) * scale
    bound = K * U / (1 - K * U) * (np.abs(A) @ np.abs(B) + np.abs(C)) * abs(scale)
    return got.astype(np.float64), want, bound


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("layouts", range(8))
def test_gemm_16x16_every_layout_exact(mod, order, layouts):
    got, want, _ = run_gemm(mod, order, 16, 16, 16, layouts, integers=True)
    assert np.array_equal(got, want)
    assert np.abs(want).max() > 10           # not a trivially zero product


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("layouts", [0, 3, 5, 6])
def test_gemm_32x48_random_within_the_float_bound(mod, order, layouts):
    rng = np.random.default_rng(1)
    c0 = rng.standard_normal((32, 48)).astype(f32)
    got, want, bound = run_gemm(mod, order, 32, 48, 32, layouts, c0=c0, seed=layouts)
    err = np.abs(got - want)
    assert np.all(err <= bound), f"max error {err.max():.3g}, bound there {bound.flat[err.argmax()]:.3g}"
    assert err.max() > 0                     # random inputs do round: the bound is what is tested
    # the same without C0 and with a scale: fill_fragment and the elementwise loop over x[]
    got, want, bound = run_gemm(mod, order, 32, 48, 32, layouts, scale=-0.25, seed=layouts)
    assert np.all(np.abs(got - want) <= bound)


@pytest.mark.parametrize("order", ORDERS)
def test_gemm_from_shared_memory(mod, order):
    rng = np.random.default_rng(2)
    M, N, K = 32, 48, 32
    a, b = operands(rng, M, N, K, integers=True)
    out = np.full((M, N), np.nan, f32)
    mod.get_function("gemm_shared")(M // 16, 32 * (N // 16), (out, a, b, i32(M), i32(N), i32(K)),
                                    order=order, guard=True)
    assert np.array_equal(out, bf16_values(a) @ bf16_values(b))


@pytest.mark.parametrize("order", ORDERS)
def test_elementwise_ops_on_operand_fragments(mod, order):
    rng = np.random.default_rng(3)
    a, b = operands(rng, 16, 16, 16, integers=True)
    out = np.full((16, 16), np.nan, f32)
    mod.get_function("scaled_operands")(1, 32, (out, a, np.ascontiguousarray(b.T)), order=order, guard=True)
    assert np.array_equal(out, 1.5 - 2.0 * (bf16_values(a) @ bf16_values(b)))


@pytest.mark.parametrize("order", ORDERS)
def test_a_kernel_assuming_the_sm80_layout_is_wrong_here(mod, order):
    rng = np.random.default_rng(4)
    a, b = operands(rng, 16, 16, 16, integers=True)
    want = bf16_values(a) @ bf16_values(b)
    out = np.full((16, 16), np.nan, f32)
    mod.get_function("assumes_sm80_layout")(1, 32, (out, a, b), order=order, guard=True)
    assert np.all(np.isfinite(out))                      # it wrote every element once...
    assert np.sort(out, axis=None).tolist() == np.sort(want, axis=None).tolist()   # ...the right values...
    assert np.mean(out != want) > 0.9                    # ...nearly all in the wrong places


def test_the_race_checker_sees_wmma_accesses(mod):
    """Under racecheck=True: a GEMM is clean (its warp steps order the lanes); a shared tile read by
    load_matrix_sync while another warp writes it, with no __syncthreads, is a race."""
    rng = np.random.default_rng(7)
    M, N, K = 32, 48, 32
    a, b = operands(rng, M, N, K, integers=True)
    out = np.full((M, N), np.nan, f32)
    mod.get_function("gemm")(M // 16, 32 * (N // 16), (out, a, b, None, i32(M), i32(N), i32(K), i32(0), f32(1)),
                             racecheck=True)
    assert np.array_equal(out, bf16_values(a) @ bf16_values(b))
    t, _ = operands(rng, 16, 16, 16, integers=True)
    fn = mod.get_function("tile_handoff")
    out = np.full((16, 16), np.nan, f32)
    fn(1, 64, (out, t, i32(1)), shared_mem=512, racecheck=True)
    assert np.array_equal(out, bf16_values(t) @ bf16_values(t))
    with pytest.raises(emulator.RaceError, match=r"race on shared memory"):
        fn(1, 64, (out, t, i32(0)), shared_mem=512, racecheck=True)


def test_traffic_counts_each_tile_once(mod):
    rng = np.random.default_rng(5)
    a, b = operands(rng, 16, 16, 16, integers=True)
    c0 = np.zeros((16, 16), f32)
    out = np.zeros((16, 16), f32)
    with emulator.count_traffic() as launches:
        mod.get_function("gemm")(1, 32, (out, a, b, c0, i32(16), i32(16), i32(16), i32(0), f32(1)))
    (t,) = launches
    assert (t.bytes_read, t.bytes_written) == (512 + 512 + 1024, 1024)   # A, B, C0 read once; C written once
    assert (t.reads, t.writes) == (256 + 256 + 256, 256)                 # element by element, lane by lane


@pytest.mark.parametrize("how,match", [
    (0, r"mma_sync: lane (1[6-9]|2\d|3[01]) of warp 0 has returned"),
    (1, r"mma_sync: lane \d+ of warp 0 (is at another warp operation|has returned)"),   # returned: after the __syncwarp
    (2, r"deadlock"),
])
@pytest.mark.parametrize("order", ORDERS)
def test_mma_sync_by_part_of_a_warp_is_an_error(mod, order, how, match):
    rng = np.random.default_rng(6)
    a, b = operands(rng, 16, 16, 16, integers=True)
    out = np.zeros((16, 16), f32)
    fn = mod.get_function("partial_mma")
    with pytest.raises(RuntimeError, match=match):
        fn(1, 32, (out, a, b, i32(16), i32(how)), order=order)
    fn(1, 32, (out, a, b, i32(32), i32(how)), order=order)      # all 32: fine, and the module still works
    assert np.array_equal(out, bf16_values(a) @ bf16_values(b))


def test_a_block_smaller_than_a_warp_is_an_error(mod):
    a = np.zeros(256, u16)
    out = np.zeros(32, f32)
    match = r"load_matrix_sync: needs all 32 lanes of a warp, but warp 0 has only 16 threads \(the block size 16"
    with pytest.raises(RuntimeError, match=match):
        mod.get_function("load_at")(1, 16, (out, a, i32(0), i32(16)))


def test_misaligned_pointer_and_bad_ldm_are_errors(mod):
    a = np.ones(16 * 40, u16) * u16(0x3F80)
    out = np.zeros(32, f32)
    fn = mod.get_function("load_at")
    fn(1, 32, (out, a, i32(8), i32(24)), guard=True)              # 16 bytes in, ldm 24: allowed
    assert np.all(out == 8.0)
    with pytest.raises(RuntimeError, match=r"load_matrix_sync: the matrix pointer 0x[0-9a-f]+ is not 16-byte aligned"):
        fn(1, 32, (out, a, i32(1), i32(16)), guard=True)
    match = r"load_matrix_sync: ldm 20 \(in elements\) must be a positive multiple of 8"
    with pytest.raises(RuntimeError, match=match):
        fn(1, 32, (out, a, i32(0), i32(20)), guard=True)


def test_unsupported_fragments_do_not_compile():
    for frag in ["wmma::fragment<wmma::matrix_a, 16, 16, 16, float, wmma::row_major>",       # tf32 not here
                 "wmma::fragment<wmma::matrix_a, 32, 8, 16, __nv_bfloat16, wmma::row_major>",  # other shapes
                 "wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16>"]:                 # no layout
        code = ("#include <cuda_bf16.h>\n#include <mma.h>\nusing namespace nvcuda;\n"
                f"extern \"C\" __global__ void k(float* out) {{ {frag} f; wmma::fill_fragment(f, 0.0f); }}\n")
        with pytest.raises(emulator.CompileError, match=r"incomplete type"):
            emulator.RawModule(code=code, options=("--std=c++17",)).get_function("k")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed (CUDA toolkit)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_test_kernels_compile_with_nvcc(tmp_path, arch):
    path = tmp_path / "wmma_selftest.cu"
    path.write_text(SOURCE)
    include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))), "include")
    cmd = ["nvcc", "-c", f"-arch={arch}", "-std=c++17", "-I", include, "-Werror", "all-warnings", str(path),
           "-o", str(tmp_path / "wmma_selftest.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------
# flush-to-zero (emulator.h's FlushToZero): kernels run with FTZ and DAZ, as CuPy compiles them (-ftz=true)

@pytest.mark.parametrize("grid,block", [(1, 32), (64, 256)])     # the caller alone; the pool's threads too
def test_kernels_flush_subnormals_and_numpy_keeps_them(mod, grid, block):
    x, y = np.array([1e-20, 1.0], f32), np.array([1e-20, 0.0], f32)
    sub = np.array([1e-40], f32)                                  # a float subnormal
    assert 0 < x[0] * y[0] < np.finfo(f32).tiny                   # NumPy: the product is a subnormal
    n = grid * block
    out = np.full((n, 5), np.nan, f32)
    mod.get_function("underflow")(grid, block, (out, x, y, sub, i32(n)))
    assert np.all(out[:, 0] == 0) and np.all(out[:, 1] == 0) and np.all(out[:, 2] == 0)   # FTZ, DAZ
    assert np.all(out[:, 3].view(np.uint32) == sub.view(np.uint32)[0])                   # a copy keeps the bits
    two_units = f32(2.0 ** -132)                                  # 1e-40 rounds to one bf16 unit, 2^-133
    assert np.all(out[:, 4] == two_units), out[:3, 4]             # bf16 arithmetic keeps its subnormals
    # this (the calling) thread got its MXCSR back: NumPy still makes and reads subnormals
    assert 0 < x[0] * y[0] < np.finfo(f32).tiny
    assert sub[0] * f32(1) == sub[0] and np.nextafter(f32(0), f32(1)) > 0
