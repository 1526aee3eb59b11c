"""Every check that doc/classifier.md describes, in its order. Run from anywhere:

    python doc/classifier.py

Each check prints one line: [f64] or [f32], what is compared, and its max abs error. The script exits
non-zero if any error is above its tolerance (1e-10 in float64, 1e-5 in float32). Lines starting
with [info] are numbers the page quotes, not checks.
"""

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_gpt2 as tg  # noqa: E402  (the NumPy layers of section 3)
from checks import check, kernel_module, launched, verdict  # noqa: E402  (doc/checks.py: the check lines)


# a small vocabulary, padded as the real one is: V = 300 -> Vp = 384 (a multiple of 128)
B, T, C, V = 3, 5, 24, 300
Vp = tg.padded_vocab(V)
PAD = 1e4                                      # what the pad columns hold here: if any code read them,
rng = np.random.default_rng(0)                 # the softmax would be all theirs and every check would fail
logits_np = np.full((B, T, Vp), PAD)           # (B, T, Vp)
logits_np[..., :V] = 3 * rng.standard_normal((B, T, V))
targets_np = rng.integers(0, V, (B, T))        # (B, T) the next token at each position
dlosses_np = rng.standard_normal((B, T))       # (B, T) d loss / d losses[b, t], any values


# ---- 1. what the classifier computes: PyTorch, elementary ops
def torch_classifier(logits, targets):
    real = logits[..., :V]                                        # (B, T, Vp) -> (B, T, V): drop the pad
    e = torch.exp(real - real.max(-1, keepdim=True).values)       # shifted: exp never overflows
    probs = e / e.sum(-1, keepdim=True)                           # (B, T, V) each row sums to 1
    losses = -torch.log(probs.gather(-1, targets[..., None]))[..., 0]   # (B, T) -log p(target)
    return probs, losses


def section1():
    logits = torch.tensor(logits_np, requires_grad=True)
    targets = torch.tensor(targets_np)
    probs, losses = torch_classifier(logits, targets)
    check("f64", "torch: elementary probs vs F.softmax", probs.detach(),
          F.softmax(logits.detach()[..., :V], -1))
    check("f64", "torch: losses vs F.cross_entropy", losses.detach(),
          F.cross_entropy(logits.detach()[..., :V].reshape(-1, V), targets.reshape(-1),
                          reduction="none").view(B, T))
    dlosses = torch.tensor(dlosses_np)
    fakeloss = (losses * dlosses).sum()                # d fakeloss / d losses = dlosses
    fakeloss.backward()
    dlogits_ag = logits.grad.numpy()                   # (B, T, Vp); autograd gives the pad columns 0
    # the mean loss, which training differentiates: dlosses = 1 / (B*T) everywhere
    logits2 = torch.tensor(logits_np, requires_grad=True)
    F.cross_entropy(logits2[..., :V].reshape(-1, V), targets.reshape(-1)).backward()
    return dict(probs=probs.detach().numpy(), losses=losses.detach().numpy(), dlogits=dlogits_ag,
                dlogits_mean=logits2.grad.numpy())


# ---- 2. the backward pass on paper
def paper_backward(probs, targets, dlosses):
    onehot = F.one_hot(targets, V).to(probs.dtype)               # (B, T, V)
    dlogits = (probs - onehot) * dlosses[..., None]               # (B, T, V) the fused backward
    return dlogits


def section2(ref):
    probs, targets, dlosses = (torch.tensor(a) for a in (ref["probs"], targets_np, dlosses_np))
    dlogits = paper_backward(probs, targets, dlosses)
    check("f64", "paper: (probs - onehot) * dloss vs autograd", dlogits, ref["dlogits"][..., :V])
    check("f64", "paper: autograd's pad columns are 0", ref["dlogits"][..., V:], 0.0)
    check("f64", "paper: rows of dlogits sum to 0", dlogits.sum(-1), 0.0)
    check("f64", "paper: dloss = 1/(B*T) vs autograd of the mean loss",
          paper_backward(probs, targets, torch.full((B, T), 1.0 / (B * T))), ref["dlogits_mean"][..., :V])

    # the long way round: first d losses / d probs, then the softmax's Jacobian
    p_target = probs.gather(-1, targets[..., None])                # (B, T, 1)
    dprobs = torch.zeros(B, T, V).scatter(-1, targets[..., None], -dlosses[..., None] / p_target)
    two_step = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
    check("f64", "paper: through dprobs and the softmax Jacobian", two_step, dlogits)
    p_min = p_target.min().item()
    print(f"[info] paper: smallest p(target) {p_min:.1e}, so dprobs reaches {1 / p_min:.1e} * dloss")

    u = rng.standard_normal((B, T, Vp))
    u[..., V:] = 0                                     # move the real logits only

    def f(s):
        lg = torch.tensor(logits_np + s * u)
        return float((torch_classifier(lg, targets)[1] * dlosses).sum())

    h = 1e-3
    fd = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)
    check("f64", "paper: <dlogits, u> vs finite difference (rel)", (ref["dlogits"] * u).sum() / fd - 1, 0.0)


def padded(x):
    # (B, T, V) -> (B, T, Vp) with zeros in the pad columns
    out = np.zeros(x.shape[:-1] + (Vp,))
    out[..., :V] = x
    return out


# ---- 3. the NumPy layers of train_gpt2.py and their loop twins, in float64 and float32
def section3(ref):
    for dt, tag in ((np.float64, "f64"), (np.float32, "f32")):
        logits, dlosses, targets = logits_np.astype(dt), dlosses_np.astype(dt), targets_np.astype(np.int32)
        for name, softmax, backward in (("", tg.softmax_forward, tg.crossentropy_softmax_backward),
                                        ("_loop", tg.softmax_forward_loop, tg.crossentropy_softmax_backward_loop)):
            probs = np.full((B, T, Vp), np.nan, dt)     # NaN: every column must be written, pads with 0
            softmax(probs, logits, B, T, V, Vp)
            check(tag, f"numpy: softmax_forward{name} probs (pads 0) vs torch", probs, padded(ref["probs"]))
            dlogits = np.full((B, T, Vp), 0.25, dt)     # the gradient arrives holding something: add to it
            backward(dlogits, dlosses, probs, targets, B, T, V, Vp)
            assert dlogits.dtype == dt, "a float64 constant promoted the array"
            check(tag, f"numpy: crossentropy_softmax_backward{name} - old vs autograd", dlogits - 0.25,
                  ref["dlogits"])
        losses = np.empty((B, T), dt)
        tg.crossentropy_forward(losses, probs, targets, B, T, Vp)
        check(tag, "numpy: crossentropy_forward losses vs torch", losses, ref["losses"])


# ---- 4. the fused CUDA kernel of kernels/classifier.cu, on the CPU emulator
def section4(ref):
    mod = kernel_module("classifier")                  # kernels/classifier.cu on the emulator
    if mod is None:
        return
    os.environ["LLMC_EMULATE"] = "1"                   # train_gpt2_cuda: NumPy arrays + the kernel emulator
    import train_gpt2_cuda as tc

    f32 = np.float32
    targets = targets_np.astype(np.int32)
    logits = logits_np.astype(f32)
    losses = np.full((B, T), np.nan, f32)
    dlosses = dlosses_np.astype(f32)

    def classifier(write_dlogits):                     # the launcher's launch: one block of 1024 per (b, t) row
        launched(mod, lambda cu: cu.fused_classifier(logits, losses, dlosses, targets, B, T, V, Vp, write_dlogits),
                 packed=False)                         # the plain kernel, not its x128 twin
    classifier(0)
    check("f32", "cuda: forward (write_dlogits=0) losses vs torch", losses, ref["losses"])
    check("f32", "cuda: forward (write_dlogits=0) logits unchanged", logits, logits_np.astype(f32))

    classifier(1)
    check("f32", "cuda: backward (write_dlogits=1) dlogits vs autograd", logits, ref["dlogits"])
    check("f32", "cuda: backward losses vs torch", losses, ref["losses"])

    # through train_gpt2_cuda.py's launcher, as gpt2_backward calls it: dlosses None = the mean loss
    logits = logits_np.astype(f32)
    tc.fused_classifier(logits, losses, None, targets, B, T, V, Vp, write_dlogits=1)
    check("f32", "cuda: fused_classifier(dlosses=None) vs autograd of mean", logits, ref["dlogits_mean"])


# ---- 5. the padded vocabulary and the tied wte
def section5():
    import train_gpt2_torch as tt
    config = tg.GPT2Config(max_seq_len=1024, vocab_size=50257, num_layers=12, num_heads=12, channels=768,
                           padded_vocab_size=tg.padded_vocab(50257))
    n_trainer = tg.num_parameters(config)
    with torch.device("meta"):                         # shapes only, no memory, no init
        n_exporter = sum(p.numel() for p in tt.GPT(tt.GPTConfig()).parameters())   # wte counted once
    print(f"[info] vocab: V = 50257 = 29 * 1733, Vp = {config.padded_vocab_size} = 128 * "
          f"{config.padded_vocab_size // 128}; trainer {n_trainer:,} parameters, exporter {n_exporter:,}")
    Bm, Tm = 4, 1024
    one = Bm * Tm * config.padded_vocab_size
    print(f"[info] memory: B=4 T=1024: one (B,T,Vp) float32 tensor is {one / 2**18:.0f} MiB")
    check("f64", "vocab: Vp vs 50304", config.padded_vocab_size, 50304)
    check("f64", "vocab: trainer - exporter parameters vs (Vp - V) * C", n_trainer - n_exporter,
          (config.padded_vocab_size - config.vocab_size) * config.channels)

    # a toy model with GPT-2's two ends: x = wte[tokens] + wpe, h = tanh(x) for the 12 blocks and lnf,
    # logits = h @ wte^T; wte's pad rows are zero, as the exporter writes them
    tokens = rng.integers(0, V, (B, T))
    tokens[0, 3] = tokens[0, 1] = tokens[2, 4]         # one token three times: its row must add three times
    wte_np = 0.3 * rng.standard_normal((Vp, C))
    wte_np[V:] = 0
    wpe_np = 0.3 * rng.standard_normal((T, C))
    wte = torch.tensor(wte_np, requires_grad=True)
    x = wte[torch.tensor(tokens)] + torch.tensor(wpe_np)
    h = torch.tanh(x)
    logits = h @ wte.T                                 # (B, T, C) @ (C, Vp) -> (B, T, Vp)
    loss = F.cross_entropy(logits[..., :V].reshape(-1, V), torch.tensor(targets_np).reshape(-1))
    loss.backward()
    check("f64", "tied: pad columns of the logits are exactly 0", logits.detach()[..., V:], 0.0)

    # the same gradient from the NumPy layers: the classifier's share, then the embedding's
    hn = h.detach().numpy()
    lg, probs = np.empty((B, T, Vp)), np.empty((B, T, Vp))
    tg.matmul_forward(lg, hn, wte_np, None, B, T, C, Vp)
    tg.softmax_forward(probs, lg, B, T, V, Vp)
    dlogits = np.zeros((B, T, Vp))
    tg.crossentropy_softmax_backward(dlogits, np.full((B, T), 1.0 / (B * T)), probs, targets_np, B, T, V, Vp)
    dwte, dh = np.zeros((Vp, C)), np.zeros((B, T, C))
    tg.matmul_backward(dh, dwte, None, dlogits, hn, wte_np, B, T, C, Vp)       # wte as the classifier
    classifier_part = dwte.copy()
    dx = dh * (1 - hn ** 2)                                                    # through tanh
    tg.encoder_backward(dwte, np.zeros((T, C)), dx, tokens, B, T, C)           # wte as the embedding
    print(f"[info] tied: max |dwte| from the classifier {np.abs(classifier_part).max():.2e}, "
          f"from the embedding {np.abs(dwte - classifier_part).max():.2e}")
    check("f64", "tied: classifier + embedding dwte vs autograd", dwte, wte.grad)
    check("f64", "tied: pad rows of dwte are exactly 0", dwte[V:], 0.0)

    # so AdamW never moves them: a zero gradient keeps m and v at 0, and weight decay scales 0 to 0
    p, g = wte_np.astype(np.float32), dwte.astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t in range(1, 4):
        tg.adamw(p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, t)
    check("f32", "tied: pad rows of wte after 3 AdamW steps (decay 0.1)", p[V:], 0.0)
    check("f32", "tied: real rows of wte moved (1 = yes)", np.abs(p[:V] - wte_np[:V]).max() > 0, 1)


if __name__ == "__main__":
    torch.set_num_threads(1)   # as tests/test_optim.py: torch's two-thread results varied run to run there
    torch.set_default_dtype(torch.float64)
    ref = section1()
    section2(ref)
    section3(ref)
    section4(ref)
    section5()
    verdict()
