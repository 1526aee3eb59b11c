"""dev/profile_gpt2cu.py: where a training step of train_gpt2_cuda.py spends its time, kernel by kernel, as
llm.c's profile_gpt2cu.py, with dev/perf_model.py's prediction beside each kernel.

It builds the model the trainer would (the same -e -b -t -p -r -w -ge -fa), runs one warm-up step (kernel
compiles, cuBLAS's first calls), then -x steps on a random batch, and prints per kernel: calls per step,
time per step and its share of the step, bytes and the bandwidth they make in that time, FLOP/s, and
beside them the traffic model's bytes and modeled time for this GPU (perf_model's table at this shape).
Three ways to measure, the first that is there:

    ncu (on PATH, --ncu 1)  the steps run in a child process under Nsight Compute, which times each kernel
                            alone (kernels serialized) and reads its DRAM bytes from the counters: measured
                            bytes. cuBLAS's kernels keep cuBLAS's names (sm90_xmma_gemm_..., cutlass_...),
                            which do not say which GEMM of the model they are: their rows have no model
                            beside them, and the GEMMs' modeled total is a line of its own.
    CUDA events             (a GPU without ncu, or --ncu 0) two events around every launch of the trainer's
                            kernel() and gemm(), read after each step. Bytes are the model's (events count
                            none), so the bandwidth column is model bytes / measured time. CuPy's own fills,
                            copies and sums are not wrapped: the step's time less the kernels' is their
                            row ("other (CuPy, host gaps)").
    the emulator            (LLMC_EMULATE=1, or no GPU) one step with the traffic counter on: per kernel the
                            emulator's counted bytes (every load and store, emulator/README.md) beside the
                            model's, exactly what dev/perf_model.py --check compares; the time column is the
                            emulator's CPU time, which says nothing about a GPU.

FLOP/s: the model's FLOPs (the GEMMs' 2mnk, flash attention's tensor-core products) over the measured time;
the other kernels' arithmetic is not counted, as in the model. The model's GPU is the one of
perf_model.GPUS that the device's name matches (H100 when none does, said in a line).

    python dev/profile_gpt2cu.py -e d12 -b 16 -t 1024                 # on a GPU: ncu if found, else events
    python dev/profile_gpt2cu.py -e d12 -b 16 -t 1024 -ge 2 --ncu 0    # CUDA events, GELU fusion on
    LLMC_EMULATE=1 python dev/profile_gpt2cu.py -e tiny.bin -b 2 -t 16 -x 1   # the emulator: counted bytes

llm.c's script builds profile_gpt2cu (one step of its trainer) and reads ncu's full metric set from a
report; it also shows L2 traffic, instructions and tensor-core utilisation, which this one leaves out.
"""

import argparse
import collections
import csv
import io
import os
import shutil
import subprocess
import sys

import numpy as np

DEV = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, DEV)
sys.path.insert(0, os.path.dirname(DEV))

import perf_model  # noqa: E402
from emulator import import_emulated  # noqa: E402
from llmc.cli import parse_args  # noqa: E402
from llmc.utils import ConfigError, FormatError  # noqa: E402

NCU_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum")
OTHER = "other (CuPy, host gaps)"


class Measured:
    """Per kernel name: launches and seconds over the timed steps, and bytes where they were measured."""

    def __init__(self):
        self.calls, self.seconds, self.bytes = collections.Counter(), collections.Counter(), collections.Counter()

    def add(self, name, seconds, nbytes=0):
        self.calls[name] += 1
        self.seconds[name] += seconds
        self.bytes[name] += nbytes


# ----------------------------------------------------------------------------
# CUDA events around every launch

def trainer_caller(cu):
    """The name of the innermost function of the trainer module on the stack (the gemm's caller:
    matmul_forward, attention_backward, ...), past any wrappers around gemm."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") != cu.__name__:
        frame = frame.f_back
    return frame.f_code.co_name if frame is not None else "?"


class LaunchTimer:
    """While open, the trainer's kernel() returns kernels whose launches, and its gemm() calls, are bracketed
    by two events each; read(measured) waits for the last one and adds every launch's time."""

    def __init__(self, cu):
        self.cu, self.pending = cu, []

    def __enter__(self):
        self.kernel, self.gemm = self.cu.kernel, self.cu.gemm
        self.cu.kernel, self.cu.gemm = self._kernel, self._gemm
        return self

    def __exit__(self, *exc):
        self.cu.kernel, self.cu.gemm = self.kernel, self.gemm

    def _timed(self, name, fn, args, kwargs):
        start, end = self.cu.Event(), self.cu.Event()
        start.record()
        result = fn(*args, **kwargs)
        end.record()
        self.pending.append((name, start, end))
        return result

    def _kernel(self, file, name, floatx=np.float32):
        fn = self.kernel(file, name, floatx)
        return lambda *args, **kwargs: self._timed(name, fn, args, kwargs)

    def _gemm(self, *args, **kwargs):
        return self._timed(f"gemm ({trainer_caller(self.cu)})", self.gemm, args, kwargs)

    def read(self, measured):
        for name, start, end in self.pending:
            end.synchronize()
            measured.add(name, self.cu.elapsed_ms(start, end) / 1e3)
        self.pending.clear()


def timed_steps(cu, model, x, y, B, T, steps, measured):
    """steps training steps with every launch timed; returns the steps' seconds in all (two events each)."""
    total = 0.0
    for _ in range(steps):
        begin, end = cu.Event(), cu.Event()
        with LaunchTimer(cu) as timer:
            begin.record()
            perf_model.training_step(cu, model, x, y, B, T)
            end.record()
        end.synchronize()
        total += cu.elapsed_ms(begin, end) / 1e3
        timer.read(measured)
    return total


# ----------------------------------------------------------------------------
# ncu: this script again, as a child process, under Nsight Compute

def kernel_short_name(name):
    """ncu's demangled kernel name without return type, template arguments and parameters."""
    name = name.split("(")[0].strip()
    name = name.split("<")[0].strip()
    return name.split(" ")[-1]


def parse_ncu_csv(text, measured):
    """ncu --csv --page raw --print-units base: a header row, a units row, then one row per kernel launch."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    if len(rows) < 2:
        raise SystemExit(f"profile_gpt2cu.py: ncu printed no kernel rows; its output ends: {text[-400:]!r}")
    for row in rows[1:]:                                  # rows[0]: the units (nsecond, byte)
        nbytes = float(row["dram__bytes_read.sum"]) + float(row["dram__bytes_write.sum"])
        measured.add(kernel_short_name(row["Kernel Name"]), float(row["gpu__time_duration.sum"]) * 1e-9, nbytes)


def run_under_ncu(ncu, argv, measured):
    cmd = [ncu, "--csv", "--page", "raw", "--print-units", "base", "--profile-from-start", "off",
           "--metrics", ",".join(NCU_METRICS), sys.executable, os.path.abspath(__file__), *argv, "--child", "1"]
    print("[profile] " + " ".join(cmd) + "  (kernels serialized, each timed alone)")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = ((r.stderr or r.stdout).strip().splitlines() or ["no output"])[-1][:300]
        raise SystemExit(f"profile_gpt2cu.py: ncu failed ({r.returncode}): {last} (without access to the GPU's "
                         "counters: run as root, or --ncu 0 for CUDA events)")
    parse_ncu_csv(r.stdout, measured)


# ----------------------------------------------------------------------------
# the tables

def model_gpu(device):
    """The index into perf_model.GPUS of the device's model (H100 when the name matches none), and a note."""
    name = device.upper()
    picks = (("H200", "H200"), ("H100", "H100-SXM"), ("A100-SXM4-80GB", "A100-80GB"), ("A100", "A100-40GB"))
    labels = [label for label, _, _ in perf_model.GPUS]
    for key, label in picks:
        if key in name:
            return labels.index(label), None
    return labels.index("H100-SXM"), f"{device} is none of perf_model's GPUs: the model column is an H100's"


def rate(amount, seconds):
    """amount per second in billions, as a column (a dash without a time or an amount)."""
    return f"{amount / seconds / 1e9:9.1f}" if seconds > 0 and amount else f"{'-':>9}"


def print_table(measured, steps, step_seconds, model_rows, gpu, bytes_measured):
    """One row per kernel, slowest first (by measured time); a kernel only the model has gets dashes.
    bytes_measured: the bytes column is measured (ncu, the emulator), else the model's."""
    label = perf_model.GPUS[gpu][0]
    print(f"{'kernel':<44} {'calls':>5} {'ms':>9} {'%step':>6} {'MB':>10} {'GB/s':>9} {'GFLOP/s':>9} "
          f"{'model MB':>10} {label + ' us':>12}")
    names = sorted(set(measured.seconds) | set(model_rows), key=lambda n: -measured.seconds.get(n, 0.0))
    for name in names:
        row = model_rows.get(name)
        model = f"{(row.bytes_read + row.bytes_written) / 1e6:10.4f} {row.seconds[gpu] * 1e6:12.1f}" if row else \
            f"{'-':>10} {'-':>12}"
        if name not in measured.seconds:
            print(f"{name[:44]:<44} {'-':>5} {'-':>9} {'-':>6} {'-':>10} {'-':>9} {'-':>9} {model}")
            continue
        seconds, calls = measured.seconds[name] / steps, measured.calls[name] / steps
        nbytes = measured.bytes[name] / steps if bytes_measured else \
            (row.bytes_read + row.bytes_written if row else 0)
        print(f"{name[:44]:<44} {calls:5g} {seconds * 1e3:9.3f} {100 * seconds / step_seconds:6.1f} "
              f"{nbytes / 1e6:10.4f} {rate(nbytes, seconds)} {rate(row.flops if row else 0, seconds)} {model}")
    return names


def print_counted(names, measured, steps):
    """The emulator's counts, whole: per kernel the launches and the bytes read + written in one step."""
    print(f"{'kernel (emulator, one step)':<44} {'launches':>8} {'bytes counted':>14}")
    for name in names:
        if measured.calls.get(name):
            print(f"{name[:44]:<44} {measured.calls[name] // steps:>8d} {measured.bytes[name] // steps:>14d}")


# ----------------------------------------------------------------------------

def emulator_step(cu, model, x, y, B, T, measured):
    """One step timed (CPU) and counted: each kernel's launches from the timer, bytes from the counter."""
    begin, end = cu.Event(), cu.Event()
    with LaunchTimer(cu) as timer:
        begin.record()
        launches, gemms, _ = perf_model.count_training_step(cu, model, x, y, B, T)
        end.record()
    timer.read(measured)
    for r in launches:
        measured.bytes[r.kernel] += r.bytes_read + r.bytes_written
    for g in gemms:
        measured.bytes[f"gemm ({g.caller})"] += g.bytes_read + g.bytes_written
    return cu.elapsed_ms(begin, end) / 1e3


def setup(cu, opts):
    """The trainer's own setup for these flags (precision, TF32, -ge, -fa: its device_setup) and the model's
    config, read without building it: (settings, the model file or descriptor, config)."""
    flags = ["-e", opts.model, "-b", opts.B, "-t", opts.T, "-p", opts.precision, "-r", opts.recompute,
             "-w", opts.master_weights, "-ge", opts.gelu_fusion, "-fa", opts.flash_attention]
    args = parse_args([str(f) for f in flags], cu.TRAIN_GPT2_CU_DEFAULTS)
    settings = cu.device_setup(args)
    config = perf_model.config_of(args.load_filename)
    if opts.T > config.max_seq_len:
        raise ConfigError(f"-t {opts.T} exceeds the model's max_seq_len {config.max_seq_len}")
    return settings, args.load_filename, config


def measure(cu, opts, mode, settings, model_name, x, y, measured):
    """Train and measure in this process (the emulator, CUDA events, or the steps ncu profiles: --child 1);
    returns the seconds of the measured steps in all."""
    B, T = opts.B, opts.T
    model = cu.gpt2_build_from_descriptor(model_name, settings=settings)
    cu.gpt2_allocate_state(model, B, T)
    if mode == "emulator":
        return emulator_step(cu, model, x, y, B, T, measured)
    perf_model.training_step(cu, model, x, y, B, T)           # warm-up: compiles, cuBLAS's first calls
    cu.xp.cuda.Device().synchronize()
    if not opts.child:
        seconds = timed_steps(cu, model, x, y, B, T, opts.steps, measured)
        measured.add(OTHER, max(0.0, seconds - sum(measured.seconds.values())))
        measured.calls[OTHER] = 0
        return seconds
    cu.xp.cuda.profiler.start()                               # ncu profiles from here to stop()
    for _ in range(opts.steps):
        perf_model.training_step(cu, model, x, y, B, T)
    cu.xp.cuda.Device().synchronize()
    cu.xp.cuda.profiler.stop()
    return 0.0


def parse_options(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", dest="model", default="d12", help="d6, d12, ..., gpt3:c768, ... or a .bin model file")
    p.add_argument("-b", dest="B", type=int, default=16)
    p.add_argument("-t", dest="T", type=int, default=1024)
    p.add_argument("-p", dest="precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("-r", dest="recompute", type=int, default=1)
    p.add_argument("-w", dest="master_weights", type=int, default=1)
    p.add_argument("-ge", dest="gelu_fusion", type=int, default=0, choices=(0, 1, 2))
    p.add_argument("-fa", dest="flash_attention", type=int, default=1, choices=(0, 1))
    p.add_argument("-x", dest="steps", type=int, default=3, help="steps timed after one warm-up step")
    p.add_argument("--ncu", type=int, default=1, help="1: under ncu when it is on PATH (a GPU), 0: CUDA events")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)   # the process ncu profiles
    opts = p.parse_args(argv)
    if opts.steps < 1 or opts.B < 1 or opts.T < 1:
        p.error(f"-x, -b and -t must be positive, got -x {opts.steps} -b {opts.B} -t {opts.T}")
    return opts


def report(cu, opts, mode, settings, config, distinct, measured, steps, step_seconds):
    """The table, with perf_model's formulas for this run beside it; returns the kernels' names in its order."""
    s, B, T = settings, opts.B, opts.T
    flash, attention = cu.attention_path(config, s.precision, s.flash_attention)
    formulas = perf_model.step_launches(cu, config, B, T, s.precision, s.recompute, s.master_weights, distinct,
                                        s.gelu_fusion, flash)
    rows, _ = perf_model.tabulate(formulas, lambda f: f.kernel, s.gemm_precision)
    gpu, note = model_gpu(s.name)
    print(f"[profile] {s.name}: L={config.num_layers} NH={config.num_heads} C={config.channels} B={B} T={T} "
          f"{s.precision} -r {s.recompute} -ge {s.gelu_fusion}; {attention}")
    print(f"[profile] {mode}: " + {"emulator": "one step counted on the emulator (time: its CPU time, not a GPU's)",
                                   "ncu": f"{steps} steps under ncu, per step (bytes: DRAM, measured)",
                                   "events": f"{steps} steps, CUDA events around each launch, per step "
                                             "(bytes: the model's)"}[mode])
    if note:
        print(f"[profile] {note}")
    names = print_table(measured, steps, step_seconds, {r.name: r for r in rows}, gpu, mode != "events")
    print(f"{'step':<44} {sum(measured.calls.values()) / steps:5g} {step_seconds * 1e3:9.3f}")
    if mode == "ncu":
        gemms = [r for r in rows if r.name.startswith("gemm")]
        print(f"the model's GEMMs: {len(gemms)} kinds, {sum(r.launches for r in gemms)} calls, "
              f"{sum(r.seconds[gpu] for r in gemms) * 1e3:.3f} ms on an {perf_model.GPUS[gpu][0]} "
              "(cuBLAS's rows above, under cuBLAS's names)")
    if mode == "emulator":
        print()
        print_counted(names, measured, steps)
    return names


def trainer_module():
    """train_gpt2_cuda, or where there is no GPU (and no LLMC_EMULATE=1) a copy of it on the emulator."""
    import train_gpt2_cuda
    if train_gpt2_cuda.NO_GPU is None or train_gpt2_cuda.EMULATE:
        return train_gpt2_cuda
    print(f"[profile] {train_gpt2_cuda.NO_GPU}")
    print("[profile] so the emulator runs it instead (LLMC_EMULATE=1)")
    return import_emulated(os.path.join(os.path.dirname(DEV), "train_gpt2_cuda.py"), "train_gpt2_cuda_emu")


def main(argv=None, trainer=None):
    """Print the table; return dict(measured, names, steps, step_seconds, mode), None in the child ncu runs.
    trainer: train_gpt2_cuda (default: trainer_module())."""
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_options(argv)
    cu = trainer or trainer_module()
    ncu = shutil.which("ncu") if opts.ncu and not cu.EMULATE else None
    mode = "emulator" if cu.EMULATE else "ncu" if ncu else "events"
    try:
        settings, model_name, config = setup(cu, opts)
        x, y = perf_model.random_batch(config.vocab_size, opts.B, opts.T)
        measured, steps = Measured(), 1 if mode == "emulator" else opts.steps
        if mode == "ncu" and not opts.child:
            run_under_ncu(ncu, argv, measured)
            seconds = sum(measured.seconds.values())
        else:
            seconds = measure(cu, opts, mode, settings, model_name, x, y, measured)
    except (ConfigError, FormatError, FileNotFoundError) as e:
        raise SystemExit(f"profile_gpt2cu.py: {e}") from None
    if opts.child:
        return None
    names = report(cu, opts, mode, settings, config, len(np.unique(x)), measured, steps, seconds / steps)
    return dict(measured=measured, names=names, steps=steps, step_seconds=seconds / steps, mode=mode)


if __name__ == "__main__":
    main()
