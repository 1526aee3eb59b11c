"""
Validate one kernel file against its NumPy twins and, on a GPU, time it: llm.c's dev/cuda loop
(check a kernel against the CPU reference, then benchmark it) for kernels/*.cu.

  python dev/check_kernel.py layernorm        # every kernel of kernels/layernorm.cu
  python dev/check_kernel.py all              # every file
  python dev/check_kernel.py gelu --kernel_dir /tmp/my_kernels   # an edited copy of kernels/
  python dev/check_kernel.py all --backend emulator               # the CPU emulator even on a GPU

For each kernel: random inputs on an odd shape (B=3 T=13 C=48 NH=3 V=101 Vp=128), one launch with the
block size train_gpt2_cuda.py uses, and the max error of each output against train_gpt2.py's layer
(its "NumPy twin") evaluated in float64, or against a stated NumPy expression where the kernel is only
part of a layer (the attention permutes, AdamW). A row is OK when |got - want| <= atol + rtol |want|
everywhere; "worst/tol" is the largest |got - want| / (atol + rtol |want|), so OK means < 1.
Exit status 1 if any output is off (or a kernel of the file has no check here).

Where CuPy sees a GPU the launches run there (cupy.RawModule; NumPy arrays copied in and out), and
each kernel is then timed at GPT-2 124M's shapes (B=4 T=1024 C=768 NH=12 Vp=50304; AdamW over all
124,475,904 parameters) with CUDA events: the mean over --repeats launches after 2 warm-up launches,
and GB/s = the bytes of its array arguments (each read once, written once; twice for the ones it
reads and writes back) / time, a lower bound on the memory traffic. Without a GPU the launches run
on the emulator (emulator/, guarded arrays: an out-of-bounds write is an error) and nothing is timed.

tests/test_kernels.py imports its harness from here (DeviceModule, Emulated, rand, max_error, close).
"""

import argparse
import glob
import math
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import train_gpt2 as tg  # noqa: E402  (the NumPy twins)
from llmc.cuda_common import KERNEL_DIR, ceil_div, kernel_source  # noqa: E402

i32, i64, f32 = np.int32, np.int64, np.float32
OPTIONS = ("--std=c++17",)
# a kernel's name and parameter list: extern "C" __global__ void [__launch_bounds__(n)] name(params)
KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')

# ---------------------------------------------------------------------------------------------
# the harness: one interface (mod.get_function(name)(grid, block, args, shared_mem)) over NumPy
# arrays, whether the kernel runs on the emulator or on a GPU


class DeviceModule:
    """The kernels on a real GPU through CuPy, behind the emulator's interface: NumPy arrays go to
    the device, the kernel runs, and the arrays behind non-const pointers come back. An array
    passed twice (in place) is one device array. `xp` is cupy (or a stand-in for testing this)."""

    def __init__(self, xp, raw_module, code):
        self.xp = xp
        self.mod = raw_module(code=code, options=OPTIONS)
        self.params = {name: [p.strip() for p in params.split(",")]
                       for name, params in re.findall(KERNEL_RE, code)}

    def get_function(self, name):
        xp, f, params = self.xp, self.mod.get_function(name), self.params[name]

        def launch(grid, block, args, shared_mem=0):
            on_device, back = {}, []
            dev_args = []
            for param, a in zip(params, args):
                if isinstance(a, np.ndarray):
                    if id(a) not in on_device:
                        on_device[id(a)] = xp.asarray(a)
                        if not param.startswith("const"):
                            back.append((a, on_device[id(a)]))
                    dev_args.append(on_device[id(a)])
                else:
                    dev_args.append(np.uint64(0) if a is None else a)   # NULL as CuPy wants it
            as_tuple = lambda d: tuple(d) if isinstance(d, (tuple, list)) else (d,)  # noqa: E731
            f(as_tuple(grid), as_tuple(block), tuple(dev_args), shared_mem=shared_mem)
            for a, d in back:
                a[...] = xp.asnumpy(d)
        return launch


class Emulated:
    """The emulator in one thread order ("forward"; "reverse": last to first; "warps": each warp runs
    ahead to __syncthreads in turn): a kernel whose threads race (one reads what another writes, with
    no barrier between) gives different answers in different orders. Arrays are guarded: a write out
    of bounds is an error, a read out of bounds reads NaN (or -1 as an int)."""

    def __init__(self, mod, order="forward"):
        self.mod, self.order = mod, order

    def get_function(self, name):
        f, order = self.mod.get_function(name), self.order
        return lambda grid, block, args, shared_mem=0: f(grid, block, args, shared_mem=shared_mem, order=order,
                                                         guard=True)


def gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def max_error(got, want, atol, rtol=0.0):
    """(max |got - want|, max |got - want| / (atol + rtol |want|), number of elements outside the
    tolerance, index of the worst one). NaN counts as outside."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want)
    tol = atol + rtol * np.abs(want)
    bad = ~(err <= tol)                               # written so that NaN counts as bad
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / tol)
    ratio[np.isnan(err)] = np.inf
    worst = np.unravel_index(np.argmax(ratio), ratio.shape) if ratio.size else ()
    return (float(np.nanmax(err)) if err.size else 0.0, float(ratio.max()) if ratio.size else 0.0,
            int(bad.sum()), worst)


def close(got, want, atol, rtol=0.0):
    """assert |got - want| <= atol + rtol |want| everywhere, naming the worst element on failure."""
    err, _, nbad, i = max_error(got, want, atol, rtol)
    if nbad:
        got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
        raise AssertionError(f"{nbad} of {got64.size} elements off; worst at {i}: got {got64[i]}, "
                             f"want {want64[i]} (max abs err {err:.3g})")


# ---------------------------------------------------------------------------------------------
# the checks: one Launch per kernel, with the outputs to compare after it


@dataclass
class Shape:
    B: int
    T: int
    C: int
    NH: int
    V: int
    Vp: int
    maxT: int
    n_params: int                                     # AdamW and the norm kernel run over this many floats


ODD = Shape(B=3, T=13, C=48, NH=3, V=101, Vp=128, maxT=16, n_params=100_003)
L12 = 12
D12 = Shape(B=4, T=1024, C=768, NH=12, V=50257, Vp=50304, maxT=1024,
            n_params=50304 * 768 + 1024 * 768 + L12 * (12 * 768 * 768 + 13 * 768) + 2 * 768)  # 124,475,904


@dataclass
class Output:
    name: str                                         # the kernel argument compared
    got: object                                       # that argument (the kernel writes it), or a function
                                                      # of it to call after the launch
    want: np.ndarray                                  # float64 reference
    twin: str                                         # where `want` comes from
    atol: float
    rtol: float = 0.0


@dataclass
class Launch:
    kernel: str
    grid: int
    block: int
    args: tuple
    shared_mem: int = 0
    outputs: list = field(default_factory=list)       # empty when built without references (timing)
    read_write: tuple = ()                            # argument positions read AND written (counted twice)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def token_buckets(inp):
    """The B*T positions of inp grouped by token id, as train_gpt2_cuda.encoder_buckets makes them on
    the host (there copied to the device): positions (B*T,) by token then position, starts (n+1,),
    tokens (n,), n."""
    flat = inp.reshape(-1)
    positions = np.argsort(flat, kind="stable").astype(np.int32)
    tokens, starts = np.unique(flat[positions], return_index=True)
    return positions, np.append(starts, flat.size).astype(np.int32), tokens.astype(np.int32), len(tokens)


def encoder_launches(s, rng, reference):
    B, T, C, Vp = s.B, s.T, s.C, s.Vp
    wte, wpe = rand(rng, Vp, C), rand(rng, s.maxT, C)
    inp = rng.integers(0, min(Vp, 7 if reference else Vp), size=(B, T)).astype(np.int32)  # few ids: repeats
    if reference:
        inp.flat[::2] = 3                             # and one heavy bucket: token 3 at every other position
    out = np.full((B, T, C), np.nan, np.float32)
    dout = rand(rng, B, T, C)
    dwte, dwpe = rand(rng, Vp, C), rand(rng, s.maxT, C)   # nonzero: the backward must add
    positions, starts, tokens, n = token_buckets(inp)
    fwd = Launch("encoder_forward_kernel", ceil_div(B * T * C, 256), 256, (out, inp, wte, wpe, i32(B), i32(T), i32(C)))
    bwd_wte = Launch("encoder_backward_wte_kernel", (ceil_div(C, 256), n), 256,
                     (dwte, dout, starts, positions, tokens, i32(n), i32(C)), read_write=(0,))
    bwd_wpe = Launch("encoder_backward_wpe_kernel", ceil_div(T * C, 256), 256,
                     (dwpe, dout, i32(B), i32(T), i32(C)), read_write=(0,))
    if reference:
        want = np.zeros((B, T, C))
        tg.encoder_forward(want, inp, f64(wte), f64(wpe), B, T, C)
        fwd.outputs = [Output("out", out, want, "encoder_forward", 1e-6)]
        w_dwte, w_dwpe = f64(dwte), f64(dwpe)
        tg.encoder_backward(w_dwte, w_dwpe, f64(dout), inp, B, T, C)
        bwd_wte.outputs = [Output("dwte", dwte, w_dwte, "encoder_backward (+=)", 1e-5)]
        bwd_wpe.outputs = [Output("dwpe", dwpe, w_dwpe, "encoder_backward (+=)", 1e-5)]
    return [fwd, bwd_wte, bwd_wpe]


def layernorm_launches(s, rng, reference):
    B, T, C = s.B, s.T, s.C
    row_scale = np.logspace(-2, 1, B * T, dtype=np.float32).reshape(B, T, 1)  # variances near eps too
    inp = ((rand(rng, B, T, C) + 2.0) * row_scale).astype(np.float32)
    weight, bias = rand(rng, C), rand(rng, C)
    out = np.full((B, T, C), np.nan, np.float32)
    mean, rstd = np.full((B, T), np.nan, np.float32), np.full((B, T), np.nan, np.float32)
    fwd = Launch("layernorm_forward_kernel", ceil_div(B * T * 32, 256), 256,
                 (out, mean, rstd, inp, weight, bias, i32(B * T), i32(C)))
    dout = rand(rng, B, T, C)
    dinp, dweight, dbias = rand(rng, B, T, C), rand(rng, C), rand(rng, C)   # the backward adds into these
    b_mean = inp.mean(-1, dtype=np.float64).astype(np.float32)
    b_rstd = (1 / np.sqrt(inp.var(-1, dtype=np.float64) + 1e-5)).astype(np.float32)
    block = 512                                       # 16 rows per block (the last block partly empty on ODD)
    grid = ceil_div(32 * B * T, block)
    scratch = np.full((grid, 2, C), np.nan, np.float32)   # per-block partials, written by the first kernel
    bwd = Launch("layernorm_backward_kernel", grid, block,
                 (dinp, scratch, dout, inp, weight, b_mean, b_rstd, i32(B), i32(T), i32(C)), read_write=(0,))
    bwd_sum = Launch("layernorm_backward_sum_kernel", ceil_div(C, 256), 256,
                     (dweight, dbias, scratch, i32(grid), i32(C)), read_write=(0, 1))
    if reference:
        w_out, w_mean, w_rstd = np.zeros((B, T, C)), np.zeros((B, T)), np.zeros((B, T))
        tg.layernorm_forward(w_out, w_mean, w_rstd, f64(inp), f64(weight), f64(bias), B, T, C)
        fwd.outputs = [Output("out", out, w_out, "layernorm_forward", 1e-5, 1e-5),
                       Output("mean", mean, w_mean, "layernorm_forward", 1e-6, 1e-6),
                       Output("rstd", rstd, w_rstd, "layernorm_forward", 0.0, 1e-5)]
        want = [f64(x) for x in (dinp, dweight, dbias)]
        tg.layernorm_backward(*want, f64(dout), f64(inp), f64(weight), f64(b_mean), f64(b_rstd), B, T, C)
        # the partials: dbias and dweight of each block's 16 rows alone (zero rows pad the last block)
        rows = np.zeros((grid * block // 32, 2, C))
        d = f64(dout).reshape(B * T, C)
        rows[:B * T, 0] = d
        rows[:B * T, 1] = d * (f64(inp) - f64(b_mean)[..., None]).reshape(B * T, C) * f64(b_rstd).reshape(-1, 1)
        w_scratch = rows.reshape(grid, block // 32, 2, C).sum(axis=1)
        bwd.outputs = [Output("dinp", dinp, want[0], "layernorm_backward (+=)", 2e-5, 1e-5),
                       Output("scratch", scratch, w_scratch, "layernorm_backward per block", 2e-5, 1e-5)]
        bwd_sum.outputs = [Output(name, got, w, "layernorm_backward (+=)", 2e-5, 1e-5)
                           for name, got, w in zip(("dweight", "dbias"), (dweight, dbias), want[1:])]
    return [fwd, bwd, bwd_sum]


def matmul_launches(s, rng, reference):
    # the bias parts of the linear layer; the GEMMs are cuBLAS's (here NumPy's, in float64)
    B, T, C = s.B, s.T, s.C
    N, OC = B * T, (100 if reference else 4 * C)     # OC not a multiple of 32 when checking
    inp, weight, bias = rand(rng, N, C), rand(rng, OC, C), rand(rng, OC)
    out = (inp @ weight.T).astype(np.float32)         # the GEMM's output, which the kernel adds the bias to
    fwd = Launch("add_bias_kernel", ceil_div(N * OC, 256), 256, (out, bias, i32(N), i32(OC)), read_write=(0,))
    dout, dbias = rand(rng, N, OC), rand(rng, OC)
    bwd = Launch("matmul_backward_bias_kernel", ceil_div(OC, 32), 1024, (dbias, dout, i32(N), i32(OC)),
                 shared_mem=1024 * 4, read_write=(0,))  # as matmul_backward launches it
    if reference:
        w_out = np.zeros((B, T, OC))
        tg.matmul_forward(w_out, f64(inp).reshape(B, T, C), f64(weight), f64(bias), B, T, C, OC)
        fwd.outputs = [Output("out", out, w_out.reshape(N, OC), "matmul_forward (GEMM + bias)", 1e-4, 1e-5)]
        w_dinp, w_dweight, w_dbias = np.zeros((B, T, C)), np.zeros((OC, C)), f64(dbias)
        tg.matmul_backward(w_dinp, w_dweight, w_dbias, f64(dout).reshape(B, T, OC), f64(inp).reshape(B, T, C),
                           f64(weight), B, T, C, OC)
        bwd.outputs = [Output("dbias", dbias, w_dbias, "matmul_backward dbias (+=)", 1e-5, 1e-6)]
    return [fwd, bwd]


def attention_launches(s, rng, reference):
    """Each kernel of the chain gets the inputs the NumPy layer's own intermediates give it, so each
    is compared on its own: q, k, v split from inp; preatt = q @ k^T (unscaled, as the kernel takes
    it); att and out from attention_forward; dpreatt and dinp from attention_backward."""
    B, T, C, NH = s.B, s.T, s.C, s.NH
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    n = B * NH * T * hs
    heads = lambda x: x.reshape(B, T, -1, NH, hs).transpose(2, 0, 3, 1, 4)  # noqa: E731  (B,T,g*C) -> (g,B,NH,T,hs)
    inp, dout = rand(rng, B, T, 3 * C), rand(rng, B, T, C)
    q, k, v = (np.full((B, NH, T, hs), np.nan, np.float32) for _ in range(3))
    if reference:
        w_out, w_preatt, w_att = np.zeros((B, T, C)), np.zeros((B, NH, T, T)), np.zeros((B, NH, T, T))
        tg.attention_forward(w_out, w_preatt, w_att, f64(inp), B, T, C, NH)
        w_dinp, w_dpreatt, w_datt = np.zeros((B, T, 3 * C)), np.zeros((B, NH, T, T)), np.zeros((B, NH, T, T))
        tg.attention_backward(w_dinp, w_dpreatt, w_datt, f64(dout), f64(inp), w_att, B, T, C, NH)
        q_, k_, v_ = heads(inp)
        preatt = np.ascontiguousarray(q_ @ k_.transpose(0, 1, 3, 2), dtype=np.float32)  # unscaled
        att = w_att.astype(np.float32)
        vaccum = np.ascontiguousarray(att @ v_, dtype=np.float32)
        datt = w_datt.astype(np.float32)
        dq, dk, dv = (np.ascontiguousarray(x, dtype=np.float32) for x in heads(w_dinp))
    else:
        preatt, att, datt = (rand(rng, B, NH, T, T) for _ in range(3))
        vaccum, dq, dk, dv = (rand(rng, B, NH, T, hs) for _ in range(4))
    out = np.full((B, T, C), np.nan, np.float32)
    att_out = np.full((B, NH, T, T), np.nan, np.float32)
    dvaccum = np.full((B, NH, T, hs), np.nan, np.float32)
    dpreatt = np.full((B, NH, T, T), np.nan, np.float32)
    dinp = np.full((B, T, 3 * C), np.nan, np.float32)
    per_element = (ceil_div(n, 256), 256)
    per_row = (ceil_div(B * NH * T * 32, 256), 256)
    launches = [
        Launch("permute_kernel", *per_element, (q, k, v, inp, i32(B), i32(T), i32(NH), i32(hs))),
        Launch("softmax_forward_kernel", *per_row, (att_out, preatt, f32(scale), i32(B), i32(NH), i32(T))),
        Launch("unpermute_kernel", *per_element, (out, vaccum, i32(B), i32(T), i32(NH), i32(hs))),
        Launch("unpermute_backward_kernel", *per_element, (dvaccum, dout, i32(B), i32(T), i32(NH), i32(hs))),
        Launch("softmax_autoregressive_backward_kernel", *per_row,
               (dpreatt, datt, att, f32(scale), i32(B), i32(NH), i32(T))),
        Launch("permute_backward_kernel", *per_element, (dinp, dq, dk, dv, i32(B), i32(T), i32(NH), i32(hs))),
    ]
    if reference:
        split = "inp (B,T,3C) split into heads"
        launches[0].outputs = [Output(name, got, want, split, 0.0)
                               for name, got, want in zip("qkv", (q, k, v), heads(f64(inp)))]
        launches[1].outputs = [Output("att", att_out, w_att, "attention_forward att", 1e-6, 1e-5)]
        launches[2].outputs = [Output("out", out, w_out, "attention_forward out", 1e-5, 1e-5)]
        launches[3].outputs = [Output("dinp", dvaccum, heads(f64(dout))[0], "dout (B,T,C) split into heads", 0.0)]
        launches[4].outputs = [Output("dpreatt", dpreatt, scale * w_dpreatt, "attention_backward dpreatt * scale",
                                      1e-6, 1e-5)]
        launches[5].outputs = [Output("dinp", dinp, w_dinp, "attention_backward dinp", 1e-5, 1e-5)]
    return launches


def gelu_launches(s, rng, reference):
    N = s.B * s.T * 4 * s.C                           # the MLP's hidden activations
    inp = rand(rng, N, scale=3.0)
    inp[:4] = [0.0, 20.0, -20.0, 60.0]                # coshf overflows at 60: the gradient must stay finite
    out, dinp = np.full(N, np.nan, np.float32), np.full(N, np.nan, np.float32)
    dout = rand(rng, N)
    fwd = Launch("gelu_forward_kernel", ceil_div(N, 256), 256, (out, inp, i32(N)))
    bwd = Launch("gelu_backward_kernel", ceil_div(N, 256), 256, (dinp, inp, dout, i32(N)))
    if reference:
        want = np.zeros(N)
        tg.gelu_forward(want, f64(inp), N)
        fwd.outputs = [Output("out", out, want, "gelu_forward", 1e-6, 1e-6)]
        want = np.zeros(N)                            # the kernel writes; the NumPy layer adds into zeros
        tg.gelu_backward(want, f64(inp), f64(dout), N)
        bwd.outputs = [Output("dinp", dinp, want, "gelu_backward (into zeros)", 1e-6, 1e-5)]
    return [fwd, bwd]


def residual_launches(s, rng, reference):
    N = s.B * s.T * s.C
    inp1, inp2 = rand(rng, N), rand(rng, N)
    out = np.full(N, np.nan, np.float32)
    launch = Launch("residual_forward_kernel", ceil_div(N, 256), 256, (out, inp1, inp2, i32(N)))
    if reference:
        want = np.zeros(N)
        tg.residual_forward(want, f64(inp1), f64(inp2), N)
        launch.outputs = [Output("out", out, want, "residual_forward", 1e-6)]
    return [launch]


def classifier_launches(s, rng, reference):
    """The backward call (write_dlogits = 1), which computes everything the forward call does too."""
    B, T, V, Vp = s.B, s.T, s.V, s.Vp
    logits = rand(rng, B, T, Vp, scale=4.0)
    logits[..., V:] = 1e3                             # pad columns must be ignored by the softmax
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    targets.flat[:2] = 0, V - 1                       # first and last real column
    row = logits.reshape(B * T, Vp)[2]
    row[targets.flat[2]] = row[:V].max() - 100.0      # a target 100 below the max: -ftz=true must not make it inf
    dlosses = rand(rng, B, T)
    losses = np.full((B, T), np.nan, np.float32)
    launch = Launch("fused_classifier_kernel", B * T, 1024,
                    (logits, losses, dlosses, targets, i32(B), i32(T), i32(V), i32(Vp), i32(1)), read_write=(0,))
    if reference:
        probs, w_losses, w_dlogits = np.zeros((B, T, Vp)), np.zeros((B, T)), np.zeros((B, T, Vp))
        tg.softmax_forward(probs, f64(logits), B, T, V, Vp)
        tg.crossentropy_forward(w_losses, probs, targets, B, T, Vp)
        tg.crossentropy_softmax_backward(w_dlogits, f64(dlosses), probs, targets, B, T, V, Vp)
        launch.outputs = [Output("losses", losses, w_losses, "softmax_forward + crossentropy_forward", 1e-5, 1e-6),
                          Output("logits", logits, w_dlogits, "crossentropy_softmax_backward (dlogits)", 1e-7, 1e-5)]
    return [launch]


def adamw_launches(s, rng, reference):
    n = s.n_params
    params, grads = rand(rng, n), rand(rng, n)
    m, v = rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))   # a later step: moments already nonzero
    lr, b1, b2, eps, wd, grad_scale, t = 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5, 3
    step = Launch("adamw_kernel", ceil_div(n, 512), 512,
                  (params, grads, m, v, i64(n), f32(lr), f32(b1), f32(b2), f32(1 - b1 ** t), f32(1 - b2 ** t),
                   f32(eps), f32(wd), f32(grad_scale)), read_write=(0, 2, 3))
    grid = min(ceil_div(n, 512), 1024)                # as gpt2_calculate_grad_norm launches it
    partials = np.full(grid, np.nan, np.float32)
    norm = Launch("global_norm_squared_kernel", grid, 512, (partials, grads, i64(n)))
    if reference:
        # AdamW as torch.optim.AdamW computes it, in float64 (the NumPy trainer's adamw_chunk is the
        # same step rearranged for speed)
        g = f64(grads) * grad_scale
        w_m = b1 * f64(m) + (1 - b1) * g
        w_v = b2 * f64(v) + (1 - b2) * g * g
        w_p = f64(params) - lr * (w_m / (1 - b1 ** t) / (np.sqrt(w_v / (1 - b2 ** t)) + eps) + wd * f64(params))
        expression = "AdamW in float64 (torch.optim.AdamW)"
        step.outputs = [Output("params", params, w_p, expression, 1e-6, 1e-6),
                        Output("m", m, w_m, expression, 1e-7, 1e-6), Output("v", v, w_v, expression, 1e-8, 1e-5)]
        norm.outputs = [Output("sum(out)", lambda: f64(partials).sum(), np.sum(f64(grads) ** 2),
                               "sum(grads**2) in float64", 0.0, 1e-5)]   # the host adds the per-block partials
    return [step, norm]


LAUNCHES = {"encoder": encoder_launches, "layernorm": layernorm_launches, "matmul": matmul_launches,
            "attention": attention_launches, "gelu": gelu_launches, "residual": residual_launches,
            "classifier": classifier_launches, "adamw": adamw_launches}


def kernel_files(kernel_dir=KERNEL_DIR):
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(kernel_dir, "*.cu")))


def kernels_in(code):
    return [name for name, _ in re.findall(KERNEL_RE, code)]


# ---------------------------------------------------------------------------------------------
# running them


def load(file, backend, kernel_dir, order="forward"):
    code = kernel_source(file, kernel_dir)
    if backend == "cupy":
        import cupy
        return code, DeviceModule(cupy, cupy.RawModule, code)
    from emulator import RawModule
    return code, Emulated(RawModule(code=code, options=OPTIONS), order)


def check_file(file, backend, kernel_dir, order="forward", seed=0):
    """Run every kernel of one file once on ODD and compare; print one row per output.
    Returns the rows (file, kernel, output, max abs err, worst/tol, ok)."""
    code, mod = load(file, backend, kernel_dir, order)
    launches = LAUNCHES[file](ODD, np.random.default_rng(seed), reference=True) if file in LAUNCHES else []
    rows = []
    for lc in launches:
        mod.get_function(lc.kernel)(lc.grid, lc.block, lc.args, shared_mem=lc.shared_mem)
        for o in lc.outputs:
            got = o.got() if callable(o.got) else o.got
            err, ratio, nbad, _ = max_error(got, o.want, o.atol, o.rtol)
            tol = " + ".join([f"{o.atol:.0e}"] * bool(o.atol) + [f"{o.rtol:.0e}|want|"] * bool(o.rtol)) or "0 (exact)"
            ok = nbad == 0
            print(f"{lc.kernel:<40} {o.name:<13} {o.twin:<42} {err:11.2e}  {tol:<20} {ratio:9.3f}  "
                  f"{'OK' if ok else 'NOT OK'}")
            rows.append((file, lc.kernel, o.name, err, ratio, ok))
    checked = {lc.kernel for lc in launches if lc.outputs}
    for name in kernels_in(code):
        if name not in checked:
            print(f"{name:<40} {'-':<13} {'(no check in dev/check_kernel.py)':<42} {'':11}  {'':<20} {'':9}  NOT OK")
            rows.append((file, name, "-", float("nan"), float("inf"), False))
    return rows


def time_file(file, kernel_dir, repeats, seed=0, shape=D12):
    """Time every kernel of one file at `shape` (d12's) on the GPU with CUDA events; print and return
    (file, kernel, ms, GB/s) rows."""
    import cupy
    code = kernel_source(file, kernel_dir)
    mod = cupy.RawModule(code=code, options=OPTIONS)
    rows = []
    for lc in LAUNCHES[file](shape, np.random.default_rng(seed), reference=False):
        fn = mod.get_function(lc.kernel)
        on_device = {}
        args = []
        for a in lc.args:
            if isinstance(a, np.ndarray):
                on_device.setdefault(id(a), cupy.asarray(a))
                args.append(on_device[id(a)])
            else:
                args.append(a)
        nbytes = sum(a.nbytes * (2 if i in lc.read_write else 1)
                     for i, a in enumerate(lc.args) if isinstance(a, np.ndarray))
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        grid = lc.grid if isinstance(lc.grid, tuple) else (lc.grid,)
        for _ in range(2):                            # warm-up: module load, caches
            fn(grid, (lc.block,), tuple(args), shared_mem=lc.shared_mem)
        start.record()
        for _ in range(repeats):
            fn(grid, (lc.block,), tuple(args), shared_mem=lc.shared_mem)
        end.record()
        end.synchronize()
        ms = cupy.cuda.get_elapsed_time(start, end) / repeats
        gbs = nbytes / (ms * 1e-3) / 1e9
        print(f"{lc.kernel:<40} {'x'.join(map(str, grid)):>9} x {lc.block:<5} {ms:10.4f} {gbs:10.1f}")
        rows.append((file, lc.kernel, ms, gbs))
        del on_device, args
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check the kernels of kernels/<file>.cu against their NumPy "
                                                 "twins; on a GPU, also time them at d12 shapes.")
    parser.add_argument("file", help=f"a kernel file without .cu ({', '.join(kernel_files())}) or 'all'")
    parser.add_argument("--backend", choices=["auto", "emulator", "cupy"], default="auto",
                        help="auto: cupy when it sees a GPU, else the emulator")
    parser.add_argument("--kernel_dir", default=KERNEL_DIR, help="the folder of .cu files (default: kernels/)")
    parser.add_argument("--order", default="forward", choices=["forward", "reverse", "warps"],
                        help="the emulator's thread order (see emulator/README.md)")
    parser.add_argument("--time", type=int, default=1, help="on a GPU: 1 = time each kernel at d12 shapes")
    parser.add_argument("--repeats", type=int, default=20, help="timed launches per kernel")
    args = parser.parse_args(argv)

    files = kernel_files(args.kernel_dir) if args.file == "all" else [args.file]
    for f in files:
        if not os.path.exists(os.path.join(args.kernel_dir, f + ".cu")):
            parser.error(f"no {f}.cu in {args.kernel_dir} (files: {', '.join(kernel_files(args.kernel_dir))})")
    backend = args.backend
    if backend == "auto":
        backend = "cupy" if gpu_available() else "emulator"
    elif backend == "cupy" and not gpu_available():
        sys.exit("check_kernel.py: --backend cupy, but CuPy finds no GPU")
    where = "the GPU (CuPy)" if backend == "cupy" else f"the emulator (CPU, thread order {args.order})"
    s = ODD
    print(f"checking on {where}: B={s.B} T={s.T} C={s.C} NH={s.NH} V={s.V} Vp={s.Vp} "
          f"(elementwise N = B*T*4C or B*T*C, AdamW over {s.n_params} floats), float64 NumPy twins")
    rows = []
    for f in files:
        print(f"\n== kernels/{f}.cu")
        print(f"{'kernel':<40} {'output':<13} {'compared with':<42} {'max abs err':>11}  {'tolerance':<20} "
              f"{'worst/tol':>9}  result")
        rows += check_file(f, backend, args.kernel_dir, args.order)
    failed = [r for r in rows if not r[5]]
    kernels = {(r[0], r[1]) for r in rows}
    print(f"\n{len(kernels)} kernels, {len(rows)} outputs: "
          + ("all within tolerance" if not failed else
             f"{len(failed)} NOT OK: " + ", ".join(f"{r[1]}.{r[2]}" for r in failed)))

    if backend == "cupy" and args.time:
        s = D12
        print(f"\ntiming on the GPU at d12 shapes: B={s.B} T={s.T} C={s.C} NH={s.NH} Vp={s.Vp}, AdamW over "
              f"{s.n_params} floats; mean of {args.repeats} launches after 2 warm-up (CUDA events); GB/s counts "
              f"each array argument once (twice if read and written)")
        print(f"{'kernel':<40} {'grid':>9} x {'block':<5} {'ms':>10} {'GB/s':>10}")
        for f in files:
            if f in LAUNCHES:
                time_file(f, args.kernel_dir, args.repeats)
    elif args.time:
        print("\nnothing timed: the emulator's times say nothing about a GPU's")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
