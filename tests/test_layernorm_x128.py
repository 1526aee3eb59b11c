"""The x128 twins of the LayerNorm kernels and of the wpe backward (kernels/layernorm.cu, kernels/encoder.cu),
against their plain twins on the CPU emulator, in its three thread orders, on guarded arrays.

A plain LayerNorm lane adds the elements k, k + 32, ... of its row; an x128 lane adds its packs k*P, k*P + 32P,
... (P = 8 bf16, 4 floats). Both sums are fp32 chains of at most D = ceil(C/32) + 5 additions (the lane's
elements, then warp_sum's 5 butterfly levels), so each is within D u sum|x| of the exact sum (Higham; u =
2^-24) and the two within 2 D u sum|x| of each other. From there:
  mean:  |dm| <= 2 D u mean|x| (+ the division's rounding, 2 u |m|);
  rstd:  the variance's relative error <= 2 D u per kernel (its m error is second order), halved by the square
         root, plus rsqrtf's 2 ulp per kernel: |ds| <= (2 D + 4) u s;
  out:   s (x - m) w + b: |dout| <= |w| (|ds| |x - m| + s |dm|) + 4 u (|w norm| + |b|);
  dinp:  the two row means a (of dnorm) and c (of dnorm * norm) move by 2 D u mean|dnorm| and
         2 D u mean|dnorm * norm|, so |ddinp| <= s (|da| + |norm| |dc|) + 4 u (|dinp| + s (|dnorm| + |a| + |norm c|)).
bf16 stores round the float results once: where the two float results straddle a rounding point they differ
by one bf16 step, 2^-8 |value|, on top.
Bit for bit: the x128 backward's per-block partials (scratch) equal the plain kernel's (the same rows in the
same order per channel); the fused x128 forward equals residual_forward_packed_kernel then
layernorm_forward_x128_kernel; encoder_backward_wpe_x128_kernel equals the plain wpe kernel in fp32 and in
bf16 is one of the two bf16 neighbours of the same float sum (its own noise per element); each kernel gives
the same bits twice.
"""

import numpy as np
import pytest

import emulator
from llmc.cuda_common import ceil_div, kernel_source
from llmc.formats import bf16_to_f32, f32_to_bf16
from test_cuda_trainer import cuda_trainer  # noqa: F401 (fixture)

from check_kernel import Emulated, Launch, close, launch_trainer, rand, recorded_launches, run_launches

i32, u32 = np.int32, np.uint32
OPTIONS = {"fp32": ("--std=c++17",), "bf16": ("--std=c++17", "-DENABLE_BF16")}
PACK = {"fp32": 4, "bf16": 8}
U = 2.0 ** -24
STEP = {"fp32": 0.0, "bf16": 2.0 ** -8}               # one rounding of the stored value apart, relative
ORDERS = ["forward", "reverse", "warps"]
CHANNELS = (1, 6, 33, 96)                             # packs per row: 33 gives lane 0 two packs, 96 is d12's 768 in bf16


@pytest.fixture(scope="module")
def modules():
    return {(f, p): emulator.RawModule(code=kernel_source(f), options=o)
            for f in ("layernorm", "encoder", "residual") for p, o in OPTIONS.items()}


def fx(x, precision):
    return x.astype(np.float32) if precision == "fp32" else f32_to_bf16(x.astype(np.float32))


def wide(x):
    return (bf16_to_f32(x).reshape(x.shape) if x.dtype == np.uint16 else x).astype(np.float64)


def depth(C):
    return ceil_div(C, 32) + 5


def launch(mod, name, call):
    """call(cu) on the trainer's launchers, the kernel `name` (plain, or with x128, packed or onepass in it the
    128-bit one) launched as they make it."""
    launches = recorded_launches(call, packed=any(word in name for word in ("x128", "packed", "onepass")))
    assert [lc.kernel for lc in launches] == [name], launches
    run_launches(mod, launches)


def forward(mod, name, N, C, inp, weight, bias):
    out = np.full(inp.shape, 0, inp.dtype)
    mean, rstd = np.full(N, np.nan, np.float32), np.full(N, np.nan, np.float32)
    launch(mod, name, lambda cu: cu.layernorm_forward(out, mean, rstd, inp, weight, bias, 1, N, C))
    return out, mean, rstd


def forward_bounds(x, w, b, C):
    """|dm|, |ds|, |dout| bounds (float64 arrays) for rows x (N, C) of the float inputs."""
    D = depth(C)
    m = x.mean(-1, keepdims=True)
    s = 1 / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    dm = 2 * D * U * np.abs(x).mean(-1, keepdims=True) + 2 * U * np.abs(m)
    ds = (2 * D + 4) * U * s
    dout = np.abs(w) * (ds * np.abs(x - m) + s * dm) + 4 * U * (np.abs(w * (x - m) * s) + np.abs(b))
    return dm[:, 0], ds[:, 0], dout


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_x128_against_plain(modules, precision, order):
    mod = Emulated(modules[("layernorm", precision)], order)
    rng = np.random.default_rng(14)
    worst = 0.0
    for packs in CHANNELS:
        C = packs * PACK[precision]
        for N in (1, 9):
            scale = np.logspace(-2, 1, N, dtype=np.float32)[:, None]      # variances near eps too
            inp = fx((rand(rng, N, C) + 2.0) * scale, precision)
            weight, bias = fx(rand(rng, C), precision), fx(rand(rng, C), precision)
            plain = forward(mod, "layernorm_forward_kernel", N, C, inp, weight, bias)
            x128 = forward(mod, "layernorm_forward_x128_kernel", N, C, inp, weight, bias)
            again = forward(mod, "layernorm_forward_x128_kernel", N, C, inp, weight, bias)
            assert all(a.tobytes() == b.tobytes() for a, b in zip(x128, again)), "two runs differ"
            dm, ds, dout = forward_bounds(wide(inp), wide(weight), wide(bias), C)
            close(x128[1], plain[1], dm)
            close(x128[2], plain[2], ds)
            got, want = wide(x128[0]), wide(plain[0])
            close(got, want, dout + STEP[precision] * np.abs(want))
            worst = max(worst, float(np.max(np.abs(got - want) / (dout + STEP[precision] * np.abs(want)))))
    print(f"largest |x128 - plain| / bound of out ({precision}, {order}): {worst:.2f}")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_x128_is_residual_then_layernorm_x128(modules, precision, order):
    ln = Emulated(modules[("layernorm", precision)], order)
    res = Emulated(modules[("residual", precision)], order)
    rng = np.random.default_rng(15)
    for packs in CHANNELS:
        C = packs * PACK[precision]
        N = 7
        inp1, inp2 = fx(rand(rng, N, C), precision), fx(rand(rng, N, C) + 1.0, precision)
        weight, bias = fx(rand(rng, C), precision), fx(rand(rng, C), precision)
        residual = np.zeros_like(inp1)
        launch(res, "residual_forward_packed_kernel", lambda cu: cu.residual_forward(residual, inp1, inp2, N * C))
        want = forward(ln, "layernorm_forward_x128_kernel", N, C, residual, weight, bias)
        for name in ("fused_residual_layernorm_forward_x128_kernel", "fused_residual_layernorm_forward_kernel"):
            fused_res, normed = np.zeros_like(inp1), np.zeros_like(inp1)
            mean, rstd = np.full(N, np.nan, np.float32), np.full(N, np.nan, np.float32)
            launch(ln, name, lambda cu: cu.fused_residual_forward(fused_res, normed, mean, rstd, inp1, inp2, weight,
                                                                   bias, 1, N, C))
            assert fused_res.tobytes() == residual.tobytes(), f"{name}: the residual"
            if "x128" in name:                        # the same bits as the two x128 launches
                for got, w, what in zip((normed, mean, rstd), want, ("normed", "mean", "rstd")):
                    assert got.tobytes() == w.tobytes(), f"{name} C={C}: {what} differs"
            else:                                     # the plain fused kernel: within the bounds above
                dm, ds, dout = forward_bounds(wide(residual), wide(weight), wide(bias), C)
                close(mean, want[1], dm)
                close(wide(normed), wide(want[0]), dout + STEP[precision] * np.abs(wide(want[0])))
    # in place: the residual over inp1, as gpt2_forward may alias it
    C = 96 * PACK[precision]
    a, b, weight, bias = (fx(rand(rng, *shape), precision) for shape in ((3, C), (3, C), (C,), (C,)))
    name = "fused_residual_layernorm_forward_x128_kernel"
    residual, normed = np.zeros_like(a), np.zeros_like(a)
    launch(ln, name, lambda cu: cu.fused_residual_forward(residual, normed, None, None, a, b, weight, bias, 1, 3, C))
    in_place, normed_in_place = a.copy(), np.zeros_like(a)
    launch(ln, name, lambda cu: cu.fused_residual_forward(in_place, normed_in_place, None, None, in_place, b, weight,
                                                          bias, 1, 3, C))
    assert in_place.tobytes() == residual.tobytes() and normed_in_place.tobytes() == normed.tobytes()


def backward(mod, name, B, T, C, dinp0, dout, inp, weight, mean, rstd, dinp_sums=0):
    """The rows kernel `name` on layernorm_backward's launch of the plain one; the trainer launches the x128
    rows only inside its one-pass kernel, so here they run on the plain launch's grid and arguments, plus
    dinp_sums (1: a third partial row per block, the column sums of the stored dinp)."""
    grid = ceil_div(32 * B * T, launch_trainer().LAYERNORM_BACKWARD_BLOCK)
    dinp, scratch = dinp0.copy(), np.full((grid, 2 + dinp_sums, C), np.nan, np.float32)
    rows = recorded_launches(lambda cu: cu.layernorm_backward(dinp, np.zeros(C, dinp.dtype), np.zeros(C, dinp.dtype),
                                                              scratch, dout, inp, weight, mean, rstd, B, T, C),
                             packed=False)[0]
    assert rows.kernel == "layernorm_backward_kernel" and rows.grid == grid
    extra = (i32(dinp_sums),) if "x128" in name else ()
    run_launches(mod, [Launch(name, rows.grid, rows.block, rows.args + extra)])
    return dinp, scratch


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backward_x128_against_plain(modules, precision, order):
    mod = Emulated(modules[("layernorm", precision)], order)
    rng = np.random.default_rng(16)
    for packs in CHANNELS:
        C = packs * PACK[precision]
        for B, T in ((1, 1), (3, 7)):                # 21 rows: two blocks, the second partly empty
            inp, dout = fx(rand(rng, B, T, C) + 1.0, precision), fx(rand(rng, B, T, C), precision)
            weight, dinp0 = fx(rand(rng, C), precision), fx(rand(rng, B, T, C), precision)
            x = wide(inp)
            mean = x.mean(-1).astype(np.float32)
            rstd = (1 / np.sqrt(x.var(-1) + 1e-5)).astype(np.float32)
            args = (B, T, C, dinp0, dout, inp, weight, mean, rstd)
            p_dinp, p_scratch = backward(mod, "layernorm_backward_kernel", *args)
            x_dinp, x_scratch = backward(mod, "layernorm_backward_x128_kernel", *args)
            again = backward(mod, "layernorm_backward_x128_kernel", *args)
            assert x_dinp.tobytes() == again[0].tobytes() and x_scratch.tobytes() == again[1].tobytes()
            assert x_scratch.tobytes() == p_scratch.tobytes(), f"{precision} C={C}: the partials differ"
            # dinp's bound from the float64 terms of each row
            D = depth(C)
            s = rstd.astype(np.float64)[..., None]
            norm = (x - mean.astype(np.float64)[..., None]) * s
            dnorm = wide(weight) * wide(dout)
            a, c = dnorm.mean(-1, keepdims=True), (dnorm * norm).mean(-1, keepdims=True)
            da = 2 * D * U * np.abs(dnorm).mean(-1, keepdims=True)
            dc = 2 * D * U * np.abs(dnorm * norm).mean(-1, keepdims=True)
            want = wide(p_dinp)
            bound = (s * (da + np.abs(norm) * dc) + 4 * U * (np.abs(want) + s * (np.abs(dnorm) + np.abs(a)
                                                                                 + np.abs(norm * c)))
                     + STEP[precision] * np.abs(want))
            close(wide(x_dinp), want, bound)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backward_with_the_linear_bias(modules, precision, order):
    """dinp_sums = 1: the same dinp and dweight/dbias partials as dinp_sums = 0, and a third row per block, the
    column sums of the stored dinp rows (the block's rows in order: bit for bit a NumPy float32 model); then
    layernorm_backward_sum3_split_kernel: dweight and dbias the bits of the 2-row split sum, the linear bias
    within an fp32 sum of chains of at most rows_per_block + ceil(blocks/128) + 5 + 4 + 1 additions (and one
    bf16 rounding) of the float64 sum of the stored dinp, matmul_backward_bias's NumPy twin."""
    mod = Emulated(modules[("layernorm", precision)], order)
    rng = np.random.default_rng(19)
    for packs in (1, 6, 96):
        C = packs * PACK[precision]
        for B, T in ((1, 1), (3, 7), (2, 24)):        # 48 rows: three blocks of 16
            inp, dout = fx(rand(rng, B, T, C) + 1.0, precision), fx(rand(rng, B, T, C), precision)
            weight, dinp0 = fx(rand(rng, C), precision), fx(rand(rng, B, T, C), precision)
            x = wide(inp)
            mean = x.mean(-1).astype(np.float32)
            rstd = (1 / np.sqrt(x.var(-1) + 1e-5)).astype(np.float32)
            args = (B, T, C, dinp0, dout, inp, weight, mean, rstd)
            dinp2, scratch2 = backward(mod, "layernorm_backward_x128_kernel", *args)
            dinp3, scratch3 = backward(mod, "layernorm_backward_x128_kernel", *args, dinp_sums=1)
            assert dinp3.tobytes() == dinp2.tobytes() and scratch3[:, :2].tobytes() == scratch2.tobytes()
            grid, N = scratch3.shape[0], B * T
            stored = np.zeros((grid * 16, C), np.float32)
            stored[:N] = wide(dinp3).reshape(N, C)
            model = np.zeros((grid, C), np.float32)
            for r in range(16):                       # each block's rows in order, float32 additions
                model += stored.reshape(grid, 16, C)[:, r]
            assert scratch3[:, 2].tobytes() == model.tobytes(), f"{precision} C={C}: the dinp column sums"
            # the sums into (dweight, dbias, dlinear_bias)
            dweight0, dbias0, dlin0 = (fx(rand(rng, C), precision) for _ in range(3))
            two = [dweight0.copy(), dbias0.copy()]
            [_, split] = recorded_launches(lambda cu: cu.layernorm_backward(
                dinp0.copy(), *two, scratch2, dout, inp, weight, mean, rstd, B, T, C),
                packed=lambda n, *arrays: arrays[0] is scratch2)  # rows not x128 but scratch packable: the split sum
            three = [dweight0.copy(), dbias0.copy(), dlin0.copy()]
            # its 3-row twin, which the trainer runs only inside the one-pass kernel: a block per pack of 4 of the 3C
            run_launches(mod, [split, Launch("layernorm_backward_sum3_split_kernel", 3 * C // 4, split.block,
                                             (*three, scratch3, i32(grid), i32(C)))])
            assert three[0].tobytes() == two[0].tobytes() and three[1].tobytes() == two[1].tobytes()
            want = wide(dlin0) + wide(dinp3).reshape(N, C).sum(0)
            chains = 16 + ceil_div(grid, 128) + 5 + 4 + 1
            magnitude = np.abs(wide(dlin0)) + np.abs(wide(dinp3)).reshape(N, C).sum(0)
            close(wide(three[2]), want, chains * U * magnitude + STEP[precision] * np.abs(want))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_wpe_x128_against_plain(modules, precision, order):
    mod = Emulated(modules[("encoder", precision)], order)
    rng = np.random.default_rng(17)
    for B, T, C in ((1, 1, PACK[precision]), (3, 5, 6 * PACK[precision]), (6, 4, 96 * PACK[precision])):
        dout, dwpe0 = fx(rand(rng, B, T, C), precision), fx(rand(rng, T + 2, C), precision)  # maxT > T
        plain, x128, again = dwpe0.copy(), dwpe0.copy(), dwpe0.copy()
        inp = np.zeros((B, T), np.int32)

        def wpe(dwpe, packed):                        # encoder_backward's wpe launch (its wte launch not run)
            launches = recorded_launches(lambda cu: cu.encoder_backward(np.zeros((1, C), dwpe.dtype), dwpe, dout, inp,
                                                                        B, T, C, seed=7), packed=packed)
            want = "encoder_backward_wpe_x128_kernel" if packed else "encoder_backward_wpe_kernel"
            assert launches[1].kernel == want
            run_launches(mod, launches[1:])
        wpe(plain, False)
        wpe(x128, True)
        wpe(again, True)
        assert x128.tobytes() == again.tobytes(), "two runs differ"
        assert x128[T:].tobytes() == dwpe0[T:].tobytes(), "rows past T were touched"
        if precision == "fp32":
            assert x128.tobytes() == plain.tobytes(), f"B={B} T={T} C={C}: not the plain kernel's bits"
            continue
        acc = wide(dwpe0[:T]).astype(np.float32)      # the float sum both kernels round: b in order
        for b in range(B):
            acc = acc + wide(dout[b]).astype(np.float32)
        low = (acc.view(np.uint32) >> 16).astype(np.uint16)          # the bf16 at or below |acc|
        exact = (acc.view(np.uint32) & 0xFFFF) == 0
        high = np.where(exact, low, low + np.uint16(1))
        for got in (x128[:T], plain[:T]):
            assert np.all((got == low) | (got == high)), "not one of the two bf16 neighbours of the float sum"


def test_launchers_take_the_x128_kernels(cuda_trainer, monkeypatch):  # noqa: F811 (fixture)
    """train_gpt2_cuda's LayerNorm and encoder launchers: the x128 kernels where C is a multiple of the pack,
    the plain ones where it is not (C = 12 in bf16), named by what they launch; and the grids at d12."""
    cu = cuda_trainer
    launched = []
    kernel = cu.kernel
    monkeypatch.setattr(cu, "kernel", lambda file, name, floatx=np.float32: (launched.append(name),
                                                                              kernel(file, name, floatx))[1])
    rng = np.random.default_rng(18)
    for C, suffix in ((16, "x128_kernel"), (12, None)):
        B, T = 2, 3
        inp, weight, bias = (f32_to_bf16(rand(rng, *shape)) for shape in ((B, T, C), (C,), (C,)))
        out = np.zeros_like(inp)
        mean, rstd = np.zeros(B * T, np.float32), np.zeros(B * T, np.float32)
        launched.clear()
        cu.layernorm_forward(out, mean, rstd, inp, weight, bias, B, T, C)
        cu.fused_residual_forward(out.copy(), out, mean, rstd, inp, inp, weight, bias, B, T, C)
        scratch = np.zeros(cu.layernorm_scratch_size(B, T, C), np.float32)
        cu.layernorm_backward(np.zeros_like(inp), np.zeros_like(weight), np.zeros_like(bias), scratch, inp, inp,
                              weight, mean, rstd, B, T, C)
        cu.encoder_backward(np.zeros((8, C), np.uint16), np.zeros((T, C), np.uint16), inp,
                            np.zeros((B, T), np.int32), B, T, C)
        names = ["layernorm_forward", "fused_residual_layernorm_forward", "layernorm_backward",
                 "encoder_backward_wpe"]
        got = [n for n in launched if n.rsplit("_", 2)[0] in names or n.rsplit("_", 1)[0] in names]
        want = [n + ("_" + suffix if suffix else "_kernel") for n in names]
        if suffix:                                    # the backward: its one-launch kernel (x128 rows + the sums)
            want[2] = "layernorm_backward_onepass_kernel"
        assert got == want, (C, launched)
    # the fused residual + LayerNorm with an input off a 16-byte boundary but its outputs on one: the two
    # launches it replaces (residual, then the x128 LayerNorm), so a LayerNorm recomputed from the residual under
    # -r 2 (layernorm_forward, x128) gives the forward's bits
    C, B, T = 16, 2, 3
    buf = f32_to_bf16(rand(rng, B * T * C + 8))
    inp1 = buf[8:].reshape(B, T, C)                   # 16 bytes in: aligned
    inp2 = f32_to_bf16(rand(rng, B * T * C + 4))[4:].reshape(B, T, C)   # 8 bytes in: not
    weight, bias = f32_to_bf16(rand(rng, C)), f32_to_bf16(rand(rng, C))
    residual, normed = np.zeros((B, T, C), np.uint16), np.zeros((B, T, C), np.uint16)
    mean, rstd = np.zeros(B * T, np.float32), np.zeros(B * T, np.float32)
    assert cu.packable(C, inp1) and not cu.packable(C, inp2) and cu.packable(C, residual, normed)
    launched.clear()
    cu.fused_residual_forward(residual, normed, mean, rstd, inp1, inp2, weight, bias, B, T, C)
    assert launched == ["residual_forward_kernel", "layernorm_forward_x128_kernel"], launched
    again, again_mean = np.zeros_like(normed), np.zeros_like(mean)
    cu.layernorm_forward(again, again_mean, np.zeros_like(rstd), residual, weight, bias, B, T, C)
    assert again.tobytes() == normed.tobytes() and again_mean.tobytes() == mean.tobytes()
    # d12 B=16 T=1024 bf16: the wpe x128 grid covers 132 SMs more than four times over
    assert ceil_div(1024 * 768, cu.ENCODER_WPE_BLOCK * 8) == 768 >= 4 * 132


def test_launcher_with_the_linear_bias(cuda_trainer, monkeypatch):  # noqa: F811 (fixture)
    """layernorm_backward(..., linear_dbias=...): linear_dbias += the column sums of dinp after the update, by
    the one-launch kernel's third partial row and its sums (C = 16 in bf16, 8 in fp32: one launch in all) or,
    where the x128 kernel cannot run (C = 12 in bf16), by matmul_backward_bias afterwards (three launches);
    either way within an fp32 sum's error and one floatX rounding of the float64 sum of the stored dinp; and
    dinp, dweight, dbias the bits of the same call without linear_dbias."""
    cu = cuda_trainer
    launched = []
    kernel = cu.kernel
    monkeypatch.setattr(cu, "kernel", lambda file, name, floatx=np.float32: (launched.append(name),
                                                                              kernel(file, name, floatx))[1])
    rng = np.random.default_rng(20)
    B, T = 2, 24
    for precision, C, fused in (("bf16", 16, True), ("bf16", 12, False), ("fp32", 8, True)):
        inp, dout = fx(rand(rng, B, T, C) + 1.0, precision), fx(rand(rng, B, T, C), precision)
        weight, dinp0 = fx(rand(rng, C), precision), fx(rand(rng, B, T, C), precision)
        x = wide(inp)
        mean = x.mean(-1).astype(np.float32)
        rstd = (1 / np.sqrt(x.var(-1) + 1e-5)).astype(np.float32)
        dweight0, dbias0, dlin0 = (fx(rand(rng, C), precision) for _ in range(3))
        runs = []
        for linear in (False, True):
            dinp, dweight, dbias, dlin = dinp0.copy(), dweight0.copy(), dbias0.copy(), dlin0.copy()
            ln_scratch = np.zeros(cu.layernorm_scratch_size(B, T, C), np.float32)
            mm_scratch = np.zeros(cu.matmul_bias_scratch_size(B, T, C, dinp.dtype), np.float32)
            launched.clear()
            cu.layernorm_backward(dinp, dweight, dbias, ln_scratch, dout, inp, weight, mean, rstd, B, T, C,
                                  **(dict(linear_dbias=dlin, linear_scratch=mm_scratch) if linear else {}))
            runs.append((dinp, dweight, dbias, dlin, list(launched)))
        (dinp, dweight, dbias, _, _), (dinp_l, dweight_l, dbias_l, dlin, names) = runs
        assert dinp_l.tobytes() == dinp.tobytes() and dweight_l.tobytes() == dweight.tobytes()
        assert dbias_l.tobytes() == dbias.tobytes()
        if fused:
            assert names == ["layernorm_backward_onepass_kernel"], names
        else:
            assert names == ["layernorm_backward_kernel", "layernorm_backward_sum_split_kernel",
                             "matmul_backward_bias_kernel"], names
        want = wide(dlin0) + wide(dinp_l).reshape(B * T, C).sum(0)
        magnitude = np.abs(wide(dlin0)) + np.abs(wide(dinp_l)).reshape(B * T, C).sum(0)
        close(wide(dlin), want, 80 * U * magnitude + STEP[precision] * np.abs(want))
        assert np.abs(wide(dlin) - wide(dlin0)).max() > 0.1            # it did add something


def onepass_model(acc, partials, group=32):
    """layernorm_backward_onepass_kernel's bits: partials (blocks, width) summed per group of `group` blocks in
    block order (float32, from 0), the group sums in group order (from 0), added to acc (width,) in float32."""
    groups = [np.zeros(partials.shape[1], np.float32) for _ in range(0, len(partials), group)]
    for b, row in enumerate(partials):
        groups[b // group] += row
    total = np.zeros(partials.shape[1], np.float32)
    for g in groups:
        total += g
    return np.float32(acc + total)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backward_in_one_launch(modules, precision, order):
    """layernorm_backward_onepass_kernel: dinp the x128 kernel's bits; dbias, dweight (and the linear bias) bit
    for bit the NumPy model of its order over the x128 kernel's partials (the block rows, then the groups of 32
    blocks' sums in order, then those in group order), whichever block finishes last (three thread orders,
    under the race checker: the partials cross blocks as atomics); the counters left at 0; the same bits twice."""
    mod = Emulated(modules[("layernorm", precision)], order)
    rng = np.random.default_rng(21)
    C = 2 * PACK[precision]
    for B, T in ((3, 7), (3, 200)):                   # 2 blocks (one group), 38 blocks (groups of 32 and 6)
        for linear in (False, True):
            inp, dout = fx(rand(rng, B, T, C) + 1.0, precision), fx(rand(rng, B, T, C), precision)
            weight, dinp0 = fx(rand(rng, C), precision), fx(rand(rng, B, T, C), precision)
            x = wide(inp)
            mean = x.mean(-1).astype(np.float32)
            rstd = (1 / np.sqrt(x.var(-1) + 1e-5)).astype(np.float32)
            want_dinp, partials = backward(mod, "layernorm_backward_x128_kernel", B, T, C, dinp0, dout, inp,
                                           weight, mean, rstd, dinp_sums=int(linear))
            grid = partials.shape[0]
            groups = ceil_div(grid, 32)
            outs0 = [fx(rand(rng, C), precision) for _ in range(2 + linear)]      # dbias, dweight, dlinear
            results = []
            for _ in range(2):
                dinp, outs = dinp0.copy(), [o.copy() for o in outs0]
                scratch = np.full(launch_trainer().layernorm_scratch_size(B, T, C), np.nan, np.float32)
                scratch[-(groups + 1):] = 0               # the ticket counters, zero-allocated in the trainer
                dlin = outs[2] if linear else None
                launch(mod, "layernorm_backward_onepass_kernel", lambda cu: cu.layernorm_backward(
                    dinp, outs[1], outs[0], scratch, dout, inp, weight, mean, rstd, B, T, C, dlin))
                assert not scratch[-(groups + 1):].view(np.uint32).any(), "the counters are left at 0"
                results.append((dinp, outs))
            (dinp, outs), (dinp2, outs2) = results
            assert dinp.tobytes() == want_dinp.tobytes() and dinp2.tobytes() == dinp.tobytes()
            assert all(a.tobytes() == b.tobytes() for a, b in zip(outs, outs2)), "two runs differ"
            acc = np.concatenate([wide(o).astype(np.float32) for o in outs0])
            model = onepass_model(acc, partials.reshape(grid, -1))
            got = np.concatenate([wide(o).astype(np.float32) for o in outs])
            want = model if precision == "fp32" else bf16_to_f32(f32_to_bf16(model))
            where = f"{precision} B={B} T={T} linear={linear} ({order})"
            assert got.tobytes() == want.astype(np.float32).tobytes(), where
