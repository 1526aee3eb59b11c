"""kernels/flash_attention.cu on the CPU emulator: forward O and lse, backward dq, dk, dv, through the
launchers of train_gpt2_cuda.py (flash_attention_forward / flash_attention_backward), checked against

  (a) causal attention in float64 NumPy, forward and backward by formula (below), from the same
      bf16-rounded qkv and dout, and
  (b) the materialized path (train_gpt2_cuda.attention_forward / attention_backward: permute, GEMM,
      softmax kernel, GEMM, unpermute and back, on the emulator in bf16),

on T in {1, 7, 64, 100, 257} (tails of every tile size), hs in {64, 128}, B*NH in {1, 6}, in the emulator's
three thread orders, on guarded arrays, under the emulator's race checker (racecheck=True; a planted missing
barrier shows that it watches). Outputs start as NaN, so an element never written fails.

Tolerances, from bf16 rounding (u = 2^-8: a value rounded to nearest bf16 is within u of itself,
relatively). Both paths read the same bf16 inputs and sum in fp32; they round at different places:
flash keeps the scores and the softmax statistics in fp32 and rounds P and dS (for the tensor cores) and
the stored results; the materialized path also rounds the scores (preatt), datt and dpreatt. Each error
is measured against the scale of its result, the same sum over |terms| in float64 (O = P V: max of
P|V|; dV: P^T|dO|; dQ: scale (P(|dP| + |D|))|K|; dK: the same with |Q|), since rounding every term by u
moves a sum by at most u of that. Flash: one rounding of the terms (P or dS) and one of the result, so
err <= 2u for O, dq, dk, dv; lse stays fp32, 1e-5 absolute (fp32 sums of scores of a few units: a few
fp32 ulp). The materialized path also rounds the scores, which exp() turns into relative errors of |s| u
in P: it gets 3u, and the two paths must be within 5u of each other. Measured worst cases over the
default shapes and orders (flash / materialized / apart, in units of the scale): O 0.0027 / 0.0046 /
0.0054, dq 0.0026 / 0.0024 / 0.0043, dk 0.0016 / 0.0020 / 0.0019, dv 0.0026 / 0.0037 / 0.0041 (u = 0.0039);
lse 5.9e-7; with scores in the tens (test_flash_with_scores_growing_along_the_keys) flash's O 0.0042.
`pytest -s` prints each shape's.

Also: the forward's rescale path (scores that grow along the keys); the bits are the same in every run
and thread order (no atomics, fixed order of every sum);
the emulator's traffic counter against the bytes the tiling implies (the perf model's input); and the
launchers' one-line errors for what the kernel does not take.
"""

import math

import numpy as np
import pytest

import emulator
from conftest import emulated_cuda_trainer
from llmc.cuda_common import kernel_source
from llmc.formats import bf16_to_f32, f32_to_bf16

U = 2.0 ** -8                                           # bf16's unit roundoff
BF16 = ("--std=c++17", "-DENABLE_BF16")
ORDERS = ["forward", "reverse", "warps"]
NAN16 = np.uint16(0x7FC0)                               # a bf16 quiet NaN: what an unwritten output reads as
FLASH_TOL, MATERIALIZED_TOL = 2 * U, 3 * U            # relative to each result's scale (above)
LSE_TOL = 1e-5                                          # absolute: lse is fp32 all the way
# the largest shapes (T = 257, B*NH = 6: ~9 s each) run in one order by default, all three with --runslow
SLOW = ((257, 6, "reverse"), (257, 6, "warps"))
CASES = [pytest.param(T, hs, bh, order, marks=[pytest.mark.slow] if (T, bh, order) in SLOW else [])
         for T in (1, 7, 64, 100, 257) for hs in (64, 128) for bh in (1, 6) for order in ORDERS]


@pytest.fixture(scope="module")
def cu():
    return emulated_cuda_trainer("train_gpt2_cuda_flash")


@pytest.fixture(scope="module")
def flash_mod(cu):
    return emulator.RawModule(code=kernel_source("flash_attention"), options=BF16)


def use_order(monkeypatch, cu, flash_mod, order, racecheck=True):
    """The trainer's launchers, with the flash kernels run in `order` on guarded arrays, under the race checker
    (a race between two threads of a block, e.g. a missing __syncthreads before a tile is overwritten, is an
    error naming both)."""
    real = cu.kernel

    def kernel(file, name, floatx=np.float32):
        if file != "flash_attention":
            return real(file, name, floatx)
        f = flash_mod.get_function(name)
        return lambda grid, block, args, shared_mem=0: f(grid, block, args, shared_mem=shared_mem, order=order,
                                                         guard=True, racecheck=racecheck)
    monkeypatch.setattr(cu, "kernel", kernel)


def dims(T, hs, bh):
    B, NH = (1, 1) if bh == 1 else (2, 3)
    return B, T, NH * hs, NH


def inputs(B, T, C, NH, seed=0):
    rng = np.random.default_rng(seed + 1000 * T + C + NH)
    qkv = f32_to_bf16(rng.standard_normal((B, T, 3 * C)).astype(np.float32))
    dout = f32_to_bf16(rng.standard_normal((B, T, C)).astype(np.float32))
    return qkv, dout


def reference(qkv, dout, B, T, C, NH):
    """Causal attention in float64: {out, lse, dq, dk, dv}, q/k/v/out in the layouts the kernels use."""
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    q, k, v = bf16_to_f32(qkv).astype(np.float64).reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # (B,NH,T,hs)
    do = bf16_to_f32(dout).astype(np.float64).reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    s = np.where(np.tril(np.ones((T, T), bool)), scale * q @ k.swapaxes(-1, -2), -np.inf)       # (B,NH,T,T)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    p = e / e.sum(-1, keepdims=True)
    o = p @ v
    dp = do @ v.swapaxes(-1, -2)                                   # o = p v
    dv = p.swapaxes(-1, -2) @ do
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))                # p = softmax(s) by rows
    dq, dk = scale * ds @ k, scale * ds.swapaxes(-1, -2) @ q       # s = scale q k^T
    lse = (m + np.log(e.sum(-1, keepdims=True)))[..., 0]
    # each result's scale: the same sums over |terms|, which bound what rounding the terms can do
    ads = p * (np.abs(dp) + np.abs((p * dp).sum(-1, keepdims=True)))
    mag = {"out": p @ np.abs(v), "dv": p.swapaxes(-1, -2) @ np.abs(do),
           "dq": scale * ads @ np.abs(k), "dk": scale * ads.swapaxes(-1, -2) @ np.abs(q)}
    to_btc = lambda x: x.transpose(0, 2, 1, 3).reshape(B, T, C)   # (B,NH,T,hs) -> (B,T,C)  # noqa: E731
    return ({"out": to_btc(o), "lse": lse, "dq": to_btc(dq), "dk": to_btc(dk), "dv": to_btc(dv)},
            {name: float(x.max()) for name, x in mag.items()})


def split_dqkv(dqkv, B, T, C):
    d = bf16_to_f32(dqkv).astype(np.float64).reshape(B, T, 3, C)
    return {"dq": d[:, :, 0], "dk": d[:, :, 1], "dv": d[:, :, 2]}


def run_flash(cu, qkv, dout, B, T, C, NH):
    out = np.full((B, T, C), NAN16, np.uint16)
    lse = np.full((B, NH, T), np.nan, np.float32)
    dqkv = np.full((B, T, 3 * C), NAN16, np.uint16)
    scratch = np.full(cu.flash_scratch_size(B, T, C, NH), np.nan, np.float32)
    cu.flash_attention_forward(out, lse, qkv, B, T, C, NH)
    cu.flash_attention_backward(dqkv, scratch, dout, qkv, out, lse, B, T, C, NH)
    return out, lse, dqkv


def run_materialized(cu, qkv, dout, B, T, C, NH):
    """The -fa 0 path in bf16: attention_forward's inp is scratch as big as (B,NH,T,T), so qkv is copied in."""
    hs = C // NH
    inp = np.zeros(B * T * max(3 * C, NH * T), np.uint16)
    inp[:qkv.size] = qkv.reshape(-1)
    out, qkvr = np.empty((B, T, C), np.uint16), np.empty(3 * B * NH * T * hs, np.uint16)
    att = np.empty(B * NH * T * T, np.uint16)
    cu.attention_forward(out, qkvr, att, inp, B, T, C, NH)
    dqkv = np.empty((B, T, 3 * C), np.uint16)
    dqkvr, scratch = np.empty(3 * B * T * C, np.uint16), np.empty(B * T * C, np.uint16)
    dpreatt, datt = np.empty(B * NH * T * T, np.uint16), np.empty(B * NH * T * T, np.uint16)
    cu.attention_backward(dqkv, dqkvr, dpreatt, datt, scratch, dout, qkvr, att, B, T, C, NH)
    return {"out": bf16_to_f32(out).astype(np.float64), **split_dqkv(dqkv, B, T, C)}


def rel_err(got, other, scale):
    """max |got - other| / scale; NaN (an element never written) is infinite."""
    err = np.abs(np.asarray(got, np.float64) - other)
    return math.inf if np.isnan(err).any() else float(err.max() / scale)


_materialized = {}                                      # (T, hs, bh) -> its results, the same in every order


@pytest.mark.parametrize("T,hs,bh,order", CASES)
def test_flash_against_float64_and_materialized(cu, flash_mod, monkeypatch, T, hs, bh, order):
    B, T, C, NH = dims(T, hs, bh)
    qkv, dout = inputs(B, T, C, NH)
    want, scale = reference(qkv, dout, B, T, C, NH)
    if (T, hs, bh) not in _materialized:
        _materialized[(T, hs, bh)] = run_materialized(cu, qkv, dout, B, T, C, NH)
    mat = _materialized[(T, hs, bh)]
    use_order(monkeypatch, cu, flash_mod, order)
    out, lse, dqkv = run_flash(cu, qkv, dout, B, T, C, NH)
    got = {"out": bf16_to_f32(out).astype(np.float64), **split_dqkv(dqkv, B, T, C)}
    lse_err = float(np.abs(lse.astype(np.float64) - want["lse"]).max()) if not np.isnan(lse).any() else math.inf
    assert lse_err <= LSE_TOL, f"T={T} hs={hs} B*NH={bh} {order}: lse off by {lse_err:.2e} > {LSE_TOL:.2e}"
    report = []
    for name in ("out", "dq", "dk", "dv"):
        e_flash, e_mat = rel_err(got[name], want[name], scale[name]), rel_err(mat[name], want[name], scale[name])
        e_pair = rel_err(got[name], mat[name], scale[name])
        report.append(f"{name}: flash {e_flash:.4f} materialized {e_mat:.4f} apart {e_pair:.4f}")
        ok = e_flash <= FLASH_TOL and e_mat <= MATERIALIZED_TOL and e_pair <= FLASH_TOL + MATERIALIZED_TOL
        assert ok, (f"T={T} hs={hs} B*NH={bh} {order}: errors over tolerance (flash {FLASH_TOL:.4f}, materialized "
                    f"{MATERIALIZED_TOL:.4f}, apart their sum), relative to each result's scale:\n" + "\n".join(report))
    print(f"\nT={T} hs={hs} B*NH={bh} {order}: lse {lse_err:.1e}; " + "; ".join(report))


@pytest.mark.parametrize("T,hs,bh", [(100, 64, 6), (257, 128, 1)])
def test_bits_identical_across_runs_and_orders(cu, flash_mod, monkeypatch, T, hs, bh):
    B, T, C, NH = dims(T, hs, bh)
    qkv, dout = inputs(B, T, C, NH, seed=7)
    results = []
    for order in ("forward", "forward", "reverse", "warps"):
        use_order(monkeypatch, cu, flash_mod, order, racecheck=False)
        results.append(run_flash(cu, qkv, dout, B, T, C, NH))
    for order, other in zip(("forward", "reverse", "warps"), results[1:]):
        for name, a, b in zip(("out", "lse", "dqkv"), results[0], other):
            assert a.tobytes() == b.tobytes(), f"T={T} hs={hs}: {name} differs between two runs ({order} vs forward)"


def expected_traffic(B, T, C, NH):
    """(forward, dq, dkdv) bytes (read, written) that the tiling implies: a tile load reads its rows < T
    once per block that walks it (2 bytes a bf16, 4 a float), every output is written once; the dq kernel
    also reads out per element (D) and writes D; lse and D are read once per row a block walks."""
    hs = C // NH
    BR, BC = (64 if hs == 64 else 32), 32
    rows = lambda r0, n: max(0, min(r0 + n, T) - r0)    # noqa: E731  (rows of a tile inside T)
    row = 2 * hs                                        # one row of q, k, v, out or dout
    fwd_read = sum(rows(q0, BR) * row + sum(2 * rows(k0, BC) * row for k0 in range(0, min(q0 + BR, T), BC))
                   for q0 in range(0, T, BR))
    dq_read = sum(rows(q0, 32) * (3 * row + 4) + sum(2 * rows(k0, BC) * row for k0 in range(0, min(q0 + 32, T), BC))
                  for q0 in range(0, T, 32))
    dkdv_read = sum(2 * rows(k0, BC) * row + sum(rows(q0, 32) * (2 * row + 8) for q0 in range(k0, T, 32))
                    for k0 in range(0, T, BC))
    heads = B * NH
    return ((heads * fwd_read, heads * T * (row + 4)), (heads * dq_read, heads * T * (row + 4)),
            (heads * dkdv_read, heads * T * 2 * row))


def test_traffic_of_forward_and_backward(cu, flash_mod, monkeypatch):
    """B=1 NH=2 T=256 hs=64 (the numbers dev/perf_model.py can use), and an odd shape."""
    for B, T, C, NH in ((1, 256, 128, 2), (2, 100, 384, 3)):
        qkv, dout = inputs(B, T, C, NH)
        use_order(monkeypatch, cu, flash_mod, "forward", racecheck=False)
        with emulator.count_traffic() as launches:
            run_flash(cu, qkv, dout, B, T, C, NH)
        got = [(t.bytes_read, t.bytes_written) for t in launches]
        names = [t.kernel for t in launches]
        assert names == ["flash_attention_forward_kernel", "flash_attention_backward_dq_kernel",
                         "flash_attention_backward_dkdv_kernel"], names
        assert got == list(expected_traffic(B, T, C, NH)), f"B={B} T={T} C={C} NH={NH}: counted {got}"
        print(f"\nB={B} T={T} C={C} NH={NH}: (read, written) bytes " + ", ".join(f"{n}: {rw}" for n, rw in zip(names, got)))


def test_launchers_refuse_what_the_kernel_does_not_take(cu):
    B, T, NH = 1, 8, 2
    for C, dtype, words in ((96, np.uint16, "head size"), (128, np.float32, "bf16 only")):
        qkv = np.zeros((B, T, 3 * C), dtype)
        out, lse = np.zeros((B, T, C), dtype), np.zeros((B, NH, T), np.float32)
        with pytest.raises(ValueError, match=words):
            cu.flash_attention_forward(out, lse, qkv, B, T, C, NH)
    buf = np.zeros(B * T * 3 * 128 + 1, np.uint16)
    with pytest.raises(ValueError, match="16-byte"):
        cu.flash_attention_forward(np.zeros((B, T, 128), np.uint16), np.zeros((B, NH, T), np.float32),
                                   buf[1:], B, T, 128, NH)


def test_shared_memory_fits_the_default(cu):
    """The launchers' shared bytes are the kernel header's numbers, all under 48 KiB (no opt-in)."""
    got = {(hs, bwd): cu.flash_shared_bytes(hs, bwd) for hs in (64, 128) for bwd in (False, True)}
    assert got == {(64, False): 45824, (128, False): 48000, (64, True): 27904, (128, True): 44288}
    assert max(got.values()) <= 48 * 1024


def test_race_checker_names_a_missing_barrier(cu, monkeypatch):
    """A planted fault: without the barrier that ends a key tile's step in the forward, the next tile's k, v
    loads overwrite what other warps may still read. The race checker must name it, so that the checks
    above, which pass with it on, say something. (One fault: each is a build with -fsanitize=thread.)"""
    marker = "__syncthreads();                                   // before the next tile overwrites k, v, s, p, alpha"
    src = kernel_source("flash_attention")
    assert src.count(marker) == 1, marker
    use_order(monkeypatch, cu, emulator.RawModule(code=src.replace(marker, ""), options=BF16), "forward")
    B, T, C, NH = dims(100, 64, 1)
    qkv, dout = inputs(B, T, C, NH)
    with pytest.raises(emulator.RaceError, match="flash_attention_forward_kernel"):
        run_flash(cu, qkv, dout, B, T, C, NH)


@pytest.mark.parametrize("T,hs,order", [(100, 64, "warps"), (257, 128, "reverse")])
def test_flash_with_scores_growing_along_the_keys(cu, flash_mod, monkeypatch, T, hs, order):
    """Keys scaled by 1 + t/4: the scores' spread grows ~8 per key tile, so the running max moves past
    its slack on most tiles and o takes the rescale path (random inputs of unit scale almost never do).
    Against float64 only: the materialized path rounds scores of tens to bf16, off by far more than u."""
    B, T, C, NH = dims(T, hs, 6)
    qkv, dout = inputs(B, T, C, NH, seed=3)
    x = bf16_to_f32(qkv).reshape(B, T, 3, C)
    x[:, :, 1] *= (1 + np.arange(T, dtype=np.float32) / 4)[None, :, None]
    qkv = f32_to_bf16(x.reshape(B, T, 3 * C))
    want, scale = reference(qkv, dout, B, T, C, NH)
    assert np.abs(want["lse"]).max() > 50, "the scores should reach the tens"
    use_order(monkeypatch, cu, flash_mod, order)
    out, lse, dqkv = run_flash(cu, qkv, dout, B, T, C, NH)
    got = {"out": bf16_to_f32(out).astype(np.float64), **split_dqkv(dqkv, B, T, C)}
    errors = {name: rel_err(got[name], want[name], scale[name]) for name in ("out", "dq", "dk", "dv")}
    lse_err = float(np.abs(lse.astype(np.float64) - want["lse"]).max() / np.abs(want["lse"]).max())
    assert max(errors.values()) <= FLASH_TOL and lse_err <= 1e-6, f"T={T} hs={hs}: {errors}, lse (relative) {lse_err:.1e}"
