"""
One layer's causal attention, forward + backward, three ways on one GPU, then the whole d12 training step
with each of our two paths:

  python dev/bench_attention.py                   # B=16 NH=12 hs=64, T=1024 and 2048; then d12 B=16 T=1024
                                                  # with -fa 1 and -fa 0 (needs the tiny shakespeare .bin files)
  python dev/bench_attention.py --step 0          # the layer only
  python dev/bench_attention.py --time 0 -B 4 -T 1,7,64,100,257,1024 --hs 64,128   # only the comparison
  python dev/bench_attention.py -T 512 --reps 50  # another T, more repetitions
  LLMC_EMULATE=1 python dev/bench_attention.py    # no GPU: a tiny shape through the kernel emulator and PyTorch
                                                  # on the CPU, to check the plumbing (its times mean nothing)

The three, on the same bf16 inputs (qkv (B,T,3C) and dout (B,T,C), seeded normal numbers):
  flash         train_gpt2_cuda.flash_attention_forward + flash_attention_backward (kernels/flash_attention.cu):
                qkv in, out and the log-sum-exp out; dqkv back, no (B,NH,T,T) tensor anywhere
  materialized  train_gpt2_cuda.attention_forward + attention_backward (-fa 0): the permute, softmax and
                unpermute kernels of kernels/attention.cu around cuBLAS's strided-batched GEMMs
  SDPA          torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) in bf16 on
                views of a (B,T,3C) tensor, its output made (B,T,C) again, then .backward(dout): what
                train_gpt2_torch.py --flash 1 runs (PyTorch picks its own flash kernel)
Before any timing the outputs are compared: out, dq, dk and dv of each against PyTorch's SDPA in fp32 on the
same (bf16) inputs, as max |error| / max(max |reference|, 1); flash and the materialized path must each be within
AGREE_FACTOR x SDPA bf16's own error plus STEPS[path] bf16 steps (BF16_STEP; the materialized path gets two, since
it also rounds the scores and datt/dpreatt to bf16), else the script exits 1 without timing anything
(--time 0: the comparison only, for gpu_check's correctness stage).
Timing: CUDA events around the forward and around the backward of each repetition (the copy the
materialized path needs first, since its permute consumes the scratch qkv lives in, is outside them);
median over --reps after --warmup. Target: flash's forward + backward within FLASH_TARGET x SDPA's.
The step: train_gpt2_cuda.py -e MODEL -b 16 -t 1024 -p bf16 -x STEPS -v 0 -s 0 with -fa 1 and with -fa 0, each
in its own process (MODEL: gpt2_d12_bf16.bin where the export made it, else d12 from scratch); tokens/s is
the median of its step lines after the first two. Target: -fa 1 at least STEP_TARGET x -fa 0. A target not
met is reported, not an error (exit 0).
Without a GPU (and without LLMC_EMULATE=1) it says so in one line and exits 0: nothing to time.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from llmc.formats import bf16_to_f32, f32_to_bf16  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import gpu_status  # noqa: E402

FLASH_TARGET = 1.3        # the aim: flash's layer forward + backward within 1.3x of SDPA's time
STEP_TARGET = 1.2         # the aim: the d12 step's tokens/s with -fa 1 at least 1.2x -fa 0's
AGREE_FACTOR = 2.0        # our error may be this many times SDPA bf16's ...
BF16_STEP = 2.0**-8       # ... plus STEPS bf16 steps (relative): each path rounds at its own places
STEPS = {"flash": 1, "materialized": 2}   # flash rounds P and dS; the materialized path the scores too
EMULATED_SHAPE = dict(B=1, NH=2, hs=64, T=[33])   # two key tiles, a short last one: seconds on the emulator
STEP_LINE = re.compile(r"^step +(\d+)/\d+: .*\(([\d.]+) ms, (\d+) tok/s")


# ----------------------------------------------------------------------------
# the three paths: each a (forward, backward) pair of closures over its own buffers, so a repetition is
# two calls; results() reads out and dqkv back to the host as float32

class Flash:
    name = "flash"

    def __init__(self, tc, qkv, dout, B, T, C, NH):
        xp = tc.xp
        self.tc, self.args = tc, (B, T, C, NH)
        self.qkv, self.dout = qkv, dout
        self.out = xp.zeros((B, T, C), tc.BF16)
        self.lse = xp.zeros((B, NH, T), np.float32)
        self.dqkv = xp.zeros((B, T, 3 * C), tc.BF16)
        self.scratch = xp.zeros(tc.flash_scratch_size(B, T, C, NH), np.float32)

    def prepare(self):
        pass

    def forward(self):
        self.tc.flash_attention_forward(self.out, self.lse, self.qkv, *self.args)

    def backward(self):
        self.tc.flash_attention_backward(self.dqkv, self.scratch, self.dout, self.qkv, self.out, self.lse, *self.args)

    def results(self):
        return self.tc.to_numpy(self.out), self.tc.to_numpy(self.dqkv)


class Materialized:
    name = "materialized"

    def __init__(self, tc, qkv, dout, B, T, C, NH):
        xp, fx = tc.xp, tc.BF16
        hs = C // NH
        self.tc, self.args = tc, (B, T, C, NH)
        self.qkv, self.dout = qkv, dout
        big = max(B * T * 3 * C, B * NH * T * T)             # inp doubles as preatt and att @ v (attention_forward)
        self.inp = xp.zeros(big, fx)
        self.out = xp.zeros((B, T, C), fx)
        self.qkvr = xp.zeros(3 * B * NH * T * hs, fx)
        self.att = xp.zeros((B, NH, T, T), fx)
        self.dinp = xp.zeros((B, T, 3 * C), fx)
        self.dqkvr = xp.zeros(3 * B * T * C, fx)
        self.dpreatt, self.datt = xp.zeros(big, fx), xp.zeros(big, fx)
        self.scratch = xp.zeros(B * T * C, fx)

    def prepare(self):                                        # the permute consumes inp: refill it, untimed
        self.tc.view(self.inp, *self.qkv.shape)[...] = self.qkv

    def forward(self):
        self.tc.attention_forward(self.out, self.qkvr, self.att, self.inp, *self.args)

    def backward(self):
        self.tc.attention_backward(self.dinp, self.dqkvr, self.dpreatt, self.datt, self.scratch, self.dout,
                                   self.qkvr, self.att, *self.args)

    def results(self):
        return self.tc.to_numpy(self.out), self.tc.to_numpy(self.dinp)


class SDPA:
    name = "SDPA"

    def __init__(self, torch, device, dtype, qkv, dout, B, T, C, NH):
        self.torch, self.shape = torch, (B, T, C, NH)
        self.qkv = torch.tensor(qkv, device=device).to(dtype).requires_grad_()   # (B, T, 3C)
        self.dout = torch.tensor(dout, device=device).to(dtype)                   # (B, T, C)

    def prepare(self):
        self.qkv.grad = None

    def forward(self):
        B, T, C, NH = self.shape
        q, k, v = self.qkv.view(B, T, 3, NH, C // NH).unbind(2)                  # 3 x (B, T, NH, hs)
        y = self.torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)   # (B, NH, T, hs)
        self.y = y.transpose(1, 2).reshape(B, T, C)                                # (B, T, C), a copy

    def backward(self):
        self.y.backward(self.dout)

    def results(self):
        return (self.y.detach().float().cpu().numpy(), self.qkv.grad.float().cpu().numpy())


# ----------------------------------------------------------------------------
# agreement, then timing

def errors(got, ref, C):
    """max |got - ref| / max(max |ref|, 1) of out, dq, dk, dv (got and ref: (out, dqkv) pairs): relative where
    the reference is O(1) or more, absolute where it is small (dq and dk are exactly 0 at T=1, and a flash
    kernel's are ~1e-7 there: D and dO.v summed in different orders do not cancel to the last bit)."""
    pairs = [("out", got[0], ref[0])] + [(n, got[1][..., i * C:(i + 1) * C], ref[1][..., i * C:(i + 1) * C])
                                         for i, n in enumerate(("dq", "dk", "dv"))]
    return {n: float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1.0)) for n, a, b in pairs}


def agree(errs):
    """Our two paths' errors against SDPA bf16's: "path tensor" for each off by more than the tolerance."""
    return [f"{path} {n}" for path in ("flash", "materialized") for n, e in errs[path].items()
            if not e <= AGREE_FACTOR * errs["SDPA"][n] + STEPS[path] * BF16_STEP]


class Timer:
    """Spans on the device: the trainer's events (host clocks under the emulator) for ours, torch.cuda's
    for PyTorch (the host clock on the CPU)."""

    def __init__(self, tc, torch, on_torch):
        self.tc, self.torch, self.on_torch = tc, torch, on_torch
        self.cuda = on_torch and torch.cuda.is_available() and not tc.EMULATE

    def mark(self):
        if self.on_torch:
            if self.cuda:
                e = self.torch.cuda.Event(enable_timing=True)
                e.record()
                return e
            return time.perf_counter()
        e = self.tc.Event()
        e.record()
        return e

    def ms(self, a, b):
        if self.on_torch:
            if self.cuda:
                b.synchronize()
                return a.elapsed_time(b)
            return (b - a) * 1000
        b.synchronize()
        return self.tc.elapsed_ms(a, b)


def time_path(path, timer, reps, warmup):
    """Median forward and backward ms over reps, after warmup untimed repetitions."""
    fwd, bwd = [], []
    for i in range(warmup + reps):
        path.prepare()
        t0 = timer.mark()
        path.forward()
        t1 = timer.mark()
        path.backward()
        t2 = timer.mark()
        if i >= warmup:
            fwd.append(timer.ms(t0, t1))
            bwd.append(timer.ms(t1, t2))
    return statistics.median(fwd), statistics.median(bwd)


def layer(tc, torch, B, NH, hs, T, reps, warmup):
    """One shape: build the inputs, check the three paths agree, time them (reps > 0); returns
    {name: (fwd, bwd)} ({} untimed), or None when they disagree."""
    C = NH * hs
    device = "cpu" if tc.EMULATE else "cuda"
    rng = np.random.default_rng(1234 + T)
    qkv_bits = f32_to_bf16(rng.standard_normal((B, T, 3 * C)).astype(np.float32))   # bf16 (uint16 bits)
    dout_bits = f32_to_bf16(rng.standard_normal((B, T, C)).astype(np.float32))
    qkv32, dout32 = bf16_to_f32(qkv_bits), bf16_to_f32(dout_bits)                     # the same numbers, exactly
    qkv, dout = tc.xp.asarray(qkv_bits), tc.xp.asarray(dout_bits)
    paths = [Flash(tc, qkv, dout, B, T, C, NH), Materialized(tc, qkv, dout, B, T, C, NH),
             SDPA(torch, device, torch.bfloat16, qkv32, dout32, B, T, C, NH)]
    reference = SDPA(torch, device, torch.float32, qkv32, dout32, B, T, C, NH)
    for p in paths + [reference]:
        p.prepare()
        p.forward()
        p.backward()
    ref = reference.results()
    del reference
    errs = {p.name: errors(p.results(), ref, C) for p in paths}
    print(f"\n== B={B} NH={NH} hs={hs} T={T}, bf16: max |x - SDPA fp32| / max(max |SDPA fp32|, 1), "
          "on the same bf16 inputs")
    print(f"{'path':<14}" + "".join(f"{n:>10}" for n in ("out", "dq", "dk", "dv")))
    for name, e in errs.items():
        print(f"{name:<14}" + "".join(f"{e[n]:10.2e}" for n in ("out", "dq", "dk", "dv")))
    off = agree(errs)
    if off:
        print(f"FAILED: {', '.join(off)} off SDPA's (tolerance {AGREE_FACTOR:g} x SDPA bf16's error + "
              f"{STEPS['flash']} (flash) or {STEPS['materialized']} (materialized) x {BF16_STEP:.2e}); nothing timed")
        return None
    print(f"flash and materialized agree with SDPA: every error within {AGREE_FACTOR:g} x SDPA bf16's + "
          f"{STEPS['flash']} (flash) or {STEPS['materialized']} (materialized) x {BF16_STEP:.2e}")
    if reps == 0:
        return {}
    times = {}
    for p in paths:
        times[p.name] = time_path(p, Timer(tc, torch, isinstance(p, SDPA)), reps, warmup)
    print(f"{'path':<14}{'forward ms':>12}{'backward ms':>13}{'total ms':>10}")
    for name, (f, b) in times.items():
        print(f"{name:<14}{f:12.3f}{b:13.3f}{f + b:10.3f}")
    ratio = sum(times["flash"]) / sum(times["SDPA"])
    print(f"flash / SDPA time (T={T}): {ratio:.2f}x (target <= {FLASH_TARGET}x: "
          f"{'met' if ratio <= FLASH_TARGET else 'not met'}); materialized / flash: "
          f"{sum(times['materialized']) / sum(times['flash']):.2f}x")
    return times


# ----------------------------------------------------------------------------
# the d12 training step with -fa 1 and -fa 0

def step_tokens_per_second(log, skip=2):
    """The median tok/s of a training log's step lines after the first `skip` (compiles, warm-up)."""
    rates = [int(m[3]) for m in (STEP_LINE.match(line) for line in log.splitlines()) if m]
    if len(rates) <= skip:
        raise ValueError(f"expected more than {skip} step lines with tok/s, found {len(rates)}")
    return statistics.median(rates[skip:])


def train_step(model, fa, B, T, steps, python):
    """tokens/s of train_gpt2_cuda.py -e model in bf16 with -fa fa; exits 1 on a failed run."""
    cmd = [python, "train_gpt2_cuda.py", "-e", model, "-b", str(B), "-t", str(T), "-p", "bf16", "-x", str(steps),
           "-v", "0", "-s", "0", "-fa", str(fa)]
    print("-- " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"bench_attention.py: the -fa {fa} run failed (exit {r.returncode})")
    lines = [line for line in r.stdout.splitlines() if line.startswith("attention:")]
    print("\n".join(lines[:1]) or "(no 'attention:' start-up line)")
    if fa == 1 and not (lines and lines[0].startswith("attention: flash")):
        raise SystemExit("bench_attention.py: -fa 1 did not run flash attention (see its start-up line above)")
    return step_tokens_per_second(r.stdout)


def step(args):
    data = os.path.join(REPO, "data", "tinyshakespeare", "tiny_shakespeare_train.bin")
    if not os.path.exists(data):
        print(f"\n(the d12 step: skipped, no {os.path.relpath(data, REPO)}: run prepro_tinyshakespeare.py)")
        return
    model = "gpt2_d12_bf16.bin" if os.path.exists(os.path.join(REPO, "gpt2_d12_bf16.bin")) else "d12"
    print(f"\n== the d12 step ({model}), B={args.step_batch} T={args.step_seq_len} bf16, {args.step_steps} steps each")
    rates = {fa: train_step(model, fa, args.step_batch, args.step_seq_len, args.step_steps, sys.executable)
             for fa in (1, 0)}
    ratio = rates[1] / rates[0]
    print(f"tokens/s: -fa 1 {rates[1]:.0f}, -fa 0 {rates[0]:.0f}")
    print(f"step -fa 1 / -fa 0 in tokens/s: {ratio:.2f}x (target >= {STEP_TARGET}x: "
          f"{'met' if ratio >= STEP_TARGET else 'not met'})")


def main(argv=None):
    parser = argparse.ArgumentParser(description="One layer's causal attention, forward + backward: flash vs "
                                                 "materialized vs PyTorch SDPA on a GPU; then the d12 step with "
                                                 "-fa 1|0.")
    parser.add_argument("-B", type=int, default=16, help="batch size of the layer")
    parser.add_argument("--NH", type=int, default=12, help="heads")
    parser.add_argument("--hs", default="64", help="comma-separated head sizes (flash takes 64 and 128)")
    parser.add_argument("-T", default="1024,2048", help="comma-separated sequence lengths")
    parser.add_argument("--time", type=int, default=1, help="0: compare the three paths only, time nothing")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--step", type=int, default=1, help="1: then the d12 step with -fa 1 and -fa 0 (GPU only)")
    parser.add_argument("--step_batch", type=int, default=16)
    parser.add_argument("--step_seq_len", type=int, default=1024)
    parser.add_argument("--step_steps", type=int, default=8, help="training steps per run (the first 2 not counted)")
    args = parser.parse_args(argv)
    try:
        Ts, head_sizes = ([int(x) for x in a.split(",") if x.strip()] for a in (args.T, args.hs))
    except ValueError:
        parser.error(f"-T and --hs must be comma-separated integers, got {args.T!r} and {args.hs!r}")
    if not Ts or not head_sizes or min(Ts + head_sizes) < 1 or args.B < 1 or args.NH < 1 or args.reps < 1 \
            or args.warmup < 0:
        parser.error("-B, --NH, --reps, every T and every head size must be >= 1, --warmup >= 0")
    if args.step_steps < 3:
        parser.error("--step_steps must be >= 3 (the first 2 steps are not counted)")

    emulate = os.environ.get("LLMC_EMULATE", "0") == "1"
    if not emulate:
        why = gpu_status()
        if why is not None:
            print(f"bench_attention.py: no GPU ({why}): nothing to time (LLMC_EMULATE=1 runs a tiny shape on "
                  "the CPU emulator)")
            return 0
    import torch
    import train_gpt2_cuda as tc
    if not hasattr(tc, "flash_attention_forward"):
        raise SystemExit("bench_attention.py: train_gpt2_cuda.py has no flash_attention_forward in this checkout")
    torch.backends.cuda.matmul.allow_tf32 = False            # the fp32 reference in full fp32
    if emulate:
        defaults = {a: parser.get_default(a) for a in ("B", "NH", "hs", "T")}
        if all(getattr(args, a) == v for a, v in defaults.items()):
            args.B, args.NH, Ts = EMULATED_SHAPE["B"], EMULATED_SHAPE["NH"], EMULATED_SHAPE["T"]
            head_sizes = [EMULATED_SHAPE["hs"]]
        args.reps, args.warmup = min(args.reps, 2), min(args.warmup, 1)
        print(f"LLMC_EMULATE=1: the kernel emulator and PyTorch on the CPU, B={args.B} NH={args.NH} "
              f"hs={','.join(map(str, head_sizes))} T={','.join(map(str, Ts))}: checks the plumbing, the times "
              "mean nothing")
    else:
        print(f"device {tc.device_name()}, torch {torch.__version__}")
    ratios = {}
    for hs in head_sizes:
        for T in Ts:
            times = layer(tc, torch, args.B, args.NH, hs, T, args.reps if args.time else 0, args.warmup)
            if times is None:
                return 1
            if times:
                ratios[(hs, T)] = sum(times["flash"]) / sum(times["SDPA"])
    if not args.time:
        print(f"\nsummary: flash and materialized agree with SDPA at B={args.B} NH={args.NH}, "
              f"{len(head_sizes) * len(Ts)} shapes (hs {','.join(map(str, head_sizes))}, T {','.join(map(str, Ts))})")
        return 0
    print(f"\nsummary: flash / SDPA fwd+bwd at B={args.B} NH={args.NH}: "
          + ", ".join(f"hs={hs} T={T} {r:.2f}x" for (hs, T), r in ratios.items())
          + f" (target <= {FLASH_TARGET}x: {'met' if max(ratios.values()) <= FLASH_TARGET else 'not met'})")
    if args.step and emulate:
        print("(the d12 step: not on the emulator)")
    elif args.step:
        tc.xp.get_default_memory_pool().free_all_blocks()   # the layers' buffers, for the training processes
        torch.cuda.empty_cache()
        step(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
