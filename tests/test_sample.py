"""dev/sample.py: the KV-cached forward against train_gpt2.gpt2_forward, the sampler against the trainer's
generate() loop, temperature and top-k, bf16 files, and the command line's messages. Tiny seeded models
(V=101 padded to 128, maxT=32), prompts as token ids."""

import os
import sys

import numpy as np
import pytest

from conftest import run_main, run_script, write_tiny_model

import sample
import train_gpt2 as tg
from llmc import formats
from llmc.model import GPT2Config
from llmc.sampler import random_f32, sample_mult

CONFIG = GPT2Config(max_seq_len=32, vocab_size=101, num_layers=2, num_heads=4, channels=32,
                    padded_vocab_size=128)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "tiny.bin"
    write_tiny_model(path, CONFIG, np.random.default_rng(0), 0.2)
    return str(path)


def load(path):
    return tg.GPT2(*formats.read_model_file(path))


def test_cached_logits_equal_full_forward_at_every_position(model_file):
    """Prefill 5 positions, then a chunk of 3, then one at a time up to maxT: each call's logits equal the
    uncached forward's over the whole sequence (B=2, every position, all Vp columns)."""
    model = load(model_file)
    B, T = 2, CONFIG.max_seq_len
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, size=(B, T)).astype(np.int32)
    tg.gpt2_forward(model, tokens, None, B, T)
    full = model.acts.logits.copy()                                  # (B, T, Vp)
    cache = sample.KVCache(CONFIG, B)
    cuts = [0, 5, 8] + list(range(9, T + 1))
    pieces = [sample.gpt2_forward_cached(model, cache, tokens[:, a:b]) for a, b in zip(cuts, cuts[1:])]
    cached = np.concatenate(pieces, axis=1)
    assert cache.pos == T and cached.shape == full.shape and cached.dtype == np.float32
    err = np.abs(cached - full).max(axis=(0, 2))                     # per position
    print("max |cached - full| per position:", err)
    assert err.max() < 1e-5
    assert np.abs(full).max() > 0.1                                  # the logits are not all ~0
    with pytest.raises(sample.ConfigError, match="past the model's context"):
        sample.gpt2_forward_cached(model, cache, tokens[:, :1])


def test_the_gpu_path_equals_the_cpu_path(model_file):
    """--device cuda's forward (gpt2_forward_cached_xp, written for any array module) run with NumPy as the
    module: the same logits as the CPU path's at every position within 1e-5, and the same sampled tokens."""
    model = load(model_file)
    B, T = 2, CONFIG.max_seq_len
    tokens = np.random.default_rng(2).integers(0, CONFIG.vocab_size, size=(B, T)).astype(np.int32)
    device = sample.DeviceModel(model, np)
    cpu_cache, dev_cache = sample.KVCache(CONFIG, B), device.new_cache(B)
    cuts = [0, 6] + list(range(7, T + 1))
    for a, b in zip(cuts, cuts[1:]):
        ours = sample.gpt2_forward_cached_xp(np, device.params, CONFIG, dev_cache, tokens[:, a:b])
        ref = sample.gpt2_forward_cached(model, cpu_cache, tokens[:, a:b])
        assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-5, (a, np.abs(ours - ref).max())
    prompt = [9, 8, 7, 6]
    assert sample.generate(model, prompt, 16, device_model=device)[0] == sample.generate(model, prompt, 16)[0]


def test_device_cuda_without_a_gpu_is_one_line(model_file, tmp_path):
    import importlib.util
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    r = run_script("dev/sample.py", "--model", model_file, "--prompt_ids", "1", "--max_new_tokens", 8, "--device", "cuda",
                   cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--device cuda needs CuPy and an NVIDIA GPU" in r.stderr


def test_greedy_same_tokens_cached_and_uncached(model_file):
    model = load(model_file)
    prompt = [3, 14, 15, 92, 65]
    runs = [sample.generate(model, prompt, 20, temperature=t, top_k=k, kv_cache=c)[0]
            for c in (True, False) for t, k in ((1.0, 1), (0.0, 0))]
    assert runs[0] == runs[1] == runs[2] == runs[3]
    assert len(runs[0]) == 20 and len(set(runs[0])) > 1


def trainer_generate(model, prompt, n, seed):
    """train_gpt2.generate()'s loop with a prompt: the (1, maxT) buffer, next_token_probs, sample_mult."""
    tokens = np.zeros((1, model.config.max_seq_len), dtype=np.int32)
    tokens[0, :len(prompt)] = prompt
    state = [seed]
    for t in range(len(prompt), len(prompt) + n):
        tokens[0, t] = sample_mult(tg.next_token_probs(model, tokens, t), random_f32(state))
    return tokens[0, len(prompt):len(prompt) + n].tolist()


@pytest.mark.parametrize("seed", [1337, 42])
def test_llmc_sampler_draws_what_generate_draws(model_file, seed):
    model = load(model_file)
    prompt = [7, 1, 100, 50]
    expected = trainer_generate(model, prompt, 24, seed)
    got_cached = sample.generate(model, prompt, 24, seed=seed)[0]
    got_uncached = sample.generate(model, prompt, 24, seed=seed, kv_cache=False)[0]
    print("trainer:", expected, "\ncached: ", got_cached)
    assert got_cached == expected == got_uncached
    assert len(set(expected)) > 5                  # really sampled, not one token over and over


def test_probs_match_the_trainers_softmax(model_file):
    """temperature 1, no top-k: the probabilities are train_gpt2.softmax_forward's, bit for bit."""
    model = load(model_file)
    ctx = np.array([[5, 6, 7, 8]], dtype=np.int32)
    tg.gpt2_forward(model, ctx, None, 1, 4)
    ours = sample.next_token_probs(model.acts.logits[0, -1, :CONFIG.vocab_size])
    np.testing.assert_array_equal(ours, model.acts.probs[0, -1, :CONFIG.vocab_size])


def test_temperature_and_top_k_math():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(101) * 3).astype(np.float32)
    for temperature in (0.5, 1.0, 2.0):
        z = logits.astype(np.float64) / temperature
        want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        got = sample.next_token_probs(logits, temperature)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # top-k: exactly the k largest keep probability, renormalized among themselves
    got = sample.next_token_probs(logits, 1.0, top_k=5)
    top5 = np.argsort(logits)[-5:]
    assert set(np.flatnonzero(got)) == set(top5.tolist())
    z = logits[top5].astype(np.float64)
    np.testing.assert_allclose(got[top5], np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rtol=1e-5)
    # top_k=1 is the argmax whatever the coin; temperature 0 is greedy; top_k >= V keeps everything
    for seed in range(1, 20):
        assert sample.sample_token(logits, 1.0, 1, [seed]) == int(np.argmax(logits))
    assert sample.sample_token(logits, 0.0, 0, [1]) == int(np.argmax(logits))
    np.testing.assert_array_equal(sample.next_token_probs(logits, 1.0, top_k=101), sample.next_token_probs(logits))
    # a low temperature sharpens: the top token's probability grows
    assert sample.next_token_probs(logits, 0.5).max() > sample.next_token_probs(logits, 2.0).max()


def generated_ids(stdout):
    """The ids the command line printed between its two '---' lines."""
    block = stdout.split("---\n")[1]
    return [int(s) for s in block.split()]


def test_bf16_file_loads_and_samples(model_file, tmp_path):
    config, params = formats.read_model_file(model_file)
    bf16 = str(tmp_path / "tiny_bf16.bin")
    formats.write_model_file(bf16, config, params, dtype="bfloat16")
    config16, params16 = formats.read_model_file(bf16)
    assert config16 == config
    np.testing.assert_array_equal(params16, formats.bf16_to_f32(formats.f32_to_bf16(params)))
    r = run_script("dev/sample.py", "--model", bf16, "--prompt_ids", "1,2,3", "--max_new_tokens", 10, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = sample.generate(tg.GPT2(config16, params16), [1, 2, 3], 10)[0]
    assert generated_ids(r.stdout) == [1, 2, 3] + expected
    assert "tokens/s" in r.stdout


def test_too_long_prompt_keeps_the_last_tokens(model_file, tmp_path):
    prompt = list(range(1, 41))                                       # 40 tokens, maxT 32
    r = run_script("dev/sample.py", "--model", model_file, "--prompt_ids", ",".join(map(str, prompt)),
                   "--max_new_tokens", 8, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "the prompt has 40 tokens and the context 32 with 8 to generate: keeping its last 24 tokens" in r.stdout
    ids = generated_ids(r.stdout)
    assert ids[:24] == prompt[-24:] and len(ids) == 32
    assert ids[24:] == sample.generate(load(model_file), prompt[-24:], 8)[0]


@pytest.mark.parametrize("args, message", [
    (["--max_new_tokens", 32], "leaves no room for a prompt in the model's context of 32 tokens"),
    (["--prompt", "hello"], "has a vocabulary of 101 tokens, not GPT-2's 50257: give --prompt_ids"),
    (["--prompt_ids", "5,101"], "--prompt_ids must lie in [0, 101)"),
    (["--top_k", -1], "--top_k must be >= 0"),
    (["--seed", 0], "--seed must be in [1, 2^64)"),
])
def test_bad_arguments_one_line(model_file, tmp_path, args, message):
    r = run_script("dev/sample.py", "--model", model_file, *args, cwd=tmp_path)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_truncated_model_file_one_line(model_file, tmp_path):
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(open(model_file, "rb").read()[:-100])
    r = run_script("dev/sample.py", "--model", str(bad), "--prompt_ids", "1", cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "truncated.bin" in r.stderr and "expected" in r.stderr


def test_prompt_ids_decode_with_the_tokenizer_file_without_tiktoken(tmp_path, monkeypatch, capsys):
    """A model with GPT-2's vocabulary (V=50257) and --prompt_ids, tiktoken unimportable: the tokens are
    decoded with llm.c's tokenizer file (here a made-up one, token i spelled "<i>"), from --tokenizer or
    gpt2_tokenizer.bin in the working folder; with neither, the ids are printed. tiktoken is never imported."""
    config = GPT2Config(max_seq_len=16, vocab_size=50257, num_layers=1, num_heads=2, channels=16,
                        padded_vocab_size=50304)
    model_path = tmp_path / "gpt2_vocab.bin"
    write_tiny_model(model_path, config, np.random.default_rng(3), 0.5)
    tokenizer = tmp_path / "spelled.bin"
    formats.write_tokenizer_file(str(tokenizer), [f"<{i}>".encode() for i in range(50257)], 50256)
    expected = [7, 8, 9] + sample.generate(load(str(model_path)), [7, 8, 9], 8)[0]
    monkeypatch.setitem(sys.modules, "tiktoken", None)                 # `import tiktoken` raises ImportError
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(model_path), "--prompt_ids", "7,8,9", "--max_new_tokens", "8"]

    def sampled(extra):
        code, out, err = run_main(args + extra, capsys, sample)
        assert code == 0, err
        return out.split("---\n")[1].strip(), out

    text, _ = sampled(["--tokenizer", str(tokenizer)])
    assert text == "".join(f"<{i}>" for i in expected)
    os.rename(tokenizer, tmp_path / "gpt2_tokenizer.bin")             # the default: in the working folder
    assert sampled([])[0] == text
    os.remove(tmp_path / "gpt2_tokenizer.bin")                        # neither: the ids, and a note why
    ids, out = sampled([])
    assert [int(s) for s in ids.split()] == expected
    assert "note: --tokenizer gpt2_tokenizer.bin: cannot read it (gpt2_tokenizer.bin: no such file" in out
    assert sys.modules["tiktoken"] is None
    code, out, err = run_main(["--model", str(model_path), "--prompt", "Hello"], capsys, sample)
    assert code == 1 and err.strip() == ("error: --prompt needs tiktoken (pip install tiktoken); or give the "
                                         "prompt as --prompt_ids, decoded with gpt2_tokenizer.bin")
