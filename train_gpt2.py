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
from types import SimpleNamespace

import llmc  # first: it picks NumPy's BLAS kernels before NumPy loads
import numpy as np

from llmc import actstats, collectives, profiler, run
from llmc.cli import parse_args
from llmc.hellaswag import evaluate_hellaswag, open_hellaswag
from llmc.formats import read_model_file
from llmc.model import GPT2Config, padded_vocab  # noqa: F401  (doc/'s scripts read them from here)
from llmc.model import descriptor_config, num_parameters, param_shapes, print_config
from llmc.logger import Logger
from llmc.mfu import TokensPerSecond, format_mfu, mfu_percent
from llmc.outlier import OutlierDetector, outlier_skip_reason
from llmc.rand import normal_
from llmc.run import SHAKESPEARE, TINYSTORIES, DeviceSettings
from llmc.sampler import random_f32, sample_mult
from llmc.schedulers import get_lr
from llmc.tokenizer import Tokenizer
from llmc.utils import ConfigError

# What makes the NumPy below fast lives in llmc/cpu.py, out of the way of the math: NumPy's
# OpenBLAS sgemm called through ctypes (matmul, matmuls), one thread pool for all the layers
# (row_blocks runs a layer over blocks of its rows in parallel, in_chunks runs AdamW over
# cache-sized chunks, scratch gives it one reusable array per thread, zero clears a big buffer),
# and glibc told to keep freed memory for the next step's temporaries.
from llmc.cpu import blas_info, in_chunks, keep_freed_memory, matmul, matmuls, row_blocks, scratch, zero


# ----------------------------------------------------------------------------
# the layers: each a forward/backward pair of plain functions, and its loop twin
#
# Arguments follow llm.c: outputs first, then inputs, then sizes. Arrays carry their logical
# shapes, e.g. (B, T, C), and the dtype follows the arrays (float32 in training, float64 in the
# tests). Constants are Python floats, which leave a float32 array float32 (NumPy's NEP 50);
# a NumPy float64 scalar would promote it.
#
# Backward ADDS into the gradient arrays (`+=`): gradients are zeroed once per step, and a tensor
# read by two layers (the residual stream, wte used by the encoder and by the classifier) then
# collects both contributions without any bookkeeping.
#
# Letters: B batch, T time, C channels, NH heads, hs = C/NH head size, V vocabulary,
# Vp padded vocabulary (the logits have Vp columns; columns V..Vp-1 never count), L layers.
#
# Each layer body is whole-array NumPy: the formula, as if it ran over all rows on one core.
# The speed is added from outside the body, by llmc/cpu.py:
#   - `@row_blocks(...)` on the def line says which arguments hold one entry per row (a sequence
#     b, a position (b, t), or an element) and which gradients every row adds into. A call then
#     runs the same body on blocks of rows at once, one block per thread (NumPy releases the GIL
#     inside its loops), with B (or N) set to the block's size; the summed gradients go through
#     per-thread partial sums, added in thread order, so the float32 result is the same every run.
#   - the matrix products call `matmul` / `matmuls`: NumPy's OpenBLAS sgemm through ctypes, the
#     output cut into one block per thread.
# Every fast layer has a loop twin beside it (`*_loop`, and llm.c's `matmul_forward_naive`):
# plain Python loops over b, t and the channels, the index math spelled out; the tests check
# each fast layer against its twin.


def encoder_forward(out, inp, wte, wpe, B, T, C):
    """out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]: token embedding plus position embedding."""
    np.take(wte, inp, axis=0, out=out)          # (B, T) ids -> (B, T, C) rows of wte
    out += wpe[:T]                              # (T, C) broadcast over B


def encoder_backward(dwte, dwpe, dout, inp, B, T, C):
    """dwte[inp[b,t],:] += dout[b,t,:]; dwpe[t,:] += sum_b dout[b,t,:]. dout (B, T, C)."""
    np.add.at(dwte, inp, dout)                  # scatter-add: a token seen twice gets both rows
    dwpe[:T] += dout.sum(axis=0)                # (B, T, C) -> (T, C)


def encoder_forward_loop(out, inp, wte, wpe, B, T, C):
    for b in range(B):
        for t in range(T):
            token = inp[b, t]
            for i in range(C):
                out[b, t, i] = wte[token, i] + wpe[t, i]


def encoder_backward_loop(dwte, dwpe, dout, inp, B, T, C):
    for b in range(B):
        for t in range(T):
            token = inp[b, t]
            for i in range(C):
                dwte[token, i] += dout[b, t, i]
                dwpe[t, i] += dout[b, t, i]


@row_blocks("out", "mean", "rstd", "inp", rows="BT")
def layernorm_forward(out, mean, rstd, inp, weight, bias, B, T, C):
    """Normalize each (b, t) row over C (biased variance, eps 1e-5), then scale and shift.
    Caches mean and rstd (B, T) for the backward pass; the normalized input is recomputed."""
    mean[...] = inp.mean(axis=-1)                                 # (B, T)
    xc = inp - mean[..., None]                                    # (B, T, C) centered
    rstd[...] = 1.0 / np.sqrt((xc * xc).mean(axis=-1) + 1e-5)     # (B, T), from the biased variance
    out[...] = xc * rstd[..., None] * weight + bias               # (B, T, C)


@row_blocks("dinp", "dout", "inp", "mean", "rstd", summed=("dweight", "dbias"), rows="BT")
def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, B, T, C):
    """With norm = (inp - mean) * rstd, out = norm * weight + bias and dnorm = dout * weight:
    dinp += rstd * (dnorm - mean_C(dnorm) - norm * mean_C(dnorm * norm));
    dweight += sum_BT(dout * norm); dbias += sum_BT(dout)."""
    norm = (inp - mean[..., None]) * rstd[..., None]              # (B, T, C), recomputed
    dnorm = dout * weight                                         # (B, T, C)
    dbias += dout.sum(axis=(0, 1))                                # (C,)
    dweight += (dout * norm).sum(axis=(0, 1))                     # (C,)
    dinp += rstd[..., None] * (dnorm - dnorm.mean(axis=-1, keepdims=True)
                               - norm * (dnorm * norm).mean(axis=-1, keepdims=True))


def layernorm_forward_loop(out, mean, rstd, inp, weight, bias, B, T, C):
    for b in range(B):
        for t in range(T):
            m = 0.0
            for i in range(C):
                m += inp[b, t, i]
            m = m / C
            v = 0.0
            for i in range(C):
                xshift = inp[b, t, i] - m
                v += xshift * xshift
            v = v / C
            s = 1.0 / math.sqrt(v + 1e-5)
            for i in range(C):
                n = s * (inp[b, t, i] - m)                # normalized
                out[b, t, i] = n * weight[i] + bias[i]
            mean[b, t] = m
            rstd[b, t] = s


def layernorm_backward_loop(dinp, dweight, dbias, dout, inp, weight, mean, rstd, B, T, C):
    for b in range(B):
        for t in range(T):
            # the two reductions over C first
            dnorm_mean = 0.0
            dnorm_norm_mean = 0.0
            for i in range(C):
                norm_i = (inp[b, t, i] - mean[b, t]) * rstd[b, t]
                dnorm_i = weight[i] * dout[b, t, i]
                dnorm_mean += dnorm_i
                dnorm_norm_mean += dnorm_i * norm_i
            dnorm_mean = dnorm_mean / C
            dnorm_norm_mean = dnorm_norm_mean / C
            # then each channel's three gradients
            for i in range(C):
                norm_i = (inp[b, t, i] - mean[b, t]) * rstd[b, t]
                dnorm_i = weight[i] * dout[b, t, i]
                dbias[i] += dout[b, t, i]
                dweight[i] += norm_i * dout[b, t, i]
                dinp[b, t, i] += (dnorm_i - dnorm_mean - norm_i * dnorm_norm_mean) * rstd[b, t]


def matmul_forward(out, inp, weight, bias, B, T, C, OC):
    """out = inp @ weight^T + bias: (B, T, C) @ (C, OC) + (OC,) -> (B, T, OC). weight is stored
    (OC, C), as PyTorch's nn.Linear keeps it; bias may be None (the classifier has none)."""
    matmul(out, inp, weight.T, bias=bias)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, B, T, C, OC):
    """dinp += dout @ weight; dweight += dout^T @ inp, summed over the B*T rows; dbias += sum_BT(dout)."""
    dout2, inp2 = dout.reshape(B * T, OC), inp.reshape(B * T, C)    # (B*T, OC), (B*T, C)
    matmuls((dinp, dout, weight),                      # (B, T, OC) @ (OC, C) -> (B, T, C)
            (dweight, dout2.T, inp2), accumulate=True)  # (OC, B*T) @ (B*T, C) -> (OC, C)
    if dbias is not None:
        dbias += dout2.sum(axis=0)                     # (OC,)


def matmul_forward_naive(out, inp, weight, bias, B, T, C, OC):
    for b in range(B):
        for t in range(T):
            for o in range(OC):
                val = bias[o] if bias is not None else 0.0
                for i in range(C):
                    val += inp[b, t, i] * weight[o, i]
                out[b, t, o] = val


def matmul_backward_loop(dinp, dweight, dbias, dout, inp, weight, B, T, C, OC):
    for b in range(B):
        for t in range(T):
            for o in range(OC):
                d = dout[b, t, o]
                for i in range(C):
                    dinp[b, t, i] += weight[o, i] * d      # out[o] reads every inp[i] ...
                    dweight[o, i] += inp[b, t, i] * d      # ... through weight[o, i]
                if dbias is not None:
                    dbias[o] += d


def _split_heads(x, B, T, NH):
    """(B, T, NH*hs) -> (B, NH, T, hs), a view (no copy): one head's rows are strided."""
    return x.reshape(B, T, NH, -1, copy=False).transpose(0, 2, 1, 3)


def _qkv_heads(inp, B, T, C, NH):
    """(B, T, 3C) = q|k|v -> three (B, NH, T, hs) views."""
    qkv = inp.reshape(B, T, 3, NH, C // NH, copy=False)
    return [qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]


def _causal_mask(T):
    return np.triu(np.ones((T, T), dtype=bool), k=1)    # True above the diagonal: the future


@row_blocks("out", "preatt", "att", "inp", rows="B")
def attention_forward(out, preatt, att, inp, B, T, C, NH):
    """Causal multi-head self-attention on inp (B, T, 3C) = q|k|v.
    preatt (B, NH, T, T) = q k^T / sqrt(hs), with -inf on the masked (future) entries;
    att = softmax(preatt) over the last axis, exactly 0 on the masked entries;
    out (B, T, C) = att @ v with the heads side by side again."""
    q, k, v = _qkv_heads(inp, B, T, C, NH)                        # 3 x (B, NH, T, hs)
    np.matmul(q, k.transpose(0, 1, 3, 2), out=preatt)             # (B,NH,T,hs) @ (B,NH,hs,T) -> (B,NH,T,T)
    preatt *= 1.0 / math.sqrt(C // NH)
    preatt[:, :, _causal_mask(T)] = -np.inf
    e = np.exp(preatt - preatt.max(axis=-1, keepdims=True))       # exp(-inf) = 0 on the future
    att[...] = e / e.sum(axis=-1, keepdims=True)
    np.matmul(att, v, out=_split_heads(out, B, T, NH))            # (B,NH,T,T) @ (B,NH,T,hs) -> (B,T,NH,hs)


@row_blocks("dinp", "dpreatt", "datt", "dout", "inp", "att", rows="B")
def attention_backward(dinp, dpreatt, datt, dout, inp, att, B, T, C, NH):
    """Each line inverts one forward line, last first. dinp (B, T, 3C) receives dq|dk|dv.
    datt also receives values on the masked entries (dout @ v^T is computed whole); they meet
    att = 0 there and change nothing else."""
    scale = 1.0 / math.sqrt(C // NH)
    q, k, v = _qkv_heads(inp, B, T, C, NH)                        # 3 x (B, NH, T, hs)
    dq, dk, dv = _qkv_heads(dinp, B, T, C, NH)
    dout_h = _split_heads(dout, B, T, NH)                         # (B, NH, T, hs)
    # out = att @ v
    datt += dout_h @ v.transpose(0, 1, 3, 2)                      # (B,NH,T,hs) @ (B,NH,hs,T)
    dv += att.transpose(0, 1, 3, 2) @ dout_h                      # (B,NH,T,T) @ (B,NH,T,hs)
    # att = softmax(preatt): d preatt_j = att_j * (d att_j - sum_i att_i d att_i)
    dpreatt += att * (datt - (att * datt).sum(axis=-1, keepdims=True))
    # preatt = scale * q @ k^T (the masked entries have att = 0, so their dpreatt is 0)
    dq += scale * (dpreatt @ k)                                   # (B,NH,T,T) @ (B,NH,T,hs)
    dk += scale * (dpreatt.transpose(0, 1, 3, 2) @ q)


def attention_forward_loop(out, preatt, att, inp, B, T, C, NH):
    """For each sequence b, position t and head h: scores against the keys at t2 <= t, their
    softmax, and the weighted sum of the values. inp[b, t] holds q | k | v, each NH heads of hs."""
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    for b in range(B):
        for t in range(T):
            for h in range(NH):
                q = h * hs                                   # offsets of this head's q, k, v
                k = C + h * hs
                v = 2 * C + h * hs
                # scores q . k[t2], and their maximum (for a softmax that cannot overflow)
                maxval = -math.inf
                for t2 in range(t + 1):
                    val = 0.0
                    for i in range(hs):
                        val += inp[b, t, q + i] * inp[b, t2, k + i]
                    val = val * scale
                    preatt[b, h, t, t2] = val
                    maxval = max(maxval, val)
                for t2 in range(t + 1, T):
                    preatt[b, h, t, t2] = -math.inf          # the future
                # softmax over t2 <= t; the future gets weight 0
                expsum = 0.0
                for t2 in range(t + 1):
                    e = math.exp(preatt[b, h, t, t2] - maxval)
                    att[b, h, t, t2] = e
                    expsum += e
                for t2 in range(T):
                    att[b, h, t, t2] = att[b, h, t, t2] / expsum if t2 <= t else 0.0
                # out = the values weighted by att
                for i in range(hs):
                    out[b, t, q + i] = 0.0
                for t2 in range(t + 1):
                    for i in range(hs):
                        out[b, t, q + i] += att[b, h, t, t2] * inp[b, t2, v + i]


def attention_backward_loop(dinp, dpreatt, datt, dout, inp, att, B, T, C, NH):
    """The forward loop's three steps inverted, last first; only t2 <= t is touched."""
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    for b in range(B):
        for t in range(T):
            for h in range(NH):
                q = h * hs
                k = C + h * hs
                v = 2 * C + h * hs
                # out[i] = sum_t2 att[t2] * v[t2, i]
                for t2 in range(t + 1):
                    for i in range(hs):
                        datt[b, h, t, t2] += inp[b, t2, v + i] * dout[b, t, q + i]
                        dinp[b, t2, v + i] += att[b, h, t, t2] * dout[b, t, q + i]
                # att = softmax(preatt): d att[t2] / d preatt[t3] = att[t2] * (1[t2 == t3] - att[t3])
                for t2 in range(t + 1):
                    for t3 in range(t + 1):
                        indicator = 1.0 if t2 == t3 else 0.0
                        local = att[b, h, t, t2] * (indicator - att[b, h, t, t3])
                        dpreatt[b, h, t, t3] += local * datt[b, h, t, t2]
                # preatt[t2] = scale * sum_i q[i] * k[t2, i]
                for t2 in range(t + 1):
                    for i in range(hs):
                        dinp[b, t, q + i] += inp[b, t2, k + i] * dpreatt[b, h, t, t2] * scale
                        dinp[b, t2, k + i] += inp[b, t, q + i] * dpreatt[b, h, t, t2] * scale


GELU_SCALING_FACTOR = math.sqrt(2.0 / math.pi)


@row_blocks("out", "inp", rows="N", block=1 << 17)
def gelu_forward(out, inp, N):
    """GELU, tanh approximation, elementwise: out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = inp
    out[...] = 0.5 * x * (1.0 + np.tanh(GELU_SCALING_FACTOR * (x + 0.044715 * x * x * x)))


@row_blocks("dinp", "inp", "dout", rows="N", block=1 << 17)
def gelu_backward(dinp, inp, dout, N):
    """d gelu/dx = 0.5 (1 + tanh u) + 0.5 x sech^2(u) du/dx, u = s (x + 0.044715 x^3)."""
    x = inp
    u = GELU_SCALING_FACTOR * (x + 0.044715 * x * x * x)
    # 1/cosh^2, as kernels/gelu.cu, not 1 - tanh^2, which cancels in float32 as tanh nears +-1 (6x the error)
    with np.errstate(over="ignore"):   # cosh overflows to inf past |u| ~ 89, where sech^2 is 0 all the same
        sech_u = 1.0 / np.cosh(u)
    du_dx = GELU_SCALING_FACTOR * (1.0 + 3.0 * 0.044715 * x * x)
    dinp += (0.5 * (1.0 + np.tanh(u)) + 0.5 * x * (sech_u * sech_u) * du_dx) * dout


def gelu_forward_loop(out, inp, N):
    x_flat, out_flat = inp.reshape(-1), out.reshape(-1, copy=False)
    for i in range(N):
        x = x_flat[i]
        cube = 0.044715 * x * x * x
        out_flat[i] = 0.5 * x * (1.0 + math.tanh(GELU_SCALING_FACTOR * (x + cube)))


def gelu_backward_loop(dinp, inp, dout, N):
    x_flat, dout_flat, dinp_flat = inp.reshape(-1), dout.reshape(-1), dinp.reshape(-1, copy=False)
    for i in range(N):
        x = x_flat[i]
        cube = 0.044715 * x * x * x
        tanh_arg = GELU_SCALING_FACTOR * (x + cube)
        tanh_out = math.tanh(tanh_arg)
        sech2 = 1.0 / (math.cosh(tanh_arg) * math.cosh(tanh_arg))   # as gelu_backward (why: there)
        local_grad = 0.5 * (1.0 + tanh_out) + x * 0.5 * sech2 * GELU_SCALING_FACTOR * (1.0 + 3.0 * 0.044715 * x * x)
        dinp_flat[i] += local_grad * dout_flat[i]


def residual_forward(out, inp1, inp2, N):
    """out = inp1 + inp2, elementwise over N."""
    np.add(inp1, inp2, out=out)


def residual_backward(dinp1, dinp2, dout, N):
    """dinp1 += dout; dinp2 += dout (one thread: the arrays are too small to be worth cutting)."""
    dinp1 += dout
    dinp2 += dout


def residual_forward_loop(out, inp1, inp2, N):
    a, b, o = inp1.reshape(-1), inp2.reshape(-1), out.reshape(-1, copy=False)
    for i in range(N):
        o[i] = a[i] + b[i]


def residual_backward_loop(dinp1, dinp2, dout, N):
    d1, d2, d = dinp1.reshape(-1, copy=False), dinp2.reshape(-1, copy=False), dout.reshape(-1)
    for i in range(N):
        d1[i] += d[i]
        d2[i] += d[i]


@row_blocks("probs", "logits", rows="BT", block=8)
def softmax_forward(probs, logits, B, T, V, Vp):
    """probs (B, T, Vp) = softmax of logits over the first V of the Vp columns; pad columns get 0."""
    logits_v = logits[..., :V]                                     # (B, T, V): the real vocabulary
    e = np.exp(logits_v - logits_v.max(axis=-1, keepdims=True))    # shifted by the max: no overflow
    probs[..., :V] = e / e.sum(axis=-1, keepdims=True)
    probs[..., V:] = 0.0


def softmax_forward_loop(probs, logits, B, T, V, Vp):
    for b in range(B):
        for t in range(T):
            maxval = -math.inf
            for i in range(V):
                maxval = max(maxval, logits[b, t, i])
            total = 0.0
            for i in range(V):
                probs[b, t, i] = math.exp(logits[b, t, i] - maxval)
                total += probs[b, t, i]
            for i in range(V):
                probs[b, t, i] = probs[b, t, i] / total
            for i in range(V, Vp):
                probs[b, t, i] = 0.0                        # pad columns: probability 0


def crossentropy_forward(losses, probs, targets, B, T, Vp):
    """losses (B, T) = -log of the probability each position gives its target token."""
    b, t = np.indices((B, T))
    losses[...] = -np.log(probs[b, t, targets])


def crossentropy_forward_loop(losses, probs, targets, B, T, Vp):
    for b in range(B):
        for t in range(T):
            losses[b, t] = -math.log(probs[b, t, targets[b, t]])


@row_blocks("dlogits", "dlosses", "probs", "targets", rows="BT", block=8)
def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, B, T, V, Vp):
    """Fused backward of softmax + crossentropy: dlogits += (probs - onehot(target)) * dlosses,
    over the first V columns only; the pad columns' gradients stay exactly 0."""
    dlogits[..., :V] += probs[..., :V] * dlosses[..., None]       # (B, T, V)
    b, t = np.indices((B, T))
    dlogits[b, t, targets] -= dlosses                             # each (b, t) once: no duplicates


def crossentropy_softmax_backward_loop(dlogits, dlosses, probs, targets, B, T, V, Vp):
    """The inner loop stops at V, so columns V..Vp-1 are never touched."""
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


def gpt2_build_from_descriptor(descriptor, seed=42, settings=None):
    """A GPT-2 from scratch: "d12" (or "gpt2:d12") is the 124M shape, d6/d24/d36/d48 the others, and
    "gpt3:c768" a GPT-3 shape by its width (llmc/model.py's descriptor_config: maxT 2048).
    Initialized like PyTorch's GPT-2 (llm.c's train_gpt2.py): weights N(0, 0.02) drawn in module
    order (wte, wpe, then per layer qkvw, attprojw, fcw, fcprojw), the two projections back into
    the residual stream scaled by 1/sqrt(2L), biases 0, LayerNorm weights 1, wte's pad rows 0.
    A path to a .bin file is loaded instead. settings: device_setup's, which the NumPy model needs none of
    (the CUDA trainer's take its precision from them)."""
    if descriptor.endswith(".bin") or os.path.exists(descriptor):
        return gpt2_build_from_checkpoint(descriptor)
    config = descriptor_config(descriptor)
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
    """Zero the parameter gradients (once per optimizer step; backward accumulates into them). Nothing
    to do when the last update zeroed them in its own pass (gpt2_update) and no backward ran since."""
    if model.grads_memory is not None and getattr(model, "zeroed_grads", None) is not model.grads_memory:
        zero(model.grads_memory)
        model.zeroed_grads = model.grads_memory


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
    model.zeroed_grads = None                            # from here on they hold this step's gradients
    if model.grads_acts_memory is None:
        model.grads_acts_memory = np.zeros(sum(model.grad_act_sizes), dtype=np.float32)
    else:
        zero(model.grads_acts_memory)
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


def gpt2_stats_activations(model):
    """-as (llmc/actstats.py): (name, layer or None, array) of the tensors whose statistics it writes, from the
    last forward pass: the residual stream, the LayerNorm outputs, the attention rows' entropies and the MLP's
    pre-GELU. All are still in model.acts after the backward pass, which writes only model.grads_acts."""
    acts = model.acts
    yield "encoded", None, acts.encoded
    for l in range(model.config.num_layers):
        yield "ln1", l, acts.ln1[l]
        yield actstats.ENTROPY, l, actstats.row_entropy(acts.att[l])      # (B, NH, T, T) -> (B*NH*T,)
        yield "residual2", l, acts.residual2[l]
        yield "ln2", l, acts.ln2[l]
        yield "fch", l, acts.fch[l]
        yield "residual3", l, acts.residual3[l]
    yield "lnf", None, acts.lnf


# ----------------------------------------------------------------------------
# the optimizer: AdamW exactly as torch.optim.AdamW (single-tensor path), plus the global
# gradient norm, clipping and the learning-rate schedules
#
# adamw is the update written on whole arrays. Run once over the flat 124M-float arrays, each of
# its NumPy operations would stream ~0.5 GB through memory, more time than all the matrix
# multiplies of a step; so gpt2_update hands it to llmc.cpu's in_chunks, which calls it on matching
# chunks of p, g, m and v small enough to stay in the CPU's cache, the chunks shared among the
# threads. Measured for d12 on 2 cores (ms per update): 64K floats 237 (each NumPy call holds the
# GIL for a moment, and the two threads wait on each other), 128K 207, 256K 250 (the temporaries
# no longer fit in the cache). The chunks run adamw_in_place: adamw's operations written into one
# scratch array per thread, and the gradients zeroed in the same pass (adamw_and_zero_grad).

ADAMW_CHUNK = 1 << 17                  # floats per chunk: p, g, m, v and two temporaries, 3 MiB


def adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0):
    """AdamW step number t (1-based) on matching float32 arrays, in place, as torch computes it:
        g = grad * grad_scale                      (the clipped / averaged gradient)
        param *= 1 - lr * weight_decay             (decoupled weight decay)
        m = beta1 * m + (1 - beta1) * g            (torch: m += (1 - beta1) * (g - m))
        v = beta2 * v + (1 - beta2) * g^2
        param -= lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)"""
    g = grad * grad_scale if grad_scale != 1.0 else grad
    if weight_decay != 0.0:
        param *= 1.0 - lr * weight_decay
    m += (1.0 - beta1) * (g - m)
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    # the last line with m_hat and v_hat written out: step_size * m / (sqrt(v) / sqrt(bc2) + eps),
    # the step size folded into the denominator's two constants (one pass fewer over the arrays)
    step_size = lr / (1.0 - beta1 ** t)
    if step_size == 0.0:                          # lr 0: the moments move, the parameters do not
        return
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
    param -= m / (np.sqrt(v) / (bias_correction2_sqrt * step_size) + eps / step_size)


def adamw_in_place(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0):
    """adamw, the same operations in the same order (so the same bits: tests/test_optim.py checks), each
    written into this thread's scratch array (llmc.cpu.scratch) instead of a new temporary: the chunk's
    working set stays the four arrays and one scratch, in the cache, and nothing goes through malloc."""
    tmp = scratch(param.size)
    g = grad if grad_scale == 1.0 else np.multiply(grad, grad_scale, out=scratch(param.size, slot=1))
    if weight_decay != 0.0:
        param *= 1.0 - lr * weight_decay
    np.subtract(g, m, out=tmp)                   # m += (1 - beta1) * (g - m)
    tmp *= 1.0 - beta1
    m += tmp
    v *= beta2                                   # v = beta2 * v + (1 - beta2) * g^2
    np.multiply(g, g, out=tmp)
    tmp *= 1.0 - beta2
    v += tmp
    step_size = lr / (1.0 - beta1 ** t)
    if step_size == 0.0:
        return
    np.sqrt(v, out=tmp)                          # param -= m / (sqrt(v) / (bc2 * step_size) + eps / step_size)
    tmp /= math.sqrt(1.0 - beta2 ** t) * step_size
    tmp += eps / step_size
    np.divide(m, tmp, out=tmp)
    param -= tmp


def param_segments(model):
    """(start, stop, decayed) ranges of the flat parameter array, in checkpoint order."""
    segments, start = [], 0
    for name, shape in model.param_shapes:
        stop = start + math.prod(shape)
        segments.append((start, stop, name in DECAYED_PARAMS))
        start = stop
    return segments


def gpt2_update(model, learning_rate, beta1, beta2, eps, weight_decay, t, grad_scale=1.0, shard=None):
    """AdamW step number t (1-based) over all parameters; weight decay only on the 2-D weights;
    the gradients are multiplied by grad_scale first (clipping, accumulation averaging).
    shard: ZeRO-1's collectives.ShardLayout: only this rank's pieces (its 1/N of every layer of every tensor)
    move, and m, v hold them compactly in llm.c's order (shard.num_state floats)."""
    size = model.num_parameters if shard is None else shard.num_state
    if model.m_memory is None:
        model.m_memory = np.zeros(size, dtype=np.float32)
        model.v_memory = np.zeros(size, dtype=np.float32)
    assert model.m_memory.size == size, "the optimizer state is not this shard's"
    segments = param_segments(model)
    # (tensor index, start in the parameters, start in m and v, count): whole tensors, or the shard's pieces
    parts = [(i, start, start, stop - start) for i, (start, stop, _) in enumerate(segments)] if shard is None \
        else [(i, start, state, n) for i, _, start, state, n in shard.pieces]
    p, g, m, v = model.params_memory, model.grads_memory, model.m_memory, model.v_memory
    zero_grads = ZERO_GRAD_IN_UPDATE and shard is None      # a ZeRO-1 rank moves only its shard: not all
    chunk_update = adamw_and_zero_grad if zero_grads else adamw_in_place
    for index, start, state, n in parts:
        w, s = slice(start, start + n), slice(state, state + n)
        in_chunks(chunk_update, (p[w], g[w], m[s], v[s]), ADAMW_CHUNK, learning_rate, beta1, beta2, eps,
                  weight_decay if segments[index][2] else 0.0, t, grad_scale)
    if zero_grads:
        model.zeroed_grads = g                           # the next gpt2_zero_grad has nothing to do


ZERO_GRAD_IN_UPDATE = True     # False: the gradients stay after the update, gpt2_zero_grad clears them (the tests' twin)


def adamw_and_zero_grad(param, grad, m, v, *hyperparameters):
    """adamw on one chunk, then the chunk's gradients zeroed while they are still in the cache: the
    next step's gpt2_zero_grad, folded into this pass (a whole pass over the gradients fewer per step).
    Only where the update moves every parameter; a ZeRO-1 rank's other gradients are zeroed as before."""
    adamw_in_place(param, grad, m, v, *hyperparameters)
    grad.fill(0.0)


def gpt2_optimizer_state(model, size=None):
    """AdamW's (m, v) as host float32 arrays, for a checkpoint (zeros of `size`, default all parameters,
    before the first update)."""
    if model.m_memory is None:
        size = model.num_parameters if size is None else size
        return np.zeros(size, np.float32), np.zeros(size, np.float32)
    return model.m_memory, model.v_memory


def gpt2_load_optimizer_state(model, m, v):
    """AdamW's m and v from a checkpoint (host float32 arrays, taken over, not copied): the next
    update goes on from them."""
    model.m_memory = np.asarray(m, dtype=np.float32)
    model.v_memory = np.asarray(v, dtype=np.float32)


NORM_CHUNK = 1 << 20


def gpt2_grad_sum_squares(model, lo=0, hi=None):
    """sum g^2 over grads[lo:hi] (a python float): the squares summed per chunk in float32 (a BLAS dot)
    and the chunks' sums in float64, in order. ZeRO-1 sums each rank's shard's across the ranks."""
    return sum(in_chunks(lambda x: float(np.dot(x, x)), (model.grads_memory[lo:hi],), NORM_CHUNK))


def gpt2_calculate_grad_norm(model):
    """Global L2 norm of all parameter gradients (a python float): sqrt(sum g^2)."""
    return math.sqrt(gpt2_grad_sum_squares(model))


def grad_clip_scale(norm, grad_clip):
    """The factor torch.nn.utils.clip_grad_norm_ multiplies the gradients by: min(1, clip / (norm + 1e-6))."""
    if grad_clip <= 0.0:
        return 1.0
    return min(1.0, grad_clip / (norm + 1e-6))


# ----------------------------------------------------------------------------
# main: train_gpt2.c's main, shared with train_gpt2_cuda.py
#
# train() runs with any trainer module that has llmc/run.py's Trainer interface: the model's functions by
# llm.c's names, AdamW's fixed settings and the device's pieces. This module is NumPy's: the functions above,
# and below what the loop needs from a device.

# train_gpt2.c's job, by llm.c's names (llmc/cli.py gives each its flag: -b is B, -l learning_rate, ...)
TRAIN_GPT2_C_DEFAULTS = {
    "train_data_pattern": "", "val_data_pattern": "",   # "": tiny shakespeare if made, else TinyStories
    "load_filename": "gpt2_124M.bin",                   # or a descriptor d6/d12/... to start from scratch
    "output_log_dir": "",
    "checkpoint_every": 0, "checkpoints_keep": 0, "major_checkpoint_every": 0, "resume": 0,
    "B": 4, "T": 64,
    "total_batch_size": -1,                             # -1: B*T, no gradient accumulation
    "max_steps": 40,
    "learning_rate": 1e-4, "warmup_iterations": 0, "final_learning_rate_frac": 1.0, "lr_scheduler_type": "cosine",
    "weight_decay": 0.0,
    "val_loss_every": 10, "val_max_steps": 5,
    "sample_every": 20, "genT": 64,
    "overfit_single_batch": 0,
    "hellaswag_eval": 0,                                # -h 1: HellaSwag every -v steps (train_gpt2.cu's -h)
    "skip_update_lossz": 0.0, "skip_update_gradz": 0.0,  # llm.c's outlier guard (train_gpt2.cu's -sl -sg), off
    "zero_stage": 0,                                    # data parallel (torchrun): 0 or 1 (ZeRO-1), train_gpt2.cu's -z
    "activation_stats_every": 0,                        # -as N: per-layer statistics into -o (llmc/actstats.py)
    "profile": 0,
}
# what --help shows for the defaults decided at run time (llmc/run.py's default_data_paths)
SHOWN_DEFAULTS = {
    "train_data_pattern": f"{SHAKESPEARE.format('train')} if it exists, else {TINYSTORIES.format('train')}",
    "val_data_pattern": f"{SHAKESPEARE.format('val')} if it exists, else {TINYSTORIES.format('val')}",
    "load_filename": "gpt2_124M.bin, or gpt2_d12.bin when only that exists",
    "output_log_dir": "none (nothing is written)",
}

# AdamW settings fixed in train_gpt2.c (no flags): betas (0.9, 0.999), eps 1e-8, no clipping
BETA1, BETA2, ADAM_EPS, GRAD_CLIP = 0.9, 0.999, 1e-8, 0.0
COLLECTIVES = "gloo"          # data parallel (llmc/collectives.py): NumPy arrays travel through torch's gloo
REDUCES_IN_BACKWARD = False   # gloo blocks the host, so the gradients are summed after the backward


def device_setup(args, world=None):
    """Runs before the model is built: switches on the profiler if asked (--profile). The settings say which
    BLAS runs the matmuls (a line under [GPT-2]), and that the device is the CPU, which has no entry in
    llmc/mfu.py's peak table, so the step line prints "MFU n/a"."""
    if args.profile:
        profiler.enable(sys.modules[__name__])
    return DeviceSettings(lines=[blas_info(llmc.OPENBLAS_CORETYPE_SET_HERE)])


def gpt2_allocate_state(model, B, T, shard=None, dlogits_in_forward=False):
    """Nothing here: as train_gpt2.c, the activations come at the first forward and AdamW's m and v at the
    first update (the CUDA trainer allocates all of it now, so a run too big for the GPU stops at once)."""


def gpt2_pieces_sum_squares(model, ranges):
    """sum g^2 over the gradients' [lo, hi) ranges: ZeRO-1's pieces of every tensor this rank holds."""
    return sum(gpt2_grad_sum_squares(model, lo, hi) for lo, hi in ranges)


def gpt2_master_state(model):
    """fp32 keeps no master weights and rounds nothing: (None, 0, 0), a state file's defaults."""
    return None, 0, 0


def gpt2_load_master_state(model, master, rng_state, rng_state_last_update):
    """Nothing to put back (see gpt2_master_state)."""


def log_gpu_info(step, logger, settings):
    """No GPU readings to log (the CUDA trainer's -lg)."""


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


def train(args, trainer=None, world=None, ctrl_c=None):
    """train_gpt2.c's main(): the model, the data, then per step the evals, sample and checkpoint when due, the
    micro-steps' forward and backward, the norm, the update, the step line; what is not the lesson is a call
    into llmc/run.py. trainer: llmc/run.py's Trainer (this NumPy module by default); world: the process's
    llmc.collectives.World (one process by default); ctrl_c: llmc.run.StopOnCtrlC (stop at a step's end)."""
    tr = trainer or sys.modules[__name__]
    world = world or collectives.World()
    run.check_trainer(tr)
    run.check_args(args)
    device = tr.device_setup(args, world)

    # the model: -e's file or descriptor, or with -y 1 the newest checkpoint's in -o
    model_file, resume_step = run.model_to_load(args, world)
    model = run.build_model(tr, model_file, resume_step, device, args.output_log_dir)
    print_config(model.config, device.lines)
    B = args.B
    T = run.at_most(args, "T", model.config.max_seq_len, "the model's max_seq_len", "sequence length")
    # the sampler writes into a (B, T) buffer: at most T tokens
    genT = run.at_most(args, "genT", T, "the sequence length T", "tokens to sample") if args.sample_every > 0 else 0

    # the data, and each step's total_batch tokens as grad_accum_steps micro-steps of B*T on every rank
    train_loader, val_loader, val_max_steps = run.data_loaders(args, B, T, world)
    total_batch, grad_accum_steps, num_steps = run.batch_plan(args, B, T, world, train_loader)
    micro_steps = grad_accum_steps * world.size           # over all ranks: what the summed gradients average
    shard = run.zero_shard(args, model, world)            # ZeRO-1 (-z 1): this rank's share of AdamW, or None
    # NCCL: the last micro-step's backward reduces each layer as it finishes; gloo reduces after the backward
    overlap = world.size > 1 and world.overlaps and tr.REDUCES_IN_BACKWARD
    tr.gpt2_allocate_state(model, B, T, shard, dlogits_in_forward=True)   # the loop reads no logits
    checkpoints = run.Checkpoints(tr, model, train_loader, args, world, shard,
                                  run.run_settings(args, total_batch, num_steps), device)
    start_step = checkpoints.resume(resume_step, num_steps)   # -y 1: m, v and the loader's place
    flops_per_step, peak = run.mfu_setup(model, T, total_batch, device)
    run.print_optimizer(args, tr)

    def learning_rate(step):
        return get_lr(step, args.lr_scheduler_type, args.learning_rate, args.warmup_iterations, num_steps,
                      args.final_learning_rate_frac)
    learning_rate(0)                                      # a bad schedule name fails now, not at step 1

    hellaswag = open_hellaswag(args.hellaswag_eval, B, T, world)
    tokenizer = Tokenizer("gpt2_tokenizer.bin")
    act_stats = actstats.ActivationStats(args.output_log_dir if world.rank == 0 else "", args.activation_stats_every)
    logger = Logger(args.output_log_dir if world.rank == 0 else "", append=args.resume == 1)   # rank 0 logs
    if args.output_log_dir:
        os.makedirs(args.output_log_dir, exist_ok=True)   # every rank writes its state file there
    timer = tr.StepTimer()
    tokens_per_second = TokensPerSecond()                 # the moving average the step line shows
    loss_outliers, norm_outliers = OutlierDetector(), OutlierDetector()   # z-scores on the step line, -sl -sg
    step_times = []
    if ctrl_c is not None:
        ctrl_c.in_loop = True                             # from now on the first Ctrl-C waits for the step's end
    for step in range(start_step, num_steps + 1):
        last_step = step == num_steps
        if step > start_step and not last_step:
            checkpoints.stop_if_asked(ctrl_c, step, num_steps)   # Ctrl-C: with -o a checkpoint, then stop
        if args.val_loss_every > 0 and (step % args.val_loss_every == 0 or last_step):
            val_loss = world.mean(evaluate(tr, model, val_loader, val_max_steps, B, T))
            if not math.isfinite(val_loss):
                raise run.DivergedError(run.diverged(step, f"val loss {val_loss:g}", args))
            print(f"val loss {val_loss:f}")
            logger.log_val(step, val_loss)
        if hellaswag is not None and ((step > 0 and args.val_loss_every > 0 and step % args.val_loss_every == 0)
                                      or last_step):
            logger.log_eval(step, evaluate_hellaswag(tr, model, hellaswag, B, T, world))
        if args.sample_every > 0 and step > 0 and (step % args.sample_every == 0 or last_step) and world.rank == 0:
            # the sampler's xorshift restarts at 1337, as train_gpt2.cu's: the same tokens after a resume
            generate(tr, model, tokenizer, B, T, genT, [1337])
        if checkpoints.due(step, last_step):
            checkpoints.save(step)
        if last_step:
            break

        # the training step: a forward and a backward per micro-step, adding into the gradients
        timer.start()
        profiler.ACTIVE[0] = step > 0 or num_steps == 1   # --profile: the first step allocates, not counted
        tr.gpt2_zero_grad(model)
        train_loss = 0.0
        if args.overfit_single_batch:
            train_loader.reset()                          # the same batch(es) at every step, as llm.c
        for micro_step in range(grad_accum_steps):
            x, y = train_loader.next_batch()
            tr.gpt2_forward(model, x, y, B, T)
            if overlap and micro_step == grad_accum_steps - 1:   # NCCL: the backward reduces layer by layer
                run.reduce_in_backward(model, world, shard)
            tr.gpt2_backward(model)
            train_loss += model.mean_loss / grad_accum_steps
        train_loss = world.mean(train_loss) if world.size > 1 else train_loss
        norm = run.reduced_grad_norm(tr, model, world, shard, overlap) / micro_steps   # summed over the ranks
        # -as N: the last micro-step's activations and the summed gradients, before the update (and before a
        # diverged step stops the run: its statistics are the ones that tell where it went wrong)
        act_stats.record(tr, model, step)
        # a NaN or inf loss or norm stops the run before the update, writing nothing. llm.c goes on: its outlier
        # guard (-sl/-sg) reads NaN z-scores as no outlier, and the update spreads the NaN into every weight
        if not (math.isfinite(train_loss) and math.isfinite(norm)):
            raise run.DivergedError(run.diverged(step + 1, f"train loss {train_loss:g}, gradient norm {norm:g}", args))
        # the gradients hold the sum over all micro-steps (of every rank): average them inside the update
        scale = grad_clip_scale(norm, tr.GRAD_CLIP) / micro_steps
        lr = learning_rate(step)
        zloss, zgrad = loss_outliers.update(train_loss), norm_outliers.update(norm)   # NaN for the first 128 steps
        skip = outlier_skip_reason(zloss, zgrad, args.skip_update_lossz, args.skip_update_gradz)
        if skip:                                          # as llm.c: the step still counts, so the next
            print(skip)                                   # update's t and lr are its own step's
        else:
            tr.gpt2_update(model, lr, tr.BETA1, tr.BETA2, tr.ADAM_EPS, args.weight_decay, step + 1,
                           grad_scale=scale, shard=shard)
            if shard:                                     # ZeRO-1: each rank updated its slice; share them
                world.all_gather(model.params_memory, shard)
        ms = timer.stop()
        profiler.ACTIVE[0] = False
        step_times.append(ms)
        tok_s = tokens_per_second.update(total_batch, ms / 1e3)
        mfu = format_mfu(mfu_percent(flops_per_step, ms / 1e3, peak), device.gemm_precision)
        eta = run.time_left(step_times, num_steps - step - 1)
        print(f"step {step + 1:4d}/{num_steps}: train loss {train_loss:f} ({zloss:+.2f}z) ({ms:.2f} ms, "
              f"{tok_s:.0f} tok/s, {mfu}) norm {norm:.4f} ({zgrad:+.2f}z) lr {lr:.2e} (eta {eta})")
        logger.log_train(step, train_loss, lr, norm)
        tr.log_gpu_info(step, logger, device)             # -lg (train_gpt2_cuda.py): NVML's readings every N steps

    run.print_summary(step_times, args)
    checkpoints.write_final(num_steps, model_file, args)   # with -o and no -n: the final model file


def main(argv=None):
    """python train_gpt2.py [flags]: train() under llmc/run.py's launch (one-line errors, ranks, Ctrl-C)."""
    args = parse_args(sys.argv[1:] if argv is None else argv, TRAIN_GPT2_C_DEFAULTS, SHOWN_DEFAULTS)
    run.launch(train, args, sys.modules[__name__])


if __name__ == "__main__":
    main()
