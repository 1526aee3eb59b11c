"""train_gpt2.py's command line: llm.c's flags, the errors a user can make, and a tiny run."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
import train_gpt2 as m  # noqa: E402

TINY = m.GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=1, num_heads=2, channels=32, padded_vocab_size=50304)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory with a tiny checkpoint and tiny train/val shards."""
    r = np.random.default_rng(0)
    params = (r.standard_normal(m.num_parameters(TINY)) * 0.02).astype(np.float32)
    model = m.GPT2(TINY, params)
    model.params.wte[TINY.vocab_size:] = 0
    model.params.ln1w[...] = model.params.ln2w[...] = model.params.lnfw[...] = 1
    m.write_model_file(str(tmp_path / "tiny.bin"), TINY, params)
    # a repetitive text, so the loss can fall in a few steps
    text = np.tile(r.integers(0, 50257, size=40), 20)
    m.write_data_shard(str(tmp_path / "train.bin"), text)
    m.write_data_shard(str(tmp_path / "val.bin"), text[:300])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_main(argv, capsys):
    try:
        m.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


BASE = ["-e", "tiny.bin", "-i", "train.bin", "-j", "val.bin", "-b", "2", "-t", "16"]


def test_tiny_run_logs_samples_and_checkpoint(workdir, capsys):
    code, out, err = run_main(BASE + ["-x", "4", "-v", "2", "-m", "2", "-s", "4", "-g", "6", "-l", "3e-3",
                                      "-o", "log"], capsys)
    assert code == 0, err
    for line in ("[GPT-2]", "max_seq_len: 32", "vocab_size: 50257", "padded_vocab_size: 50304", "num_layers: 1",
                 "num_heads: 2", "channels: 32", f"num_parameters: {m.num_parameters(TINY)}", "OpenBLAS core"):
        assert line in out, line
    steps = [l for l in out.splitlines() if l.startswith("step ")]
    assert len(steps) == 4 and steps[0].startswith("step    1/4: train loss ") and " ms, " in steps[0]
    losses = [float(l.split("train loss ")[1].split()[0]) for l in steps]
    assert losses[-1] < losses[0]
    assert out.count("val loss ") == 3                          # steps 0, 2 and the last
    assert "generating:\n---\n" in out and "WARNING: failed to read the tokenizer" in out
    sample = out.split("generating:\n---\n")[1].split("\n---")[0].split()
    assert len(sample) == 5 and all(0 <= int(t) < 50257 for t in sample)   # 5 ids (no tokenizer file)
    log = open("log/main.log").read().splitlines()
    assert log[0].startswith("s:0 tel:") and log[1].startswith("s:1 trl:") and log[-1].startswith("s:4 tel:")
    assert float(log[1].split("trl:")[1]) == pytest.approx(losses[0], abs=1e-6)
    config, params = m.read_model_file("log/model_00000004.bin")
    assert config == TINY and np.isfinite(params).all()


def test_overfit_single_batch_and_accumulation(workdir, capsys):
    code, out, err = run_main(BASE + ["-x", "6", "-a", "1", "-v", "0", "-s", "0", "-l", "1e-2"], capsys)
    assert code == 0, err
    losses = [float(l.split("train loss ")[1].split()[0]) for l in out.splitlines() if l.startswith("step ")]
    assert losses[-1] < losses[0] - 1.5 and all(b < a for a, b in zip(losses, losses[1:]))
    code, out, err = run_main(BASE + ["-x", "1", "-d", "64", "-v", "0", "-s", "0"], capsys)
    assert code == 0 and "total 64 tokens = 2 micro-step(s)" in out


@pytest.mark.parametrize("argv,message", [
    (["-z", "1"], "unknown flag -z"),
    (["-b"], "flag -b has no value"),
    (["-b", "four"], "flag -b needs a int, got 'four'"),
    (["x", "1"], "unknown flag x"),
    (["--b", "2"], "unknown flag --b"),
])
def test_bad_flags_print_usage(argv, message, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 1 and f"error: {message}" in err and "Usage:" in err and "-x" in err


def test_help_prints_usage_and_succeeds(capsys):
    code, out, err = run_main(["-h"], capsys)
    assert code == 0 and "Usage:" in out and "-e " in out and err == ""


@pytest.mark.parametrize("extra,message", [
    (["-t", "33"], "error: sequence length -t 33 exceeds the model's max_seq_len 32"),
    (["-j", "small.bin"], "small.bin: 20 tokens, fewer than the 33 one batch needs (B=2, T=16)"),
    (["-d", "50"], "-d 50 is not a multiple of B*T = 32"),
    (["-k", "cosin"], "unknown learning rate schedule 'cosin'"),
    (["-e", "d7"], "unknown model 'd7'"),
    (["-i", "missing_*.bin"], "no data files match 'missing_*.bin'"),
])
def test_one_line_errors(workdir, extra, message, capsys):
    m.write_data_shard("small.bin", np.arange(20))
    code, out, err = run_main(BASE + extra, capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_default_checkpoint_and_fallback(workdir, capsys):
    args = ["-i", "train.bin", "-j", "val.bin", "-b", "2", "-t", "16", "-x", "1", "-v", "0", "-s", "0"]
    code, out, err = run_main(args, capsys)
    assert code == 1 and "gpt2_124M.bin: no such file" in err
    os.rename("tiny.bin", "gpt2_d12.bin")
    code, out, err = run_main(args, capsys)
    assert code == 0 and "gpt2_124M.bin not found: using gpt2_d12.bin" in out


def test_profile_flag_prints_per_layer_table(workdir):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py")] + BASE +
                         ["-x", "2", "-v", "0", "-s", "0", "--profile", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    table = res.stdout.split("profile (ms per step)")[1]
    for key in ("matmul_forward 32->50304", "matmul_backward 32->50304", "attention_backward", "gpt2_update",
                "layernorm_forward", "gelu_backward", "total"):
        assert key in table, key
