"""What train_gpt2.py's training loop (train_gpt2.train, llm.c's main) calls that is not the lesson: the trainer
interface, the checks of a run's flags and -o, resume, checkpoints, Ctrl-C, divergence, the batch plan, the data
parallel gradient reduction, and the start-up lines. Nothing here imports a trainer: the loop hands in its
trainer module (train_gpt2 for NumPy, train_gpt2_cuda for CuPy or the kernel emulator)."""

import contextlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Protocol

from llmc import checkpoint, collectives, profiler
from llmc.cli import flag_of
from llmc.dataloader import DataLoader
from llmc.formats import MODEL_MAGIC, FormatError, nonfinite_report, read_header, write_model_file
from llmc.mfu import flops_per_token, peak_flops
from llmc.utils import ConfigError, WriteError, some_names


# ----------------------------------------------------------------------------
# the trainer interface

@dataclass
class DeviceSettings:
    """What a trainer's device_setup decided for the run: the model is built with it and the loop reads it.
    train_gpt2_cuda.py's CudaSettings adds its own (-r, -fa, -ge, the rounding seed)."""
    lines: list = field(default_factory=list)   # what print_config adds under [GPT-2]
    name: str = "CPU"                           # the device, whose peak FLOP/s llmc/mfu.py looks up for the MFU
    gemm_precision: str = "fp32"                # the GEMMs' precision for that peak: "bf16", "tf32" or "fp32"
    precision: str = "fp32"                     # the parameters' and the model files': "bf16" or "fp32"
    master_weights: bool = False                # -w 1: the state files hold master weights (bf16: updated)


class Trainer(Protocol):
    """What the training loop needs from a trainer module, by llm.c's names. train_gpt2.py (NumPy) and
    train_gpt2_cuda.py each provide all of it at module level; check_trainer says what one lacks."""
    BETA1: float                 # AdamW's settings, fixed in llm.c (no flags)
    BETA2: float
    ADAM_EPS: float
    GRAD_CLIP: float             # 0: no clipping (train_gpt2.c), 1.0 (train_gpt2.cu)
    COLLECTIVES: str             # the collectives' engine its arrays need: "gloo" (NumPy) or "nccl" (CuPy)
    REDUCES_IN_BACKWARD: bool    # with NCCL, the last micro-step's backward reduces the gradients layer by layer
    StepTimer: type              # start(); stop() -> the step's milliseconds

    def device_setup(self, args, world) -> DeviceSettings:
        """Before the model is built: check the device flags and decide the run's settings."""

    def gpt2_build_from_descriptor(self, descriptor, seed=42, settings=None):
        """The model of a file or a descriptor such as "d12" (model.config, num_parameters, params_memory)."""

    def gpt2_allocate_state(self, model, B, T, shard=None, dlogits_in_forward=False):
        """Everything a run at (B, T) needs, before the first step (NumPy: nothing, buffers come at first use).
        dlogits_in_forward: every forward with targets is followed by a backward, so the CUDA classifier
        may write the logits' gradient in the forward pass (llm.c's one pass)."""

    def gpt2_forward(self, model, inputs, targets, B, T):
        """The forward pass; with targets it sets model.mean_loss and model.acts.losses."""

    def gpt2_zero_grad(self, model):
        """Zero the gradients (once per step: the backward passes add into them)."""

    def gpt2_backward(self, model):
        """The backward pass of the last forward, added into the gradients."""

    def gpt2_calculate_grad_norm(self, model) -> float:
        """The L2 norm of all the gradients."""

    def gpt2_pieces_sum_squares(self, model, ranges) -> float:
        """sum g^2 over the gradients' [lo, hi) ranges (ZeRO-1: this rank's pieces)."""

    def gpt2_update(self, model, learning_rate, beta1, beta2, eps, weight_decay, t, grad_scale=1.0, shard=None):
        """AdamW (of shard's pieces only, under ZeRO-1), the gradients multiplied by grad_scale."""

    def gpt2_optimizer_state(self, model, size=None):
        """(m, v): AdamW's state as float32 host arrays (size: ZeRO-1's shard length)."""

    def gpt2_load_optimizer_state(self, model, m, v):
        """Put a checkpoint's m and v back (after gpt2_allocate_state)."""

    def gpt2_master_state(self, model):
        """(master weights or None, rng_state, rng_state_last_update): the rest of a state file."""

    def gpt2_load_master_state(self, model, master, rng_state, rng_state_last_update):
        """Put gpt2_master_state's three back from a checkpoint."""

    def next_token_probs(self, model, tokens, t):
        """The (V,) float32 probabilities on the host of the token after tokens[0, :t] (the sampler's)."""

    def to_numpy(self, x):
        """A device array as a float32 NumPy array (bf16 widened)."""

    def gpt2_stats_activations(self, model):
        """-as (llmc/actstats.py): (name, layer or None, array) of the last forward's tensors to summarise."""

    def log_gpu_info(self, step, logger, settings):
        """After each step line: the device's readings (the CUDA trainer's -lg); NumPy logs nothing."""


TRAINER_API = tuple(Trainer.__annotations__) + tuple(
    name for name, value in vars(Trainer).items() if callable(value) and not name.startswith("_"))


def check_trainer(trainer):
    """Every name of the interface, or one line saying which are missing."""
    missing = [name for name in TRAINER_API if not hasattr(trainer, name)]
    if missing:
        raise ConfigError(f"{os.path.basename(trainer.__file__)} lacks {', '.join(missing)}, which the training "
                          f"loop calls (llmc/run.py's Trainer interface)")


# ----------------------------------------------------------------------------
# the process: one-line errors, ranks, Ctrl-C

def launch(train, args, trainer):
    """train(args, trainer, world, ctrl_c), with its one-line errors printed as `error: ...` and exit status 1.
    Started by torchrun, this process is one rank of a data-parallel run (llmc/collectives.py); only rank 0
    prints."""
    world = None
    try:
        world = collectives.init(trainer.COLLECTIVES, args)
        with open(os.devnull, "w") if world.rank != 0 else contextlib.nullcontext(sys.stdout) as out, \
                contextlib.redirect_stdout(out), StopOnCtrlC() as ctrl_c, warnings.catch_warnings():
            # NumPy's overflow warnings (from every thread of llmc/cpu.py) stay quiet: a loss or norm gone NaN
            # or inf stops the run with one line of its own
            warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered", RuntimeWarning)
            train(args, trainer, world, ctrl_c)
    except (ConfigError, FormatError, FileNotFoundError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:   # Ctrl-C: the loop's own line (StopOnCtrlC), or a second press
        print(str(e) or "stopped at once by Ctrl-C: nothing written since the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if world is None or world.size == 1 or not collectives.lost_a_peer(e):
            raise
        # another rank stopped (its own error is above): say so in one line instead of a traceback, and exit;
        # torchrun and mpirun then stop whatever is left, so no rank waits for a partner that is gone
        print(f"error: rank {world.rank}: a collective failed because another process stopped (its error is above): "
              f"{str(e).strip().splitlines()[0][:200]}", file=sys.stderr)
        sys.exit(1)
    finally:
        if world is not None:
            world.close()


class StopOnCtrlC:
    """Ctrl-C while training: the first asks the loop to stop at the end of the step under way (with -o,
    after a checkpoint that -y 1 goes on from), the second stops at once (launch() says so in one line).
    Python takes signal handlers in the main thread only: elsewhere (ranks run as threads in the tests)
    Ctrl-C keeps its usual meaning."""

    def __enter__(self):
        self.requested, self.in_loop, self.previous = False, False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handler)
        return self

    def handler(self, signum, frame):
        if self.requested or not self.in_loop:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping at the end of this step (press it again to stop at once)", flush=True)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def stop_requested(ctrl_c, world):
    """Has Ctrl-C been pressed (on any rank: they all stop at the same step)?"""
    if ctrl_c is None:
        return False
    return world.sum(float(ctrl_c.requested)) > 0 if world.size > 1 else ctrl_c.requested


# ----------------------------------------------------------------------------
# before the loop: flags, -o, the model file, the data, the batch

def check_args(args):
    """The flags a run cannot start with, one line each (what they name is checked as it is read)."""
    if args.B < 1 or args.T < 1:
        raise ConfigError(f"-b and -t must be positive, got B={args.B}, T={args.T}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise ConfigError(f"-x {args.max_steps}: give a positive number of steps, or -1 for one epoch")
    if args.learning_rate < 0:
        raise ConfigError(f"-l {args.learning_rate:g}: the learning rate must be 0 or positive")
    if args.zero_stage not in (0, 1):
        raise ConfigError(f"-z {args.zero_stage}: ZeRO stage 0 or 1 (llm.c's stages 2 and 3 are not implemented)")
    checkpoint.check_flags(args)


def at_most(args, name, limit, limit_name, what):
    """args.<name>, checked against `limit`: a default larger than it shrinks to it (with a note), a value
    the user asked for must fit. Used for -t (the model's max_seq_len) and -g (the sampler's T tokens)."""
    value, flag = getattr(args, name), flag_of(name)
    if value <= limit:
        return value
    if name in args.given:
        raise ConfigError(f"{what} {flag} {value} exceeds {limit_name} {limit}; use {flag} {limit} or less")
    print(f"{name} = {limit}: {limit_name} (the default {flag} {value} is longer)")
    return limit


def check_output_dir(args, rank):
    """-o: a new run (no -y 1) does not write over an earlier run's files (its -nk would even delete
    checkpoints it did not write), and what killed runs left there goes (rank 0's job)."""
    out = args.output_log_dir
    if not out or rank != 0:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"-o {out}: a file, not a directory; give a directory for the logs and checkpoints")
    earlier = checkpoint.earlier_run_files(out)
    if earlier and args.resume != 1:
        raise ConfigError(f"-o {out} holds an earlier run's files ({some_names(earlier)}): -y 1 resumes that run; "
                          f"for a new one give another -o, or delete them")
    clean_litter(out)


def clean_litter(output_dir):
    """Remove what killed runs left in -o (checkpoint.clean_litter), saying so in one line."""
    removed = checkpoint.clean_litter(output_dir)
    if removed:
        print(f"removed {len(removed)} file(s) a killed run left in {output_dir}: {some_names(removed, 4)}")


# a default model file that is not there: what to try instead, in order (the pretrained weights come from
# python train_gpt2_torch.py --model gpt2; gpt2_d12.bin, the same shape from scratch, from --model d12)
CHECKPOINT_FALLBACKS = {"gpt2_124M_bf16.bin": ("gpt2_124M.bin", "gpt2_d12.bin"), "gpt2_124M.bin": ("gpt2_d12.bin",)}


def resolve_checkpoint(name):
    """The model file to load for -e name: the first of its fallbacks that exists when it does not (saying so)."""
    if os.path.exists(name):
        return name
    for other in CHECKPOINT_FALLBACKS.get(name, ()):
        if os.path.exists(other):
            print(fallback_note(name, other))
            return other
    return name


def fallback_note(name, other):
    if other != "gpt2_d12.bin":
        return f"{name} not found: using {other} (the same weights in fp32)"
    return (f"WARNING: {name} not found: using {other}, a RANDOM init of the same shape, so this run trains from "
            f"scratch, not from OpenAI's weights (python train_gpt2_torch.py --model gpt2 gets them, with the network)")


def model_to_load(args, world):
    """(the model file, the step -y 1 resumes or None): -y 1 takes the newest complete checkpoint in -o (its
    model file replaces -e). Checks -o first, and clears what killed runs left in it."""
    check_output_dir(args, world.rank)
    if args.resume == 1:
        done = checkpoint.done_steps(args.output_log_dir)
        if done:
            return checkpoint.model_path(args.output_log_dir, done[-1]), done[-1]
        print(f"-y 1: no checkpoint (DONE_ file) in {args.output_log_dir}: starting fresh")
    return resolve_checkpoint(args.load_filename), None


def build_model(trainer, model_file, resume_step, device, output_dir):
    """trainer.gpt2_build_from_descriptor(model_file); a resumed checkpoint's model file must be whole and
    in the run's precision (llm.c refuses the other one too), else one line says which earlier one to take."""
    try:
        model = trainer.gpt2_build_from_descriptor(model_file, settings=device)
    except (FormatError, FileNotFoundError) as e:    # a checkpoint's bad model file: fall back to an earlier one
        if resume_step is None or not hasattr(e, "problem"):
            raise
        raise FormatError(f"{e.problem}; {checkpoint.resume_advice(output_dir, resume_step)}") from None
    if resume_step is not None:
        version = read_header(model_file, MODEL_MAGIC, (3, 5))[0][1]
        written = "bf16" if version == 5 else "fp32"
        if written != device.precision:
            raise ConfigError(f"{model_file} is {written} (version {version}) and this run is {device.precision}: "
                              f"resume with -p {written}")
    return model


# what --help shows for the defaults decided at run time
SHAKESPEARE = "data/tinyshakespeare/tiny_shakespeare_{}.bin"
TINYSTORIES = "data/tinystories/TinyStories_{}.bin"


def default_data_paths():
    """tiny shakespeare when it is there, else TinyStories (train_gpt2.c's choice)."""
    base = SHAKESPEARE if os.path.exists(SHAKESPEARE.format("train")) else TINYSTORIES
    return base.format("train"), base.format("val")


def data_loaders(args, B, T, world):
    """The train and val DataLoaders of -i and -j (-a 1: the val split's first batches, unshuffled), with a
    line each, and the number of val batches -m asks for. Data parallel: rank r reads the r-th B*T of every
    world.size*B*T tokens (and shuffles with seed 42 + r)."""
    train_pattern, val_pattern = default_data_paths()
    train_pattern = args.train_data_pattern or train_pattern
    val_pattern = args.val_data_pattern or val_pattern
    if args.overfit_single_batch:
        train_pattern = val_pattern                       # llm.c: overfit the first val batch
    train_loader = DataLoader(train_pattern, B, T, world.rank, world.size, should_shuffle=not args.overfit_single_batch)
    val_loader = DataLoader(val_pattern, B, T, world.rank, world.size, should_shuffle=False)
    tokens_per_micro_step = B * T * world.size            # over all ranks
    val_batches = val_loader.num_tokens // tokens_per_micro_step
    print(f"train dataset: {train_pattern} ({train_loader.num_tokens:,} tokens, "
          f"{train_loader.num_tokens // tokens_per_micro_step} batches)")
    print(f"val dataset:   {val_pattern} ({val_loader.num_tokens:,} tokens, {val_batches} batches)")
    val_max_steps = min(args.val_max_steps, val_batches) if args.val_max_steps > 0 else val_batches
    return train_loader, val_loader, val_max_steps


def batch_plan(args, B, T, world, train_loader):
    """(total_batch, grad_accum_steps, num_steps): -d's tokens per step as micro-steps of B*T on every rank
    (-1: one micro-step), and -x's steps (-1: one epoch), with the batch line."""
    tokens_per_micro_step = B * T * world.size
    total_batch = args.total_batch_size if args.total_batch_size > 0 else B * T
    if total_batch % tokens_per_micro_step != 0:
        what = "B*T" if world.size == 1 else f"B*T*processes = {B}*{T}*{world.size}"
        raise ConfigError(f"-d {total_batch} is not a multiple of {what} = {tokens_per_micro_step}")
    grad_accum_steps = total_batch // tokens_per_micro_step
    num_steps = args.max_steps if args.max_steps > 0 else train_loader.num_tokens // total_batch
    processes = "" if world.size == 1 else f" on each of {world.size} processes"
    print(f"batch: B={B} T={T}, total {total_batch} tokens = {grad_accum_steps} micro-step(s){processes}; "
          f"{num_steps} steps")
    return total_batch, grad_accum_steps, num_steps


def zero_shard(args, model, world):
    """ZeRO-1 (-z 1): this rank's collectives.ShardLayout, whose 1/world.size of every layer of every tensor
    its AdamW updates (llm.c's), or None; with the data-parallel line."""
    if world.size == 1:
        return None
    shard = collectives.ShardLayout(model.param_shapes, world.rank, world.size) if args.zero_stage == 1 else None
    engine = "NCCL" if isinstance(world, collectives.NcclWorld) else "torch.distributed, gloo"
    print(f"data parallel: {world.size} processes ({engine}), ZeRO stage {args.zero_stage}"
          + (f": {shard.num_state:,} parameters' m and v on each" if shard else ""))
    return shard


def mfu_setup(model, T, total_batch, device):
    """(the model's FLOPs per step, the device's peak FLOP/s or None): the MFU on the step line (llmc/mfu.py),
    with its start-up line."""
    config = model.config
    flops_per_step = flops_per_token(model.num_parameters, config.num_layers, config.channels, T) * total_batch
    peak = peak_flops(device.name, device.gemm_precision)
    per_token = f"MFU: {flops_per_step // total_batch:,} FLOPs per token (6N + 6LCT)"
    print(f"{per_token} against {device.name}'s {device.gemm_precision} peak, {peak / 1e12:g} TFLOP/s" if peak else
          f"{per_token}; no peak FLOP/s known for {device.name}, so MFU n/a")
    return flops_per_step, peak


def print_optimizer(args, trainer):
    """AdamW's line, and the outlier guard's when -sl or -sg is on."""
    clip = f", grad clip {trainer.GRAD_CLIP:g}" if trainer.GRAD_CLIP > 0 else ""   # train_gpt2.c does not clip
    print(f"AdamW: lr {args.learning_rate:g} ({args.lr_scheduler_type}, warmup {args.warmup_iterations}, "
          f"final frac {args.final_learning_rate_frac:g}), betas ({trainer.BETA1}, {trainer.BETA2}), "
          f"eps {trainer.ADAM_EPS:g}, weight decay {args.weight_decay:g}{clip}")
    if args.skip_update_lossz or args.skip_update_gradz:
        print(f"outlier guard: skip an update at loss z-score > {args.skip_update_lossz:g} or grad norm z-score > "
              f"{args.skip_update_gradz:g} (against the last 128 steps; 0 = off)")


# ----------------------------------------------------------------------------
# in the loop: data parallel, divergence, the step line's ETA

def reduced_grad_norm(trainer, model, world, shard, overlap):
    """Data parallel: sum the gradients over the ranks, all of them (-z 0) or each rank its shard (-z 1),
    unless the last backward did (overlap: NCCL reduces layer by layer; gloo blocks the host, so it happens
    here, after the backward). Returns the norm of the summed gradients (not yet averaged)."""
    if world.size == 1:
        return trainer.gpt2_calculate_grad_norm(model)
    if shard:
        if not overlap:
            world.reduce_scatter_sum(model.grads_memory, shard)
        ranges = [(start, start + n) for _, _, start, _, n in shard.pieces]
        return math.sqrt(world.sum(trainer.gpt2_pieces_sum_squares(model, ranges)))
    if not overlap:
        world.all_reduce_sum(model.grads_memory)
    return trainer.gpt2_calculate_grad_norm(model)


def reduce_in_backward(model, world, shard):
    """NCCL: the coming backward sums each layer's gradients over the ranks as soon as it has them (all of
    them, or under ZeRO-1 each rank its shard), overlapping the communication with the rest of the backward."""
    model.reduce_in_backward = collectives.OverlappedReduction(world, model.grads_memory, model.param_shapes,
                                                               sharded=bool(shard))


class DivergedError(ConfigError):
    """The loss, the gradient norm or the weights went NaN or inf: the run stops, writing nothing."""


def diverged(step, what, args):
    """The line of a run that went NaN or inf at `step`."""
    done = checkpoint.done_steps(args.output_log_dir)
    resume = f", or -y 1 resumes from checkpoint {done[-1]} (with a lower -l)" if done else ""
    return (f"step {step}: {what}: the run diverged (NaN or inf) and stops, writing nothing; lower -l "
            f"(it is {args.learning_rate:g}){resume}")


def time_left(step_times, steps_left):
    """The run's ETA for the step line: the steps left at the mean time of the steps so far (without the
    first, which compiles and allocates, once there are others), as "1h02m", "3m05s" or "12s". Validation
    and sampling are not counted: a run that does much of them takes a little longer."""
    tail = step_times[1:] or step_times
    seconds = round(steps_left * sum(tail) / len(tail) / 1e3)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def print_summary(step_times, args):
    """After the loop: the mean step time, and --profile's table."""
    if not step_times:
        return
    tail = step_times[1:] or step_times
    print(f"mean step time (excluding the first): {sum(tail) / len(tail):.2f} ms")
    if getattr(args, "profile", 0):                       # train_gpt2_cuda.py has no --profile
        print(profiler.report(max(1, len(step_times) - 1)))


# ----------------------------------------------------------------------------
# checkpoints (llmc/checkpoint.py's files): resume with -y 1, every -n steps, at Ctrl-C, the final model file

def run_settings(args, total_batch, num_steps):
    """The run's schedule, recorded in each checkpoint's state so that -y 1 can say what changed."""
    settings = {name: getattr(args, name) for name, _, _ in checkpoint.SETTINGS}
    settings.update(total_batch_size=total_batch, max_steps=num_steps)
    return settings


class Checkpoints:
    """One run's checkpoints in -o: state_ (every rank), model_ (rank 0) and DONE_ of a step. shard: ZeRO-1's
    collectives.ShardLayout, whose pieces' m and v this rank holds, or None (all of them). settings:
    run_settings's, recorded for -y 1 to compare."""

    def __init__(self, trainer, model, train_loader, args, world, shard, settings, device):
        self.trainer, self.model, self.train_loader, self.args = trainer, model, train_loader, args
        self.world, self.shard, self.settings, self.device = world, shard, settings, device
        self.out = args.output_log_dir
        self.resumed = None                              # the step -y 1 went on from

    def due(self, step, last_step):
        """Every -n steps and at the end, but not at the step just resumed (its files are there)."""
        every = self.args.checkpoint_every
        return every > 0 and step != self.resumed and ((step > 0 and step % every == 0) or last_step)

    def file_dtype(self):
        """The run's precision as write_model_file names it: a bf16 run writes bf16 (version 5) files, as llm.c."""
        return "bfloat16" if self.device.precision == "bf16" else "float32"

    def finite_params(self, step, what):
        """The parameters on the host, for a file; a run whose weights went NaN or inf writes no file over a
        good one: it stops with one line instead."""
        params = self.trainer.to_numpy(self.model.params_memory)
        bad = nonfinite_report(self.model.config, params)
        if bad:
            raise DivergedError(f"step {step}: {bad}: the run diverged, so {what} was not written; lower -l, or "
                                f"resume from an earlier checkpoint with -y 1")
        return params

    def save(self, step):
        """The checkpoint of `step`, then the old ones -nk and -nm say to delete, and what killed runs left."""
        tr, model, world, out = self.trainer, self.model, self.world, self.out
        t0 = time.perf_counter()
        params = self.finite_params(step, f"checkpoint {step}")
        m, v = tr.gpt2_optimizer_state(model, self.shard.num_state) if self.shard else tr.gpt2_optimizer_state(model)
        state = checkpoint.TrainState(step=step, m=m, v=v, loader=self.train_loader.state(), num_processes=world.size,
                                      rank=world.rank, settings=self.settings)
        # the CUDA trainer's master weights and its stochastic rounding's generator (NumPy: none)
        state.master_weights, state.rng_state, state.rng_state_last_update = tr.gpt2_master_state(model)
        try:
            checkpoint.write_checkpoint(out, step, model.config, params, state, dtype=self.file_dtype(),
                                        barrier=world.barrier)
        except WriteError as e:
            done = checkpoint.done_steps(out)
            kept = f"checkpoint {done[-1]} is whole: make room and -y 1 resumes from it" if done else \
                "there is no earlier checkpoint"
            raise WriteError(f"{e}; checkpoint {step} not written (its files removed), {kept}") from None
        if world.rank != 0:
            return
        size = sum(os.path.getsize(p) for p in (checkpoint.model_path(out, step), checkpoint.state_path(out, step)))
        print(f"wrote checkpoint {step} to {out} ({size / 2**20:.1f} MiB, {time.perf_counter() - t0:.2f} s)")
        for old in checkpoint.checkpoints_to_delete(checkpoint.done_steps(out), self.args.checkpoints_keep,
                                                    self.args.major_checkpoint_every):
            checkpoint.delete_checkpoint(out, old)
            print(f"deleted checkpoint {old}")
        clean_litter(out)

    def resume(self, step, num_steps):
        """AdamW's m and v (this rank's shard of them under ZeRO-1), the master weights and the train loader's
        place from this rank's state_ of `step` (None: a fresh run, step 0); returns the step to go on from.
        Says which of the run's settings (its schedule) differ from the run that wrote the checkpoint: a new
        schedule can be meant, so it goes on."""
        if step is None:
            return 0
        t0 = time.perf_counter()
        path = checkpoint.state_path(self.out, step, self.world.rank)
        state = checkpoint.read_state_file(path, self.shard.num_state if self.shard else self.model.num_parameters,
                                           self.world.size, self.world.rank, fix=checkpoint.resume_advice(self.out, step))
        if state.step != step:
            raise FormatError(f"{path}: holds step {state.step}, its name says {step}; a corrupt checkpoint")
        self.check_master_weights(path, state)
        self.trainer.gpt2_load_optimizer_state(self.model, state.m, state.v)
        self.trainer.gpt2_load_master_state(self.model, state.master_weights, state.rng_state,
                                            state.rng_state_last_update)
        self.train_loader.resume(*state.loader)
        print(f"resumed from checkpoint {step} in {self.out} ({time.perf_counter() - t0:.2f} s)")
        for name, value in self.settings.items():
            before = (state.settings or {}).get(name, value)    # llm.c's own state files record none
            if before != value:
                show = str if isinstance(value, str) else "{:g}".format
                print(f"-y 1: {flag_of(name)} changes from {show(before)} (the checkpoint's run) to {show(value)}")
        if state.step > num_steps:
            raise ConfigError(f"the checkpoint in {self.out} is at step {state.step}, past -x {num_steps}: "
                              f"give a larger -x")
        self.resumed = state.step
        return state.step

    def check_master_weights(self, path, state):
        """bf16 with -w 1 updates master weights, which the state file must hold; fp32 -w 1 writes its
        parameters as them (llm.c's), and reads none back."""
        keeps = self.device.master_weights and self.device.precision != "fp32"
        if state.master_weights is not None and not self.device.master_weights:
            print(f"{path}: has master weights, which this run does not keep: ignored")
        if state.master_weights is None and keeps:
            raise ConfigError(f"{path}: has no master weights, which this run keeps (bf16, -w 1): resume with -w 0, "
                              f"or with the precision that wrote it")

    def stop_if_asked(self, ctrl_c, step, num_steps):
        """The loop's end after a Ctrl-C (on any rank): with -o, a checkpoint of the step reached; launch()
        prints the line."""
        if not stop_requested(ctrl_c, self.world):
            return
        kept = "no -o, so nothing was written"
        if self.out:
            self.save(step)
            kept = f"checkpoint {step} is in {self.out}: -y 1 goes on from it"
        raise KeyboardInterrupt(f"stopped by Ctrl-C after step {step} of {num_steps}: {kept}")

    def write_final(self, num_steps, model_file, args):
        """With -o and no -n: the final model file (else the last checkpoint holds it); and the fallback's
        warning once more, where the run's output ends."""
        if self.out and args.checkpoint_every == 0 and self.world.rank == 0:
            path = os.path.join(self.out, f"model_{num_steps:08d}.bin")
            write_model_file(path, self.model.config, self.finite_params(num_steps, path), self.file_dtype())
            print(f"wrote {path}")
        if model_file == "gpt2_d12.bin" != args.load_filename and self.resumed is None:
            print(fallback_note(args.load_filename, model_file))
