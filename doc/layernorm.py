"""Every check that doc/layernorm.md describes, in its order. Run from anywhere:

    python doc/layernorm.py

Each check prints one line: [f64] or [f32], what is compared, and its max abs error. The script exits
non-zero if any error is above its tolerance (1e-10 in float64, 1e-5 in float32).
"""

import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_gpt2 as tg  # noqa: E402  (the NumPy layers of section 3)
from checks import check, kernel_module, launched, verdict  # noqa: E402  (doc/checks.py: the check lines)


B, T, C = 3, 13, 48           # odd shapes: B*T = 39 rows, C not a multiple of 32
eps = 1e-5
rng = np.random.default_rng(0)
x_np = rng.standard_normal((B, T, C)) * 2 + 0.5      # (B, T, C) inp
w_np = 1 + 0.1 * rng.standard_normal(C)             # (C,) weight
b_np = 0.1 * rng.standard_normal(C)                 # (C,) bias
dout_np = rng.standard_normal((B, T, C))            # (B, T, C) the gradient from the layer above

# ---- 1. what LayerNorm computes: PyTorch, elementary ops, against autograd
def torch_layernorm(x, w, b):
    mean = x.sum(-1, keepdim=True) / C                  # (B, T, 1)
    xshift = x - mean                                   # (B, T, C)
    var = (xshift ** 2).sum(-1, keepdim=True) / C       # (B, T, 1) biased: divide by C, not C-1
    rstd = (var + eps) ** -0.5                          # (B, T, 1)
    norm = xshift * rstd                                # (B, T, C)
    out = norm * w + b                                  # (B, T, C)
    return out, norm, rstd


def section1():
    x = torch.tensor(x_np, requires_grad=True)
    w = torch.tensor(w_np, requires_grad=True)
    b = torch.tensor(b_np, requires_grad=True)
    dout = torch.tensor(dout_np)
    out, norm, rstd = torch_layernorm(x, w, b)
    check("f64", "torch: elementary ops vs F.layer_norm", out.detach(),
          torch.nn.functional.layer_norm(x, (C,), w, b, eps).detach())

    fakeloss = (out * dout).sum()                       # d fakeloss / d out = dout, whatever dout is
    fakeloss.backward()
    return dict(x=x, w=w, b=b, dout=dout, out=out.detach(), norm=norm.detach(), rstd=rstd.detach(),
                dx=x.grad.numpy(), dw=w.grad.numpy(), db=b.grad.numpy())


# ---- 2. the backward on paper: dbias, dweight, and the three terms of dinp
def paper_backward(dout, norm, rstd, w):
    db = dout.sum((0, 1))                                            # (C,)
    dw = (dout * norm).sum((0, 1))                                   # (C,)
    dnorm = dout * w                                                 # (B, T, C)
    dx = (dnorm - dnorm.mean(-1, keepdim=True)                       # direct path, through the mean,
          - norm * (dnorm * norm).mean(-1, keepdim=True)) * rstd     # and through the variance
    return db, dw, dx


def section2(ref):
    with torch.no_grad():
        db, dw, dx = paper_backward(ref["dout"], ref["norm"], ref["rstd"], ref["w"])
    check("f64", "paper: dbias vs autograd", db, ref["db"])
    check("f64", "paper: dweight vs autograd", dw, ref["dw"])
    check("f64", "paper: dinp (three terms) vs autograd", dx, ref["dx"])
    check("f64", "paper: dinp sums to 0 over C", dx.sum(-1), 0.0)

    # a finite difference of the fake loss along one random direction u: the four-point central stencil,
    # exact up to h^4 (h = 1e-3), so float64 rounding, not the stencil, sets the error; relative to the slope
    u = rng.standard_normal((B, T, C))
    wd, bd = ref["w"].detach(), ref["b"].detach()

    def f(s):                                           # the fake loss at x + s * u
        return float((torch.nn.functional.layer_norm(torch.tensor(x_np + s * u), (C,), wd, bd, eps)
                      * ref["dout"]).sum())

    h = 1e-3
    fd = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)
    slope = (ref["dx"] * u).sum()
    check("f64", "paper: <dinp, u> vs finite difference (rel)", slope / fd - 1, 0.0)

    # mean and rstd are what PyTorch's own kernel caches too
    _, mean_aten, rstd_aten = torch.ops.aten.native_layer_norm(ref["x"].detach(), [C], None, None, eps)
    ref["mean_aten"], ref["rstd_aten"] = mean_aten[..., 0].numpy(), rstd_aten[..., 0].numpy()


# ---- 3. the NumPy layer of train_gpt2.py, in float64 and float32, accumulating with +=
def section3(ref):
    for dt, tag in ((np.float64, "f64"), (np.float32, "f32")):
        inp, weight, bias, dout_ = (a.astype(dt) for a in (x_np, w_np, b_np, dout_np))
        out_ = np.empty((B, T, C), dt)
        mean_, rstd_ = np.empty((B, T), dt), np.empty((B, T), dt)
        tg.layernorm_forward(out_, mean_, rstd_, inp, weight, bias, B, T, C)
        check(tag, "numpy: layernorm_forward out vs torch", out_, ref["out"])
        check(tag, "numpy: cached mean vs aten native_layer_norm", mean_, ref["mean_aten"])
        check(tag, "numpy: cached rstd vs aten (relative)", rstd_ / ref["rstd_aten"] - 1, 0.0)
        # gradients arrive already holding something (another branch's share): backward must add to it
        old_dinp, old_dw, old_db = (np.full(s, 0.25, dt) for s in ((B, T, C), (C,), (C,)))
        dinp, dweight, dbias = old_dinp.copy(), old_dw.copy(), old_db.copy()
        tg.layernorm_backward(dinp, dweight, dbias, dout_, inp, weight, mean_, rstd_, B, T, C)
        assert dinp.dtype == dweight.dtype == dbias.dtype == dt, "a float64 constant promoted the arrays"
        check(tag, "numpy: layernorm_backward dinp - old vs autograd", dinp - old_dinp, ref["dx"])
        # dweight and dbias are sums over 39 rows: compare relative to their largest entry
        scale = np.abs(ref["dw"]).max()
        check(tag, "numpy: layernorm_backward dweight - old (rel)", (dweight - old_dw) / scale, ref["dw"] / scale)
        scale = np.abs(ref["db"]).max()
        check(tag, "numpy: layernorm_backward dbias - old (rel)", (dbias - old_db) / scale, ref["db"] / scale)


# ---- 4. the CUDA kernels of kernels/layernorm.cu, on the CPU emulator (float32 only)
def section4(ref):
    mod = kernel_module("layernorm")              # kernels/layernorm.cu on the emulator
    if mod is None:
        return
    f32 = np.float32
    inp, weight, bias, dout_ = (a.astype(f32) for a in (x_np, w_np, b_np, dout_np))
    out_ = np.empty((B, T, C), f32)
    mean_, rstd_ = np.empty((B, T), f32), np.empty((B, T), f32)
    # train_gpt2_cuda.py's launch: 8 warps = 8 rows per block; 39 rows -> 5 blocks (the plain kernel)
    launched(mod, lambda cu: cu.layernorm_forward(out_, mean_, rstd_, inp, weight, bias, B, T, C), packed=False)
    check("f32", "cuda: forward out vs torch", out_, ref["out"])
    check("f32", "cuda: forward mean vs aten", mean_, ref["mean_aten"])
    check("f32", "cuda: forward rstd vs aten (relative)", rstd_ / ref["rstd_aten"] - 1, 0.0)

    dinp = np.full((B, T, C), 0.25, f32)
    dweight, dbias = np.full(C, 0.25, f32), np.full(C, 0.25, f32)
    scratch = np.empty(B * T * 2 * C, f32)        # room for each block's dbias and dweight partials, C floats each
    # 16 rows per block; 39 rows -> 3 blocks, the last partial; then layernorm_backward_sum_kernel adds
    # the partials in block order
    launched(mod, lambda cu: cu.layernorm_backward(dinp, dweight, dbias, scratch, dout_, inp, weight, mean_, rstd_,
                                                   B, T, C), packed=False)
    check("f32", "cuda: backward dinp - old vs autograd", dinp - 0.25, ref["dx"])
    check("f32", "cuda: backward dweight - old (rel)", (dweight - 0.25) / np.abs(ref["dw"]).max(),
          ref["dw"] / np.abs(ref["dw"]).max())
    check("f32", "cuda: backward dbias - old (rel)", (dbias - 0.25) / np.abs(ref["db"]).max(),
          ref["db"] / np.abs(ref["db"]).max())


if __name__ == "__main__":
    torch.set_num_threads(1)   # as tests/test_optim.py: torch's two-thread results varied run to run there
    ref = section1()
    section2(ref)
    section3(ref)
    section4(ref)
    verdict()
