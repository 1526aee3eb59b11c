"""
Time whole training steps of our CuPy trainer (train_gpt2_cuda.py) against PyTorch on one GPU.

  python dev/bench_gpu.py                       # d12 (GPT-2 124M shapes), B=4, T=1024, 3 warm-up + 20 timed steps
  python dev/bench_gpu.py --steps 50 --tf32 0   # full fp32 GEMMs on both sides
  python dev/bench_gpu.py --dry_run 1           # no GPU: a tiny model, ours on the kernel emulator
                                                # (LLMC_EMULATE=1), PyTorch eager on the CPU; checks the plumbing

PyTorch runs as `train_gpt2_torch.py --compile 1 --tensorcores 1` does: torch.compile (inductor, coordinate
descent tuning), TF32 matmuls, the model's configure_optimizers (fused AdamW on CUDA), clip_grad_norm_ 1.0.
Ours runs train_gpt2.cu's step: forward, zero_grad, backward, global norm, AdamW with the clip scale, TF32
GEMMs when --tf32 1 (cuBLAS math mode). Same weights (gpt2_d12.bin, or d12 built from scratch), same batches
(tiny shakespeare train, or seeded random tokens), AdamW lr 1e-4, betas (0.9, 0.95), eps 1e-8, no weight decay.
Each trainer runs in a fresh process, one after the other. A step is timed on the host from its start to a
device synchronize at its end. Peak GPU memory: the framework allocator's high-water mark (CuPy's memory
pool, which keeps what it allocated; torch.cuda.max_memory_reserved) and the device's used memory (context
included). Our step is also broken down by layer function with CUDA events (train_gpt2_cuda.Event) around
each launcher (GPU time from the launcher's first kernel to its last, summed over layers), over
--breakdown extra steps run after the timed ones, so the events never touch the timing.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (Profiler, add_run_args, check_data, find_checkpoint, get_batches,  # noqa: E402
                          parse_run_args, print_breakdown, print_run, run_worker, step_ms, worker_main)

ADAMW = dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0)
DRY_RUN_SHAPE = dict(max_seq_len=32, vocab_size=500, num_layers=2, num_heads=2, channels=32)


def gpu_status():
    """None if CuPy sees a CUDA GPU, else one line saying why not."""
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except ImportError:
        return "CuPy is not installed (pip install cupy-cuda12x on a machine with an NVIDIA GPU)"
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"CuPy finds no CUDA GPU ({type(e).__name__}: {first})"
    return None if n > 0 else "CUDA reports 0 devices"


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


def worker_ours(args):
    import train_gpt2_cuda as tc
    tc.require_gpu()
    tf32 = tc.set_tf32(args.tf32)
    profiler = Profiler(tc, timer=EventTimer(tc)) if args.breakdown else None
    if profiler is not None:  # the fused classifier is a layer too, though not named _forward/_backward
        for name in ("fused_classifier",):
            if hasattr(tc, name):
                setattr(tc, name, profiler.wrap(getattr(tc, name), name, None))
    model = tc.gpt2_build_from_checkpoint(args.checkpoint)
    B, T = args.batch_size, args.seq_len
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
        print(f"  ours step {i}: loss {model.mean_loss:.6f} norm {norm:.4f} ({dt * 1000:.1f} ms{what})",
              file=sys.stderr, flush=True)
    pool = 0 if tc.EMULATE else tc.xp.get_default_memory_pool().total_bytes()
    return dict(times=times, losses=losses, device=tc.device_name(), tf32=bool(tf32),
                alloc_peak_mib=pool / 2**20, device_used_mib=mem_used / 2**20,
                breakdown=profiler.rows(args.breakdown) if profiler is not None else [],
                profiled_times=profiled_times)


def worker_torch(args):
    import numpy as np
    import torch
    import train_gpt2_torch as tt
    device = "cpu" if args.dry_run else "cuda"
    torch.manual_seed(42)
    # --tensorcores 1
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    model = tt.model_from_file(args.checkpoint).to(device)
    model.train()
    compiled = bool(args.compile) and not args.dry_run
    if compiled:  # --compile 1
        import torch._inductor.config as inductor_config
        if hasattr(inductor_config, "coordinate_descent_tuning"):
            inductor_config.coordinate_descent_tuning = True
        model = torch.compile(model)
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    optimizer = raw.configure_optimizers(weight_decay=ADAMW["weight_decay"], learning_rate=ADAMW["learning_rate"],
                                         betas=(ADAMW["beta1"], ADAMW["beta2"]), device_type=device, zero_stage=0)
    B, T = args.batch_size, args.seq_len
    batches = get_batches(args.data, B, T, args.warmup + args.steps, raw.config.vocab_size)

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    mem_used = 0
    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        x = torch.from_numpy(x.astype(np.int64)).to(device)
        y = torch.from_numpy(y.astype(np.int64)).to(device)
        if i == args.warmup and device == "cuda":
            torch.cuda.reset_peak_memory_stats()  # compile-time scratch is not the training's
        synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
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
        print(f"  torch step {i}: loss {losses[-1]:.6f} norm {norm:.4f} ({dt * 1000:.1f} ms"
              f"{'' if i >= args.warmup else ', warm-up'})", file=sys.stderr, flush=True)
    peak = torch.cuda.max_memory_reserved() if device == "cuda" else 0
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    return dict(times=times, losses=losses, device=name, tf32=bool(args.tf32),
                torch=torch.__version__, alloc_peak_mib=peak / 2**20,
                device_used_mib=mem_used / 2**20, fused_adamw=bool(optimizer.param_groups[0].get("fused")))


def run_trainer(trainer, args, result_path):
    """Run one trainer in a fresh process; returns the result dict it wrote."""
    env = dict(os.environ)
    if args.dry_run:
        env["LLMC_EMULATE"] = "1"
    result, _ = run_worker(__file__, trainer, args, result_path, env=env, extra_args=[
        "--tf32", str(args.tf32), "--compile", str(args.compile), "--breakdown", str(args.breakdown),
        "--dry_run", str(args.dry_run)])
    return result


def make_tiny_checkpoint(path):
    """A seeded random model of DRY_RUN_SHAPE (V=500 pads to Vp=512), for --dry_run."""
    import numpy as np
    import train_gpt2
    from llmc.formats import GPT2Config, num_parameters, padded_vocab, write_model_file
    config = GPT2Config(padded_vocab_size=padded_vocab(DRY_RUN_SHAPE["vocab_size"]), **DRY_RUN_SHAPE)
    model = train_gpt2.GPT2(config, np.zeros(num_parameters(config), np.float32))
    train_gpt2.init_weights(model, 42)  # the trainer's own seeded init (the padding rows of wte stay 0)
    write_model_file(path, config, model.params_memory)


def main():
    parser = argparse.ArgumentParser(description="CuPy trainer vs PyTorch (compile + TF32), whole steps on one GPU.")
    add_run_args(parser, seq_len=1024, steps=20, warmup=3, checkpoint_help="model file; d12 built from scratch if absent",
                 warmup_help="untimed steps first (torch.compile compiles here)")
    parser.add_argument("--tf32", type=int, default=1, help="TF32 GEMMs on both sides (--tensorcores 1)")
    parser.add_argument("--compile", type=int, default=1, help="torch.compile PyTorch's model (--compile 1)")
    parser.add_argument("--trainers", default="ours,torch", help="comma-separated: ours, torch")
    parser.add_argument("--breakdown", type=int, default=3,
                        help="extra steps of ours, after the timed ones, with CUDA events around each layer (0 = none)")
    parser.add_argument("--dry_run", type=int, default=0,
                        help="1 = no GPU needed: tiny model, ours on the emulator, PyTorch eager on the CPU")
    args, trainers = parse_run_args(parser, ("ours", "torch"))

    if args.worker:  # inside a subprocess: run one trainer, write the result as JSON
        worker_main(args, {"ours": worker_ours, "torch": worker_torch})
        return

    os.chdir(REPO)
    if not args.dry_run:
        why = gpu_status()
        if why is not None:
            raise SystemExit(f"bench_gpu.py: {why}; nothing to time here (python dev/bench_gpu.py --dry_run 1 "
                             "checks the plumbing on the CPU, python dev/bench_cpu.py times the NumPy trainer)")
    check_data(args, "bench_gpu.py")

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
        print(f"B={args.batch_size} T={args.seq_len} warm-up {args.warmup} + timed {args.steps} steps, "
              f"TF32 {args.tf32}, torch.compile {args.compile}{' (dry run: off)' if args.dry_run else ''}, "
              f"AdamW {ADAMW}")
        results = {}
        for t in trainers:
            print(f"running {t} ...", flush=True)
            results[t] = run_trainer(t, args, os.path.join(tmp, f"{t}.json"))

    tokens = args.batch_size * args.seq_len
    names = {"ours": "ours (CuPy, train_gpt2_cuda)",
             "torch": "PyTorch" + (" eager" if args.dry_run else " compile+TF32")}
    print(f"\n{'trainer':<30} {'median ms/step':>15} {'min':>8} {'max':>8} {'tokens/s':>10} "
          f"{'alloc peak MiB':>15} {'device used MiB':>16}")
    medians = {}
    for t, res in results.items():
        medians[t], fastest, slowest = step_ms(res["times"])
        print(f"{names[t]:<30} {medians[t]:15.2f} {fastest:8.2f} {slowest:8.2f} {tokens / medians[t] * 1000:10.0f} "
              f"{res['alloc_peak_mib']:15.0f} {res['device_used_mib']:16.0f}")
    if "ours" in results and "torch" in results:
        print(f"ratio ours/PyTorch (ms/step): {medians['ours'] / medians['torch']:.3f}")
        gap = max(abs(a - b) for a, b in zip(results["ours"]["losses"], results["torch"]["losses"]))
        print(f"same training: max |loss ours - loss PyTorch| over the steps = {gap:.2e}"
              + (" (TF32 on: expect ~1e-3)" if args.tf32 and not args.dry_run else ""))
    for t, res in results.items():
        extra = f", torch {res['torch']}, fused AdamW {res['fused_adamw']}" if t == "torch" else ""
        print(f"{names[t]}: device {res['device']}, TF32 {res['tf32']}{extra}")
    if "ours" in results and results["ours"]["breakdown"]:
        profiled = statistics.mean(results["ours"]["profiled_times"]) * 1000
        print(f"\n(the breakdown is from {args.breakdown} more steps with the events on: mean {profiled:.2f} ms/step)")
        print_breakdown(results["ours"]["breakdown"], profiled)


if __name__ == "__main__":
    main()
