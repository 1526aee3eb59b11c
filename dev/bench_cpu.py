"""
Time whole training steps of our NumPy trainer (train_gpt2.py) against PyTorch eager on the CPU.

  python dev/bench_cpu.py                      # d12 (GPT-2 124M shapes), B=4, T=64, 5 timed steps each
  python dev/bench_cpu.py --steps 10 --warmup 2 --threads 2
  python dev/bench_cpu.py --scaling 1          # and again on one thread: the speed-up of each trainer

Both trainers start from the same weights (gpt2_d12.bin if present, else a d12 model built from
scratch by train_gpt2.gpt2_build_from_descriptor and written to a temporary file), read the same
batches (tiny shakespeare train if present, else seeded random tokens), take the same AdamW step
(lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping: train_gpt2.c's loop), and use
the same number of threads (llmc.cpu.set_threads, OMP/OPENBLAS/MKL_NUM_THREADS and torch.set_num_threads;
--threads above the CPUs this process may use is clamped, with a line saying so). Each runs in a fresh
subprocess, so its peak RSS (ru_maxrss from wait4) is its own; the two take turns step by step (--interleave
1, the default: the driver tells each when to run its next step, the order alternating round by round), so a
change in the machine's load falls on both alike.
A step is zero_grad + forward + backward + update; the first --warmup steps (which allocate the
activations, gradients and AdamW state) are not timed. For our trainer the step is also broken
down by phase (forward, backward, update) and by layer (train_gpt2.py's own profiler, --profile 1)
in as many extra steps, paired with the timed ones; the medians with and without the profiler are
printed, with a WARNING when they differ by more than 5%.

The GEMM roofline: a third subprocess times NumPy's sgemm on the step's own matrix products (the
forward and the two backward products of every matmul layer) and prints how long the step's GEMMs
would take at those rates, as a share of our median step.

The floor (llmc/floor.py): the same subprocess measures the memory bandwidth (NumPy copy and triad on the
trainer's threads), and the step's floor is the products at the sgemm rate plus the bytes every other layer,
AdamW and the zeroing must read and write (step_bytes: one formula per layer) at that bandwidth. It is printed
per phase (products, AdamW, zeroing, the rest) beside what our step took in each (from the profiled steps),
with the fraction of the floor reached.
"""

import argparse
import ctypes
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llmc import cpu, floor  # noqa: E402
from llmc.model import GPT2Config, num_parameters  # noqa: E402
from bench_common import (Profiler, add_run_args, check_data, finish_worker, find_checkpoint,  # noqa: E402
                          get_batches, parse_run_args, print_breakdown, run_worker, step_ms, worker_command,
                          worker_main)

TARGET_RSS_MIB = 2.5 * 1024  # ours peak RSS <= ~2.5 GiB
PROFILER_TOLERANCE = 0.05    # a profiled step within 5% of an unprofiled one
ADAMW = dict(learning_rate=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


# ----------------------------------------------------------------------------
# what the NumPy worker reports about its machine

def openblas_function(name):
    """openblas_<name> (e.g. get_corename, set_num_threads) of the OpenBLAS that NumPy loaded, through
    ctypes, whatever its symbol prefix and suffix; None where NumPy has no OpenBLAS."""
    import numpy as np
    libdir = os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*")):
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "")):
            fn = getattr(lib, prefix + name + suffix, None)
            if fn is not None:
                return fn
    return None


def openblas_info():
    """(core type, config string, threads) of the OpenBLAS that NumPy loaded, asked through ctypes
    (np.show_runtime needs threadpoolctl for this); OPENBLAS_CORETYPE overrides the detected core."""
    corename, config, nthreads = (openblas_function(n) for n in ("get_corename", "get_config", "get_num_threads"))
    if None in (corename, config, nthreads):
        return os.environ.get("OPENBLAS_CORETYPE", "unknown (no OpenBLAS found in numpy.libs)"), "", -1
    corename.restype = config.restype = ctypes.c_char_p
    nthreads.restype = ctypes.c_int
    return corename().decode(), config().decode().strip(), nthreads()


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
    """Our trainer: --warmup untimed steps, then --steps timed steps without any profiler; with
    --breakdown 1 each is paired with a step under the per-layer profiler (the order alternating
    pair by pair, so a drift in the machine's load falls on both alike), and only those steps feed
    the breakdown. So the headline median is never a profiled step, and the two medians say what
    the profiler costs."""
    import numpy as np
    import train_gpt2 as tg
    from llmc import cpu, floor
    from llmc import profiler as layer_profiler
    cpu.set_threads(args.threads)         # the driver clamped it already
    # train_gpt2.py's own profiler (--profile 1, llmc/profiler.py) times the layers, telling the matmuls
    # apart by shape; ours (bench_common.Profiler) times the phases around them.
    profiler = Profiler(tg, layers=False) if args.breakdown else None

    def profiling(on):
        if profiler is None:
            return
        if on:
            profiler.attach()
            layer_profiler.enable(tg)
        else:
            layer_profiler.disable(tg)
            profiler.detach()
        profiler.enabled = layer_profiler.ACTIVE[0] = on

    model = tg.gpt2_build_from_checkpoint(args.checkpoint)
    B, T = args.batch_size, args.seq_len
    plan = [False] * args.warmup  # profiled or not, step by step
    for k in range(args.steps):
        plan += [False] if profiler is None else [False, True] if k % 2 == 0 else [True, False]
    batches = get_batches(args.data, B, T, len(plan), model.config.vocab_size)
    times, profiled_times, losses = [], [], []
    for i, ((x, y), profiled) in enumerate(zip(batches, plan)):
        profiling(profiled)
        wait_turn(args)
        t0 = time.perf_counter()
        tg.gpt2_zero_grad(model)
        tg.gpt2_forward(model, x, y, B, T)
        tg.gpt2_backward(model)
        tg.gpt2_update(model, ADAMW["learning_rate"], ADAMW["beta1"], ADAMW["beta2"], ADAMW["eps"],
                       ADAMW["weight_decay"], i + 1)
        dt = time.perf_counter() - t0
        turn_done(args)
        if profiler is not None:
            profiler.flush()
        losses.append(float(model.mean_loss))
        if i >= args.warmup:
            (profiled_times if profiled else times).append(dt)
        what = ", warm-up" if i < args.warmup else ", profiled" if profiled else ""
        print(f"  numpy step {i}: loss {model.mean_loss:.6f} ({dt * 1000:.0f} ms{what})", file=sys.stderr, flush=True)
    profiling(False)
    core, blas_config, blas_threads = openblas_info()
    breakdown = profiler.rows(args.steps) if profiler is not None else []
    layer_report = layer_profiler.report(args.steps, with_floor=False) if profiler is not None else ""
    phases = dict.fromkeys(floor.PHASES, 0.0)          # ms per profiled step, by the floor's phases
    for key, (seconds, _) in layer_profiler.PROFILE.items():
        phases[floor.phase_of(layer_profiler.function_name(key))] += 1e3 * seconds / args.steps
    if profiled_times:   # what no profiled function times (the backward zeroing its activation gradients)
        phases["the rest"] += 1e3 * statistics.mean(profiled_times) - sum(phases.values())
    return dict(times=times, profiled_times=profiled_times, losses=losses, openblas_core=core,
                openblas_config=blas_config, openblas_threads=blas_threads, numpy=np.__version__, breakdown=breakdown,
                layer_report=layer_report, dtype=str(model.params_memory.dtype), threads=cpu.NUM_THREADS,
                phases=phases if profiled_times else None)


def wait_turn(args):
    """--lockstep: wait for the driver's word before the next step (the trainers take turns)."""
    if args.lockstep:
        sys.stdin.readline()


def turn_done(args):
    if args.lockstep:
        print(STEP_DONE, flush=True)


# ----------------------------------------------------------------------------
# worker: the sgemm rate of the step's own matrix products (the GEMM roofline)

def step_gemms(config, B, T):
    """The matrix products of one training step, as (M, K, N, b transposed, calls per step) of
    out (M, N) = a (M, K) @ b (K, N): per matmul layer (inp (BT, C) and weight (OC, C)) the forward
    inp @ weight.T, and the backward's dinp = dout @ weight and dweight = dout.T @ inp."""
    BT, C, L, Vp = B * T, config.channels, config.num_layers, config.padded_vocab_size
    layers = [(C, 3 * C, L), (C, C, L), (C, 4 * C, L), (4 * C, C, L), (C, Vp, 1)]  # (C in, OC, calls): qkv,
    gemms = []                                                                  # attproj, fc, fcproj, classifier
    for c_in, oc, calls in layers:
        gemms += [(BT, c_in, oc, True, calls),      # forward: (BT, C) @ (C, OC), the weight read transposed
                  (BT, oc, c_in, False, calls),     # dinp:    (BT, OC) @ (OC, C)
                  (oc, BT, c_in, False, calls)]     # dweight: (OC, BT) @ (BT, C), dout read transposed
    return gemms


def step_bytes(config, B, T):
    """The bytes one training step reads and writes outside the matrix products, by layer function (summed over
    its calls in the step) and optimizer phase, counted as llmc/floor.py counts them: an array read or written
    once is its size, one a layer adds into (+=) twice its size; float32 values and int32 token ids, 4 bytes.
    tests/test_bench_cpu.py checks every formula against the bytes of the arrays each call is given."""
    L, NH, C, Vp = config.num_layers, config.num_heads, config.channels, config.padded_vocab_size
    BT, TT, f = B * T, B * NH * T * T, 4                # positions; attention scores of one layer; bytes/value
    n_params = num_parameters(config)
    grad_acts = BT * C * (2 + 18 * L) + 2 * L * TT + BT * Vp + BT    # the activation gradients (NO_GRAD_ACTS out)
    return {
        # out written, inp read, the B*T rows of wte it looks up, wpe[:T]
        "encoder_forward": f * (BT * C + BT + BT * C + T * C),
        # dwte's looked-up rows and dwpe[:T] added into; dout and inp read
        "encoder_backward": f * (2 * BT * C + 2 * T * C + BT * C + BT),
        # 2L+1 calls: out, mean, rstd written; inp, weight, bias read
        "layernorm_forward": (2 * L + 1) * f * (BT * C + 2 * BT + BT * C + 2 * C),
        # dinp, dweight, dbias added into; dout, inp, weight, mean, rstd read
        "layernorm_backward": (2 * L + 1) * f * (2 * (BT * C + 2 * C) + 2 * BT * C + C + 2 * BT),
        # out, preatt, att written; inp (q|k|v) read
        "attention_forward": L * f * (BT * C + 2 * TT + 3 * BT * C),
        # dinp (dq|dk|dv), dpreatt, datt added into; dout, inp, att read
        "attention_backward": L * f * (2 * (3 * BT * C + 2 * TT) + BT * C + 3 * BT * C + TT),
        # out written, inp read, over (B, T, 4C)
        "gelu_forward": L * f * 2 * BT * 4 * C,
        # dinp added into; inp, dout read
        "gelu_backward": L * f * 4 * BT * 4 * C,
        # 2L calls: out written, inp1, inp2 read
        "residual_forward": 2 * L * f * 3 * BT * C,
        # 2L calls: dinp1, dinp2 added into; dout read
        "residual_backward": 2 * L * f * 5 * BT * C,
        # probs written, logits read, (B, T, Vp)
        "softmax_forward": f * 2 * BT * Vp,
        # losses written, one probability per position read, targets read
        "crossentropy_forward": f * 3 * BT,
        # dlogits added into; dlosses, probs, targets read
        "crossentropy_softmax_backward": f * (2 * BT * Vp + BT + BT * Vp + BT),
        # gpt2_backward zeroes the activation gradients (writes them once)
        "activation gradients": f * grad_acts,
        # AdamW reads p, g, m, v and writes p, m, v, and zeroes g in the same pass (train_gpt2.adamw_and_zero_grad)
        "gpt2_update": f * (7 + 1) * n_params,
        # so gpt2_zero_grad has nothing left to do
        "gpt2_zero_grad": 0,
    }


def worker_gemm(args):
    """Time NumPy's sgemm (np.matmul on NumPy's own BLAS) on each of the step's products, best of
    --gemm_repeats, twice: with OpenBLAS on the thread count our trainer runs on, and on one thread
    (times that count: perfect scaling, which OpenBLAS's own threading misses on skinny shapes and on
    a busy machine): llmc.floor.product_times. The roofline takes the faster of the two, an upper bound
    on what the BLAS can give. Then the memory bandwidth on the same threads (llmc.floor.memory_bandwidth).
    Nothing else runs in this process."""
    import llmc  # noqa: F401  (before NumPy: it picks the OpenBLAS kernels the trainer runs on)
    from llmc import cpu, floor
    from llmc.formats import MODEL_MAGIC, read_header
    cpu.set_threads(args.threads)
    header, _ = read_header(args.checkpoint, MODEL_MAGIC, (3, 5))
    config = GPT2Config(*map(int, header[2:8]))
    rows = []
    for M, K, N, b_transposed, calls in step_gemms(config, args.batch_size, args.seq_len):
        threaded, single = floor.product_times(M, K, N, b_transposed, args.gemm_repeats)
        rows.append([M, K, N, calls, threaded, single])
    copy, triad = floor.memory_bandwidth()
    return dict(rows=rows, threads=cpu.NUM_THREADS, blas_threads_set=cpu.openblas_library() is not None,
                copy=copy, triad=triad, config=list(map(int, header[2:8])))


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
        wait_turn(args)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        dt = time.perf_counter() - t0
        turn_done(args)
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

STEP_DONE = "bench_cpu.py: step done"    # a worker's word to the driver, on its stdout, after each step
TURN_PAUSE = 0.2   # seconds between turns: the idle threads of the worker that just stepped (OpenMP's spin
                   # after a parallel region) are asleep before the other's step starts


def trainer_env(args):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    return env


def worker_flags(args):
    return ["--threads", str(args.threads), "--torch_fused", args.torch_fused, "--breakdown", str(args.breakdown),
            "--gemm_repeats", str(args.gemm_repeats)]


def run_trainer(trainer, args, result_path):
    """Run one trainer in a fresh process; returns (result dict, peak RSS MiB from wait4)."""
    return run_worker(__file__, trainer, args, result_path, env=trainer_env(args), extra_args=worker_flags(args))


def turn_order(trainers, args):
    """The steps in the order the trainers take them with --interleave 1: round by round, our step(s) (two in a
    timed round when each timed step is paired with a profiled one) and PyTorch's, who goes first alternating."""
    order = []
    for k in range(args.warmup + args.steps):
        ours = ["numpy"] * (2 if args.breakdown and k >= args.warmup else 1)
        rounds = [ours, ["torch"]] if k % 2 == 0 else [["torch"], ours]
        order += [t for part in rounds for t in part if t in trainers]
    return order


def take_turn(proc, trainer):
    """Let one worker run its next step; wait for its word, passing on anything else it prints."""
    time.sleep(TURN_PAUSE)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    for line in proc.stdout:
        if line.rstrip("\n") == STEP_DONE:
            return
        print(line, end="")
    raise SystemExit(f"bench_cpu.py: the {trainer} worker stopped in the middle of its steps (its error is above)")


def run_interleaved(trainers, args, tmp):
    """All trainers at once, each in its own process, taking turns step by step (turn_order); returns
    {trainer: (result dict, peak RSS MiB)}, each RSS its own process's."""
    procs, paths = {}, {}
    for t in trainers:
        paths[t] = os.path.join(tmp, f"{t}.json")
        cmd = worker_command(__file__, t, paths[t], args) + worker_flags(args) + ["--lockstep", "1"]
        procs[t] = subprocess.Popen(cmd, env=trainer_env(args), cwd=REPO, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
    try:
        for t in turn_order(trainers, args):
            take_turn(procs[t], t)
    finally:
        for proc in procs.values():
            proc.stdin.close()
    results = {}
    for t, proc in procs.items():
        print(proc.stdout.read(), end="")
        results[t] = finish_worker(proc, __file__, t, paths[t])
    return results


def run_trainers(trainers, args, tmp):
    """{trainer: (result, peak RSS MiB)} and the load seen before they started: taking turns (--interleave 1),
    or one after the other."""
    if args.interleave and len(trainers) > 1:
        load = other_load()
        print(f"running {' and '.join(trainers)}, taking turns step by step ... (other running processes: "
              f"{load:.1f})", flush=True)
        return run_interleaved(trainers, args, tmp), [load]
    results, loads = {}, []
    for t in trainers:
        loads.append(other_load())
        print(f"running {t} ... (other running processes: {loads[-1]:.1f})", flush=True)
        results[t] = run_trainer(t, args, os.path.join(tmp, f"{t}.json"))
    return results, loads


def main():
    parser = argparse.ArgumentParser(description="NumPy trainer vs PyTorch eager, whole training steps on the CPU.")
    add_run_args(parser, seq_len=64, steps=5, warmup=1, checkpoint_help="model file; built from scratch if absent",
                 warmup_help="untimed steps first")
    parser.add_argument("--threads", type=int, default=cpu.usable_cpus(),
                        help="threads for each trainer (default: the CPUs this process may use; more is clamped)")
    parser.add_argument("--trainers", default="numpy,torch", help="comma-separated: numpy, torch")
    parser.add_argument("--torch_fused", default="auto", choices=["auto", "1", "0"],
                        help="AdamW for PyTorch: auto = torch's default choice on the CPU, 1 = fused, 0 = foreach")
    parser.add_argument("--breakdown", type=int, default=1,
                        help="1 = per-layer timing of our step, in extra steps paired with the timed ones")
    parser.add_argument("--gemm_repeats", type=int, default=3,
                        help="timings of each of the step's matrix products for the GEMM roofline and the floor "
                             "(0 = neither)")
    parser.add_argument("--interleave", type=int, default=1, choices=[0, 1],
                        help="1 = the trainers take turns step by step; 0 = one after the other")
    parser.add_argument("--scaling", type=int, default=0, choices=[0, 1],
                        help="1 = run the trainers again on one thread and print each one's speed-up")
    parser.add_argument("--lockstep", type=int, default=0, help=argparse.SUPPRESS)   # a worker taking turns
    args, trainers = parse_run_args(parser, ("numpy", "torch"))

    if args.worker:  # inside a subprocess: run one trainer, write the result as JSON
        worker_main(args, {"numpy": worker_numpy, "torch": worker_torch, "gemm": worker_gemm})
        return

    os.chdir(REPO)
    args.threads, clamped = cpu.clamp_threads(args.threads)
    if clamped:
        print(f"bench_cpu.py: {clamped}")
    if "torch" in trainers and not os.path.exists(os.path.join(REPO, "train_gpt2_torch.py")):
        raise SystemExit("bench_cpu.py: train_gpt2_torch.py not found (PyTorch's model class lives there)")
    check_data(args, "bench_cpu.py")

    with tempfile.TemporaryDirectory(prefix="bench_cpu") as tmp:
        find_checkpoint(args, tmp, "bench_cpu.py")
        print(f"B={args.batch_size} T={args.seq_len} warm-up {args.warmup} + timed {args.steps} steps, "
              f"{args.threads} threads (of {os.cpu_count()} cores), AdamW {ADAMW}")
        results, loads = run_trainers(trainers, args, tmp)
        gemm = None
        if "numpy" in trainers and args.gemm_repeats > 0:
            print("timing sgemm on the step's matrix shapes and the memory bandwidth ...", flush=True)
            gemm, _ = run_trainer("gemm", args, os.path.join(tmp, "gemm.json"))
        one_thread = None
        if args.scaling and args.threads > 1:
            print("again on one thread, for the scaling ...", flush=True)
            one = argparse.Namespace(**{**vars(args), "threads": 1, "breakdown": 0})
            one_thread, more_loads = run_trainers(trainers, one, tmp)
            loads += more_loads

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
        print(f"ratio ours/PyTorch: {ratio:.3f} of the medians, {best:.3f} of the fastest steps")
        loss_gap = max(abs(a - b) for a, b in zip(results["numpy"][0]["losses"], results["torch"][0]["losses"]))
        nsteps = len(results["torch"][0]["losses"])
        print(f"same training: max |loss ours - loss PyTorch| over the {nsteps} steps = {loss_gap:.2e}")
    if gemm is not None:
        print_roofline(gemm, medians["numpy"])
        print_floor(gemm, results["numpy"][0], medians["numpy"], args.batch_size, args.seq_len)
    if one_thread is not None:
        print_scaling(one_thread, medians, args.threads)
    if "numpy" in results and results["numpy"][0]["profiled_times"]:
        print_profiler_cost(results["numpy"][0]["profiled_times"], medians["numpy"])
    if "numpy" in results:
        res, rss = results["numpy"]
        met = "met" if rss <= TARGET_RSS_MIB else "NOT met"
        print(f"ours peak RSS {rss:.0f} MiB (target <= {TARGET_RSS_MIB:.0f}: {met})"
              f"; params dtype {res['dtype']}")
        print(f"NumPy {res['numpy']}, llmc's thread pool: {res['threads']} threads (llmc.cpu.set_threads), OpenBLAS "
              f"core type: {res['openblas_core']} ({res['openblas_threads']} threads; "
              f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}); {res['openblas_config']}")
    if "torch" in results:
        res, _ = results["torch"]
        print(f"PyTorch {res['torch']}, {res['torch_threads']} threads, AdamW {res['adamw']}, mkldnn {res['mkldnn']}")
    if "numpy" in results and results["numpy"][0]["breakdown"]:
        res = results["numpy"][0]  # the breakdown comes from the profiled steps: its shares are of those
        print_breakdown(res["breakdown"], statistics.mean(res["profiled_times"] or res["times"]) * 1000)
        if results["numpy"][0]["layer_report"]:
            print("\nour step, by layer (train_gpt2.py's profiler, as --profile 1 prints it)")
            print(results["numpy"][0]["layer_report"])


def roofline_seconds(gemm):
    """(the step's GEMM FLOPs, their seconds at the sgemm rates: per shape the faster of OpenBLAS threaded and
    one thread's time / the threads)."""
    n = gemm["threads"]
    flops = sum(2 * M * K * N * calls for M, K, N, calls, _, _ in gemm["rows"])
    return flops, sum(min(t, t1 / n) * calls for _, _, _, calls, t, t1 in gemm["rows"])


def print_roofline(gemm, step_ms_median):
    """The time the step's GEMMs take at the sgemm rates measured on their own shapes, against the step."""
    n = gemm["threads"]
    flops, seconds = roofline_seconds(gemm)
    threaded = sum(t * calls for _, _, _, calls, t, _ in gemm["rows"])
    single = sum(t1 * calls for _, _, _, calls, _, t1 in gemm["rows"])
    blas = f"OpenBLAS on {n} threads" if gemm["blas_threads_set"] else "NumPy's BLAS (its thread count not set)"
    one = f", on 1 thread {flops / single / 1e9:.1f}" if single < float("inf") else ""
    print(f"sgemm on the step's own matrix shapes (np.matmul, best of each): {flops / threaded / 1e9:.1f} GFLOP/s "
          f"with {blas}{one}; the roofline takes per shape the faster of the two (the one-thread time / {n})")
    print(f"GEMM roofline: {seconds * 1000:.1f} ms of the step's {step_ms_median:.1f} ms "
          f"({100 * seconds * 1000 / step_ms_median:.0f}%) for its {flops / 1e9:.2f} GFLOP of GEMMs "
          f"({flops / seconds / 1e9:.1f} GFLOP/s)")


def floor_by_phase(gemm, B, T):
    """{phase: floor ms} of one step (llmc/floor.py's phases): the products at the sgemm rates, the bytes of
    step_bytes' formulas at the better of the measured copy and triad bandwidths."""
    bandwidth = max(gemm["copy"], gemm["triad"])
    floors = dict.fromkeys(floor.PHASES, 0.0)
    floors["products"] = 1e3 * roofline_seconds(gemm)[1]
    for name, nbytes in step_bytes(GPT2Config(*gemm["config"]), B, T).items():
        floors[floor.phase_of(name)] += 1e3 * nbytes / bandwidth
    return floors


def print_floor(gemm, ours, step_ms_median, B, T):
    """The step's floor per phase beside what our profiled steps took in each, and the fraction reached."""
    flops, seconds = roofline_seconds(gemm)
    floors = floor_by_phase(gemm, B, T)
    print(f"\nthe step's floor (llmc/floor.py, bytes: step_bytes): memory copy {gemm['copy'] / 1e9:.1f} GB/s, "
          f"triad {gemm['triad'] / 1e9:.1f} GB/s; {floor.floor_line(max(gemm['copy'], gemm['triad']), flops / seconds / 1e9)}")
    measured = ours.get("phases")
    print(f"{'phase':<12} {'ours ms':>9} {'floor ms':>9} {'reached':>8}   (ours: the mean of the profiled steps)")
    for phase in floor.PHASES + ("step",):
        floor_ms = sum(floors.values()) if phase == "step" else floors[phase]
        ms = None if measured is None else sum(measured.values()) if phase == "step" else measured[phase]
        shown = f"{ms:9.1f}" if ms is not None else f"{'-':>9}"
        reached = f"{100 * floor_ms / ms:7.0f}%" if ms and floor_ms > 0 else f"{'-':>8}"
        print(f"{phase:<12} {shown} {floor_ms:9.1f} {reached}")
    total = sum(floors.values())
    print(f"the step reaches {100 * total / step_ms_median:.0f}% of its floor ({total:.1f} ms of the median "
          f"{step_ms_median:.1f} ms; target 90%)")


def print_scaling(one_thread, medians, threads):
    """Each trainer's speed-up from one thread to `threads`, from the medians of the two runs."""
    names = {"numpy": "ours", "torch": "PyTorch"}
    parts = []
    for t, (res, _) in one_thread.items():
        single = step_ms(res["times"])[0]
        parts.append(f"{names[t]} {single / medians[t]:.2f}x ({single:.1f} -> {medians[t]:.1f} ms)")
    print(f"scaling from 1 to {threads} threads (median ms/step): " + ", ".join(parts))


def print_profiler_cost(profiled_times, unprofiled_median):
    """The median of the profiled steps against the unprofiled one: is the breakdown the step's?"""
    profiled = step_ms(profiled_times)[0]
    change = profiled / unprofiled_median - 1
    print(f"ours with the per-layer profiler: median {profiled:.1f} ms/step, without {unprofiled_median:.1f} ms "
          f"({100 * change:+.1f}%)")
    if abs(change) <= PROFILER_TOLERANCE:
        print(f"the profiled step is within {100 * PROFILER_TOLERANCE:.0f}% of the unprofiled one")
    elif change < 0:
        print(f"WARNING: the profiled step is {-100 * change:.1f}% faster than the unprofiled one (more than "
              f"{100 * PROFILER_TOLERANCE:.0f}%): the machine's load changed during the run, the times are noise")
    else:
        print(f"WARNING: the profiled step is {100 * change:.1f}% slower than the unprofiled one (more than "
              f"{100 * PROFILER_TOLERANCE:.0f}%): the per-layer breakdown below does not describe the unprofiled step")


if __name__ == "__main__":
    main()
