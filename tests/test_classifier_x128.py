"""The fused classifier read and written in 128-bit packs, on the CPU emulator.

kernels/classifier.cu has two kernels with the same outputs (see its header):
  - plain: fused_classifier_kernel, one floatX load per thread per step of both passes;
  - fused_classifier_x128_kernel: 128-bit packs (8 bf16 or 4 floats), four loads in flight per thread,
    a running max and sum updated once per pack, dlogits stored a pack at a time. It needs Vp a multiple
    of the pack and the logits 16-byte aligned; V need not be one: the last real pack's pad columns are
    skipped in the softmax and get a zero gradient, as do the pad-only packs after it.
The x128 kernel adds the softmax's exponentials in another order than the plain one, so the two are not
bit-identical. What is checked, in fp32 and bf16, in the emulator's three thread orders on guarded arrays,
for write_dlogits 0 and 1, with dlosses NULL (1/(B*T)) and given:
  1. deterministic: the same launch twice gives the same bits;
  2. against the plain kernel, with these tolerances (u = 2^-24). Both compute the same max (exact) and a
     sum S of V exponentials in fp32 whose relative error is O(depth u) in the worst case and ~1 u in
     practice; the loss is log S - (x_t - max), so
       losses: |x128 - plain| <= 4 ulp(loss) + 16 u (the absolute term for losses near 0, where log S's
               error, ~ S's relative error, is what is left); the largest difference seen is printed
               (1 ulp in fp32 at these shapes);
       dlogits: each is (p - [target]) * dloss with p = exp(x - max) / S, p differing by S's relative
               error: fp32 |x128 - plain| <= 8 u (|plain| + |dloss|); bf16: that, plus one bf16 step
               (2^-7 |plain|), as the two floats may round to neighbouring bf16 values;
     the pad columns are exactly 0 in both, and with write_dlogits = 0 the logits are untouched;
  3. against the NumPy twin (train_gpt2.py's softmax_forward, crossentropy_forward,
     crossentropy_softmax_backward in float64) with dev/check_kernel.py's tolerances (losses 1e-5 + 1e-6
     |want|; dlogits 1e-7 + 1e-5 |want|, bf16 widened by one rounding, 2^-8).
Shapes (rows = B*T, V, Vp): V = 101 in Vp = 128 with 1, 3 and 17 rows; V = 5 and V = 1, less than one
pack, in Vp = 8; V = 96 = Vp (no pad at all); V = 50257 in Vp = 50304 (GPT-2) with 3 rows. Logits of
scale 4 with the pad columns at 1e3 (read by the last real pack, they must be skipped), targets at the
first and last real column, and one target 100 below its row's max (under -ftz=true its exp is 0: the
loss must stay finite, which the log-sum-exp form guarantees). The launcher test checks that
train_gpt2_cuda.fused_classifier takes the x128 kernel exactly when packable(Vp, logits).
"""

import numpy as np
import pytest

import emulator
import train_gpt2 as tg
from llmc.cuda_common import kernel_source
from llmc.formats import bf16_to_f32, f32_to_bf16
from test_cuda_trainer import cuda_trainer  # noqa: F401 (fixture)

from check_kernel import Emulated, close, rand, recorded_launches, run_launches

i32 = np.int32
OPTIONS = {"fp32": ("--std=c++17",), "bf16": ("--std=c++17", "-DENABLE_BF16")}
U32 = 2.0 ** -24
BF16_STEP = 2.0 ** -7                                 # bf16 spacing relative to the value (at most)
SHAPES = [(1, 101, 128), (3, 101, 128), (17, 101, 128), (3, 5, 8), (2, 1, 8), (2, 96, 96), (3, 50257, 50304)]
ORDERS = ["forward", "reverse", "warps"]
KERNELS = ("fused_classifier_kernel", "fused_classifier_x128_kernel")


@pytest.fixture(scope="module")
def modules():
    code = kernel_source("classifier")
    return {p: emulator.RawModule(code=code, options=options) for p, options in OPTIONS.items()}


def as_float(x):
    return bf16_to_f32(x).reshape(x.shape) if x.dtype == np.uint16 else x


def inputs(rng, rows, V, Vp, precision):
    """logits (1, rows, Vp) as the kernel takes them (float32 or bf16 bits), targets (1, rows) int32,
    dlosses (1, rows) float32."""
    logits = rand(rng, 1, rows, Vp, scale=4.0)
    logits[..., V:] = 1e3                             # pad columns: never part of the softmax
    targets = rng.integers(0, V, size=(1, rows)).astype(np.int32)
    targets.flat[0] = 0
    if rows > 1:
        targets.flat[1] = V - 1                       # first and last real column
    if rows > 2 and V > 1:
        r = logits[0, 2]
        r[targets.flat[2]] = r[:V].max() - 100.0      # a target far below the max
    if precision == "bf16":
        logits = f32_to_bf16(logits)
    return logits, targets, rand(rng, 1, rows)


def twin(logits, targets, dlosses, rows, V, Vp):
    """float64 losses (1, rows) and dlogits (1, rows, Vp) of train_gpt2.py's layers."""
    probs, losses, dlogits = np.zeros((1, rows, Vp)), np.zeros((1, rows)), np.zeros((1, rows, Vp))
    tg.softmax_forward(probs, as_float(logits).astype(np.float64), 1, rows, V, Vp)
    tg.crossentropy_forward(losses, probs, targets, 1, rows, Vp)
    dl = np.full((1, rows), 1.0 / rows) if dlosses is None else dlosses.astype(np.float64)
    tg.crossentropy_softmax_backward(dlogits, dl, probs, targets, 1, rows, V, Vp)
    return losses, dlogits, dl


def launch(mod, name, logits, targets, dlosses, rows, V, Vp, write_dlogits):
    """fused_classifier's launch of `name` on a copy of the logits (B = 1, T = rows); returns (logits after, losses)."""
    x = logits.copy()
    losses = np.full((1, rows), np.nan, np.float32)
    launches = recorded_launches(lambda cu: cu.fused_classifier(x, losses, dlosses, targets, 1, rows, V, Vp,
                                                                write_dlogits), packed="x128" in name)
    assert [lc.kernel for lc in launches] == [name]
    run_launches(mod, launches)
    return x, losses


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_x128_against_plain_and_twin(modules, precision, order):
    mod = Emulated(modules[precision], order)
    rng = np.random.default_rng(50257)
    r = 0.0 if precision == "fp32" else 2.0 ** -8     # check_kernel.py's bf16 widening: one rounding
    worst_ulps = 0.0
    for rows, V, Vp in SHAPES:
        logits, targets, given = inputs(rng, rows, V, Vp, precision)
        for dlosses in (None, given):
            w_losses, w_dlogits, dl = twin(logits, targets, dlosses, rows, V, Vp)
            for write_dlogits in (0, 1):
                where = f"{precision} rows={rows} V={V} Vp={Vp} dlosses={'given' if dlosses is not None else 'NULL'} " \
                        f"write_dlogits={write_dlogits} ({order})"
                got = {}
                for name in KERNELS:
                    first = launch(mod, name, logits, targets, dlosses, rows, V, Vp, write_dlogits)
                    again = launch(mod, name, logits, targets, dlosses, rows, V, Vp, write_dlogits)
                    for a, b in zip(first, again):
                        assert a.tobytes() == b.tobytes(), f"{where} {name}: two runs differ"
                    x, losses = first
                    assert np.all(np.isfinite(losses)), f"{where} {name}: a loss is not finite"
                    close(losses, w_losses, 1e-5, 1e-6)
                    if write_dlogits:
                        close(as_float(x), w_dlogits, 1e-7 * (1 + r), 1e-5 * (1 + r) + r)
                        assert np.all(as_float(x)[..., V:] == 0), f"{where} {name}: pad dlogits not 0"
                    else:
                        assert x.tobytes() == logits.tobytes(), f"{where} {name}: forward only changed the logits"
                    got[name] = (as_float(x).astype(np.float64), losses.astype(np.float64))
                (x_plain, l_plain), (x_wide, l_wide) = got[KERNELS[0]], got[KERNELS[1]]
                ulp = np.spacing(np.abs(l_plain).astype(np.float32)).astype(np.float64)
                close(l_wide, l_plain, 4 * ulp + 16 * U32)
                worst_ulps = max(worst_ulps, float(np.max(np.abs(l_wide - l_plain) / ulp)))
                if write_dlogits:
                    atol = 8 * U32 * (np.abs(x_plain) + np.abs(dl)[..., None])
                    close(x_wide, x_plain, atol, 0.0 if precision == "fp32" else BF16_STEP)
    print(f"largest |loss x128 - loss plain| ({precision}, {order}): {worst_ulps:.0f} ulp")


def test_launcher_picks_x128_when_rows_start_on_a_pack(cuda_trainer):  # noqa: F811 (fixture)
    """train_gpt2_cuda.fused_classifier: the x128 kernel when Vp is a multiple of the pack and the logits
    are 16-byte aligned, else the plain one; the bits of a direct launch of each tell which ran."""
    cu = cuda_trainer
    rng = np.random.default_rng(3)
    for precision in ("fp32", "bf16"):
        direct = emulator.RawModule(code=kernel_source("classifier"), options=OPTIONS[precision])
        for V, Vp, offset, want in [(101, 128, 0, KERNELS[1]), (101, 102, 0, KERNELS[0]), (101, 128, 1, KERNELS[0])]:
            rows = 5
            logits, targets, _ = inputs(rng, rows, V, Vp, precision)
            room = np.zeros(logits.size + 64, logits.dtype)   # logits placed `offset` elements past an aligned start
            start = (-room.ctypes.data % 16) // logits.itemsize + offset
            x = room[start:start + logits.size].reshape(logits.shape)
            x[...] = logits
            losses = np.full((1, rows), np.nan, np.float32)
            cu.fused_classifier(x, losses, None, targets, 1, rows, V, Vp, write_dlogits=1)
            packable = Vp % (16 // logits.itemsize) == 0   # the x128 kernel can run on an aligned copy
            results = {name: launch(direct, name, logits, targets, None, rows, V, Vp, 1)
                       for name in KERNELS if packable or name == KERNELS[0]}
            assert x.tobytes() == results[want][0].tobytes() and losses.tobytes() == results[want][1].tobytes(), \
                (precision, V, Vp, offset, want)
            if packable and precision == "fp32":      # the two kernels' bits differ here: the check tells them apart
                assert results[KERNELS[0]][0].tobytes() != results[KERNELS[1]][0].tobytes()
