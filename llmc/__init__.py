"""What the programs share, as llm.c keeps it in llmc/*.h. The trainers hold the model and its math;
everything around it lives here, once:

    utils.py        FormatError, ConfigError, write_atomic (no half-written file is ever left)
    formats.py      llm.c's .bin files byte for byte: model, debug state, tokenizer, data shards
    dataloader.py   DataLoader: batches of B*T+1 tokens, sequential or shuffled (dataloader.h)
    rand.py         MT19937 and normal_, bit-exact with PyTorch's CPU generator (rand.h)
    schedulers.py   get_lr: cosine, linear, constant, wsd (schedulers.h)
    sampler.py      the xorshift sampler (sampler.h)
    tokenizer.py    Tokenizer (decode, tokenizer.h) and tiktoken's GPT-2 encoder
    logger.py       Logger: main.log (logger.h)
    cli.py          llm.c's `-x value` flags, parsed into attributes with llm.c's names
    profiler.py     --profile 1: per-layer times, and the step's floor per phase
    floor.py        the CPU step's floor: products at the sgemm rate, other bytes at memory bandwidth
    mfu.py          FLOPs per token, GPU peaks, MFU and the smoothed tokens/s of the step line (mfu.h)
    outlier.py      the z-scores of loss and gradient norm behind -sl/-sg (outlier_detector.h)
    checkpoint.py   llm.c's state files and checkpoints: -n -nk -nm, -y 1 resume
    run.py          what train_gpt2.train calls that is not the lesson: the Trainer interface both trainers
                    implement, one-line errors, flag and -o checks, resume, checkpoints, Ctrl-C, ranks
    collectives.py  data parallel over torch.distributed (gloo) for CPU processes started by torchrun
    cpu.py          what makes NumPy fast on a CPU: BLAS, threads, memory (no llm.c twin: C has OpenMP)
    cuda_common.py  kernels/*.cu as NVRTC (or the emulator) compiles them (cuda_common.h)

One thing happens on import. NumPy's bundled OpenBLAS picks its kernels by CPU model and falls back
to the AVX2 (Haswell) ones on a CPU it does not know, even one with AVX-512 (some builds do so on
AMD Zen 4). The choice is read from OPENBLAS_CORETYPE once, when NumPy is first imported, so it is
made here, before any module of this package imports NumPy, and only when NumPy is not loaded yet
and the variable is unset (a user's own setting wins). The trainers print the kernels in use.
"""

import os
import sys


def _cpu_has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


OPENBLAS_CORETYPE_SET_HERE = False
if "numpy" not in sys.modules and "OPENBLAS_CORETYPE" not in os.environ and _cpu_has_avx512():
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    OPENBLAS_CORETYPE_SET_HERE = True
