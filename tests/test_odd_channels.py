"""The CUDA trainer (on the emulator) at channel counts that are not a multiple of the 128-bit pack.

Every other CUDA-trainer test has C = 32, where every row of C, 3C and 4C floats is a whole number of packs
(4 floats or 8 bf16), so a launcher that took a packed (x128) kernel on rows that are not would pass them
all. Here C = 33 (NH 3, rows of 33, 99 and 132) and C = 36 (rows of 36, 108 and 144), in fp32 and bf16:
some rows are a multiple of the pack and some are not, so the launchers take the packed kernels for some
calls and the per-element ones for others (asserted from the kernels launched). Forward logits and loss,
the 16 gradients and the loss after three clipped AdamW steps are compared with train_gpt2.py.
"""

import contextlib
import io

import numpy as np
import pytest

import train_gpt2 as numpy_trainer
from conftest import emulated_cuda_trainer
from llmc.model import GPT2Config, param_shapes
from test_cuda_trainer import random_params

B, T, V = 2, 8, 101
# fp32: float32 all the way, as test_cuda_trainer; bf16: a fraction of each tensor's largest value (bf16
# keeps 8 bits; the largest error measured is ~1.7% of it), far below what a misplaced pack does (~100%)
FP32_TOL, BF16_TOL = 1e-4, 0.04


@pytest.fixture(scope="module")
def cu():
    return emulated_cuda_trainer("train_gpt2_cuda_odd_channels")


def config_of(C):
    return GPT2Config(max_seq_len=16, vocab_size=V, num_layers=1, num_heads=3, channels=C, padded_vocab_size=128)


def batch(seed):
    tokens = np.random.default_rng(seed).integers(0, V, size=B * T + 1).astype(np.int32)
    return tokens[:-1].reshape(B, T), tokens[1:].reshape(B, T)


def assert_near(name, ours, ref, precision):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    assert scale > 1e-6, f"{name} is all zeros in the NumPy trainer: the comparison would prove nothing"
    err = np.abs(ours - ref).max()
    limit = FP32_TOL * (1 + scale) if precision == "fp32" else BF16_TOL * scale
    assert err <= limit, f"{name} ({precision}): max error {err:.3g} > {limit:.3g} (largest |value| {scale:.3g})"


def step(tr, model, x, y, t=None):
    """An AdamW step on the last gradients when t is given, then forward and backward on (x, y)."""
    if t is not None:
        scale = tr.grad_clip_scale(tr.gpt2_calculate_grad_norm(model), 1.0)
        tr.gpt2_update(model, 1e-2, 0.9, 0.95, 1e-8, 0.1, t, grad_scale=scale)
    tr.gpt2_zero_grad(model)
    with contextlib.redirect_stdout(io.StringIO()):     # the first forward's memory report
        tr.gpt2_forward(model, x, y, B, T)
    logits = np.array(tr.to_numpy(model.acts.logits))[..., :V]   # before the backward makes them dlogits
    tr.gpt2_backward(model)
    return logits


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("C", [33, 36])
def test_rows_off_the_pack_match_the_numpy_trainer(cu, monkeypatch, C, precision):
    config = config_of(C)
    params = random_params(config, seed=C)
    launched = []
    kernel = cu.kernel
    monkeypatch.setattr(cu, "kernel", lambda file, name, floatx=np.float32: launched.append(name) or
                        kernel(file, name, floatx))
    ours, ref = cu.GPT2(config, params.copy(), 1, precision, True), numpy_trainer.GPT2(config, params.copy())
    x, y = batch(C)
    assert_near("logits", step(cu, ours, x, y), step(numpy_trainer, ref, x, y), precision)
    assert_near("loss", ours.mean_loss, ref.mean_loss, precision)
    for name, _ in param_shapes(config):
        assert_near("d" + name, cu.to_numpy(getattr(ours.grads, name)), getattr(ref.grads, name), precision)
    for t in (1, 2, 3):
        step(cu, ours, x, y, t)
        step(numpy_trainer, ref, x, y, t)
        assert_near(f"loss after step {t}", ours.mean_loss, ref.mean_loss, precision)

    # which kernels ran: the LayerNorms' rows are C long, packed only where C is a whole number of packs;
    # GELU's row is its whole flat array, packed in every case here
    pack = 4 if precision == "fp32" else 8
    assert ("layernorm_forward_x128_kernel" in launched) == (C % pack == 0), sorted(set(launched))
    assert ("layernorm_forward_kernel" in launched) == (C % pack != 0), sorted(set(launched))
    assert "gelu_forward_packed_kernel" in launched and "gelu_backward_packed_kernel" in launched
