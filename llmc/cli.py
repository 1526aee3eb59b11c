"""The trainers' command line, as llm.c's: `-x value` pairs, every flag followed by a value.

The letters are llm.c's (train_gpt2.cu), and so are the names the parsed values get: `-l 3e-4`
becomes args.learning_rate, `-k wsd` args.lr_scheduler_type, `-x 40` args.max_steps. A program
lists the flags it takes with their defaults, by name; parse_args returns a SimpleNamespace with
one attribute per flag, of its default's type, and the set of names given on the command line
(`args.given`), so a program can tell a default from a choice.
"""

import os
import sys
from types import SimpleNamespace

FLAGS = {  # flag (without its dash): (llm.c's variable name, what it sets)
    "i": ("train_data_pattern", "train data: a file or a glob of shards"),
    "j": ("val_data_pattern", "val data: a file or a glob of shards"),
    "e": ("load_filename", "model file (.bin, fp32 or bf16), or d6/d12/d24/d36/d48 (GPT-2) or gpt3:c384 ... "
          "gpt3:c12288 (GPT-3's widths, maxT 2048) to start from scratch"),
    "o": ("output_log_dir", "output dir for main.log, checkpoints and the final model file"),
    "n": ("checkpoint_every", "write a checkpoint every how many steps, and at the end (0 = never; needs -o)"),
    "nk": ("checkpoints_keep", "keep only the last this many checkpoints (0 = all)"),
    "nm": ("major_checkpoint_every", "a checkpoint at a multiple of this many steps is never deleted (0 = none)"),
    "y": ("resume", "resume from the newest checkpoint in -o (and append to main.log)? 0/1"),
    "b": ("B", "(micro) batch size B"),
    "t": ("T", "sequence length T (at most the model's max_seq_len)"),
    "d": ("total_batch_size", "tokens per optimizer step, a multiple of B*T: gradient accumulation (-1 = B*T)"),
    "x": ("max_steps", "optimizer steps (-1 = one epoch)"),
    "l": ("learning_rate", "learning rate"),
    "u": ("warmup_iterations", "learning rate warmup steps"),
    "q": ("final_learning_rate_frac", "final learning rate, as a fraction of -l"),
    "k": ("lr_scheduler_type", "learning rate schedule: cosine, linear, constant, wsd"),
    "c": ("weight_decay", "weight decay (the 2-D weights only)"),
    "v": ("val_loss_every", "val loss every how many steps (0 = never)"),
    "m": ("val_max_steps", "val batches per val loss (-1 = the whole val split)"),
    "s": ("sample_every", "sample every how many steps (0 = never)"),
    "g": ("genT", "tokens to sample"),
    "a": ("overfit_single_batch", "train on the first val batch over and over? 0/1"),
    "h": ("hellaswag_eval", "HellaSwag (dev/data/hellaswag/hellaswag_val.bin) every -v steps and at the end? 0/1"),
    "f": ("override_enable_tf32", "TF32 tensor cores for the fp32 matmuls? 0/1"),
    "p": ("precision", "bf16 (mixed precision: bf16 weights, gradients, activations) or fp32 (llm.c: PRECISION at build)"),
    "w": ("use_master_weights", "bf16: keep fp32 master weights for AdamW? 0/1"),
    "r": ("recompute", "recompute in the backward to save memory: 0 none, 1 GELU, 2 GELU and LayerNorm"),
    "ge": ("gelu_fusion", "GELU fused into the fc GEMMs (cuBLASLt epilogues): 0 none, 1 forward (bias + GELU), "
           "2 also backward (GELU's gradient); llm.c's default 2 on sm_90 waits here for a GPU check"),
    "fa": ("flash_attention", "attention: 1 flash (kernels/flash_attention.cu: bf16, head size 64 or 128; no "
           "(B,NH,T,T) tensors), 0 materialized (llm.c's non-cuDNN path); where flash cannot run, 0 runs and says why"),
    "sl": ("skip_update_lossz", "skip an update whose loss z-score (last 128 steps) is above this (0 = off)"),
    "sg": ("skip_update_gradz", "skip an update whose grad norm z-score (last 128 steps) is above this (0 = off)"),
    "z": ("zero_stage", "ZeRO stage with several processes (torchrun): 0 all-reduce the gradients, 1 also shard AdamW's m, v"),
    "pn": ("num_processes", "processes in all, when started by hand (-pi fs or tcp; mpirun and torchrun say it)"),
    "pr": ("process_rank", "this process's rank, when started by hand (-pi fs or tcp)"),
    "pg": ("gpus_per_node", "GPUs per machine (rank r uses GPU r % this)"),
    "pi": ("nccl_init_method", "how the processes exchange NCCL's id: mpi (mpirun), fs (a shared dir, -pf), tcp (-ps)"),
    "ps": ("server_ip", "-pi tcp: the IP address of rank 0's machine"),
    "pf": ("fs_path", "-pi fs: a directory every process can read and write"),
    "lg": ("log_gpu_every", "GPU readings (NVML: memory, utilisation, SM clock, temperature, power, throttling) "
           "every this many steps, to stdout and main.log (-1 = off; needs pip install nvidia-ml-py)"),
    "profile": ("profile", "print a per-layer time table at the end? 0/1"),
    "as": ("activation_stats_every", "per-layer activation and gradient statistics into -o DIR/stats.jsonl every "
           "how many steps (0 = never; llmc/actstats.py)"),
}
NAMES = {name: flag for flag, (name, _) in FLAGS.items()}      # llm.c's name -> flag letter(s)
KINDS = {int: "an integer", float: "a number", str: "a string"}


def flag_of(name):
    """The command-line spelling of a flag given by its name: -l, or --profile."""
    flag = NAMES[name]
    return f"-{flag}" if len(flag) <= 2 else f"--{flag}"


def usage(defaults, problem=None, shown=None, notes=()):
    """Print the usage (to stderr with `error: problem` first) and exit (1 on a problem, else 0).
    shown: {name: text} where the default is decided at run time (data, checkpoint)."""
    shown = shown or {}
    lines = [] if problem is None else [f"error: {problem}"]
    lines.append(f"Usage:   python {os.path.basename(sys.argv[0]) or 'train_gpt2.py'} [options]")
    lines.append("Options (every flag takes a value):")
    for name, default in defaults.items():
        what = FLAGS[NAMES[name]][1]
        lines.append(f"  {flag_of(name):10s} {what} (default: {shown.get(name, default)})")
    lines.extend(notes)
    print("\n".join(lines), file=sys.stderr if problem else sys.stdout)
    sys.exit(1 if problem else 0)


def _convert(kind, value):
    if kind is int and "e" in value.lower():          # -x 1e4
        as_float = float(value)
        if as_float != int(as_float):
            raise ValueError(value)
        return int(as_float)
    return kind(value)


def parse_args(argv, defaults, shown=None, notes=()):
    """argv: the words after the program's name. defaults: {llm.c's name: default} of the flags the
    program takes, in the order -h lists them; a flag matches whole (`-sl` is not `-s`). Returns a
    SimpleNamespace of every name, plus `given` (the names set on the command line). A bad command line prints the usage and exits 1."""
    def fail(problem):
        usage(defaults, problem, shown, notes)

    if argv and (argv[0] == "--help" or (argv[0] == "-h" and len(argv) == 1)):   # -h 1 is HellaSwag, as llm.c
        usage(defaults, None, shown, notes)
    known = {flag_of(name): name for name in defaults}
    args, given = dict(defaults), set()
    i = 0
    while i < len(argv):
        flag = argv[i]
        if flag not in known:
            fail(f"unknown flag {flag}" if flag.startswith("-") else f"expected a flag, got '{flag}'")
        name = known[flag]
        if i + 1 == len(argv) or argv[i + 1] in known:
            fail(f"flag {flag} needs a value")          # `-x -o dir` blames -x, not dir
        kind, value = type(defaults[name]), argv[i + 1]
        try:
            args[name] = _convert(kind, value)
        except ValueError:
            fail(f"flag {flag} needs {KINDS[kind]}, got '{value}'")
        given.add(name)
        i += 2
    parsed = SimpleNamespace(**args, given=given)
    if os.environ.get("LLMC_DRY_RUN", "0") == "1":   # check, print and exit 0: how scripts/ are tested
        from llmc.dryrun import dry_run
        dry_run(parsed, defaults)
    return parsed
