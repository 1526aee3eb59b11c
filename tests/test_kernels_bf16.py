"""The kernels of kernels/*.cu built with -DENABLE_BF16 (floatX = __nv_bfloat16), on the CPU emulator.

bf16 keeps 8 significant bits (7 stored): its unit roundoff is u = 2^-8, so a float rounded to nearest
bf16 is within u |x| of itself, and its spacing is at most 2^-7 |x|, so a stochastic rounding (either
neighbour) is within 2u |x|. Every check reads bf16 inputs (uint16 bit arrays), computes the reference
in float64 from the SAME rounded values, and allows, on top of the fp32 tolerance e of the fp32 check,
one rounding of the stored result: |got - want| <= e (1 + r) + r |want| with r = u for a store (an
accumulate `+=` into a bf16 gradient is one rounding of the sum too), r = 2u where the kernel rounds
stochastically. fp32 results (LayerNorm's mean and rstd, losses, AdamW's m, v and master weights, norm
partials) keep their fp32 tolerances.

1. Every kernel against its NumPy twin: dev/check_kernel.py's launches (train_gpt2.py's layers, as
   `check_kernel.py --precision bf16` runs them) at a small shape with C a multiple of 8 (128-bit
   packed loads hold 8 bf16), in the emulator's three thread orders on guarded arrays.
2. What those do not show: the encoder backward's and AdamW's stochastic rounding (each result one of
   the two bf16 neighbours of the exact float32 value, the same bits for the same seed), AdamW without
   master weights, GELU's backward and the classifier in place.
3. common.cuh's stochastic_round itself, on a small test kernel: deterministic, unbiased, exact values
   kept, and a plain store in an fp32 build.
"""

import os
import shutil

import numpy as np
import pytest

import emulator
import train_gpt2 as tg
from llmc.cuda_common import KERNEL_DIR, ceil_div, kernel_source
from llmc.formats import bf16_to_f32, f32_to_bf16

import check_kernel
from check_kernel import Emulated, close, floatx_args, copy_back, rand, recorded_launches, run_launches, tolerance

i32, i64, f32, u32 = np.int32, np.int64, np.float32, np.uint32
U = 2.0 ** -8                                         # bf16's unit roundoff
BF16 = ("--std=c++17", "-DENABLE_BF16")
ORDERS = ["forward", "reverse", "warps"]
SMALL = check_kernel.Shape(B=2, T=16, C=64, NH=4, V=101, Vp=128, maxT=16, n_params=20_008, floatx="bf16")
FILES = sorted(check_kernel.LAUNCHES)


@pytest.fixture(scope="module")
def sources():
    return {f: kernel_source(f) for f in FILES}


@pytest.fixture(scope="module")
def bf16_mods(sources):
    return {f: emulator.RawModule(code=code, options=BF16) for f, code in sources.items()}


def bits(x):
    return f32_to_bf16(np.asarray(x, np.float32))


def wide(b):
    return bf16_to_f32(np.asarray(b, np.uint16))


def neighbours(x):
    """The two bf16 bit patterns around each float32 x: the one toward zero (the high half of its bits)
    and the next one away from zero; equal when x is a bf16 value already."""
    down = (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    exact = (np.asarray(x, np.float32).view(np.uint32) & 0xFFFF) == 0
    return down, np.where(exact, down, down + np.uint16(1))


# ---------------------------------------------------------------------------------------------
# 1. every kernel against its NumPy twin

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("file", FILES)
def test_kernel_file_against_numpy_twins(bf16_mods, sources, file, order):
    mod = Emulated(bf16_mods[file], order)
    launches = check_kernel.LAUNCHES[file](SMALL, np.random.default_rng(1), reference=True)
    checked = set()
    for lc in launches:
        args, back = floatx_args(sources[file], lc.kernel, lc.args, "bf16")
        mod.get_function(lc.kernel)(lc.grid, lc.block, args, shared_mem=lc.shared_mem)
        copy_back(back)
        for o in lc.outputs:
            got = o.got() if callable(o.got) else o.got
            atol, rtol = tolerance(sources[file], lc.kernel, o, "bf16")
            close(got, o.want, atol, rtol)
            checked.add(lc.kernel)
    assert checked == set(check_kernel.kernels_in(sources[file])), "every kernel of the file is checked"


def test_bf16_tolerances_are_one_rounding():
    """The widening itself: a floatX output gets u (2u if stochastic), an fp32 one none, a permute stays exact."""
    code = kernel_source("layernorm")
    out = check_kernel.Output("out", None, None, "", 1e-5, 1e-5)
    assert tolerance(code, "layernorm_forward_kernel", out, "bf16") == pytest.approx((1e-5 * (1 + U), 1e-5 * (1 + U) + U))
    mean = check_kernel.Output("mean", None, None, "", 1e-6, 1e-6)
    assert tolerance(code, "layernorm_forward_kernel", mean, "bf16") == (1e-6, 1e-6)
    code = kernel_source("encoder")
    dwte = check_kernel.Output("dwte", None, None, "", 1e-5)
    assert tolerance(code, "encoder_backward_wte_kernel", dwte, "bf16")[1] == 2 * U


# ---------------------------------------------------------------------------------------------
# 2. stochastic rounding in the kernels, and the in-place launches

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("C", [64, 264])   # 264: a full block of 256 channels, then one with 8 of its threads busy
def test_encoder_backward_rounds_stochastically(bf16_mods, order, C):
    mod = Emulated(bf16_mods["encoder"], order)
    B, T, Vp = 2, 16, 32
    rng = np.random.default_rng(2)
    inp = rng.integers(0, 7, size=(B, T)).astype(np.int32)
    inp.flat[::3] = 5                                  # one heavy bucket
    dout, dwte0, dwpe0 = bits(rand(rng, B, T, C)), bits(rand(rng, Vp, C)), bits(rand(rng, T, C))

    def backward(seed):                               # encoder_backward's launches, the per-element wpe kernel
        dwte, dwpe = dwte0.copy(), dwpe0.copy()
        run_launches(mod, recorded_launches(lambda cu: cu.encoder_backward(dwte, dwpe, dout, inp, B, T, C, seed=seed),
                                            packed=False))
        return dwte, dwpe

    dwte, dwpe = backward(7)
    # the float32 sums in the kernels' order: a token's positions in increasing order; b = 0, 1, ...
    sum_wte = wide(dwte0)
    np.add.at(sum_wte, inp, wide(dout))
    sum_wpe = wide(dwpe0)
    for b in range(B):
        sum_wpe = sum_wpe + wide(dout)[b]
    for got, exact in ((dwte, sum_wte), (dwpe, sum_wpe)):
        down, up = neighbours(exact)
        assert np.all((got == down) | (got == up)), "each result is one of the two neighbours of the float32 sum"
        assert np.any((got == up) & (down != up)) and np.any((got == down) & (down != up))  # both happen
    want_wte, want_wpe = wide(dwte0).astype(np.float64), wide(dwpe0).astype(np.float64)
    tg.encoder_backward(want_wte, want_wpe, wide(dout).astype(np.float64), inp, B, T, C)
    close(wide(dwte), want_wte, atol=1e-5 * (1 + 2 * U), rtol=2 * U)   # the NumPy layer, within one spacing
    close(wide(dwpe), want_wpe, atol=1e-5 * (1 + 2 * U), rtol=2 * U)
    again = backward(7)
    assert dwte.tobytes() == again[0].tobytes() and dwpe.tobytes() == again[1].tobytes(), "same seed, same bits"
    other = backward(8)
    assert dwte.tobytes() != other[0].tobytes() and dwpe.tobytes() != other[1].tobytes(), "another seed differs"


def _adamw_step(mod, params, master, grads, m, v, t, seed):
    lr, b1, b2, eps, wd, scale = 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5
    n = params.size                                   # one row of n: the row strides unused
    run_launches(mod, recorded_launches(lambda cu: cu.adamw_update(params, master, grads, m, v, n, n, 1, lr, b1, b2,
                                                                   1 - b1 ** t, 1 - b2 ** t, eps, wd, scale, seed)))
    return lambda w, g, m0, v0: (w - lr * ((b1 * m0 + (1 - b1) * g * scale) / (1 - b1 ** t)
                                           / (np.sqrt((b2 * v0 + (1 - b2) * (g * scale) ** 2) / (1 - b2 ** t)) + eps)
                                           + wd * w))


@pytest.mark.parametrize("order", ORDERS)
def test_adamw_with_and_without_master_weights(bf16_mods, order):
    mod = Emulated(bf16_mods["adamw"], order)
    n = 4000
    rng = np.random.default_rng(3)
    master = rand(rng, n)
    params, grads = bits(master), bits(rand(rng, n))
    m, v = rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))
    m0, v0, master0, params0 = m.copy(), v.copy(), master.copy(), params.copy()
    update = _adamw_step(mod, params, master, grads, m, v, t=3, seed=11)
    g = wide(grads).astype(np.float64)
    want = update(master0.astype(np.float64), g, m0.astype(np.float64), v0.astype(np.float64))
    # the master copy: the fp32 update of the fp32 weight, within fp32's rounding of the float64 formula
    close(master, want, atol=1e-6, rtol=1e-6)
    down, up = neighbours(master)                     # params: one of the two bf16 neighbours of the master
    assert np.all((params == down) | (params == up)) and np.any(params != bits(master))   # not always nearest
    again_p, again_master = params0.copy(), master0.copy()
    _adamw_step(mod, again_p, again_master, grads, m0.copy(), v0.copy(), t=3, seed=11)
    assert again_p.tobytes() == params.tobytes() and again_master.tobytes() == master.tobytes()
    other = params0.copy()
    _adamw_step(mod, other, master0.copy(), grads, m0.copy(), v0.copy(), t=3, seed=12)
    assert other.tobytes() != params.tobytes(), "another seed rounds differently somewhere"

    # without master weights (NULL: None on the emulator) the weight before the step is the bf16 parameter
    p = params0.copy()
    m2, v2 = m0.copy(), v0.copy()
    update = _adamw_step(mod, p, None, grads, m2, v2, t=3, seed=11)
    want = update(wide(params0).astype(np.float64), g, m0.astype(np.float64), v0.astype(np.float64))
    close(wide(p), want, atol=1e-6 * (1 + 2 * U), rtol=1e-6 * (1 + 2 * U) + 2 * U)
    assert m2.tobytes() == m.tobytes() and v2.tobytes() == v.tobytes()   # the moments do not depend on the weight


@pytest.mark.parametrize("order", ORDERS)
def test_gelu_backward_and_classifier_in_place(bf16_mods, order):
    rng = np.random.default_rng(4)
    N = 1024
    inp, dout = bits(rand(rng, N, scale=3.0)), bits(rand(rng, N))
    gelu = Emulated(bf16_mods["gelu"], order)
    dinp = np.full(N, 0xFFFF, np.uint16)
    run_launches(gelu, recorded_launches(lambda cu: cu.gelu_backward(dinp, inp, dout, N), packed=False))
    inplace = dout.copy()                             # llm.c runs it in place on its scratch buffer
    run_launches(gelu, recorded_launches(lambda cu: cu.gelu_backward(inplace, inp, inplace, N), packed=False))
    assert np.array_equal(inplace, dinp)
    want = np.zeros(N)
    tg.gelu_backward(want, wide(inp).astype(np.float64), wide(dout).astype(np.float64), N)
    close(wide(dinp), want, atol=1e-6 * (1 + U), rtol=1e-5 * (1 + U) + U)

    B, T, V, Vp = 2, 8, 101, 128
    logits = bits(rand(rng, B, T, Vp, scale=4.0))
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    x = wide(logits).astype(np.float64)
    probs, w_losses, w_dlogits = np.zeros((B, T, Vp)), np.zeros((B, T)), np.zeros((B, T, Vp))
    tg.softmax_forward(probs, x, B, T, V, Vp)         # float64 log-softmax of the bf16 logits
    tg.crossentropy_forward(w_losses, probs, targets, B, T, Vp)
    tg.crossentropy_softmax_backward(w_dlogits, np.full((B, T), 1.0 / (B * T)), probs, targets, B, T, V, Vp)
    classifier = Emulated(bf16_mods["classifier"], order)
    losses = np.full((B, T), np.nan, np.float32)
    y = logits.copy()
    for write_dlogits in (0, 1):                      # the plain kernel, as fused_classifier launches it
        run_launches(classifier, recorded_launches(lambda cu: cu.fused_classifier(
            y, losses, None, targets, B, T, V, Vp, write_dlogits), packed=False))
        if not write_dlogits:
            assert np.array_equal(y, logits)          # forward only: the logits stay
            close(losses, w_losses, atol=1e-5, rtol=1e-6)   # fp32 losses: fp32's tolerance
    close(wide(y), w_dlogits, atol=1e-7 * (1 + U), rtol=1e-5 * (1 + U) + U)   # dlogits in place, rounded once
    assert np.all(y[..., V:] == 0)


# ---------------------------------------------------------------------------------------------
# 3. common.cuh's stochastic_round

ROUND_TEST = r"""
#include "common.cuh"

extern "C" __global__ void round_copies(floatX* out, const float* inp, int n, unsigned int seed) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    stochastic_round(inp[i], &out[i], seed);
}

extern "C" __global__ void round_copies_2d(floatX* out, const float* inp, int n, unsigned int seed) {
    // the same on a 2-D grid: block row blockIdx.y rounds elements [blockIdx.y * n, (blockIdx.y + 1) * n)
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    stochastic_round(inp[blockIdx.y * n + i], &out[blockIdx.y * n + i], seed);
}
"""


@pytest.fixture(scope="module")
def round_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("round")
    shutil.copy(os.path.join(KERNEL_DIR, "common.cuh"), folder / "common.cuh")
    (folder / "round_test.cu").write_text(ROUND_TEST)
    return kernel_source("round_test", kernel_dir=str(folder))


@pytest.fixture(scope="module")
def round_mods(round_source):
    return {p: emulator.RawModule(code=round_source, options=opts)
            for p, opts in (("bf16", BF16), ("fp32", ("--std=c++17",)))}


def run_round(mods, precision, inp, seed, order="forward", block=256):
    out = np.zeros(inp.size, np.uint16 if precision == "bf16" else np.float32)
    mods[precision].get_function("round_copies")(ceil_div(inp.size, block), block, (out, inp, i32(inp.size), u32(seed)),
                                                 order=order, guard=True)
    return out


@pytest.mark.parametrize("order", ORDERS)
def test_stochastic_round_is_deterministic_and_exact_values_stay(round_mods, order):
    rng = np.random.default_rng(5)
    x = rand(rng, 8192)
    a, b = run_round(round_mods, "bf16", x, 99, order), run_round(round_mods, "bf16", x, 99, order)
    assert a.tobytes() == b.tobytes(), "same seed and launch: the same bits"
    assert a.tobytes() != run_round(round_mods, "bf16", x, 100, order).tobytes(), "another seed: other bits somewhere"
    down, up = neighbours(x)
    assert np.all((a == down) | (a == up))
    exact = wide(bits(x))                             # values that are bf16 already are never moved
    exact[:4] = [0.0, -0.0, 1.0, -2.5]
    for seed in (1, 2, 3):
        assert np.array_equal(run_round(round_mods, "bf16", exact, seed, order), bits(exact))


def test_stochastic_round_is_unbiased(round_mods):
    """n copies of a value 1/4 of the way from one bf16 to the next: the upper one with probability 1/4.
    The count of ups is Binomial(n, 1/4), std sqrt(n/4 * 3/4) = 0.0034 n for n = 16384; allowing 5 std
    (0.017) would fail a fair rounding about once in 2 million runs, and catches round-to-nearest (0)
    as well as a rounding biased by more than 1.7 points. Every thread gets its own noise (its position
    in the launch), so the copies are independent draws."""
    n = 16384
    quarter = np.float32(1.0 + 2.0 ** -7 / 4)          # bf16 spacing at 1 is 2^-7
    for value, p in ((quarter, 0.25), (-quarter, 0.25), (np.float32(3.0 + 3 * 2.0 ** -6 / 4), 0.75)):
        out = run_round(round_mods, "bf16", np.full(n, value, np.float32), seed=2024)
        down, up = neighbours(np.float32(value))
        assert np.all((out == down) | (out == up))
        freq = np.mean(out == up)
        std = np.sqrt(p * (1 - p) / n)
        assert abs(freq - p) <= 5 * std, f"{value}: rounded away from zero {freq:.4f} of the time, expected {p}"


@pytest.mark.parametrize("axis", ["x", "y"])
def test_stochastic_round_blocks_draw_independently(round_mods, axis):
    """Halfway between two bf16 values each copy goes up with probability 1/2, so two blocks of 256 threads
    that draw independently agree on about half of their threads' directions (std 1/32 of the 256), and on
    all of them if the blocks shared their draws (a noise that ignored the block). Every pair of 32 blocks,
    along x and along y (AdamW's multi-tensor launch runs its tensors' blocks along y)."""
    block, nblocks = 256, 32
    halfway = np.full(block * nblocks, np.float32(1.0 + 2.0 ** -8), np.float32)   # bf16 spacing at 1: 2^-7
    if axis == "x":
        out = run_round(round_mods, "bf16", halfway, seed=77, block=block)
    else:
        out = np.zeros(halfway.size, np.uint16)
        round_mods["bf16"].get_function("round_copies_2d")((1, nblocks), block,
                                                            (out, halfway, i32(block), u32(77)), guard=True)
    down, up = neighbours(halfway)
    assert np.all((out == down) | (out == up))
    went_up = (out == up).reshape(nblocks, block)
    agree = (went_up[:, None, :] == went_up[None, :, :]).mean(axis=-1)[~np.eye(nblocks, dtype=bool)]
    # 6 std from 1/2 for the worst of the 496 pairs: a fair launch fails about once in a million runs
    assert agree.max() <= 0.5 + 6 / 32 and abs(agree.mean() - 0.5) < 0.02, (agree.max(), agree.mean())
    assert abs(went_up.mean() - 0.5) < 6 * np.sqrt(0.25 / halfway.size), went_up.mean()


def test_stochastic_round_in_fp32_is_a_plain_store(round_mods):
    x = rand(np.random.default_rng(6), 1000)
    assert np.array_equal(run_round(round_mods, "fp32", x, 5).view(np.uint32), x.view(np.uint32))
