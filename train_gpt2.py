"""
GPT-2 training in plain NumPy, a port of llm.c's train_gpt2.c.

Read it top to bottom, as train_gpt2.c: every layer as a forward/backward pair (each with a loop
twin that spells out its indices), then the model on flat buffers, AdamW, and the training loop.
Nothing here uses autograd; PyTorch (train_gpt2_torch.py) is only the oracle the tests compare
against. What the programs share (file formats, data loader, tokenizer, random numbers, schedules,
sampler, logger, command line, and the plumbing that makes NumPy fast on a CPU) lives in llmc/.
train_gpt2_cuda.py runs the same training loop with the layers as CUDA kernels.
"""

import codecs
import math
import os
import sys
import time

import llmc  # noqa: F401  (first: it picks NumPy's BLAS kernels before NumPy loads)
import numpy as np

from llmc import profiler
from llmc.cli import parse_args
from llmc.dataloader import DataLoader
from llmc.formats import (MODEL_DEPTHS, FormatError, GPT2Config, num_parameters, padded_vocab, param_shapes,
                          print_config, read_model_file, write_model_file)
from llmc.logger import Logger
from llmc.rand import normal_
from llmc.sampler import random_f32, sample_mult
from llmc.schedulers import get_lr
from llmc.tokenizer import Tokenizer
from llmc.utils import ConfigError

# ===== PLUMBING (moving to llmc/cpu.py) =====
import functools
import glob as globlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace


def keep_freed_memory():
    """NumPy expressions make temporaries of megabytes (a (B, T, 4C) intermediate is 3 MiB, the
    wte gradient product 150 MiB). glibc hands such blocks back to the OS when they are freed and
    the next step faults them in again page by page, which costs more than the arithmetic (13 ms
    instead of 0.7 ms for GELU's backward). Asking it to keep freed memory for reuse removes that;
    the peak memory stays what it was. A no-op off glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)    # blocks below 256 MiB come from the heap
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)      # and the heap is not trimmed below 1 GiB free
    except (OSError, AttributeError):
        pass


@functools.cache
def openblas_library():
    """NumPy's own OpenBLAS as a ctypes library, with its symbol prefix/suffix and int type;
    None where NumPy uses another BLAS (then the plain NumPy paths below are used)."""
    import ctypes
    roots = [os.path.dirname(np.__file__) + ".libs", os.path.join(os.path.dirname(np.__file__), ".dylibs")]
    for path in sorted(p for root in roots for p in globlib.glob(os.path.join(root, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix, integer in (("scipy_", "64_", ctypes.c_int64), ("", "64_", ctypes.c_int64),
                                        ("", "", ctypes.c_int)):
            if hasattr(lib, f"{prefix}cblas_sgemm{suffix}"):
                return SimpleNamespace(lib=lib, prefix=prefix, suffix=suffix, integer=integer)
    return None


@functools.cache
def gemm_functions():
    """NumPy's OpenBLAS sgemm/dgemm by dtype, looked up at the first matmul; {} without OpenBLAS."""
    import ctypes
    blas = openblas_library()
    if blas is None:
        return {}
    functions = {}
    for dtype, letter, scalar in ((np.float32, "s", ctypes.c_float), (np.float64, "d", ctypes.c_double)):
        fn = getattr(blas.lib, f"{blas.prefix}cblas_{letter}gemm{blas.suffix}")
        i, ptr = blas.integer, ctypes.c_void_p
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, scalar, ptr, i, ptr, i, scalar, ptr, i]
        fn.restype = None
        functions[np.dtype(dtype)] = fn
    return functions



# ----------------------------------------------------------------------------
# the layers: each a forward/backward pair of plain functions
#
# Arguments follow llm.c: outputs first, then inputs, then sizes. Arrays carry their logical
# shapes, e.g. (B, T, C), and the dtype follows the arrays (float32 in training, float64 in the
# finite-difference tests), so constants are made with `x.dtype.type(...)`, never a bare float.
#
# Backward ADDS into the gradient arrays (`+=`): gradients are zeroed once per step, and a tensor
# read by two layers (the residual stream, wte used by the encoder and by the classifier) then
# collects both contributions without any bookkeeping.
#
# Letters: B batch, T time, C channels, NH heads, hs = C/NH head size, V vocabulary,
# Vp padded vocabulary (the logits have Vp columns; columns V..Vp-1 never count), L layers.
#
# NumPy expressions run on one core, so each layer hands independent blocks of its rows to
# parallel_rows: NumPy releases the GIL inside ufuncs (and ctypes around BLAS calls), and the
# blocks run at the same time on our own thread pool. The math of a layer reads the same on a
# block of rows as on all of them. The matrix multiplies are split the same way, one
# single-threaded BLAS call per block: OpenBLAS's own threads busy-wait for their next job for a
# while after each call, and would take a core from every NumPy layer that follows a matmul.

NUM_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
_pool = None


def thread_pool():
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=NUM_THREADS)
        blas = openblas_library()
        if blas is not None and NUM_THREADS > 1:   # from now on the pool is the parallelism
            getattr(blas.lib, f"{blas.prefix}openblas_set_num_threads{blas.suffix}")(1)
    return _pool


def parallel_rows(fn, n_rows):
    """fn(rows) for NUM_THREADS contiguous slices `rows` of range(n_rows), at the same time;
    the calling thread takes the last slice."""
    n = min(NUM_THREADS, n_rows)
    cuts = [n_rows * i // n for i in range(n + 1)] if n > 0 else [0, 0]
    futures = [thread_pool().submit(fn, slice(cuts[i], cuts[i + 1])) for i in range(len(cuts) - 2)]
    fn(slice(cuts[-2], cuts[-1]))
    for f in futures:
        f.result()


def as_rows(x, n_rows):
    """x viewed as (n_rows, -1) without copying (an error, never a silent copy, for a strided x)."""
    return x.reshape(n_rows, -1, copy=False)


def _blas_layout(x):
    """(CblasNoTrans or CblasTrans, leading dimension) of a 2-D view BLAS reads in place, or None."""
    s0, s1 = (s // x.itemsize for s in x.strides)
    if s1 == 1 and s0 >= max(1, x.shape[1]):
        return 111, s0                                    # rows strided by s0
    if s0 == 1 and s1 >= max(1, x.shape[0]):
        return 112, s1                                    # the transpose of such a view
    return None


def gemm(c, a, b, accumulate):
    """c = a @ b, or c += a @ b with accumulate, for 2-D views (c's rows may be strided, as a block
    of columns is), as one BLAS call; plain NumPy where OpenBLAS is not there."""
    fn = gemm_functions().get(c.dtype)
    la, lb, lc = _blas_layout(a), _blas_layout(b), _blas_layout(c)
    if fn is None or not (a.dtype == b.dtype == c.dtype) or None in (la, lb) or lc is None or lc[0] != 111:
        if accumulate:
            c += a @ b
        else:
            np.matmul(a, b, out=c)
        return
    (M, K), N = a.shape, b.shape[1]
    if M == 0 or N == 0:
        return
    if K == 0:
        if not accumulate:
            c[...] = 0
        return
    fn(101, la[0], lb[0], M, N, K, 1.0, a.ctypes.data, la[1], b.ctypes.data, lb[1],
       1.0 if accumulate else 0.0, c.ctypes.data, lc[1])   # 101 = row-major


def parallel_gemm(c, a, b, accumulate):
    """gemm with c cut into blocks, one per thread: blocks of columns (using the same columns of
    b), or blocks of rows (the same rows of a) where c is much taller than wide (measured faster)."""
    M, N = c.shape
    if M >= 4 * N:
        parallel_rows(lambda r: gemm(c[r], a[r], b, accumulate), M)
    else:
        parallel_rows(lambda r: gemm(c[:, r], a, b[:, r], accumulate), N)


def encoder_forward(out, inp, wte, wpe, B, T, C):
    """out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]: token embedding plus position embedding."""
    np.take(wte, inp, axis=0, out=out)          # (B, T) ids -> (B, T, C) rows of wte
    out += wpe[:T]                              # (T, C) broadcast over B


def encoder_backward(dwte, dwpe, dout, inp, B, T, C):
    np.add.at(dwte, inp, dout)                  # scatter-add: a token seen twice gets both rows
    dwpe[:T] += dout.sum(axis=0)                # (B, T, C) -> (T, C)


def layernorm_forward(out, mean, rstd, inp, weight, bias, B, T, C):
    """Normalize each (b, t) row over C (biased variance, eps 1e-5), then scale and shift.
    Caches mean and rstd (B, T) for the backward pass; the normalized input is recomputed."""
    eps = inp.dtype.type(1e-5)
    inp2, out2 = as_rows(inp, B * T), as_rows(out, B * T)               # (B*T, C)
    mean2, rstd2 = mean.reshape(-1, copy=False), rstd.reshape(-1, copy=False)   # (B*T,)

    def rows(r):                                # r: a slice of the B*T rows of (B*T, C)
        x = inp2[r]
        mean2[r] = x.mean(axis=-1)
        xc = x - mean2[r, None]                 # centered
        var = np.mean(xc * xc, axis=-1)         # biased variance
        rstd2[r] = 1 / np.sqrt(var + eps)
        np.multiply(xc, rstd2[r, None], out=out2[r])   # normalized
        out2[r] *= weight
        out2[r] += bias
    parallel_rows(rows, B * T)


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, B, T, C):
    """With n = (x - mean) * rstd and out = n * w + b, and g = dout * w:
    dx = rstd * (g - mean_C(g) - n * mean_C(g * n)); dw = sum_BT(dout * n); db = sum_BT(dout)."""
    inp2, dinp2, dout2 = as_rows(inp, B * T), as_rows(dinp, B * T), as_rows(dout, B * T)
    mean2, rstd2 = mean.reshape(-1, copy=False), rstd.reshape(-1, copy=False)
    db_parts, dw_parts = {}, {}                            # per block of rows, by its first row

    def rows(r):                                           # r: a slice of the B*T rows
        norm = (inp2[r] - mean2[r, None]) * rstd2[r, None]  # (rows, C), recomputed
        dout_r = dout2[r]
        db_parts[r.start] = dout_r.sum(axis=0)
        dw_parts[r.start] = (dout_r * norm).sum(axis=0)
        dnorm = dout_r * weight                            # (rows, C)
        dnorm_mean = dnorm.mean(axis=-1, keepdims=True)    # (rows, 1)
        dnorm_norm_mean = (dnorm * norm).mean(axis=-1, keepdims=True)
        dnorm -= dnorm_mean
        dnorm -= norm * dnorm_norm_mean
        dnorm *= rstd2[r, None]
        dinp2[r] += dnorm
    parallel_rows(rows, B * T)
    for start in sorted(db_parts):                         # sum the blocks in a fixed order
        dbias += db_parts[start]
        dweight += dw_parts[start]


def matmul_forward(out, inp, weight, bias, B, T, C, OC):
    """out = inp @ weight^T + bias, weight stored (OC, C) as PyTorch's nn.Linear holds it."""
    inp2, out2 = as_rows(inp, B * T), as_rows(out, B * T)

    def columns(r):                                        # r: a slice of the OC output columns
        gemm(out2[:, r], inp2, weight[r].T, accumulate=False)      # (BT, C) @ (C, OC)
        if bias is not None:
            out2[:, r] += bias[r]                          # while the block is in cache
    parallel_rows(columns, OC)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, B, T, C, OC):
    dout2, dinp2, inp2 = as_rows(dout, B * T), as_rows(dinp, B * T), as_rows(inp, B * T)
    products = (lambda: gemm(dinp2, dout2, weight, accumulate=True),        # dinp += (BT, OC) @ (OC, C)
                lambda: gemm(dweight, dout2.T, inp2, accumulate=True))      # dweight += (OC, BT) @ (BT, C)
    if NUM_THREADS == 2:              # the two products cost the same: one whole product per thread
        parallel_rows(lambda r: products[r.start](), 2)                     # (measured ~5% faster than
    else:                                                                   # splitting each one)
        parallel_gemm(dinp2, dout2, weight, accumulate=True)
        parallel_gemm(dweight, dout2.T, inp2, accumulate=True)
    if dbias is not None:
        parallel_rows(lambda r: np.add(dbias[r], dout2[:, r].sum(axis=0), out=dbias[r]), OC)


def _split_heads(x, B, T, NH):
    """(B, T, NH*hs) -> (B, NH, T, hs), a view (no copy): one head's rows are strided."""
    return x.reshape(B, T, NH, -1).transpose(0, 2, 1, 3)


def _qkv_heads(inp, B, T, C, NH):
    """(B, T, 3C) = q|k|v -> three (B, NH, T, hs) views."""
    qkv = inp.reshape(B, T, 3, NH, C // NH)
    return [qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]


def _causal_mask(T):
    return np.triu(np.ones((T, T), dtype=bool), k=1)    # True above the diagonal: the future


def attention_forward(out, preatt, att, inp, B, T, C, NH):
    """Causal multi-head self-attention on inp (B, T, 3C) = q|k|v.
    preatt (B, NH, T, T) = q k^T / sqrt(hs), with -inf on the masked (future) entries;
    att = softmax(preatt) over the last axis, exactly 0 on the masked entries;
    out (B, T, C) = att @ v with the heads side by side again."""
    scale = inp.dtype.type(1.0 / math.sqrt(C // NH))
    mask = _causal_mask(T)

    def rows(r):                                           # r: a slice of the B sequences
        Br = r.stop - r.start                              # this block's sequences
        q, k, v = _qkv_heads(inp[r], Br, T, C, NH)
        pre, a = preatt[r], att[r]
        np.matmul(q, k.transpose(0, 1, 3, 2), out=pre)     # (B,NH,T,hs) @ (B,NH,hs,T) -> (B,NH,T,T)
        pre *= scale
        pre[:, :, mask] = -np.inf
        np.subtract(pre, pre.max(axis=-1, keepdims=True), out=a)
        np.exp(a, out=a)                                   # exp(-inf) = 0 on the future
        a /= a.sum(axis=-1, keepdims=True)
        np.matmul(a, v, out=_split_heads(out[r], Br, T, NH))  # (B,NH,T,T) @ (B,NH,T,hs) -> (B,T,NH,hs)
    parallel_rows(rows, B)


def attention_backward(dinp, dpreatt, datt, dout, inp, att, B, T, C, NH):
    """Each line inverts one forward line, last first. dinp (B, T, 3C) receives dq|dk|dv."""
    scale = inp.dtype.type(1.0 / math.sqrt(C // NH))

    def rows(r):                                           # r: a slice of the B sequences
        Br = r.stop - r.start                              # this block's sequences
        q, k, v = _qkv_heads(inp[r], Br, T, C, NH)
        dq, dk, dv = _qkv_heads(dinp[r], Br, T, C, NH)
        dout_h = _split_heads(dout[r], Br, T, NH)          # (B, NH, T, hs)
        a, da, dpre = att[r], datt[r], dpreatt[r]
        # out = att @ v
        da += dout_h @ v.transpose(0, 1, 3, 2)             # (B,NH,T,hs) @ (B,NH,hs,T)
        dv += a.transpose(0, 1, 3, 2) @ dout_h             # (B,NH,T,T) @ (B,NH,T,hs)
        # att = softmax(preatt): d preatt_j = att_j * (d att_j - sum_i att_i d att_i)
        dpre += a * (da - (a * da).sum(axis=-1, keepdims=True))
        # preatt = scale * q @ k^T (the masked entries have att = 0, so their dpreatt is 0)
        dq += scale * (dpre @ k)                           # (B,NH,T,T) @ (B,NH,T,hs)
        dk += scale * (dpre.transpose(0, 1, 3, 2) @ q)
    parallel_rows(rows, B)


def attention_forward_loop(out, preatt, att, inp, B, T, C, NH):
    """Reference: llm.c's loops over (b, t, h), vectorized only over t2 <= t and hs."""
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    for b in range(B):
        for t in range(T):
            for h in range(NH):
                q = inp[b, t, h * hs:(h + 1) * hs]
                keys = inp[b, :t + 1, C + h * hs:C + (h + 1) * hs]            # (t+1, hs)
                values = inp[b, :t + 1, 2 * C + h * hs:2 * C + (h + 1) * hs]  # (t+1, hs)
                preatt[b, h, t, :t + 1] = keys @ q * scale
                preatt[b, h, t, t + 1:] = -np.inf
                e = np.exp(preatt[b, h, t, :t + 1] - preatt[b, h, t, :t + 1].max())
                att[b, h, t, :t + 1] = e / e.sum()
                att[b, h, t, t + 1:] = 0
                out[b, t, h * hs:(h + 1) * hs] = att[b, h, t, :t + 1] @ values


def attention_backward_loop(dinp, dpreatt, datt, dout, inp, att, B, T, C, NH):
    """Reference: llm.c's backward loops (each block inverts one block of the forward loop)."""
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    for b in range(B):
        for t in range(T):
            for h in range(NH):
                qs, ks, vs = slice(h * hs, (h + 1) * hs), slice(C + h * hs, C + (h + 1) * hs), \
                    slice(2 * C + h * hs, 2 * C + (h + 1) * hs)
                a = att[b, h, t, :t + 1]
                # out = sum_t2 att[t2] * v[t2]
                datt[b, h, t, :t + 1] += inp[b, :t + 1, vs] @ dout[b, t, qs]
                dinp[b, :t + 1, vs] += np.outer(a, dout[b, t, qs])
                # softmax: dpreatt[t3] += sum_t2 att[t2] * (1[t2 == t3] - att[t3]) * datt[t2]
                da = datt[b, h, t, :t + 1]
                for t2 in range(t + 1):
                    for t3 in range(t + 1):
                        indicator = 1.0 if t2 == t3 else 0.0
                        dpreatt[b, h, t, t3] += a[t2] * (indicator - a[t3]) * da[t2]
                # preatt[t2] = scale * q . k[t2]
                dp = dpreatt[b, h, t, :t + 1] * scale
                dinp[b, t, qs] += dp @ inp[b, :t + 1, ks]
                dinp[b, :t + 1, ks] += np.outer(dp, inp[b, t, qs])


GELU_SCALING_FACTOR = math.sqrt(2.0 / math.pi)


def gelu_forward(out, inp, N):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    f = inp.dtype.type
    inp1, out1 = inp.reshape(-1, copy=False), out.reshape(-1, copy=False)

    def rows(r):                                # r: a slice of the N elements
        x, y = inp1[r], out1[r]
        np.multiply(x, x, out=y)
        y *= f(0.044715)
        y += f(1)
        y *= x                                  # x + 0.044715 x^3
        y *= f(GELU_SCALING_FACTOR)
        np.tanh(y, out=y)
        y += f(1)
        y *= x
        y *= f(0.5)
    parallel_rows(rows, N)


def gelu_backward(dinp, inp, dout, N):
    """d gelu/dx = 0.5 (1 + tanh u) + 0.5 x sech^2(u) du/dx, u = s (x + 0.044715 x^3),
    with sech^2 = 1 - tanh^2 (llm.c writes 1/cosh^2, which overflows to inf at large u)."""
    f = inp.dtype.type
    inp1, dinp1, dout1 = inp.reshape(-1, copy=False), dinp.reshape(-1, copy=False), dout.reshape(-1, copy=False)

    def rows(r):                                # r: a slice of the N elements
        x = inp1[r]
        x2 = x * x
        u = (x2 * f(0.044715) + f(1)) * x * f(GELU_SCALING_FACTOR)
        th = np.tanh(u)
        du = (x2 * f(3.0 * 0.044715) + f(1)) * f(GELU_SCALING_FACTOR)
        local_grad = f(0.5) * (f(1) + th) + f(0.5) * x * (f(1) - th * th) * du
        local_grad *= dout1[r]
        dinp1[r] += local_grad
    parallel_rows(rows, N)


def residual_forward(out, inp1, inp2, N):
    np.add(inp1, inp2, out=out)


def residual_backward(dinp1, dinp2, dout, N):
    dinp1 += dout
    dinp2 += dout


def softmax_forward(probs, logits, B, T, V, Vp):
    """Softmax over the first V of the Vp columns of each (b, t) row; pad columns get 0."""
    logits2, probs2 = as_rows(logits, B * T), as_rows(probs, B * T)   # (B*T, Vp)

    def rows(r):                                            # r: a slice of the B*T rows
        lv, pv = logits2[r, :V], probs2[r, :V]              # (rows, V) views
        np.subtract(lv, lv.max(axis=-1, keepdims=True), out=pv)
        np.exp(pv, out=pv)
        pv /= pv.sum(axis=-1, keepdims=True)
        probs2[r, V:] = 0
    parallel_rows(rows, B * T)


def softmax_forward_loop(probs, logits, B, T, V, Vp):
    """Reference: llm.c's row loop, the padded columns spelled out."""
    for b in range(B):
        for t in range(T):
            row = logits[b, t]
            maxval = max(row[:V])
            e = np.exp(row[:V] - maxval)
            probs[b, t, :V] = e / e.sum()
            probs[b, t, V:] = 0                             # pad columns: probability 0


def crossentropy_forward(losses, probs, targets, B, T, Vp):
    """losses[b, t] = -log probs[b, t, targets[b, t]]."""
    picked = np.take_along_axis(probs, targets[..., None].astype(np.intp), axis=-1)[..., 0]
    np.log(picked, out=losses)
    np.negative(losses, out=losses)


def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, B, T, V, Vp):
    """Fused backward of softmax + crossentropy: dlogits = (probs - onehot(target)) * dloss,
    over the first V columns only; the pad columns' gradients stay exactly 0."""
    dlogits2, probs2, dlosses1 = as_rows(dlogits, B * T), as_rows(probs, B * T), dlosses.reshape(-1, copy=False)

    def rows(r):                                             # r: a slice of the B*T rows
        for i in range(r.start, r.stop, 8):                  # 8 rows at a time: a small temporary
            s = slice(i, min(i + 8, r.stop))
            dlogits2[s, :V] += probs2[s, :V] * dlosses1[s, None]
    parallel_rows(rows, B * T)
    b, t = np.indices((B, T))
    dlogits[b, t, targets] -= dlosses                        # each (b, t) once: no duplicates


def crossentropy_softmax_backward_loop(dlogits, dlosses, probs, targets, B, T, V, Vp):
    """Reference: llm.c's loop; the inner loop stops at V, so columns V..Vp-1 are never touched."""
    for b in range(B):
        for t in range(T):
            ix = targets[b, t]
            for i in range(V):
                indicator = 1.0 if i == ix else 0.0
                dlogits[b, t, i] += (probs[b, t, i] - indicator) * dlosses[b, t]


# ----------------------------------------------------------------------------
# the model: GPT-2 in flat buffers with named views
#
# Parameters, their gradients, AdamW's m and v, the activations and the activation gradients
# each live in one float32 array; the names are views into it (llm.c's ParameterTensors and
# ActivationTensors). Loading a checkpoint is one read into params_memory, the optimizer is one
# pass over the flat arrays, and zeroing the gradients is one fill.

# the 2-D weights, which AdamW decays; biases and LayerNorm parameters are not decayed
DECAYED_PARAMS = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")


def activation_shapes(config, B, T):
    """llm.c's 23 activation tensors, in its order."""
    L, NH, C, Vp = config.num_layers, config.num_heads, config.channels, config.padded_vocab_size
    return [
        ("encoded", (B, T, C)),
        ("ln1", (L, B, T, C)), ("ln1_mean", (L, B, T)), ("ln1_rstd", (L, B, T)),
        ("qkv", (L, B, T, 3 * C)),
        ("atty", (L, B, T, C)),
        ("preatt", (L, B, NH, T, T)), ("att", (L, B, NH, T, T)),
        ("attproj", (L, B, T, C)),
        ("residual2", (L, B, T, C)),
        ("ln2", (L, B, T, C)), ("ln2_mean", (L, B, T)), ("ln2_rstd", (L, B, T)),
        ("fch", (L, B, T, 4 * C)), ("fch_gelu", (L, B, T, 4 * C)),
        ("fcproj", (L, B, T, C)),
        ("residual3", (L, B, T, C)),
        ("lnf", (B, T, C)), ("lnf_mean", (B, T)), ("lnf_rstd", (B, T)),
        ("logits", (B, T, Vp)), ("probs", (B, T, Vp)),
        ("losses", (B, T)),
    ]


# the backward pass needs a gradient for every activation except these (llm.c allocates them all)
NO_GRAD_ACTS = ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean", "lnf_rstd", "probs")


def views(memory, shapes, region_sizes=None):
    """Named views into one flat array. With region_sizes, each view starts where a tensor of
    that size would (so buffers allocated for (B, T) also serve a smaller (B', T'))."""
    out, offset = {}, 0
    for i, (name, shape) in enumerate(shapes):
        n = math.prod(shape)
        out[name] = memory[offset:offset + n].reshape(shape)
        offset += n if region_sizes is None else region_sizes[i]
    return SimpleNamespace(**out)


class GPT2:
    """What llm.c's GPT2 struct holds. Activations are allocated at the first forward pass,
    gradients at the first backward, m and v at the first update (as llm.c does)."""

    def __init__(self, config, params_memory):
        keep_freed_memory()                  # training makes big temporaries: let glibc reuse them
        self.config = config
        self.param_shapes = param_shapes(config)
        self.num_parameters = params_memory.size
        self.params_memory = params_memory
        self.params = views(params_memory, self.param_shapes)
        self.grads_memory = self.grads = None
        self.m_memory = self.v_memory = None
        self.acts_memory = self.acts = self.grads_acts_memory = self.grads_acts = None
        self.batch_size = self.seq_len = 0          # the (B, T) the activations were allocated for
        self.B = self.T = 0                         # the (B, T) of the last forward pass
        self.inputs = self.targets = None
        self.mean_loss = -1.0


def gpt2_build_from_checkpoint(path):
    """Load an llm.c model file (v3 fp32, or v5 bf16 widened to fp32) into the flat parameter
    buffer: one read, no second full-size copy."""
    config, params = read_model_file(path)
    return GPT2(config, params)


def gpt2_build_from_descriptor(descriptor, seed=42):
    """A GPT-2 from scratch: "d12" (or "gpt2:d12") is the 124M shape, d6/d24/d36/d48 the others.
    Initialized like PyTorch's GPT-2 (llm.c's train_gpt2.py): weights N(0, 0.02) drawn in module
    order (wte, wpe, then per layer qkvw, attprojw, fcw, fcprojw), the two projections back into
    the residual stream scaled by 1/sqrt(2L), biases 0, LayerNorm weights 1, wte's pad rows 0.
    A path to a .bin file is loaded instead."""
    if descriptor.endswith(".bin") or os.path.exists(descriptor):
        return gpt2_build_from_checkpoint(descriptor)
    name = descriptor.split(":", 1)[1] if descriptor.startswith("gpt2:") else descriptor
    depth = int(name[1:]) if name[:1] == "d" and name[1:].isdigit() else None
    if depth not in MODEL_DEPTHS:
        raise ConfigError(f"unknown model '{descriptor}': use d6, d12, d24, d36, d48 or a .bin checkpoint")
    NH, C = MODEL_DEPTHS[depth]
    config = GPT2Config(max_seq_len=1024, vocab_size=50257, num_layers=depth, num_heads=NH, channels=C,
                        padded_vocab_size=padded_vocab(50257))
    model = GPT2(config, np.zeros(num_parameters(config), dtype=np.float32))
    init_weights(model, seed)
    return model


def init_weights(model, seed=42):
    p, L, V = model.params, model.config.num_layers, model.config.vocab_size
    rng = np.random.RandomState(seed)                    # MT19937, init_genrand(seed): see normal_
    std, residual_std = 0.02, 0.02 / math.sqrt(2 * L)
    for w in (p.ln1w, p.ln2w, p.lnfw):
        w[...] = 1
    normal_(p.wte[:V], std, rng)                         # the pad rows stay 0
    normal_(p.wpe, std, rng)
    for l in range(L):
        normal_(p.qkvw[l], std, rng)
        normal_(p.attprojw[l], residual_std, rng)
        normal_(p.fcw[l], std, rng)
        normal_(p.fcprojw[l], residual_std, rng)


def _allocate_activations(model, B, T):
    shapes = activation_shapes(model.config, B, T)
    model.act_sizes = [math.prod(s) for _, s in shapes]
    model.acts_memory = np.zeros(sum(model.act_sizes), dtype=np.float32)
    grad_shapes = [(n, s) for n, s in shapes if n not in NO_GRAD_ACTS]
    model.grad_act_sizes = [math.prod(s) for _, s in grad_shapes]
    model.grads_acts_memory = None                       # allocated at the first backward
    model.batch_size, model.seq_len = B, T


def check_batch(config, inputs, targets, B, T):
    """A batch both trainers accept: T within max_seq_len and token ids within the vocabulary.
    Returns inputs and targets (or None) as int32 (B, T) arrays on the host."""
    if T > config.max_seq_len:
        raise ConfigError(f"sequence length T={T} exceeds the model's max_seq_len {config.max_seq_len}; "
                          f"use -t {config.max_seq_len} or less")
    V = config.vocab_size
    checked = []
    for what, ids in (("token", inputs), ("target", targets)):
        if ids is not None:
            ids = np.asarray(ids).reshape(B, T)
            if ids.min() < 0 or ids.max() >= V:
                raise ConfigError(f"{what} ids must lie in [0, {V}), got {ids.min()}..{ids.max()}")
            ids = ids.astype(np.int32)
        checked.append(ids)
    return checked


def gpt2_forward(model, inputs, targets, B, T):
    """The forward pass of llm.c's train_gpt2.c. inputs, targets: (B, T) token ids; targets may
    be None (then mean_loss is -1). Sets model.acts (logits, probs, ...) and model.mean_loss."""
    c = model.config
    L, NH, C, V, Vp = c.num_layers, c.num_heads, c.channels, c.vocab_size, c.padded_vocab_size
    model.inputs, model.targets = check_batch(c, inputs, targets, B, T)
    if model.acts_memory is None or B > model.batch_size or T > model.seq_len:
        _allocate_activations(model, max(B, model.batch_size), max(T, model.seq_len))
    acts = model.acts = views(model.acts_memory, activation_shapes(c, B, T), model.act_sizes)
    model.B, model.T = B, T
    p = model.params

    encoder_forward(acts.encoded, model.inputs, p.wte, p.wpe, B, T, C)
    for l in range(L):
        residual = acts.encoded if l == 0 else acts.residual3[l - 1]
        layernorm_forward(acts.ln1[l], acts.ln1_mean[l], acts.ln1_rstd[l], residual, p.ln1w[l], p.ln1b[l], B, T, C)
        matmul_forward(acts.qkv[l], acts.ln1[l], p.qkvw[l], p.qkvb[l], B, T, C, 3 * C)
        attention_forward(acts.atty[l], acts.preatt[l], acts.att[l], acts.qkv[l], B, T, C, NH)
        matmul_forward(acts.attproj[l], acts.atty[l], p.attprojw[l], p.attprojb[l], B, T, C, C)
        residual_forward(acts.residual2[l], residual, acts.attproj[l], B * T * C)
        layernorm_forward(acts.ln2[l], acts.ln2_mean[l], acts.ln2_rstd[l], acts.residual2[l], p.ln2w[l], p.ln2b[l], B, T, C)
        matmul_forward(acts.fch[l], acts.ln2[l], p.fcw[l], p.fcb[l], B, T, C, 4 * C)
        gelu_forward(acts.fch_gelu[l], acts.fch[l], B * T * 4 * C)
        matmul_forward(acts.fcproj[l], acts.fch_gelu[l], p.fcprojw[l], p.fcprojb[l], B, T, 4 * C, C)
        residual_forward(acts.residual3[l], acts.residual2[l], acts.fcproj[l], B * T * C)
    layernorm_forward(acts.lnf, acts.lnf_mean, acts.lnf_rstd, acts.residual3[L - 1], p.lnfw, p.lnfb, B, T, C)
    matmul_forward(acts.logits, acts.lnf, p.wte, None, B, T, C, Vp)     # the classifier is wte (tied)
    softmax_forward(acts.probs, acts.logits, B, T, V, Vp)

    if model.targets is None:
        model.mean_loss = -1.0
    else:
        crossentropy_forward(acts.losses, acts.probs, model.targets, B, T, Vp)
        model.mean_loss = float(acts.losses.mean(dtype=np.float64))


def gpt2_zero_grad(model):
    """Zero the parameter gradients (once per optimizer step; backward accumulates into them)."""
    if model.grads_memory is not None:
        model.grads_memory.fill(0)


def gpt2_backward(model):
    """Backward of the last forward pass, adding d(mean loss)/d(params) into model.grads.
    The activation gradients are scratch for this pass: zeroed here, then filled layer by
    layer from the loss down to the embeddings (llm.c's gpt2_backward)."""
    if model.targets is None:
        raise ConfigError("gpt2_backward needs a forward pass with targets first")
    c = model.config
    L, NH, C, V, Vp = c.num_layers, c.num_heads, c.channels, c.vocab_size, c.padded_vocab_size
    B, T = model.B, model.T
    if model.grads_memory is None:
        model.grads_memory = np.zeros(model.num_parameters, dtype=np.float32)
        model.grads = views(model.grads_memory, model.param_shapes)
    if model.grads_acts_memory is None:
        model.grads_acts_memory = np.zeros(sum(model.grad_act_sizes), dtype=np.float32)
    else:
        model.grads_acts_memory.fill(0)
    grad_shapes = [(n, s) for n, s in activation_shapes(c, B, T) if n not in NO_GRAD_ACTS]
    p, g, acts = model.params, model.grads, model.acts
    dacts = model.grads_acts = views(model.grads_acts_memory, grad_shapes, model.grad_act_sizes)

    dacts.losses[...] = np.float32(1.0 / (B * T))        # d mean / d loss[b, t]
    crossentropy_softmax_backward(dacts.logits, dacts.losses, acts.probs, model.targets, B, T, V, Vp)
    matmul_backward(dacts.lnf, g.wte, None, dacts.logits, acts.lnf, p.wte, B, T, C, Vp)
    layernorm_backward(dacts.residual3[L - 1], g.lnfw, g.lnfb, dacts.lnf, acts.residual3[L - 1], p.lnfw,
                       acts.lnf_mean, acts.lnf_rstd, B, T, C)
    for l in range(L - 1, -1, -1):
        residual = acts.encoded if l == 0 else acts.residual3[l - 1]
        dresidual = dacts.encoded if l == 0 else dacts.residual3[l - 1]
        residual_backward(dacts.residual2[l], dacts.fcproj[l], dacts.residual3[l], B * T * C)
        matmul_backward(dacts.fch_gelu[l], g.fcprojw[l], g.fcprojb[l], dacts.fcproj[l], acts.fch_gelu[l], p.fcprojw[l],
                        B, T, 4 * C, C)
        gelu_backward(dacts.fch[l], acts.fch[l], dacts.fch_gelu[l], B * T * 4 * C)
        matmul_backward(dacts.ln2[l], g.fcw[l], g.fcb[l], dacts.fch[l], acts.ln2[l], p.fcw[l], B, T, C, 4 * C)
        layernorm_backward(dacts.residual2[l], g.ln2w[l], g.ln2b[l], dacts.ln2[l], acts.residual2[l], p.ln2w[l],
                           acts.ln2_mean[l], acts.ln2_rstd[l], B, T, C)
        residual_backward(dresidual, dacts.attproj[l], dacts.residual2[l], B * T * C)
        matmul_backward(dacts.atty[l], g.attprojw[l], g.attprojb[l], dacts.attproj[l], acts.atty[l], p.attprojw[l],
                        B, T, C, C)
        attention_backward(dacts.qkv[l], dacts.preatt[l], dacts.att[l], dacts.atty[l], acts.qkv[l], acts.att[l],
                           B, T, C, NH)
        matmul_backward(dacts.ln1[l], g.qkvw[l], g.qkvb[l], dacts.qkv[l], acts.ln1[l], p.qkvw[l], B, T, C, 3 * C)
        layernorm_backward(dresidual, g.ln1w[l], g.ln1b[l], dacts.ln1[l], residual, p.ln1w[l],
                           acts.ln1_mean[l], acts.ln1_rstd[l], B, T, C)
    encoder_backward(g.wte, g.wpe, dacts.encoded, model.inputs, B, T, C)


def to_numpy(x):
    """Host copy of a model array: the identity here (cupy.asnumpy in train_gpt2_cuda.py)."""
    return x


# ----------------------------------------------------------------------------
# the optimizer: AdamW exactly as torch.optim.AdamW (single-tensor path), plus the global
# gradient norm, clipping and the learning-rate schedules
#
# Written over the whole flat arrays at once, AdamW is a dozen NumPy expressions on 124M floats,
# each streaming ~0.5 GB through memory: slower than all the matrix multiplies of a step. So it
# walks the flat buffers in chunks small enough to stay in the CPU's last-level cache (the same
# dozen ufuncs, in place, into reused scratch), and two threads take half the chunks each (NumPy
# releases the GIL inside ufuncs). Smaller, L2-sized chunks measured slower: each ufunc call
# holds the GIL for a moment, and with 2 threads and ~30k calls per step those moments add up
# (d12 on 2 cores: 64K floats 132 ms, 128K 126 ms, 256K 113 ms, 1M 118 ms).

ADAMW_CHUNK = 1 << 18                  # floats per chunk: p, g, m, v and 2 scratch = 6 MiB


def adamw_chunk(p, g, m, v, s1, s2, lr, beta1, beta2, eps, weight_decay, bias_correction1,
                bias_correction2_sqrt, grad_scale):
    """One AdamW step on matching slices of the flat arrays, in place. s1, s2: scratch.
    torch:  p *= 1 - lr*wd;  m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g;
            p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
    The last line is computed as p -= m / ((sqrt(v)/sqrt(bc2) + eps) / (lr/bc1)), the step size
    folded into the denominator's two constants: one pass fewer over the chunk."""
    if grad_scale != 1.0:
        g = np.multiply(g, grad_scale, out=s2)          # the clipped / averaged gradient
    if weight_decay != 0.0:
        p *= 1.0 - lr * weight_decay                    # decoupled weight decay
    np.subtract(g, m, out=s1)                           # m += (1-beta1) * (g - m)
    s1 *= 1.0 - beta1
    m += s1
    v *= beta2                                          # v = beta2 * v + (1-beta2) * g^2
    np.multiply(g, g, out=s1)
    s1 *= 1.0 - beta2
    v += s1
    step_size = lr / bias_correction1
    if step_size == 0.0:                                # lr 0: the moments move, p does not
        return
    np.sqrt(v, out=s1)                                  # (sqrt(v_hat) + eps) / step_size
    s1 *= 1.0 / (bias_correction2_sqrt * step_size)
    s1 += eps / step_size
    np.divide(m, s1, out=s1)                            # step_size * m_hat / (sqrt(v_hat) + eps)
    p -= s1


def param_segments(model):
    """(start, stop, decayed) ranges of the flat parameter array, in checkpoint order."""
    segments, start = [], 0
    for name, shape in model.param_shapes:
        stop = start + math.prod(shape)
        segments.append((start, stop, name in DECAYED_PARAMS))
        start = stop
    return segments


def gpt2_update(model, learning_rate, beta1, beta2, eps, weight_decay, t, grad_scale=1.0):
    """AdamW step number t (1-based) over all parameters; weight decay only on the 2-D weights;
    the gradients are multiplied by grad_scale first (clipping, accumulation averaging)."""
    if model.m_memory is None:
        model.m_memory = np.zeros(model.num_parameters, dtype=np.float32)
        model.v_memory = np.zeros(model.num_parameters, dtype=np.float32)
    p, g, m, v = model.params_memory, model.grads_memory, model.m_memory, model.v_memory
    chunks = [(a, min(a + ADAMW_CHUNK, stop), decayed)
              for start, stop, decayed in param_segments(model) for a in range(start, stop, ADAMW_CHUNK)]
    bias_correction1 = 1.0 - beta1 ** t
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)

    def work(my_chunks):
        s1, s2 = np.empty(ADAMW_CHUNK, np.float32), np.empty(ADAMW_CHUNK, np.float32)
        for a, b, decayed in my_chunks:
            n = b - a
            adamw_chunk(p[a:b], g[a:b], m[a:b], v[a:b], s1[:n], s2[:n], learning_rate, beta1, beta2, eps,
                        weight_decay if decayed else 0.0, bias_correction1, bias_correction2_sqrt, grad_scale)

    share = -(-len(chunks) // NUM_THREADS)
    list(thread_pool().map(work, [chunks[i:i + share] for i in range(0, len(chunks), share)]))


NORM_CHUNK = 1 << 20


def gpt2_calculate_grad_norm(model):
    """Global L2 norm of all parameter gradients (a python float)."""
    g = model.grads_memory
    parts = [g[a:a + NORM_CHUNK] for a in range(0, g.size, NORM_CHUNK)]
    return math.sqrt(sum(float(np.dot(x, x)) for x in parts))


def grad_clip_scale(norm, grad_clip):
    """The factor torch.nn.utils.clip_grad_norm_ multiplies the gradients by: min(1, clip / (norm + 1e-6))."""
    if grad_clip <= 0.0:
        return 1.0
    return min(1.0, grad_clip / (norm + 1e-6))


def blas_info():
    """Which OpenBLAS kernels NumPy runs (asked from the library itself), as one line."""
    import ctypes
    blas, corename = openblas_library(), None
    if blas is not None:
        fn = getattr(blas.lib, f"{blas.prefix}openblas_get_corename{blas.suffix}", None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            corename = fn().decode()
    env = os.environ.get("OPENBLAS_CORETYPE")
    how = "set by llmc (the CPU has AVX-512)" if llmc.OPENBLAS_CORETYPE_SET_HERE else ("from the environment" if env else "auto-detected")
    return f"OpenBLAS core {corename or 'unknown'} (OPENBLAS_CORETYPE={env or 'unset'}, {how})"


# ----------------------------------------------------------------------------
# the training loop: train_gpt2.c's main, shared with train_gpt2_cuda.py
#
# train(args, trainer) runs with any trainer module that provides these (this module is NumPy's):
#   the model:  gpt2_build_from_descriptor(descriptor) -> model (with model.config, num_parameters,
#               params_memory), gpt2_forward(model, inputs, targets, B, T) (sets model.mean_loss),
#               gpt2_zero_grad(model), gpt2_backward(model), gpt2_calculate_grad_norm(model) -> float,
#               gpt2_update(model, learning_rate, beta1, beta2, eps, weight_decay, t, grad_scale)
#   AdamW:      BETA1, BETA2, ADAM_EPS, GRAD_CLIP (fixed in llm.c, no flags)
#   the device: device_setup(args) -> lines for the config block, StepTimer (start(), stop() -> ms),
#               next_token_probs(model, tokens, t) -> (V,) float32 on the host, to_numpy(array)
TRAINER_API = ("gpt2_build_from_descriptor", "gpt2_forward", "gpt2_zero_grad", "gpt2_backward",
               "gpt2_calculate_grad_norm", "gpt2_update", "BETA1", "BETA2", "ADAM_EPS", "GRAD_CLIP",
               "device_setup", "StepTimer", "next_token_probs", "to_numpy")

# train_gpt2.c's job, by llm.c's names (llmc/cli.py gives each its flag: -b is B, -l learning_rate, ...)
TRAIN_GPT2_C_DEFAULTS = {
    "train_data_pattern": "", "val_data_pattern": "",   # "": tiny shakespeare if made, else TinyStories
    "load_filename": "gpt2_124M.bin",                   # or a descriptor d6/d12/... to start from scratch
    "output_log_dir": "",
    "B": 4, "T": 64,
    "total_batch_size": -1,                             # -1: B*T, no gradient accumulation
    "max_steps": 40,
    "learning_rate": 1e-4, "warmup_iterations": 0, "final_learning_rate_frac": 1.0, "lr_scheduler_type": "cosine",
    "weight_decay": 0.0,
    "val_loss_every": 10, "val_max_steps": 5,
    "sample_every": 20, "genT": 64,
    "overfit_single_batch": 0,
    "profile": 0,
}
# what -h shows for the defaults decided at run time
SHAKESPEARE = "data/tinyshakespeare/tiny_shakespeare_{}.bin"
TINYSTORIES = "data/tinystories/TinyStories_{}.bin"
SHOWN_DEFAULTS = {
    "train_data_pattern": f"{SHAKESPEARE.format('train')} if it exists, else {TINYSTORIES.format('train')}",
    "val_data_pattern": f"{SHAKESPEARE.format('val')} if it exists, else {TINYSTORIES.format('val')}",
    "load_filename": "gpt2_124M.bin, or gpt2_d12.bin when only that exists",
    "output_log_dir": "none",
    "total_batch_size": "-1 (= B*T)",
}

# AdamW settings fixed in train_gpt2.c (no flags): betas (0.9, 0.999), eps 1e-8, no clipping
BETA1, BETA2, ADAM_EPS, GRAD_CLIP = 0.9, 0.999, 1e-8, 0.0


def default_data_paths():
    """tiny shakespeare when it is there, else TinyStories (train_gpt2.c's choice)."""
    base = SHAKESPEARE if os.path.exists(SHAKESPEARE.format("train")) else TINYSTORIES
    return base.format("train"), base.format("val")


def resolve_checkpoint(name):
    if name == "gpt2_124M.bin" and not os.path.exists(name) and os.path.exists("gpt2_d12.bin"):
        print("gpt2_124M.bin not found: using gpt2_d12.bin (the same shape, from scratch)")
        return "gpt2_d12.bin"
    return name


def device_setup(args):
    """Runs before the model is built; returns the lines print_config adds under [GPT-2].
    NumPy: switch on the profiler if asked, and say which BLAS runs the matmuls."""
    if args.profile:
        profiler.enable(sys.modules[__name__])
    return [blas_info()]


class StepTimer:
    """Times one training step on the host's clock (train_gpt2_cuda.py uses CUDA events)."""

    def start(self):
        self.t0 = time.perf_counter()

    def stop(self):
        """Milliseconds since start()."""
        return 1e3 * (time.perf_counter() - self.t0)


def next_token_probs(model, tokens, t):
    """The probabilities (V,) of the token after tokens[0, :t]; tokens is the (B, T) sampling buffer.
    Only row 0 matters, so the pass runs on B=1 and a T rounded up to a multiple of 16: causality
    makes position t-1's probabilities the same as in the full batch."""
    Tr = min(tokens.shape[1], -(-t // 16) * 16)
    gpt2_forward(model, tokens[:1, :Tr], None, 1, Tr)
    return model.acts.probs[0, t - 1, :model.config.vocab_size]


def generate(trainer, model, tokenizer, B, T, gen_tokens, rng_state):
    """Sample gen_tokens-1 tokens after an EOT, one full forward pass per token (no KV cache,
    as llm.c); trainer.next_token_probs runs the pass and hands the probabilities to the host."""
    V = model.config.vocab_size
    start = tokenizer.eot_token if tokenizer.eot_token < V else V - 1   # a tiny test vocabulary has no EOT
    tokens = np.full((B, T), start, dtype=np.int32)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")   # keeps split characters whole
    print("generating:\n---")
    for t in range(1, gen_tokens):
        probs = trainer.next_token_probs(model, tokens, t)             # (V,)
        next_token = sample_mult(probs, random_f32(rng_state))
        tokens[0, t] = next_token
        if tokenizer.init_ok:
            piece = tokenizer.decode_bytes(next_token)
            if len(piece) == 1 and not (chr(piece[0]).isprintable() or chr(piece[0]).isspace()):
                continue                                   # llm.c's safe_printf skips control bytes
            print(decoder.decode(piece), end="", flush=True)
        else:
            print(next_token, end=" ", flush=True)
    print("\n---")


def evaluate(trainer, model, val_loader, val_max_steps, B, T):
    val_loader.reset()
    val_loss = 0.0
    for _ in range(val_max_steps):
        x, y = val_loader.next_batch()
        trainer.gpt2_forward(model, x, y, B, T)
        val_loss += model.mean_loss
    return val_loss / val_max_steps


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv, TRAIN_GPT2_C_DEFAULTS, SHOWN_DEFAULTS)
    run(args)


def run(args, trainer=None):
    """train(args, trainer), with its one-line errors printed as `error: ...` and exit status 1."""
    try:
        train(args, trainer)
    except (ConfigError, FormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def sequence_length(args, max_seq_len):
    """-t, checked against the model; a default T longer than a small model's max_seq_len shrinks
    to it (with a note), a T the user asked for must fit."""
    T = args.T
    if T > max_seq_len:
        if "T" in args.given:
            raise ConfigError(f"sequence length -t {T} exceeds the model's max_seq_len {max_seq_len}; "
                              f"use -t {max_seq_len} or less")
        print(f"T = {max_seq_len}: the model's max_seq_len (the default -t {T} is longer)")
        T = max_seq_len
    return T


def train(args, trainer=None):
    """llm.c's main loop. trainer: the module that runs the model, this one (NumPy) by default."""
    tr = trainer or sys.modules[__name__]
    missing = [name for name in TRAINER_API if not hasattr(tr, name)]
    assert not missing, f"{tr.__name__} lacks {missing} (see TRAINER_API)"
    B = args.B
    if B < 1 or args.T < 1:
        raise ConfigError(f"-b and -t must be positive, got B={B}, T={args.T}")
    extra_lines = tr.device_setup(args)

    # the model
    model = tr.gpt2_build_from_descriptor(resolve_checkpoint(args.load_filename))
    print_config(model.config, extra_lines)
    T = sequence_length(args, model.config.max_seq_len)

    # the data
    train_pattern, val_pattern = default_data_paths()
    train_pattern = args.train_data_pattern or train_pattern
    val_pattern = args.val_data_pattern or val_pattern
    if args.overfit_single_batch:
        train_pattern = val_pattern                       # llm.c: overfit the first val batch
    train_loader = DataLoader(train_pattern, B, T, should_shuffle=not args.overfit_single_batch)
    val_loader = DataLoader(val_pattern, B, T, should_shuffle=False)
    val_batches = val_loader.num_tokens // (B * T)
    print(f"train dataset: {train_pattern} ({train_loader.num_tokens:,} tokens, {train_loader.num_tokens // (B * T)} batches)")
    print(f"val dataset:   {val_pattern} ({val_loader.num_tokens:,} tokens, {val_batches} batches)")
    val_max_steps = min(args.val_max_steps, val_batches) if args.val_max_steps > 0 else val_batches

    total_batch = args.total_batch_size if args.total_batch_size > 0 else B * T
    if total_batch % (B * T) != 0:
        raise ConfigError(f"-d {total_batch} is not a multiple of B*T = {B * T}")
    grad_accum_steps = total_batch // (B * T)
    num_steps = args.max_steps if args.max_steps > 0 else train_loader.num_tokens // total_batch
    print(f"batch: B={B} T={T}, total {total_batch} tokens = {grad_accum_steps} micro-step(s); {num_steps} steps")
    clip = f", grad clip {tr.GRAD_CLIP:g}" if tr.GRAD_CLIP > 0 else ""   # train_gpt2.c does not clip
    print(f"AdamW: lr {args.learning_rate:g} ({args.lr_scheduler_type}, warmup {args.warmup_iterations}, "
          f"final frac {args.final_learning_rate_frac:g}), betas ({tr.BETA1}, {tr.BETA2}), eps {tr.ADAM_EPS:g}, "
          f"weight decay {args.weight_decay:g}{clip}")

    def learning_rate(step):
        return get_lr(step, args.lr_scheduler_type, args.learning_rate, args.warmup_iterations, num_steps,
                      args.final_learning_rate_frac)
    learning_rate(0)                                      # a bad schedule name fails now, not at step 1

    tokenizer = Tokenizer("gpt2_tokenizer.bin")
    logger = Logger(args.output_log_dir)
    rng_state = [1337]
    timer = tr.StepTimer()
    step_times = []
    for step in range(num_steps + 1):
        last_step = step == num_steps
        if args.val_loss_every > 0 and (step % args.val_loss_every == 0 or last_step):
            val_loss = evaluate(tr, model, val_loader, val_max_steps, B, T)
            print(f"val loss {val_loss:f}")
            logger.log_val(step, val_loss)
        if args.sample_every > 0 and step > 0 and (step % args.sample_every == 0 or last_step):
            generate(tr, model, tokenizer, B, T, args.genT, rng_state)
        if last_step:
            break

        timer.start()
        profiler.ACTIVE[0] = step > 0 or num_steps == 1   # --profile: the first step allocates, not counted
        tr.gpt2_zero_grad(model)
        train_loss = 0.0
        for _ in range(grad_accum_steps):
            if args.overfit_single_batch:
                train_loader.reset()
            x, y = train_loader.next_batch()
            tr.gpt2_forward(model, x, y, B, T)
            tr.gpt2_backward(model)
            train_loss += model.mean_loss / grad_accum_steps
        # the gradients hold the sum over micro-steps: average them inside the update
        norm = tr.gpt2_calculate_grad_norm(model) / grad_accum_steps
        scale = grad_clip_scale(norm, tr.GRAD_CLIP) / grad_accum_steps
        lr = learning_rate(step)
        tr.gpt2_update(model, lr, tr.BETA1, tr.BETA2, tr.ADAM_EPS, args.weight_decay, step + 1, grad_scale=scale)
        ms = timer.stop()
        profiler.ACTIVE[0] = False
        step_times.append(ms)
        print(f"step {step + 1:4d}/{num_steps}: train loss {train_loss:f} ({ms:.2f} ms, {total_batch / (ms / 1e3):.0f} tok/s)"
              f" norm {norm:.4f} lr {lr:.2e}")
        logger.log_train(step + 1, train_loss)

    if step_times:
        tail = step_times[1:] or step_times
        print(f"mean step time (excluding the first): {sum(tail) / len(tail):.2f} ms")
    if getattr(args, "profile", 0) and step_times:
        print(profiler.report(max(1, len(step_times) - 1)))
    if args.output_log_dir:
        path = os.path.join(args.output_log_dir, f"model_{num_steps:08d}.bin")
        write_model_file(path, model.config, tr.to_numpy(model.params_memory))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
