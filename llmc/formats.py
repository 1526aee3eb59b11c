"""llm.c's four .bin files, byte for byte: model weights, the debug state, the tokenizer, data shards.

Every file starts with a header of 256 little-endian int32. Readers check the magic, the version
and that the file holds exactly the bytes the header promises; a mismatch is one line that names
the file, what was found, what was expected, and what to run. Writers go through a temporary name.

    file          magic     version       header                                   body
    model         20240326  3 fp32, 5 bf16 [2] maxT [3] V [4] L [5] NH [6] C [7] Vp  16 tensors, wte padded to Vp rows
    debug state   20240327  2             [2] B [3] T                              x, y, logits (B,T,V), loss, 16 grads
    tokenizer     20240328  2             [2] tokens [3] EOT id                    per token: uint8 length, bytes
    data shard    20240520  1             [2] tokens                               uint16 tokens
"""

import os
from dataclasses import dataclass

import numpy as np

from llmc.model import GPT2Config, num_parameters, param_shapes
from llmc.utils import FormatError, write_atomic

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


KINDS = {MODEL_MAGIC: "an llm.c model file", STATE_MAGIC: "an llm.c debug state", TOKENIZER_MAGIC: "an llm.c tokenizer file",
         DATA_MAGIC: "an llm.c data shard"}
TEXT_TO_SHARDS = "python dev/data/prepro_text.py"   # a text file where a data shard was expected


def _error(kind, problem, advice):
    """The one-line error: `problem; advice`. The problem alone is kept on the exception (e.problem),
    so a caller that knows better advice for its case (a checkpoint's model file) can give that instead."""
    e = kind(f"{problem}; {advice}")
    e.problem = problem
    return e


def _fail(path, found, expected, magic, advice=None):
    raise _error(FormatError, f"{path}: {found} (expected {expected})", advice or f"re-run {WRITERS[magic]}")


def looks_like_text(head):
    """Bytes that decode as UTF-8 (but for a character cut at the end) with no control characters but
    whitespace: a text file."""
    text = head.decode("utf-8", errors="replace")
    text = text[:-3] + text[-3:].rstrip("\ufffd")
    return bool(text) and "\ufffd" not in text and all(c.isprintable() or c.isspace() for c in text)


def read_header(path, magic, versions):
    """Open `path`, check magic and version, return (header int32[256], file size in bytes)."""
    if os.path.isdir(path):
        advice = f'give the shards in it as a glob, such as "{os.path.join(path, "*train*.bin")}"' \
            if magic == DATA_MAGIC else "give the path of the file"
        raise _error(FormatError, f"{path}: a directory, not {KINDS[magic]}", advice)
    if not os.path.exists(path):
        raise _error(FileNotFoundError, f"{path}: no such file", f"create it with {WRITERS[magic]}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if magic == DATA_MAGIC and head[:4] != np.int32(DATA_MAGIC).tobytes() and looks_like_text(head):
        raise _error(FormatError, f"{path}: a text file, not {KINDS[DATA_MAGIC]}",
                     f"tokenize it into shards with {TEXT_TO_SHARDS} {path}")
    if size < HEADER_BYTES:
        _fail(path, f"only {size} bytes", f"a {HEADER_BYTES}-byte header", magic)
    header = np.frombuffer(head, dtype="<i4").copy()
    if header[0] != magic:
        _fail(path, f"bad magic {header[0]}", magic, magic)
    if header[1] not in versions:
        _fail(path, f"unsupported version {header[1]}", " or ".join(map(str, versions)), magic)
    return header, size


def check_size(path, size, expected, magic):
    if size != expected:
        _fail(path, f"{size} bytes", f"{expected} bytes as its header says", magic)


def new_header(magic, version):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1] = magic, version
    return header


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
    if config.channels % config.num_heads:
        _fail(path, f"{config.num_heads} heads do not divide the {config.channels} channels",
              "NH dividing C: the head size is C / NH", MODEL_MAGIC)
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
    bad = nonfinite_report(config, params)
    if bad:
        raise _error(FormatError, f"{path}: {bad}: written by a run that diverged",
                     f"load an earlier checkpoint, or re-export the model with {WRITERS[MODEL_MAGIC]}")
    return config, params


def nonfinite_report(config, params, chunk=1 << 22):
    """None when every parameter is finite, else "N non-finite weights (NaN or inf), the first in <tensor>".
    In chunks: no temporary the size of the model."""
    count, first = 0, None
    for start in range(0, params.size, chunk):
        part = params[start:start + chunk]
        finite = np.isfinite(part)
        if not finite.all():
            count += part.size - int(np.count_nonzero(finite))
            if first is None:
                first = start + int(np.argmin(finite))
    if first is None:
        return None
    for name, shape in param_shapes(config):
        size = int(np.prod(shape))
        if first < size:
            break
        first -= size
    return f"{count:,} non-finite weights (NaN or inf), the first in {name}"


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
