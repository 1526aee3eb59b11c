"""Every check that doc/precision.md describes, in its order. Run from anywhere:

    python doc/precision.py

Each check prints one line: [f64] or [f32], what is compared, and its max abs error. The script exits
non-zero if any error is above its tolerance (1e-10 in float64, 1e-5 in float32). Lines starting
with [info] are numbers the page quotes, not checks.
"""

import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from checks import check, kernel_module, launched, verdict  # noqa: E402  (doc/checks.py: the check lines)
from llmc.formats import bf16_to_f32, f32_to_bf16  # noqa: E402

torch.set_num_threads(1)
rng = np.random.default_rng(0)


# ---- 1. the bits: bf16 is the top half of a float32
def section1(emulated):
    # floats over a wide range of magnitudes and signs, plus values exactly halfway between two bf16
    x = (rng.standard_normal(100_000) * np.exp2(rng.integers(-60, 60, 100_000))).astype(np.float32)
    halfway = ((rng.integers(0, 1 << 16, 1000, dtype=np.uint32) << 16) | 0x8000).view(np.float32)
    x = np.concatenate([x, halfway[np.isfinite(halfway)]])
    ours = f32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    check("f64", "bits: f32_to_bf16 = torch's rounding to bfloat16", ours.astype(np.float64), theirs)
    check("f64", "bits: widening bf16 -> float32 is exact", bf16_to_f32(ours),
          torch.from_numpy(ours.view(np.int16)).view(torch.bfloat16).float().numpy())
    top_half = (x.view(np.uint32) >> 16).astype(np.uint16)
    print(f"[info] bits: rounded up (to nearest even) in {np.mean(ours != top_half):.1%} of the values; "
          f"relative error at most {np.max(np.abs(bf16_to_f32(ours) / x - 1)[np.abs(x) > 1e-30]):.2e} "
          f"(2^-8 = {2**-8:.2e}: half the gap between neighbours just above a power of 2)")
    if emulated is None:
        return
    # the kernels' conversion: residual_forward in a bf16 build adds two bf16 values in float and rounds once
    a, b = f32_to_bf16(x[:4096]), f32_to_bf16(x[4096:8192])
    out = np.empty(4096, np.uint16)
    launched(emulated["residual"], lambda cu: cu.residual_forward(out, a, b, 4096), packed=False)
    check("f64", "bits: the kernels' __float2bfloat16 = f32_to_bf16", out,
          f32_to_bf16(bf16_to_f32(a) + bf16_to_f32(b)))


# ---- 2. sums: accumulate in fp32, round once
def section2(emulated):
    values = rng.random(4096).astype(np.float32)        # 4096 numbers in [0, 1): the sum is about 2048
    running = np.uint16(0)
    for v in f32_to_bf16(values):                       # a bf16 accumulator: every partial sum rounded
        running = f32_to_bf16(bf16_to_f32(np.array([running]))[0:1] + bf16_to_f32(np.array([v])))[0]
    exact = bf16_to_f32(f32_to_bf16(values)).astype(np.float64).sum()
    print(f"[info] sums: 4096 values in [0, 1): exact {exact:.2f}, summed in a bf16 accumulator "
          f"{bf16_to_f32(np.array([running]))[0]:.2f}, summed in fp32 and rounded once "
          f"{bf16_to_f32(f32_to_bf16(np.array([exact], np.float32)))[0]:.2f}")
    if emulated is None:
        return
    # the bias gradient: column sums of a (N, OC) bf16 gradient, in fp32, added to dbias and rounded once
    N, OC = 256, 64
    dout = f32_to_bf16(rng.standard_normal((N, OC)).astype(np.float32))
    dbias = np.zeros(OC, np.uint16)
    launched(emulated["matmul"], lambda cu: cu.matmul_backward_bias(dbias, None, dout, N, OC))   # the plain kernel
    check("f64", "sums: bias backward = the column sums rounded once", bf16_to_f32(dbias),
          bf16_to_f32(f32_to_bf16(bf16_to_f32(dout).astype(np.float64).sum(0).astype(np.float32))))


# ---- 3. the update: master weights and stochastic rounding
def noise_hash(position, seed):
    """common.cuh's noise_hash on uint32 arrays: NumPy's uint32 arithmetic wraps modulo 2^32 as the GPU's."""
    h = position * np.uint32(0xD2A80A3F)
    h = h + np.uint32(seed)
    h ^= h >> np.uint32(9)
    h = h + np.uint32(0xA884F197)
    h ^= h >> np.uint32(11)
    h = h * np.uint32(0x6C736F4B)
    h ^= h >> np.uint32(13)
    h = h + np.uint32(0xB79F3ABB)
    h ^= h >> np.uint32(15)
    h = h * np.uint32(0x1B56C4F5)
    h ^= h >> np.uint32(17)
    return h


def stochastic_round(values, seed, block):
    """common.cuh's stochastic_round for a 1-D launch of `block` threads per block, element i on thread i."""
    i = np.arange(values.size, dtype=np.uint32)
    thread, blk = i % np.uint32(block), i // np.uint32(block)
    threshold = noise_hash(thread + np.uint32(198491317) * (blk * np.uint32(block)), seed) & np.uint32(0xFFFF)
    bits = values.astype(np.float32).view(np.uint32)
    low = bits & np.uint32(0xFFFF)
    bits = np.where(low > threshold, bits | np.uint32(0xFFFF), bits & ~np.uint32(0xFFFF))
    return f32_to_bf16(bits.view(np.float32))


def adamw_numpy(w, g, m, v, lr, beta1, beta2, eps, t):
    """One AdamW step on float64 arrays (no weight decay)."""
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return w - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps), m, v


def section3(emulated):
    n, lr, steps = 8192, 1e-4, 1000
    # a constant gradient of 1: AdamW's m_hat / sqrt(v_hat) is 1, so each step moves a weight by lr
    w_nearest = np.ones(n, np.float32)
    for _ in range(steps):
        w_nearest = bf16_to_f32(f32_to_bf16(w_nearest - np.float32(lr)))
    w_stochastic = np.ones(n, np.float32)
    for step in range(steps):
        w_stochastic = bf16_to_f32(stochastic_round(w_stochastic - np.float32(lr), seed=step, block=512))
    print(f"[info] update: {steps} steps of -{lr:g} from 1.0: fp32 {1 - steps * lr:.4f}; bf16 rounded to nearest "
          f"{w_nearest.mean():.4f} (every step lost); bf16 rounded stochastically, mean over {n} weights "
          f"{w_stochastic.mean():.4f} (each weight is on the bf16 grid: {np.unique(w_stochastic).size} values)")
    if emulated is None:
        return
    master = rng.standard_normal(n).astype(np.float32)
    params, m, v = f32_to_bf16(master), np.zeros(n, np.float32), np.zeros(n, np.float32)
    w64, m64, v64 = master.astype(np.float64), np.zeros(n), np.zeros(n)
    for t in range(1, 4):
        grads = f32_to_bf16(rng.standard_normal(n).astype(np.float32))
        seed = 1000 + t
        launched(emulated["adamw"], lambda cu: cu.adamw_update(params, master, grads, m, v, n, n, 1, 1e-3, 0.9, 0.95,
                                                               1 - 0.9 ** t, 1 - 0.95 ** t, 1e-8, 0.0, 1.0, seed))
        w64, m64, v64 = adamw_numpy(w64, bf16_to_f32(grads), m64, v64, 1e-3, 0.9, 0.95, 1e-8, t)
    check("f32", "update: the master weights follow AdamW in fp32", master, w64)
    check("f64", "update: the bf16 weights are the master's stochastic rounding", bf16_to_f32(params),
          bf16_to_f32(stochastic_round(master, seed=seed, block=512)))


def main():
    emulated = None
    modules = {name: kernel_module(name, bf16=True) for name in ("residual", "matmul", "adamw")}
    if all(m is not None for m in modules.values()):
        emulated = modules
    section1(emulated)
    section2(emulated)
    section3(emulated)
    verdict()


if __name__ == "__main__":
    main()
