"""Checkpoints and resume, as llm.c's train_gpt2.cu writes and reads them (-o DIR -n N -nk K -nm M -y 1).

A checkpoint of step s is three files in the output dir, written in this order, each through a
temporary name (llmc.utils.write_atomic), so a run killed at any moment leaves the previous one whole:

    state_%08d_%05d.bin     per rank: AdamW's m and v and the train loader's position (below)
    model_%08d.bin          the parameters, an ordinary model file in the run's precision
    DONE_%08d               empty: the checkpoint is complete; -y 1 resumes from the highest one

(llm.c writes the model first; the state first here means a model file with no state beside it is
only ever a final model (-n 0), never part of a checkpoint, so clean_litter can tell them apart.)

The state file, llm.c's save_state byte for byte (little-endian):

    header, 256 int32: [0] magic 20240527 [1] version 1 [2] num_processes [3] rank
                       [4] use_master_weights [5] should_shuffle [10] step
                       [20..21] rng_state u64 [22..23] rng_state_last_update u64 (stochastic rounding)
                       [30..31] current_shard_idx size_t [32..33] current_sample_idx size_t
                       [64..] the run's schedule (ours, in slots llm.c's load_state never reads; below)
    body:  m, v (fp32, num_parameters each, or this rank's 1/N under ZeRO-1), master weights (fp32, as
           many) if [4] is 1; then, if [5] is 1:
           size_t number of shards, int32 shard permutation, size_t samples in the current shard,
           int32 permutation of those samples, the loader's Mersenne Twister as llm.c's
           mt19937_state struct (llmc.rand.MT_STATE_DTYPE, 2520 bytes).

Under ZeRO-1 (-z 1) a rank's m, v and master weights are llm.c's (gpt2_update with zero.cuh's
multi_gpu_get_shard_offset; llmc.collectives.ShardLayout): its 1/N of every layer slice of every parameter
tensor, stored tensor by tensor and layer by layer, a tensor's at its offset / N. Master weights are present
whenever the run has -w 1: in bf16 the fp32 copy, in fp32 the parameters themselves (what llm.c's fp32
build's copy holds); the generator's two states are saved in both precisions, and -y 1 in bf16 rebuilds the
bf16 weights from the master weights with rng_state_last_update, as llm.c's load_state does.

current_sample_idx is the next sample to draw (llm.c's counting). Resume is bit-exact: the model
file holds the parameters exactly, the state everything else a step reads. The schedule slots let
-y 1 say which of -d -x -u -l -q -c -k differ from the run that wrote the checkpoint (llm.c resumes
with whatever it is given, silently): [64] 1 when present (llm.c's files: 0), [65] total batch size,
[66] steps, [67] warmup steps, [68..69] learning rate, [70..71] final lr fraction, [72..73] weight
decay (float64), [80..87] the schedule's name (ASCII, zero-padded).
"""

import glob
import os
import re
from dataclasses import dataclass

import numpy as np

from llmc.formats import HEADER_BYTES, HEADER_INTS, write_model_file
from llmc.rand import MT_STATE_DTYPE
from llmc.utils import ConfigError, FormatError, WriteError, write_atomic

STATE_MAGIC, STATE_VERSION = 20240527, 1
MT_BYTES = MT_STATE_DTYPE.itemsize
# the run's schedule in header slots llm.c ignores: (llm.c's name, first int32 slot, type)
SETTINGS_SLOT = 64
SETTINGS = (("total_batch_size", 65, int), ("max_steps", 66, int), ("warmup_iterations", 67, int),
            ("learning_rate", 68, float), ("final_learning_rate_frac", 70, float), ("weight_decay", 72, float),
            ("lr_scheduler_type", 80, str))
NAME_BYTES = 32


def model_path(output_dir, step):
    return os.path.join(output_dir, f"model_{step:08d}.bin")


def state_path(output_dir, step, rank=0):
    return os.path.join(output_dir, f"state_{step:08d}_{rank:05d}.bin")


def done_path(output_dir, step):
    return os.path.join(output_dir, f"DONE_{step:08d}")


@dataclass
class TrainState:
    """What a state file holds (one rank's)."""
    step: int
    m: np.ndarray
    v: np.ndarray
    loader: tuple                      # DataLoader.state(): shard idx, sample idx, permutations, MT bytes
    num_processes: int = 1
    rank: int = 0
    master_weights: np.ndarray = None  # fp32, when the run keeps master weights
    rng_state: int = 0                 # the stochastic rounding's xorshift state, and its value before
    rng_state_last_update: int = 0     # the last update (to re-round master weights on resume)
    settings: dict = None              # the run's schedule (SETTINGS), None in llm.c's own files


def _write_settings(header, settings):
    header[SETTINGS_SLOT] = 1
    for name, slot, kind in SETTINGS:
        value = settings[name]
        if kind is int:
            header[slot] = value
        elif kind is float:
            header[slot:slot + 2] = np.array([value], "<f8").view("<i4")
        else:
            header[slot:slot + NAME_BYTES // 4] = np.frombuffer(value.encode()[:NAME_BYTES].ljust(NAME_BYTES, b"\0"), "<i4")


def _read_settings(header):
    if header[SETTINGS_SLOT] != 1:
        return None
    settings = {}
    for name, slot, kind in SETTINGS:
        if kind is int:
            settings[name] = int(header[slot])
        elif kind is float:
            settings[name] = float(header[slot:slot + 2].view("<f8")[0])
        else:
            settings[name] = header[slot:slot + NAME_BYTES // 4].tobytes().rstrip(b"\0").decode(errors="replace")
    return settings


def write_state_file(path, st):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1] = STATE_MAGIC, STATE_VERSION
    header[2], header[3] = st.num_processes, st.rank
    header[4] = st.master_weights is not None
    shard_idx, sample_idx, shard_indices, intra_indices, rng_bytes = st.loader
    header[5] = shard_indices is not None
    header[10] = st.step
    if st.settings is not None:
        _write_settings(header, st.settings)
    wide = header.view("<u8")                        # int32 slot 2k..2k+1 is u64 slot k
    wide[10], wide[11] = st.rng_state, st.rng_state_last_update
    wide[15], wide[16] = shard_idx, sample_idx
    chunks = [header, np.asarray(st.m, dtype="<f4"), np.asarray(st.v, dtype="<f4")]
    if st.master_weights is not None:
        chunks.append(np.asarray(st.master_weights, dtype="<f4"))
    if shard_indices is not None:
        chunks += [np.array([len(shard_indices)], dtype="<u8"), np.array(shard_indices, dtype="<i4"),
                   np.array([len(intra_indices)], dtype="<u8"), np.array(intra_indices, dtype="<i4"),
                   np.frombuffer(rng_bytes, dtype=np.uint8)]
    write_atomic(path, chunks)


def read_state_file(path, num_parameters, num_processes=1, rank=0,
                    fix="delete its DONE_ file to resume from an earlier checkpoint, or run without -y 1"):
    """The TrainState in `path`, checked against this run (its parameter count and world size);
    anything wrong is one line (FormatError) saying what, then `fix` (resume_advice's, in a run)."""

    def fail(problem):
        raise FormatError(f"{path}: {problem}; {fix}")

    if not os.path.exists(path):
        fail("no such file (the checkpoint is incomplete)")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        fail(f"only {size} bytes, not even the {HEADER_BYTES}-byte header (truncated)")
    with open(path, "rb") as f:
        header = np.fromfile(f, dtype="<i4", count=HEADER_INTS)
        wide = header.view("<u8")
        if header[0] != STATE_MAGIC:
            fail(f"bad magic {header[0]} (expected {STATE_MAGIC}): not an llm.c state file")
        if header[1] != STATE_VERSION:
            fail(f"unsupported version {header[1]} (expected {STATE_VERSION})")
        if (header[2], header[3]) != (num_processes, rank):
            fail(f"written by rank {header[3]} of {header[2]} process(es), this run is rank {rank} of "
                 f"{num_processes}: resume with the same number of processes")
        use_master, shuffled = int(header[4]), int(header[5])
        pos = HEADER_BYTES + (3 if use_master else 2) * 4 * num_parameters       # where the loader's part starts
        need = pos + (8 + 8 + MT_BYTES if shuffled else 0)
        if size < need:
            fail(f"{size} bytes, fewer than the {need} a state of this model ({num_parameters:,} parameters) "
                 f"needs: truncated, or written for a smaller model")
        m, v = np.fromfile(f, "<f4", num_parameters), np.fromfile(f, "<f4", num_parameters)  # one read each
        master = np.fromfile(f, "<f4", num_parameters) if use_master else None
        tail = f.read()                                                          # the loader's part, small
    loader = (int(wide[15]), int(wide[16]), None, None, None)
    if shuffled:
        nshards = int(np.frombuffer(tail, "<u8", 1)[0])
        if 8 + 4 * nshards + 8 > len(tail) - MT_BYTES:
            fail(f"the loader's shard count {nshards} does not fit in the file: truncated, or its optimizer "
                 f"state is not for this model ({num_parameters:,} parameters)")
        shard_indices = np.frombuffer(tail, "<i4", nshards, 8).tolist()
        at = 8 + 4 * nshards
        nsamples = int(np.frombuffer(tail, "<u8", 1, at)[0])
        at += 8
        if at + 4 * nsamples + MT_BYTES != len(tail):
            fail(f"{size} bytes, not the {pos + at + 4 * nsamples + MT_BYTES} its header and counts promise: "
                 f"truncated, or its optimizer state is not for this model ({num_parameters:,} parameters)")
        intra_indices = np.frombuffer(tail, "<i4", nsamples, at).tolist()
        loader = (*loader[:2], shard_indices, intra_indices, tail[at + 4 * nsamples:])
        if sorted(shard_indices) != list(range(nshards)) or sorted(intra_indices) != list(range(nsamples)):
            fail("the loader's permutations are not permutations: a corrupt file")
    elif tail:
        fail(f"{size} bytes, not the {pos} a state of this model ({num_parameters:,} parameters) holds: "
             f"written for another model")
    return TrainState(step=int(header[10]), m=m, v=v, loader=loader, num_processes=int(header[2]),
                      rank=int(header[3]), master_weights=master, rng_state=int(wide[10]),
                      rng_state_last_update=int(wide[11]), settings=_read_settings(header))


# ----------------------------------------------------------------------------
# the checkpoint directory

CHECKPOINT_FILE = re.compile(r"(?:model_(\d{8})\.bin|state_(\d{8})_\d{5}\.bin|DONE_(\d{8}))")
RUN_FILE = re.compile(rf"main\.log|stats\.jsonl|{CHECKPOINT_FILE.pattern}")   # what a run writes into -o (-as: stats)
TEMPORARY = re.compile(rf"{CHECKPOINT_FILE.pattern}\.tmp\d+")              # write_atomic's names for them


def done_steps(output_dir):
    """The steps with a DONE_ marker in output_dir, ascending."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(int(name[5:]) for name in os.listdir(output_dir) if re.fullmatch(r"DONE_\d{8}", name))


def resume_advice(output_dir, step):
    """What to do when checkpoint `step` (the newest DONE_) turns out unreadable: fall back to the one
    before it, which -y 1 takes once this one's DONE_ is gone."""
    earlier = [s for s in done_steps(output_dir) if s < step]
    then = f"-y 1 resumes from checkpoint {earlier[-1]}, the previous complete one" if earlier else \
        "-y 1 starts afresh (there is no earlier checkpoint)"
    return f"delete {done_path(output_dir, step)} and {then}; or run without -y 1"


def earlier_run_files(output_dir):
    """The files of an earlier run in output_dir (its main.log, models, states, DONE_ markers), sorted: a
    new run (no -y 1) would overwrite them, and its -nk would delete checkpoints it did not write."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if RUN_FILE.fullmatch(name))


def clean_litter(output_dir):
    """Remove what killed or failed runs left in output_dir and return the names removed: temporary
    files of checkpoint writes (*.tmp<pid>; called when no write is under way), and the model and state
    files of checkpoints older than the newest complete one that never got their DONE_ (killed while
    writing) or lost it (killed while -nk deleted them). A checkpoint with its DONE_ is never touched,
    nor a model file with no state beside it: that is a final model (-n 0), not part of a checkpoint."""
    done = done_steps(output_dir)
    if not os.path.isdir(output_dir):
        return []
    names = os.listdir(output_dir)
    with_state = {int(m[2]) for m in map(CHECKPOINT_FILE.fullmatch, names) if m and m[2]}
    incomplete = {s for s in with_state if done and s < done[-1] and s not in done}
    removed = []
    for name in sorted(names):
        m = CHECKPOINT_FILE.fullmatch(name)
        if TEMPORARY.fullmatch(name) or (m and not m[3] and int(m[1] or m[2]) in incomplete):
            os.remove(os.path.join(output_dir, name))
            removed.append(name)
    return removed


def write_checkpoint(output_dir, step, config, params, state, dtype="float32", barrier=lambda: None):
    """Called by every rank: every rank writes its state, rank 0 the model, and once all have (barrier:
    the ranks' collective one) rank 0 writes DONE: the marker last, so only a whole checkpoint counts.
    A write that fails (a full disk) removes what this rank wrote of the step and raises its WriteError."""
    mine = [state_path(output_dir, step, state.rank)] + ([model_path(output_dir, step)] if state.rank == 0 else [])
    try:
        write_state_file(mine[0], state)
        if state.rank == 0:
            write_model_file(mine[1], config, params, dtype)
        barrier()
        if state.rank == 0:
            write_atomic(done_path(output_dir, step), [])
    except WriteError:
        for path in mine:
            if os.path.exists(path):
                os.remove(path)
        raise


def delete_checkpoint(output_dir, step):
    """The DONE marker first: a run killed halfway through leaves no DONE pointing at missing files.
    Then the model and every rank's state (in that order: a model file alone is never a checkpoint's)."""
    states = sorted(glob.glob(os.path.join(glob.escape(output_dir), f"state_{step:08d}_*.bin")))
    for path in (done_path(output_dir, step), model_path(output_dir, step), *states):
        if os.path.exists(path):
            os.remove(path)


def checkpoints_to_delete(steps, keep, major_every):
    """Of the DONE steps (ascending), those -nk keep / -nm major_every say to delete: all but the newest
    `keep`, except the major ones (step % major_every == 0). keep 0 keeps everything. (llm.c deletes
    step - keep * every after each write; on a regular schedule that is the same set.)"""
    if keep <= 0:
        return []
    return [s for s in steps[:-keep] if not (major_every > 0 and s % major_every == 0)]


def check_flags(args):
    """-n and -y need -o: one line otherwise."""
    if args.checkpoint_every > 0 and not args.output_log_dir:
        raise ConfigError(f"-n {args.checkpoint_every} writes checkpoints into the output dir: add -o DIR")
    if args.resume == 1 and not args.output_log_dir:
        raise ConfigError("-y 1 resumes from the checkpoints in the output dir: add -o DIR")
    if min(args.checkpoint_every, args.checkpoints_keep, args.major_checkpoint_every) < 0:
        raise ConfigError("-n, -nk and -nm must be 0 or positive")
