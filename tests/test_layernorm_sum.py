"""The second half of the LayerNorm backward, dweight/dbias (C) += the per-block partials in scratch
(num_blocks, 2, C) summed over the blocks, on the CPU emulator.

kernels/layernorm.cu has two ways to take it (see its header):
  - plain: layernorm_backward_sum_kernel, one thread per channel adding the blocks 0, 1, ... in order;
  - GPU-filling: layernorm_backward_sum_split_kernel, one block per pack of 4 columns of the (2, C) rows,
    its threads splitting the rows (thread t: rows t, t + block, ... in order, 128-bit loads, 4 in
    flight), each warp's lanes added by warp_sum's xor butterfly, then the warps in order.
Both are deterministic: every float is added in an order fixed by the launch shape. So each is checked
  1. bit for bit against a NumPy model of that order (float32 additions, one at a time, as the kernel
     does them; bf16: the final float sum rounded to nearest even), in the emulator's three thread orders
     on guarded arrays;
  2. against the float64 sum (what train_gpt2.py's layernorm_backward adds up), within the error of an fp32
     sum whose additions form chains of at most DEPTH (Higham: |err| <= DEPTH u32 (|acc| + sum|x|)), plus
     one rounding of the result to floatX (u = 2^-24 in fp32, 2^-8 in bf16). DEPTH is num_blocks + 1 for
     the plain kernel and ceil(num_blocks/block) + 5 + warps + 1 (<= 18 at num_blocks = 1024) for the split
     one; the two kernels' orders differ, so they agree within the sum of their two bounds, not bitwise
     (an fp32 split sum is ~1e-7 relative off the plain one: see the print of the largest difference);
  3. twice from the same inputs: the same bits.
Shapes: num_blocks = 1, 3, 17, 300, 1024 (d12's grid) by C = 4, 8, 48, 768, fp32 and bf16 (scratch is float
in both); C = 6 is not a multiple of 4, so train_gpt2_cuda.layernorm_backward takes the plain kernel there,
which the launcher test checks, with the split kernel's grid at GPT-2 124M's shape.
"""

import numpy as np
import pytest

import emulator
from llmc.cuda_common import ceil_div, kernel_source
from llmc.formats import bf16_to_f32, f32_to_bf16
from test_cuda_trainer import cuda_trainer  # noqa: F401 (fixture)

from check_kernel import Emulated, close, launch_trainer, rand, recorded_launches, run_launches

i32 = np.int32
OPTIONS = {"fp32": ("--std=c++17",), "bf16": ("--std=c++17", "-DENABLE_BF16")}
UNIT = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8}        # unit roundoff of the stored dweight/dbias
SHAPES = [(n, C) for n in (1, 3, 17, 300, 1024) for C in (4, 8, 48, 768)]
ORDERS = ["forward", "reverse", "warps"]
SPLIT_BLOCK = launch_trainer().LAYERNORM_SUM_BLOCK    # the split sum's threads per block


@pytest.fixture(scope="module")
def modules():
    code = kernel_source("layernorm")
    return {p: emulator.RawModule(code=code, options=options) for p, options in OPTIONS.items()}


def as_floatx(x, precision):
    return x if precision == "fp32" else f32_to_bf16(x)


def as_float(x):
    return bf16_to_f32(x).reshape(x.shape) if x.dtype == np.uint16 else x


def plain_order(acc, partials):
    """layernorm_backward_sum_kernel's bits: acc (2C,) + the rows of partials (n, 2C) added one by one."""
    total = np.zeros(partials.shape[1], np.float32)
    for row in partials:
        total += row
    return np.float32(acc + total)


def split_order(acc, partials, block=SPLIT_BLOCK):
    """layernorm_backward_sum_split_kernel's bits: thread t adds rows t, t + block, ... in order; each warp's
    32 sums meet in warp_sum's butterfly (lane k adds lane k ^ offset's value, offsets 16 .. 1: a + b is
    b + a in IEEE, so every lane holds the same bits, lane 0's go on); the warps' sums in warp order."""
    n, cols = partials.shape
    per_thread = np.zeros((block, cols), np.float32)
    for first in range(0, n, block):                  # one row per thread at a time: the same sequence per thread
        chunk = partials[first:first + block]
        per_thread[:len(chunk)] += chunk
    lanes = per_thread.reshape(block // 32, 32, cols)
    for offset in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[:, np.arange(32) ^ offset]
    total = np.zeros(cols, np.float32)
    for w in range(block // 32):
        total += lanes[w, 0]
    return np.float32(acc + total)


def depth(path, n, block=SPLIT_BLOCK):
    return n + 1 if path == "plain" else ceil_div(n, block) + 5 + block // 32 + 1


def run(mod, path, dweight, dbias, scratch, n, C):
    """The sum layernorm_backward launches after a rows kernel of n blocks (one row of T = n * rows per block),
    as the launcher makes it: the split one where the rows are not x128's but scratch is packable (its
    arrays off a 16-byte boundary), else the plain one. The rows kernel is not run: scratch is given."""
    rows = np.zeros(1, dweight.dtype)                 # the rows kernel's arrays: not read here
    T = n * launch_trainer().LAYERNORM_BACKWARD_BLOCK // 32
    packed = (lambda m, *arrays: arrays[0] is scratch) if path == "split" else False
    [_, total] = recorded_launches(lambda cu: cu.layernorm_backward(rows, dweight, dbias, scratch, rows, rows, rows,
                                                                    rows, rows, 1, T, C), packed=packed)
    assert total.kernel == ("layernorm_backward_sum_split_kernel" if path == "split" else
                            "layernorm_backward_sum_kernel") and total.args[3] == n
    run_launches(mod, [total])


def expected_bits(want_f32, precision):
    return want_f32 if precision == "fp32" else f32_to_bf16(want_f32)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sum_bits_and_float64(modules, precision, order):
    mod = Emulated(modules[precision], order)
    rng = np.random.default_rng(22)
    worst = 0.0
    for n, C in SHAPES:
        scratch = rand(rng, n, 2, C)
        dweight0, dbias0 = as_floatx(rand(rng, C), precision), as_floatx(rand(rng, C), precision)
        acc = np.concatenate([as_float(dbias0), as_float(dweight0)])      # the (2, C) row's order: dbias, dweight
        rows = scratch.reshape(n, 2 * C)
        want64 = acc.astype(np.float64) + rows.astype(np.float64).sum(0)
        magnitude = np.abs(acc).astype(np.float64) + np.abs(rows).astype(np.float64).sum(0)
        got = {}
        for path in ("plain", "split"):
            results = []
            for _ in range(2):                            # twice: the same bits
                dweight, dbias = dweight0.copy(), dbias0.copy()
                run(mod, path, dweight, dbias, scratch, n, C)
                results.append(np.concatenate([dbias, dweight]))
            where = f"{precision} {path} num_blocks={n} C={C} ({order})"
            assert results[0].tobytes() == results[1].tobytes(), f"{where}: two runs differ"
            model = plain_order(acc, rows) if path == "plain" else split_order(acc, rows)
            want_bits = expected_bits(model, precision)
            diff = np.flatnonzero(results[0] != want_bits)
            assert diff.size == 0, (f"{where}: {diff.size} columns off the NumPy model of the order, first {diff[0]}: "
                                    f"got {as_float(results[0])[diff[0]]}, want {as_float(want_bits)[diff[0]]}")
            close(as_float(results[0]), want64, depth(path, n) * 2.0 ** -24 * magnitude, UNIT[precision])
            got[path] = as_float(results[0]).astype(np.float64)
        # plain vs split: both within their bounds of the float64 sum, so of each other within the two
        bound = (depth("plain", n) + depth("split", n)) * 2.0 ** -24 * magnitude
        close(got["split"], got["plain"], bound, 2 * UNIT[precision])
        if precision == "fp32":
            worst = max(worst, float(np.max(np.abs(got["split"] - got["plain"]) / magnitude)))
    if precision == "fp32":
        print(f"largest |split - plain| / sum|x| (fp32, {order}): {worst:.2e}")


def test_launcher_and_its_grid(cuda_trainer):  # noqa: F811 (fixture)
    """train_gpt2_cuda.layernorm_backward where its x128 one-launch kernel cannot run (C not a multiple of the
    pack: 12 and 6 in bf16, 6 in fp32; tests/test_layernorm_x128.py has the rest): the split sum where C is a
    multiple of 4, else the plain one (the bits tell which ran); at d12 B=16 T=1024 the split kernel's grid
    covers an H100's 132 SMs twice over."""
    cu = cuda_trainer
    rng = np.random.default_rng(6)
    B, T = 2, 40                                      # 80 rows: 5 LayerNorm blocks of 16 rows
    for precision, Cs in (("fp32", (6,)), ("bf16", (12, 6))):
        for C in Cs:
            inp, dout = as_floatx(rand(rng, B, T, C), precision), as_floatx(rand(rng, B, T, C), precision)
            weight = as_floatx(rand(rng, C), precision)
            x = as_float(inp).astype(np.float64)
            mean = x.mean(-1).astype(np.float32)
            rstd = (1 / np.sqrt(x.var(-1) + 1e-5)).astype(np.float32)
            dinp = as_floatx(np.zeros((B, T, C), np.float32), precision)
            dweight0, dbias0 = as_floatx(rand(rng, C), precision), as_floatx(rand(rng, C), precision)
            dweight, dbias = dweight0.copy(), dbias0.copy()
            scratch = np.full(cu.layernorm_scratch_size(B, T, C), np.nan, np.float32)
            cu.layernorm_backward(dinp, dweight, dbias, scratch, dout, inp, weight, mean, rstd, B, T, C)
            grid = ceil_div(32 * B * T, cu.LAYERNORM_BACKWARD_BLOCK)
            rows = scratch[:grid * 2 * C].reshape(grid, 2 * C)   # the partials the first kernel wrote
            acc = np.concatenate([as_float(dbias0), as_float(dweight0)])
            model = split_order(acc, rows, cu.LAYERNORM_SUM_BLOCK) if C % 4 == 0 else plain_order(acc, rows)
            got = np.concatenate([dbias, dweight])
            assert got.tobytes() == expected_bits(model, precision).tobytes(), (precision, C)
    B, T, C = 16, 1024, 768
    grid = ceil_div(32 * B * T, cu.LAYERNORM_BACKWARD_BLOCK)
    assert grid == 1024 and grid >= 4 * 132                 # layernorm_backward_kernel: ~2 waves of 4 blocks/SM
    assert 2 * C // 4 == 384 >= 2 * 132                     # the split sum: one block per pack of 4 columns
