"""-e gpt3:cN (llmc/model.py's descriptor_config): llm.c's GPT-3 shapes by width, in both trainers and the
exporter, checked against PyTorch as the dN shapes are.

The table is llm.c's gpt3_set_hyperparameters, restated here from its source (channels -> layers, head size)
so a slip in ours shows. The smallest shape, gpt3:c384 (L6 NH6 C384, maxT 2048: 31M parameters), is built
from scratch by the NumPy trainer, by train_gpt2_torch.py's GPT at the exporter's --model gpt3:c384 shape,
and by the CUDA trainer on the emulator: the same weights (both seed PyTorch's init), the same logits and loss
at a T past GPT-2's 1024 (wpe's rows 1024.. count), and the CUDA trainer's logits at a short T. Bad sizes
are one line listing the valid ones.
"""

import numpy as np
import pytest
import torch

import train_gpt2 as m
import train_gpt2_torch as tt
from conftest import emulated_cuda_trainer, run_script
from llmc.model import GPT3_WIDTHS, descriptor_config
from llmc.utils import ConfigError

# llm.c's train_gpt2.cu, gpt3_set_hyperparameters: channels -> (depth, head_size); 5140 asserts there
LLMC_GPT3 = {384: (6, 64), 768: (12, 64), 1024: (24, 64), 1536: (24, 96), 2048: (24, 128), 2560: (32, 80),
             4096: (32, 128), 12288: (96, 128)}
VALID = ("gpt3:c384, gpt3:c768, gpt3:c1024, gpt3:c1536, gpt3:c2048, gpt3:c2560, gpt3:c4096, gpt3:c12288 "
         "(c = channels)")


def test_the_table_is_llmcs():
    assert set(GPT3_WIDTHS) == set(LLMC_GPT3)
    for C, (L, head_size) in LLMC_GPT3.items():
        config = descriptor_config(f"gpt3:c{C}")
        assert (config.num_layers, config.num_heads, config.channels) == (L, C // head_size, C)
        assert config.channels // config.num_heads == head_size and 64 <= head_size <= 128
        assert (config.max_seq_len, config.vocab_size, config.padded_vocab_size) == (2048, 50257, 50304)
    assert descriptor_config("d12").max_seq_len == 1024 and descriptor_config("gpt2:d12") == descriptor_config("d12")


@pytest.mark.parametrize("name, why", [("gpt3:c100", ""), ("gpt3:768", ""), ("gpt3:cx", ""),
                                       ("gpt3:c5140", " (llm.c lists 5140, which no head size divides)")])
def test_a_bad_size_is_one_line_listing_the_valid_ones(name, why):
    with pytest.raises(ConfigError) as e:
        descriptor_config(name)
    assert str(e.value) == f"unknown GPT-3 size '{name}'{why}: use one of {VALID}"
    with pytest.raises(ConfigError, match="^unknown model 'gpt4:c768': use d6, d12, d24, d36, d48 .*gpt3:cN for N in "
                                          "384, 768, 1024, 1536, 2048, 2560, 4096, 12288"):
        descriptor_config("gpt4:c768")


def test_the_cli_and_the_exporter_say_so(tmp_path, monkeypatch):
    r = run_script("train_gpt2.py", "-e", "gpt3:c700", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: unknown GPT-3 size 'gpt3:c700': use one "
                                                                   f"of {VALID}"], r.stderr
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        tt.main(["--model", "gpt3:c700"])
    assert "unknown --model 'gpt3:c700'; valid: gpt2, gpt2-medium" in str(e.value.code)
    assert "gpt3:c384, gpt3:c768, gpt3:c1024" in str(e.value.code) and "\n" not in str(e.value.code)


@pytest.fixture(scope="module")
def c384():
    """gpt3:c384 from scratch in NumPy, and PyTorch's GPT at the exporter's shape for --model gpt3:c384."""
    config, pretrained, size = tt.model_config(tt.parse_args(["--model", "gpt3:c384"]))
    assert (pretrained, size) == (None, "gpt3_c384")                # files gpt2_gpt3_c384.bin, ...
    return m.gpt2_build_from_descriptor("gpt3:c384"), tt.GPT(config)


def test_numpy_and_pytorch_agree(c384):
    ours, theirs = c384
    c = theirs.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (6, 6, 384, 2048, 50257)
    assert tt.llmc_config(c) == ours.config
    np.testing.assert_allclose(ours.params_memory, tt.flat_tensors(theirs), rtol=0, atol=1e-7)   # seeded alike
    assert ours.params.wpe.shape == (2048, 384) and abs(ours.params.wpe[1024:].std() - 0.02) < 5e-4
    forward_agrees(ours, theirs, 16)


@pytest.mark.slow
def test_numpy_and_pytorch_agree_past_1024(c384):
    """Positions 1024..1099 use wpe's rows past GPT-2's context (about 20 s on 2 busy cores: slow)."""
    forward_agrees(*c384, 1100)


def forward_agrees(ours, theirs, T):
    """The NumPy trainer's logits and loss against PyTorch's on one random sequence of T tokens."""
    B = 1
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=(B, T + 1)).astype(np.int32)
    x, y = tokens[:, :-1], tokens[:, 1:]
    m.gpt2_forward(ours, x, y, B, T)
    with torch.no_grad():
        logits, loss = theirs(torch.from_numpy(x).long(), torch.from_numpy(y).long())
    np.testing.assert_allclose(ours.acts.logits[..., :50257], logits.numpy(), rtol=1e-4, atol=2e-4)
    assert abs(ours.mean_loss - loss.item()) < 1e-5, (ours.mean_loss, loss.item())


def test_the_cuda_trainer_builds_and_runs_it(c384):
    ours, _ = c384
    cu = emulated_cuda_trainer("train_gpt2_cuda_gpt3")
    model = cu.gpt2_build_from_descriptor("gpt3:c384", precision="fp32")
    assert model.config == ours.config and np.array_equal(cu.to_numpy(model.params_memory), ours.params_memory)
    B, T = 1, 8
    x = np.arange(B * T, dtype=np.int32).reshape(B, T) * 97 % 50257
    y = (x + 1) % 50257
    cu.gpt2_allocate_state(model, B, T)
    cu.gpt2_forward(model, x, y, B, T)
    m.gpt2_forward(ours, x, y, B, T)
    np.testing.assert_allclose(cu.to_numpy(model.acts.logits)[..., :50257], ours.acts.logits[..., :50257],
                               rtol=1e-4, atol=2e-4)
    assert abs(model.mean_loss - ours.mean_loss) < 1e-5
    # head size 96 (gpt3:c1536) has no flash kernel: the materialized path, saying why; 64 and 128 take flash
    flash, line = cu.attention_path(descriptor_config("gpt3:c1536"), "bf16", 1)
    assert not flash and "head size 96 is not one flash_attention.cu takes (64 or 128)" in line
    assert all(cu.attention_path(descriptor_config(f"gpt3:c{C}"), "bf16", 1)[0] for C in (768, 2048))
