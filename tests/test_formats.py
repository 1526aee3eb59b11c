"""llm.c's file formats (train_gpt2.py): byte-exact round trips, sizes, bf16 rounding, and the
one-line errors every reader gives on a bad, foreign or truncated file."""

import os

import numpy as np
import pytest
import torch

from llmc import formats, utils
from llmc.model import GPT2Config, num_parameters, padded_vocab, param_shapes
from conftest import file_size_as_read, required_size

TINY = GPT2Config(max_seq_len=8, vocab_size=13, num_layers=2, num_heads=2, channels=4,
                  padded_vocab_size=padded_vocab(13))
D12 = GPT2Config(max_seq_len=1024, vocab_size=50257, num_layers=12, num_heads=12, channels=768,
                 padded_vocab_size=padded_vocab(50257))


def tiny_params(seed=0):
    return np.random.default_rng(seed).standard_normal(num_parameters(TINY)).astype(np.float32)


# ----------------------------------------------------------------------------
# sizes


def header_only_file(path, ints):
    """A file that is nothing but a 256-int32 header beginning with `ints` (the rest zero), written
    here without llmc.formats."""
    header = np.zeros(256, dtype="<i4")
    header[:len(ints)] = ints
    header.tofile(path)
    return str(path)


def test_d12_sizes(tmp_path):
    """llm.c's published sizes for GPT-2 124M (d12), asked of the readers' own size checks: a header
    alone is refused with the size its fields call for (nothing of 500 MB is allocated)."""
    assert D12.padded_vocab_size == 50304
    assert num_parameters(D12) == 124_475_904
    d12 = [1024, 50257, 12, 12, 768, 50304]  # maxT, V, L, NH, C, Vp
    fp32 = header_only_file(tmp_path / "fp32.bin", [20240326, 3] + d12)
    bf16 = header_only_file(tmp_path / "bf16.bin", [20240326, 5] + d12)
    state = header_only_file(tmp_path / "state.bin", [20240327, 2, 4, 64])  # B=4, T=64
    assert required_size(formats.read_model_file, fp32) == 497_904_640   # gpt2_124M.bin / gpt2_d12.bin
    assert required_size(formats.read_model_file, bf16) == 248_952_832   # gpt2_124M_bf16.bin
    assert required_size(lambda p: formats.read_debug_state(p, D12), state) == 549_369_860  # gpt2_124M_debug_state.bin


def test_param_shapes_order_and_padding():
    names = [name for name, _ in param_shapes(D12)]
    assert names == ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                     "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb"]
    shapes = dict(param_shapes(D12))
    assert shapes["wte"] == (50304, 768) and shapes["qkvw"] == (12, 2304, 768) and shapes["fcprojw"] == (12, 768, 3072)
    assert [padded_vocab(v) for v in (1, 128, 129, 50257)] == [128, 128, 256, 50304]


# ----------------------------------------------------------------------------
# round trips: write, read back, write again -> identical bytes


def test_model_file_fp32_roundtrip(tmp_path):
    p = tiny_params()
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    formats.write_model_file(str(a), TINY, p)
    assert os.path.getsize(a) == file_size_as_read(formats.read_model_file, a, tmp_path)
    header = np.fromfile(a, dtype="<i4", count=256)
    assert header[:8].tolist() == [20240326, 3, 8, 13, 2, 2, 4, 128] and not header[8:].any()
    config, q = formats.read_model_file(str(a))
    assert config == TINY and q.dtype == np.float32 and np.array_equal(p, q)
    formats.write_model_file(str(b), config, q)
    assert a.read_bytes() == b.read_bytes()
    out = np.empty_like(p)  # reading into a caller's buffer
    formats.read_model_file(str(a), out=out)
    assert np.array_equal(out, p)


def test_model_file_bf16_matches_torch(tmp_path):
    p = tiny_params(1) * np.float32(3.7)
    p[:6] = [0.0, -0.0, 1.00390625, 1.01171875, np.float32(3.3895314e38), -1e-40]  # ties and extremes
    path = tmp_path / "m_bf16.bin"
    formats.write_model_file(str(path), TINY, p, dtype="bfloat16")
    assert os.path.getsize(path) == file_size_as_read(formats.read_model_file, path, tmp_path)
    assert np.fromfile(path, dtype="<i4", count=2).tolist() == [20240326, 5]
    bits = np.fromfile(path, dtype="<u2", offset=1024)
    torch_bits = torch.from_numpy(p).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits, torch_bits)
    config, q = formats.read_model_file(str(path))  # widened back to fp32: torch's bf16 -> fp32
    assert config == TINY
    assert np.array_equal(q, torch.from_numpy(p).bfloat16().float().numpy())
    assert np.abs(q - p).max() <= np.abs(p).max() * 2.0**-8


def test_bf16_rounding_random_and_nan():
    x = np.random.default_rng(2).standard_normal(100_000).astype(np.float32) * np.float32(1e3)
    x[:4] = [np.inf, -np.inf, np.nan, 65504.0]
    bits = formats.f32_to_bf16(x)
    ref = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits[3:], ref[3:]) and bits[0] == ref[0] and bits[1] == ref[1]
    assert np.isnan(formats.bf16_to_f32(bits[2:3]))[0]


def test_debug_state_roundtrip(tmp_path):
    B, T, V = 2, 3, TINY.vocab_size
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, V, (B, T)).astype(np.int32), rng.integers(0, V, (B, T)).astype(np.int32)
    logits = rng.standard_normal((B, T, V)).astype(np.float32)
    grads = tiny_params(4)
    losses = np.array([2.5, 2.25, 2.0], dtype=np.float32)
    opt = dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    formats.write_debug_state(str(a), x, y, logits, 2.75, grads, losses, opt)
    assert os.path.getsize(a) == file_size_as_read(lambda p: formats.read_debug_state(p, TINY), a, tmp_path)
    s = formats.read_debug_state(str(a), TINY)
    assert np.array_equal(s.x, x) and np.array_equal(s.y, y) and np.array_equal(s.logits, logits)
    assert s.loss == 2.75 and np.array_equal(s.grads, grads)
    assert np.array_equal(s.losses, losses) and s.optimizer == opt
    formats.write_debug_state(str(b), s.x, s.y, s.logits, s.loss, s.grads, s.losses, s.optimizer)
    assert a.read_bytes() == b.read_bytes()
    # without recorded steps the header is llm.c's exactly: only magic, version, B, T
    formats.write_debug_state(str(b), x, y, logits, 2.75, grads)
    header = np.fromfile(b, dtype="<i4", count=256)
    assert header[:4].tolist() == [20240327, 2, B, T] and not header[4:].any()
    s = formats.read_debug_state(str(b), TINY)
    assert s.losses.size == 0 and s.optimizer == {}


def test_tokenizer_roundtrip_tiktoken(tmp_path):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    tokens = [enc.decode_bytes([i]) for i in range(enc.max_token_value + 1)]
    a, b = tmp_path / "tok.bin", tmp_path / "tok2.bin"
    formats.write_tokenizer_file(str(a), tokens, enc.eot_token)
    assert np.fromfile(a, dtype="<i4", count=4).tolist() == [20240328, 2, 50257, 50256]
    assert os.path.getsize(a) == file_size_as_read(formats.read_tokenizer_file, a, tmp_path)
    got, eot = formats.read_tokenizer_file(str(a))
    assert eot == 50256 and got == tokens
    assert got[50256] == b"<|endoftext|>"
    ids = enc.encode("Hello world, \u00e9t\u00e9 \U0001F600!")
    assert b"".join(got[i] for i in ids).decode("utf-8") == "Hello world, \u00e9t\u00e9 \U0001F600!"
    formats.write_tokenizer_file(str(b), got, eot)
    assert a.read_bytes() == b.read_bytes()


def test_data_shard_roundtrip(tmp_path):
    tokens = np.random.default_rng(5).integers(0, 50257, size=1001)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    formats.write_data_shard(str(a), tokens)
    assert os.path.getsize(a) == file_size_as_read(formats.read_data_shard, a, tmp_path)
    assert np.fromfile(a, dtype="<i4", count=3).tolist() == [20240520, 1, 1001]
    got = formats.read_data_shard(str(a))
    assert got.dtype == np.uint16 and np.array_equal(got, tokens)
    formats.write_data_shard(str(b), np.asarray(got))
    assert a.read_bytes() == b.read_bytes()
    # several parts: the same bytes as their concatenation, an empty part included
    c = tmp_path / "c.bin"
    formats.write_data_shard(str(c), tokens[:300], tokens[300:300], tokens[300:].astype(np.uint16))
    assert a.read_bytes() == c.read_bytes()
    with pytest.raises(AssertionError):  # every part is range-checked
        formats.write_data_shard(str(c), tokens[:3], np.array([2**16]))


# ----------------------------------------------------------------------------
# errors: every reader, bad magic / bad version / truncated / missing -> one line naming file and fix


def _write_all(tmp_path):
    """One good file of each kind; returns {kind: (path, reader)}."""
    paths = {k: str(tmp_path / f"{k}.bin") for k in ("model", "state", "tokenizer", "data")}
    formats.write_model_file(paths["model"], TINY, tiny_params())
    z = np.zeros((1, 2), dtype=np.int32)
    formats.write_debug_state(paths["state"], z, z, np.zeros((1, 2, 13), np.float32), 1.0, tiny_params())
    formats.write_tokenizer_file(paths["tokenizer"], [b"a", b"bc", b"def"], 2)
    formats.write_data_shard(paths["data"], np.arange(10))
    readers = {"model": formats.read_model_file, "state": lambda p: formats.read_debug_state(p, TINY),
               "tokenizer": formats.read_tokenizer_file, "data": formats.read_data_shard}
    return {k: (paths[k], readers[k]) for k in paths}


FIX = {"model": "train_gpt2_torch.py", "state": "train_gpt2_torch.py", "tokenizer": "train_gpt2_torch.py",
       "data": "prepro_tinyshakespeare.py"}
KINDS = ["model", "state", "tokenizer", "data"]


def _check_one_line(err, path, kind, *words):
    msg = str(err)
    assert "\n" not in msg
    assert path in msg and FIX[kind] in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("offset,value,message", [(0, 1234, "bad magic 1234"), (4, 99, "version 99")])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_header(tmp_path, kind, offset, value, message):
    """A wrong magic (header[0]) or version (header[1]): one line naming the file and the fix."""
    path, reader = _write_all(tmp_path)[kind]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([value], dtype="<i4").tobytes())
    with pytest.raises(utils.FormatError) as e:
        reader(path)
    _check_one_line(e.value, path, kind, message)


@pytest.mark.parametrize("kind", KINDS)
def test_truncated(tmp_path, kind):
    path, reader = _write_all(tmp_path)[kind]
    size = os.path.getsize(path)
    os.truncate(path, size - 1)
    with pytest.raises(utils.FormatError) as e:
        reader(path)
    _check_one_line(e.value, path, kind)
    os.truncate(path, 100)  # not even a header
    with pytest.raises(utils.FormatError) as e:
        reader(path)
    _check_one_line(e.value, path, kind, "100 bytes")


@pytest.mark.parametrize("kind", ["model", "state", "data"])
def test_too_long(tmp_path, kind):
    path, reader = _write_all(tmp_path)[kind]
    with open(path, "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(utils.FormatError) as e:
        reader(path)
    _check_one_line(e.value, path, kind, str(os.path.getsize(path)))


@pytest.mark.parametrize("kind", KINDS)
def test_missing(tmp_path, kind):
    path = str(tmp_path / "nothing.bin")
    reader = _write_all(tmp_path)[kind][1]
    with pytest.raises(FileNotFoundError) as e:
        reader(path)
    _check_one_line(e.value, path, kind)


def test_state_for_another_model(tmp_path):
    path, _ = _write_all(tmp_path)["state"]
    other = GPT2Config(8, 13, 3, 2, 4, 128)  # one more layer: the sizes cannot match
    with pytest.raises(utils.FormatError) as e:
        formats.read_debug_state(path, other)
    _check_one_line(e.value, path, "state")


# ----------------------------------------------------------------------------
# atomic writes


def test_write_atomic_failure_leaves_nothing(tmp_path):
    path = tmp_path / "half.bin"

    def chunks():
        yield np.zeros(1000, dtype=np.float32)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        utils.write_atomic(str(path), chunks())
    assert os.listdir(tmp_path) == []


def test_write_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "m.bin"
    formats.write_model_file(str(path), TINY, tiny_params())
    before = path.read_bytes()

    def chunks():
        yield np.ones(10, dtype=np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        utils.write_atomic(str(path), chunks())
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.bin"]
