"""Per-layer activation and gradient statistics (-as N), for the trouble llm.c's 1558M run reported (loss
spikes, "bad activation ranges"): every N steps, for each layer and each tensor, how big the values are and
how many of them bf16 could not hold. Both trainers share this module; each gives it its activations through
gpt2_stats_activations(model) (train_gpt2.py, train_gpt2_cuda.py), and the gradients are read here from
model.grads. The reductions run where the arrays live (NumPy, or CuPy on the GPU: the module of the array
does them) and their results are copied to the host together, once per stats step.

For each tensor, over all its values (B, T and channels):
  mean, std        the mean, and the population std around it
  max_abs          the largest |x|
  bf16_sat         the fraction with |x| above bf16's largest finite value (3.39e38; inf too): they saturate
  bf16_under       the fraction with 0 < |x| < 2^-126, bf16's smallest normal value: they underflow
att_entropy has mean, std and max_abs only: its values are the entropies (nats) of the attention's rows of
probabilities, which no buffer stores, so a bf16 fraction says nothing about them. The activations are the
last micro-step's; the gradients as their buffer holds them after the backward (summed over the micro-steps,
before AdamW's 1/micro-steps and clipping): the values a bf16 gradient buffer would have to hold.

stats.jsonl in -o gets one line per stats step (a JSON object; non-finite values as Python's json writes
them, NaN and Infinity):
  {"step": 10, "tensors": {"ln1": {"mean": [one per layer], "std": [...], ...}, "grad.qkvw": {...}, ...}}
step is the loop's 0-based index, as main.log's s:<step>; a tensor outside the layers (encoded, lnf, the
gradients of wte, wpe, lnfw, lnfb) has lists of one. The file is only appended to: a resumed run (-y 1)
adds its lines after the killed run's, and a reader takes the last line of a step (dev/vislog.py --stats).
"""

import itertools
import json
import math
import os
import sys

import numpy as np

from llmc.formats import bf16_to_f32
from llmc.utils import ConfigError, WriteError, file_starts_with, refuse_foreign_files, write_failure

FILE_NAME = "stats.jsonl"
STATS = ("mean", "std", "max_abs", "bf16_sat", "bf16_under")
ENTROPY = "att_entropy"
ENTROPY_STATS = STATS[:3]
BF16_MAX = float.fromhex("0x1.fep127")     # 3.3895e38, bf16's largest finite value
BF16_MIN_NORMAL = 2.0 ** -126
# flash attention keeps no probabilities: sampled_entropy recomputes them for these rows of each layer
ENTROPY_BATCH_ROWS = 4                     # the first this many sequences of the batch
ENTROPY_POSITIONS = 64                     # this many query positions of each, evenly spaced, the last one included
ROW_CHUNK = 1 << 24                        # row_entropy's temporaries: at most this many values at a time
CUT_LINE_SEARCH = 1 << 23                  # drop_cut_line looks this far back for a newline (a line: ~0.1 MiB at d48)


def array_module(x):
    """numpy for a NumPy array, cupy for a CuPy one: the reductions run where the array is."""
    return sys.modules[type(x).__module__.split(".")[0]]


def as_float32(x):
    """A trainer's float32 array as it is, or bf16 bit patterns (uint16) widened exactly."""
    return bf16_to_f32(x) if x.dtype == np.uint16 else x


def moments(x):
    """x: a float32 (or bf16 bits) array -> its 5 STATS as a float64 vector on the same device, no sync.
    The std is taken of x / max_abs - mean / max_abs, which neither subtraction nor squares overflow."""
    xp = array_module(x)
    x = as_float32(x).ravel()
    n = x.size
    magnitude = xp.abs(x)
    max_abs = magnitude.max().astype(xp.float64)
    saturated = xp.count_nonzero(magnitude > np.float32(BF16_MAX))
    under = xp.count_nonzero((magnitude > 0) & (magnitude < np.float32(BF16_MIN_NORMAL)))
    del magnitude
    mean = x.sum(dtype=xp.float64) / n
    scale = xp.where(max_abs > 0, max_abs, 1.0)
    with np.errstate(invalid="ignore"):        # an inf in x gives inf / inf: a NaN std, no warning per step
        d = x / scale.astype(xp.float32) - (mean / scale).astype(xp.float32)      # in [-2, 2]: no overflow
        std = scale * xp.sqrt(xp.square(d).sum(dtype=xp.float64) / n)
    return xp.stack([mean, std, max_abs, xp.asarray(saturated / n, dtype=xp.float64),
                     xp.asarray(under / n, dtype=xp.float64)])


def entropy_moments(entropies):
    """The row entropies' mean, std and max (as moments' first three; the bf16 fractions NaN)."""
    xp = array_module(entropies)
    first = moments(entropies)[:3]
    return xp.concatenate([first, xp.full(2, np.nan, dtype=xp.float64)])


def row_entropy(probs):
    """probs (..., T): rows of probabilities (float32 or bf16 bits; zeros on the causal mask) -> each row's
    entropy -sum p log p in nats, float32, flat. In chunks of rows, so the temporaries stay small."""
    xp = array_module(probs)
    rows = probs.reshape(-1, probs.shape[-1])
    out = xp.empty(rows.shape[0], dtype=xp.float32)
    step = max(1, ROW_CHUNK // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        p = as_float32(rows[i:i + step])
        out[i:i + step] = -(p * xp.log(xp.where(p > 0, p, 1))).sum(axis=1)
    return out


def sample_positions(T, xp=np, count=ENTROPY_POSITIONS):
    """The query positions sampled_entropy reads: min(T, count) of 0..T-1, evenly spaced (rounded down), first
    and last included. Made by arithmetic in xp's memory: copying a host array to a GPU would wait for it."""
    S = min(T, count)
    return xp.arange(S, dtype=xp.int64) * (T - 1) // max(S - 1, 1)


def sampled_entropy(qkv, NH):
    """qkv (B, T, 3C): one layer's q|k|v, as flash attention keeps them -> the entropies of the causal
    softmax(q k^T / sqrt(hs)) rows of every head at the first ENTROPY_BATCH_ROWS sequences and the
    sample_positions, recomputed in float32 from q and k (a (b, NH, 64, T) block, not the (B, NH, T, T) one)."""
    xp = array_module(qkv)
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    hs = C // NH
    b, positions = min(B, ENTROPY_BATCH_ROWS), sample_positions(T, xp)
    x = as_float32(qkv[:b])
    q = x[:, positions, :C].reshape(b, positions.size, NH, hs).transpose(0, 2, 1, 3)   # (b, NH, S, hs)
    k = x[:, :, C:2 * C].reshape(b, T, NH, hs).transpose(0, 2, 3, 1)                   # (b, NH, hs, T)
    scores = (q @ k) * np.float32(1.0 / math.sqrt(hs))                                  # (b, NH, S, T)
    future = xp.arange(T)[None, :] > positions[:, None]                                 # (S, T)
    scores = xp.where(future, -np.inf, scores)
    top = scores.max(axis=-1, keepdims=True)
    logp = scores - (top + xp.log(xp.exp(scores - top).sum(axis=-1, keepdims=True)))
    logp = xp.where(future, 0, logp)                     # the future's p log p is 0 (not exp(-inf) * -inf)
    return -(xp.exp(logp) * logp).sum(axis=-1).ravel().astype(xp.float32)


OUTSIDE_LAYERS = ("wte", "wpe", "lnfw", "lnfb")      # the parameter tensors without a layer axis


def gradient_tensors(model):
    """(name, layer, array) of each parameter tensor's gradient, layer by layer where it has layers
    (wte without its pad rows, which stay zero)."""
    L, V = model.config.num_layers, model.config.vocab_size
    for name, _ in model.param_shapes:
        grad = getattr(model.grads, name)
        if name not in OUTSIDE_LAYERS:
            for l in range(L):
                yield f"grad.{name}", l, grad[l]
        else:
            yield f"grad.{name}", None, grad[:V] if name == "wte" else grad


def collect(model, activations):
    """activations: the trainer's gpt2_stats_activations(model). -> (the (tensor, layer) keys in order,
    a (keys, 5) float64 array on the device): every reduction queued, nothing read back yet."""
    keys, rows = [], []
    for name, layer, x in itertools.chain(activations, gradient_tensors(model)):
        keys.append((name, layer))
        rows.append(entropy_moments(x) if name == ENTROPY else moments(x))
    return keys, array_module(rows[0]).stack(rows)


def to_record(step, keys, table):
    """keys and the host copy of collect's table -> the JSON object of one stats step."""
    tensors = {}
    for (name, layer), row in zip(keys, np.asarray(table, dtype=np.float64)):
        names = ENTROPY_STATS if name == ENTROPY else STATS
        entry = tensors.setdefault(name, {stat: [] for stat in names})
        assert layer is None or layer == len(entry["mean"]), f"{name}: layer {layer} out of order"
        for stat, value in zip(names, row):
            entry[stat].append(float(value))
    return {"step": step, "tensors": tensors}


def is_stats_file(path):
    """Is this file stats.jsonl as -as writes it (empty, or opening with a step's object)?"""
    return os.path.getsize(path) == 0 or file_starts_with(path, b'{"step":')


def drop_cut_line(path):
    """A killed run can leave its last line cut short (no newline at the end of the file): cut it off, so
    that a resumed run's lines follow whole ones. Only that tail goes; the whole lines stay as they are."""
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(max(0, size - CUT_LINE_SEARCH))
        tail = f.read()
        if not tail.endswith(b"\n"):
            f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)


class ActivationStats:
    """The -as N hook of the training loop. record() does nothing unless the step is a multiple of N and
    there is a file to write: without -as (N = 0) there is no extra work anywhere, and -as without -o
    says in one line that the statistics go nowhere (and are not computed), and training goes on, as
    llm.c's logger without -o writes nothing. Only rank 0 writes (train() gives the others no dir)."""

    def __init__(self, output_dir, every):
        if every < 0:
            raise ConfigError(f"-as {every}: give how many steps apart the statistics are, or 0 for none")
        self.path = os.path.join(output_dir, FILE_NAME) if output_dir and every > 0 else None
        self.every = every if self.path else 0
        if every > 0 and not output_dir:
            print(f"-as {every} without -o: the activation statistics go nowhere, so they are not computed "
                  f"(give -o DIR to have them in DIR/{FILE_NAME}); training goes on")
        if self.path:
            refuse_foreign_files([self.path], is_stats_file, "a stats.jsonl written by -as",
                                 "move it away or give another -o")
            drop_cut_line(self.path)
            print(f"activation statistics: every {every} steps into {self.path}")

    def record(self, trainer, model, step):
        """Called once per step, when the gradients are final and before the update."""
        if not self.every or step % self.every:
            return
        keys, table = collect(model, trainer.gpt2_stats_activations(model))
        self.write(to_record(step, keys, trainer.to_numpy(table)))     # the one host sync

    def write(self, record):
        """One line appended in one write: a crash leaves whole lines (at most the last one cut short)."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            raise WriteError(write_failure(self.path, e, 0, len(line))) from None


def read_stats(path):
    """stats.jsonl -> {step: record} (a step logged twice, by a resumed run: the later line), in step order.
    A last line without its newline (cut short by a kill) is left out; any other line that is not one of
    ours is a one-line ValueError naming the file and line."""
    records = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or not line.endswith("\n"):
                continue
            try:
                record = json.loads(line)
                records[int(record["step"])] = record["tensors"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: not a stats.jsonl line (-as writes them): {line.strip()[:60]}") \
                    from None
    if not records:
        raise ValueError(f"{path}: no statistics in it; a run with -as N -o DIR writes DIR/{FILE_NAME}")
    return dict(sorted(records.items()))
