"""The bias gradient of the linear layer, dbias (OC) += dout (N,OC) summed over rows, on the CPU emulator.

kernels/matmul.cu has two ways to take it (see its header):
  - plain: matmul_backward_bias_kernel, 32 columns per 1024-thread block, its warps splitting the rows;
  - GPU-filling: matmul_backward_bias_partial_kernel (rows AND columns split across blocks, 128-bit loads,
    column sums per block row in fp32 into a scratch buffer), then matmul_backward_bias_sum_kernel (the
    block rows' partials added in a fixed order, added into dbias, rounded once to floatX).
Both are deterministic: every float is added in an order fixed by the launch shape. So each is checked
  1. bit for bit against a NumPy model of that order (float32 additions, one at a time, as the kernel
     does them; bf16: the final sum rounded to nearest even), in the emulator's three thread orders on
     guarded arrays, with a NaN-filled scratch (a partial read before it is written would show);
  2. against the NumPy twin, train_gpt2.py's matmul_backward, in float64, within the error of an fp32
     sum whose additions form chains of at most DEPTH = 80 (Higham: |err| <= DEPTH u32 sum|x|; the chains
     here, with the add into dbias: plain N/32 + 32 + 1 <= 65 at N = 1000, packed R/8 + 8 + row_blocks/32
     + 32 + 1 <= 74 at R = 250 rows per block row), plus one rounding of the result to floatX (u = 2^-24
     in fp32, 2^-8 in bf16);
  3. twice from the same inputs: the same bits.
The one-launch kernel, matmul_backward_bias_x128_kernel (the partial kernel's blocks, then the last block of each
column block, found by a ticket counter, adds the partials in the sum kernel's order), is held to the pair's NumPy
model bit for bit, in every thread order (whichever block comes last), and must leave its counters at 0.
Shapes: N = 1, 7, 33, 1000 rows by OC = 8, 32, 40, 768 columns, fp32 and bf16; OC = 40 in bf16 is not
a multiple of the pack (8 bf16), so train_gpt2_cuda.matmul_backward_bias takes the plain kernel there,
which the launcher test checks, together with its grid at GPT-2 124M's shapes.
"""

import numpy as np
import pytest

import emulator
import train_gpt2 as tg
from llmc.cuda_common import ceil_div, kernel_source
from llmc.formats import bf16_to_f32, f32_to_bf16
from test_cuda_trainer import cuda_trainer  # noqa: F401 (fixture)

from check_kernel import Emulated, Launch, close, launch_trainer, rand, recorded_launches, run_launches

i32 = np.int32
OPTIONS = {"fp32": ("--std=c++17",), "bf16": ("--std=c++17", "-DENABLE_BF16")}
PACK = {"fp32": 4, "bf16": 8}                         # x128::size: floatX per 128-bit load
UNIT = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8}        # unit roundoff of the stored dbias
DEPTH = 80
SHAPES = [(N, OC) for N in (1, 7, 33, 1000) for OC in (8, 32, 40, 768)]
ORDERS = ["forward", "reverse", "warps"]


@pytest.fixture(scope="module")
def modules():
    code = kernel_source("matmul")
    return {p: emulator.RawModule(code=code, options=options) for p, options in OPTIONS.items()}


def as_floatx(x, precision):
    """float32 values -> what the kernel takes: float32, or bf16 bits (uint16) rounded to nearest even."""
    return x if precision == "fp32" else f32_to_bf16(x)


def as_float(x):
    return bf16_to_f32(x).reshape(x.shape) if x.dtype == np.uint16 else x


def column_sums(x, warps, rows=None):
    """The kernels' column sum in float32, addition by addition: warp w adds rows w, w + warps, ... in
    order, then the warps' sums are added in warp order. x (n, OC) float32 -> (OC,) float32."""
    n = x.shape[0]
    per_warp = np.zeros((warps, x.shape[1]), np.float32)
    for first in range(0, n, warps):                  # one row per warp at a time: the same sequence per warp
        chunk = x[first:first + warps]
        per_warp[:len(chunk)] += chunk
    total = np.zeros(x.shape[1], np.float32)
    for w in range(warps):
        total += per_warp[w]
    return total


def plain_order(dbias, dout):
    """matmul_backward_bias_kernel's bits (1024-thread blocks: 32 warps)."""
    return np.float32(dbias + column_sums(dout, 32))


def packed_order(dbias, dout, rows_per_block, block=256):
    """matmul_backward_bias_partial_kernel (block/32 warps per block row of rows_per_block rows), then
    matmul_backward_bias_sum_kernel (1024 threads: 32 warps over the block rows' partials)."""
    partials = np.stack([column_sums(dout[y:y + rows_per_block], block // 32)
                         for y in range(0, dout.shape[0], rows_per_block)])
    return np.float32(dbias + column_sums(partials, 32))


def expected_bits(want_f32, precision):
    return want_f32 if precision == "fp32" else f32_to_bf16(want_f32)


def run_plain(mod, dbias, dout, N, OC):
    """matmul_backward_bias without a scratch: the plain kernel, as the launcher makes it."""
    run_launches(mod, recorded_launches(lambda cu: cu.matmul_backward_bias(dbias, None, dout, N, OC)))


def x128_launch(dbias, dout, N, OC, rows_per_block=None):
    """(matmul_backward_bias's x128 launch, its scratch): partials NaN, the ticket counters at its end 0, as the
    trainer's zero-allocated scratch. rows_per_block given: that many rows per block row instead of
    matmul_bias_grid's (the kernel takes any), the launch otherwise the launcher's."""
    columns, row_blocks, R = launch_trainer().matmul_bias_grid(N, OC, 16 // dout.itemsize)
    rows = row_blocks if rows_per_block is None else ceil_div(N, rows_per_block)
    scratch = np.full(max(rows, row_blocks) * OC + columns, np.nan, np.float32)
    scratch[-columns:] = 0
    [lc] = recorded_launches(lambda cu: cu.matmul_backward_bias(dbias, scratch, dout, N, OC), packed=True)
    assert lc.kernel == "matmul_backward_bias_x128_kernel" and lc.grid == (columns, row_blocks)
    if rows_per_block is not None:
        lc.grid, lc.args = (columns, rows), lc.args[:-1] + (i32(rows_per_block),)
    return lc, scratch, rows_per_block or R


def run_packed(mod, dbias, dout, N, OC, rows_per_block=None):
    """The pair the one-launch kernel fuses (the trainer runs only that one): the partial kernel on the x128
    launch's grid, block and shared memory, then the sum on the plain kernel's shape. Returns the rows per
    block row."""
    one, scratch, R = x128_launch(dbias, dout, N, OC, rows_per_block)
    [plain] = recorded_launches(lambda cu: cu.matmul_backward_bias(dbias, None, dout, N, OC))
    row_blocks = one.grid[1]
    partials = scratch[:row_blocks * OC]                 # every partial is written before it is read
    run_launches(mod, [
        Launch("matmul_backward_bias_partial_kernel", one.grid, one.block,
               (partials, dout, i32(N), i32(OC), i32(R)), one.shared_mem),
        Launch("matmul_backward_bias_sum_kernel", plain.grid, plain.block,
               (dbias, partials, i32(row_blocks), i32(OC)), plain.shared_mem)])
    return R


def run_one_launch(mod, dbias, dout, N, OC, rows_per_block=None):
    """matmul_backward_bias_x128_kernel: the partials and, by the last block of each column block, their sum,
    in one launch. The counters start at 0 and must be left at 0; the partials start as NaN."""
    lc, scratch, R = x128_launch(dbias, dout, N, OC, rows_per_block)
    run_launches(mod, [lc])
    counters = scratch[-lc.grid[0]:].view(np.uint32)
    assert not counters.any(), f"counters left at {counters}"
    return R


def twin_tolerance(dbias0, dout, precision):
    """|got - want| allowed against the float64 twin: an fp32 sum of chains < DEPTH additions, then one
    rounding to floatX."""
    total = np.abs(dbias0).astype(np.float64) + np.abs(dout).astype(np.float64).sum(0)
    return DEPTH * 2.0 ** -24 * total, UNIT[precision]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bias_backward_bits_and_twin(modules, precision, order):
    mod = Emulated(modules[precision], order)
    pack = PACK[precision]
    rng = np.random.default_rng(14)
    for N, OC in SHAPES:
        dout = as_floatx(rand(rng, N, OC), precision)
        dbias0 = as_floatx(rand(rng, OC), precision)       # nonzero: the kernels add into it
        x, b = as_float(dout), as_float(dbias0)
        # the NumPy twin, in float64 (its dinp, dweight on a small C are not looked at)
        w_dbias, C = b.astype(np.float64), 3
        tg.matmul_backward(np.zeros((1, N, C)), np.zeros((OC, C)), w_dbias, x.astype(np.float64)[None],
                           np.zeros((1, N, C)), np.zeros((OC, C)), 1, N, C, OC)
        atol, rtol = twin_tolerance(b, x, precision)
        # packed: the launcher's grid (32 rows per block row at these N), and 250 rows per block row,
        # so that each warp takes several 4-row steps and a tail (the kernel takes any rows_per_block)
        paths = ["plain"] + (["packed", 250, "one launch", ("one launch", 250)] if OC % pack == 0 else [])
        for path in paths:
            results = []
            for _ in range(2):                               # twice: the same bits
                dbias = dbias0.copy()
                if path == "plain":
                    run_plain(mod, dbias, dout, N, OC)
                    want_bits = expected_bits(plain_order(b, x), precision)
                elif path == "one launch" or isinstance(path, tuple):   # the pair's order, so its bits
                    rows_per_block = run_one_launch(mod, dbias, dout, N, OC, None if path == "one launch" else path[1])
                    want_bits = expected_bits(packed_order(b, x, rows_per_block), precision)
                else:
                    rows_per_block = run_packed(mod, dbias, dout, N, OC, None if path == "packed" else path)
                    want_bits = expected_bits(packed_order(b, x, rows_per_block), precision)
                results.append(dbias)
            where = f"{precision} {path if path == 'plain' else f'{path} R={rows_per_block}'} N={N} OC={OC} ({order})"
            assert results[0].tobytes() == results[1].tobytes(), f"{where}: two runs differ"
            diff = np.flatnonzero(results[0] != want_bits)
            assert diff.size == 0, (f"{where}: {diff.size} columns off the NumPy model of the order, first {diff[0]}: "
                                    f"got {as_float(results[0])[diff[0]]}, want {as_float(want_bits)[diff[0]]}")
            close(as_float(results[0]), w_dbias, atol, rtol)


def test_launcher_and_its_grid(cuda_trainer):  # noqa: F811 (fixture)
    """train_gpt2_cuda.matmul_backward_bias: the packed path where OC is a multiple of the pack and a
    scratch is given, else the plain kernel (the bits tell which ran); and at d12 B=16 T=1024 a grid of
    >= 4 x 132 blocks (an H100's SMs several times over) that matmul_bias_scratch_size covers."""
    cu = cuda_trainer
    rng = np.random.default_rng(5)
    for precision in ("fp32", "bf16"):
        pack = PACK[precision]
        for N, OC in [(1000, 768), (33, 40), (7, 36)]:
            dout = as_floatx(rand(rng, N, OC), precision)
            dbias0 = as_floatx(rand(rng, OC), precision)
            x, b = as_float(dout), as_float(dbias0)
            scratch = np.full(cu.matmul_bias_scratch_size(1, N, OC, dout.dtype), np.nan, np.float32)
            counters = cu.matmul_bias_counters(scratch, ceil_div(OC, 32 * pack))
            counters[...] = 0                                # as the zero-allocated scratch of the trainer
            dbias = dbias0.copy()
            cu.matmul_backward_bias(dbias, scratch, dout, N, OC)
            assert not counters.any()                        # left at 0 for the next launch
            if OC % pack == 0:
                want = packed_order(b, x, cu.matmul_bias_grid(N, OC, pack)[2])
            else:
                want = plain_order(b, x)
            assert dbias.tobytes() == expected_bits(want, precision).tobytes(), (precision, N, OC)
            dbias = dbias0.copy()                            # no scratch: the plain kernel
            cu.matmul_backward_bias(dbias, None, dout, N, OC)
            assert dbias.tobytes() == expected_bits(plain_order(b, x), precision).tobytes(), (precision, N, OC)
        B, T, C = 16, 1024, 768
        floatx = np.float32 if precision == "fp32" else np.uint16
        for OC in (C, 3 * C, 4 * C):
            columns, row_blocks, rows_per_block = cu.matmul_bias_grid(B * T, OC, pack)
            assert columns * row_blocks >= 4 * 132, (precision, OC, columns, row_blocks)
            assert rows_per_block % 32 == 0 and (row_blocks - 1) * rows_per_block < B * T <= row_blocks * rows_per_block
            assert row_blocks * OC + columns <= cu.matmul_bias_scratch_size(B, T, C, floatx)
