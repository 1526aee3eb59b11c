"""dev/perf_model.py: a modeled GPU time for one training step of train_gpt2_cuda.py, before any GPU runs it.

One step of the CUDA trainer (zero_grad, forward with targets, backward, gradient norm, AdamW: the
training loop's order) is written out as a table, step_launches(): one entry per launch, in the order
the trainer makes them, each with the kernel's name, where in the model it runs (a layer, "embedding",
"head" or "optimizer"), and its bytes read, bytes written and FLOPs as formulas of the config (L, NH,
C, V, Vp), B, T, the precision (s = bytes per floatX), recompute (-r), master weights (-w) and GELU
fusion (-ge: cuBLASLt's epilogues take the fc layer's bias and GELU into its GEMM, and with -ge 2 GELU's
gradient into fcproj's dinp GEMM; a GEMM's epilogue reads and writes are counted with it). That
works at any shape, d12 at B=16 T=1024 included. Two byte counts per launch:

    counted:  every load and store, as the emulator's traffic counter counts them (emulator/README.md,
              "traffic counter"): a row a kernel reads three times is three reads. tests/ checks these
              formulas against the counter at small shapes, launch by launch (--check 1 here).
    DRAM:     an estimate of what reaches HBM: each tensor read once per launch, a row reread by the
              same warp or block (LayerNorm's passes, the classifier's second pass over its logits row,
              a bias row every row of the output reads) served from L1/L2. Not checked by anything.

The table's times use the COUNTED bytes; the summary gives the step for both. The modeled time of
a launch is

    LAUNCH_OVERHEAD_S + max((bytes read + bytes written) / HBM bandwidth, FLOPs / tensor-core peak)

with FLOPs only for the GEMMs (cuBLAS on a GPU: 2*M*N*K*batch, operands read once, out written, and
read too when it accumulates); elementwise arithmetic is taken as free. The peaks are llmc/mfu.py's
(bf16, or tf32 for an fp32 run, as the trainer turns TF32 on for sm >= 80); the bandwidths are
NVIDIA's datasheet numbers. LAUNCH_OVERHEAD_S is an assumption: about what a launch costs from Python
(CuPy) when the GPU is not ahead of the host. Besides the kernels of kernels/, the step launches a few
CuPy fills, copies and sums (gpt2_zero_grad's fill, the backward's dresidual fill, the bf16 bias
broadcast before a GEMM, the mean loss, the norm's partials); they are in the table as "cupy ..."
(the emulator does not count them: NumPy does them). MFU is llm.c's: llmc/mfu.py's flops_per_token
(6N + 6LCT) per token over the modeled time and the peak.

What it cannot see: caches beyond the DRAM estimate above, coalescing (a scattered 4-byte access costs
a 32-byte sector on a GPU, here 4 bytes), latency and occupancy (a kernel with too few blocks, or one
that waits on its own loads, models as fast as one that streams at full bandwidth; kernels/README.md's
audit lists the grids), cuBLAS's real efficiency at each shape, and the host: the launch overhead is
assumed, the two syncs (mean loss, gradient norm) and the batch's host-device copies are not modeled.
No GPU has checked these numbers yet. The formulas take the 128-bit kernels, which the launchers pick
when C, 4C, Vp and B*NH*T*T are multiples of the pack P (GPT-2's shapes always are).

    python dev/perf_model.py -e d12 -b 16 -t 1024 -p bf16     # formulas: any shape, instant
    python dev/perf_model.py -e d12 -b 16 -t 1024 -ge 2       # with GELU fused into the fc GEMMs
    python dev/perf_model.py --tiny 1 -b 2 -t 16 --count 1   # counted on the emulator (small shapes only)
    python dev/perf_model.py --tiny 1 -b 2 -t 16 --check 1   # both, side by side per kernel
"""

import argparse
import collections
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emulator import count_traffic  # noqa: E402
from llmc import formats  # noqa: E402
from llmc.model import GPT2Config, descriptor_config, num_parameters, padded_vocab, param_shapes  # noqa: E402
from llmc.utils import ConfigError, FormatError  # noqa: E402
from llmc.cuda_common import ceil_div  # noqa: E402
from llmc.mfu import flops_per_token, peak_flops  # noqa: E402

# the GPUs modeled: a label, the name CUDA reports (llmc/mfu.py's peak_flops looks the tensor-core peak
# up by it), and the HBM bandwidth in bytes/s from NVIDIA's datasheets (SXM parts)
GPUS = (
    ("A100-40GB", "NVIDIA A100-SXM4-40GB", 1.555e12),   # HBM2
    ("A100-80GB", "NVIDIA A100-SXM4-80GB", 2.039e12),   # HBM2e
    ("H100-SXM", "NVIDIA H100 80GB HBM3", 3.35e12),     # HBM3
    ("H200", "NVIDIA H200", 4.8e12),                    # HBM3e
)
LAUNCH_OVERHEAD_S = 3e-6    # per kernel launch and per GEMM call (an assumption, see above)

TINY = GPT2Config(max_seq_len=64, vocab_size=1000, num_layers=2, num_heads=2, channels=64,
                  padded_vocab_size=padded_vocab(1000))
TINY_FLASH = GPT2Config(max_seq_len=64, vocab_size=1000, num_layers=2, num_heads=2, channels=128,
                        padded_vocab_size=padded_vocab(1000))   # --tiny 2: head size 64 (flash runs)

# one launch: counted = whether the emulator counts it (the kernels of kernels/ and the GEMMs, not CuPy's
# own fills and copies); dram_read: the DRAM estimate of bytes_read (see the header)
Launch = collections.namedtuple("Launch", "kernel where bytes_read bytes_written flops dram_read counted")
Gemm = collections.namedtuple("Gemm", "caller m n k batch bytes_read bytes_written flops")


# ----------------------------------------------------------------------------
# the formulas: one entry per launch of one training step, in the trainer's order

def expected_distinct_tokens(V, n):
    """The expected number of distinct ids among n uniformly random tokens of V (the encoder backward's
    buckets; real text has fewer, a small kernel either way)."""
    return V * (1.0 - (1.0 - 1.0 / V) ** n)


def flash_tiles(cu, T, hs):
    """Per head, what kernels/flash_attention.cu's three kernels load and store in global memory (bytes, bf16:
    2 a value) and the tensor-core FLOPs they run, from the walk its header describes: a forward block per
    query tile of BR rows loads its q rows, then the k and v rows of every key tile (BC) that starts before the
    tile's end (the causal skip); the dq block the same walk, with its dout rows, out rows (D = rowsum(dout *
    out)) and lse, D per row; the dkdv block per key tile walks the query tiles from the diagonal down, loading
    q, dout, lse and D. Rows at or past T are neither loaded nor stored. FLOPs per (query tile, key tile) pair:
    each 16x16x16 product on the whole tile, masked or not: forward S = QK^T and PV (2 x 2 BR BC hs), dq S, dP
    and dQ (3 x), dkdv S, dP, dV and dK (4 x): the backward is 3.5x the forward (FlashAttention-2's 2.5x
    recomputes S once, here both kernels do). Returns {kernel: (read, written, flops)} for one (b, h)."""
    BC, s = cu.FLASH_BC, 2
    rows = lambda start, n: max(0, min(n, T - start))   # noqa: E731 (rows of a tile inside T)
    row = hs * s
    BR = cu.flash_rows(hs, False)
    read, pairs = 0, 0
    for q0 in range(0, T, BR):
        read += rows(q0, BR) * row
        for k0 in range(0, min(q0 + BR, T), BC):
            read += 2 * rows(k0, BC) * row
            pairs += 1
    tiles = {"flash_attention_forward_kernel": (read, T * row + 4 * T, pairs * 4 * BR * BC * hs)}
    BR = cu.flash_rows(hs, True)
    read, pairs = 0, 0
    for q0 in range(0, T, BR):
        read += rows(q0, BR) * (3 * row + 4)                # q, dout, out; lse
        for k0 in range(0, min(q0 + BR, T), BC):
            read += 2 * rows(k0, BC) * row
            pairs += 1
    tiles["flash_attention_backward_dq_kernel"] = (read, T * (row + 4), pairs * 6 * BR * BC * hs)   # dq, D
    read, pairs = 0, 0
    for k0 in range(0, T, BC):
        read += 2 * rows(k0, BC) * row
        for q0 in range(k0 // BR * BR, T, BR):
            read += rows(q0, BR) * (2 * row + 8)            # q, dout; lse, D
            pairs += 1
    tiles["flash_attention_backward_dkdv_kernel"] = (read, 2 * T * row, pairs * 8 * BR * BC * hs)   # dk, dv
    return tiles


def step_launches(cu, config, B, T, precision="bf16", recompute=1, master_weights=True, distinct_tokens=None,
                  gelu_fusion=0, flash=False):
    """Every launch of one step of train_gpt2_cuda.py's training loop (gpt2_zero_grad, gpt2_forward with
    targets and dlogits in the forward, gpt2_backward, gpt2_calculate_grad_norm, gpt2_update), in order:
    a list of Launch. cu: the trainer module (its grids: matmul_bias_grid, LAYERNORM_BACKWARD_BLOCK,
    NORM_BLOCKS). distinct_tokens: the batch's distinct token ids (default: the expectation for random ones).
    gelu_fusion: -ge (0, 1, 2). flash: whether flash attention runs (-fa 1 where it can: cu.attention_path).
    Sizes in elements: N = B*T rows; s = sizeof(floatX); P = floatX per 128-bit pack; att = B*NH*T*T."""
    L, NH, C, V, Vp = (config.num_layers, config.num_heads, config.channels, config.vocab_size,
                       config.padded_vocab_size)
    s = 2 if precision == "bf16" else 4
    P = 16 // s
    N, hs, att = B * T, C // NH, B * NH * T * T
    causal = B * NH * T * (T + 1) // 2           # the (t2 <= t) elements of the (B,NH,T,T) tensors
    master = master_weights and precision == "bf16"
    n_tok = expected_distinct_tokens(V, N) if distinct_tokens is None else distinct_tokens
    out = []

    def launch(kernel, where, read, written, dram_read=None, flops=0, counted=True):
        out.append(Launch(kernel, where, read, written, flops, read if dram_read is None else dram_read, counted))

    def gemm(caller, where, m, n, k, batch, read, written):
        # cuBLAS: its operands read once, out written (read too when it accumulates): the emulator's count
        launch(f"gemm ({caller})", where, read, written, flops=2 * m * n * k * batch)

    def matmul_forward(where, OC, IC):
        if gelu_fusion >= 1:
            # -ge 1|2: the bias in cuBLASLt's BIAS epilogue: reads inp (N, IC), weight (OC, IC), the bias (OC); writes out
            gemm("matmul_forward", where, N, OC, IC, 1, (N * IC + OC * IC + OC) * s, N * OC * s)
        elif precision == "bf16":
            # the bias broadcast into out (a CuPy copy), then the GEMM adds onto it (beta = 1): reads inp
            # (N, IC), weight (OC, IC) and out (N, OC); writes out
            launch("cupy copy (matmul_forward bias)", where, OC * s, N * OC * s, counted=False)
            gemm("matmul_forward", where, N, OC, IC, 1, (N * IC + OC * IC + N * OC) * s, N * OC * s)
        else:
            gemm("matmul_forward", where, N, OC, IC, 1, (N * IC + OC * IC) * s, N * OC * s)
            # add_bias_packed_kernel: reads out and, per pack, the bias pack of its column: N*OC each;
            # writes out. DRAM: the bias row once
            launch("add_bias_packed_kernel", where, 2 * N * OC * s, N * OC * s, dram_read=(N * OC + OC) * s)

    # the LayerNorm kernels and the wpe backward: their x128 twins where C is a multiple of the pack (the
    # launchers' packable; the buffers are taken to be aligned, as at GPT-2's shapes), the same bytes
    x128 = "_x128_kernel" if C % P == 0 else "_kernel"

    def layernorm_forward(where):
        # one warp per row: reads the row three times (mean, variance, normalize) and weight and bias
        # once per row: 5NC; writes out (NC) and mean, rstd (N floats each). DRAM: inp once, weight and bias once
        launch("layernorm_forward" + x128, where, 5 * N * C * s, N * C * s + 8 * N, dram_read=(N * C + 2 * C) * s)

    def fused_residual_forward(where):
        # reads inp1 and inp2 (NC each), the residual it just wrote twice more (variance, normalize),
        # weight and bias once per row: 6NC; writes residual and normed (NC each), mean, rstd
        launch("fused_residual_layernorm_forward" + x128, where, 6 * N * C * s, 2 * N * C * s + 8 * N,
               dram_read=(2 * N * C + 2 * C) * s)

    def gelu_forward(where):
        # reads fch, writes fch_gelu: 4NC each
        launch("gelu_forward_packed_kernel", where, 4 * N * C * s, 4 * N * C * s)

    def matmul_forward_gelu(where, OC, IC):
        # the fc layer: out = gelu(pre), pre = inp @ weight^T + bias kept for the backward
        if gelu_fusion >= 1:
            # one GEMM with the GELU_AUX_BIAS epilogue: reads inp (N, IC), weight (OC, IC) and the bias (OC);
            # writes out and the aux pre-GELU (N, OC each)
            gemm("matmul_forward", where, N, OC, IC, 1, (N * IC + OC * IC + OC) * s, 2 * N * OC * s)
        else:
            matmul_forward(where, OC, IC)
            gelu_forward(where)

    def matmul_backward(where, OC, IC, bias=True, dgelu=False):
        # dinp (N, IC) = dout (N, OC) @ weight (OC, IC): reads dout and weight, writes dinp; the DGELU epilogue
        # (-ge 2, fcproj) reads the aux pre-GELU (N, IC) too and multiplies by GELU's gradient before the store
        gemm("matmul_backward", where, N, IC, OC, 1, (N * OC + OC * IC + (N * IC if dgelu else 0)) * s, N * IC * s)
        # dweight (OC, IC) += dout^T @ inp: reads dout, inp and dweight (accumulate), writes dweight
        gemm("matmul_backward", where, OC, IC, N, 1, (N * OC + N * IC + OC * IC) * s, OC * IC * s)
        if bias:
            bias_backward(where, OC)

    def bias_backward(where, OC):
        columns, row_blocks, rows_per_block = cu.matmul_bias_grid(N, OC, P)
        # matmul_backward_bias_x128_kernel, one launch: reads dout (N, OC) once; each block row's column sums,
        # (row blocks, OC) floats, stored by atomicExch and read back by the last block with atomicAdd(0):
        # an atomic counts a read and a write; a ticket per block and a counter reset per column block
        # (atomics too); dbias read and written. DRAM: dout, the partials once, dbias
        atomics = 2 * row_blocks * OC * 4 + columns * row_blocks * 4 + columns * 4
        launch("matmul_backward_bias_x128_kernel", where, N * OC * s + atomics + OC * s, atomics + OC * s,
               dram_read=N * OC * s + row_blocks * OC * 4 + OC * s)

    def layernorm_backward(where, linear_bias=False):
        # linear_bias: this LayerNorm's backward also gives the bias gradient of the linear layer before it (the
        # column sums of dinp after its update): a third row of partials per block where the x128 kernel runs,
        # else matmul_backward_bias on dinp after the plain kernels
        blocks = ceil_div(32 * N, cu.LAYERNORM_BACKWARD_BLOCK)
        # warp per row: reads inp, weight, dout in the first pass (3NC), and again with dinp (+=) in the
        # second (4NC); mean and rstd by each of the 32 lanes (256 bytes a row); then per block the column
        # sums reread dout and inp (2NC) with mean and rstd per row and column (8NC bytes; the x128 kernel
        # per row and pack: 8NC/P), and with linear_bias the dinp rows it stored (NC). Writes dinp and the
        # partials. DRAM: inp, dout, dinp once, weight once, mean and rstd once
        stats = 8 * N * C // P if C % P == 0 else 8 * N * C
        base_read = 9 * N * C * s + 256 * N + stats
        if x128 == "_x128_kernel":
            # layernorm_backward_onepass_kernel, one launch: its partials (blocks, W), W = (2 + linear_bias) C,
            # stored by atomicExch; a ticket per block; the last block of each group of LAYERNORM_GROUP reads its
            # group's rows (atomicAdd(0)) and stores the group's row, resets its counter, takes a ticket; the last
            # group reads the group rows and reads and writes the W outputs (floatX), then resets the last
            # counter. An atomic counts a read and a write of 4 bytes. DRAM: the non-atomic part, the partials once
            W = (2 + linear_bias) * C
            groups = ceil_div(blocks, cu.LAYERNORM_GROUP)
            atomics = 4 * (2 * blocks * W + 2 * groups * W + blocks + 2 * groups + 1)
            launch("layernorm_backward_onepass_kernel", where, base_read + linear_bias * N * C * s + atomics + W * s,
                   N * C * s + atomics + W * s, dram_read=(3 * N * C + C) * s + 8 * N + blocks * W * 4 + W * s)
            return
        launch("layernorm_backward_kernel", where, base_read, N * C * s + blocks * 2 * C * 4,
               dram_read=(3 * N * C + C) * s + 8 * N)
        if C % 4 == 0:   # reads the partials (blocks, 2C) and dbias, dweight; writes dbias, dweight
            launch("layernorm_backward_sum_split_kernel", where, blocks * 2 * C * 4 + 2 * C * s, 2 * C * s)
        else:            # one thread per channel: the same bytes
            launch("layernorm_backward_sum_kernel", where, blocks * 2 * C * 4 + 2 * C * s, 2 * C * s)
        if linear_bias:
            bias_backward(where, C)

    def materialized_attention_forward(where):
        # attention_forward: permute reads qkv (3NC), writes q, k, v (3NC)
        launch("permute_kernel", where, 3 * N * C * s, 3 * N * C * s)
        # preatt (B*NH, T, T) = q @ k^T: reads q, k; writes preatt
        gemm("attention_forward", where, T, T, hs, B * NH, 2 * N * C * s, att * s)
        # softmax: warp per row t, reads preatt[:t+1] twice (max/sum, then exp); writes att (all T)
        launch("softmax_forward_kernel", where, 2 * causal * s, att * s, dram_read=causal * s)
        # vaccum (B*NH, T, hs) = att @ v: reads att, v; writes vaccum
        gemm("attention_forward", where, T, hs, T, B * NH, (att + N * C) * s, N * C * s)
        launch("unpermute_kernel", where, N * C * s, N * C * s)     # vaccum -> atty

    def materialized_attention_backward(where):
        # attention_backward: unpermute_backward reads dout, writes dvaccum (NC each)
        launch("unpermute_backward_kernel", where, N * C * s, N * C * s)
        gemm("attention_backward", where, T, T, hs, B * NH, 2 * N * C * s, att * s)        # datt = dvaccum @ v^T
        gemm("attention_backward", where, T, hs, T, B * NH, (att + N * C) * s, N * C * s)  # dv = att^T @ dvaccum
        # softmax backward, warp per row t: reads att and datt [:t+1] twice (the dot, then dpreatt);
        # writes dpreatt (all T)
        launch("softmax_autoregressive_backward_kernel", where, 4 * causal * s, att * s, dram_read=2 * causal * s)
        gemm("attention_backward", where, T, hs, T, B * NH, (att + N * C) * s, N * C * s)  # dq = dpreatt @ k
        gemm("attention_backward", where, T, hs, T, B * NH, (att + N * C) * s, N * C * s)  # dk = dpreatt^T @ q
        launch("permute_backward_kernel", where, 3 * N * C * s, 3 * N * C * s)   # dq, dk, dv -> dqkv

    tiles = flash_tiles(cu, T, hs) if flash else None

    # gpt2_zero_grad: the gradients' fill (CuPy)
    launch("cupy fill (gpt2_zero_grad)", "optimizer", 0, num_parameters(config) * s, counted=False)

    # ---- gpt2_forward
    # encoder: reads the token id once per pack (N*C/P ints), the wte and wpe rows (NC each); writes out.
    # DRAM: the ids once, wte's N rows, wpe's T rows (the B batch rows reread them)
    launch("encoder_forward_packed_kernel", "embedding", N * C // P * 4 + 2 * N * C * s, N * C * s,
           dram_read=N * 4 + (N * C + T * C) * s)
    layernorm_forward("layer 0")                                    # ln1 of layer 0
    for l in range(L):
        where = f"layer {l}"
        matmul_forward(where, 3 * C, C)                             # qkv
        if flash:   # flash_attention_forward: atty and lse from qkv; DRAM: q, k, v once, out and lse written
            read, written, flops = (B * NH * x for x in tiles["flash_attention_forward_kernel"])
            launch("flash_attention_forward_kernel", where, read, written, dram_read=3 * N * C * s, flops=flops)
        else:
            materialized_attention_forward(where)
        matmul_forward(where, C, C)                                 # attproj
        fused_residual_forward(where)                               # residual2, ln2
        matmul_forward_gelu(where, 4 * C, C)                        # fc and GELU (-ge 1|2: one GEMM)
        matmul_forward(where, C, 4 * C)                             # fcproj
        fused_residual_forward(where)                               # residual3, the next ln1 or lnf
    # the classifier: logits (N, Vp) = lnf @ wte^T, no bias
    gemm("matmul_forward", "head", N, Vp, C, 1, (N * C + Vp * C) * s, N * Vp * s)
    # fused_classifier_x128_kernel, block per row: reads the row's real packs (ceil(V/P)*P) twice (max/sum,
    # then dlogits), the target by each of the 1024 threads, x[target] once; writes the loss and dlogits
    # (all Vp). DRAM: the row once (its second read from L2), the targets once
    real = ceil_div(V, P) * P
    launch("fused_classifier_x128_kernel", "head", N * (2 * real * s + 1024 * 4 + s), N * (4 + Vp * s),
           dram_read=N * (real * s + 4 + s))
    launch("cupy sum (mean loss)", "head", N * 4, 4, counted=False)   # acts.losses.mean(), read by the host

    # ---- gpt2_backward
    launch("cupy fill (dresidual)", "head", 0, N * C * s, counted=False)
    matmul_backward("head", Vp, C, bias=False)                      # dlnf, dwte from dlogits
    layernorm_backward("head", linear_bias=True)                    # lnf, and the last fcproj's dbias
    for l in reversed(range(L)):
        where = f"layer {l}"
        if recompute >= 1:
            gelu_forward(where)                                     # fch_gelu again
        if recompute >= 2:
            layernorm_forward(where)                                # ln2 again
        # fcproj (-ge 2: and GELU's gradient); its dbias came with the LayerNorm backward after it
        matmul_backward(where, C, 4 * C, bias=False, dgelu=gelu_fusion >= 2)
        if gelu_fusion < 2:
            # gelu_backward in place: reads fch and dout (4NC each), writes dinp over dout
            launch("gelu_backward_packed_kernel", where, 8 * N * C * s, 4 * N * C * s)
        matmul_backward(where, 4 * C, C)                            # fc
        layernorm_backward(where, linear_bias=True)                 # ln2, and attproj's dbias
        matmul_backward(where, C, C, bias=False)                    # attproj
        if flash:   # flash_attention_backward: dq (and D), then dk and dv. DRAM: each input once
            for kernel, dram in (("flash_attention_backward_dq_kernel", 5 * N * C * s + 4 * B * NH * T),
                                 ("flash_attention_backward_dkdv_kernel", 4 * N * C * s + 8 * B * NH * T)):
                read, written, flops = (B * NH * x for x in tiles[kernel])
                launch(kernel, where, read, written, dram_read=dram, flops=flops)
        else:
            materialized_attention_backward(where)
        if recompute >= 2:
            layernorm_forward(where)                                # ln1 again
        matmul_backward(where, 3 * C, C)                            # qkv
        layernorm_backward(where, linear_bias=l > 0)                # ln1, and the previous layer's fcproj's dbias
    # encoder backward, wte: a thread per (distinct token, channel) reads dwte, the bucket's token id,
    # start and end, and per position of the token its index and dout: n*C*(s + 12) + N*C*(4 + s); writes
    # dwte's n rows. DRAM: dout once, the indices once, dwte's n rows
    launch("encoder_backward_wte_kernel", "embedding", round(n_tok * C * (s + 12) + N * C * (4 + s)),
           round(n_tok * C * s), dram_read=round(n_tok * C * s + N * C * s + N * 4 + n_tok * 12))
    # wpe: a thread per (t, c) reads dwpe and the B rows of dout; writes dwpe[:T]
    launch("encoder_backward_wpe" + x128, "embedding", (B + 1) * T * C * s, T * C * s)

    # ---- gpt2_calculate_grad_norm: reads every gradient, writes one float per block; the host sums them
    n_params = num_parameters(config)
    grid = min(ceil_div(n_params, 512), cu.NORM_BLOCKS)
    launch("global_norm_squared_kernel", "optimizer", n_params * s, grid * 4)
    launch("cupy sum (grad norm)", "optimizer", grid * 4, 4, counted=False)

    # ---- gpt2_update: the 16 seeds uploaded in one copy, then ONE adamw_multi_tensor_kernel over every
    # tensor. Per parameter it reads the gradient (s), m and v (4 each) and the old value: the fp32 master
    # copy (4) or the parameter (s); writes m, v, the parameter and the master copy when there is one. Per
    # block (ceil(layer slice / 512) per layer of each tensor) thread 0 reads its tensor's table row: a
    # binary search (log2 of the table's rows, a power of two) and 7 fields of 8 bytes, and its 4-byte seed
    shapes = param_shapes(config)
    launch("cupy copy (adamw seeds)", "optimizer", 4 * len(shapes), 4 * len(shapes), counted=False)
    n_params, blocks = 0, 0
    for index, name, offset, slice_size, layers in cu.ShardLayout(shapes).tensors:   # llm.c's per-layer rows
        n_params += slice_size * layers
        blocks += layers * ceil_div(slice_size, cu.ADAMW_BLOCK)
    table_rows = 1 << (len(shapes) - 1).bit_length()
    per_block = (table_rows.bit_length() - 1 + 7) * 8 + 4
    launch("adamw_multi_tensor_kernel", "optimizer", n_params * (s + 8 + (4 if master else s)) + blocks * per_block,
           n_params * (s + 8 + (4 if master else 0)))
    return out


# ----------------------------------------------------------------------------
# counting one step on the emulator (small shapes only)

def counting_gemm(gemm, calls):
    """gemm() as the trainer's, that also appends a Gemm record to calls (FLOPs and bytes of the call)."""
    def wrapped(out, a, b, transpose_a=False, transpose_b=False, accumulate=False, epilogue=None, bias=None,
                aux=None):
        m, n = out.shape[-2:]
        k = a.shape[-2] if transpose_a else a.shape[-1]
        batch = out.size // (m * n)
        caller = sys._getframe(1).f_code.co_name          # matmul_forward, attention_backward, ...
        # an epilogue's bias is read, its aux read (DGELU) or written (GELU_AUX_BIAS)
        read = a.nbytes + b.nbytes + (out.nbytes if accumulate else 0) + (bias.nbytes if bias is not None else 0)
        read += aux.nbytes if epilogue == "DGELU" else 0
        written = out.nbytes + (aux.nbytes if epilogue == "GELU_AUX_BIAS" else 0)
        calls.append(Gemm(caller, m, n, k, batch, read, written, 2 * m * n * k * batch))
        return gemm(out, a, b, transpose_a, transpose_b, accumulate, epilogue, bias, aux)
    return wrapped


def emulated_trainer():
    """train_gpt2_cuda imported with LLMC_EMULATE=1 (its switch reads the variable once, at import)."""
    os.environ["LLMC_EMULATE"] = "1"
    import train_gpt2_cuda
    if not train_gpt2_cuda.EMULATE:
        raise SystemExit("perf_model.py: train_gpt2_cuda was imported before without LLMC_EMULATE=1; "
                         "run python dev/perf_model.py in a process of its own")
    return train_gpt2_cuda


def config_of(name):
    """The config a model names, without building it: a .bin file's header, or a descriptor (d6, d12, ...,
    gpt3:c768, ...: llmc/model.py's descriptor_config); a ConfigError or FormatError of one line otherwise."""
    if name.endswith(".bin") or os.path.exists(name):
        h, _ = formats.read_header(name, formats.MODEL_MAGIC, (3, 5))
        return GPT2Config(max_seq_len=int(h[2]), vocab_size=int(h[3]), num_layers=int(h[4]),
                          num_heads=int(h[5]), channels=int(h[6]), padded_vocab_size=int(h[7]))
    return descriptor_config(name)


def model_config(args):
    """The config of -e (config_of) or of --tiny, without building the model."""
    if args.tiny:
        return TINY_FLASH if args.tiny == 2 else TINY
    try:
        return config_of(args.model)
    except (ConfigError, FormatError, FileNotFoundError) as e:
        raise SystemExit(f"perf_model.py: {e}") from None


def build_model(cu, args):
    if args.tiny:
        config = model_config(args)
        rng = np.random.default_rng(0)
        params = (0.02 * rng.standard_normal(num_parameters(config))).astype(np.float32)
        return cu.GPT2(config, params, args.recompute, args.precision, bool(args.master_weights),
                       gelu_fusion=args.gelu_fusion, flash_attention=args.flash_attention)
    return cu.gpt2_build_from_descriptor(args.model, recompute=args.recompute, precision=args.precision,
                                         master_weights=bool(args.master_weights), gelu_fusion=args.gelu_fusion,
                                         flash_attention=args.flash_attention)


def training_step(cu, model, x, y, B, T):
    """One step of train_gpt2.py's loop (one micro-step, no clipping beyond GRAD_CLIP)."""
    model.dlogits_in_forward = True                      # the loop's one classifier pass per micro-step
    cu.gpt2_zero_grad(model)
    cu.gpt2_forward(model, x, y, B, T)
    cu.gpt2_backward(model)
    norm = cu.gpt2_calculate_grad_norm(model)
    scale = cu.host.grad_clip_scale(norm, cu.GRAD_CLIP)
    cu.gpt2_update(model, 3e-4, cu.BETA1, cu.BETA2, cu.ADAM_EPS, 0.0, 1, grad_scale=scale)
    return model.mean_loss


def random_batch(vocab_size, B, T, seed=0):
    """Inputs and targets (B, T) of uniformly random token ids: the batch the counted step trains on."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab_size, (B, T), dtype=np.int32)
    y = rng.integers(0, vocab_size, (B, T), dtype=np.int32)
    return x, y


def count_training_step(cu, model, x, y, B, T):
    """training_step with the traffic counter on (the emulator): (Traffic records, Gemm records, loss)."""
    gemms, gemm = [], cu.gemm
    cu.gemm = counting_gemm(gemm, gemms)
    try:
        with count_traffic() as launches:
            loss = training_step(cu, model, x, y, B, T)
    finally:
        cu.gemm = gemm
    return launches, gemms, loss


def count_step(cu, args):
    """Run one step of the trainer module cu on the emulator with the traffic counter on. Returns
    (launches, gemms, loss, distinct tokens): the emulator's Traffic records, the Gemm records, the
    step's loss and the number of distinct token ids in the batch."""
    model = build_model(cu, args)
    config, B, T = model.config, args.batch_size, args.seq_len
    x, y = random_batch(config.vocab_size, B, T)
    cu.gpt2_allocate_state(model, B, T)                  # its memory report prints before the table
    launches, gemms, loss = count_training_step(cu, model, x, y, B, T)
    return launches, gemms, loss, len(np.unique(x))


def counted_launches(launches, gemms, formulas):
    """The counted records as Launch entries: kernels, then GEMMs (the counter keeps two lists). Each
    takes the `where` of the formula entry at its place when the two sequences name the same kernels."""
    kernels = [f for f in formulas if f.counted and not f.kernel.startswith("gemm")]
    products = [f for f in formulas if f.kernel.startswith("gemm")]
    ks = [Launch(r.kernel, "?", r.bytes_read, r.bytes_written, 0, r.bytes_read, True) for r in launches]
    gs = [Launch(f"gemm ({g.caller})", "?", g.bytes_read, g.bytes_written, g.flops, g.bytes_read, True) for g in gemms]
    for mine, theirs in ((ks, kernels), (gs, products)):
        if [m.kernel for m in mine] == [t.kernel for t in theirs]:
            mine[:] = [m._replace(where=t.where) for m, t in zip(mine, theirs)]
    # a kernel's own FLOPs (flash attention's tensor-core products) are not counted: the formula's stand in
    if [k.kernel for k in ks] == [t.kernel for t in kernels]:
        ks[:] = [k._replace(flops=t.flops) for k, t in zip(ks, kernels)]
    return ks + gs


# ----------------------------------------------------------------------------
# the tables

class Row:
    """One line of a table: some launches together (all of one kernel, or all of one layer)."""

    def __init__(self, name):
        self.name = name
        self.launches = self.bytes_read = self.bytes_written = self.flops = self.dram_read = 0
        self.seconds = [0.0] * len(GPUS)          # from the counted bytes
        self.dram_seconds = [0.0] * len(GPUS)     # from the DRAM estimate

    def add(self, launch, gemm_precision):
        self.launches += 1
        self.bytes_read += launch.bytes_read
        self.bytes_written += launch.bytes_written
        self.dram_read += launch.dram_read
        self.flops += launch.flops
        for i, (_, device, bandwidth) in enumerate(GPUS):
            compute = launch.flops / peak_flops(device, gemm_precision) if launch.flops else 0.0
            self.seconds[i] += LAUNCH_OVERHEAD_S + max((launch.bytes_read + launch.bytes_written) / bandwidth, compute)
            self.dram_seconds[i] += LAUNCH_OVERHEAD_S + max((launch.dram_read + launch.bytes_written) / bandwidth,
                                                            compute)


def tabulate(launches, key, gemm_precision):
    """Rows of launches grouped by key(launch), in first-seen order, and their total Row."""
    rows, total = {}, Row("total")
    for launch in launches:
        rows.setdefault(key(launch), Row(key(launch))).add(launch, gemm_precision)
        total.add(launch, gemm_precision)
    return list(rows.values()), total


def print_table(title, rows, total, sort=True):
    labels = [label for label, _, _ in GPUS]
    print(f"{title:<44} {'launches':>8} {'MB read':>10} {'MB written':>10} {'GFLOP':>9} "
          + " ".join(f"{label + ' us':>13}" for label in labels))
    for row in (sorted(rows, key=lambda r: -r.seconds[2]) if sort else rows) + [total]:
        if row is total:
            print("-" * (44 + 41 + 14 * len(labels) + 1))
        print(f"{row.name:<44} {row.launches:>8} {row.bytes_read / 1e6:>10.3f} {row.bytes_written / 1e6:>10.3f} "
              f"{row.flops / 1e9:>9.3f} " + " ".join(f"{s * 1e6:>13.1f}" for s in row.seconds))


def print_check(counted, formulas):
    """Per kernel: the counted bytes and the formulas', and their relative difference."""
    print(f"{'kernel (--check: counted vs formulas)':<44} {'launches':>13} {'counted MB':>11} {'formula MB':>11} "
          f"{'diff':>8} {'GFLOP diff':>10}")
    counted_rows = {r.name: r for r in tabulate(counted, lambda x: x.kernel, "bf16")[0]}
    formula_rows = {r.name: r for r in tabulate([f for f in formulas if f.counted], lambda x: x.kernel, "bf16")[0]}
    for name in sorted(set(counted_rows) | set(formula_rows)):
        c, f = counted_rows.get(name, Row(name)), formula_rows.get(name, Row(name))
        cb, fb = c.bytes_read + c.bytes_written, f.bytes_read + f.bytes_written
        diff = (fb - cb) / cb if cb else float("inf")
        fdiff = (f.flops - c.flops) / c.flops if c.flops else 0.0
        print(f"{name:<44} {c.launches:>6} / {f.launches:<4} {cb / 1e6:>11.4f} {fb / 1e6:>11.4f} {diff:>+8.2%} "
              f"{fdiff:>+10.2%}")


def main(argv=None, trainer=None):
    """Print the tables; return a dict: formulas (the Launch list), counted (the counted Launch list, or
    None), launches and gemms (the counter's records, or None), rows and total (the kernel table's).
    trainer: train_gpt2_cuda imported with LLMC_EMULATE=1 (default: import it so)."""
    cu = trainer or emulated_trainer()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-e", "--model", default="d12", help="d6, d12, ... or a .bin checkpoint")
    parser.add_argument("--tiny", type=int, default=0, help="1: a tiny model instead (L2 NH2 C64 V1000 maxT64); "
                        "2: the same with C128 (head size 64, where flash attention runs)")
    parser.add_argument("-b", "--batch_size", type=int, default=16)
    parser.add_argument("-t", "--seq_len", type=int, default=1024)
    parser.add_argument("-p", "--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("-r", "--recompute", type=int, default=cu.TRAIN_GPT2_CU_DEFAULTS["recompute"],
                        help="what the backward recomputes, as train_gpt2_cuda.py's -r")
    parser.add_argument("-w", "--master_weights", type=int, default=1)
    parser.add_argument("-ge", "--gelu_fusion", type=int, default=cu.TRAIN_GPT2_CU_DEFAULTS["gelu_fusion"],
                        choices=(0, 1, 2), help="GELU fused into the fc GEMMs, as train_gpt2_cuda.py's -ge")
    parser.add_argument("-fa", "--flash_attention", type=int, default=cu.TRAIN_GPT2_CU_DEFAULTS["flash_attention"],
                        choices=(0, 1), help="attention, as train_gpt2_cuda.py's -fa: 1 flash where it runs (bf16, "
                                             "head size 64 or 128), 0 materialized")
    parser.add_argument("--count", type=int, default=0, help="1: count one step on the emulator (small shapes)")
    parser.add_argument("--check", type=int, default=0, help="1: count and compare with the formulas per kernel")
    args = parser.parse_args(argv)
    config, B, T, precision = model_config(args), args.batch_size, args.seq_len, args.precision
    gemm_precision = "bf16" if precision == "bf16" else "tf32"
    launches = gemms = counted = None
    loss, distinct = None, None
    if args.count or args.check:
        t0 = time.time()
        launches, gemms, loss, distinct = count_step(cu, args)
        print(f"[perf_model] counted on the emulator in {time.time() - t0:.1f} s (loss {loss:.4f})")
    flash, attention = cu.attention_path(config, precision, args.flash_attention)   # as the trainer decides
    formulas = step_launches(cu, config, B, T, precision, args.recompute, bool(args.master_weights), distinct,
                             args.gelu_fusion, flash)
    if launches is not None:
        counted = counted_launches(launches, gemms, formulas)
    shown = counted if args.count and not args.check else formulas
    P = 16 // (2 if precision == "bf16" else 4)
    L, NH, C = config.num_layers, config.num_heads, config.channels
    print(f"[perf_model] L={L} NH={NH} C={C} V={config.vocab_size} Vp={config.padded_vocab_size} B={B} T={T} "
          f"{precision} -r {args.recompute} -w {args.master_weights} -ge {args.gelu_fusion} -fa {args.flash_attention}: "
          "one training step, " + ("counted on the emulator" if shown is counted else "from the formulas"))
    print(f"  {attention}")
    print(f"modeled per launch: {LAUNCH_OVERHEAD_S * 1e6:g} us + max(bytes / HBM bandwidth, FLOPs / "
          f"{gemm_precision} peak); the tables use the COUNTED bytes (every access, as the emulator counts), "
          "the summary also the DRAM estimate (a reread row from cache)")
    print("  " + ", ".join(f"{label} {bw / 1e12:g} TB/s {peak_flops(device, gemm_precision) / 1e12:g} TFLOP/s "
                           f"{gemm_precision}" for label, device, bw in GPUS))
    if any(x % P for x in (C, B * NH * T * T, config.padded_vocab_size)) and shown is formulas:
        print(f"  note: C, Vp or B*NH*T*T is not a multiple of {P}: the trainer takes some per-element kernels "
              "that the formulas do not model (--count 1 counts them)")
    rows, total = tabulate(shown, lambda x: x.kernel, gemm_precision)
    print_table("kernel", rows, total)
    print()
    print_table("where", *tabulate(shown, lambda x: x.where, gemm_precision), sort=False)
    if args.check:
        print()
        print_check(counted, formulas)
    tokens = B * T
    model_flops = flops_per_token(num_parameters(config), L, C, T) * tokens
    print()
    print(f"step ({tokens:,} tokens, {model_flops / 1e12:.2f} TFLOP by llm.c's 6N + 6LCT; "
          f"{total.bytes_read / 1e9:.2f} GB read, {total.bytes_written / 1e9:.2f} GB written counted, "
          f"{total.dram_read / 1e9:.2f} GB read DRAM estimate):")
    for i, (label, device, _) in enumerate(GPUS):
        peak = peak_flops(device, gemm_precision)
        line = []
        for what, seconds in (("counted", total.seconds[i]), ("DRAM estimate", total.dram_seconds[i])):
            line.append(f"{seconds * 1e3:7.1f} ms/step {tokens / seconds:>9,.0f} tokens/s "
                        f"MFU {100 * model_flops / seconds / peak:4.1f}% ({what})")
        print(f"  {label:<10} " + " | ".join(line))
    print(f"  of which launch overhead: {total.launches} launches x {LAUNCH_OVERHEAD_S * 1e6:g} us = "
          f"{total.launches * LAUNCH_OVERHEAD_S * 1e3:.1f} ms")
    print(call_counts(formulas))
    print(other_kernels_time(formulas, gemm_precision))
    print("not modeled: caches beyond the DRAM estimate, coalescing, latency and occupancy, cuBLAS's efficiency, "
          "the host (syncs, copies); no GPU has checked these numbers (see the header)")
    return dict(formulas=formulas, counted=counted, launches=launches, gemms=gemms, rows=rows, total=total)


# the calls of a step by kind (our bound: at most 60% of the 471 of the d12 B=16 T=1024 bf16 step it started
# from): the GEMMs (cuBLAS / cuBLASLt), CuPy's fills, copies and sums, and our kernels by what they do
CALL_KINDS = (("GEMMs", ("gemm",)), ("CuPy", ("cupy",)), ("attention", ("flash_", "softmax", "permute", "unpermute")),
              ("LayerNorm forward", ("layernorm_forward", "fused_residual")),
              ("LayerNorm backward", ("layernorm_backward",)), ("bias", ("matmul_backward_bias", "add_bias")),
              ("GELU", ("gelu",)), ("AdamW and norm", ("adamw", "global_norm")),
              ("embedding and classifier", ("encoder", "fused_classifier")))


def call_counts(formulas):
    """One line: the step's calls in all, by kind (CALL_KINDS, first match), and against our bound."""
    counts = collections.Counter()
    for f in formulas:
        kind = next((k for k, prefixes in CALL_KINDS if f.kernel.startswith(prefixes)), "other")
        counts[kind] += 1
    kinds = ", ".join(f"{counts[k]} {k}" for k, _ in CALL_KINDS + (("other", ()),) if counts[k])
    return f"calls per step: {len(formulas)} ({kinds}); the bound at d12 B=16 T=1024 bf16: 282"


def other_kernels_time(formulas, gemm_precision):
    """One line: the modeled H100 time of the step's calls other than the GEMMs and attention (the kernels made to
    run at bandwidth: LayerNorm, bias, GELU, classifier, AdamW, embedding, CuPy's), counted and by the
    DRAM estimate, against our bound of 8 ms at d12 B=16 T=1024 bf16 with -fa 1 -ge 2."""
    attention = dict(CALL_KINDS)["attention"]
    rest = [f for f in formulas if not f.kernel.startswith(("gemm",) + attention)]
    _, total = tabulate(rest, lambda x: x.kernel, gemm_precision)
    h100 = [label for label, _, _ in GPUS].index("H100-SXM")
    return (f"the {total.launches} calls other than GEMMs and attention: {total.seconds[h100] * 1e3:.1f} ms on an "
            f"H100 counted, {total.dram_seconds[h100] * 1e3:.1f} ms by the DRAM estimate; the bound at d12 "
            "B=16 T=1024 bf16 -fa 1 -ge 2: 8 ms")


if __name__ == "__main__":
    main()
