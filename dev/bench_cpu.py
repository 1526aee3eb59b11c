"""
Time whole training steps of our NumPy trainer (train_gpt2.py) against PyTorch eager on the CPU.

  python dev/bench_cpu.py                      # d12 (GPT-2 124M shapes), B=4, T=64, 5 timed steps each
  python dev/bench_cpu.py --steps 10 --warmup 2 --threads 2

Both trainers start from the same weights (gpt2_d12.bin if present, else a d12 model built from
scratch by train_gpt2.gpt2_build_from_descriptor and written to a temporary file), read the same
batches (tiny shakespeare train if present, else seeded random tokens), take the same AdamW step
(lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping: train_gpt2.c's loop), and use
the same number of threads (OMP/OPENBLAS/MKL_NUM_THREADS and torch.set_num_threads). Each runs in a
fresh subprocess, one after the other, so its peak RSS (ru_maxrss from wait4) is its own.
A step is zero_grad + forward + backward + update; the first --warmup steps (which allocate the
activations, gradients and AdamW state) are not timed. For our trainer the step is also broken
down by phase (forward, backward, update) and by layer: train_gpt2.py's own profiler (--profile 1)
when it has one, else wrappers around the module's layer functions.
"""

import argparse
import ctypes
import glob
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (Profiler, add_run_args, check_data, find_checkpoint, get_batches,  # noqa: E402
                          parse_run_args, print_breakdown, run_worker, step_ms, worker_main)

TARGET_RATIO = 0.5          # ours <= 0.5x PyTorch eager's ms/step
TARGET_RSS_MIB = 2.5 * 1024  # ours peak RSS <= ~2.5 GiB
ADAMW = dict(learning_rate=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


# ----------------------------------------------------------------------------
# what the NumPy worker reports about its machine

def openblas_info():
    """(core type, config string, threads) of the OpenBLAS that NumPy loaded, asked through ctypes
    (np.show_runtime needs threadpoolctl for this); OPENBLAS_CORETYPE overrides the detected core."""
    import numpy as np
    libdir = os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*")):
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "")):
            try:
                corename = getattr(lib, prefix + "get_corename" + suffix)
                config = getattr(lib, prefix + "get_config" + suffix)
                nthreads = getattr(lib, prefix + "get_num_threads" + suffix)
            except AttributeError:
                continue
            corename.restype = config.restype = ctypes.c_char_p
            nthreads.restype = ctypes.c_int
            return corename().decode(), config().decode().strip(), nthreads()
    return os.environ.get("OPENBLAS_CORETYPE", "unknown (no OpenBLAS found in numpy.libs)"), "", -1


def other_load(seconds=1.0, samples=20):
    """How many processes besides this one were running, on average over `seconds` (procs_running of
    /proc/stat, sampled); the 1-minute load average where there is no /proc."""
    try:
        counts = []
        for _ in range(samples):
            with open("/proc/stat") as f:
                counts += [int(line.split()[1]) for line in f if line.startswith("procs_running")]
            time.sleep(seconds / samples)
        return max(0.0, sum(counts) / len(counts) - 1)
    except OSError:
        return os.getloadavg()[0]


# ----------------------------------------------------------------------------
# worker: our NumPy trainer, with a per-function breakdown

def worker_numpy(args):
    import numpy as np
    import train_gpt2 as tg
    from llmc import profiler as layer_profiler
    # train_gpt2.py's own profiler (--profile 1, llmc/profiler.py) times the layers, telling the matmuls
    # apart by shape; ours then times only the phases.
    hook = bool(args.breakdown)
    if hook:
        layer_profiler.enable(tg)
    profiler = Profiler(tg, layers=not hook) if args.breakdown else None
    model = tg.gpt2_build_from_checkpoint(args.checkpoint)
    B, T = args.batch_size, args.seq_len
    batches = get_batches(args.data, B, T, args.warmup + args.steps, model.config.vocab_size)
    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        if profiler is not None:
            profiler.enabled = i >= args.warmup
        if hook:
            layer_profiler.ACTIVE[0] = i >= args.warmup
        t0 = time.perf_counter()
        tg.gpt2_zero_grad(model)
        tg.gpt2_forward(model, x, y, B, T)
        tg.gpt2_backward(model)
        tg.gpt2_update(model, ADAMW["learning_rate"], ADAMW["beta1"], ADAMW["beta2"], ADAMW["eps"],
                       ADAMW["weight_decay"], i + 1)
        dt = time.perf_counter() - t0
        if profiler is not None:
            profiler.flush()
        losses.append(float(model.mean_loss))
        if i >= args.warmup:
            times.append(dt)
        what = "" if i >= args.warmup else ", warm-up"
        print(f"  numpy step {i}: loss {model.mean_loss:.6f} ({dt * 1000:.0f} ms{what})", file=sys.stderr, flush=True)
    core, blas_config, blas_threads = openblas_info()
    breakdown = profiler.rows(args.steps) if profiler is not None else []
    layer_report = layer_profiler.report(args.steps) if hook else ""
    return dict(times=times, losses=losses, openblas_core=core, openblas_config=blas_config,
                openblas_threads=blas_threads, numpy=np.__version__, breakdown=breakdown, layer_report=layer_report,
                dtype=str(model.params_memory.dtype))


# ----------------------------------------------------------------------------
# worker: PyTorch eager, the model class of train_gpt2_torch.py

def worker_torch(args):
    import numpy as np
    import torch
    import train_gpt2_torch as tt
    torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    model = tt.model_from_file(args.checkpoint)  # same weights as ours; attention written out, as llm.c's default
    model.train()
    fused = {"auto": None, "1": True, "0": False}[args.torch_fused]
    kwargs = {} if fused is None else dict(fused=fused, foreach=not fused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ADAMW["learning_rate"], betas=(ADAMW["beta1"], ADAMW["beta2"]),
                                  eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"], **kwargs)
    B, T = args.batch_size, args.seq_len
    batches = get_batches(args.data, B, T, args.warmup + args.steps, model.config.vocab_size)
    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        x, y = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(dt)
        print(f"  torch step {i}: loss {losses[-1]:.6f} ({dt * 1000:.0f} ms{'' if i >= args.warmup else ', warm-up'})",
              file=sys.stderr, flush=True)
    group = optimizer.param_groups[0]
    if fused is None:  # what torch picks when told nothing: on the CPU, the single-tensor loop
        from torch.optim.optimizer import _default_to_fused_or_foreach
        use_fused, use_foreach = _default_to_fused_or_foreach(list(model.parameters()), False, False)
        impl = "fused" if use_fused else "foreach" if use_foreach else "single-tensor"
        impl += " (torch's default)"
    else:
        impl = "fused" if group.get("fused") else "foreach"
    return dict(times=times, losses=losses, torch=torch.__version__, adamw=impl,
                torch_threads=torch.get_num_threads(), mkldnn=torch.backends.mkldnn.is_available())


# ----------------------------------------------------------------------------
# driver

def run_trainer(trainer, args, result_path):
    """Run one trainer in a fresh process; returns (result dict, peak RSS MiB from wait4)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    return run_worker(__file__, trainer, args, result_path, env=env, extra_args=[
        "--threads", str(args.threads), "--torch_fused", args.torch_fused, "--breakdown", str(args.breakdown)])


def main():
    parser = argparse.ArgumentParser(description="NumPy trainer vs PyTorch eager, whole training steps on the CPU.")
    add_run_args(parser, seq_len=64, steps=5, warmup=1, checkpoint_help="model file; built from scratch if absent",
                 warmup_help="untimed steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--trainers", default="numpy,torch", help="comma-separated: numpy, torch")
    parser.add_argument("--torch_fused", default="auto", choices=["auto", "1", "0"],
                        help="AdamW for PyTorch: auto = torch's default choice on the CPU, 1 = fused, 0 = foreach")
    parser.add_argument("--breakdown", type=int, default=1, help="1 = per-layer timing of our step")
    args, trainers = parse_run_args(parser, ("numpy", "torch"))

    if args.worker:  # inside a subprocess: run one trainer, write the result as JSON
        worker_main(args, {"numpy": worker_numpy, "torch": worker_torch})
        return

    os.chdir(REPO)
    if "torch" in trainers and not os.path.exists(os.path.join(REPO, "train_gpt2_torch.py")):
        raise SystemExit("bench_cpu.py: train_gpt2_torch.py not found (PyTorch's model class lives there)")
    check_data(args, "bench_cpu.py")

    with tempfile.TemporaryDirectory(prefix="bench_cpu") as tmp:
        find_checkpoint(args, tmp, "bench_cpu.py")
        print(f"B={args.batch_size} T={args.seq_len} warm-up {args.warmup} + timed {args.steps} steps, "
              f"{args.threads} threads (of {os.cpu_count()} cores), AdamW {ADAMW}")
        results, loads = {}, []
        for t in trainers:
            loads.append(other_load())
            print(f"running {t} ... (other running processes: {loads[-1]:.1f})", flush=True)
            results[t] = run_trainer(t, args, os.path.join(tmp, f"{t}.json"))

    tokens = args.batch_size * args.seq_len
    if max(loads) >= 0.5:
        print(f"\nWARNING: the machine was busy (on average {max(loads):.1f} other processes running before a "
              f"trainer started, on {os.cpu_count()} cores): they share the cores, so the times are unreliable")
    names = {"numpy": "ours (NumPy, train_gpt2.py)", "torch": "PyTorch eager"}
    print(f"\n{'trainer':<28} {'median ms/step':>15} {'min':>8} {'max':>8} {'tokens/s':>9} {'peak RSS MiB':>13}")
    medians = {}
    for t, (res, rss) in results.items():
        medians[t], fastest, slowest = step_ms(res["times"])
        print(f"{names[t]:<28} {medians[t]:15.1f} {fastest:8.1f} {slowest:8.1f} "
              f"{tokens / medians[t] * 1000:9.0f} {rss:13.0f}")
    if "numpy" in results and "torch" in results:
        ratio = medians["numpy"] / medians["torch"]
        best = min(results["numpy"][0]["times"]) / min(results["torch"][0]["times"])
        print(f"ratio ours/PyTorch: {ratio:.3f} of the medians, {best:.3f} of the fastest steps "
              f"(target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'})")
        loss_gap = max(abs(a - b) for a, b in zip(results["numpy"][0]["losses"], results["torch"][0]["losses"]))
        nsteps = len(results["torch"][0]["losses"])
        print(f"same training: max |loss ours - loss PyTorch| over the {nsteps} steps = {loss_gap:.2e}")
    if "numpy" in results:
        res, rss = results["numpy"]
        met = "met" if rss <= TARGET_RSS_MIB else "NOT met"
        print(f"ours peak RSS {rss:.0f} MiB (target <= {TARGET_RSS_MIB:.0f}: {met})"
              f"; params dtype {res['dtype']}")
        print(f"NumPy {res['numpy']}, OpenBLAS core type: {res['openblas_core']} ({res['openblas_threads']} threads; "
              f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}); {res['openblas_config']}")
    if "torch" in results:
        res, _ = results["torch"]
        print(f"PyTorch {res['torch']}, {res['torch_threads']} threads, AdamW {res['adamw']}, mkldnn {res['mkldnn']}")
    if "numpy" in results and results["numpy"][0]["breakdown"]:
        print_breakdown(results["numpy"][0]["breakdown"], statistics.mean(results["numpy"][0]["times"]) * 1000)
        if results["numpy"][0]["layer_report"]:
            print("\nour step, by layer (train_gpt2.py's profiler, as --profile 1 prints it)")
            print(results["numpy"][0]["layer_report"])


if __name__ == "__main__":
    main()
