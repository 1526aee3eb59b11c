"""
What dev/bench_cpu.py and dev/bench_gpu.py share: the batches both trainers read, the d12 checkpoint
built from scratch when there is none, the command line that both scripts start with, the worker
subprocess's arguments, launch and result file, the profiler that breaks our step down by phase and
layer function, and the printing of that breakdown. Each script keeps its own workers and its own
result table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_status(missing="CuPy is not installed"):
    """None if CuPy sees a CUDA GPU, else one line saying why not (`missing` when CuPy is not there)."""
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except ImportError:
        return missing
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"CuPy finds no CUDA GPU ({type(e).__name__}: {first})"
    return None if n > 0 else "CUDA reports 0 devices"


# ----------------------------------------------------------------------------
# the same model and the same batches on both sides

def get_batches(data, B, T, n, vocab_size):
    """n (inputs, targets) pairs of int32 (B, T): consecutive windows of the shard, or seeded random tokens."""
    import numpy as np
    rng = np.random.default_rng(42)
    tokens = None
    if data and os.path.exists(data):
        from llmc.formats import read_data_shard
        tokens = read_data_shard(data)
    batches = []
    for i in range(n):  # batch i is the same whatever n is
        if tokens is None:
            buf = rng.integers(0, vocab_size, size=B * T + 1).astype(np.int32)
        else:
            start = (i * B * T) % (len(tokens) - B * T - 1)
            buf = np.asarray(tokens[start:start + B * T + 1], dtype=np.int32)
        batches.append((buf[:-1].reshape(B, T), buf[1:].reshape(B, T)))
    return batches


def make_checkpoint(path, script):
    """Write a from-scratch d12 model (our seeded init) to `path`, in a subprocess to keep this one small."""
    code = ("import sys, train_gpt2 as t, llmc.formats as f; m = t.gpt2_build_from_descriptor('d12'); "
            "f.write_model_file(sys.argv[1], m.config, m.params_memory)")
    r = subprocess.run([sys.executable, "-c", code, path], cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"{script}: could not build d12 from scratch; "
                         "export it instead with python train_gpt2_torch.py --model d12")


# ----------------------------------------------------------------------------
# the command line: the options both scripts start with, and what main() checks before running

def add_run_args(parser, seq_len, steps, warmup, checkpoint_help, warmup_help):
    parser.add_argument("--checkpoint", default="gpt2_d12.bin", help=checkpoint_help)
    parser.add_argument("--data", default="data/tinyshakespeare/tiny_shakespeare_train.bin",
                        help="data shard; seeded random tokens if absent")
    parser.add_argument("-b", "--batch_size", type=int, default=4)
    parser.add_argument("-t", "--seq_len", type=int, default=seq_len)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=warmup, help=warmup_help)


def add_worker_args(parser):
    """The hidden options with which a script starts itself as one trainer's worker."""
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)


def parse_run_args(parser, known):
    """Parse the command line, with the hidden worker options, and check it: -> (args, the list of
    trainers to run)."""
    add_worker_args(parser)
    args = parser.parse_args()
    return args, check_run_args(parser, args, known)


def check_run_args(parser, args, known):
    """--steps and --warmup in range, and --trainers among `known`: -> the list of trainers to run."""
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    for t in trainers:
        if t not in known:
            parser.error(f"unknown trainer {t!r} ({', '.join(known)})")
    return trainers


def check_data(args, script):
    """A missing data shard means seeded random tokens (and says so)."""
    if args.data and not os.path.exists(args.data):
        print(f"{script}: {args.data} not found (python prepro_tinyshakespeare.py makes it); using random tokens")
        args.data = ""


def find_checkpoint(args, tmp, script):
    """args.checkpoint, or a d12 built from scratch into tmp when it does not exist; made absolute."""
    if not os.path.exists(args.checkpoint):
        print(f"{script}: {args.checkpoint} not found; building d12 from scratch "
              "(train_gpt2.gpt2_build_from_descriptor)")
        args.checkpoint = os.path.join(tmp, "gpt2_d12.bin")
        make_checkpoint(args.checkpoint, script)
    print_run(args)


def print_run(args):
    """Make the checkpoint path absolute (the workers run from the repo root) and print what is read."""
    args.checkpoint = os.path.abspath(args.checkpoint)
    print(f"checkpoint: {args.checkpoint}")
    print(f"data: {args.data or 'seeded random tokens'}")


def worker_command(script_path, trainer, result_path, args):
    """The start of the command line that runs one trainer in a fresh process (the script adds its own flags)."""
    return [sys.executable, os.path.abspath(script_path), "--worker", trainer, "--result", result_path,
            "--checkpoint", args.checkpoint, "--data", args.data or "", "-b", str(args.batch_size),
            "-t", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup)]



def run_worker(script_path, trainer, args, result_path, extra_args, env=None):
    """Run one trainer in a fresh process (worker_command + extra_args); returns (the result dict it wrote
    as JSON, its peak RSS in MiB from wait4)."""
    cmd = worker_command(script_path, trainer, result_path, args) + extra_args
    return finish_worker(subprocess.Popen(cmd, env=env, cwd=REPO), script_path, trainer, result_path)


def finish_worker(proc, script_path, trainer, result_path):
    """Wait for a worker started with worker_command; returns (its result dict, its peak RSS in MiB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{os.path.basename(script_path)}: the {trainer} worker failed with exit code "
                         f"{proc.returncode}")
    with open(result_path) as f:
        return json.load(f), usage.ru_maxrss / 1024  # KiB on Linux


def worker_main(args, workers):
    """Inside the worker subprocess: run workers[args.worker](args) and write its result dict as JSON."""
    os.chdir(REPO)
    result = workers[args.worker](args)
    with open(args.result, "w") as f:
        json.dump(result, f)

def step_ms(times):
    """(median, min, max) of the timed steps, in ms."""
    ms = [s * 1000 for s in times]
    return statistics.median(ms), min(ms), max(ms)


# ----------------------------------------------------------------------------
# the breakdown of our step

class WallTimer:
    """Host wall-clock spans for the Profiler (bench_gpu.py brings one made of CUDA events)."""

    def start(self):
        return [time.perf_counter(), None]

    def stop(self, span):
        span[1] = time.perf_counter()

    def seconds(self, span):
        return span[1] - span[0]


class Profiler:
    """Wraps a trainer module's gpt2_* phases and <layer>_forward/_backward functions with timers. Time in
    a layer is charged to the phase it runs in (forward, backward, update); nested layer calls are not
    counted twice. gpt2_forward looks the layers up in the module's globals, so wrapping them works.
    Spans are read in flush(), once per step, so a CUDA timer is only synchronized there.
    The wrappers are in place from construction; detach() puts the module's own functions back
    (for steps timed without any profiler) and attach() the wrappers again."""

    PHASES = {"gpt2_zero_grad": "zero_grad", "gpt2_forward": "forward", "gpt2_backward": "backward",
              "gpt2_calculate_grad_norm": "update", "gpt2_update": "update"}

    def __init__(self, module, timer=None, layers=True):
        self.timer = timer or WallTimer()
        self.phase, self.depth, self.enabled = None, 0, False
        self.totals, self.calls, self.pending = {}, {}, []
        self.module, self.originals, self.wrapped = module, {}, {}
        for name, fn in list(vars(module).items()):
            if not callable(fn) or isinstance(fn, type) or getattr(fn, "__module__", None) != module.__name__:
                continue
            if name in self.PHASES:
                self.wrapped[name] = self.wrap(fn, name, self.PHASES[name])
            elif layers and name.endswith(("_forward", "_backward")):
                self.wrapped[name] = self.wrap(fn, name, None)
            else:
                continue
            self.originals[name] = fn
        self.attach()

    def attach(self):
        for name, fn in self.wrapped.items():
            setattr(self.module, name, fn)

    def detach(self):
        for name, fn in self.originals.items():
            setattr(self.module, name, fn)

    def wrap(self, fn, name, phase):
        def timed(*args, **kwargs):
            outer = self.phase
            if phase is not None:
                self.phase = phase
            else:
                self.depth += 1
            span = self.timer.start() if self.enabled and (phase is not None or self.depth == 1) else None
            try:
                return fn(*args, **kwargs)
            finally:
                if span is not None:
                    self.timer.stop(span)
                    key = (phase, "(total)") if phase is not None else (self.phase or "outside", name)
                    self.pending.append((key, span))
                if phase is not None:
                    self.phase = outer
                else:
                    self.depth -= 1
        return timed

    def flush(self):
        """Add the finished spans to the totals (call after the step, synchronized)."""
        for key, span in self.pending:
            self.totals[key] = self.totals.get(key, 0.0) + self.timer.seconds(span)
            self.calls[key] = self.calls.get(key, 0) + 1
        self.pending = []

    def rows(self, steps):
        """[phase, function, seconds per step, calls per step] for every timed function."""
        return [[phase, name, secs / steps, self.calls[(phase, name)] / steps]
                for (phase, name), secs in self.totals.items()]


def print_breakdown(rows, step_ms):
    layers = any(name != "(total)" for _, name, _, _ in rows)
    print("\nour step, by phase" + (" and layer function (ms per step, summed over layers; calls per step)"
                                     if layers else " (ms per step)"))
    print(f"{'phase':<10} {'function':<34} {'ms':>9} {'calls':>6} {'% step':>7}   (of the mean step, {step_ms:.1f} ms)")
    order = {"zero_grad": 0, "forward": 1, "backward": 2, "update": 3, "outside": 4}
    rows = sorted(rows, key=lambda r: (order.get(r[0], 9), r[1] != "(total)", -r[2]))
    phase_total = 0.0
    for phase, name, secs, calls in rows:
        ms = secs * 1000
        if name == "(total)":
            phase_total += ms
            print(f"{phase:<10} {'(phase total)':<34} {ms:9.1f} {calls:6.0f} {100 * ms / step_ms:6.1f}%")
        else:
            print(f"{'':<10} {name:<34} {ms:9.1f} {calls:6.0f} {100 * ms / step_ms:6.1f}%")
    print(f"{'':<10} {'(step minus phases: loop overhead)':<34} {step_ms - phase_total:9.1f}")


