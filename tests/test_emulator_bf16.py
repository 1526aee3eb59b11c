"""The emulator's bf16 (emulator.h): __nv_bfloat16 conversions and arithmetic bit for bit against a NumPy
reference written here, 128-bit packed loads and stores (and the misaligned ones it reports), and the
integer and bit-cast pieces a stochastic-rounding kernel is made of.

bf16 arrays cross into kernels as uint16 arrays of bit patterns. The NumPy reference for float32 -> bf16
is round to nearest, ties to even, on the bits: (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, with every
NaN kept a NaN. Every check runs in the emulator's three thread orders on guarded arrays, as
tests/test_kernels.py does, and the same kernel source is compiled with nvcc for sm_80 and sm_90 to show
it is valid CUDA. Where CuPy sees a GPU the semantic checks run there too (backend "cupy").
"""

import os
import shutil
import subprocess

import numpy as np
import pytest

import emulator
from llmc.cuda_common import ceil_div

from check_kernel import DeviceModule, Emulated, gpu_available

i32, u16, u32 = np.int32, np.uint16, np.uint32
BACKENDS = ["forward", "reverse", "warps"] + (["cupy"] if gpu_available() else [])

SOURCE = r"""
#include <cuda_bf16.h>

typedef __nv_bfloat16 floatX;

// three ways to convert, and a pair: each float of inp to bf16 bits and back
extern "C" __global__ void conversions(unsigned short* bits, unsigned short* bits_rn, unsigned short* bits_ctor,
                                       float* back, float* pair_lo, float* pair_hi, const float* inp, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    float x = inp[i];
    __nv_bfloat16 h = __float2bfloat16(x);
    __nv_bfloat16 c = x;                               // the implicit conversion rounds the same way
    bits[i] = __bfloat16_as_ushort(h);
    bits_rn[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x));
    bits_ctor[i] = __bfloat16_as_ushort(c);
    back[i] = __bfloat162float(h);
    __nv_bfloat162 p = __floats2bfloat162_rn(x, -x);
    pair_lo[i] = __low2float(p);
    pair_hi[i] = __high2float(__bfloat162bfloat162(__ushort_as_bfloat16(__bfloat16_as_ushort(p.y))));
}

// out (n, 8): a+b, a-b, a*b, a/b, __hadd, __hmul, -a, (a += b) *= b;  cmp (n, 6): < <= > >= == !=
extern "C" __global__ void arithmetic(floatX* out, int* cmp, const floatX* a, const floatX* b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    floatX x = a[i], y = b[i];
    floatX* o = out + 8 * i;
    o[0] = x + y; o[1] = x - y; o[2] = x * y; o[3] = x / y;
    o[4] = __hadd(x, y); o[5] = __hmul(x, y); o[6] = -x;
    floatX z = x; z += y; z *= y; o[7] = z;
    int* c = cmp + 6 * i;
    c[0] = x < y; c[1] = x <= y; c[2] = x > y; c[3] = x >= y; c[4] = x == y; c[5] = x != y;
}

// 128-bit packed loads and stores: 8 bf16 per thread in one int4, with a cache hint each way
struct alignas(16) Bf16x8 { __nv_bfloat16 v[8]; };

extern "C" __global__ void copy_packed_bf16(floatX* out, float* sums, const floatX* inp, int n8, int offset) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) { return; }
    Bf16x8 p;
    *reinterpret_cast<int4*>(&p) = __ldcs(reinterpret_cast<const int4*>(inp + offset + 8 * i));
    float s = 0.0f;
    for (int k = 0; k < 8; k++) { s += (k + 1) * __bfloat162float(p.v[k]); }   // weights show the order
    sums[i] = s;
    __stcs(reinterpret_cast<int4*>(out + 8 * i), *reinterpret_cast<int4*>(&p));
}

extern "C" __global__ void copy_packed_float(float* out, const float* inp, int n4, int offset) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) { return; }
    float4 v = __ldg(reinterpret_cast<const float4*>(inp + offset) + i);
    __stcs(reinterpret_cast<float4*>(out) + i, v);
}

// the integer pieces of stochastic rounding: a 32-bit hash that wraps around, bit casts, and rounding
// x to bf16 by adding 16 random bits below the cut and truncating
extern "C" __global__ void hash_and_round(unsigned int* hash, unsigned int* ubits, int* ibits, float* flipped,
                                          floatX* rounded, const float* inp, unsigned int seed, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    unsigned int h = (unsigned int)i * 0x9E3779B1u + seed;
    h ^= h >> 15; h *= 0x85EBCA77u; h ^= h << 7; h += 0xC2B2AE3Du; h = (h << 13) | (h >> 19);
    hash[i] = h;
    unsigned int u = __float_as_uint(inp[i]);
    ubits[i] = u;
    ibits[i] = __float_as_int(inp[i]);
    flipped[i] = __uint_as_float(u ^ 0x80000000u);
    rounded[i] = __ushort_as_bfloat16((unsigned short)((u + (h & 0xFFFFu)) >> 16));
}

extern "C" __global__ void fill(floatX* out, floatX value, int n, int offset) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i + offset] = value; }
}

extern "C" __global__ void copy_bf16(floatX* out, const floatX* inp, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = inp[i]; }
}
"""


# ---------------------------------------------------------------------------------------------
# the NumPy reference

def bf16_bits(x):
    """float32 -> bf16 bit patterns, rounded to nearest even; a NaN stays a NaN (0x7FFF)."""
    x = np.asarray(x, np.float32)
    b = x.view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), u16(0x7FFF), r)


def bf16_to_float(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def is_nan_bits(bits):
    return (np.asarray(bits, np.uint16) & 0x7FFF) > 0x7F80


def assert_same_bf16(got, want, what):
    """Bit for bit, except that any NaN matches any NaN (a GPU's NaN bits are its own)."""
    got, want = np.asarray(got, np.uint16), np.asarray(want, np.uint16)
    nan = is_nan_bits(want)
    assert np.array_equal(is_nan_bits(got), nan), f"{what}: NaN where none expected, or none where one is"
    bad = np.flatnonzero((got != want) & ~nan)
    assert bad.size == 0, (f"{what}: {bad.size} differ, first at {bad[0]}: got {got[bad[0]]:#06x}, "
                           f"want {want[bad[0]]:#06x}")


def test_reference_rounding_itself():
    """The reference against hand-worked cases, so a wrong reference cannot hide a wrong emulator."""
    cases = {0x3F800000: 0x3F80, 0x3F808000: 0x3F80, 0x3F818000: 0x3F82, 0x3F808001: 0x3F81, 0x3F807FFF: 0x3F80,
             0x3FFFFFFF: 0x4000, 0x7F7FFFFF: 0x7F80, 0x00008000: 0x0000, 0x00018000: 0x0002, 0x807FFFFF: 0x8080}
    got = bf16_bits(np.array(list(cases), np.uint32).view(np.float32))
    assert [int(g) for g in got] == list(cases.values())


# the conversion table: float32 bit patterns and what they test
TABLE = np.array([
    0x00000000, 0x80000000, 0x3F800000, 0xC0200000,  # exact: 0, -0, 1, -2.5
    0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # ties: to the even neighbour, down and up, both signs
    0x3F808001, 0x3F807FFF,                          # just above and just below a tie
    0x3FFFFFFF, 0x3FFF8000, 0x407F8000,              # rounding up into the next exponent
    0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,  # bf16's max; below the tie; the tie and FLT_MAX go to inf
    0xFF7FFFFF,                                      # -FLT_MAX -> -inf
    0x00000001, 0x00008000, 0x00018000, 0x00400000,  # float subnormals: to 0, tie to 0, tie up, exact
    0x807FFFFF, 0x00010000, 0x8000FFFF,              # the largest rounds up to the smallest normal; bf16 subnormals
    0x7F800000, 0xFF800000,                          # inf, -inf
    0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF,  # NaNs: quiet, signalling (naive rounding makes it inf),
    0xFF800001,                                      # -NaN (naive rounding wraps it around to 0)
], dtype=np.uint32)


@pytest.fixture(scope="module")
def emu_mod():
    return emulator.RawModule(code=SOURCE, options=("--std=c++17",))


@pytest.fixture(scope="module", params=BACKENDS)
def mod(request, emu_mod):
    if request.param == "cupy":
        import cupy
        return DeviceModule(cupy, cupy.RawModule, SOURCE)
    return Emulated(emu_mod, request.param)            # guarded arrays, this thread order


def launch(mod, name, n, args, block=64):
    mod.get_function(name)(ceil_div(n, block), block, args)


# ---------------------------------------------------------------------------------------------
# conversions, arithmetic, comparisons

def test_float_to_bf16_rounds_to_nearest_even(mod):
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, 2000, dtype=np.uint64).astype(np.uint32)   # every exponent, NaNs too
    x = np.concatenate([TABLE, random_bits]).view(np.float32)
    n = x.size
    bits, bits_rn, bits_ctor = (np.zeros(n, u16) for _ in range(3))
    back, lo, hi = (np.zeros(n, np.float32) for _ in range(3))
    launch(mod, "conversions", n, (bits, bits_rn, bits_ctor, back, lo, hi, x, i32(n)))
    want = bf16_bits(x)
    for got, what in ((bits, "__float2bfloat16"), (bits_rn, "__float2bfloat16_rn"), (bits_ctor, "__nv_bfloat16(x)")):
        assert_same_bf16(got, want, what)
    assert_same_bf16(bf16_bits(back), want, "__bfloat162float")
    nan = np.isnan(x)
    assert np.array_equal(back[~nan].view(np.uint32), bf16_to_float(want)[~nan].view(np.uint32))  # exact, -0 too
    assert np.array_equal(lo[~nan], bf16_to_float(want)[~nan]) and np.all(np.isnan(lo[nan]))
    assert np.array_equal(hi[~nan], -bf16_to_float(want)[~nan]) and np.all(np.isnan(hi[nan]))
    assert list(bits[:4]) == [0x0000, 0x8000, 0x3F80, 0xC020]        # spot checks that need no reference
    assert list(bits[25:27]) == [0x7F80, 0xFF80]


def _bf16_operands(rng, n):
    """Random bf16 values over many scales, plus zeros, infinities, NaN, bf16's max and subnormals."""
    scales = np.float32(2.0) ** rng.integers(-130, 128, n).astype(np.float32)
    with np.errstate(over="ignore"):                              # some overflow to inf: fine
        a = bf16_bits(rng.standard_normal(n).astype(np.float32) * scales)
    special = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F7F, 0x0001, 0x8003, 0x3F80, 0x3F81], np.uint16)
    return np.concatenate([a, special])


def test_bf16_arithmetic_is_float_arithmetic_rounded_once(mod):
    rng = np.random.default_rng(1)
    a = _bf16_operands(rng, 3000)
    b = _bf16_operands(rng, 3000)
    # against a's specials: 0 + 1, -0 + 0, inf + inf, -inf + 1, NaN + 1, max + max (overflows to inf),
    # subnormal sums, and 1 + 2^-8 (a tie: to even 1.0) and (1 + 2^-7) + 2^-8 (a tie: up to even 1 + 2^-6)
    b[-10:] = [0x3F80, 0x0000, 0x7F80, 0x3F80, 0x3F80, 0x7F7F, 0x0001, 0x0003, 0x3B80, 0x3B80]
    n = a.size
    out = np.zeros((n, 8), u16)
    cmp = np.full((n, 6), -1, np.int32)
    launch(mod, "arithmetic", n, (out, cmp, a, b, i32(n)))
    fa, fb = bf16_to_float(a), bf16_to_float(b)
    with np.errstate(all="ignore"):
        want = {0: fa + fb, 1: fa - fb, 2: fa * fb, 3: fa / fb, 4: fa + fb, 5: fa * fb, 6: None,
                7: bf16_to_float(bf16_bits(fa + fb)) * fb}     # z += y rounds before z *= y
    for k, w in want.items():
        if k == 3 and isinstance(mod, DeviceModule):
            continue                                            # a GPU's bf16 division: see emulator/README.md
        w = bf16_bits(w) if k != 6 else a ^ np.uint16(0x8000)   # negation flips the sign bit, NaN included
        assert_same_bf16(out[:, k], w, ["+", "-", "*", "/", "__hadd", "__hmul", "unary -", "+= then *="][k])
    assert list(out[-2:, 0]) == [0x3F80, 0x3F82]
    assert list(out[-8:-4, 0]) == [0x7F80, 0xFF80, out[-6, 0], 0x7F80] and is_nan_bits(out[-6, 0])              # the tie to even, and up from odd 0x3F81
    with np.errstate(invalid="ignore"):
        want_cmp = np.stack([fa < fb, fa <= fb, fa > fb, fa >= fb, fa == fb, fa != fb], axis=1)
    assert np.array_equal(cmp, want_cmp.astype(np.int32))      # NaN: all false except !=


# ---------------------------------------------------------------------------------------------
# 128-bit packed loads and stores

def test_packed_128_bit_copy_of_8_bf16_per_thread(mod):
    n8 = 301                                                  # threads; the last block is partly idle
    rng = np.random.default_rng(2)
    inp = bf16_bits(rng.standard_normal(8 * n8).astype(np.float32))
    out = np.zeros_like(inp)
    sums = np.zeros(n8, np.float32)
    launch(mod, "copy_packed_bf16", n8, (out, sums, inp, i32(n8), i32(0)))
    assert np.array_equal(out, inp)
    vals = bf16_to_float(inp).reshape(n8, 8)
    want = np.zeros(n8, np.float32)
    for k in range(8):                                        # the kernel's order of additions
        want += np.float32(k + 1) * vals[:, k]
    assert np.array_equal(sums, want)                         # element k of the pack is inp[8 i + k]


def test_packed_128_bit_copy_of_float4(mod):
    n4 = 257
    inp = np.random.default_rng(3).standard_normal(4 * n4).astype(np.float32)
    out = np.zeros_like(inp)
    launch(mod, "copy_packed_float", n4, (out, inp, i32(n4), i32(0)))
    assert np.array_equal(out, inp)


@pytest.mark.parametrize("order", ["forward", "reverse", "warps"])
def test_misaligned_packed_access_is_reported(emu_mod, order):
    """An int4/float4 access at an address that is not a multiple of 16 is a launch error on a GPU."""
    n8 = 4
    inp = np.zeros(8 * n8 + 8, u16)
    out = np.zeros(8 * n8, u16)
    sums = np.zeros(n8, np.float32)
    fn = emu_mod.get_function("copy_packed_bf16")
    with pytest.raises(RuntimeError, match=r"block \(0,0,0\) thread \(\d,0,0\): misaligned address: __ldcs of a 16-byte int4 at "
                                           r"0x[0-9a-f]+, which is not a multiple of 16"):
        fn(1, 32, (out, sums, inp, i32(n8), i32(1)), order=order, guard=True)   # 2 bytes off
    f_inp, f_out = np.zeros(4 * n8 + 4, np.float32), np.zeros(4 * n8, np.float32)
    with pytest.raises(RuntimeError, match=r"misaligned address: __ldg of a 16-byte float4"):
        emu_mod.get_function("copy_packed_float")(1, 32, (f_out, f_inp, i32(n8), i32(3)), order=order, guard=True)
    fn(1, 32, (out, sums, inp, i32(n8), i32(8)), order=order, guard=True)      # 16 bytes off: fine
    # and an unguarded NumPy array whose data is 2 bytes past a 16-byte boundary
    raw = np.zeros(8 * n8 + 16, u16)
    skew = (-raw.ctypes.data % 16) // 2 + 1                    # elements to a 16-byte boundary, plus one
    with pytest.raises(RuntimeError, match=r"misaligned address: __stcs of a 16-byte int4"):
        fn(1, 32, (raw[skew:skew + 8 * n8], sums, inp, i32(n8), i32(0)), order=order)


# ---------------------------------------------------------------------------------------------
# stochastic rounding's integer pieces

def test_unsigned_wraparound_bit_casts_and_stochastic_rounding(mod):
    n = 1000
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(n - 4).astype(np.float32),
                        np.array([0.0, -0.0, 1e-40, 3e38], np.float32)])
    seed = u32(0xDEADBEEF)
    hash_, ubits = np.zeros(n, u32), np.zeros(n, u32)
    ibits, flipped, rounded = np.zeros(n, np.int32), np.zeros(n, np.float32), np.zeros(n, u16)
    launch(mod, "hash_and_round", n, (hash_, ubits, ibits, flipped, rounded, x, seed, i32(n)))
    h = np.arange(n, dtype=np.uint32) * u32(0x9E3779B1) + seed   # uint32 arrays wrap as unsigned int does
    h ^= h >> u32(15)
    h *= u32(0x85EBCA77)
    h ^= h << u32(7)
    h += u32(0xC2B2AE3D)
    h = (h << u32(13)) | (h >> u32(19))
    assert np.array_equal(hash_, h)
    assert np.array_equal(ubits, x.view(np.uint32)) and np.array_equal(ibits, x.view(np.int32))
    assert np.array_equal(flipped.view(np.uint32), x.view(np.uint32) ^ u32(0x80000000))
    want = ((x.view(np.uint32).astype(np.uint64) + (h & u32(0xFFFF))) >> 16).astype(np.uint16)
    assert np.array_equal(rounded, want)
    down = x.view(np.uint32) >> u32(16)                        # each result is one of the two neighbours
    assert np.all((rounded == down) | (rounded == down + 1))


# ---------------------------------------------------------------------------------------------
# arguments and guarded bf16 arrays

def test_bf16_arguments(emu_mod):
    fill = emu_mod.get_function("fill")
    assert fill.param_types == ["__nv_bfloat16*", "__nv_bfloat16", "int", "int"]   # floatX is the typedef
    out = np.zeros(10, u16)
    fill(1, 32, (out, u16(0x3FC0), i32(10), i32(0)), guard=True)
    assert np.all(out == 0x3FC0) and np.all(bf16_to_float(out) == 1.5)
    with pytest.raises(TypeError, match=r"argument 1 \(__nv_bfloat16\) expects its bits as np.uint16, got np.float32"):
        fill(1, 32, (out, np.float32(1.5), i32(10), i32(0)))
    with pytest.raises(TypeError, match=r"expects its bits as np.uint16, got Python float"):
        fill(1, 32, (out, 1.5, i32(10), i32(0)))
    with pytest.raises(TypeError, match=r"argument 0 \(__nv_bfloat16\*\) expects a uint16 array of bf16 bits"):
        fill(1, 32, (np.zeros(10, np.float32), u16(0), i32(10), i32(0)))
    with pytest.raises(TypeError, match=r"argument 1 \(const __nv_bfloat16\*\) expects a uint16 array"):
        emu_mod.get_function("copy_bf16")(1, 32, (out, np.zeros(10, np.int16), i32(10)))


def test_ml_dtypes_bfloat16_arrays_are_accepted(emu_mod):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([1.0, -2.5, 3.0], ml_dtypes.bfloat16)
    out = np.zeros(3, ml_dtypes.bfloat16)
    emu_mod.get_function("copy_bf16")(1, 32, (out, x, i32(3)), guard=True)
    assert np.array_equal(out.view(u16), x.view(u16))
    emu_mod.get_function("fill")(1, 32, (out, ml_dtypes.bfloat16(0.5), i32(3), i32(0)))
    assert np.all(out.astype(np.float32) == 0.5)


@pytest.mark.parametrize("order", ["forward", "reverse", "warps"])
def test_guarded_bf16_arrays(emu_mod, order):
    fill = emu_mod.get_function("fill")
    out = np.zeros(10, u16)
    with pytest.raises(RuntimeError, match=r"wrote past the end of argument 0 \(__nv_bfloat16\*, 10 elements\)"):
        fill(1, 32, (out, u16(0x3F80), i32(10), i32(1)), order=order, guard=True)
    with pytest.raises(RuntimeError, match=r"wrote before the start of argument 0"):
        fill(1, 32, (out, u16(0x7FFF), i32(10), i32(-1)), order=order, guard=True)   # even a NaN write shows
    big = np.zeros(12, u16)
    emu_mod.get_function("copy_bf16")(1, 32, (big, np.arange(9, dtype=u16), i32(10)), order=order, guard=True)
    assert np.array_equal(big[:9], np.arange(9)) and big[9] == 0xFFFF and np.isnan(bf16_to_float(big[9]))


# ---------------------------------------------------------------------------------------------
# the same source is CUDA

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed (CUDA toolkit)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_test_kernels_compile_with_nvcc(tmp_path, arch):
    path = tmp_path / "bf16_selftest.cu"
    path.write_text(SOURCE)
    cmd = ["nvcc", "--ptx", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings", str(path), "-o", os.devnull]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
