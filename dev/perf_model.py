"""dev/perf_model.py: a modeled GPU time for one training step of train_gpt2_cuda.py, before any GPU runs it.

One step of the CUDA trainer (zero_grad, forward with targets, backward, gradient norm, AdamW: the
training loop's order) runs on the kernel emulator (LLMC_EMULATE=1) inside emulator.count_traffic(),
which counts the bytes every kernel launch reads and writes in global memory, at its loads and stores
(emulator/README.md, "traffic counter"). The GEMMs are cuBLAS on a GPU and NumPy here, so gemm() is
wrapped: each call counts 2*M*N*K*batch FLOPs and its operands' bytes (A and B read once, out written,
and read too when it accumulates). Per kernel name (all launches of it together) and in total, the
table gives launches, bytes, and the modeled time on each GPU below:

    kernel:  LAUNCH_OVERHEAD_S + (bytes read + bytes written) / HBM bandwidth
    GEMM:    LAUNCH_OVERHEAD_S + max(bytes / HBM bandwidth, FLOPs / tensor-core peak)

summed launch by launch. The peaks are llmc/mfu.py's (PEAK_TFLOPS, looked up by the name CUDA reports
for the card: bf16, or tf32 for an fp32 run, as the trainer turns TF32 on for sm >= 80); the bandwidths
are NVIDIA's datasheet numbers. LAUNCH_OVERHEAD_S is an assumption: about what a launch costs from
Python (CuPy) when the GPU is not ahead of the host.

What it cannot see: caches (every access counts as HBM traffic; a kernel that rereads a row from L2 or
L1, as LayerNorm does, is charged for each read), coalescing (a scattered 4-byte access costs a 32-byte
sector on a GPU, here 4 bytes), latency and occupancy (a kernel with too few threads, or one that waits
on its own loads, models as fast as one that streams at full bandwidth), and the step's memsets and
host-device copies (gpt2_zero_grad's fill, the backward's dresidual fill, the batch upload), which are
not kernel launches here. The modeled time is a lower bound of the kind a roofline gives.

    python dev/perf_model.py -e d6 -b 2 -t 64 -p bf16      # d6, one step (about a minute on 2 cores)
    python dev/perf_model.py --tiny 1                       # L2 NH2 C64, V 1000: seconds
"""

import argparse
import collections
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emulator import count_traffic  # noqa: E402
from llmc import formats  # noqa: E402
from llmc.mfu import peak_flops  # noqa: E402

# the GPUs modeled: a label, the name CUDA reports (llmc/mfu.py's peak_flops looks the tensor-core peak
# up by it), and the HBM bandwidth in bytes/s from NVIDIA's datasheets (SXM parts)
GPUS = (
    ("A100-40GB", "NVIDIA A100-SXM4-40GB", 1.555e12),   # HBM2
    ("A100-80GB", "NVIDIA A100-SXM4-80GB", 2.039e12),   # HBM2e
    ("H100-SXM", "NVIDIA H100 80GB HBM3", 3.35e12),     # HBM3
    ("H200", "NVIDIA H200", 4.8e12),                    # HBM3e
)
LAUNCH_OVERHEAD_S = 3e-6    # per kernel launch and per GEMM call (an assumption, see above)

TINY = formats.GPT2Config(max_seq_len=64, vocab_size=1000, num_layers=2, num_heads=2, channels=64,
                          padded_vocab_size=formats.padded_vocab(1000))

Gemm = collections.namedtuple("Gemm", "caller m n k batch bytes_read bytes_written flops")


class Row:
    """One line of the table: every launch of one kernel (or every GEMM of one launcher)."""

    def __init__(self, name):
        self.name = name
        self.launches = self.bytes_read = self.bytes_written = self.flops = 0
        self.seconds = [0.0] * len(GPUS)

    def add(self, bytes_read, bytes_written, flops, gemm_precision):
        self.launches += 1
        self.bytes_read += bytes_read
        self.bytes_written += bytes_written
        self.flops += flops
        for i, (_, device, bandwidth) in enumerate(GPUS):
            t = (bytes_read + bytes_written) / bandwidth
            if flops:
                t = max(t, flops / peak_flops(device, gemm_precision))
            self.seconds[i] += LAUNCH_OVERHEAD_S + t


def counting_gemm(gemm, calls):
    """gemm() as the trainer's, that also appends a Gemm record to calls (FLOPs and bytes of the call)."""
    def wrapped(out, a, b, transpose_a=False, transpose_b=False, accumulate=False):
        m, n = out.shape[-2:]
        k = a.shape[-2] if transpose_a else a.shape[-1]
        batch = out.size // (m * n)
        caller = sys._getframe(1).f_code.co_name          # matmul_forward, attention_backward, ...
        calls.append(Gemm(caller, m, n, k, batch, a.nbytes + b.nbytes + (out.nbytes if accumulate else 0),
                          out.nbytes, 2 * m * n * k * batch))
        return gemm(out, a, b, transpose_a, transpose_b, accumulate)
    return wrapped


def emulated_trainer():
    """train_gpt2_cuda imported with LLMC_EMULATE=1 (its switch reads the variable once, at import)."""
    os.environ["LLMC_EMULATE"] = "1"
    import train_gpt2_cuda
    if not train_gpt2_cuda.EMULATE:
        raise SystemExit("perf_model.py: train_gpt2_cuda was imported before without LLMC_EMULATE=1; "
                         "run python dev/perf_model.py in a process of its own")
    return train_gpt2_cuda


def build_model(cu, args):
    precision = args.precision
    if args.tiny:
        rng = np.random.default_rng(0)
        params = (0.02 * rng.standard_normal(formats.num_parameters(TINY))).astype(np.float32)
        return cu.GPT2(TINY, params, args.recompute, precision, bool(args.master_weights))
    return cu.gpt2_build_from_descriptor(args.model, recompute=args.recompute, precision=precision,
                                         master_weights=bool(args.master_weights))


def training_step(cu, model, x, y, B, T):
    """One step of train_gpt2.py's loop (one micro-step, no clipping beyond GRAD_CLIP)."""
    model.dlogits_in_forward = True                      # the loop's one classifier pass per micro-step
    cu.gpt2_zero_grad(model)
    cu.gpt2_forward(model, x, y, B, T)
    cu.gpt2_backward(model)
    norm = cu.gpt2_calculate_grad_norm(model)
    scale = cu.host.grad_clip_scale(norm, cu.GRAD_CLIP)
    cu.gpt2_update(model, 3e-4, cu.BETA1, cu.BETA2, cu.ADAM_EPS, 0.0, 1, grad_scale=scale)
    return model.mean_loss


def model_step(cu, args):
    """Run one counted step of the trainer module cu. Returns (launches, gemms, rows, total, loss, model):
    the emulator's Traffic records, the Gemm records, the table's rows (kernels by name, then GEMMs by
    launcher), its total Row, the step's loss and the model."""
    model = build_model(cu, args)
    config, B, T = model.config, args.batch_size, args.seq_len
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, (B, T), dtype=np.int32)
    y = rng.integers(0, config.vocab_size, (B, T), dtype=np.int32)
    cu.gpt2_allocate_state(model, B, T)                  # its memory report prints before the table
    gemm_precision = "bf16" if model.precision == "bf16" else "tf32"
    gemms, gemm = [], cu.gemm
    cu.gemm = counting_gemm(gemm, gemms)
    try:
        with count_traffic() as launches:
            loss = training_step(cu, model, x, y, B, T)
    finally:
        cu.gemm = gemm
    rows = {}
    for r in launches:
        rows.setdefault(r.kernel, Row(r.kernel)).add(r.bytes_read, r.bytes_written, 0, gemm_precision)
    for g in gemms:
        name = f"gemm ({g.caller})"
        rows.setdefault(name, Row(name)).add(g.bytes_read, g.bytes_written, g.flops, gemm_precision)
    total = Row("total")
    for row in rows.values():
        total.launches += row.launches
        total.bytes_read += row.bytes_read
        total.bytes_written += row.bytes_written
        total.flops += row.flops
        total.seconds = [t + s for t, s in zip(total.seconds, row.seconds)]
    return launches, gemms, list(rows.values()), total, loss, model


def print_table(rows, total):
    labels = [label for label, _, _ in GPUS]
    print(f"{'kernel':<44} {'launches':>8} {'MB read':>9} {'MB written':>10} {'GFLOP':>8} "
          + " ".join(f"{label + ' us':>13}" for label in labels))
    for row in sorted(rows, key=lambda r: -r.seconds[0]) + [total]:
        if row is total:
            print("-" * (44 + 38 + 14 * len(labels) + 1))
        print(f"{row.name:<44} {row.launches:>8} {row.bytes_read / 1e6:>9.3f} {row.bytes_written / 1e6:>10.3f} "
              f"{row.flops / 1e9:>8.3f} " + " ".join(f"{s * 1e6:>13.1f}" for s in row.seconds))


def main(argv=None, trainer=None):
    """Print the table; return (launches, gemms, rows, total). trainer: train_gpt2_cuda imported with
    LLMC_EMULATE=1 (default: import it so)."""
    cu = trainer or emulated_trainer()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-e", "--model", default="d6", help="d6, d12, ... or a .bin checkpoint")
    parser.add_argument("--tiny", type=int, default=0, help="1: a tiny model instead (L2 NH2 C64 V1000 maxT64)")
    parser.add_argument("-b", "--batch_size", type=int, default=2)
    parser.add_argument("-t", "--seq_len", type=int, default=64)
    parser.add_argument("-p", "--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("-r", "--recompute", type=int, default=cu.TRAIN_GPT2_CU_DEFAULTS["recompute"],
                        help="what the backward recomputes, as train_gpt2_cuda.py's -r")
    parser.add_argument("-w", "--master_weights", type=int, default=1)
    args = parser.parse_args(argv)
    t0 = time.time()
    launches, gemms, rows, total, loss, model = model_step(cu, args)
    c = model.config
    print(f"[perf_model] L={c.num_layers} NH={c.num_heads} C={c.channels} Vp={c.padded_vocab_size} "
          f"B={args.batch_size} T={args.seq_len} {model.precision}, one training step (loss {loss:.4f}), "
          f"counted on the emulator in {time.time() - t0:.1f} s")
    print(f"modeled: {LAUNCH_OVERHEAD_S * 1e6:g} us per launch + bytes / HBM bandwidth "
          f"(GEMMs: max of that and FLOPs / {'bf16' if model.precision == 'bf16' else 'tf32'} peak)")
    print("  " + ", ".join(f"{label} {bw / 1e12:g} TB/s {peak_flops(device, 'bf16') / 1e12:g} TFLOP/s bf16"
                           for label, device, bw in GPUS))
    print_table(rows, total)
    tokens = args.batch_size * args.seq_len
    print("tokens/s modeled: " + ", ".join(f"{label} {tokens / s:,.0f}" for (label, _, _), s in
                                            zip(GPUS, total.seconds)))
    print("not counted: caches, coalescing, latency; the step's memsets and host-device copies (see the header)")
    return launches, gemms, rows, total


if __name__ == "__main__":
    main()
