"""The packed (x128) elementwise kernels and the fused residual + LayerNorm forward, checked without a GPU.

Each is a faster twin of kernels that tests/test_kernels.py checks against the NumPy layers, so here
each is checked against its twin, BIT FOR BIT, on the CPU emulator, in fp32 and in bf16 (compiled with
-DENABLE_BF16; bf16 arrays are uint16 bit patterns), in the emulator's three thread orders, on guarded
arrays (a write out of bounds raises, a read out of bounds reads NaN):
  - encoder_forward / residual_forward / gelu_forward / gelu_backward (also in place) / add_bias:
    the *_packed_kernel (one thread per 8 bf16 or 4 floats) == the per-element kernel;
  - fused_residual_layernorm_forward_kernel == residual_forward_kernel then layernorm_forward_kernel
    (residual, normed, mean and rstd; also in place and with NULL mean/rstd);
  - a 128-bit access needs a 16-byte aligned address: the emulator raises "misaligned address" when a
    packed kernel gets a pointer that is not (and takes one that is a whole pack further);
  - the whole model: train_gpt2_cuda's gpt2_forward + gpt2_backward (packed launchers and fused
    residual + LayerNorm) give the same loss, logits, activations and gradients, bit for bit, as the
    same functions with every launcher forced to its per-element kernel and every fused pair split back
    into residual_forward + layernorm_forward (the code before the change), in fp32 and bf16; and with an
    odd T, whose (B,NH,T,T) attention tensors leave later activations off a 16-byte boundary in bf16,
    the launchers fall back to the per-element kernels there and still agree. (The bias backward's
    GPU-filling pair is no bit twin of the plain kernel: both runs take it; tests/test_matmul_bias.py.)
"""

import os

import numpy as np
import pytest

import emulator
from check_kernel import recorded_launches
from conftest import emulated_cuda_trainer
from test_cuda_trainer import random_params
from llmc.model import GPT2Config
from llmc.cuda_common import ceil_div, kernel_source
from llmc.formats import bf16_to_f32, f32_to_bf16

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
i32 = np.int32
FILES = ("encoder", "gelu", "residual", "matmul", "layernorm")
ORDERS = ("forward", "reverse", "warps")
PRECISIONS = ("fp32", "bf16")
DTYPE = {"fp32": np.float32, "bf16": np.uint16}       # what a floatX* argument takes
PACK = {"fp32": 4, "bf16": 8}                          # x128::size: 16 bytes of floatX


@pytest.fixture(scope="module")
def modules():
    """{(precision, file): emulator module}, compiled once (g++, cached on disk)."""
    out = {}
    for precision in PRECISIONS:
        options = ("--std=c++17",) + (("-DENABLE_BF16",) if precision == "bf16" else ())
        for file in FILES:
            out[(precision, file)] = emulator.RawModule(code=kernel_source(file), options=options)
    return out


def launcher(modules, precision, order, guard=True):
    def fn(file, name):
        f = modules[(precision, file)].get_function(name)
        return lambda grid, block, args: f(grid, block, args, order=order, guard=guard)
    return fn


def run(modules, precision, order, file, call, packed, block=None):
    """call(cu) on train_gpt2_cuda.py's launchers, their launches run guarded in `order`: the per-element
    kernel (packed False) or its 128-bit twin (True). block given: the launcher's threads in blocks of that
    size instead of its 256 (these kernels take any), so that the last block is partly idle."""
    fn = launcher(modules, precision, order)
    for lc in recorded_launches(call, packed=packed):
        assert ("_packed_kernel" in lc.kernel or "x128" in lc.kernel) == packed, lc.kernel
        if block is not None:
            lc.grid, lc.block = ceil_div(lc.grid * lc.block, block), block
        fn(file, lc.kernel)(lc.grid, lc.block, lc.args)


def floatx(precision, x):
    """A float32 array as the kernels' floatX: itself, or its bf16 bits (rounded to nearest even)."""
    x = np.asarray(x, dtype=np.float32)
    return f32_to_bf16(x) if precision == "bf16" else x


def nans(precision, *shape):
    return floatx(precision, np.full(shape, np.nan, np.float32))


def assert_bits_equal(got, want, what):
    """The same bits (NaN patterns included): float32 compared as uint32, bf16 as its uint16."""
    got, want = np.ascontiguousarray(got), np.ascontiguousarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    as_int = {np.dtype(np.float32): np.uint32, np.dtype(np.uint16): np.uint16}[got.dtype]
    diff = got.view(as_int) != want.view(as_int)
    assert not diff.any(), f"{what}: {diff.sum()} of {diff.size} elements differ, first at {np.argwhere(diff)[0]}"


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# packed kernels == per-element kernels

B, T, C, Vp = 3, 5, 48, 64            # C and every N below are multiples of 8, the bf16 pack


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_packed_elementwise_kernels_equal_their_per_element_twins(modules, precision, order):
    rng = np.random.default_rng(0)

    def packed_in_place(file, call):                 # the packed twin, blocks of 64
        run(modules, precision, order, file, call, True, block=64)

    def both(file, call, fresh):
        """call(cu, out) on a fresh output, for the per-element kernel and for its packed twin; both outputs.
        Blocks of 64, so that the grids cover the elements with a partly idle last block (the bounds checks)."""
        results = []
        for packed in (False, True):
            out = fresh()
            run(modules, precision, order, file, lambda cu: call(cu, out), packed, block=64)
            results.append(out)
        return results

    # encoder: out (B,T,C) = wte[inp] + wpe[t]
    wte, wpe = floatx(precision, rand(rng, Vp, C)), floatx(precision, rand(rng, T + 3, C))
    inp = rng.integers(0, Vp, size=(B, T)).astype(np.int32)
    inp.flat[::2] = 7                                            # repeats: the same wte row many times
    one, packed = both("encoder", lambda cu, out: cu.encoder_forward(out, inp, wte, wpe, B, T, C),
                       lambda: nans(precision, B, T, C))
    assert_bits_equal(packed, one, "encoder_forward")
    assert not np.isnan(bf16_to_f32(one) if precision == "bf16" else one).any()

    # residual: out = a + b, and in place (a += b)
    N = 1000
    a, b = floatx(precision, rand(rng, N)), floatx(precision, rand(rng, N, scale=1e-2))  # small b: rounding matters
    one, packed = both("residual", lambda cu, out: cu.residual_forward(out, a, b, N), lambda: nans(precision, N))
    assert_bits_equal(packed, one, "residual_forward")
    acc = a.copy()
    packed_in_place("residual", lambda cu: cu.residual_forward(acc, acc, b, N))
    assert_bits_equal(acc, one, "residual_forward packed in place")

    # gelu forward and backward (written; in place with dinp == dout)
    x = rand(rng, N, scale=3.0)
    x[:4] = [0.0, 20.0, -20.0, 60.0]                             # coshf overflows at 60: the gradient stays finite
    x, dout = floatx(precision, x), floatx(precision, rand(rng, N))
    one, packed = both("gelu", lambda cu, out: cu.gelu_forward(out, x, N), lambda: nans(precision, N))
    assert_bits_equal(packed, one, "gelu_forward")
    one, packed = both("gelu", lambda cu, out: cu.gelu_backward(out, x, dout, N), lambda: nans(precision, N))
    assert_bits_equal(packed, one, "gelu_backward")
    inplace = dout.copy()
    packed_in_place("gelu", lambda cu: cu.gelu_backward(inplace, x, inplace, N))
    assert_bits_equal(inplace, one, "gelu_backward packed in place (dinp == dout)")

    # add_bias: out (N,OC) += bias, OC a multiple of 8 but not of 32
    rows, OC = B * T, 40
    out0, bias = floatx(precision, rand(rng, rows, OC)), floatx(precision, rand(rng, OC))
    one, packed = both("matmul", lambda cu, out: cu.add_bias(out, bias, rows, OC), out0.copy)
    assert_bits_equal(packed, one, "add_bias")


# ---------------------------------------------------------------------------------------------
# fused residual + LayerNorm == residual_forward then layernorm_forward

@pytest.mark.parametrize("block", [None, 32])     # None: the launchers' 256; 32: a warp per block, as many rows
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_residual_layernorm_equals_the_two_launches(modules, precision, order, block):
    rng = np.random.default_rng(1)
    N, C = 13, 72                                                # C not a multiple of 32: lanes do unequal work
    row_scale = np.logspace(-2, 1, N).reshape(N, 1)              # variances near eps too
    inp1 = floatx(precision, (rand(rng, N, C) + 2.0) * row_scale)
    inp2 = floatx(precision, rand(rng, N, C, scale=0.1) * row_scale)
    weight, bias = floatx(precision, rand(rng, C)), floatx(precision, rand(rng, C))

    def plain(file, call, block=block):              # the per-element (plain) kernels
        run(modules, precision, order, file, call, False, block)

    residual, normed = nans(precision, N, C), nans(precision, N, C)
    mean, rstd = np.full(N, np.nan, np.float32), np.full(N, np.nan, np.float32)
    plain("residual", lambda cu: cu.residual_forward(residual, inp1, inp2, N * C), None)
    plain("layernorm", lambda cu: cu.layernorm_forward(normed, mean, rstd, residual, weight, bias, 1, N, C))

    fused = [nans(precision, N, C), nans(precision, N, C), np.full(N, np.nan, np.float32),
             np.full(N, np.nan, np.float32)]
    plain("layernorm", lambda cu: cu.fused_residual_forward(*fused, inp1, inp2, weight, bias, 1, N, C))
    for got, want, what in zip(fused, (residual, normed, mean, rstd), ("residual", "normed", "mean", "rstd")):
        assert_bits_equal(got, want, what)

    # in place (residual is inp1, as a += b), and without mean and rstd (NULL)
    acc, normed2 = inp1.copy(), nans(precision, N, C)
    plain("layernorm", lambda cu: cu.fused_residual_forward(acc, normed2, None, None, acc, inp2, weight, bias, 1, N, C))
    assert_bits_equal(acc, residual, "residual, in place")
    assert_bits_equal(normed2, normed, "normed, in place and without mean/rstd")


# ---------------------------------------------------------------------------------------------
# the alignment a 128-bit access needs

def misaligned(n, dtype, elements_off):
    """An unguarded array of n elements whose data starts elements_off elements past a 16-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n + 32, dtype)
    start = (-raw.ctypes.data % 16) // itemsize + elements_off   # the first 16-byte boundary, then the offset
    out = raw[start:start + n]
    assert out.ctypes.data % 16 == (elements_off * itemsize) % 16
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_packed_kernels_need_16_byte_aligned_pointers(modules, precision):
    """One element off a 16-byte boundary (2 bytes in bf16, 4 in fp32) is a "misaligned address" on a
    GPU and here; a whole pack off (16 bytes) is fine. train_gpt2_cuda's launchers check it first."""
    dtype, pack = DTYPE[precision], PACK[precision]
    N = 64
    a, b = floatx(precision, np.ones(N)), floatx(precision, np.ones(N))
    for order in ORDERS:
        residual = modules[(precision, "residual")].get_function("residual_forward_packed_kernel")
        with pytest.raises(RuntimeError, match=r"misaligned address: __stcg of a 16-byte int4"):
            residual(1, 32, (misaligned(N, dtype, 1), a, b, i32(N)), order=order)
        gelu = modules[(precision, "gelu")].get_function("gelu_forward_packed_kernel")
        with pytest.raises(RuntimeError, match=r"misaligned address: __ldcs of a 16-byte int4"):
            gelu(1, 32, (np.zeros(N, dtype), misaligned(N, dtype, 1), i32(N)), order=order)
        out = misaligned(N, dtype, pack)                          # 16 bytes off: aligned
        residual(1, 32, (out, a, b, i32(N)), order=order)
        assert_bits_equal(out, floatx(precision, np.full(N, 2.0)), "aligned at a whole pack")


# ---------------------------------------------------------------------------------------------
# the whole model: the new launchers == the per-element, unfused path, bit for bit

CONFIG = GPT2Config(max_seq_len=32, vocab_size=101, num_layers=2, num_heads=2, channels=32,
                    padded_vocab_size=128)


@pytest.fixture(scope="module")
def cu():
    """train_gpt2_cuda with LLMC_EMULATE=1, as a module object of its own (as tests/test_cuda_trainer.py)."""
    return emulated_cuda_trainer("train_gpt2_cuda_fused")


def tiny_params(seed=0):
    return random_params(CONFIG, seed)   # test_cuda_trainer's GPT-2-like weights


def one_step(cu, precision, B, T, recompute, dlogits_in_forward=False):
    """gpt2_forward + gpt2_backward on a fresh model: (loss, logits after the forward, all activations
    after the backward, all gradients), and the kernels launched."""
    launched = []
    kernel = cu.kernel

    def recording_kernel(file, name, floatx=np.float32):
        launched.append(name)
        return kernel(file, name, floatx)

    cu.kernel = recording_kernel
    try:
        model = cu.GPT2(CONFIG, tiny_params(), recompute=recompute, precision=precision)
        model.dlogits_in_forward = dlogits_in_forward
        rng = np.random.default_rng(5)
        tokens = rng.integers(0, CONFIG.vocab_size, size=B * T + 1).astype(np.int32)
        x, y = tokens[:-1].reshape(B, T), tokens[1:].reshape(B, T)
        cu.gpt2_zero_grad(model)
        cu.gpt2_forward(model, x, y, B, T)
        logits = np.array(model.acts.logits)
        cu.gpt2_backward(model)
    finally:
        cu.kernel = kernel
    return (model.mean_loss, logits, np.array(model.acts_memory), np.array(model.acts_fp32_memory),
            np.array(model.grads_memory), launched)


def as_new(cu, name):
    """The launcher `name` as in the new path, whatever `packable` says. Three launchers take a GPU-filling
    kernel that is no bit twin of their plain one, as it adds in another fixed order: matmul_backward_bias
    (column sums per block row into a scratch, then added in block order; tests/test_matmul_bias.py),
    layernorm_backward (its split sum of the partials; tests/test_layernorm_sum.py) and fused_classifier
    (the x128 kernel's per-pack softmax sums; tests/test_classifier_x128.py); and the x128 LayerNorm kernels
    (layernorm_forward, layernorm_backward: a lane sums packs, not every 32nd element) and wpe backward
    (encoder_backward: bf16's noise per element; tests/test_layernorm_x128.py). Both runs here take the same one."""
    launcher, packable = getattr(cu, name), cu.packable

    def as_in_the_new_path(*args, **kwargs):
        forced, cu.packable = cu.packable, packable
        try:
            launcher(*args, **kwargs)
        finally:
            cu.packable = forced
    return as_in_the_new_path


ORDER_CHANGING = ("matmul_backward_bias", "layernorm_backward", "fused_classifier", "layernorm_forward",
                  "encoder_backward")


def unfused_residual_forward(cu):
    """The code before the fusion: residual_forward, then layernorm_forward on what it stored."""
    def fused_residual_forward(residual, normed, mean, rstd, inp1, inp2, weight, bias, B, T, C):
        cu.residual_forward(residual, inp1, inp2, B * T * C)
        cu.layernorm_forward(normed, mean, rstd, residual, weight, bias, B, T, C)
    return fused_residual_forward


@pytest.mark.parametrize("precision, B, T, recompute", [("fp32", 2, 8, 1), ("bf16", 2, 8, 1), ("bf16", 2, 8, 2),
                                                        ("fp32", 1, 5, 0), ("bf16", 1, 5, 1)])
def test_whole_model_is_bit_identical_to_the_per_element_unfused_path(cu, monkeypatch, precision, B, T, recompute):
    new = one_step(cu, precision, B, T, recompute)
    with monkeypatch.context() as patch:
        for name in ORDER_CHANGING:
            patch.setattr(cu, name, as_new(cu, name))
        patch.setattr(cu, "packable", lambda n, *arrays: False)       # every launcher: its per-element kernel
        patch.setattr(cu, "fused_residual_forward", unfused_residual_forward(cu))
        old = one_step(cu, precision, B, T, recompute)
    names = ("logits", "activations", "activation statistics", "gradients")
    assert new[0] == old[0], f"loss {new[0]} != {old[0]}"
    for got, want, what in zip(new[1:5], old[1:5], names):
        assert_bits_equal(got, want, what)
    assert 3.0 < new[0] < 8.0

    # the comparison is between two different paths: the new one fused and packed, the old one neither
    L = CONFIG.num_layers
    assert len([k for k in new[5] if k.startswith("fused_residual_layernorm_forward")]) == 2 * L  # plain or x128
    assert len([k for k in new[5] if k.startswith("layernorm_forward")]) == 1 + (2 * L if recompute >= 2 else 0)
    assert "residual_forward_kernel" not in new[5] and "residual_forward_packed_kernel" not in new[5]
    assert not any(k.endswith("_packed_kernel") or k.startswith("fused_residual") for k in old[5])
    packed = set(k for k in new[5] if k.endswith("_packed_kernel"))
    # in bf16 no bias kernel runs: matmul_forward puts the bias in first and the GEMM adds onto it (one rounding)
    bias = set() if precision == "bf16" else {"add_bias_packed_kernel"}
    if precision == "bf16" and T == 5:
        # the attention probabilities (L,B,NH,T,T) are 100 bf16, 200 bytes: every activation after them
        # in the flat buffer (and the scratch buffer, last) is 8 bytes off a 16-byte boundary, so every
        # launch that touches one falls back to its per-element kernel; the encoder's, before it, is packed
        assert packed == {"encoder_forward_packed_kernel"}
        assert {"gelu_forward_kernel", "gelu_backward_kernel"} <= set(new[5])
    else:
        assert packed == {"encoder_forward_packed_kernel", "gelu_forward_packed_kernel",
                          "gelu_backward_packed_kernel"} | bias
        assert not {"gelu_forward_kernel", "gelu_backward_kernel", "add_bias_kernel"} & set(new[5])
    assert ("add_bias_kernel" in new[5] or "add_bias_packed_kernel" in new[5]) == (precision == "fp32")
    # the bias backward took the same path in both, launch by launch (its GPU-filling pair where dout is on
    # a 16-byte boundary: everywhere at T = 8)
    bias_backward = [[k for k in run[5] if k.startswith("matmul_backward_bias")] for run in (new, old)]
    assert bias_backward[0] == bias_backward[1]
    assert T != 8 or "matmul_backward_bias_kernel" not in bias_backward[0]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_dlogits_in_the_forward_pass_gives_the_same_gradients(cu, precision):
    """model.dlogits_in_forward: the forward's classifier launch writes dlogits too (llm.c's one launch
    per micro-step) and the backward skips its own; the loss, activations and gradients are the same bits."""
    B, T = 2, 8
    once = one_step(cu, precision, B, T, 1, dlogits_in_forward=True)
    twice = one_step(cu, precision, B, T, 1)
    assert once[0] == twice[0]
    for got, want, what in zip(once[2:5], twice[2:5], ("activations", "activation statistics", "gradients")):
        assert_bits_equal(got, want, what)
    classifier = [[k for k in run[5] if k.startswith("fused_classifier")] for run in (once, twice)]
    assert classifier == [["fused_classifier_x128_kernel"], ["fused_classifier_x128_kernel"] * 2]   # Vp = 128
    V = CONFIG.vocab_size                     # after the forward, the logits buffer held dlogits: rows sum to 0
    dlogits = bf16_to_f32(once[1]) if precision == "bf16" else once[1]
    assert np.all(dlogits[:, :, V:] == 0) and np.abs(dlogits[:, :, :V].sum(-1)).max() < 1e-3
    assert not np.allclose(dlogits, bf16_to_f32(twice[1]) if precision == "bf16" else twice[1])
