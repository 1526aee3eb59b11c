"""
GPT-2 training in plain NumPy, a port of llm.c's train_gpt2.c.

Read it top to bottom: a little plumbing that makes NumPy fast (BLAS kernels, memory, the raw sgemm
the matmuls call), the file formats, then every layer as a forward/backward pair,
then the model, the optimizer, the data loader, the tokenizer, the sampler and main.
Nothing here uses autograd; PyTorch (train_gpt2_torch.py) is only the oracle the tests
compare against. train_gpt2_cuda.py imports the host code of this file (formats, data
loader, tokenizer, sampler, CLI, training loop) and replaces the layers with CUDA kernels.
"""

import os
import sys

# ----------------------------------------------------------------------------
# plumbing: which BLAS kernels NumPy loads (the rest of the CPU speed plumbing is llmc/cpu.py)
#
# NumPy's bundled OpenBLAS picks its kernels by CPU model and falls back to the AVX2 (Haswell)
# ones on a CPU it does not know, even one with AVX-512 (some builds do so on AMD Zen 4). The
# choice is read from OPENBLAS_CORETYPE once, when NumPy is first imported, so it is made here,
# before `import numpy`, and only when this file is the program (an importer keeps its own).
# The config block prints the kernels in use.


def _cpu_has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


CORETYPE_SET_HERE = False
if __name__ == "__main__" and "numpy" not in sys.modules and "OPENBLAS_CORETYPE" not in os.environ:
    if _cpu_has_avx512():
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
        CORETYPE_SET_HERE = True

import codecs  # noqa: E402
import math  # noqa: E402  (after the BLAS choice above)
import time  # noqa: E402
import glob as globlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

# What makes the NumPy below fast lives in llmc/cpu.py, out of the way of the math: NumPy's
# OpenBLAS sgemm called through ctypes (matmul, matmuls), one thread pool for all the layers
# (row_blocks runs a layer over blocks of its rows in parallel, in_chunks runs AdamW over
# cache-sized chunks), and glibc told to keep freed memory for the next step's temporaries.
from llmc.cpu import blas_info, in_chunks, keep_freed_memory, matmul, matmuls, row_blocks  # noqa: E402


# ----------------------------------------------------------------------------
# file formats: llm.c's .bin files, byte for byte
#
# Every file starts with a header of 256 little-endian int32. Readers check the magic,
# the version and that the file holds exactly the bytes the header promises; a mismatch
# is one line that names the file, what was found, what was expected, and what to run.

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

MODEL_MAGIC = 20240326       # versions: 3 = fp32, 5 = bf16 (padded vocabulary)
STATE_MAGIC = 20240327       # debug state, version 2
TOKENIZER_MAGIC = 20240328   # version 2 (with the EOT id)
DATA_MAGIC = 20240520        # data shard, version 1, uint16 tokens

# The debug state keeps PyTorch's training run in header slots that llm.c leaves at zero
# (its readers look at [2] B and [3] T only): [4] the number of recorded steps, [8:20] the
# optimizer settings as six float64, [32:32+n] the loss before each step as float32 bits.
STATE_NSTEPS, STATE_OPT, STATE_LOSSES = 4, slice(8, 20), 32
STATE_OPT_FIELDS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip")
MAX_RECORDED_STEPS = HEADER_INTS - STATE_LOSSES

WRITERS = {  # what to run when a file is missing or bad
    MODEL_MAGIC: "python train_gpt2_torch.py --model d12",
    STATE_MAGIC: "python train_gpt2_torch.py --model d12",
    TOKENIZER_MAGIC: "python train_gpt2_torch.py --model d12",
    DATA_MAGIC: "python prepro_tinyshakespeare.py",
}


class FormatError(ValueError):
    """A .bin file that is not what its reader expects; the message is one line."""


def _fail(path, found, expected, magic):
    raise FormatError(f"{path}: {found} (expected {expected}); re-run {WRITERS[magic]}")


def read_header(path, magic, versions):
    """Open `path`, check magic and version, return (header int32[256], file size in bytes)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file; create it with {WRITERS[magic]}")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        _fail(path, f"only {size} bytes", f"a {HEADER_BYTES}-byte header", magic)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != magic:
        _fail(path, f"bad magic {header[0]}", magic, magic)
    if header[1] not in versions:
        _fail(path, f"unsupported version {header[1]}", " or ".join(map(str, versions)), magic)
    return header, size


def check_size(path, size, expected, magic):
    if size != expected:
        _fail(path, f"{size} bytes", f"{expected} bytes as its header says", magic)


def write_atomic(path, chunks):
    """Write the byte chunks to `path` through a temporary name, so no half file is ever left."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def new_header(magic, version):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1] = magic, version
    return header


@dataclass
class GPT2Config:
    max_seq_len: int        # maxT, 1024 for GPT-2
    vocab_size: int         # V, 50257
    num_layers: int         # L
    num_heads: int          # NH
    channels: int           # C
    padded_vocab_size: int  # Vp, V rounded up to a multiple of 128 (50304)


def padded_vocab(vocab_size):
    return (vocab_size + 127) // 128 * 128


def param_shapes(config):
    """The 16 parameter tensors in checkpoint order, with their shapes."""
    Vp, maxT = config.padded_vocab_size, config.max_seq_len
    L, C = config.num_layers, config.channels
    return [
        ("wte", (Vp, C)), ("wpe", (maxT, C)),
        ("ln1w", (L, C)), ("ln1b", (L, C)),
        ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)),
        ("attprojw", (L, C, C)), ("attprojb", (L, C)),
        ("ln2w", (L, C)), ("ln2b", (L, C)),
        ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
        ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
        ("lnfw", (C,)), ("lnfb", (C,)),
    ]


def num_parameters(config):
    return sum(int(np.prod(shape)) for _, shape in param_shapes(config))


def bf16_to_f32(bits):
    """bfloat16 bit patterns (uint16) -> float32: they are the high half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    """float32 -> bfloat16 bit patterns, rounding to nearest even as PyTorch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, (bits >> 16) | np.uint32(0x40), rounded)
    return rounded.astype(np.uint16)


def read_model_file(path, out=None):
    """Read an llm.c model file (version 3 fp32, or version 5 bf16 widened to fp32).
    Returns (config, params): params is one flat float32 array in checkpoint order.
    `out`, if given, is a float32 array of the right size to read into (no extra copy)."""
    header, size = read_header(path, MODEL_MAGIC, (3, 5))
    config = GPT2Config(max_seq_len=int(header[2]), vocab_size=int(header[3]), num_layers=int(header[4]),
                        num_heads=int(header[5]), channels=int(header[6]), padded_vocab_size=int(header[7]))
    if config.padded_vocab_size < config.vocab_size or min(header[2:8]) <= 0:
        _fail(path, f"bad shape {header[2:8].tolist()}", "positive maxT, V, L, NH, C, Vp with Vp >= V", MODEL_MAGIC)
    n = num_parameters(config)
    itemsize = 4 if header[1] == 3 else 2
    check_size(path, size, HEADER_BYTES + n * itemsize, MODEL_MAGIC)
    params = np.empty(n, dtype=np.float32) if out is None else out
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        if itemsize == 4:
            f.readinto(memoryview(params).cast("B"))
        else:  # widen in chunks so a big bf16 model never needs a second full-size buffer
            chunk = 1 << 24
            for start in range(0, n, chunk):
                bits = np.fromfile(f, dtype="<u2", count=min(chunk, n - start))
                params[start:start + bits.size] = bf16_to_f32(bits)
    return config, params


def write_model_file(path, config, params, dtype="float32"):
    """Write `params` (flat float32, checkpoint order) as an llm.c model file, fp32 v3 or bf16 v5."""
    assert params.size == num_parameters(config)
    header = new_header(MODEL_MAGIC, 3 if dtype == "float32" else 5)
    header[2:8] = [config.max_seq_len, config.vocab_size, config.num_layers,
                   config.num_heads, config.channels, config.padded_vocab_size]
    body = params.astype("<f4", copy=False) if dtype == "float32" else f32_to_bf16(params)
    write_atomic(path, [header, body])


@dataclass
class DebugState:
    x: np.ndarray            # (B, T) int32 inputs
    y: np.ndarray            # (B, T) int32 targets
    logits: np.ndarray       # (B, T, V) float32, unpadded
    loss: float              # mean cross-entropy of the forward pass
    grads: np.ndarray        # flat float32 gradients in checkpoint order, wte padded to Vp
    losses: np.ndarray       # float32 loss before each recorded PyTorch training step (may be empty)
    optimizer: dict          # the settings of those steps (STATE_OPT_FIELDS), empty if none


def read_debug_state(path, config):
    """Read a debug state written for a model of shape `config`."""
    header, size = read_header(path, STATE_MAGIC, (2,))
    B, T = int(header[2]), int(header[3])
    V, n = config.vocab_size, num_parameters(config)
    check_size(path, size, HEADER_BYTES + 4 * (2 * B * T + B * T * V + 1 + n), STATE_MAGIC)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        x = np.fromfile(f, dtype="<i4", count=B * T).reshape(B, T)
        y = np.fromfile(f, dtype="<i4", count=B * T).reshape(B, T)
        logits = np.fromfile(f, dtype="<f4", count=B * T * V).reshape(B, T, V)
        loss = float(np.fromfile(f, dtype="<f4", count=1)[0])
        grads = np.fromfile(f, dtype="<f4", count=n)
    nsteps = int(header[STATE_NSTEPS])
    if not 0 <= nsteps <= MAX_RECORDED_STEPS:
        _fail(path, f"{nsteps} recorded steps in header[{STATE_NSTEPS}]", f"0..{MAX_RECORDED_STEPS}", STATE_MAGIC)
    losses = header[STATE_LOSSES:STATE_LOSSES + nsteps].view(np.float32).copy()
    settings = header[STATE_OPT].view(np.float64)
    optimizer = {k: float(v) for k, v in zip(STATE_OPT_FIELDS, settings)} if nsteps else {}
    return DebugState(x, y, logits, loss, grads, losses, optimizer)


def write_debug_state(path, x, y, logits, loss, grads, losses=(), optimizer=None):
    """Write llm.c's debug state (version 2). `losses` and `optimizer` (a dict with
    STATE_OPT_FIELDS) record a PyTorch training run in header slots llm.c ignores."""
    B, T = x.shape
    header = new_header(STATE_MAGIC, 2)
    header[2], header[3] = B, T
    losses = np.asarray(losses, dtype=np.float32)
    assert losses.size <= MAX_RECORDED_STEPS
    if losses.size:
        header[STATE_NSTEPS] = losses.size
        header[STATE_OPT] = np.array([optimizer[k] for k in STATE_OPT_FIELDS], dtype=np.float64).view(np.int32)
        header[STATE_LOSSES:STATE_LOSSES + losses.size] = losses.view(np.int32)
    write_atomic(path, [header, x.astype("<i4"), y.astype("<i4"), logits.astype("<f4"),
                        np.array([loss], dtype="<f4"), grads.astype("<f4")])


def read_tokenizer_file(path):
    """Read gpt2_tokenizer.bin: returns (list of token byte strings, eot id)."""
    header, size = read_header(path, TOKENIZER_MAGIC, (2,))
    n, eot = int(header[2]), int(header[3])
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        body = f.read()
    tokens, pos = [], 0
    for i in range(n):
        if pos >= len(body):
            _fail(path, f"file ends at token {i}", f"{n} tokens as its header says", TOKENIZER_MAGIC)
        length = body[pos]
        if pos + 1 + length > len(body):
            _fail(path, f"file ends inside token {i}", f"{n} tokens as its header says", TOKENIZER_MAGIC)
        tokens.append(body[pos + 1:pos + 1 + length])
        pos += 1 + length
    check_size(path, size, HEADER_BYTES + pos, TOKENIZER_MAGIC)
    return tokens, eot


def write_tokenizer_file(path, tokens, eot):
    """Write gpt2_tokenizer.bin (version 2): per token one uint8 length, then its bytes."""
    header = new_header(TOKENIZER_MAGIC, 2)
    header[2], header[3] = len(tokens), eot
    body = bytearray()
    for t in tokens:
        assert 1 <= len(t) <= 255, f"token {t!r} cannot be stored with a one-byte length"
        body.append(len(t))
        body += t
    write_atomic(path, [header, np.frombuffer(bytes(body), dtype=np.uint8)])


def read_data_shard(path):
    """Memory-map an llm.c data shard: returns its uint16 tokens (read-only, not loaded)."""
    header, size = read_header(path, DATA_MAGIC, (1,))
    ntok = int(header[2])
    check_size(path, size, HEADER_BYTES + 2 * ntok, DATA_MAGIC)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))


def write_data_shard(path, *parts):
    """Write GPT-2 tokens as an llm.c data shard (version 1, uint16): one array, or several written
    one after another into the same shard without concatenating them (large splits)."""
    parts = [np.asarray(p) for p in parts]
    for p in parts:
        assert p.size == 0 or (0 <= p.min() and p.max() < 2**16)
    ntok = sum(p.size for p in parts)
    assert ntok < 2**31
    header = new_header(DATA_MAGIC, 1)
    header[2] = ntok
    write_atomic(path, [header] + [p.astype("<u2", copy=False) for p in parts])


# ----------------------------------------------------------------------------
# the layers: each a forward/backward pair of plain functions, and its loop twin
#
# Arguments follow llm.c: outputs first, then inputs, then sizes. Arrays carry their logical
# shapes, e.g. (B, T, C), and the dtype follows the arrays (float32 in training, float64 in the
# tests). Constants are Python floats, which leave a float32 array float32 (NumPy's NEP 50);
# a NumPy float64 scalar would promote it.
#
# Backward ADDS into the gradient arrays (`+=`): gradients are zeroed once per step, and a tensor
# read by two layers (the residual stream, wte used by the encoder and by the classifier) then
# collects both contributions without any bookkeeping.
#
# Letters: B batch, T time, C channels, NH heads, hs = C/NH head size, V vocabulary,
# Vp padded vocabulary (the logits have Vp columns; columns V..Vp-1 never count), L layers.
#
# Each layer body is whole-array NumPy: the formula, as if it ran over all rows on one core.
# The speed is added from outside the body, by llmc/cpu.py:
#   - `@row_blocks(...)` on the def line says which arguments hold one entry per row (a sequence
#     b, a position (b, t), or an element) and which gradients every row adds into. A call then
#     runs the same body on blocks of rows at once, one block per thread (NumPy releases the GIL
#     inside its loops), with B (or N) set to the block's size; the summed gradients go through
#     per-thread partial sums, added in thread order, so the float32 result is the same every run.
#   - the matrix products call `matmul` / `matmuls`: NumPy's OpenBLAS sgemm through ctypes, the
#     output cut into one block per thread.
# Every fast layer has a loop twin beside it (`*_loop`, and llm.c's `matmul_forward_naive`):
# plain Python loops over b, t and the channels, the index math spelled out; the tests check
# each fast layer against its twin.


def encoder_forward(out, inp, wte, wpe, B, T, C):
    """out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]: token embedding plus position embedding."""
    np.take(wte, inp, axis=0, out=out)          # (B, T) ids -> (B, T, C) rows of wte
    out += wpe[:T]                              # (T, C) broadcast over B


def encoder_backward(dwte, dwpe, dout, inp, B, T, C):
    """dwte[inp[b,t],:] += dout[b,t,:]; dwpe[t,:] += sum_b dout[b,t,:]. dout (B, T, C)."""
    np.add.at(dwte, inp, dout)                  # scatter-add: a token seen twice gets both rows
    dwpe[:T] += dout.sum(axis=0)                # (B, T, C) -> (T, C)


def encoder_forward_loop(out, inp, wte, wpe, B, T, C):
    for b in range(B):
        for t in range(T):
            token = inp[b, t]
            for i in range(C):
                out[b, t, i] = wte[token, i] + wpe[t, i]


def encoder_backward_loop(dwte, dwpe, dout, inp, B, T, C):
    for b in range(B):
        for t in range(T):
            token = inp[b, t]
            for i in range(C):
                dwte[token, i] += dout[b, t, i]
                dwpe[t, i] += dout[b, t, i]


@row_blocks("out", "mean", "rstd", "inp", rows="BT")
def layernorm_forward(out, mean, rstd, inp, weight, bias, B, T, C):
    """Normalize each (b, t) row over C (biased variance, eps 1e-5), then scale and shift.
    Caches mean and rstd (B, T) for the backward pass; the normalized input is recomputed."""
    mean[...] = inp.mean(axis=-1)                                 # (B, T)
    xc = inp - mean[..., None]                                    # (B, T, C) centered
    rstd[...] = 1.0 / np.sqrt((xc * xc).mean(axis=-1) + 1e-5)     # (B, T), from the biased variance
    out[...] = xc * rstd[..., None] * weight + bias               # (B, T, C)


@row_blocks("dinp", "dout", "inp", "mean", "rstd", summed=("dweight", "dbias"), rows="BT")
def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, B, T, C):
    """With norm = (inp - mean) * rstd, out = norm * weight + bias and dnorm = dout * weight:
    dinp += rstd * (dnorm - mean_C(dnorm) - norm * mean_C(dnorm * norm));
    dweight += sum_BT(dout * norm); dbias += sum_BT(dout)."""
    norm = (inp - mean[..., None]) * rstd[..., None]              # (B, T, C), recomputed
    dnorm = dout * weight                                         # (B, T, C)
    dbias += dout.sum(axis=(0, 1))                                # (C,)
    dweight += (dout * norm).sum(axis=(0, 1))                     # (C,)
    dinp += rstd[..., None] * (dnorm - dnorm.mean(axis=-1, keepdims=True)
                               - norm * (dnorm * norm).mean(axis=-1, keepdims=True))


def layernorm_forward_loop(out, mean, rstd, inp, weight, bias, B, T, C):
    for b in range(B):
        for t in range(T):
            m = 0.0
            for i in range(C):
                m += inp[b, t, i]
            m = m / C
            v = 0.0
            for i in range(C):
                xshift = inp[b, t, i] - m
                v += xshift * xshift
            v = v / C
            s = 1.0 / math.sqrt(v + 1e-5)
            for i in range(C):
                n = s * (inp[b, t, i] - m)                # normalized
                out[b, t, i] = n * weight[i] + bias[i]
            mean[b, t] = m
            rstd[b, t] = s


def layernorm_backward_loop(dinp, dweight, dbias, dout, inp, weight, mean, rstd, B, T, C):
    for b in range(B):
        for t in range(T):
            # the two reductions over C first
            dnorm_mean = 0.0
            dnorm_norm_mean = 0.0
            for i in range(C):
                norm_i = (inp[b, t, i] - mean[b, t]) * rstd[b, t]
                dnorm_i = weight[i] * dout[b, t, i]
                dnorm_mean += dnorm_i
                dnorm_norm_mean += dnorm_i * norm_i
            dnorm_mean = dnorm_mean / C
            dnorm_norm_mean = dnorm_norm_mean / C
            # then each channel's three gradients
            for i in range(C):
                norm_i = (inp[b, t, i] - mean[b, t]) * rstd[b, t]
                dnorm_i = weight[i] * dout[b, t, i]
                dbias[i] += dout[b, t, i]
                dweight[i] += norm_i * dout[b, t, i]
                dinp[b, t, i] += (dnorm_i - dnorm_mean - norm_i * dnorm_norm_mean) * rstd[b, t]


def matmul_forward(out, inp, weight, bias, B, T, C, OC):
    """out = inp @ weight^T + bias: (B, T, C) @ (C, OC) + (OC,) -> (B, T, OC). weight is stored
    (OC, C), as PyTorch's nn.Linear keeps it; bias may be None (the classifier has none)."""
    matmul(out, inp, weight.T, bias=bias)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, B, T, C, OC):
    """dinp += dout @ weight; dweight += dout^T @ inp, summed over the B*T rows; dbias += sum_BT(dout)."""
    dout2, inp2 = dout.reshape(B * T, OC), inp.reshape(B * T, C)    # (B*T, OC), (B*T, C)
    matmuls((dinp, dout, weight),                      # (B, T, OC) @ (OC, C) -> (B, T, C)
            (dweight, dout2.T, inp2), accumulate=True)  # (OC, B*T) @ (B*T, C) -> (OC, C)
    if dbias is not None:
        dbias += dout2.sum(axis=0)                     # (OC,)


def matmul_forward_naive(out, inp, weight, bias, B, T, C, OC):
    for b in range(B):
        for t in range(T):
            for o in range(OC):
                val = bias[o] if bias is not None else 0.0
                for i in range(C):
                    val += inp[b, t, i] * weight[o, i]
                out[b, t, o] = val


def matmul_backward_loop(dinp, dweight, dbias, dout, inp, weight, B, T, C, OC):
    for b in range(B):
        for t in range(T):
            for o in range(OC):
                d = dout[b, t, o]
                for i in range(C):
                    dinp[b, t, i] += weight[o, i] * d      # out[o] reads every inp[i] ...
                    dweight[o, i] += inp[b, t, i] * d      # ... through weight[o, i]
                if dbias is not None:
                    dbias[o] += d


def _split_heads(x, B, T, NH):
    """(B, T, NH*hs) -> (B, NH, T, hs), a view (no copy): one head's rows are strided."""
    return x.reshape(B, T, NH, -1, copy=False).transpose(0, 2, 1, 3)


def _qkv_heads(inp, B, T, C, NH):
    """(B, T, 3C) = q|k|v -> three (B, NH, T, hs) views."""
    qkv = inp.reshape(B, T, 3, NH, C // NH, copy=False)
    return [qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]


def _causal_mask(T):
    return np.triu(np.ones((T, T), dtype=bool), k=1)    # True above the diagonal: the future


@row_blocks("out", "preatt", "att", "inp", rows="B")
def attention_forward(out, preatt, att, inp, B, T, C, NH):
    """Causal multi-head self-attention on inp (B, T, 3C) = q|k|v.
    preatt (B, NH, T, T) = q k^T / sqrt(hs), with -inf on the masked (future) entries;
    att = softmax(preatt) over the last axis, exactly 0 on the masked entries;
    out (B, T, C) = att @ v with the heads side by side again."""
    q, k, v = _qkv_heads(inp, B, T, C, NH)                        # 3 x (B, NH, T, hs)
    np.matmul(q, k.transpose(0, 1, 3, 2), out=preatt)             # (B,NH,T,hs) @ (B,NH,hs,T) -> (B,NH,T,T)
    preatt *= 1.0 / math.sqrt(C // NH)
    preatt[:, :, _causal_mask(T)] = -np.inf
    e = np.exp(preatt - preatt.max(axis=-1, keepdims=True))       # exp(-inf) = 0 on the future
    att[...] = e / e.sum(axis=-1, keepdims=True)
    np.matmul(att, v, out=_split_heads(out, B, T, NH))            # (B,NH,T,T) @ (B,NH,T,hs) -> (B,T,NH,hs)


@row_blocks("dinp", "dpreatt", "datt", "dout", "inp", "att", rows="B")
def attention_backward(dinp, dpreatt, datt, dout, inp, att, B, T, C, NH):
    """Each line inverts one forward line, last first. dinp (B, T, 3C) receives dq|dk|dv.
    datt also receives values on the masked entries (dout @ v^T is computed whole); they meet
    att = 0 there and change nothing else."""
    scale = 1.0 / math.sqrt(C // NH)
    q, k, v = _qkv_heads(inp, B, T, C, NH)                        # 3 x (B, NH, T, hs)
    dq, dk, dv = _qkv_heads(dinp, B, T, C, NH)
    dout_h = _split_heads(dout, B, T, NH)                         # (B, NH, T, hs)
    # out = att @ v
    datt += dout_h @ v.transpose(0, 1, 3, 2)                      # (B,NH,T,hs) @ (B,NH,hs,T)
    dv += att.transpose(0, 1, 3, 2) @ dout_h                      # (B,NH,T,T) @ (B,NH,T,hs)
    # att = softmax(preatt): d preatt_j = att_j * (d att_j - sum_i att_i d att_i)
    dpreatt += att * (datt - (att * datt).sum(axis=-1, keepdims=True))
    # preatt = scale * q @ k^T (the masked entries have att = 0, so their dpreatt is 0)
    dq += scale * (dpreatt @ k)                                   # (B,NH,T,T) @ (B,NH,T,hs)
    dk += scale * (dpreatt.transpose(0, 1, 3, 2) @ q)


def attention_forward_loop(out, preatt, att, inp, B, T, C, NH):
    """For each sequence b, position t and head h: scores against the keys at t2 <= t, their
    softmax, and the weighted sum of the values. inp[b, t] holds q | k | v, each NH heads of hs."""
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    for b in range(B):
        for t in range(T):
            for h in range(NH):
                q = h * hs                                   # offsets of this head's q, k, v
                k = C + h * hs
                v = 2 * C + h * hs
                # scores q . k[t2], and their maximum (for a softmax that cannot overflow)
                maxval = -math.inf
                for t2 in range(t + 1):
                    val = 0.0
                    for i in range(hs):
                        val += inp[b, t, q + i] * inp[b, t2, k + i]
                    val = val * scale
                    preatt[b, h, t, t2] = val
                    maxval = max(maxval, val)
                for t2 in range(t + 1, T):
                    preatt[b, h, t, t2] = -math.inf          # the future
                # softmax over t2 <= t; the future gets weight 0
                expsum = 0.0
                for t2 in range(t + 1):
                    e = math.exp(preatt[b, h, t, t2] - maxval)
                    att[b, h, t, t2] = e
                    expsum += e
                for t2 in range(T):
                    att[b, h, t, t2] = att[b, h, t, t2] / expsum if t2 <= t else 0.0
                # out = the values weighted by att
                for i in range(hs):
                    out[b, t, q + i] = 0.0
                for t2 in range(t + 1):
                    for i in range(hs):
                        out[b, t, q + i] += att[b, h, t, t2] * inp[b, t2, v + i]


def attention_backward_loop(dinp, dpreatt, datt, dout, inp, att, B, T, C, NH):
    """The forward loop's three steps inverted, last first; only t2 <= t is touched."""
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    for b in range(B):
        for t in range(T):
            for h in range(NH):
                q = h * hs
                k = C + h * hs
                v = 2 * C + h * hs
                # out[i] = sum_t2 att[t2] * v[t2, i]
                for t2 in range(t + 1):
                    for i in range(hs):
                        datt[b, h, t, t2] += inp[b, t2, v + i] * dout[b, t, q + i]
                        dinp[b, t2, v + i] += att[b, h, t, t2] * dout[b, t, q + i]
                # att = softmax(preatt): d att[t2] / d preatt[t3] = att[t2] * (1[t2 == t3] - att[t3])
                for t2 in range(t + 1):
                    for t3 in range(t + 1):
                        indicator = 1.0 if t2 == t3 else 0.0
                        local = att[b, h, t, t2] * (indicator - att[b, h, t, t3])
                        dpreatt[b, h, t, t3] += local * datt[b, h, t, t2]
                # preatt[t2] = scale * sum_i q[i] * k[t2, i]
                for t2 in range(t + 1):
                    for i in range(hs):
                        dinp[b, t, q + i] += inp[b, t2, k + i] * dpreatt[b, h, t, t2] * scale
                        dinp[b, t2, k + i] += inp[b, t, q + i] * dpreatt[b, h, t, t2] * scale


GELU_SCALING_FACTOR = math.sqrt(2.0 / math.pi)


@row_blocks("out", "inp", rows="N", block=1 << 17)
def gelu_forward(out, inp, N):
    """GELU, tanh approximation, elementwise: out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = inp
    out[...] = 0.5 * x * (1.0 + np.tanh(GELU_SCALING_FACTOR * (x + 0.044715 * x * x * x)))


@row_blocks("dinp", "inp", "dout", rows="N", block=1 << 17)
def gelu_backward(dinp, inp, dout, N):
    """d gelu/dx = 0.5 (1 + tanh u) + 0.5 x sech^2(u) du/dx, u = s (x + 0.044715 x^3),
    with sech^2 = 1 - tanh^2 (llm.c writes 1/cosh^2, which overflows to inf at large u)."""
    x = inp
    tanh_u = np.tanh(GELU_SCALING_FACTOR * (x + 0.044715 * x * x * x))
    du_dx = GELU_SCALING_FACTOR * (1.0 + 3.0 * 0.044715 * x * x)
    dinp += (0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u * tanh_u) * du_dx) * dout


def gelu_forward_loop(out, inp, N):
    x_flat, out_flat = inp.reshape(-1), out.reshape(-1, copy=False)
    for i in range(N):
        x = x_flat[i]
        cube = 0.044715 * x * x * x
        out_flat[i] = 0.5 * x * (1.0 + math.tanh(GELU_SCALING_FACTOR * (x + cube)))


def gelu_backward_loop(dinp, inp, dout, N):
    x_flat, dout_flat, dinp_flat = inp.reshape(-1), dout.reshape(-1), dinp.reshape(-1, copy=False)
    for i in range(N):
        x = x_flat[i]
        cube = 0.044715 * x * x * x
        tanh_out = math.tanh(GELU_SCALING_FACTOR * (x + cube))
        sech2 = 1.0 - tanh_out * tanh_out
        local_grad = 0.5 * (1.0 + tanh_out) + x * 0.5 * sech2 * GELU_SCALING_FACTOR * (1.0 + 3.0 * 0.044715 * x * x)
        dinp_flat[i] += local_grad * dout_flat[i]


def residual_forward(out, inp1, inp2, N):
    """out = inp1 + inp2, elementwise over N."""
    np.add(inp1, inp2, out=out)


def residual_backward(dinp1, dinp2, dout, N):
    """dinp1 += dout; dinp2 += dout (one thread: the arrays are too small to be worth cutting)."""
    dinp1 += dout
    dinp2 += dout


def residual_forward_loop(out, inp1, inp2, N):
    a, b, o = inp1.reshape(-1), inp2.reshape(-1), out.reshape(-1, copy=False)
    for i in range(N):
        o[i] = a[i] + b[i]


def residual_backward_loop(dinp1, dinp2, dout, N):
    d1, d2, d = dinp1.reshape(-1, copy=False), dinp2.reshape(-1, copy=False), dout.reshape(-1)
    for i in range(N):
        d1[i] += d[i]
        d2[i] += d[i]


@row_blocks("probs", "logits", rows="BT", block=8)
def softmax_forward(probs, logits, B, T, V, Vp):
    """probs (B, T, Vp) = softmax of logits over the first V of the Vp columns; pad columns get 0."""
    logits_v = logits[..., :V]                                     # (B, T, V): the real vocabulary
    e = np.exp(logits_v - logits_v.max(axis=-1, keepdims=True))    # shifted by the max: no overflow
    probs[..., :V] = e / e.sum(axis=-1, keepdims=True)
    probs[..., V:] = 0.0


def softmax_forward_loop(probs, logits, B, T, V, Vp):
    for b in range(B):
        for t in range(T):
            maxval = -math.inf
            for i in range(V):
                maxval = max(maxval, logits[b, t, i])
            total = 0.0
            for i in range(V):
                probs[b, t, i] = math.exp(logits[b, t, i] - maxval)
                total += probs[b, t, i]
            for i in range(V):
                probs[b, t, i] = probs[b, t, i] / total
            for i in range(V, Vp):
                probs[b, t, i] = 0.0                        # pad columns: probability 0


def crossentropy_forward(losses, probs, targets, B, T, Vp):
    """losses (B, T) = -log of the probability each position gives its target token."""
    b, t = np.indices((B, T))
    losses[...] = -np.log(probs[b, t, targets])


def crossentropy_forward_loop(losses, probs, targets, B, T, Vp):
    for b in range(B):
        for t in range(T):
            losses[b, t] = -math.log(probs[b, t, targets[b, t]])


@row_blocks("dlogits", "dlosses", "probs", "targets", rows="BT", block=8)
def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, B, T, V, Vp):
    """Fused backward of softmax + crossentropy: dlogits += (probs - onehot(target)) * dlosses,
    over the first V columns only; the pad columns' gradients stay exactly 0."""
    dlogits[..., :V] += probs[..., :V] * dlosses[..., None]       # (B, T, V)
    b, t = np.indices((B, T))
    dlogits[b, t, targets] -= dlosses                             # each (b, t) once: no duplicates


def crossentropy_softmax_backward_loop(dlogits, dlosses, probs, targets, B, T, V, Vp):
    """The inner loop stops at V, so columns V..Vp-1 are never touched."""
    for b in range(B):
        for t in range(T):
            ix = targets[b, t]
            for i in range(V):
                indicator = 1.0 if i == ix else 0.0
                dlogits[b, t, i] += (probs[b, t, i] - indicator) * dlosses[b, t]


# ----------------------------------------------------------------------------
# random numbers: llm.c's rand.h, which is PyTorch's CPU generator
#
# A Mersenne Twister (MT19937) seeded with init_genrand, as llm.c and torch.manual_seed seed it.
# The data loader shuffles with it (seed 42 + rank) and from-scratch weights are drawn from it
# (seed 42), in PyTorch's order and with PyTorch's Box-Muller, so `-e d12` starts where
# PyTorch's from-scratch GPT-2 starts.

MASK32 = 0xFFFFFFFF


class MT19937:
    N, M = 624, 397
    MATRIX_A = 0x9908B0DF

    def __init__(self, seed):
        s = [seed & MASK32]
        for j in range(1, self.N):
            s.append((1812433253 * (s[j - 1] ^ (s[j - 1] >> 30)) + j) & MASK32)
        self.state, self.left, self.next = s, 1, 0

    def _twist(self):
        s, N, M = self.state, self.N, self.M
        for j in range(N):
            y = (s[j] & 0x80000000) | (s[(j + 1) % N] & 0x7FFFFFFF)
            s[j] = s[(j + M) % N] ^ (y >> 1) ^ (self.MATRIX_A if y & 1 else 0)
        self.left, self.next = N, 0

    def randint32(self):
        self.left -= 1
        if self.left <= 0:
            self._twist()
        y = self.state[self.next]
        self.next += 1
        y ^= y >> 11                                 # tempering
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y


def random_permutation(data, rng):
    """Fisher-Yates in place, as llm.c: j = randint32 % (i + 1) for i = n-1 down to 1."""
    for i in range(len(data) - 1, 0, -1):
        j = rng.randint32() % (i + 1)
        data[i], data[j] = data[j], data[i]


def normal_(out, std, rng, chunk=1 << 20):
    """Fill `out` (float32, at least 16 elements) with N(0, std^2) as torch.normal_ does on the CPU:
    first one uniform u = (x & 0xFFFFFF) / 2^24 per element, then per block of 16 a Box-Muller on
    the pairs (u[i], u[i+8]); when the size is no multiple of 16, the last 16 are redrawn.
    `rng` is NumPy's legacy RandomState(seed): it is init_genrand MT19937, and its randint over
    the full uint32 range returns the raw 32-bit outputs (tests/test_dataloader.py checks both
    against MT19937 above). It is used here only because 124M draws in pure Python are too slow."""
    flat = out.reshape(-1)
    n = flat.size
    assert n >= 16, "torch draws tensors of fewer than 16 elements differently"

    def box_muller(dst, count):
        u = (rng.randint(0, 1 << 32, size=count, dtype=np.uint32) & np.uint32(0xFFFFFF)).astype(np.float32)
        u *= np.float32(1.0 / (1 << 24))
        blocks = u.reshape(-1, 2, 8)                             # (count/16, 2, 8): u1 | u2 halves
        radius = np.sqrt(np.float32(-2) * np.log(np.float32(1) - blocks[:, 0] + np.float32(1e-12)))
        theta = np.float32(2 * math.pi) * blocks[:, 1]
        pairs = dst.reshape(-1, 2, 8)
        pairs[:, 0] = radius * np.cos(theta) * np.float32(std)
        pairs[:, 1] = radius * np.sin(theta) * np.float32(std)

    whole = n // 16 * 16
    for start in range(0, whole, chunk):                         # chunk is a multiple of 16
        stop = min(start + chunk, whole)
        box_muller(flat[start:stop], stop - start)
    if n % 16:
        rng.randint(0, 1 << 32, size=n - whole, dtype=np.uint32)  # the leftover uniforms, unused
        box_muller(flat[n - 16:], 16)


# ----------------------------------------------------------------------------
# the model: GPT-2 in flat buffers with named views
#
# Parameters, their gradients, AdamW's m and v, the activations and the activation gradients
# each live in one float32 array; the names are views into it (llm.c's ParameterTensors and
# ActivationTensors). Loading a checkpoint is one read into params_memory, the optimizer is one
# pass over the flat arrays, and zeroing the gradients is one fill.

class ConfigError(ValueError):
    """A run that cannot work as asked (shapes, flags, data); the message is one line."""


MODEL_DEPTHS = {6: (6, 384), 12: (12, 768), 24: (16, 1024), 36: (20, 1280), 48: (25, 1600)}  # L: (NH, C)

# the 2-D weights, which AdamW decays; biases and LayerNorm parameters are not decayed
DECAYED_PARAMS = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")


def activation_shapes(config, B, T):
    """llm.c's 23 activation tensors, in its order."""
    L, NH, C, Vp = config.num_layers, config.num_heads, config.channels, config.padded_vocab_size
    return [
        ("encoded", (B, T, C)),
        ("ln1", (L, B, T, C)), ("ln1_mean", (L, B, T)), ("ln1_rstd", (L, B, T)),
        ("qkv", (L, B, T, 3 * C)),
        ("atty", (L, B, T, C)),
        ("preatt", (L, B, NH, T, T)), ("att", (L, B, NH, T, T)),
        ("attproj", (L, B, T, C)),
        ("residual2", (L, B, T, C)),
        ("ln2", (L, B, T, C)), ("ln2_mean", (L, B, T)), ("ln2_rstd", (L, B, T)),
        ("fch", (L, B, T, 4 * C)), ("fch_gelu", (L, B, T, 4 * C)),
        ("fcproj", (L, B, T, C)),
        ("residual3", (L, B, T, C)),
        ("lnf", (B, T, C)), ("lnf_mean", (B, T)), ("lnf_rstd", (B, T)),
        ("logits", (B, T, Vp)), ("probs", (B, T, Vp)),
        ("losses", (B, T)),
    ]


# the backward pass needs a gradient for every activation except these (llm.c allocates them all)
NO_GRAD_ACTS = ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean", "lnf_rstd", "probs")


def views(memory, shapes, region_sizes=None):
    """Named views into one flat array. With region_sizes, each view starts where a tensor of
    that size would (so buffers allocated for (B, T) also serve a smaller (B', T'))."""
    out, offset = {}, 0
    for i, (name, shape) in enumerate(shapes):
        n = math.prod(shape)
        out[name] = memory[offset:offset + n].reshape(shape)
        offset += n if region_sizes is None else region_sizes[i]
    return SimpleNamespace(**out)


class GPT2:
    """What llm.c's GPT2 struct holds. Activations are allocated at the first forward pass,
    gradients at the first backward, m and v at the first update (as llm.c does)."""

    def __init__(self, config, params_memory):
        keep_freed_memory()                  # training makes big temporaries: let glibc reuse them
        self.config = config
        self.param_shapes = param_shapes(config)
        self.num_parameters = params_memory.size
        self.params_memory = params_memory
        self.params = views(params_memory, self.param_shapes)
        self.grads_memory = self.grads = None
        self.m_memory = self.v_memory = None
        self.acts_memory = self.acts = self.grads_acts_memory = self.grads_acts = None
        self.batch_size = self.seq_len = 0          # the (B, T) the activations were allocated for
        self.B = self.T = 0                         # the (B, T) of the last forward pass
        self.inputs = self.targets = None
        self.mean_loss = -1.0


def gpt2_build_from_checkpoint(path):
    """Load an llm.c model file (v3 fp32, or v5 bf16 widened to fp32) into the flat parameter
    buffer: one read, no second full-size copy."""
    config, params = read_model_file(path)
    return GPT2(config, params)


def gpt2_build_from_descriptor(descriptor, seed=42):
    """A GPT-2 from scratch: "d12" (or "gpt2:d12") is the 124M shape, d6/d24/d36/d48 the others.
    Initialized like PyTorch's GPT-2 (llm.c's train_gpt2.py): weights N(0, 0.02) drawn in module
    order (wte, wpe, then per layer qkvw, attprojw, fcw, fcprojw), the two projections back into
    the residual stream scaled by 1/sqrt(2L), biases 0, LayerNorm weights 1, wte's pad rows 0.
    A path to a .bin file is loaded instead."""
    if descriptor.endswith(".bin") or os.path.exists(descriptor):
        return gpt2_build_from_checkpoint(descriptor)
    name = descriptor.split(":", 1)[1] if descriptor.startswith("gpt2:") else descriptor
    depth = int(name[1:]) if name[:1] == "d" and name[1:].isdigit() else None
    if depth not in MODEL_DEPTHS:
        raise ConfigError(f"unknown model '{descriptor}': use d6, d12, d24, d36, d48 or a .bin checkpoint")
    NH, C = MODEL_DEPTHS[depth]
    config = GPT2Config(max_seq_len=1024, vocab_size=50257, num_layers=depth, num_heads=NH, channels=C,
                        padded_vocab_size=padded_vocab(50257))
    model = GPT2(config, np.zeros(num_parameters(config), dtype=np.float32))
    init_weights(model, seed)
    return model


def init_weights(model, seed=42):
    p, L, V = model.params, model.config.num_layers, model.config.vocab_size
    rng = np.random.RandomState(seed)                    # MT19937, init_genrand(seed): see normal_
    std, residual_std = 0.02, 0.02 / math.sqrt(2 * L)
    for w in (p.ln1w, p.ln2w, p.lnfw):
        w[...] = 1
    normal_(p.wte[:V], std, rng)                         # the pad rows stay 0
    normal_(p.wpe, std, rng)
    for l in range(L):
        normal_(p.qkvw[l], std, rng)
        normal_(p.attprojw[l], residual_std, rng)
        normal_(p.fcw[l], std, rng)
        normal_(p.fcprojw[l], residual_std, rng)


def _allocate_activations(model, B, T):
    shapes = activation_shapes(model.config, B, T)
    model.act_sizes = [math.prod(s) for _, s in shapes]
    model.acts_memory = np.zeros(sum(model.act_sizes), dtype=np.float32)
    grad_shapes = [(n, s) for n, s in shapes if n not in NO_GRAD_ACTS]
    model.grad_act_sizes = [math.prod(s) for _, s in grad_shapes]
    model.grads_acts_memory = None                       # allocated at the first backward
    model.batch_size, model.seq_len = B, T


def check_batch(config, inputs, targets, B, T):
    """A batch both trainers accept: T within max_seq_len and token ids within the vocabulary.
    Returns inputs and targets (or None) as int32 (B, T) arrays on the host."""
    if T > config.max_seq_len:
        raise ConfigError(f"sequence length T={T} exceeds the model's max_seq_len {config.max_seq_len}; "
                          f"use -t {config.max_seq_len} or less")
    V = config.vocab_size
    checked = []
    for what, ids in (("token", inputs), ("target", targets)):
        if ids is not None:
            ids = np.asarray(ids).reshape(B, T)
            if ids.min() < 0 or ids.max() >= V:
                raise ConfigError(f"{what} ids must lie in [0, {V}), got {ids.min()}..{ids.max()}")
            ids = ids.astype(np.int32)
        checked.append(ids)
    return checked


def gpt2_forward(model, inputs, targets, B, T):
    """The forward pass of llm.c's train_gpt2.c. inputs, targets: (B, T) token ids; targets may
    be None (then mean_loss is -1). Sets model.acts (logits, probs, ...) and model.mean_loss."""
    c = model.config
    L, NH, C, V, Vp = c.num_layers, c.num_heads, c.channels, c.vocab_size, c.padded_vocab_size
    model.inputs, model.targets = check_batch(c, inputs, targets, B, T)
    if model.acts_memory is None or B > model.batch_size or T > model.seq_len:
        _allocate_activations(model, max(B, model.batch_size), max(T, model.seq_len))
    acts = model.acts = views(model.acts_memory, activation_shapes(c, B, T), model.act_sizes)
    model.B, model.T = B, T
    p = model.params

    encoder_forward(acts.encoded, model.inputs, p.wte, p.wpe, B, T, C)
    for l in range(L):
        residual = acts.encoded if l == 0 else acts.residual3[l - 1]
        layernorm_forward(acts.ln1[l], acts.ln1_mean[l], acts.ln1_rstd[l], residual, p.ln1w[l], p.ln1b[l], B, T, C)
        matmul_forward(acts.qkv[l], acts.ln1[l], p.qkvw[l], p.qkvb[l], B, T, C, 3 * C)
        attention_forward(acts.atty[l], acts.preatt[l], acts.att[l], acts.qkv[l], B, T, C, NH)
        matmul_forward(acts.attproj[l], acts.atty[l], p.attprojw[l], p.attprojb[l], B, T, C, C)
        residual_forward(acts.residual2[l], residual, acts.attproj[l], B * T * C)
        layernorm_forward(acts.ln2[l], acts.ln2_mean[l], acts.ln2_rstd[l], acts.residual2[l], p.ln2w[l], p.ln2b[l], B, T, C)
        matmul_forward(acts.fch[l], acts.ln2[l], p.fcw[l], p.fcb[l], B, T, C, 4 * C)
        gelu_forward(acts.fch_gelu[l], acts.fch[l], B * T * 4 * C)
        matmul_forward(acts.fcproj[l], acts.fch_gelu[l], p.fcprojw[l], p.fcprojb[l], B, T, 4 * C, C)
        residual_forward(acts.residual3[l], acts.residual2[l], acts.fcproj[l], B * T * C)
    layernorm_forward(acts.lnf, acts.lnf_mean, acts.lnf_rstd, acts.residual3[L - 1], p.lnfw, p.lnfb, B, T, C)
    matmul_forward(acts.logits, acts.lnf, p.wte, None, B, T, C, Vp)     # the classifier is wte (tied)
    softmax_forward(acts.probs, acts.logits, B, T, V, Vp)

    if model.targets is None:
        model.mean_loss = -1.0
    else:
        crossentropy_forward(acts.losses, acts.probs, model.targets, B, T, Vp)
        model.mean_loss = float(acts.losses.mean(dtype=np.float64))


def gpt2_zero_grad(model):
    """Zero the parameter gradients (once per optimizer step; backward accumulates into them)."""
    if model.grads_memory is not None:
        model.grads_memory.fill(0)


def gpt2_backward(model):
    """Backward of the last forward pass, adding d(mean loss)/d(params) into model.grads.
    The activation gradients are scratch for this pass: zeroed here, then filled layer by
    layer from the loss down to the embeddings (llm.c's gpt2_backward)."""
    if model.targets is None:
        raise ConfigError("gpt2_backward needs a forward pass with targets first")
    c = model.config
    L, NH, C, V, Vp = c.num_layers, c.num_heads, c.channels, c.vocab_size, c.padded_vocab_size
    B, T = model.B, model.T
    if model.grads_memory is None:
        model.grads_memory = np.zeros(model.num_parameters, dtype=np.float32)
        model.grads = views(model.grads_memory, model.param_shapes)
    if model.grads_acts_memory is None:
        model.grads_acts_memory = np.zeros(sum(model.grad_act_sizes), dtype=np.float32)
    else:
        model.grads_acts_memory.fill(0)
    grad_shapes = [(n, s) for n, s in activation_shapes(c, B, T) if n not in NO_GRAD_ACTS]
    p, g, acts = model.params, model.grads, model.acts
    dacts = model.grads_acts = views(model.grads_acts_memory, grad_shapes, model.grad_act_sizes)

    dacts.losses[...] = np.float32(1.0 / (B * T))        # d mean / d loss[b, t]
    crossentropy_softmax_backward(dacts.logits, dacts.losses, acts.probs, model.targets, B, T, V, Vp)
    matmul_backward(dacts.lnf, g.wte, None, dacts.logits, acts.lnf, p.wte, B, T, C, Vp)
    layernorm_backward(dacts.residual3[L - 1], g.lnfw, g.lnfb, dacts.lnf, acts.residual3[L - 1], p.lnfw,
                       acts.lnf_mean, acts.lnf_rstd, B, T, C)
    for l in range(L - 1, -1, -1):
        residual = acts.encoded if l == 0 else acts.residual3[l - 1]
        dresidual = dacts.encoded if l == 0 else dacts.residual3[l - 1]
        residual_backward(dacts.residual2[l], dacts.fcproj[l], dacts.residual3[l], B * T * C)
        matmul_backward(dacts.fch_gelu[l], g.fcprojw[l], g.fcprojb[l], dacts.fcproj[l], acts.fch_gelu[l], p.fcprojw[l],
                        B, T, 4 * C, C)
        gelu_backward(dacts.fch[l], acts.fch[l], dacts.fch_gelu[l], B * T * 4 * C)
        matmul_backward(dacts.ln2[l], g.fcw[l], g.fcb[l], dacts.fch[l], acts.ln2[l], p.fcw[l], B, T, C, 4 * C)
        layernorm_backward(dacts.residual2[l], g.ln2w[l], g.ln2b[l], dacts.ln2[l], acts.residual2[l], p.ln2w[l],
                           acts.ln2_mean[l], acts.ln2_rstd[l], B, T, C)
        residual_backward(dresidual, dacts.attproj[l], dacts.residual2[l], B * T * C)
        matmul_backward(dacts.atty[l], g.attprojw[l], g.attprojb[l], dacts.attproj[l], acts.atty[l], p.attprojw[l],
                        B, T, C, C)
        attention_backward(dacts.qkv[l], dacts.preatt[l], dacts.att[l], dacts.atty[l], acts.qkv[l], acts.att[l],
                           B, T, C, NH)
        matmul_backward(dacts.ln1[l], g.qkvw[l], g.qkvb[l], dacts.qkv[l], acts.ln1[l], p.qkvw[l], B, T, C, 3 * C)
        layernorm_backward(dresidual, g.ln1w[l], g.ln1b[l], dacts.ln1[l], residual, p.ln1w[l],
                           acts.ln1_mean[l], acts.ln1_rstd[l], B, T, C)
    encoder_backward(g.wte, g.wpe, dacts.encoded, model.inputs, B, T, C)


def to_numpy(x):
    """Host copy of a model array: the identity here (cupy.asnumpy in train_gpt2_cuda.py)."""
    return x


# ----------------------------------------------------------------------------
# the optimizer: AdamW exactly as torch.optim.AdamW (single-tensor path), plus the global
# gradient norm, clipping and the learning-rate schedules
#
# adamw is the update written on whole arrays. Run once over the flat 124M-float arrays, each of
# its NumPy operations would stream ~0.5 GB through memory, more time than all the matrix
# multiplies of a step; so gpt2_update hands it to llmc.cpu's in_chunks, which calls it on matching
# chunks of p, g, m and v small enough to stay in the CPU's cache, the chunks shared among the
# threads. Measured for d12 on 2 cores (ms per update): 64K floats 237 (each NumPy call holds the
# GIL for a moment, and the two threads wait on each other), 128K 207, 256K 250 (the temporaries
# no longer fit in the cache).

ADAMW_CHUNK = 1 << 17                  # floats per chunk: p, g, m, v and two temporaries, 3 MiB


def adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0):
    """AdamW step number t (1-based) on matching float32 arrays, in place, as torch computes it:
        g = grad * grad_scale                      (the clipped / averaged gradient)
        param *= 1 - lr * weight_decay             (decoupled weight decay)
        m = beta1 * m + (1 - beta1) * g            (torch: m += (1 - beta1) * (g - m))
        v = beta2 * v + (1 - beta2) * g^2
        param -= lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)"""
    g = grad * grad_scale if grad_scale != 1.0 else grad
    if weight_decay != 0.0:
        param *= 1.0 - lr * weight_decay
    m += (1.0 - beta1) * (g - m)
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    # the last line with m_hat and v_hat written out: step_size * m / (sqrt(v) / sqrt(bc2) + eps),
    # the step size folded into the denominator's two constants (one pass fewer over the arrays)
    step_size = lr / (1.0 - beta1 ** t)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
    param -= m / (np.sqrt(v) / (bias_correction2_sqrt * step_size) + eps / step_size)


def param_segments(model):
    """(start, stop, decayed) ranges of the flat parameter array, in checkpoint order."""
    segments, start = [], 0
    for name, shape in model.param_shapes:
        stop = start + math.prod(shape)
        segments.append((start, stop, name in DECAYED_PARAMS))
        start = stop
    return segments


def gpt2_update(model, learning_rate, beta1, beta2, eps, weight_decay, t, grad_scale=1.0):
    """AdamW step number t (1-based) over all parameters; weight decay only on the 2-D weights;
    the gradients are multiplied by grad_scale first (clipping, accumulation averaging)."""
    if model.m_memory is None:
        model.m_memory = np.zeros(model.num_parameters, dtype=np.float32)
        model.v_memory = np.zeros(model.num_parameters, dtype=np.float32)
    p, g, m, v = model.params_memory, model.grads_memory, model.m_memory, model.v_memory
    for start, stop, decayed in param_segments(model):
        s = slice(start, stop)
        in_chunks(adamw, (p[s], g[s], m[s], v[s]), ADAMW_CHUNK, learning_rate, beta1, beta2, eps,
                  weight_decay if decayed else 0.0, t, grad_scale)


NORM_CHUNK = 1 << 20


def gpt2_calculate_grad_norm(model):
    """Global L2 norm of all parameter gradients (a python float): sqrt(sum g^2), the squares
    summed per chunk in float32 (a BLAS dot) and the chunks' sums in float64, in order."""
    squares = in_chunks(lambda x: float(np.dot(x, x)), (model.grads_memory,), NORM_CHUNK)
    return math.sqrt(sum(squares))


def grad_clip_scale(norm, grad_clip):
    """The factor torch.nn.utils.clip_grad_norm_ multiplies the gradients by: min(1, clip / (norm + 1e-6))."""
    if grad_clip <= 0.0:
        return 1.0
    return min(1.0, grad_clip / (norm + 1e-6))


def get_lr(step, schedule, learning_rate, warmup_iterations, num_iterations, final_learning_rate_frac):
    """llm.c's schedulers.h: linear warmup (step+1)/warmup, then cosine, linear or constant decay
    to learning_rate * final_learning_rate_frac at the last step (wsd: constant, then 1-sqrt decay
    over the last 20%)."""
    min_lr = learning_rate * final_learning_rate_frac
    if schedule == "constant":
        return learning_rate
    if step < warmup_iterations:
        return learning_rate * (step + 1) / warmup_iterations
    if schedule == "wsd":
        decay_start = int(0.8 * num_iterations)
        if step < decay_start:
            return learning_rate
        ratio = (step - decay_start) / max(1, num_iterations - decay_start)
        return min_lr + (1.0 - math.sqrt(ratio)) * (learning_rate - min_lr)
    ratio = (step - warmup_iterations) / max(1, num_iterations - warmup_iterations)
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)
    if schedule == "linear":
        return learning_rate - ratio * (learning_rate - min_lr)
    raise ConfigError(f"unknown learning rate schedule '{schedule}': use cosine, linear, constant or wsd")


# ----------------------------------------------------------------------------
# the data loader: llm.c's dataloader.h
#
# A pattern (one file or a glob) names the shards; each batch is B*T+1 consecutive tokens,
# inputs the first B*T and targets the last B*T. Sample i of a shard starts at token
# i*B*T*num_processes + rank*B*T. Sequentially (the val loader, llm.c's train_gpt2.py) the
# samples come in order, shard after shard, and after the last shard it starts over.
# Shuffled (the C trainers' train loader) a Mersenne Twister seeded 42 + rank permutes the
# shard order at each epoch and the sample order inside each shard as it is opened.

class DataLoader:
    def __init__(self, pattern, B, T, process_rank=0, num_processes=1, should_shuffle=False):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.should_shuffle = should_shuffle
        if not 0 <= process_rank < num_processes:
            raise ConfigError(f"process_rank {process_rank} must be below num_processes {num_processes}")
        self.files = sorted(globlib.glob(pattern))
        if not self.files:
            raise ConfigError(f"no data files match '{pattern}'; create them with python prepro_tinyshakespeare.py")
        need = num_processes * B * T + 1
        self.num_tokens = 0
        for path in self.files:                          # check every shard now, not mid-run
            ntok = read_data_shard(path).size
            if ntok < need:
                raise ConfigError(f"{path}: {ntok} tokens, fewer than the {need} one batch needs "
                                  f"(B={B}, T={T}); use smaller -b/-t or more data")
            self.num_tokens += ntok
        if should_shuffle:
            self.shuffle_rng = MT19937(42 + process_rank)
            self.shard_indices = list(range(len(self.files)))
        self.reset()

    def _load_shard(self, shard_idx):
        if self.should_shuffle:
            shard_idx = self.shard_indices[shard_idx]
        self.tokens = read_data_shard(self.files[shard_idx])
        # the -1: a sample reads B*T+1 tokens but the next one starts B*T later
        self.shard_num_samples = (self.tokens.size - 1) // (self.num_processes * self.B * self.T)
        if self.should_shuffle:
            self.intra_shard_indices = list(range(self.shard_num_samples))
            random_permutation(self.intra_shard_indices, self.shuffle_rng)

    def reset(self):
        """Back to the first shard (a new shard order when shuffling: the old order shuffled again)."""
        self.current_shard_idx = 0
        self.current_sample_idx = -1                      # no sample drawn yet
        if self.should_shuffle:
            random_permutation(self.shard_indices, self.shuffle_rng)
        self._load_shard(0)

    def _advance(self):
        if self.current_shard_idx == len(self.files) - 1:
            self.reset()                                   # past the last shard: a new epoch
            return
        self.current_shard_idx += 1
        self.current_sample_idx = -1
        self._load_shard(self.current_shard_idx)

    def next_batch(self):
        """Returns (inputs, targets), int32 arrays of shape (B, T)."""
        self.current_sample_idx += 1
        if self.current_sample_idx >= self.shard_num_samples:
            self._advance()
            self.current_sample_idx = 0
        idx = self.current_sample_idx
        if self.should_shuffle:
            idx = self.intra_shard_indices[idx]
        B, T = self.B, self.T
        start = idx * self.num_processes * B * T + self.process_rank * B * T
        buf = np.asarray(self.tokens[start:start + B * T + 1], dtype=np.int32)
        return buf[:-1].reshape(B, T), buf[1:].reshape(B, T)


# ----------------------------------------------------------------------------
# the tokenizer: decoding only, from gpt2_tokenizer.bin (as llm.c: there is no encoder)

def gpt2_encoding():
    """tiktoken's GPT-2 encoding, for the prepro scripts and the exporter (the trainers only decode).
    tiktoken downloads its two files on first use; without a network that fails deep inside
    requests, so say in one line what to do instead."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' connection errors, or whatever the download raised
        raise SystemExit(f"tiktoken could not load the gpt2 encoding ({type(e).__name__}: no network?); "
                         "offline, point TIKTOKEN_CACHE_DIR at a filled cache, e.g. "
                         "export TIKTOKEN_CACHE_DIR=$PWD/../shared/data/tiktoken_cache") from None


class Tokenizer:
    def __init__(self, path):
        self.init_ok = False
        self.tokens, self.eot_token = [], 50256
        try:
            self.tokens, self.eot_token = read_tokenizer_file(path)
            self.init_ok = True
        except (OSError, FormatError) as e:
            print(f"WARNING: failed to read the tokenizer ({e}); samples print as token ids")

    def decode_bytes(self, token_id):
        return self.tokens[token_id]

    def decode(self, token_id):
        """The token's text. A token may hold part of a UTF-8 character: that part shows as U+FFFD
        here; print through an incremental decoder (as main does) to keep such characters whole."""
        return self.tokens[token_id].decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------
# the sampler: llm.c's xorshift generator and sampling from the probabilities
#
# The generator state is a one-element list holding a uint64, so the functions can advance it.

MASK64 = (1 << 64) - 1


def random_u32(state):
    """xorshift*: state = [uint64], advanced in place; returns a uint32."""
    x = state[0]
    x ^= x >> 12
    x ^= (x << 25) & MASK64
    x ^= x >> 27
    state[0] = x
    return ((x * 0x2545F4914F6CDD1D) & MASK64) >> 32


def random_f32(state):
    """A float32 uniform in [0, 1) from the top 24 bits of random_u32."""
    return np.float32((random_u32(state) >> 8) / 16777216.0)


def sample_mult(probabilities, coin):
    """Index of the first float32 running sum of `probabilities` that exceeds coin (in [0, 1));
    the last index if rounding leaves the total below the coin."""
    cdf = np.cumsum(probabilities, dtype=np.float32)     # sequential float32 sums, as the C loop
    i = int(np.searchsorted(cdf, np.float32(coin), side="right"))
    return min(i, len(probabilities) - 1)


# ----------------------------------------------------------------------------
# the profiler: per-layer wall time, switched on with --profile 1
#
# It replaces each layer function of this module by a wrapper that adds its time to PROFILE
# (gpt2_forward looks the layers up by name at call time, so nothing else changes). Matrix
# multiplies are told apart by their shapes: "matmul_forward 768->50304" is the classifier.

PROFILE = {}          # name -> [seconds, calls]
PROFILE_ACTIVE = [False]   # main switches it on around the training steps only (not eval, sampling)
PROFILED = ("encoder", "layernorm", "matmul", "attention", "gelu", "residual", "softmax", "crossentropy",
            "crossentropy_softmax")


def enable_profiler():
    module = sys.modules[__name__]

    def wrap(fn, name):
        def timed(*args):
            key = f"{name} {args[-2]}->{args[-1]}" if name.startswith("matmul") else name
            t0 = time.perf_counter()
            fn(*args)
            if PROFILE_ACTIVE[0]:
                entry = PROFILE.setdefault(key, [0.0, 0])
                entry[0] += time.perf_counter() - t0
                entry[1] += 1
        timed.__wrapped__ = fn
        return timed

    for layer in PROFILED:
        for direction in ("forward", "backward"):
            name = f"{layer}_{direction}"
            fn = getattr(module, name, None)
            if fn is not None and not hasattr(fn, "__wrapped__"):
                setattr(module, name, wrap(fn, name))
    for name in ("gpt2_zero_grad", "gpt2_calculate_grad_norm", "gpt2_update"):
        fn = getattr(module, name)
        if not hasattr(fn, "__wrapped__"):
            setattr(module, name, _timed_returning(fn, name))


def _timed_returning(fn, name):
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        if PROFILE_ACTIVE[0]:
            entry = PROFILE.setdefault(name, [0.0, 0])
            entry[0] += time.perf_counter() - t0
            entry[1] += 1
        return result
    timed.__wrapped__ = fn
    return timed


def profile_report(steps):
    """The PROFILE table, slowest first, in ms per training step."""
    total = sum(v[0] for v in PROFILE.values())
    lines = [f"{'profile (ms per step)':40s} {'ms':>9s} {'calls':>7s} {'%':>6s}"]
    for key, (seconds, calls) in sorted(PROFILE.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{key:40s} {1e3 * seconds / steps:9.2f} {calls // steps:7d} {100 * seconds / total:6.1f}")
    lines.append(f"{'total':40s} {1e3 * total / steps:9.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# main: llm.c's command line, train_gpt2.c's defaults

TRAIN_GPT2_C_DEFAULTS = {   # flag letter: default (the value's type is the flag's type)
    "i": "", "j": "",        # train / val data patterns; "" = tiny shakespeare, else TinyStories
    "e": "gpt2_124M.bin",    # checkpoint, or a descriptor d6/d12/d24/d36/d48 to start from scratch
    "o": "",                 # output dir: main.log and the final checkpoint
    "b": 4, "t": 64,         # micro-batch B, sequence length T
    "d": -1,                 # total batch size in tokens (-1 = B*T): gradient accumulation
    "x": 40,                 # optimizer steps (-1 = one epoch)
    "l": 1e-4, "u": 0, "q": 1.0, "k": "cosine",   # learning rate, warmup, final fraction, schedule
    "c": 0.0,                # weight decay
    "v": 10, "m": 5,         # val loss every v steps, over m batches
    "s": 20, "g": 64,        # sample every s steps, g tokens
    "a": 0,                  # overfit a single batch
    "profile": 0,            # --profile 1: per-layer timings at the end
}

USAGE = {
    "i": "train data filename pattern", "j": "val data filename pattern",
    "e": "model checkpoint (.bin) or descriptor to init from scratch (d6, d12, d24, d36, d48)",
    "o": "output log dir (main.log, final checkpoint)", "b": "(per-GPU, micro) batch size B",
    "t": "sequence length T", "d": "total desired batch size in tokens (-1 = B*T)",
    "x": "max number of optimization steps (-1 = one epoch)", "l": "learning rate",
    "u": "learning rate warmup iterations", "q": "learning rate decay: final fraction at end of training",
    "k": "learning rate schedule: cosine, linear, constant, wsd", "c": "weight decay",
    "v": "val loss every how many steps", "m": "val max steps (batches)", "s": "sample every how many steps",
    "g": "number of tokens to generate", "a": "overfit a single batch? 0/1",
    "f": "enable TF32 tensor cores for the matmuls? 0/1 (CUDA trainer)",
    "profile": "print per-layer timings at the end? 0/1",
}

# AdamW settings fixed in train_gpt2.c (no flags): betas (0.9, 0.999), eps 1e-8, no clipping
BETA1, BETA2, ADAM_EPS, GRAD_CLIP = 0.9, 0.999, 1e-8, 0.0


def usage(defaults, problem=None):
    lines = [] if problem is None else [f"error: {problem}"]
    lines.append(f"Usage:   python {os.path.basename(sys.argv[0]) or 'train_gpt2.py'} [options]")
    lines.append("Options: (every flag takes a value)")
    for key, default in defaults.items():
        flag = f"-{key}" if len(key) <= 2 else f"--{key}"
        lines.append(f"  {flag:10s} {USAGE.get(key, '')} (default {default!r})")
    print("\n".join(lines), file=sys.stderr if problem else sys.stdout)
    sys.exit(1 if problem else 0)


def parse_args(argv, defaults):
    """llm.c's parser: `-x value` pairs (one letter, or --name for the extras). Returns a dict
    {letter: value} with each value of its default's type; anything else prints the usage."""
    args = dict(defaults)
    if argv and argv[0] in ("-h", "--help"):
        usage(defaults)
    if len(argv) % 2 != 0:
        usage(defaults, f"flag {argv[-1]} has no value")
    for flag, value in zip(argv[0::2], argv[1::2]):
        key = flag[2:] if flag.startswith("--") else flag[1:] if flag.startswith("-") else None
        if key not in defaults or (flag.startswith("--") and len(key) <= 2):
            usage(defaults, f"unknown flag {flag}")
        kind = type(defaults[key])
        try:
            args[key] = kind(float(value)) if kind is int and "e" in value.lower() else kind(value)
        except ValueError:
            usage(defaults, f"flag {flag} needs a {kind.__name__}, got '{value}'")
    return args


class Logger:
    """main.log in llm.c's format (`s:%d trl:%f`, `s:%d tel:%f`); does nothing without a dir."""

    def __init__(self, output_dir):
        self.path = None
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self.path = os.path.join(output_dir, "main.log")
            open(self.path, "w").close()

    def _write(self, line):
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def log_val(self, step, val_loss):
        self._write(f"s:{step} tel:{val_loss:f}")

    def log_train(self, step, train_loss):
        self._write(f"s:{step} trl:{train_loss:f}")


def default_data_paths():
    """tiny shakespeare when it is there, else TinyStories (train_gpt2.c's choice)."""
    shakespeare = "data/tinyshakespeare/tiny_shakespeare_{}.bin"
    stories = "data/tinystories/TinyStories_{}.bin"
    base = shakespeare if os.path.exists(shakespeare.format("train")) else stories
    return base.format("train"), base.format("val")


def resolve_checkpoint(name):
    if name == "gpt2_124M.bin" and not os.path.exists(name) and os.path.exists("gpt2_d12.bin"):
        print("gpt2_124M.bin not found: using gpt2_d12.bin (the same shape, from scratch)")
        return "gpt2_d12.bin"
    return name


# The loop below is shared: train_gpt2_cuda.py calls train(args, trainer=train_gpt2_cuda). A
# trainer is a module with the model API (gpt2_build_from_descriptor, gpt2_forward, ...) plus these
# few pieces, which differ between NumPy and the GPU; here are NumPy's.

def device_setup(args):
    """Runs before the model is built; returns the lines print_config adds under [GPT-2].
    NumPy: switch on the profiler if asked, and say which BLAS runs the matmuls."""
    if args.get("profile"):
        enable_profiler()
    return [blas_info(CORETYPE_SET_HERE)]


class StepTimer:
    """Times one training step on the host's clock (train_gpt2_cuda.py uses CUDA events)."""

    def start(self):
        self.t0 = time.perf_counter()

    def stop(self):
        """Milliseconds since start()."""
        return 1e3 * (time.perf_counter() - self.t0)


def next_token_probs(model, tokens, t):
    """The probabilities (V,) of the token after tokens[0, :t]; tokens is the (B, T) sampling buffer.
    Only row 0 matters, so the pass runs on B=1 and a T rounded up to a multiple of 16: causality
    makes position t-1's probabilities the same as in the full batch."""
    Tr = min(tokens.shape[1], -(-t // 16) * 16)
    gpt2_forward(model, tokens[:1, :Tr], None, 1, Tr)
    return model.acts.probs[0, t - 1, :model.config.vocab_size]


def print_config(model, extra_lines):
    c = model.config
    print("[GPT-2]")
    for field in ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels"):
        print(f"{field}: {getattr(c, field)}")
    print(f"num_parameters: {model.num_parameters}")
    for line in extra_lines:
        print(line)


def generate(trainer, model, tokenizer, B, T, gen_tokens, rng_state):
    """Sample gen_tokens-1 tokens after an EOT, one full forward pass per token (no KV cache,
    as llm.c); trainer.next_token_probs runs the pass and hands the probabilities to the host."""
    V = model.config.vocab_size
    start = tokenizer.eot_token if tokenizer.eot_token < V else V - 1   # a tiny test vocabulary has no EOT
    tokens = np.full((B, T), start, dtype=np.int32)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")   # keeps split characters whole
    print("generating:\n---")
    for t in range(1, gen_tokens):
        probs = trainer.next_token_probs(model, tokens, t)             # (V,)
        next_token = sample_mult(probs, random_f32(rng_state))
        tokens[0, t] = next_token
        if tokenizer.init_ok:
            piece = tokenizer.decode_bytes(next_token)
            if len(piece) == 1 and not (chr(piece[0]).isprintable() or chr(piece[0]).isspace()):
                continue                                   # llm.c's safe_printf skips control bytes
            print(decoder.decode(piece), end="", flush=True)
        else:
            print(next_token, end=" ", flush=True)
    print("\n---")


def evaluate(trainer, model, val_loader, val_max_steps, B, T):
    val_loader.reset()
    val_loss = 0.0
    for _ in range(val_max_steps):
        x, y = val_loader.next_batch()
        trainer.gpt2_forward(model, x, y, B, T)
        val_loss += model.mean_loss
    return val_loss / val_max_steps


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv, TRAIN_GPT2_C_DEFAULTS)
    try:
        train(args)
    except (ConfigError, FormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def train(args, trainer=None):
    """llm.c's main loop. trainer: the module that runs the model, this one (NumPy) by default."""
    tr = trainer or sys.modules[__name__]
    B, T = args["b"], args["t"]
    if B < 1 or T < 1:
        raise ConfigError(f"-b and -t must be positive, got B={B}, T={T}")
    extra_lines = tr.device_setup(args)

    # the model
    checkpoint = resolve_checkpoint(args["e"])
    model = tr.gpt2_build_from_descriptor(checkpoint)
    print_config(model, extra_lines)
    if T > model.config.max_seq_len:
        raise ConfigError(f"sequence length -t {T} exceeds the model's max_seq_len {model.config.max_seq_len}")

    # the data
    train_pattern, val_pattern = default_data_paths()
    train_pattern = args["i"] or train_pattern
    val_pattern = args["j"] or val_pattern
    if args["a"]:
        train_pattern = val_pattern                       # llm.c: overfit the first val batch
    train_loader = DataLoader(train_pattern, B, T, should_shuffle=not args["a"])
    val_loader = DataLoader(val_pattern, B, T, should_shuffle=False)
    print(f"train dataset: {train_pattern} ({train_loader.num_tokens:,} tokens, {train_loader.num_tokens // (B * T)} batches)")
    print(f"val dataset:   {val_pattern} ({val_loader.num_tokens:,} tokens, {val_loader.num_tokens // (B * T)} batches)")
    val_max_steps = min(args["m"], val_loader.num_tokens // (B * T)) if args["m"] > 0 else val_loader.num_tokens // (B * T)

    total_batch = args["d"] if args["d"] > 0 else B * T
    if total_batch % (B * T) != 0:
        raise ConfigError(f"-d {total_batch} is not a multiple of B*T = {B * T}")
    grad_accum_steps = total_batch // (B * T)
    num_steps = args["x"] if args["x"] > 0 else train_loader.num_tokens // total_batch
    print(f"batch: B={B} T={T}, total {total_batch} tokens = {grad_accum_steps} micro-step(s); {num_steps} steps")
    clip = f", grad clip {tr.GRAD_CLIP:g}" if tr.GRAD_CLIP > 0 else ""   # train_gpt2.c does not clip
    print(f"AdamW: lr {args['l']:g} ({args['k']}, warmup {args['u']}, final frac {args['q']:g}), "
          f"betas ({tr.BETA1}, {tr.BETA2}), eps {tr.ADAM_EPS:g}, weight decay {args['c']:g}{clip}")
    get_lr(0, args["k"], args["l"], args["u"], num_steps, args["q"])   # a bad schedule fails now

    tokenizer = Tokenizer("gpt2_tokenizer.bin")
    logger = Logger(args["o"])
    rng_state = [1337]
    timer = tr.StepTimer()
    step_times = []
    for step in range(num_steps + 1):
        last_step = step == num_steps
        if args["v"] > 0 and (step % args["v"] == 0 or last_step):
            val_loss = evaluate(tr, model, val_loader, val_max_steps, B, T)
            print(f"val loss {val_loss:f}")
            logger.log_val(step, val_loss)
        if args["s"] > 0 and step > 0 and (step % args["s"] == 0 or last_step):
            generate(tr, model, tokenizer, B, T, args["g"], rng_state)
        if last_step:
            break

        timer.start()
        PROFILE_ACTIVE[0] = step > 0 or num_steps == 1       # --profile: the first step allocates, not counted
        tr.gpt2_zero_grad(model)
        train_loss = 0.0
        for _ in range(grad_accum_steps):
            if args["a"]:
                train_loader.reset()
            x, y = train_loader.next_batch()
            tr.gpt2_forward(model, x, y, B, T)
            tr.gpt2_backward(model)
            train_loss += model.mean_loss / grad_accum_steps
        # the gradients hold the sum over micro-steps: average them inside the update
        norm = tr.gpt2_calculate_grad_norm(model) / grad_accum_steps
        scale = grad_clip_scale(norm, tr.GRAD_CLIP) / grad_accum_steps
        lr = get_lr(step, args["k"], args["l"], args["u"], num_steps, args["q"])
        tr.gpt2_update(model, lr, tr.BETA1, tr.BETA2, tr.ADAM_EPS, args["c"], step + 1, grad_scale=scale)
        ms = timer.stop()
        PROFILE_ACTIVE[0] = False
        step_times.append(ms)
        print(f"step {step + 1:4d}/{num_steps}: train loss {train_loss:f} ({ms:.2f} ms, {total_batch / (ms / 1e3):.0f} tok/s)"
              f" norm {norm:.4f} lr {lr:.2e}")
        logger.log_train(step + 1, train_loss)

    if step_times:
        tail = step_times[1:] or step_times
        print(f"mean step time (excluding the first): {sum(tail) / len(tail):.2f} ms")
    if args.get("profile") and step_times:
        print(profile_report(max(1, len(step_times) - 1)))
    if args["o"]:
        path = os.path.join(args["o"], f"model_{num_steps:08d}.bin")
        write_model_file(path, model.config, tr.to_numpy(model.params_memory))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
