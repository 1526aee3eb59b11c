"""train_gpt2_torch.py, the PyTorch reference: the files it writes (exact sizes, weights from
before any update, gradients a fresh autograd reproduces), llm.c's init, the HF weight mapping,
the learning-rate schedule, and its one-line errors."""

import os
import re
import sys

import numpy as np
import pytest
import torch

from llmc import formats, schedulers
from llmc.model import GPT2Config, num_parameters, padded_vocab, param_shapes
import train_gpt2_torch as tt
from conftest import TINY_SHAPE, file_size_as_read, run_script

TINY = tt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257)


def tiny_llmc(vocab_size=50257):
    return GPT2Config(max_seq_len=32, vocab_size=vocab_size, num_layers=2, num_heads=2, channels=32,
                      padded_vocab_size=padded_vocab(vocab_size))


# ----------------------------------------------------------------------------
# the exported files


def test_export_files_and_sizes(tiny_export, tmp_path):
    e = tiny_export
    # the files' parameter count: torch's own (wte counted once, tied to lm_head) plus wte's 47 pad rows
    n = num_parameters(tiny_llmc())
    assert n == sum(p.numel() for p in tt.GPT(TINY).parameters()) + (50304 - 50257) * 32
    # each file is exactly as long as the reader's size check asks, and reads back whole
    config, flat = formats.read_model_file(e.model)
    assert flat.size == n and formats.read_model_file(e.model_bf16)[1].size == n
    for path, reader in ((e.model, formats.read_model_file), (e.model_bf16, formats.read_model_file),
                         (e.state, lambda p: formats.read_debug_state(p, config))):
        assert os.path.getsize(path) == file_size_as_read(reader, path, tmp_path), path
    s = formats.read_debug_state(e.state, config)
    assert s.x.shape == (e.B, e.T) and s.logits.shape == (e.B, e.T, 50257) and s.grads.size == n
    tokens, eot = formats.read_tokenizer_file(e.tokenizer)
    assert len(tokens) == 50257 and eot == 50256 and tokens[50256] == b"<|endoftext|>"
    assert tokens[15496] == b"Hello"
    for path in (e.model, e.model_bf16, e.state, e.tokenizer):
        assert f"wrote {os.path.basename(path)}" in e.stdout


def test_export_weights_are_the_initial_ones(tiny_export):
    """gpt2_<size>.bin holds the weights as initialised (llm.c's seeded init), not the trained ones;
    the bf16 file is the same weights rounded as torch rounds them."""
    config, flat = formats.read_model_file(tiny_export.model)
    assert config == tiny_llmc()
    model = tt.GPT(TINY)
    assert np.array_equal(flat, tt.flat_tensors(model))
    config16, flat16 = formats.read_model_file(tiny_export.model_bf16)
    assert config16 == config
    assert np.array_equal(flat16, torch.from_numpy(flat).bfloat16().float().numpy())
    wte = flat[:50304 * 32].reshape(50304, 32)
    assert np.array_equal(wte[:50257], model.transformer.wte.weight.detach().numpy())
    assert not wte[50257:].any()  # padding rows


def test_debug_state_matches_fresh_autograd(tiny_export, tiny_data):
    """x, y are the first B*T+1 tokens of the data; logits, loss and all 16 gradients are what a fresh
    torch autograd of the exported weights gives, each gradient checked by name against the torch module."""
    config, _ = formats.read_model_file(tiny_export.model)
    s = formats.read_debug_state(tiny_export.state, config)
    B, T = tiny_export.B, tiny_export.T
    data = np.asarray(formats.read_data_shard(tiny_data)).astype(np.int32)
    assert s.x.shape == (B, T) and s.logits.shape == (B, T, 50257)
    assert np.array_equal(s.x.reshape(-1), data[:B * T])       # the first batch of the file
    assert np.array_equal(s.y.reshape(-1), data[1:B * T + 1])  # shifted by one
    model = tt.model_from_file(tiny_export.model)
    logits, loss = model(torch.from_numpy(s.x).long(), torch.from_numpy(s.y).long())
    loss.backward()
    assert abs(loss.item() - s.loss) < 1e-6
    assert 10.0 < s.loss < 11.5  # ~ln(50257) = 10.82 at init
    np.testing.assert_allclose(s.logits, logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    # by name, straight from the modules (not through the exporter's own flattening)
    h = model.transformer.h
    torch_grads = {
        "wte": [model.transformer.wte.weight.grad], "wpe": [model.transformer.wpe.weight.grad],
        "ln1w": [b.ln_1.weight.grad for b in h], "ln1b": [b.ln_1.bias.grad for b in h],
        "qkvw": [b.attn.c_attn.weight.grad for b in h], "qkvb": [b.attn.c_attn.bias.grad for b in h],
        "attprojw": [b.attn.c_proj.weight.grad for b in h], "attprojb": [b.attn.c_proj.bias.grad for b in h],
        "ln2w": [b.ln_2.weight.grad for b in h], "ln2b": [b.ln_2.bias.grad for b in h],
        "fcw": [b.mlp.c_fc.weight.grad for b in h], "fcb": [b.mlp.c_fc.bias.grad for b in h],
        "fcprojw": [b.mlp.c_proj.weight.grad for b in h], "fcprojb": [b.mlp.c_proj.bias.grad for b in h],
        "lnfw": [model.transformer.ln_f.weight.grad], "lnfb": [model.transformer.ln_f.bias.grad],
    }
    offset = 0
    for name, shape in param_shapes(config):
        n = int(np.prod(shape))
        got = s.grads[offset:offset + n].reshape(shape)
        offset += n
        want = torch.stack(torch_grads[name]).numpy() if len(torch_grads[name]) > 1 else torch_grads[name][0].numpy()
        if name == "wte":
            assert not got[50257:].any(), "wte gradient padding rows must be zero"
            got = got[:50257]
        assert got.shape == want.shape, name
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert offset == s.grads.size
    # wte's gradient has both uses: the embedding rows of x, and the (tied) lm_head over all rows
    unused = np.setdiff1d(np.arange(50257), s.x)
    assert np.abs(s.grads[:50304 * 32].reshape(50304, 32)[unused]).max() > 0


def test_recorded_losses(tiny_export):
    """10 step losses, decreasing on the one batch, equal to the printed ones and to main.log's."""
    config, _ = formats.read_model_file(tiny_export.model)
    s = formats.read_debug_state(tiny_export.state, config)
    assert s.losses.size == tiny_export.steps == 10
    assert s.losses[0] == np.float32(s.loss)  # step 0 trains on the exported batch
    assert np.all(np.diff(s.losses) < 0)
    printed = [float(m) for m in re.findall(r"^step +\d+/10 \| train loss (\S+) \| norm \S+ \| lr 1\.00e-04 \| "
                                             r"\(\S+ ms \| \d+ tok/s\)$", tiny_export.stdout, flags=re.M)]
    assert len(printed) == 10
    np.testing.assert_allclose(s.losses, printed, atol=1e-6)
    log = open(tiny_export.log).read().splitlines()
    assert [line.split(" lr:")[0] for line in log] == [f"s:{i} trl:{s.losses[i]:.4f}" for i in range(10)]
    assert all(re.search(r" lr:0\.000100 norm:\d+\.\d\d$", line) for line in log), log
    assert s.optimizer == dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0)


def test_export_odd_vocab(export_model):
    """A vocabulary that is not a multiple of 128 is padded in the files (V=1000 -> Vp=1024)."""
    e = export_model(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=1000, B=2, T=8, steps=3)
    assert e.size == "L1H2C16T16V1000"
    config, flat = formats.read_model_file(e.model)
    assert (config.vocab_size, config.padded_vocab_size) == (1000, 1024)
    assert not flat[1000 * 16:1024 * 16].any()
    s = formats.read_debug_state(e.state, config)
    assert s.logits.shape == (2, 8, 1000) and s.losses.size == 3
    assert not s.grads[1000 * 16:1024 * 16].any() and np.abs(s.grads[:1000 * 16]).max() > 0
    assert not os.path.exists(e.tokenizer)  # no GPT-2 tokenizer for another vocabulary


# ----------------------------------------------------------------------------
# the model itself


def test_init_is_llmc(tmp_path):
    """normal(0, 0.02), residual projections 0.02/sqrt(2L), zero biases, LayerNorm (1, 0), seeded."""
    config = tt.GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=64, vocab_size=4000)
    a, b = tt.GPT(config), tt.GPT(config)
    torch.manual_seed(123)  # the init has its own generator: the global RNG does not matter
    c = tt.GPT(config)
    flat = tt.flat_tensors(a)
    assert np.array_equal(flat, tt.flat_tensors(b)) and np.array_equal(flat, tt.flat_tensors(c))
    h = a.transformer.h
    std = lambda ts: torch.cat([t.detach().reshape(-1) for t in ts]).std().item()  # noqa: E731
    assert abs(std([a.transformer.wte.weight]) - 0.02) < 0.0005
    assert abs(std([a.transformer.wpe.weight]) - 0.02) < 0.001
    assert abs(std([blk.attn.c_attn.weight for blk in h]) - 0.02) < 0.0005
    assert abs(std([blk.mlp.c_fc.weight for blk in h]) - 0.02) < 0.0005
    for w in ([blk.attn.c_proj.weight for blk in h], [blk.mlp.c_proj.weight for blk in h]):
        assert abs(std(w) - 0.02 / np.sqrt(8)) < 0.0003
    for blk in h:
        for bias in (blk.attn.c_attn.bias, blk.attn.c_proj.bias, blk.mlp.c_fc.bias, blk.mlp.c_proj.bias):
            assert not bias.any()
        assert torch.all(blk.ln_1.weight == 1) and not blk.ln_1.bias.any()
    assert a.lm_head.weight is a.transformer.wte.weight  # tied


def test_flash_matches_manual_attention():
    torch.manual_seed(0)
    manual = tt.GPT(tt.GPTConfig(n_layer=2, n_head=3, n_embd=48, block_size=16, vocab_size=300))
    flash = tt.GPT(tt.GPTConfig(n_layer=2, n_head=3, n_embd=48, block_size=16, vocab_size=300, flash=1))
    x = torch.randint(0, 300, (3, 13))
    y = torch.randint(0, 300, (3, 13))
    lm, loss_m = manual(x, y)
    lf, loss_f = flash(x, y)
    loss_m.backward()
    loss_f.backward()
    np.testing.assert_allclose(lf.detach().numpy(), lm.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(tt.flat_tensors(flash, grads=True), tt.flat_tensors(manual, grads=True),
                               atol=1e-6, rtol=1e-4)


def test_causal():
    """Changing a later token never changes an earlier position's logits."""
    model = tt.GPT(tt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100))
    x = torch.randint(0, 100, (1, 10))
    x2 = x.clone()
    x2[0, 6] = (x[0, 6] + 1) % 100
    a, _ = model(x, x)
    b, _ = model(x2, x2)
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.equal(a[:, 6:], b[:, 6:])


def test_from_pretrained_mapping(tmp_path, monkeypatch):
    """The HF weights (Conv1D, stored (in, out)) land transposed in our nn.Linear's and the
    two models agree on the logits: a tiny random GPT2LMHeadModel saved locally stands in for gpt2."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=1024, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # make the biases and LayerNorms non-trivial too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = str(tmp_path / "tiny-gpt2")
    hf.save_pretrained(path)
    monkeypatch.setitem(tt.PRETRAINED, path, dict(n_layer=2, n_head=2, n_embd=32))
    ours = tt.GPT.from_pretrained(path)
    assert torch.equal(ours.transformer.h[1].attn.c_attn.weight, hf.transformer.h[1].attn.c_attn.weight.t())
    assert torch.equal(ours.transformer.h[0].mlp.c_proj.weight, hf.transformer.h[0].mlp.c_proj.weight.t())
    x = torch.randint(0, 50257, (2, 12))
    logits, _ = ours(x, x)
    with torch.no_grad():
        ref = hf(x).logits
    np.testing.assert_allclose(logits.detach().numpy(), ref.numpy(), atol=2e-5, rtol=1e-5)


def test_get_lr():
    """train_gpt2_torch.py's schedule: schedulers.get_lr's cosine, with its flags' names."""
    def lr(it, learning_rate=1e-3, warmup_iters=0, num_iterations=10, learning_rate_decay_frac=1.0):
        return schedulers.get_lr(it, "cosine", learning_rate, warmup_iters, num_iterations, learning_rate_decay_frac)
    assert [lr(i) for i in range(11)] == [1e-3] * 11  # the default: constant
    assert [lr(i, warmup_iters=4) for i in range(3)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    assert lr(4, warmup_iters=4, learning_rate_decay_frac=0.1) == pytest.approx(1e-3)
    assert lr(7, warmup_iters=4, learning_rate_decay_frac=0.1) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr(10, warmup_iters=4, learning_rate_decay_frac=0.1) == pytest.approx(1e-4)


# ----------------------------------------------------------------------------
# errors: one line, saying what was wrong and what to run


def _error(monkeypatch, tmp_path, *argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        tt.main([str(a) for a in argv])
    msg = str(e.value.code)
    assert "\n" not in msg, msg
    return msg


SMALL = ["--n_layer", 1, "--n_head", 1, "--n_embd", 8, "--block_size", 16, "--device", "cpu"]


def test_error_unknown_model(monkeypatch, tmp_path):
    msg = _error(monkeypatch, tmp_path, "--model", "d13")
    assert msg == ("unknown --model 'd13'; valid: gpt2, gpt2-medium, gpt2-large, gpt2-xl, d6, d12, d24, d36, d48, "
                   "gpt3:c384, gpt3:c768, gpt3:c1024, gpt3:c1536, gpt3:c2048, gpt3:c2560, gpt3:c4096, gpt3:c12288 "
                   "(or explicit --n_layer --n_head --n_embd --block_size)")


def test_error_T_above_block_size(monkeypatch, tmp_path, tiny_data):
    msg = _error(monkeypatch, tmp_path, *SMALL, "--input_bin", tiny_data, "--sequence_length", 17)
    assert msg == "--sequence_length 17 must be between 1 and the model's block size 16"


def test_error_data_too_short(monkeypatch, tmp_path):
    short = str(tmp_path / "short.bin")
    formats.write_data_shard(short, np.arange(64))
    msg = _error(monkeypatch, tmp_path, *SMALL, "--vocab_size", 100, "--input_bin", short,
                 "--batch_size", 4, "--sequence_length", 16)
    assert msg == (f"{short}: 64 tokens, fewer than the 65 one batch needs (B=4, T=16); use smaller "
                   "--batch_size/--sequence_length or more data"), msg


def test_error_missing_data(monkeypatch, tmp_path):
    msg = _error(monkeypatch, tmp_path, *SMALL, "--input_bin", tmp_path / "nope_*.bin", "--sequence_length", 8)
    assert msg == (f"no data files match '{tmp_path / 'nope_*.bin'}'; create them with "
                   "python prepro_tinyshakespeare.py"), msg


def test_error_token_outside_vocab(monkeypatch, tmp_path, tiny_data):
    msg = _error(monkeypatch, tmp_path, *SMALL, "--vocab_size", 100, "--input_bin", tiny_data,
                 "--batch_size", 1, "--sequence_length", 8, "--total_batch_size", 8)
    largest = int(np.max(formats.read_data_shard(tiny_data)))  # the message names the file's largest token
    assert msg == (f"{tiny_data}: token {largest} is outside the model's vocabulary (V=100); use a data file made "
                   "for it or a bigger --vocab_size")


def test_error_total_batch_size(monkeypatch, tmp_path, tiny_data):
    msg = _error(monkeypatch, tmp_path, *SMALL, "--input_bin", tiny_data, "--batch_size", 3,
                 "--sequence_length", 16)
    assert msg == ("--total_batch_size 256 is not a multiple of B*T*processes = 48; pass --total_batch_size 48 "
                   "(or a multiple)")


def test_a_file_of_another_kind_under_an_output_name_is_never_replaced(monkeypatch, tmp_path, tiny_data):
    (tmp_path / "gpt2_L1H1C8T16_debug_state.bin").write_text("my notes")
    msg = _error(monkeypatch, tmp_path, *SMALL, "--input_bin", tiny_data, "--sequence_length", 8)
    assert msg == ("gpt2_L1H1C8T16_debug_state.bin: not an llm.c debug state, so not this program's to replace; "
                   "nothing was written: move it away, or run in another folder"), msg
    assert [f for f in os.listdir(tmp_path) if f.startswith("gpt2_")] == ["gpt2_L1H1C8T16_debug_state.bin"]
    assert (tmp_path / "gpt2_L1H1C8T16_debug_state.bin").read_text() == "my notes"


def test_error_offline_pretrained(tmp_path, tiny_data):
    """--model gpt2 with no network and an empty cache: one line on stderr pointing at --model d12."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "TRANSFORMERS_CACHE": str(tmp_path / "hf" / "hub")}
    r = run_script("train_gpt2_torch.py", "--model", "gpt2", "--input_bin", tiny_data, cwd=tmp_path, env=env,
                   timeout=300)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpt2" in lines[0] and "--model d12" in lines[0], r.stderr[-2000:]
    assert not any(f.startswith("gpt2_") and f != "gpt2_tokenizer.bin" for f in os.listdir(tmp_path))


# ----------------------------------------------------------------------------
# other modes


def test_sample_val_and_inference_only(tmp_path, tiny_data):
    args = ["--input_bin", tiny_data, *[str(a) for kv in TINY_SHAPE.items() for a in (f"--{kv[0]}", kv[1])],
            "--batch_size", 2, "--sequence_length", 16, "--total_batch_size", 32, "--num_iterations", 1,
            "--device", "cpu"]
    r = run_script("train_gpt2_torch.py", *args, "--sample_every", 1, "--inference_only", 1, "--input_val_bin",
                   tiny_data, "--val_loss_every", 1, "--val_max_steps", 3, "--output_dir", "log", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("---------------") == 2 * 2  # a sample at step 0 and at the last step
    train = re.findall(r"^step +1/1 \| train loss (\S+) \| norm 0.0000", r.stdout, flags=re.M)
    val = re.findall(r"^val loss (\S+)$", r.stdout, flags=re.M)
    assert len(train) == 1 and len(val) == 2  # val loss at step 0 and at the last step
    # no update happened, and val reads the same first batches as train: the two agree
    assert abs(float(val[0]) - float(val[1])) < 1e-6 and 10.0 < float(val[0]) < 11.5
    log = open(tmp_path / "log" / "main.log").read().splitlines()
    assert [line.split(":")[1] for line in log] == ["0 tel", "0 trl", "1 tel"]
    # inference only: the tokenizer is written, the model files are not (as llm.c)
    assert sorted(os.listdir(tmp_path)) == ["gpt2_tokenizer.bin", "log"]


@pytest.mark.slow
def test_ddp_cpu(tmp_path, tiny_data):
    """torchrun with 2 CPU processes (gloo): runs and trains; rank 0 writes the files."""
    args = [*[str(a) for kv in TINY_SHAPE.items() for a in (f"--{kv[0]}", kv[1])], "--input_bin", tiny_data,
            "--batch_size", 2, "--sequence_length", 16, "--total_batch_size", 64, "--num_iterations", 3]
    import subprocess
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        tt.__file__, *map(str, args)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(re.findall(r"^step +\d/3 \| train loss", r.stdout, flags=re.M)) == 3
    assert os.path.exists(tmp_path / "gpt2_L2H2C32T32_debug_state.bin")
