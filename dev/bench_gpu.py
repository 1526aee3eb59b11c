"""
Time whole training steps of our CuPy trainer (train_gpt2_cuda.py) against PyTorch on one GPU, in fp32
(TF32 GEMMs) and in bf16 mixed precision, the same run.

  python dev/bench_gpu.py                       # d12 (GPT-2 124M shapes), T=1024: fp32 and bf16 at B=16,
                                                # then bf16 at the largest B that fits both trainers
  python dev/bench_gpu.py --precision bf16      # bf16 only (B=16 and the largest B)
  python dev/bench_gpu.py --max_batch 0         # B=16 only; --max_batch 64: the second round at B=64
  python dev/bench_gpu.py --steps 50 --tf32 0   # fp32: full fp32 GEMMs on both sides
  python dev/bench_gpu.py --dry_run 1           # no GPU: a tiny model, ours on the kernel emulator
                                                # (LLMC_EMULATE=1), PyTorch eager on the CPU; checks the plumbing

A round is one precision at one B: ours, then PyTorch, each in a fresh process, one after the other.
  fp32: ours is train_gpt2_cuda.py -p fp32 (TF32 GEMMs when --tf32 1: cuBLAS math mode); PyTorch runs as
        `train_gpt2_torch.py --compile 1 --tensorcores 1` does.
  bf16: ours is train_gpt2_cuda.py -p bf16 -w 1 -r 1 (llm.c's mainline recipe: bf16 parameters, gradients
        and activations, fp32 master weights and AdamW state); PyTorch runs as
        `train_gpt2_torch.py --dtype bfloat16 --compile 1 --flash 1 --tensorcores 1` does: fp32 weights,
        the forward under torch.autocast(bfloat16), scaled_dot_product_attention.
PyTorch: torch.compile (inductor, coordinate descent tuning), the model's configure_optimizers (fused AdamW
on CUDA), clip_grad_norm_ 1.0. Ours: train_gpt2.cu's step: forward, zero_grad, backward, global norm, AdamW
with the clip scale. Same weights (gpt2_d12.bin, or d12 built from scratch), same batches (tiny shakespeare
train, or seeded random tokens), AdamW lr 1e-4, betas (0.9, 0.95), eps 1e-8, no weight decay.
A step is timed on the host from its start to a device synchronize at its end; a round reports the median
ms/step, tokens/s = B*T / median, MFU (llmc/mfu.py: the model's 6N + 6LCT FLOPs per token against the GPU's
dense peak for the GEMMs' precision, the same FLOPs for both trainers) and the peak GPU memory: the framework
allocator's high-water mark (CuPy's memory pool, which keeps what it allocated; torch.cuda.max_memory_reserved)
and the device's used memory (context included). bf16 rounds print ours/PyTorch in tokens/s against the
target (>= 1.07x).
The largest B that fits both (--max_batch -1): ours from its memory report (train_gpt2_cuda.largest_batch_size
on the free memory it measured with its parameters in place, less MAX_BATCH_HEADROOM for what the report does
not count: cuBLAS's workspace, the compiled kernels), and at most what the attention kernels' 32-bit indices
allow (B*NH*T*T < 2^31: B <= 170 for d12 at T=1024, which the memory report does not check); PyTorch's estimated from its B=16 bf16 run, whose peak
allocated memory is linear in B: peak(B) = fixed + B * per_sample, with fixed = what was allocated before
the first step (the weights) plus AdamW's m and v, so per_sample = (peak(16) - fixed) / 16 (an upper bound:
the gradients, also fixed, count as per-sample here), and B = (TORCH_USABLE x the free memory at its start
- fixed) / per_sample. PyTorch runs first in that round; if it still runs out of memory, the round is
retried once at MAX_BATCH_RETRY x that B.
Our step is also broken down by layer function with CUDA events (train_gpt2_cuda.Event) around each launcher
(GPU time from the launcher's first kernel to its last, summed over layers), over --breakdown extra steps run
after the timed ones, so the events never touch the timing.
"""

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (Profiler, add_run_args, check_data, find_checkpoint, get_batches, gpu_status,  # noqa: E402
                          parse_run_args, print_breakdown, print_run, run_worker, step_ms, worker_main)

ADAMW = dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0)
DRY_RUN_SHAPE = dict(max_seq_len=32, vocab_size=500, num_layers=2, num_heads=2, channels=32)
PRECISIONS = ("fp32", "bf16")     # the order the rounds run in: the fp32 baseline, then bf16
TARGET = 1.07                     # the aim: ours in bf16 at least 1.07x PyTorch's tokens/s
MAX_BATCH_HEADROOM = 2**30        # bytes kept free beside our memory report's total at the largest B
TORCH_USABLE = 0.9                # the share of free memory PyTorch's estimate may plan on (allocator slack)
MAX_BATCH_RETRY = 0.85            # the largest-B round's second try, when PyTorch ran out of memory


class EventTimer:
    """Spans made of the trainer's CUDA events (host clocks under the emulator); read after the step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def start(self):
        start, end = self.trainer.Event(), self.trainer.Event()
        start.record()
        return start, end

    def stop(self, span):
        span[1].record()

    def seconds(self, span):
        span[1].synchronize()
        return self.trainer.elapsed_ms(span[0], span[1]) / 1000.0


def flops_per_token(config, T):
    """The model's training FLOPs per token (llmc/mfu.py), the same count for both trainers."""
    from llmc.model import num_parameters
    from llmc.mfu import flops_per_token as count
    return count(num_parameters(config), config.num_layers, config.channels, T)


def attention_index_limit(config, T):
    """The largest B our attention kernels can index: they address att (B, NH, T, T) with 32-bit ints
    (kernels/attention.cu assumes B*NH*T*T < 2^31), a limit the memory report does not know."""
    return (2**31 - 1) // (config.num_heads * T * T)


def worker_ours(args):
    import train_gpt2_cuda as tc
    tc.require_gpu()
    bf16 = args.precision == "bf16"
    tf32 = False if bf16 else tc.set_tf32(args.tf32)   # as device_setup: TF32 is the fp32 GEMMs' switch
    profiler = Profiler(tc, timer=EventTimer(tc)) if args.breakdown else None
    if profiler is not None:  # the fused classifier is a layer too, though not named _forward/_backward
        for name in ("fused_classifier",):
            if hasattr(tc, name):
                setattr(tc, name, profiler.wrap(getattr(tc, name), name, None))
    master = bool(args.master_weights)
    model = tc.gpt2_build_from_checkpoint(args.checkpoint, args.recompute, args.precision, master)
    B, T = args.batch_size, args.seq_len
    # what the memory report counts from: free memory with the parameters and their gradients in place
    memory = tc.device_memory()
    by_memory = None if memory is None else tc.largest_batch_size(
        model.config, T, args.recompute, memory[0] - MAX_BATCH_HEADROOM, args.precision, master)
    by_index = attention_index_limit(model.config, T)
    largest = None if by_memory is None else min(by_memory, by_index)
    timed_end = args.warmup + args.steps  # then args.breakdown more steps, profiled (not in the timing)
    batches = get_batches(args.data, B, T, timed_end + args.breakdown, model.config.vocab_size)

    def synchronize():
        if not tc.EMULATE:
            tc.xp.cuda.Device().synchronize()

    mem_used = 0
    times, profiled_times, losses = [], [], []
    for i, (x, y) in enumerate(batches):
        if profiler is not None:
            profiler.enabled = i >= timed_end
        synchronize()
        t0 = time.perf_counter()
        tc.gpt2_forward(model, x, y, B, T)
        tc.gpt2_zero_grad(model)
        tc.gpt2_backward(model)
        norm = tc.gpt2_calculate_grad_norm(model)
        scale = tc.grad_clip_scale(norm, ADAMW["grad_clip"])
        tc.gpt2_update(model, ADAMW["learning_rate"], ADAMW["beta1"], ADAMW["beta2"], ADAMW["eps"],
                       ADAMW["weight_decay"], i + 1, grad_scale=scale)
        synchronize()
        dt = time.perf_counter() - t0
        if profiler is not None:
            profiler.flush()
        if i < timed_end:
            losses.append(float(model.mean_loss))
        if args.warmup <= i < timed_end:
            times.append(dt)
        elif i >= timed_end:
            profiled_times.append(dt)
        if not tc.EMULATE:
            free, total = tc.xp.cuda.runtime.memGetInfo()
            mem_used = max(mem_used, total - free)
        what = ", warm-up" if i < args.warmup else ", profiled" if i >= timed_end else ""
        print(f"  ours {args.precision} step {i}: loss {model.mean_loss:.6f} norm {norm:.4f} "
              f"({dt * 1000:.1f} ms{what})", file=sys.stderr, flush=True)
    pool = 0 if tc.EMULATE else tc.xp.get_default_memory_pool().total_bytes()
    return dict(times=times, losses=losses, device=tc.device_name(), tf32=bool(tf32),
                gemm="bf16" if bf16 else "tf32" if tf32 else "fp32",
                flops_per_token=flops_per_token(model.config, T), largest_batch=largest,
                largest_by_memory=by_memory, largest_by_index=by_index,
                alloc_peak_mib=pool / 2**20, device_used_mib=mem_used / 2**20,
                breakdown=profiler.rows(args.breakdown) if profiler is not None else [],
                profiled_times=profiled_times)


def worker_torch(args):
    import numpy as np
    import torch
    import train_gpt2_torch as tt
    device = "cpu" if args.dry_run else "cuda"
    bf16 = args.precision == "bf16"
    torch.manual_seed(42)
    # --tensorcores 1
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    free_at_start = torch.cuda.mem_get_info()[0] if device == "cuda" else 0   # what this process may use
    model = tt.model_from_file(args.checkpoint, flash=args.flash).to(device)   # --flash
    model.train()
    # --dtype bfloat16: autocast around the forward (and the loss), the weights and AdamW stay fp32
    # (autocast on the CPU, in the dry run, only to take the same path)
    ctx = torch.amp.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext()
    compiled = bool(args.compile) and not args.dry_run
    if compiled:  # --compile 1
        import torch._inductor.config as inductor_config
        if hasattr(inductor_config, "coordinate_descent_tuning"):
            inductor_config.coordinate_descent_tuning = True
        model = torch.compile(model)
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    optimizer = raw.configure_optimizers(weight_decay=ADAMW["weight_decay"], learning_rate=ADAMW["learning_rate"],
                                         betas=(ADAMW["beta1"], ADAMW["beta2"]), device_type=device, zero_stage=0)
    # the part of the peak that does not grow with B: the weights (here now) and AdamW's m and v (made at
    # the first step, one fp32 value per weight each)
    weight_bytes = sum(p.numel() * p.element_size() for p in raw.parameters())
    fixed = (torch.cuda.memory_allocated() if device == "cuda" else weight_bytes) + 2 * weight_bytes
    B, T = args.batch_size, args.seq_len
    batches = get_batches(args.data, B, T, args.warmup + args.steps, raw.config.vocab_size)

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    out_of_memory = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", MemoryError))
    mem_used = 0
    times, losses = [], []
    try:
        for i, (x, y) in enumerate(batches):
            x = torch.from_numpy(x.astype(np.int64)).to(device)
            y = torch.from_numpy(y.astype(np.int64)).to(device)
            if i == args.warmup and device == "cuda":
                torch.cuda.reset_peak_memory_stats()  # compile-time scratch is not the training's
            synchronize()
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with ctx:
                _, loss = model(x, y, return_logits=False)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), ADAMW["grad_clip"]))
            optimizer.step()
            synchronize()
            dt = time.perf_counter() - t0
            losses.append(loss.item())
            if i >= args.warmup:
                times.append(dt)
            if device == "cuda":
                free, total = torch.cuda.mem_get_info()
                mem_used = max(mem_used, total - free)
            print(f"  torch {args.precision} step {i}: loss {losses[-1]:.6f} norm {norm:.4f} ({dt * 1000:.1f} ms"
                  f"{'' if i >= args.warmup else ', warm-up'})", file=sys.stderr, flush=True)
    except out_of_memory as e:  # the largest-B round may overshoot: say so, and let main() retry
        print(f"  torch {args.precision} at B={B}: out of memory ({str(e).splitlines()[0][:200]})",
              file=sys.stderr, flush=True)
        return dict(out_of_memory=True)
    peak = torch.cuda.max_memory_reserved() if device == "cuda" else 0
    peak_allocated = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    return dict(times=times, losses=losses, device=name, tf32=bool(args.tf32), flash=bool(args.flash),
                gemm="bf16" if bf16 else "tf32" if args.tf32 and device == "cuda" else "fp32",
                flops_per_token=flops_per_token(tt.llmc_config(raw.config), T),
                torch=torch.__version__, alloc_peak_mib=peak / 2**20, device_used_mib=mem_used / 2**20,
                fused_adamw=bool(optimizer.param_groups[0].get("fused")), out_of_memory=False,
                free_at_start=free_at_start, fixed_bytes=fixed, peak_allocated=peak_allocated)


def torch_largest_batch(res, B):
    """PyTorch's largest B, estimated from one run at B (see the top of the file), or None."""
    if not res.get("free_at_start") or res["peak_allocated"] <= res["fixed_bytes"]:
        return None
    per_sample = (res["peak_allocated"] - res["fixed_bytes"]) / B
    return max(0, int((TORCH_USABLE * res["free_at_start"] - res["fixed_bytes"]) // per_sample))


def run_trainer(trainer, args, result_path):
    """Run one trainer in a fresh process; returns the result dict it wrote."""
    env = dict(os.environ)
    if args.dry_run:
        env["LLMC_EMULATE"] = "1"
    result, _ = run_worker(__file__, trainer, args, result_path, env=env, extra_args=[
        "--tf32", str(args.tf32), "--compile", str(args.compile), "--breakdown", str(args.breakdown),
        "--dry_run", str(args.dry_run), "--precision", args.precision, "--flash", str(args.flash),
        "--recompute", str(args.recompute), "--master_weights", str(args.master_weights)])
    return result


def make_tiny_checkpoint(path):
    """A seeded random model of DRY_RUN_SHAPE (V=500 pads to Vp=512), for --dry_run."""
    import numpy as np
    import train_gpt2
    from llmc.formats import write_model_file
    from llmc.model import GPT2Config, num_parameters, padded_vocab
    config = GPT2Config(padded_vocab_size=padded_vocab(DRY_RUN_SHAPE["vocab_size"]), **DRY_RUN_SHAPE)
    model = train_gpt2.GPT2(config, np.zeros(num_parameters(config), np.float32))
    train_gpt2.init_weights(model, 42)  # the trainer's own seeded init (the padding rows of wte stay 0)
    write_model_file(path, config, model.params_memory)


# ----------------------------------------------------------------------------
# rounds: one precision at one B, both trainers

def round_args(args, precision, B):
    """The command line of one round: args with the precision, B, and PyTorch's attention for it."""
    r = copy.copy(args)
    r.precision, r.batch_size = precision, B
    r.flash = (1 if precision == "bf16" else 0) if args.flash < 0 else args.flash
    return r


def run_round(args, trainers, tmp):
    """Run the trainers of one round, one after the other; {trainer: result}."""
    return {t: run_one(t, args, tmp) for t in trainers}


def run_one(trainer, args, tmp):
    print(f"running {trainer} ({args.precision}, B={args.batch_size}) ...", flush=True)
    return run_trainer(trainer, args, os.path.join(tmp, f"{trainer}_{args.precision}_{args.batch_size}.json"))


def run_largest_round(args, precision, big, trainers, tmp):
    """The bf16 round at the largest B: PyTorch first, since it is the one that may not fit (an estimate);
    on running out of memory (or failing) it is tried once more at MAX_BATCH_RETRY x B, then ours runs at
    the B PyTorch ran at. Returns (the round's args, {trainer: result})."""
    for attempt in range(2):
        r = round_args(args, precision, big)
        results = {}
        if "torch" in trainers:
            try:
                results["torch"] = run_one("torch", r, tmp)
            except SystemExit as e:   # e.g. an allocation failing inside torch.compile's autotuning
                print(f"{e}: counted as out of memory", flush=True)
                results["torch"] = dict(out_of_memory=True)
            if results["torch"].get("out_of_memory") and attempt == 0:
                big = int(big * MAX_BATCH_RETRY)
                print(f"PyTorch ran out of memory at B={r.batch_size}; trying B={big}", flush=True)
                continue
        if "ours" in trainers:
            results["ours"] = run_one("ours", r, tmp)
        return r, {t: results[t] for t in trainers if t in results}


def names(args):
    torch_name = "PyTorch" + (" eager" if args.dry_run else " compile")
    fp32 = "fp32+TF32" if args.tf32 and not args.dry_run else "fp32"
    return {"ours": f"ours (CuPy, -p {args.precision})",
            "torch": f"{torch_name} {'bf16 autocast' if args.precision == 'bf16' else fp32}"}


def mfu(res, B, T, median_ms):
    """The MFU of a result in percent, or None (a device llmc/mfu.py does not know, the CPU)."""
    from llmc.mfu import mfu_percent, peak_flops
    return mfu_percent(res["flops_per_token"] * B * T, median_ms / 1000, peak_flops(res["device"], res["gemm"]))


def print_round(args, results):
    """One round's table, ours/PyTorch in tokens/s (with the target in bf16), the loss gap, the devices and
    our breakdown; returns the round's summary row."""
    B, T = args.batch_size, args.seq_len
    label = names(args)
    print(f"\n== {args.precision}, B={B}, T={T}")
    print(f"{'trainer':<34} {'median ms/step':>15} {'min':>8} {'max':>8} {'tokens/s':>10} {'MFU':>7} "
          f"{'alloc peak MiB':>15} {'device used MiB':>16}")
    tokens, row = {}, dict(precision=args.precision, B=B)
    for t, res in results.items():
        if res.get("out_of_memory"):
            print(f"{label[t]:<34} out of memory at B={B}")
            continue
        median, fastest, slowest = step_ms(res["times"])
        tokens[t] = B * T / median * 1000
        m = mfu(res, B, T, median)
        print(f"{label[t]:<34} {median:15.2f} {fastest:8.2f} {slowest:8.2f} {tokens[t]:10.0f} "
              f"{'n/a' if m is None else f'{m:.1f}%':>7} {res['alloc_peak_mib']:15.0f} {res['device_used_mib']:16.0f}")
        row[t] = tokens[t]
    if "ours" in tokens and "torch" in tokens:
        ratio = tokens["ours"] / tokens["torch"]
        row["ratio"] = ratio
        target = f" (target >= {TARGET:.2f}x: {'met' if ratio >= TARGET else 'not met'})" \
            if args.precision == "bf16" else ""
        print(f"ratio ours/PyTorch in tokens/s ({args.precision}, B={B}): {ratio:.3f}x{target}")
        gap = max(abs(a - b) for a, b in zip(results["ours"]["losses"], results["torch"]["losses"]))
        expect = (" (bf16 on both sides, each rounding its own way: expect ~1e-2)" if args.precision == "bf16" else
                  " (TF32 on: expect ~1e-3)" if args.tf32 and not args.dry_run else "")
        print(f"same training: max |loss ours - loss PyTorch| over the steps = {gap:.2e}{expect}")
    for t, res in results.items():
        if res.get("out_of_memory"):
            continue
        extra = (f", torch {res['torch']}, flash {res['flash']}, fused AdamW {res['fused_adamw']}"
                 if t == "torch" else "")
        print(f"{label[t]}: device {res['device']}, GEMMs {res['gemm']}{extra}")
    ours = results.get("ours", {})
    if ours.get("largest_batch") is not None:
        print(f"ours: the largest B at T={T} in {args.precision}: {ours['largest_batch']} (the memory report's, "
              f"{MAX_BATCH_HEADROOM / 2**30:.0f} GiB kept free: {ours['largest_by_memory']}; the attention "
              f"kernels' 32-bit indices, B*NH*T*T < 2^31: {ours['largest_by_index']})")
    if ours.get("breakdown"):
        profiled = statistics.mean(ours["profiled_times"]) * 1000
        print(f"\n(ours in {args.precision} at B={B}: the breakdown is from {args.breakdown} more steps with the "
              f"events on: mean {profiled:.2f} ms/step)")
        print_breakdown(ours["breakdown"], profiled)
    sys.stdout.flush()
    return row


def largest_round_batch(args, results):
    """The largest-B round's B from the bf16 round at args.batch_size: min(ours, PyTorch's estimate),
    with a line saying where each came from; None when there is nothing to go on."""
    ours = results.get("ours", {}).get("largest_batch")
    torch_res = results.get("torch")
    torch_b = None if torch_res is None or torch_res.get("out_of_memory") else \
        torch_largest_batch(torch_res, args.batch_size)
    found = [b for b in (ours, torch_b) if b is not None]
    if not found:
        return None
    how = []
    if ours is not None:
        how.append(f"ours {ours} (memory report and 32-bit attention indices)")
    if torch_b is not None:
        r = torch_res
        per_sample = (r["peak_allocated"] - r["fixed_bytes"]) / args.batch_size
        how.append(f"PyTorch ~{torch_b} (estimated: {r['free_at_start'] / 2**30:.1f} GiB free at start, fixed "
                   f"{r['fixed_bytes'] / 2**30:.2f} GiB, {per_sample / 2**20:.0f} MiB per sample at "
                   f"B={args.batch_size}, {TORCH_USABLE:.0%} of free usable)")
    print(f"\nlargest B that fits both at T={args.seq_len} in bf16: {min(found)}: " + "; ".join(how))
    return min(found)


def main():
    parser = argparse.ArgumentParser(description="CuPy trainer vs PyTorch (torch.compile), fp32 and bf16, "
                                                 "whole steps on one GPU.")
    add_run_args(parser, seq_len=1024, steps=20, warmup=3, checkpoint_help="model file; d12 built from scratch if absent",
                 warmup_help="untimed steps first (torch.compile compiles here)")
    parser.set_defaults(batch_size=16)
    parser.add_argument("--precision", default="bf16,fp32",
                        help="comma-separated: fp32, bf16 (the rounds run fp32 first)")
    parser.add_argument("--max_batch", type=int, default=-1,
                        help="bf16's second round: -1 at the largest B that fits both, 0 none, N at B=N")
    parser.add_argument("--tf32", type=int, default=1, help="TF32 GEMMs on both sides in fp32 (--tensorcores 1)")
    parser.add_argument("--compile", type=int, default=1, help="torch.compile PyTorch's model (--compile 1)")
    parser.add_argument("--flash", type=int, default=-1,
                        help="PyTorch's attention: 1 scaled_dot_product_attention, 0 materialised; "
                             "-1 = 1 in bf16 and 0 in fp32 (train_gpt2_torch.py's recipes)")
    parser.add_argument("-r", "--recompute", type=int, default=1, help="ours: -r (0, 1, 2)")
    parser.add_argument("-w", "--master_weights", type=int, default=1, help="ours in bf16: -w (fp32 master weights)")
    parser.add_argument("--trainers", default="ours,torch", help="comma-separated: ours, torch")
    parser.add_argument("--breakdown", type=int, default=3,
                        help="extra steps of ours, after the timed ones, with CUDA events around each layer (0 = none)")
    parser.add_argument("--dry_run", type=int, default=0,
                        help="1 = no GPU needed: tiny model, ours on the emulator, PyTorch eager on the CPU")
    args, trainers = parse_run_args(parser, ("ours", "torch"))

    if args.worker:  # inside a subprocess: run one trainer, write the result as JSON
        worker_main(args, {"ours": worker_ours, "torch": worker_torch})
        return

    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in precisions:
        if p not in PRECISIONS:
            parser.error(f"unknown precision {p!r} (fp32, bf16)")
    precisions = [p for p in PRECISIONS if p in precisions]
    if not precisions:
        parser.error("--precision names no precision (fp32, bf16)")
    if args.batch_size < 1 or args.max_batch < -1:
        parser.error("-b must be >= 1 and --max_batch >= -1")
    os.chdir(REPO)
    if not args.dry_run:
        why = gpu_status("CuPy is not installed (pip install cupy-cuda12x on a machine with an NVIDIA GPU)")
        if why is not None:
            raise SystemExit(f"bench_gpu.py: {why}; nothing to time here (python dev/bench_gpu.py --dry_run 1 "
                             "checks the plumbing on the CPU, python dev/bench_cpu.py times the NumPy trainer)")
    check_data(args, "bench_gpu.py")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu") as tmp:
        if args.dry_run:
            if args.checkpoint == parser.get_default("checkpoint"):
                args.checkpoint = os.path.join(tmp, "gpt2_dry_run.bin")
                make_tiny_checkpoint(args.checkpoint)
            if args.seq_len == parser.get_default("seq_len"):
                args.batch_size, args.seq_len = 2, 16
            if args.steps == parser.get_default("steps"):
                args.steps, args.warmup, args.breakdown = 2, 1, min(args.breakdown, 1)
            args.data = ""  # random tokens inside the tiny vocabulary
            print_run(args)
        else:
            find_checkpoint(args, tmp, "bench_gpu.py")
        print(f"precisions {','.join(precisions)}, B={args.batch_size} T={args.seq_len} warm-up {args.warmup} + "
              f"timed {args.steps} steps, TF32 {args.tf32} (fp32), torch.compile {args.compile}"
              f"{' (dry run: off)' if args.dry_run else ''}, ours -r {args.recompute} -w {args.master_weights}, "
              f"AdamW {ADAMW}", flush=True)
        for precision in precisions:
            r = round_args(args, precision, args.batch_size)
            results = run_round(r, trainers, tmp)
            rows.append(print_round(r, results))
            if precision != "bf16" or args.max_batch == 0:
                continue
            if args.max_batch > 0:
                big = args.max_batch
            elif args.dry_run:
                print("\n(dry run: no largest-B round; the emulator has no device memory to fill)")
                continue
            else:
                big = largest_round_batch(r, results)
            if args.max_batch < 0 and (big is None or big <= args.batch_size):
                print(f"\n(no largest-B round: the largest B that fits both is {big}, not above B={args.batch_size})")
                continue
            r, results = run_largest_round(args, precision, big, trainers, tmp)
            rows.append(print_round(r, results))

    print(f"\nsummary, T={args.seq_len} (tokens/s; target in bf16: ours/PyTorch >= {TARGET:.2f}x)")
    print(f"{'precision':<10} {'B':>5} {'ours':>10} {'PyTorch':>10} {'ours/PyTorch':>13}  target")
    for row in rows:
        ours, theirs = (f"{row[t]:10.0f}" if t in row else f"{'-':>10}" for t in ("ours", "torch"))
        ratio = f"{row['ratio']:12.3f}x" if "ratio" in row else f"{'-':>13}"
        target = ("met" if row["ratio"] >= TARGET else "not met") if "ratio" in row and row["precision"] == "bf16" \
            else ""
        print(f"{row['precision']:<10} {row['B']:5d} {ours} {theirs} {ratio}  {target}".rstrip())


if __name__ == "__main__":
    main()
