"""Every layer of train_gpt2.py against float64 central finite differences and torch autograd.

Odd shapes on purpose (B=3, T=13, C=48, NH=3, V=101 padded to Vp=128), so a transposed axis
or a pad column that leaks shows up. Each check asserts on numbers that a real bug would move.
"""

import math

import numpy as np
import pytest
import torch

import train_gpt2 as m
from llmc import utils
from llmc.model import GPT2Config, num_parameters
from llmc.rand import normal_
from llmc import cpu

B, T, C, NH, V, Vp = 3, 13, 48, 3, 101, 128


def rand(rng, *shape, scale=1.0):
    """Standard normal float64 data from the test's own generator: each test seeds one, so its data do not
    depend on which tests ran before it."""
    return rng.standard_normal(shape) * scale


# --- each layer wrapped as f(inputs) -> output and g(inputs, dout) -> input gradients -------

def ln_fwd(x):
    dt = x["inp"].dtype
    out, mean, rstd = np.empty_like(x["inp"]), np.empty((B, T), dt), np.empty((B, T), dt)
    m.layernorm_forward(out, mean, rstd, x["inp"], x["weight"], x["bias"], B, T, C)
    return out


def ln_bwd(x, dout):
    dt = x["inp"].dtype
    out, mean, rstd = np.empty_like(x["inp"]), np.empty((B, T), dt), np.empty((B, T), dt)
    m.layernorm_forward(out, mean, rstd, x["inp"], x["weight"], x["bias"], B, T, C)
    g = {k: np.zeros_like(v) for k, v in x.items()}
    m.layernorm_backward(g["inp"], g["weight"], g["bias"], dout, x["inp"], x["weight"], mean, rstd, B, T, C)
    return g


def ln_torch(x):
    return torch.nn.functional.layer_norm(x["inp"], (C,), x["weight"], x["bias"], eps=1e-5)


OC = 37  # an output width that is no multiple of anything


def mm_fwd(x):
    out = np.empty((B, T, OC), x["inp"].dtype)
    m.matmul_forward(out, x["inp"], x["weight"], x["bias"], B, T, C, OC)
    return out


def mm_bwd(x, dout):
    g = {k: np.zeros_like(v) for k, v in x.items()}
    m.matmul_backward(g["inp"], g["weight"], g["bias"], dout, x["inp"], x["weight"], B, T, C, OC)
    return g


def mm_torch(x):
    return torch.nn.functional.linear(x["inp"], x["weight"], x["bias"])


def att_fwd(x, fn=m.attention_forward):
    dt = x["inp"].dtype
    out, preatt, att = np.empty((B, T, C), dt), np.empty((B, NH, T, T), dt), np.empty((B, NH, T, T), dt)
    fn(out, preatt, att, x["inp"], B, T, C, NH)
    return out


def att_bwd(x, dout, fwd=m.attention_forward, bwd=m.attention_backward):
    dt = x["inp"].dtype
    out, preatt, att = np.empty((B, T, C), dt), np.empty((B, NH, T, T), dt), np.empty((B, NH, T, T), dt)
    fwd(out, preatt, att, x["inp"], B, T, C, NH)
    g = {"inp": np.zeros_like(x["inp"])}
    bwd(g["inp"], np.zeros_like(att), np.zeros_like(att), dout, x["inp"], att, B, T, C, NH)
    return g


def att_torch(x):
    q, k, v = x["inp"].split(C, dim=2)
    q, k, v = [t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v)]   # (B, NH, T, hs)
    a = (q @ k.transpose(-2, -1)) / math.sqrt(C // NH)
    a = a.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    return (a @ v).transpose(1, 2).reshape(B, T, C)


def gelu_fwd(x):
    out = np.empty_like(x["inp"])
    m.gelu_forward(out, x["inp"], x["inp"].size)
    return out


def gelu_bwd(x, dout):
    g = {"inp": np.zeros_like(x["inp"])}
    m.gelu_backward(g["inp"], x["inp"], dout, x["inp"].size)
    return g


def gelu_torch(x):
    return torch.nn.functional.gelu(x["inp"], approximate="tanh")


def enc_fwd(x, ids):
    out = np.empty((B, T, C))
    m.encoder_forward(out, ids, x["wte"], x["wpe"], B, T, C)
    return out


def sce_loss(logits, targets):
    """softmax + crossentropy over the padded logits; returns (losses (B,T), probs)."""
    probs, losses = np.empty_like(logits), np.empty((B, T), dtype=logits.dtype)
    m.softmax_forward(probs, logits, B, T, V, Vp)
    m.crossentropy_forward(losses, probs, targets, B, T, Vp)
    return losses, probs


LAYERS = {  # name: (forward, backward, torch forward, inputs)
    "layernorm": (ln_fwd, ln_bwd, ln_torch, lambda rng: {"inp": rand(rng, B, T, C) * 2 + 0.5,
                                                         "weight": rand(rng, C), "bias": rand(rng, C)}),
    "matmul": (mm_fwd, mm_bwd, mm_torch, lambda rng: {"inp": rand(rng, B, T, C), "weight": rand(rng, OC, C),
                                                      "bias": rand(rng, OC)}),
    "attention": (att_fwd, att_bwd, att_torch, lambda rng: {"inp": rand(rng, B, T, 3 * C)}),
    "gelu": (gelu_fwd, gelu_bwd, gelu_torch, lambda rng: {"inp": rand(rng, B, T, 4 * C) * 2}),
}


def finite_difference(fwd, x, dout, name, idx, h=1e-6):
    """d/dx[name][idx] of sum(fwd(x) * dout), central differences in float64."""
    saved = x[name][idx]
    x[name][idx] = saved + h
    fp = np.sum(fwd(x) * dout)
    x[name][idx] = saved - h
    fm = np.sum(fwd(x) * dout)
    x[name][idx] = saved
    return (fp - fm) / (2 * h)


@pytest.mark.parametrize("layer", LAYERS)
def test_backward_vs_finite_differences(layer):
    rng = np.random.default_rng(1)
    fwd, bwd, _, make = LAYERS[layer]
    x = make(rng)
    dout = rand(rng, *fwd(x).shape)
    grads = bwd(x, dout)
    for name, arr in x.items():
        flat = rng.choice(arr.size, size=min(arr.size, 40), replace=False)
        for f in flat:
            idx = np.unravel_index(f, arr.shape)
            fd = finite_difference(fwd, x, dout, name, idx)
            assert abs(grads[name][idx] - fd) <= 1e-6 * (1 + abs(fd)), (layer, name, idx, grads[name][idx], fd)


@pytest.mark.parametrize("layer", LAYERS)
def test_forward_backward_vs_torch(layer):
    rng = np.random.default_rng(2)
    fwd, bwd, torch_fwd, make = LAYERS[layer]
    x = make(rng)
    out = fwd(x)
    dout = rand(rng, *out.shape)
    grads = bwd(x, dout)
    tx = {k: torch.tensor(v, requires_grad=True) for k, v in x.items()}
    tout = torch_fwd(tx)
    tout.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    for name in x:
        np.testing.assert_allclose(grads[name], tx[name].grad.numpy(), rtol=1e-10, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("layer", LAYERS)
def test_float32_stays_float32_and_matches_float64(layer):
    rng = np.random.default_rng(3)
    fwd, bwd, _, make = LAYERS[layer]
    x64 = make(rng)
    dout64 = rand(rng, *fwd(x64).shape)
    x32 = {k: v.astype(np.float32) for k, v in x64.items()}
    dout32 = dout64.astype(np.float32)
    out32 = fwd(x32)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, fwd(x64), rtol=1e-4, atol=1e-4)
    g32, g64 = bwd(x32, dout32), bwd(x64, dout64)
    for name in x64:
        assert g32[name].dtype == np.float32, name
        np.testing.assert_allclose(g32[name], g64[name], rtol=1e-3, atol=1e-3, err_msg=name)


def test_layernorm_float32():
    rng = np.random.default_rng(4)
    x = rand(rng, B, T, C).astype(np.float32) * 3 + 1
    w, b = rand(rng, C).astype(np.float32), rand(rng, C).astype(np.float32)
    out, mean, rstd = (np.empty_like(x), np.empty((B, T), np.float32), np.empty((B, T), np.float32))
    m.layernorm_forward(out, mean, rstd, x, w, b, B, T, C)
    ref = torch.nn.functional.layer_norm(torch.tensor(x, dtype=torch.float64), (C,), torch.tensor(w, dtype=torch.float64),
                                         torch.tensor(b, dtype=torch.float64), eps=1e-5).numpy()
    assert out.dtype == mean.dtype == rstd.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)
    dout = rand(rng, B, T, C).astype(np.float32)
    dx, dw, db = np.zeros_like(x), np.zeros_like(w), np.zeros_like(b)
    m.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, B, T, C)
    assert dx.dtype == dw.dtype == db.dtype == np.float32
    g64 = ln_bwd({"inp": x.astype(np.float64), "weight": w.astype(np.float64), "bias": b.astype(np.float64)},
                 dout.astype(np.float64))
    np.testing.assert_allclose(dx, g64["inp"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, g64["weight"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", LAYERS)
def test_backward_accumulates(layer):
    """Backward adds into the gradient arrays: starting from G gives G + grad."""
    rng = np.random.default_rng(5)
    fwd, bwd, _, make = LAYERS[layer]
    x = make(rng)
    dout = rand(rng, *fwd(x).shape)
    fresh = bwd(x, dout)
    if layer == "matmul":
        g = {k: rand(rng, *v.shape) for k, v in x.items()}
        start = {k: v.copy() for k, v in g.items()}
        m.matmul_backward(g["inp"], g["weight"], g["bias"], dout, x["inp"], x["weight"], B, T, C, OC)
    elif layer == "layernorm":
        out, mean, rstd = np.empty_like(x["inp"]), np.empty((B, T)), np.empty((B, T))
        m.layernorm_forward(out, mean, rstd, x["inp"], x["weight"], x["bias"], B, T, C)
        g = {k: rand(rng, *v.shape) for k, v in x.items()}
        start = {k: v.copy() for k, v in g.items()}
        m.layernorm_backward(g["inp"], g["weight"], g["bias"], dout, x["inp"], x["weight"], mean, rstd, B, T, C)
    elif layer == "gelu":
        g = {"inp": rand(rng, *x["inp"].shape)}
        start = {"inp": g["inp"].copy()}
        m.gelu_backward(g["inp"], x["inp"], dout, x["inp"].size)
    else:
        out, preatt, att = np.empty((B, T, C)), np.empty((B, NH, T, T)), np.empty((B, NH, T, T))
        m.attention_forward(out, preatt, att, x["inp"], B, T, C, NH)
        g = {"inp": rand(rng, *x["inp"].shape)}
        start = {"inp": g["inp"].copy()}
        m.attention_backward(g["inp"], np.zeros_like(att), np.zeros_like(att), dout, x["inp"], att, B, T, C, NH)
    for k in g:
        np.testing.assert_allclose(g[k] - start[k], fresh[k], rtol=1e-9, atol=1e-9, err_msg=k)


def test_attention_matches_loop_reference():
    rng = np.random.default_rng(6)
    inp = rand(rng, B, T, 3 * C)
    outs = []
    for fwd in (m.attention_forward, m.attention_forward_loop):
        out, preatt, att = np.empty((B, T, C)), np.empty((B, NH, T, T)), np.empty((B, NH, T, T))
        fwd(out, preatt, att, inp, B, T, C, NH)
        outs.append((out, preatt, att))
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    att = outs[0][2]
    mask = np.triu(np.ones((T, T), bool), 1)
    assert np.all(att[:, :, mask] == 0) and np.all(np.isneginf(outs[0][1][:, :, mask]))
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-12)
    dout = rand(rng, B, T, C)
    g_vec = att_bwd({"inp": inp}, dout)["inp"]
    g_loop = att_bwd({"inp": inp}, dout, m.attention_forward_loop, m.attention_backward_loop)["inp"]
    np.testing.assert_allclose(g_vec, g_loop, rtol=1e-10, atol=1e-12)


def test_residual():
    rng = np.random.default_rng(7)
    a, b, dout = rand(rng, B, T, C), rand(rng, B, T, C), rand(rng, B, T, C)
    out = np.empty_like(a)
    m.residual_forward(out, a, b, a.size)
    np.testing.assert_array_equal(out, a + b)
    da, db = np.ones_like(a), np.full_like(b, 2.0)
    m.residual_backward(da, db, dout, a.size)
    np.testing.assert_array_equal(da, 1 + dout)
    np.testing.assert_array_equal(db, 2 + dout)


def test_encoder_vs_torch_with_repeated_tokens():
    rng = np.random.default_rng(8)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
    ids[1, 5] = ids[0, 2] = ids[2, 12] = 7           # a token seen three times must count thrice
    x = {"wte": rand(rng, Vp, C), "wpe": rand(rng, 20, C)}
    out = enc_fwd(x, ids)
    dout = rand(rng, B, T, C)
    dwte, dwpe = np.zeros_like(x["wte"]), np.zeros_like(x["wpe"])
    m.encoder_backward(dwte, dwpe, dout, ids, B, T, C)
    twte = torch.tensor(x["wte"], requires_grad=True)
    twpe = torch.tensor(x["wpe"], requires_grad=True)
    tout = torch.nn.functional.embedding(torch.tensor(ids, dtype=torch.long), twte) + twpe[:T]
    tout.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-14)
    np.testing.assert_allclose(dwte, twte.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dwpe, twpe.grad.numpy(), rtol=1e-12, atol=1e-12)
    assert np.all(dwpe[T:] == 0)


def test_softmax_crossentropy_padded_vocab_vs_torch():
    rng = np.random.default_rng(9)
    logits = rand(rng, B, T, Vp, scale=3.0)
    logits[..., V:] = 1e3                            # garbage in the pad columns must not leak
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    losses, probs = sce_loss(logits, targets)
    probs_loop = np.empty_like(probs)
    m.softmax_forward_loop(probs_loop, logits, B, T, V, Vp)
    np.testing.assert_allclose(probs, probs_loop, rtol=1e-13, atol=1e-16)
    assert np.all(probs[..., V:] == 0)
    tl = torch.tensor(logits[..., :V], requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(tl.reshape(-1, V), torch.tensor(targets, dtype=torch.long).reshape(-1),
                                              reduction="none").reshape(B, T)
    np.testing.assert_allclose(losses, tloss.detach().numpy(), rtol=1e-12)
    dlosses = rand(rng, B, T)
    tloss.backward(torch.tensor(dlosses))
    dlogits = np.zeros_like(logits)
    m.crossentropy_softmax_backward(dlogits, dlosses, probs, targets, B, T, V, Vp)
    np.testing.assert_allclose(dlogits[..., :V], tl.grad.numpy(), rtol=1e-10, atol=1e-14)
    assert np.all(dlogits[..., V:] == 0)
    dlogits_loop = np.zeros_like(logits)
    m.crossentropy_softmax_backward_loop(dlogits_loop, dlosses, probs, targets, B, T, V, Vp)
    np.testing.assert_allclose(dlogits, dlogits_loop, rtol=1e-12, atol=1e-16)


def test_softmax_crossentropy_backward_vs_finite_differences():
    rng = np.random.default_rng(10)
    logits = rand(rng, B, T, Vp)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    dlosses = rand(rng, B, T)
    _, probs = sce_loss(logits, targets)
    dlogits = np.zeros_like(logits)
    m.crossentropy_softmax_backward(dlogits, dlosses, probs, targets, B, T, V, Vp)
    for _ in range(40):
        idx = (rng.integers(B), rng.integers(T), rng.integers(Vp))
        saved, h = logits[idx], 1e-6
        logits[idx] = saved + h
        fp = np.sum(sce_loss(logits, targets)[0] * dlosses)
        logits[idx] = saved - h
        fm = np.sum(sce_loss(logits, targets)[0] * dlosses)
        logits[idx] = saved
        fd = (fp - fm) / (2 * h)
        assert abs(dlogits[idx] - fd) <= 1e-7 * (1 + abs(fd)), (idx, dlogits[idx], fd)
        if idx[2] >= V:
            assert dlogits[idx] == 0 and abs(fd) < 1e-12


def test_softmax_float32_dtype():
    rng = np.random.default_rng(11)
    logits = rand(rng, B, T, Vp, scale=5).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    losses, probs = sce_loss(logits, targets)
    assert probs.dtype == np.float32 and losses.dtype == np.float32
    l64, _ = sce_loss(logits.astype(np.float64), targets)
    np.testing.assert_allclose(losses, l64, rtol=1e-5, atol=1e-5)


def gelu_grad_float32(x, sech2_of):
    """GELU's gradient in float32 (the kernel's expression), sech^2(u) written as sech2_of(u, tanh u)."""
    s = np.float32(m.GELU_SCALING_FACTOR)
    u = s * (x + np.float32(0.044715) * x * x * x)
    tanh_u = np.tanh(u)
    with np.errstate(over="ignore"):
        sech2 = sech2_of(u, tanh_u)
    return np.float32(0.5) * (np.float32(1) + tanh_u) + x * np.float32(0.5) * sech2 * s * \
        (np.float32(1) + np.float32(3 * 0.044715) * x * x)


def test_gelu_backward_writes_sech2_the_more_accurate_way_in_float32():
    """sech^2 = 1/cosh^2 = 1 - tanh^2 in exact arithmetic; in float32 the second cancels once tanh nears +-1.
    Measured against float64 over x in [-10, 10] (beyond it the gradient is 0 or 1 to float32's precision):
    1/cosh^2 has about a sixth of the error, so gelu_backward and kernels/gelu.cu both use it."""
    x = np.linspace(-10, 10, 400_001, dtype=np.float32)
    exact = gelu_bwd({"inp": x.astype(np.float64)}, np.ones(x.size))["inp"]
    err = {name: np.abs(gelu_grad_float32(x, sech2_of).astype(np.float64) - exact).max()
           for name, sech2_of in (("1/cosh^2", lambda u, t: np.float32(1) / (np.cosh(u) * np.cosh(u))),
                                  ("1 - tanh^2", lambda u, t: np.float32(1) - t * t))}
    print(f"max |float32 - float64| of GELU's gradient on [-10, 10]: {err}")
    assert err["1/cosh^2"] < 2.5e-7 and err["1 - tanh^2"] > 5 * err["1/cosh^2"], err
    ours = np.zeros_like(x)
    m.gelu_backward(ours, x, np.ones_like(x), x.size)
    assert ours.dtype == np.float32 and np.abs(ours - exact).max() < 2.5e-7, np.abs(ours - exact).max()
    big = np.array([60, -60, 1e4, -1e4], np.float32)                   # cosh overflows: still 1 and 0
    far = np.zeros_like(big)
    m.gelu_backward(far, big, np.ones_like(big), big.size)
    np.testing.assert_array_equal(far, [1, 0, 1, 0])


# --- the whole model: a tiny GPT-2 forward and backward against a float64 PyTorch twin ------

def torch_gpt2_loss(P, x, y, config):
    """GPT-2 written with torch ops on the named parameters P (float64), returns (logits, loss)."""
    L, NH, C, V = config.num_layers, config.num_heads, config.channels, config.vocab_size
    Bx, Tx = x.shape
    ln = torch.nn.functional.layer_norm
    h = P["wte"][x] + P["wpe"][:Tx]
    mask = torch.triu(torch.ones(Tx, Tx, dtype=torch.bool), 1)
    for l in range(L):
        a = ln(h, (C,), P["ln1w"][l], P["ln1b"][l], eps=1e-5)
        q, k, v = (a @ P["qkvw"][l].T + P["qkvb"][l]).split(C, dim=2)
        q, k, v = [t.view(Bx, Tx, NH, C // NH).transpose(1, 2) for t in (q, k, v)]
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(C // NH)).masked_fill(mask, float("-inf")).softmax(-1)
        y_ = (att @ v).transpose(1, 2).reshape(Bx, Tx, C)
        h = h + y_ @ P["attprojw"][l].T + P["attprojb"][l]
        a = ln(h, (C,), P["ln2w"][l], P["ln2b"][l], eps=1e-5)
        f = torch.nn.functional.gelu(a @ P["fcw"][l].T + P["fcb"][l], approximate="tanh")
        h = h + f @ P["fcprojw"][l].T + P["fcprojb"][l]
    h = ln(h, (C,), P["lnfw"], P["lnfb"], eps=1e-5)
    logits = h @ P["wte"][:V].T
    return logits, torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def tiny_model(seed=0):
    config = GPT2Config(max_seq_len=16, vocab_size=V, num_layers=2, num_heads=NH, channels=C,
                        padded_vocab_size=Vp)
    r = np.random.default_rng(seed)
    params = (r.standard_normal(num_parameters(config)) * 0.1).astype(np.float32)
    model = m.GPT2(config, params)
    model.params.wte[V:] = 0
    model.params.ln1w[...] += 1
    model.params.ln2w[...] += 1
    model.params.lnfw[...] += 1
    return model


def test_tiny_gpt2_forward_backward_vs_torch():
    rng = np.random.default_rng(12)
    model = tiny_model()
    x = rng.integers(0, V, size=(B, T)).astype(np.int32)
    y = rng.integers(0, V, size=(B, T)).astype(np.int32)
    m.gpt2_forward(model, x, y, B, T)
    m.gpt2_zero_grad(model)
    m.gpt2_backward(model)
    P = {name: torch.tensor(getattr(model.params, name), dtype=torch.float64, requires_grad=True)
         for name, _ in model.param_shapes}
    logits, loss = torch_gpt2_loss(P, torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long), model.config)
    loss.backward()
    assert model.acts.logits.dtype == np.float32 and model.grads_memory.dtype == np.float32
    np.testing.assert_allclose(model.acts.logits[..., :V], logits.detach().numpy(), rtol=0, atol=2e-5)
    assert np.all(model.acts.logits[..., V:] == 0)             # pad rows of wte are zero
    assert abs(model.mean_loss - loss.item()) < 1e-5
    for name, _ in model.param_shapes:
        ref = P[name].grad.numpy()
        ours = getattr(model.grads, name)
        scale = np.abs(ref).max()
        assert np.abs(ours - ref).max() <= 1e-4 * scale + 1e-7, (name, np.abs(ours - ref).max(), scale)
    assert np.all(model.grads.wte[V:] == 0)


def test_forward_errors_and_smaller_batch():
    rng = np.random.default_rng(13)
    model = tiny_model()
    with pytest.raises(utils.ConfigError, match="exceeds the model's max_seq_len 16"):
        m.gpt2_forward(model, np.zeros((1, 17), np.int32), None, 1, 17)
    x = rng.integers(0, V, size=(B, T)).astype(np.int32)
    m.gpt2_forward(model, x, None, B, T)
    assert model.mean_loss == -1.0
    full = model.acts.probs.copy()
    m.gpt2_forward(model, x[:1, :5], None, 1, 5)                 # a smaller (B, T) reuses the buffers
    np.testing.assert_allclose(model.acts.probs[0], full[0, :5], rtol=1e-5, atol=1e-7)


def test_descriptor_init_statistics():
    model = m.gpt2_build_from_descriptor("d6")
    p, cfg = model.params, model.config
    assert (cfg.num_layers, cfg.num_heads, cfg.channels, cfg.padded_vocab_size) == (6, 6, 384, 50304)
    assert abs(p.wte[:cfg.vocab_size].std() - 0.02) < 2e-4 and np.all(p.wte[cfg.vocab_size:] == 0)
    assert abs(p.fcprojw.std() - 0.02 / math.sqrt(12)) < 1e-4 and abs(p.qkvw.std() - 0.02) < 2e-4
    assert np.all(p.ln1w == 1) and np.all(p.lnfw == 1) and np.all(p.qkvb == 0) and np.all(p.ln2b == 0)
    again = m.gpt2_build_from_descriptor("d6")
    assert np.array_equal(again.params_memory, model.params_memory)     # seeded
    with pytest.raises(utils.ConfigError, match="unknown model 'd7'"):
        m.gpt2_build_from_descriptor("d7")


def test_init_matches_torch_normal():
    """normal_ reproduces torch.normal_ after torch.manual_seed (llm.c's rand.h): the same
    draws in the same order, up to float rounding of log/cos/sin."""
    torch.manual_seed(42)
    a = torch.empty(1000).normal_(0, 0.02)
    b = torch.empty(37 * 16 + 5).normal_(0, 0.02)                 # not a multiple of 16
    rs = np.random.RandomState(42)
    ours_a, ours_b = np.empty(1000, np.float32), np.empty(37 * 16 + 5, np.float32)
    normal_(ours_a, 0.02, rs)
    normal_(ours_b, 0.02, rs)
    np.testing.assert_allclose(ours_a, a.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours_b, b.numpy(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm(dtype):
    """c += a @ b (and c = a @ b) in one BLAS call, for plain, transposed and strided operands."""
    rng = np.random.default_rng(14)
    a = rand(rng, 7, 5).astype(dtype)
    b = rand(rng, 5, 9).astype(dtype)
    for aa, bb in ((a, b), (np.ascontiguousarray(a.T).T, np.ascontiguousarray(b.T).T),
                   (rand(rng, 7, 10)[:, ::2].astype(dtype), b)):
        c = rand(rng, 7, 9).astype(dtype)
        expected = c + aa @ bb
        cpu.gemm(c, aa, bb, accumulate=True)
        assert c.dtype == dtype
        np.testing.assert_allclose(c, expected, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6)
        cpu.gemm(c, aa, bb, accumulate=False)
        np.testing.assert_allclose(c, aa @ bb, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6)


# --- every fast layer against its loop twin (llm.c's loops, written out in Python) -------------

def twin_cases(dtype):
    """(name, fast, loop, args, compare) for each layer pair, on small odd shapes. Forward outputs
    start as NaN (every element must be written), gradients as random numbers (backward must add).
    compare: {argument index: boolean mask} where only part of an output is defined alike."""
    r = np.random.default_rng(7)
    B, T, C, NH, V, Vp, OC, maxT = 2, 5, 8, 2, 11, 16, 7, 9

    def f(*shape, scale=1.0):
        return (r.standard_normal(shape) * scale).astype(dtype)

    def nan(*shape):
        return np.full(shape, np.nan, dtype)

    ids = r.integers(0, V, size=(B, T)).astype(np.int32)
    ids[1, 3] = ids[0, 0] = ids[1, 4]                 # a token seen three times
    inp, w, b = f(B, T, C) * 2 + 0.5, f(C), f(C)
    mean, rstd = np.empty((B, T), dtype), np.empty((B, T), dtype)
    m.layernorm_forward(nan(B, T, C), mean, rstd, inp, w, b, B, T, C)
    qkv = f(B, T, 3 * C)
    att = np.empty((B, NH, T, T), dtype)
    m.attention_forward(nan(B, T, C), nan(B, NH, T, T), att, qkv, B, T, C, NH)
    logits = f(B, T, Vp, scale=3.0)
    logits[..., V:] = 1e3                             # garbage in the pad columns must not leak
    probs = np.empty((B, T, Vp), dtype)
    m.softmax_forward(probs, logits, B, T, V, Vp)
    causal = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, NH, T, T))
    N = B * T * 4 * C
    return [
        ("encoder_forward", m.encoder_forward, m.encoder_forward_loop,
         [nan(B, T, C), ids, f(Vp, C), f(maxT, C), B, T, C], {}),
        ("encoder_backward", m.encoder_backward, m.encoder_backward_loop,
         [f(Vp, C), f(maxT, C), f(B, T, C), ids, B, T, C], {}),
        ("layernorm_forward", m.layernorm_forward, m.layernorm_forward_loop,
         [nan(B, T, C), nan(B, T), nan(B, T), inp, w, b, B, T, C], {}),
        ("layernorm_backward", m.layernorm_backward, m.layernorm_backward_loop,
         [f(B, T, C), f(C), f(C), f(B, T, C), inp, w, mean, rstd, B, T, C], {}),
        ("matmul_forward", m.matmul_forward, m.matmul_forward_naive,
         [nan(B, T, OC), f(B, T, C), f(OC, C), f(OC), B, T, C, OC], {}),
        ("matmul_forward no bias", m.matmul_forward, m.matmul_forward_naive,
         [nan(B, T, OC), f(B, T, C), f(OC, C), None, B, T, C, OC], {}),
        ("matmul_backward", m.matmul_backward, m.matmul_backward_loop,
         [f(B, T, C), f(OC, C), f(OC), f(B, T, OC), f(B, T, C), f(OC, C), B, T, C, OC], {}),
        ("matmul_backward no bias", m.matmul_backward, m.matmul_backward_loop,
         [f(B, T, C), f(OC, C), None, f(B, T, OC), f(B, T, C), f(OC, C), B, T, C, OC], {}),
        ("attention_forward", m.attention_forward, m.attention_forward_loop,
         [nan(B, T, C), nan(B, NH, T, T), nan(B, NH, T, T), qkv, B, T, C, NH], {}),
        # dpreatt and datt are scratch that the model zeroes (the fast layer reads them whole);
        # on datt the loop skips the masked t2 > t, where the fast layer writes dout @ v^T
        ("attention_backward", m.attention_backward, m.attention_backward_loop,
         [f(B, T, 3 * C), np.zeros((B, NH, T, T), dtype), np.zeros((B, NH, T, T), dtype), f(B, T, C), qkv, att,
          B, T, C, NH], {2: causal}),
        ("gelu_forward", m.gelu_forward, m.gelu_forward_loop, [nan(B, T, 4 * C), f(B, T, 4 * C, scale=2.0), N], {}),
        ("gelu_backward", m.gelu_backward, m.gelu_backward_loop,
         [f(B, T, 4 * C), f(B, T, 4 * C, scale=2.0), f(B, T, 4 * C), N], {}),
        ("residual_forward", m.residual_forward, m.residual_forward_loop,
         [nan(B, T, C), f(B, T, C), f(B, T, C), B * T * C], {}),
        ("residual_backward", m.residual_backward, m.residual_backward_loop,
         [f(B, T, C), f(B, T, C), f(B, T, C), B * T * C], {}),
        ("softmax_forward", m.softmax_forward, m.softmax_forward_loop, [nan(B, T, Vp), logits, B, T, V, Vp], {}),
        ("crossentropy_forward", m.crossentropy_forward, m.crossentropy_forward_loop,
         [nan(B, T), probs, ids, B, T, Vp], {}),
        ("crossentropy_softmax_backward", m.crossentropy_softmax_backward, m.crossentropy_softmax_backward_loop,
         [f(B, T, Vp), f(B, T), probs, ids, B, T, V, Vp], {}),
    ]


TWIN_NAMES = [case[0] for case in twin_cases(np.float64)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", TWIN_NAMES)
def test_fast_layer_matches_loop_twin(name, dtype):
    """The whole-array layer (with its row blocks and BLAS calls) and the loop twin, from the same
    arguments, leave every array argument the same: float64 to 1e-12, float32 to float32 rounding."""
    _, fast, loop, args, compare = next(c for c in twin_cases(dtype) if c[0] == name)
    fast_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    loop_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    fast(*fast_args)
    loop(*loop_args)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    for i, (x, y) in enumerate(zip(fast_args, loop_args)):
        if isinstance(x, np.ndarray):
            assert x.dtype == args[i].dtype, (name, i, x.dtype)
            mask = compare.get(i, np.ones(x.shape, bool))
            assert not np.isnan(x[mask]).any(), (name, i, "an output element was never written")
            np.testing.assert_allclose(x[mask], y[mask], err_msg=f"{name}: argument {i}", **tol)
    changed = [not np.array_equal(x, a, equal_nan=True) for x, a in zip(fast_args, args) if isinstance(a, np.ndarray)]
    assert any(changed), f"{name} wrote nothing"


def test_row_blocks_cuts_rows_and_sums_in_a_fixed_order():
    """row_blocks runs the body on blocks of the rows (several when `block` is small), each with
    its size argument set to the block's count, and adds per-thread partial sums in thread order."""
    rng = np.random.default_rng(15)
    calls = []

    @cpu.row_blocks("out", "x", summed=("total",), rows="N", block=3)
    def square(out, total, x, N):
        calls.append(N)
        out[...] = x * x
        total += (x * x).sum(axis=0)

    x = np.arange(1.0, 12.0).reshape(11, 1)
    out, total = np.zeros_like(x), np.full(1, 100.0)
    square(out, total, x, 11)
    np.testing.assert_array_equal(out, x * x)
    assert total[0] == 100.0 + (x * x).sum()
    assert sum(calls) == 11 and max(calls) <= 3 and len(calls) >= 4
    bt_calls = []

    @cpu.row_blocks("out", "inp", rows="BT")
    def rowsum(out, inp, B, T, C):
        bt_calls.append((B, T, inp.shape))
        out[...] = inp.sum(axis=-1)

    inp = rand(rng, 3, 5, 4)
    out = np.empty((3, 5))
    rowsum(out, inp, 3, 5, 4)
    np.testing.assert_allclose(out, inp.sum(axis=-1), rtol=1e-15)
    if cpu.NUM_THREADS > 1:
        assert len(bt_calls) == 2 and all(T == 1 and shape[1:] == (1, 4) for _, T, shape in bt_calls)
        assert sum(Bb for Bb, _, _ in bt_calls) == 15


def test_parameter_gradients_are_the_same_every_run():
    """The summed gradients (layernorm's dweight and dbias, matmul's dbias) go through per-thread
    partial sums added in a fixed order: float32 results identical bit for bit, run after run."""
    rng = np.random.default_rng(16)
    x = rand(rng, 4, 64, 96).astype(np.float32)
    w, b = rand(rng, 96).astype(np.float32), rand(rng, 96).astype(np.float32)
    dout = rand(rng, 4, 64, 96).astype(np.float32)
    out, mean, rstd = np.empty_like(x), np.empty((4, 64), np.float32), np.empty((4, 64), np.float32)
    m.layernorm_forward(out, mean, rstd, x, w, b, 4, 64, 96)
    results = []
    for _ in range(5):
        dx, dw, db = np.zeros_like(x), np.zeros_like(w), np.zeros_like(b)
        m.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, 4, 64, 96)
        dxm, dwm, dbm = np.zeros_like(x), np.zeros((96, 96), np.float32), np.zeros(96, np.float32)
        m.matmul_backward(dxm, dwm, dbm, dout, x, w[None].repeat(96, 0), 4, 64, 96, 96)
        results.append((dx, dw, db, dxm, dwm, dbm))
    for again in results[1:]:
        for first, other in zip(results[0], again):
            np.testing.assert_array_equal(first, other)


def test_matmul_takes_the_blas_path(monkeypatch):
    """matmul_forward / matmul_backward on float32 go through NumPy's OpenBLAS sgemm called by ctypes
    (one call per block), never np.matmul: a lookup that silently fails and falls back fails here."""
    rng = np.random.default_rng(17)
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    if "openblas" not in blas.lower():
        pytest.skip(f"NumPy is built with {blas}, not OpenBLAS: the np.matmul fallback is the path")
    functions = cpu.gemm_functions()
    assert np.dtype(np.float32) in functions and np.dtype(np.float64) in functions
    calls = []

    def counting(dtype, fn):
        def call(*args):
            calls.append(dtype)
            return fn(*args)
        return call

    monkeypatch.setattr(cpu, "gemm_functions", lambda: {dt: counting(dt, fn) for dt, fn in functions.items()})

    def no_matmul(*args, **kwargs):
        raise AssertionError("np.matmul called: the BLAS path was not taken")

    monkeypatch.setattr(np, "matmul", no_matmul)
    Bx, Tx, Cx, OCx = 2, 24, 40, 56
    inp, weight, bias = (rand(rng, Bx, Tx, Cx).astype(np.float32), rand(rng, OCx, Cx).astype(np.float32),
                         rand(rng, OCx).astype(np.float32))
    out = np.empty((Bx, Tx, OCx), np.float32)
    m.matmul_forward(out, inp, weight, bias, Bx, Tx, Cx, OCx)
    forward_calls = len(calls)
    dout = rand(rng, Bx, Tx, OCx).astype(np.float32)
    dinp, dweight, dbias = np.zeros_like(inp), np.zeros_like(weight), np.zeros_like(bias)
    m.matmul_backward(dinp, dweight, dbias, dout, inp, weight, Bx, Tx, Cx, OCx)
    assert forward_calls >= 1 and len(calls) - forward_calls >= 2, calls     # dinp and dweight
    assert set(calls) == {np.dtype(np.float32)}
    i64, w64 = inp.astype(np.float64), weight.astype(np.float64)
    np.testing.assert_allclose(out, i64 @ w64.T + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dinp, dout.astype(np.float64) @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dweight, dout.reshape(-1, OCx).T.astype(np.float64) @ i64.reshape(-1, Cx),
                               rtol=1e-5, atol=1e-4)


def test_parallel_rows_waits_for_every_slice_on_an_error():
    """A slice that raises does not leave the other slices running behind the caller's back."""
    import threading
    import time
    if cpu.NUM_THREADS < 2:
        pytest.skip("one thread: no other slices")
    done = []
    caller = threading.get_ident()

    def work(r):
        if threading.get_ident() == caller:
            raise RuntimeError("boom")
        time.sleep(0.2)
        done.append(r)

    with pytest.raises(RuntimeError, match="boom"):
        cpu.parallel_rows(work, 2)
    assert len(done) == 1
