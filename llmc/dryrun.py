"""LLMC_DRY_RUN=1: a trainer parses and checks its command line, prints what it would run with, and exits 0,
without data, a model file or a GPU.

This is how scripts/*.sh are tested (tests/test_scripts.py): a flag renamed or dropped in llmc/cli.py makes
the script's dry run fail with the parser's one line, as the real run would. Beyond the parse (every flag
known, every value of its type) it checks what can be checked without the data or the device: the values a
flag must take from a short list (VALUE_CHOICES), the checkpoint flags' needs (-n and -y need -o), and a
model descriptor (-e d12, gpt3:c768) without building the model. Missing data or HellaSwag files are a
note naming the prepro that makes them, not an error: a dry run is for a machine that has neither.
"""

import glob
import os
import sys

from llmc import checkpoint
from llmc.cli import flag_of
from llmc.dataloader import prepro_for
from llmc.model import descriptor_config
from llmc.schedulers import SCHEDULES
from llmc.utils import ConfigError

ENV = "LLMC_DRY_RUN"
# the values these flags take: the trainers check them when they start; a dry run checks them here
VALUE_CHOICES = {
    "lr_scheduler_type": SCHEDULES, "zero_stage": (0, 1), "resume": (0, 1), "overfit_single_batch": (0, 1),
    "hellaswag_eval": (0, 1), "override_enable_tf32": (0, 1), "use_master_weights": (0, 1), "profile": (0, 1),
    "precision": ("auto", "bf16", "fp32"), "recompute": (0, 1, 2), "gelu_fusion": (0, 1, 2),
    "flash_attention": (0, 1), "nccl_init_method": ("mpi", "tcp", "fs"),
}
HELLASWAG_FILE = os.path.join("dev", "data", "hellaswag", "hellaswag_val.bin")


def requested():
    return os.environ.get(ENV, "0") == "1"


def check_values(args):
    """One ConfigError line for the first flag whose value is not one it takes."""
    for name, choices in VALUE_CHOICES.items():
        value = getattr(args, name, None)
        if value is not None and value not in choices:
            listed = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{flag_of(name)} {value}: expected one of {listed}")
    checkpoint.check_flags(args)
    if args.total_batch_size > 0 and args.total_batch_size % (args.B * args.T):
        raise ConfigError(f"-d {args.total_batch_size} is not a multiple of B*T = {args.B}*{args.T}")


def describe_model(name, T):
    """What -e names: a model file that is there, one that is not (a note), or a descriptor checked without
    building it (llmc.model.descriptor_config, as the trainers read it), -t within its maxT."""
    if os.path.exists(name):
        return f"model file {name}"
    if name.endswith(".bin"):
        return f"model file {name} (not here: the run needs it, or a descriptor such as d12)"
    config = descriptor_config(name)
    if T > config.max_seq_len:
        raise ConfigError(f"sequence length -t {T} exceeds {name}'s max_seq_len {config.max_seq_len}")
    return (f"{name} from scratch: L={config.num_layers} NH={config.num_heads} C={config.channels} "
            f"maxT={config.max_seq_len}")


def notes(args):
    """Lines about what the real run needs and this machine lacks (data, the HellaSwag file)."""
    lines = []
    for name in ("train_data_pattern", "val_data_pattern"):
        pattern = getattr(args, name)
        if pattern and not glob.glob(pattern):
            lines.append(f"note: no files match {flag_of(name)} '{pattern}': {prepro_for(pattern)} makes them")
    if getattr(args, "hellaswag_eval", 0) and not os.path.exists(HELLASWAG_FILE):
        lines.append(f"note: -h 1 and no {HELLASWAG_FILE}: {prepro_for(HELLASWAG_FILE)} makes it")
    return lines


def dry_run(args, defaults):
    """Check args (parse_args' namespace), print them and the notes, and exit: 0, or 1 with one line."""
    program = os.path.basename(sys.argv[0]) or "the trainer"
    try:
        check_values(args)
        what = describe_model(args.load_filename, args.T)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"dry run ({ENV}=1): {program}'s flags parsed and checked; nothing trained")
    print(f"model: {what}")
    for name in defaults:
        given = " (given)" if name in args.given else ""
        print(f"  {flag_of(name):10s} {name} = {getattr(args, name)!r}{given}")
    print("\n".join(notes(args)) or "note: the data named is here")
    sys.exit(0)
