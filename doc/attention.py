"""Every check that doc/attention.md describes, in its order. Run from anywhere:

    python doc/attention.py

Each check prints one line: [f64] or [f32], what is compared, and its max abs error. The script exits
non-zero if any error is above its tolerance (1e-10 in float64, 1e-5 in float32). Lines starting
with [info] are numbers the page quotes (memory sizes), not checks.
"""

import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_gpt2 as tg  # noqa: E402  (the NumPy layers of section 3)
from checks import check, kernel_module, recorded_launches, run_launches, verdict, with_arrays  # noqa: E402


# odd shapes: T = 37 > 32, so a warp walks a row of att in two strides; hs = 16, C = 48
B, T, NH, C = 2, 37, 3, 48
hs = C // NH
rng = np.random.default_rng(0)
qkv_np = rng.standard_normal((B, T, 3 * C))          # (B, T, 3C) inp: q|k|v of every position
dout_np = rng.standard_normal((B, T, C))             # (B, T, C) the gradient from the layer above


# ---- 1. what attention computes: PyTorch, elementary ops
def torch_attention(qkv):
    q, k, v = qkv.split(C, dim=2)                       # 3 x (B, T, C)
    q = q.view(B, T, NH, hs).transpose(1, 2)            # (B, T, C) -> (B, NH, T, hs)
    k = k.view(B, T, NH, hs).transpose(1, 2)            # (B, T, C) -> (B, NH, T, hs)
    v = v.view(B, T, NH, hs).transpose(1, 2)            # (B, T, C) -> (B, NH, T, hs)
    preatt = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, NH, T, T): row t scores every t2
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # (T, T) True where t2 > t
    preatt = preatt.masked_fill(future, float("-inf"))
    e = torch.exp(preatt - preatt.max(-1, keepdim=True).values)   # exp(-inf) = 0 on the future
    att = e / e.sum(-1, keepdim=True)                   # (B, NH, T, T) each row sums to 1
    y = att @ v                                         # (B, NH, T, T) @ (B, NH, T, hs) -> (B, NH, T, hs)
    out = y.transpose(1, 2).reshape(B, T, C)            # (B, NH, T, hs) -> (B, T, C) heads side by side
    return q, k, v, preatt, att, out


def section1():
    qkv = torch.tensor(qkv_np, requires_grad=True)
    q, k, v, preatt, att, out = torch_attention(qkv)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)         # (B, NH, T, hs)
    check("f64", "torch: elementary ops vs F.scaled_dot_product_attention",
          out.detach(), sdpa.transpose(1, 2).reshape(B, T, C).detach())
    check("f64", "torch: att is 0 above the diagonal", att.detach()[..., torch.from_numpy(future_np())], 0.0)
    check("f64", "torch: rows of att sum to 1", att.detach().sum(-1), 1.0)

    dout = torch.tensor(dout_np)
    fakeloss = (out * dout).sum()                       # d fakeloss / d out = dout
    fakeloss.backward()
    # the same gradient through PyTorch's fused attention
    qkv2 = torch.tensor(qkv_np, requires_grad=True)
    q2, k2, v2 = (x.view(B, T, NH, hs).transpose(1, 2) for x in qkv2.split(C, dim=2))
    y2 = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    (y2.transpose(1, 2).reshape(B, T, C) * dout).sum().backward()
    check("f64", "torch: autograd dinp, elementary vs SDPA", qkv.grad, qkv2.grad)
    return dict(q=q.detach(), k=k.detach(), v=v.detach(), preatt=preatt.detach(), att=att.detach(),
                out=out.detach(), dinp=qkv.grad.numpy())


def future_np():
    return np.triu(np.ones((T, T), dtype=bool), k=1)     # True above the diagonal


def heads(x):
    return x.view(B, T, NH, hs).transpose(1, 2)         # (B, T, C) -> (B, NH, T, hs)


def merge_qkv(dq, dk, dv):
    # three (B, NH, T, hs) -> (B, T, 3C), the layout of inp
    return torch.cat([x.transpose(1, 2).reshape(B, T, C) for x in (dq, dk, dv)], dim=2)


# ---- 2. the backward pass on paper
def paper_backward(q, k, v, att, dout):
    scale = 1.0 / math.sqrt(hs)
    dy = heads(dout)                                    # (B, T, C) -> (B, NH, T, hs)
    datt = dy @ v.transpose(-2, -1)                     # y = att @ v: (B, NH, T, hs) @ (B, NH, hs, T)
    dv = att.transpose(-2, -1) @ dy                     #              (B, NH, T, T) @ (B, NH, T, hs)
    dpreatt = att * (datt - (att * datt).sum(-1, keepdim=True))   # through the softmax
    dq = scale * (dpreatt @ k)                          # preatt = scale * q @ k^T
    dk = scale * (dpreatt.transpose(-2, -1) @ q)
    return datt, dpreatt, dq, dk, dv


def section2(ref):
    q, k, v, att = ref["q"], ref["k"], ref["v"], ref["att"]
    dout = torch.tensor(dout_np)
    datt, dpreatt, dq, dk, dv = paper_backward(q, k, v, att, dout)
    dinp = merge_qkv(dq, dk, dv)
    C3 = ref["dinp"]
    check("f64", "paper: dq vs autograd", dinp[..., :C], C3[..., :C])
    check("f64", "paper: dk vs autograd", dinp[..., C:2 * C], C3[..., C:2 * C])
    check("f64", "paper: dv vs autograd", dinp[..., 2 * C:], C3[..., 2 * C:])

    # the softmax Jacobian of one row, J = diag(a) - a a^T, against torch's; J is symmetric,
    # so J @ datt is the vector-Jacobian product written in paper_backward
    b, h, t = 1, 2, 20
    row = ref["preatt"][b, h, t, :t + 1].clone()
    J = torch.autograd.functional.jacobian(lambda z: torch.softmax(z, -1), row)
    a = att[b, h, t, :t + 1]
    check("f64", "paper: softmax Jacobian diag(a) - a a^T vs torch", torch.diag(a) - torch.outer(a, a), J)
    check("f64", "paper: J @ datt vs dpreatt (one row)", J @ datt[b, h, t, :t + 1], dpreatt[b, h, t, :t + 1])

    # the mask: datt is not 0 above the diagonal (dy @ v^T fills the square), dpreatt is
    mask = torch.from_numpy(future_np())
    print(f"[info] paper: max |datt| above the diagonal {datt[..., mask].abs().max():.2f}")
    check("f64", "paper: dpreatt is 0 above the diagonal", dpreatt[..., mask], 0.0)
    check("f64", "paper: rows of dpreatt sum to 0", dpreatt.sum(-1), 0.0)

    # causality, backwards: if dout is 0 after position t0, no input after t0 gets a gradient
    t0 = 11
    dout_early = dout.clone()
    dout_early[:, t0 + 1:] = 0
    _, _, dq0, dk0, dv0 = paper_backward(q, k, v, att, dout_early)
    check("f64", "paper: dinp after t0 is 0 when dout is 0 after t0", merge_qkv(dq0, dk0, dv0)[:, t0 + 1:], 0.0)

    # an independent witness: a four-point finite difference of the fake loss along a random u
    u = rng.standard_normal((B, T, 3 * C))

    def f(s):
        return float((torch_attention(torch.tensor(qkv_np + s * u))[5] * dout).sum())

    hh = 1e-3
    fd = (8 * (f(hh) - f(-hh)) - (f(2 * hh) - f(-2 * hh))) / (12 * hh)
    check("f64", "paper: <dinp, u> vs finite difference (rel)", (C3 * u).sum() / fd - 1, 0.0)
    return dict(datt=datt.numpy(), dpreatt=dpreatt.numpy(), dq=dq.numpy(), dk=dk.numpy(), dv=dv.numpy())


# ---- 3. the NumPy layer of train_gpt2.py and its loop twin, in float64 and float32
def section3(ref, pap):
    mask = future_np()
    for dt, tag in ((np.float64, "f64"), (np.float32, "f32")):
        inp, dout = qkv_np.astype(dt), dout_np.astype(dt)
        for name, fwd, bwd in (("", tg.attention_forward, tg.attention_backward),
                               ("_loop", tg.attention_forward_loop, tg.attention_backward_loop)):
            out, preatt, att = np.empty((B, T, C), dt), np.empty((B, NH, T, T), dt), np.empty((B, NH, T, T), dt)
            fwd(out, preatt, att, inp, B, T, C, NH)
            check(tag, f"numpy: attention_forward{name} out vs torch", out, ref["out"])
            check(tag, f"numpy: attention_forward{name} att vs torch", att, ref["att"])
            check(tag, f"numpy: attention_forward{name} preatt (t2 <= t)", preatt[..., ~mask],
                  ref["preatt"].numpy()[..., ~mask])
            check(tag, f"numpy: attention_forward{name} preatt -inf above diag", np.isfinite(preatt[..., mask]), 0)
            # dinp arrives holding something already (backward must add to it); datt and dpreatt are
            # this layer's own scratch, zeroed by gpt2_backward, and read back after they are added to
            dinp = np.full((B, T, 3 * C), 0.25, dt)
            dpreatt, datt = np.zeros((B, NH, T, T), dt), np.zeros((B, NH, T, T), dt)
            bwd(dinp, dpreatt, datt, dout, inp, att, B, T, C, NH)
            assert dinp.dtype == dpreatt.dtype == datt.dtype == dt, "a float64 constant promoted the arrays"
            check(tag, f"numpy: attention_backward{name} dinp - old vs autograd", dinp - 0.25, ref["dinp"])
            check(tag, f"numpy: attention_backward{name} dpreatt vs paper", dpreatt, pap["dpreatt"])
            # the loop twin computes datt only where att can use it (t2 <= t)
            check(tag, f"numpy: attention_backward{name} datt (t2 <= t) vs paper", datt[..., ~mask],
                  pap["datt"][..., ~mask])


# ---- 4. the CUDA kernels of kernels/attention.cu and the cuBLAS calls, on the CPU emulator
def section4(ref, pap):
    mod = kernel_module("attention")               # kernels/attention.cu on the emulator
    if mod is None:
        return
    os.environ["LLMC_EMULATE"] = "1"               # train_gpt2_cuda: NumPy arrays + the kernel emulator
    import train_gpt2_cuda as tc

    f32 = np.float32
    scale = 1.0 / math.sqrt(hs)
    inp = qkv_np.astype(f32)
    tq, tk, tv = (ref[n].numpy() for n in "qkv")     # (B, NH, T, hs) each, float64
    big = max(B * T * 3 * C, B * NH * T * T)          # inp doubles as the preatt and vaccum scratch

    # the kernels one at a time, as train_gpt2_cuda.py's launchers launch them (grids, blocks, scalars: recorded,
    # not made, by dev/check_kernel.py; their GEMMs do not run), each fed the float32 of the exact reference input
    buffer = lambda n=big: np.zeros(n, f32)           # noqa: E731  (what the layer would chain through)
    permute, softmax, unpermute = recorded_launches(
        lambda cu: cu.attention_forward(buffer(B * T * C), buffer(), buffer(B * NH * T * T), buffer(), B, T, C, NH))
    unpermute_back, softmax_back, permute_back = recorded_launches(
        lambda cu: cu.attention_backward(*(buffer() for _ in range(5)), buffer(B * T * C), buffer(),
                                         buffer(B * NH * T * T), B, T, C, NH))
    q, k, v = (np.empty((B, NH, T, hs), f32) for _ in range(3))
    run_launches(mod, [with_arrays(permute, q, k, v, inp)])
    check("f32", "cuda: permute_kernel q|k|v vs torch", np.stack([q, k, v]), np.stack([tq, tk, tv]))

    preatt = q @ k.transpose(0, 1, 3, 2)              # unscaled, as the sgemm leaves it
    att = np.empty((B, NH, T, T), f32)
    run_launches(mod, [with_arrays(softmax, att, preatt)])
    check("f32", "cuda: softmax_forward_kernel att vs torch", att, ref["att"])

    vaccum = (ref["att"] @ ref["v"]).numpy().astype(f32)   # (B, NH, T, hs)
    out = np.empty((B, T, C), f32)
    run_launches(mod, [with_arrays(unpermute, out, vaccum)])
    check("f32", "cuda: unpermute_kernel out vs torch", out, ref["out"])

    dvaccum = np.empty((B, NH, T, hs), f32)
    run_launches(mod, [with_arrays(unpermute_back, dvaccum, dout_np.astype(f32))])
    check("f32", "cuda: unpermute_backward_kernel vs dout by heads", dvaccum, heads(torch.tensor(dout_np)))

    dpreatt = np.empty((B, NH, T, T), f32)
    run_launches(mod, [with_arrays(softmax_back, dpreatt, pap["datt"].astype(f32), ref["att"].numpy().astype(f32))])
    # the kernel's preatt is unscaled, so its gradient carries the scale: scale * dpreatt(scaled)
    check("f32", "cuda: softmax_autoregressive_backward vs scale*paper", dpreatt, scale * pap["dpreatt"])

    dinp = np.empty((B, T, 3 * C), f32)
    run_launches(mod, [with_arrays(permute_back, dinp, *(pap[n].astype(f32) for n in ("dq", "dk", "dv")))])
    check("f32", "cuda: permute_backward_kernel dinp vs autograd", dinp, ref["dinp"])

    # the whole layer as train_gpt2_cuda.py runs it: kernels + strided-batched GEMMs
    scratch = np.zeros(big, f32)
    tc.view(scratch, B, T, 3 * C)[...] = inp
    out, att = np.zeros((B, T, C), f32), np.zeros((B, NH, T, T), f32)
    qkvr = np.zeros((3, B, NH, T, hs), f32)
    tc.attention_forward(out, qkvr, att, scratch, B, T, C, NH)
    check("f32", "cuda: train_gpt2_cuda.attention_forward out vs torch", out, ref["out"])
    check("f32", "cuda: train_gpt2_cuda.attention_forward att vs torch", att, ref["att"])

    dinp = np.full((B, T, 3 * C), np.nan, f32)        # written (=), not accumulated: NaN must vanish
    dqkvr, dpreatt_s, datt_s = np.zeros(3 * B * T * C, f32), np.zeros(big, f32), np.zeros(big, f32)
    tc.attention_backward(dinp, dqkvr, dpreatt_s, datt_s, np.zeros(B * T * C, f32), dout_np.astype(f32),
                          qkvr, att, B, T, C, NH)
    check("f32", "cuda: train_gpt2_cuda.attention_backward dinp vs autograd", dinp, ref["dinp"])


# ---- 5. memory: (B, NH, T, T) per layer
def section5():
    import train_gpt2_cuda as tc
    config = tg.GPT2Config(max_seq_len=1024, vocab_size=50257, num_layers=12, num_heads=12, channels=768,
                           padded_vocab_size=50304)
    Bm, Tm, GiB = 4, 1024, 2**30 / 4                  # GiB in float32 numbers
    one = Bm * config.num_heads * Tm * Tm
    print(f"[info] memory: B=4 T=1024 d12: one (B,NH,T,T) float32 tensor is {one / 2**18:.0f} MiB")
    for who, shapes in (("train_gpt2.py", tg.activation_shapes(config, Bm, Tm)),
                        ("train_gpt2_cuda.py", tc.activation_shapes(config, Bm, Tm)),
                        ("train_gpt2_cuda.py -fa 1", tc.activation_shapes(config, Bm, Tm, flash=True))):
        shapes = dict(shapes)
        total = sum(math.prod(s) for s in shapes.values())
        square = sum(math.prod(shapes[n]) for n in ("preatt", "att") if n in shapes)
        print(f"[info] memory: {who} activations {total / GiB:.2f} GiB, of which (B,NH,T,T) per layer "
              f"{square / GiB:.2f} GiB ({100 * square / total:.0f}%)")


# ---- 6. flash attention: the same layer in tiles, never holding (T, T)
BR, BC = 16, 8        # query rows and key columns per tile: T = 37 leaves a tail of 5 in both


def tiles(n, size):
    """(start, stop) of each tile of `size` over range(n), the last one short when size does not divide n."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def causal_mask(rows, cols):
    """(len(rows), len(cols)) True where the key is in the query's future: the -inf entries of one tile."""
    return np.arange(*cols)[None, :] > np.arange(*rows)[:, None]


def flash_forward(q, k, v):
    """O (B, NH, T, hs) and the log-sum-exp L (B, NH, T) of each row's masked scores, one query tile at a
    time against the key tiles up to its diagonal, the softmax online: a running max m and a running sum
    l relative to it, both rescaled by exp(m_old - m_new) whenever a tile raises the max. Also returns
    the number of (query tile, key tile) pairs computed."""
    scale = 1.0 / math.sqrt(hs)
    O, L, computed = np.zeros(q.shape), np.zeros(q.shape[:3]), 0
    for r0, r1 in tiles(T, BR):
        qi = q[:, :, r0:r1]                                  # (B, NH, Br, hs)
        m = np.full(qi.shape[:3], -np.inf)                   # (B, NH, Br) running max
        l = np.zeros(qi.shape[:3])                           # (B, NH, Br) running sum of exp(s - m)
        acc = np.zeros(qi.shape)                             # (B, NH, Br, hs) running sum of exp(s - m) v
        for c0, c1 in tiles(T, BC):
            if c0 > r1 - 1:                                  # every key of the tile is after every query
                break
            computed += 1
            s = scale * qi @ k[:, :, c0:c1].swapaxes(-1, -2)  # (B, NH, Br, Bc)
            s[..., causal_mask((r0, r1), (c0, c1))] = -np.inf
            m_new = np.maximum(m, s.max(-1))                 # finite: key tile 0 holds position 0
            p = np.exp(s - m_new[..., None])                 # exp(-inf) = 0 on the future
            rescale = np.exp(m - m_new)                      # 0 on the first tile (m = -inf)
            l = l * rescale + p.sum(-1)
            acc = acc * rescale[..., None] + p @ v[:, :, c0:c1]
            m = m_new
        O[:, :, r0:r1] = acc / l[..., None]
        L[:, :, r0:r1] = m + np.log(l)
    return O, L, computed


def recompute_p(q, k, L, rows, cols):
    """One tile of the probabilities, from Q, K and L alone: exp(scale q k^T - L), 0 in the future."""
    s = q[:, :, rows[0]:rows[1]] @ k[:, :, cols[0]:cols[1]].swapaxes(-1, -2) / math.sqrt(hs)
    s[..., causal_mask(rows, cols)] = -np.inf
    return np.exp(s - L[:, :, rows[0]:rows[1], None])


def flash_backward(q, k, v, O, L, dO):
    """dq, dk, dv (B, NH, T, hs) in two passes over the same tiles, each writing only what it owns: by query
    tile (dq: sums over the key tiles up to it), then by key tile (dk, dv: sums over the query tiles at or
    below the diagonal), the order of flash_attention.cu's two launches. No tile of one pass adds into
    another's rows, so there is nothing to add atomically. Each pass recomputes P from Q, K and L;
    D = rowsum(dO * O) comes first (the kernel's dq pass writes it, the dk/dv pass reads it)."""
    scale = 1.0 / math.sqrt(hs)
    D = (dO * O).sum(-1)                                     # (B, NH, T) = rowsum(P * dP) of each row
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)

    def ds_of(rows, cols, p):                                # dS = P * (dP - D), dP = dO V^T
        dp = dO[:, :, rows[0]:rows[1]] @ v[:, :, cols[0]:cols[1]].swapaxes(-1, -2)
        return p * (dp - D[:, :, rows[0]:rows[1], None])

    for rows in tiles(T, BR):                                # pass 1: a query tile owns its dq rows
        for cols in tiles(T, BC):
            if cols[0] > rows[1] - 1:
                break                                        # this key tile and the rest: all in the future
            p = recompute_p(q, k, L, rows, cols)
            dq[:, :, rows[0]:rows[1]] += scale * ds_of(rows, cols, p) @ k[:, :, cols[0]:cols[1]]
    for cols in tiles(T, BC):                                # pass 2: a key tile owns its dk and dv rows
        for rows in tiles(T, BR):
            if cols[0] > rows[1] - 1:
                continue                                     # above the diagonal: P = 0, nothing to add
            p = recompute_p(q, k, L, rows, cols)
            dv[:, :, cols[0]:cols[1]] += p.swapaxes(-1, -2) @ dO[:, :, rows[0]:rows[1]]
            dk[:, :, cols[0]:cols[1]] += scale * ds_of(rows, cols, p).swapaxes(-1, -2) @ q[:, :, rows[0]:rows[1]]
    return dq, dk, dv


def tiles_needed(T_, br, bc):
    """The (query tile, key tile) pairs holding at least one entry t2 <= t, counted on the mask itself."""
    past = ~np.triu(np.ones((T_, T_), dtype=bool), k=1)     # (T, T) True where t2 <= t
    return sum(bool(past[r0:r1, c0:c1].any()) for r0, r1 in tiles(T_, br) for c0, c1 in tiles(T_, bc))


def traffic(B_, T_, NH_, hs_, itemsize=2):
    """Bytes and FLOPs of one layer's attention, forward + backward, at (B, T, NH, hs) in bf16: the
    materialized path's passes over (B, NH, T, T) tensors, and what a flash kernel must move at least
    (each input read once, each output written once)."""
    square = B_ * NH_ * T_ * T_ * itemsize                  # one (B, NH, T, T) tensor
    passes = {"forward": ["write preatt (q @ k^T)", "read preatt (softmax)", "write att (softmax)",
                          "read att (att @ v)"],
              "backward": ["write datt (dy @ v^T)", "read att (att^T @ dy)", "read att (softmax backward)",
                           "read datt (softmax backward)", "write dpreatt (softmax backward)",
                           "read dpreatt (dq)", "read dpreatt (dk)"]}
    n_passes = sum(len(p) for p in passes.values())
    gemm = 2 * B_ * NH_ * T_ * T_ * hs_                     # FLOPs of one (T, T) x hs product per head
    row = B_ * T_ * NH_ * hs_ * itemsize                     # one (B, T, C) tensor
    stat = B_ * NH_ * T_ * 4                                 # one fp32 number per row: L or D
    flash = (3 * row + row + stat                            # forward: read q|k|v, write O and L
             + 3 * row + row + row + stat                    # backward: read q|k|v, O, dO, L
             + stat + stat + 3 * row)                        # D written and read, d(q|k|v) written
    return dict(square=square, n_passes=n_passes, materialized=n_passes * square, gemm_materialized=6 * gemm,
                flash=flash, gemm=gemm)


def flash_kernel_lse():
    """kernels/flash_attention.cu's forward through train_gpt2_cuda's launcher on the emulator (bf16, so its own
    shapes: hs = 64, T = 37): the log-sum-exp it saves, kept in fp32 from fp32 scores, against float64 from the
    same bf16 inputs. (O is rounded to bf16; tests/test_flash_attention.py holds it to its bf16 bounds.)"""
    if shutil.which(os.environ.get("CXX", "g++")) is None:   # no emulator: section 4 printed the [skip] line
        return
    import train_gpt2_cuda as tc                         # LLMC_EMULATE=1 since section 4
    from llmc.formats import bf16_to_f32, f32_to_bf16
    Bk, NHk, hsk, Tk = 1, 2, 64, 37
    Ck = NHk * hsk
    qkv = f32_to_bf16(np.random.default_rng(6).standard_normal((Bk, Tk, 3 * Ck)).astype(np.float32))
    out, lse = np.zeros((Bk, Tk, Ck), tc.BF16), np.full((Bk, NHk, Tk), np.nan, np.float32)
    tc.flash_attention_forward(out, lse, qkv, Bk, Tk, Ck, NHk)
    x = bf16_to_f32(qkv).astype(np.float64).reshape(Bk, Tk, 3, NHk, hsk).transpose(2, 0, 3, 1, 4)  # (3,B,NH,T,hs)
    s = x[0] @ x[1].swapaxes(-1, -2) / math.sqrt(hsk)    # (B, NH, T, T)
    s[..., np.triu(np.ones((Tk, Tk), dtype=bool), k=1)] = -np.inf
    m = s.max(-1, keepdims=True)
    want = m[..., 0] + np.log(np.exp(s - m).sum(-1))     # (B, NH, T)
    check("f32", "cuda: flash_attention_forward lse vs log-sum-exp", lse, want)


def section6(ref, pap):
    q, k, v = (ref[n].numpy() for n in "qkv")             # (B, NH, T, hs) float64
    dO = heads(torch.tensor(dout_np)).numpy()
    preatt, att = ref["preatt"].numpy(), ref["att"].numpy()  # preatt: scaled, -inf in the future

    # the online softmax identity on one row, in chunks of 5: the running (m, l) ends as (max, sum)
    row = preatt[1, 2, 30, :31]
    m, l = -np.inf, 0.0
    for c in range(0, row.size, 5):
        m_new = max(m, row[c:c + 5].max())
        l = l * math.exp(m - m_new) + np.exp(row[c:c + 5] - m_new).sum()
        m = m_new
    check("f64", "flash: online (m, l) in chunks vs log-sum-exp of the row", m + math.log(l),
          math.log(np.exp(row).sum()))
    # m need not be the maximum, only keep exp(s - m) from overflowing: flash_attention.cu moves it only when
    # a chunk's maximum passes it by more than a slack (MAX_SLACK = 8), so most chunks rescale nothing.
    # Scores 10x larger than the page's, so that the maximum grows past the first chunk's by more than 8
    big, m, l, moves = 10 * row, -np.inf, 0.0, 0
    for c in range(0, big.size, 5):
        top = big[c:c + 5].max()
        m_new = top if top > m + 8 else m
        moves += m_new != m
        l = l * math.exp(m - m_new) + np.exp(big[c:c + 5] - m_new).sum()   # every exp(s - m) <= e^8
        m = m_new
    grows = sum(big[c:c + 5].max() > big[:c].max() for c in range(5, big.size, 5)) + 1   # the first chunk too
    print(f"[info] flash: with a slack of 8, m moved on {moves} of {math.ceil(big.size / 5)} chunks (the maximum "
          f"grows on {grows}); it ends {np.max(big) - m:.2f} below the row's maximum")
    check("f64", "flash: online (m, l), m moved past a slack of 8 only (rel)",
          (m + math.log(l)) / (np.max(big) + math.log(np.exp(big - np.max(big)).sum())) - 1, 0.0)

    O, L, computed = flash_forward(q, k, v)
    check("f64", "flash: tiled forward O vs torch", O, heads(ref["out"]).numpy())
    lse = np.log(np.where(future_np(), 0.0, np.exp(preatt)).sum(-1))       # log of each row's denominator
    check("f64", "flash: L vs log sum exp of the masked scores", L, lse)
    n_q, n_k = math.ceil(T / BR), math.ceil(T / BC)
    check("f64", "flash: tiles computed vs pairs with an unmasked entry", computed, tiles_needed(T, BR, BC))
    print(f"[info] flash: T={T}, {BR}x{BC} tiles: {computed} of {n_q * n_k} tile pairs computed")
    # kernels/flash_attention.cu's tiles at d12's T=1024, hs=64 (train_gpt2_cuda.py sizes its launches with them):
    # with Br = r Bc, query tile i needs r (i + 1) key tiles, r n(n+1)/2 of r n^2 in all
    import train_gpt2_cuda as tc
    for what, br in (("forward", tc.flash_rows(64, False)), ("backward", tc.flash_rows(64, True))):
        n, r = 1024 // br, br // tc.FLASH_BC
        needed = tiles_needed(1024, br, tc.FLASH_BC)
        print(f"[info] flash: flash_attention.cu's {what} at T=1024 hs=64, {br}x{tc.FLASH_BC} tiles: {needed} of "
              f"{r * n * n} tile pairs computed ({needed / (r * n * n):.1%})")
        if what == "forward":
            check("f64", "flash: T=1024 kernel forward tiles vs r n(n+1)/2", needed, r * n * (n + 1) // 2)

    # the backward's ingredients, each against the materialized path of section 2
    p_all = recompute_p(q, k, L, (0, T), (0, T))
    check("f64", "flash: P recomputed from Q, K and L vs att", p_all, att)
    check("f64", "flash: D = rowsum(dO * O) vs rowsum(att * datt)", (dO * O).sum(-1), (att * pap["datt"]).sum(-1))
    dq, dk, dv = flash_backward(q, k, v, O, L, dO)
    check("f64", "flash: tiled backward dq vs paper", dq, pap["dq"])
    check("f64", "flash: tiled backward dk vs paper", dk, pap["dk"])
    check("f64", "flash: tiled backward dv vs paper", dv, pap["dv"])
    check("f64", "flash: tiled backward dinp vs autograd",
          merge_qkv(*(torch.from_numpy(x) for x in (dq, dk, dv))), ref["dinp"])
    flash_kernel_lse()

    # why the materialized path is memory-bound: d12 at B=16, T=1024 in bf16, against an H100 SXM
    from llmc.mfu import peak_flops
    peak, hbm = peak_flops("NVIDIA H100 80GB HBM3", "bf16"), 3.35e12     # FLOP/s; bytes/s (perf_model's)
    t = traffic(16, 1024, 12, 64)
    check("f64", "flash: one (B,NH,T,T) bf16 tensor at d12, B=16 T=1024, in MiB", t["square"] / 2**20, 384)
    print(f"[info] flash: d12 B=16 T=1024 bf16, one layer: {t['n_passes']} passes over (B,NH,T,T) tensors of "
          f"{t['square'] / 1e9:.3f} GB = {t['materialized'] / 1e9:.2f} GB, "
          f"x12 layers {12 * t['materialized'] / 1e9:.1f} GB "
          f"= {12 * t['materialized'] / hbm * 1e3:.1f} ms at {hbm / 1e12:.2f} TB/s")
    intensity = t["gemm_materialized"] / t["materialized"]
    print(f"[info] flash: the materialized GEMMs {t['gemm_materialized'] / 1e9:.1f} GFLOP per layer: "
          f"{intensity:.0f} FLOP/byte against an H100's ridge {peak / hbm:.0f} FLOP/byte "
          f"({12 * t['gemm_materialized'] / peak * 1e3:.1f} ms of tensor-core time per step)")
    fwd, bwd = (tiles_needed(1024, tc.flash_rows(64, back), tc.FLASH_BC) * tc.flash_rows(64, back) * tc.FLASH_BC
                / 1024**2 for back in (False, True))         # the share of the (T, T) square each pass computes
    work = t["gemm"] * (2 * fwd + 7 * bwd)                   # 2 products forward, 3 + 4 in the two backward passes
    fraction = (2 * fwd + 7 * bwd) / 9
    print(f"[info] flash: at least {t['flash'] / 1e6:.0f} MB per layer ({t['materialized'] / t['flash']:.0f}x less), "
          f"{work / 1e9:.1f} GFLOP ({fraction:.0%} of the tiles, 9 products): {work / t['flash']:.0f} FLOP/byte")
    return dict(computed=computed)


if __name__ == "__main__":
    torch.set_num_threads(1)   # as tests/test_optim.py: torch's two-thread results varied run to run there
    torch.set_default_dtype(torch.float64)
    ref = section1()
    pap = section2(ref)
    section3(ref, pap)
    section4(ref, pap)
    section5()
    section6(ref, pap)
    verdict()
