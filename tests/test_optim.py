"""AdamW, the gradient norm, clipping and the learning-rate schedules of train_gpt2.py against
torch.optim; gradient accumulation against one big batch."""

import numpy as np
import pytest
import torch

import train_gpt2 as m
from llmc import schedulers, utils
from llmc.model import GPT2Config, num_parameters

CONFIG = GPT2Config(max_seq_len=16, vocab_size=101, num_layers=2, num_heads=3, channels=48, padded_vocab_size=128)


def tiny_model(seed=0):
    r = np.random.default_rng(seed)
    model = m.GPT2(CONFIG, (r.standard_normal(num_parameters(CONFIG)) * 0.1).astype(np.float32))
    model.params.wte[CONFIG.vocab_size:] = 0
    return model


def set_grads(model, grads):
    model.grads_memory = grads
    model.grads = m.views(grads, model.param_shapes)


@pytest.mark.parametrize("chunk", [1000, 1 << 16])
def test_adamw_matches_torch(monkeypatch, chunk):
    monkeypatch.setattr(m, "ADAMW_CHUNK", chunk)            # chunk edges inside the tensors
    # torch on one thread: with two, about once in 14 runs after tests/test_layers.py, the second half of
    # its wte (elements 3072 on, its threads' split) differed from ours by up to 9.4e-7, while ours stayed
    # the same; with torch on one thread: 0 failures in 60 runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adamw_against_torch(chunk)
    finally:
        torch.set_num_threads(threads)


def adamw_against_torch(chunk):
    model = tiny_model()
    named = {name: torch.tensor(getattr(model.params, name).copy(), requires_grad=True)
             for name, _ in model.param_shapes}
    decay = [t for n, t in named.items() if n in m.DECAYED_PARAMS]
    no_decay = [t for n, t in named.items() if n not in m.DECAYED_PARAMS]
    assert all(t.dim() >= 2 for t in decay) and all(t.dim() < 3 for t in no_decay)
    lr, betas, eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.1
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps, foreach=False)
    r = np.random.default_rng(1)
    for t in range(1, 6):
        grads = (r.standard_normal(model.num_parameters) * 0.01).astype(np.float32)
        scale = 0.5 if t % 2 else 1.0
        set_grads(model, grads.copy())
        m.gpt2_update(model, lr, betas[0], betas[1], eps, wd, t, grad_scale=scale)
        given = m.views(grads, model.param_shapes)
        for name, tensor in named.items():
            tensor.grad = torch.tensor(getattr(given, name) * np.float32(scale))
        opt.step()
        # the update zeroes the gradients in its pass (the next step's zero_grad), and says so
        assert not model.grads_memory.any() and model.zeroed_grads is model.grads_memory
        for name, tensor in named.items():
            ours = getattr(model.params, name)
            np.testing.assert_allclose(ours, tensor.detach().numpy(), rtol=1e-6, atol=1e-8, err_msg=f"step {t} {name}")
    m_views = m.views(model.m_memory, model.param_shapes)
    v_views = m.views(model.v_memory, model.param_shapes)
    for name, tensor in named.items():
        state = opt.state[tensor]
        np.testing.assert_allclose(getattr(m_views, name), state["exp_avg"].numpy(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(getattr(v_views, name), state["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-12)
    assert model.params_memory.dtype == model.m_memory.dtype == np.float32


@pytest.mark.parametrize("lr, weight_decay, grad_scale", [(3e-3, 0.1, 0.5), (1e-4, 0.0, 1.0), (0.0, 0.1, 0.7)])
def test_adamw_in_place_gives_the_bits_of_adamw(lr, weight_decay, grad_scale):
    """The update gpt2_update runs (adamw_in_place: adamw's operations into one scratch array per thread)
    against the formula written on whole arrays (adamw), bit for bit, over five steps."""
    r = np.random.default_rng(4)
    n = 5000
    p = (r.standard_normal(n) * 0.1).astype(np.float32)
    formula = [p.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)]      # param, m, v
    in_place = [x.copy() for x in formula]
    for t in range(1, 6):
        g = (r.standard_normal(n) * 0.01).astype(np.float32)
        g_before = g.copy()
        for update, (param, m1, v1) in ((m.adamw, formula), (m.adamw_in_place, in_place)):
            update(param, g, m1, v1, lr, 0.9, 0.95, 1e-8, weight_decay, t, grad_scale)
        np.testing.assert_array_equal(g, g_before)                    # the gradients are read, not written
        for a, b in zip(formula, in_place):
            np.testing.assert_array_equal(a, b, err_msg=f"step {t}")
    assert in_place[1].any()                                          # the moments did move
    if lr == 0.0:
        np.testing.assert_array_equal(in_place[0], p)


def test_weight_decay_only_on_2d_weights():
    model = tiny_model()
    before = model.params_memory.copy()
    set_grads(model, np.zeros(model.num_parameters, np.float32))
    m.gpt2_update(model, 0.1, 0.9, 0.999, 1e-8, 0.5, 1)              # zero grads: only decay moves p
    after = m.views(model.params_memory, model.param_shapes)
    old = m.views(before, model.param_shapes)
    for name, _ in model.param_shapes:
        expected = getattr(old, name) * np.float32(1 - 0.1 * 0.5) if name in m.DECAYED_PARAMS else getattr(old, name)
        np.testing.assert_allclose(getattr(after, name), expected, rtol=1e-6, err_msg=name)


def test_grad_norm_and_clip_match_torch():
    model = tiny_model()
    grads = (np.random.default_rng(2).standard_normal(model.num_parameters) * 0.3).astype(np.float32)
    set_grads(model, grads)
    norm = m.gpt2_calculate_grad_norm(model)
    tensors = [torch.zeros(shape, requires_grad=True) for _, shape in model.param_shapes]
    for t, (name, _) in zip(tensors, model.param_shapes):
        t.grad = torch.tensor(getattr(model.grads, name).copy())
    total = torch.nn.utils.clip_grad_norm_(tensors, max_norm=1.0)
    assert abs(norm - total.item()) <= 1e-5 * norm
    assert abs(norm - float(np.linalg.norm(grads.astype(np.float64)))) <= 1e-5 * norm
    scale = m.grad_clip_scale(norm, 1.0)
    assert scale < 1
    for t, (name, _) in zip(tensors, model.param_shapes):
        np.testing.assert_allclose(getattr(model.grads, name) * np.float32(scale), t.grad.numpy(), rtol=1e-5, atol=1e-9)
    assert m.grad_clip_scale(norm, 0.0) == 1.0 and m.grad_clip_scale(0.5, 1.0) == 1.0


def torch_lrs(schedule, lr, warmup, steps, frac):
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    S = torch.optim.lr_scheduler
    if schedule == "cosine":
        main = S.CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=lr * frac)
    elif schedule == "linear":
        main = S.LinearLR(opt, start_factor=1.0, end_factor=frac, total_iters=steps - warmup)
    else:
        main = S.ConstantLR(opt, factor=1.0, total_iters=0)
    sched = main if warmup == 0 else S.SequentialLR(
        opt, [S.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1), main], milestones=[warmup])
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule,warmup", [("cosine", 0), ("cosine", 5), ("linear", 0), ("linear", 4), ("constant", 0)])
def test_lr_schedules_match_torch(schedule, warmup):
    lr, steps, frac = 6e-4, 30, 0.1
    ours = [schedulers.get_lr(s, schedule, lr, warmup, steps, frac) for s in range(steps)]
    np.testing.assert_allclose(ours, torch_lrs(schedule, lr, warmup, steps, frac), rtol=1e-6, atol=1e-12)
    if warmup:
        assert ours[0] == pytest.approx(lr / warmup) and ours[warmup - 1] == pytest.approx(lr)
    if schedule == "cosine":
        assert schedulers.get_lr(steps, schedule, lr, warmup, steps, frac) == pytest.approx(lr * frac)


def wsd_by_definition(lr, warmup, N, frac):
    """Warmup-stable-decay over steps 0..N, written from its definition (not from schedulers.py):
    lr * (step+1)/warmup while warming up, lr until int(0.8 N), then from lr down to lr * frac
    along 1 - sqrt of the fraction of the decay done."""
    steps = np.arange(N + 1, dtype=np.float64)
    d = int(0.8 * N)
    min_lr = lr * frac
    decaying = min_lr + (1 - np.sqrt(np.clip(steps - d, 0, None) / (N - d))) * (lr - min_lr)
    out = np.where(steps < d, lr, decaying)
    return np.where(steps < warmup, lr * (steps + 1) / max(warmup, 1), out)


@pytest.mark.parametrize("N,warmup,frac", [(10, 0, 0.0), (10, 2, 0.1), (37, 5, 0.5), (100, 10, 0.0),
                                           (1000, 0, 0.1), (7, 6, 0.2)])
def test_wsd_schedule(N, warmup, frac):
    """llm.c's wsd at every step 0..N: warmup, constant, then the 1-sqrt decay over the last 20%."""
    lr = 6e-4
    ours = [schedulers.get_lr(s, "wsd", lr, warmup, N, frac) for s in range(N + 1)]
    np.testing.assert_allclose(ours, wsd_by_definition(lr, warmup, N, frac), rtol=1e-12, atol=0)
    d = int(0.8 * N)
    assert ours[0] == pytest.approx(lr / warmup if warmup else lr, rel=1e-12)
    assert ours[N] == pytest.approx(lr * frac, rel=1e-12, abs=1e-18)     # the end of the decay: min_lr
    if warmup <= d:
        assert ours[d] == pytest.approx(lr, rel=1e-12)                   # the decay starts from lr
        assert all(v == lr for v in ours[warmup:d])                      # stable: exactly lr
    after = ours[max(warmup, d):]
    assert all(b <= a for a, b in zip(after, after[1:]))                 # never rises once decaying


def test_wsd_schedule_numbers():
    """N=10, warmup 2, lr 1e-3 to 0: decay from step 8; step 9 is (1 - sqrt(1/2)) lr."""
    ours = [schedulers.get_lr(s, "wsd", 1e-3, 2, 10, 0.0) for s in range(11)]
    want = [5e-4] + [1e-3] * 8 + [2.9289321881345245e-4, 0.0]
    np.testing.assert_allclose(ours, want, rtol=1e-12, atol=1e-19)


def test_lr_bad_schedule():
    with pytest.raises(utils.ConfigError, match="unknown learning rate schedule 'cosin'"):
        schedulers.get_lr(3, "cosin", 1e-4, 0, 10, 0.0)


def test_gradient_accumulation_equals_big_batch():
    """Two micro-batches accumulated then averaged give the gradient of one batch twice as big."""
    r = np.random.default_rng(3)
    B, T = 4, 7
    x = r.integers(0, CONFIG.vocab_size, size=(B, T))
    y = r.integers(0, CONFIG.vocab_size, size=(B, T))
    big = tiny_model()
    m.gpt2_forward(big, x, y, B, T)
    m.gpt2_zero_grad(big)
    m.gpt2_backward(big)
    small = tiny_model()
    m.gpt2_forward(small, x[:2], y[:2], 2, T)        # allocates grads at the first backward
    m.gpt2_zero_grad(small)
    m.gpt2_backward(small)
    m.gpt2_forward(small, x[2:], y[2:], 2, T)
    m.gpt2_backward(small)
    np.testing.assert_allclose(small.grads_memory / 2, big.grads_memory, rtol=1e-4, atol=1e-7)


def test_adamw_with_learning_rate_zero_moves_only_the_moments():
    """lr 0 (e.g. -l 0): no division by the zero step size; m and v move as torch's do, p stays."""
    model = tiny_model()
    before = model.params_memory.copy()
    grads = np.random.default_rng(3).standard_normal(model.num_parameters).astype(np.float32)
    set_grads(model, grads.copy())                      # (the update zeroes the model's gradients)
    m.gpt2_update(model, 0.0, 0.9, 0.95, 1e-8, 0.1, 1)
    np.testing.assert_array_equal(model.params_memory, before)
    np.testing.assert_allclose(model.m_memory, 0.1 * grads, rtol=1e-6)
    np.testing.assert_allclose(model.v_memory, 0.05 * grads * grads, rtol=1e-5)
