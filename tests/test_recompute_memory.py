"""train_gpt2_cuda.py's recompute (-r 0|1|2) and its memory report, on the CPU emulator.

-r 1 keeps one GELU output buffer (B,T,4C) for all layers and recomputes GELU in the backward pass; -r 2
also keeps one ln1 and one ln2 buffer (B,T,C) and reruns their layernorm_forward. The same kernels on the
same inputs give the same bits, so the three settings must train bit for bit alike. The float counts, the
memory report's numbers and the largest B that fits are recomputed here from the model's sizes by hand,
not from train_gpt2_cuda's shape tables, so a slip in either shows.
"""

import math
import os

import numpy as np
import pytest

from test_cuda_trainer import (B, CONFIG, REPO, T, batch, cuda_trainer, run_python,  # noqa: F401 (fixtures)
                               tiny_checkpoint)
from llmc import formats

L, NH, C, Vp, maxT, V = (CONFIG.num_layers, CONFIG.num_heads, CONFIG.channels, CONFIG.padded_vocab_size,
                         CONFIG.max_seq_len, CONFIG.vocab_size)
FLOAT, INT = 4, 4   # bytes of a float32 and an int32 (the fp32 trainer's elements)
FLOATX = {"fp32": 4, "bf16": 2}   # bytes of a floatX (parameters, gradients, activations) per precision


def num_parameters():
    # wte (Vp,C), wpe (maxT,C); per layer ln1 2C, qkv 3C*C+3C, attproj C*C+C, ln2 2C, fc 4C*C+4C, fcproj 4C*C+C; lnf 2C
    return Vp * C + maxT * C + L * (12 * C * C + 13 * C) + 2 * C


def statistics_floats(B=B, T=T):
    # the activations that stay fp32 in every precision ("activation statistics"): (B,T) each:
    # lnf mean/rstd, losses, and per layer ln1/ln2 mean/rstd
    return B * T * (3 + 4 * L)


def activation_floats(recompute, B=B, T=T):
    # the floatX activations ("activations") with every layer kept: (B,T,C) tensors: encoded, lnf, and per
    # layer ln1, atty, attproj, residual2, ln2, fcproj, residual3 (7), fch and fch_gelu (4 each), qkvr (3);
    # att (B,NH,T,T) per layer; the scratch. (The 21 activations less the statistics above.)
    full = (B * T * C * (2 + L * (7 + 4 + 4 + 3)) + L * B * NH * T * T + B * T * max(3 * C, NH * T, Vp))
    gelu_saved = (L - 1) * B * T * 4 * C if recompute >= 1 else 0     # fch_gelu: one layer's buffer, not L
    ln_saved = (L - 1) * 2 * B * T * C if recompute >= 2 else 0       # ln1 and ln2: one layer's each
    return full - gelu_saved - ln_saved


def matmul_scratch_floats(N, pack):
    """The bias backward's partials for N rows: per biased layer (OC = 3C, C, 4C) one row of OC floats per block
    row, the rows split so that the grid is about 8 x 132 blocks (of 32 packs of columns each) in multiples of 32
    rows: one block row per 32 rows at the tests' small shapes, fewer, longer ones at a large B."""
    def block_rows(OC):
        columns = math.ceil(OC / (32 * pack))
        row_blocks = min(math.ceil(N / 32), max(1, math.ceil(8 * 132 / columns)))
        rows_per_block = math.ceil(math.ceil(N / row_blocks) / 32) * 32
        return math.ceil(N / rows_per_block)
    counters = max(math.ceil(OC / (32 * pack)) for OC in (3 * C, C, 4 * C))   # the one-launch kernel's tickets
    return max(block_rows(OC) * OC for OC in (3 * C, C, 4 * C)) + counters


def state_bytes(recompute, B=B, T=T, precision="fp32", master_weights=True):
    """What gpt2_allocate_state allocates: activations (floatX) and their statistics (fp32), the
    activation gradients (bt4c, preatt, dresidual: floatX), the layernorm backward's per-block partials
    (512-thread blocks of 16 rows: 3C floats each, 3C per group of 32 blocks, and the group counters), the matmul bias backward's per-block column sums (one
    block row per 32 rows here, as the tiny model's grid is far below its 1056-block target, and OC = 4C,
    the widest biased layer: 4C floats each), the encoder's token buckets (3BT+1 int32), AdamW m and v
    (fp32), and in bf16 with -w 1 the fp32 master weights."""
    X = FLOATX[precision]
    grad_acts = B * T * 4 * C + B * NH * T * T + B * T * C
    blocks = math.ceil(B * T / 16)
    ln_scratch = (blocks + math.ceil(blocks / 32)) * 3 * C + math.ceil(blocks / 32) + 1   # + groups' rows, counters
    mm_scratch = matmul_scratch_floats(B * T, 16 // X)
    master = num_parameters() if precision == "bf16" and master_weights else 0
    return (X * (activation_floats(recompute, B, T) + grad_acts) + FLOAT * statistics_floats(B, T)
            + FLOAT * (ln_scratch + mm_scratch + 2 * num_parameters() + master) + INT * (3 * B * T + 1))


def mib(n):
    return f"{n / 2**20:,.2f} MiB"


# the memory report's line for an 80 GB and a 141 GB GPU: nvidia-smi's totals less the CUDA context (1 GiB),
# cuBLAS's headroom (64 MiB) and the parameters and their gradients; never above the 32-bit index limit
REPORT_GPU_BYTES = (81559 << 20, 143771 << 20)


def largest_b_on(device_bytes, r, precision, master_weights):
    free = device_bytes - (1 << 30) - (64 << 20) - 2 * FLOATX[precision] * num_parameters()
    limit = (2**31 - 1) // max(NH * T * T, T * 4 * C)           # the materialized attention's (B,NH,T,T)
    lo, hi = 0, limit + 1                                      # state_bytes grows with B: bisect
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if state_bytes(r, B=mid, precision=precision, master_weights=master_weights) <= free \
            else (lo, mid)
    return lo, limit


def attention_line(precision):
    """The line before the report: CONFIG's head size 16 keeps the materialized path in both precisions."""
    why = ("fp32 has no flash variant (flash_attention.cu is bf16 on the tensor cores)" if precision == "fp32"
           else "head size 16 is not one flash_attention.cu takes (64 or 128)")
    return f"attention: materialized, (B,NH,T,T) tensors: {why}"


def two_steps(cu, checkpoint, recompute):
    """Two AdamW steps at -r recompute: logits, loss, norm and all gradients of each, the final parameters."""
    m = cu.gpt2_build_from_checkpoint(checkpoint, recompute=recompute)
    x, y = batch(7)
    record = {}
    for step in range(2):
        cu.gpt2_zero_grad(m)
        cu.gpt2_forward(m, x, y, B, T)
        record[f"logits{step}"] = cu.to_numpy(m.acts.logits).copy()
        cu.gpt2_backward(m)
        norm = cu.gpt2_calculate_grad_norm(m)
        record[f"loss{step}"], record[f"norm{step}"] = np.float32(m.mean_loss), np.float32(norm)
        record[f"grads{step}"] = cu.to_numpy(m.grads_memory).copy()
        cu.gpt2_update(m, 1e-2, 0.9, 0.95, 1e-8, 0.1, step + 1, grad_scale=cu.grad_clip_scale(norm, 1.0))
    record["params"] = cu.to_numpy(m.params_memory).copy()
    return m, record


def test_every_recompute_setting_trains_bit_for_bit_alike(cuda_trainer, tiny_checkpoint):
    cu = cuda_trainer
    models, records = {}, {}
    for r in (0, 1, 2):
        models[r], records[r] = two_steps(cu, tiny_checkpoint, r)
    assert records[0]["loss0"] != records[0]["loss1"]                     # it trained
    for r in (1, 2):
        assert records[r].keys() == records[0].keys()
        for name in records[0]:
            assert records[r][name].tobytes() == records[0][name].tobytes(), f"-r {r}: {name} differs from -r 0"
    # and the buffers really are shared: one layer's worth where the backward recomputes
    acts = {r: models[r].acts for r in (0, 1, 2)}
    assert acts[0].fch_gelu.shape == (L, B, T, 4 * C) and acts[0].ln1.shape == acts[0].ln2.shape == (L, B, T, C)
    assert acts[1].fch_gelu.shape == (1, B, T, 4 * C) and acts[1].ln1.shape == acts[1].ln2.shape == (L, B, T, C)
    assert acts[2].fch_gelu.shape == (1, B, T, 4 * C) and acts[2].ln1.shape == acts[2].ln2.shape == (1, B, T, C)
    assert acts[2].ln1_mean.shape == acts[2].ln2_rstd.shape == (L, B, T)      # mean and rstd stay per layer


def test_activation_memory_shrinks_by_the_recomputed_floats(cuda_trainer, tiny_checkpoint):
    cu = cuda_trainer
    sizes = {}
    for r in (0, 1, 2):
        m = cu.gpt2_build_from_checkpoint(tiny_checkpoint, recompute=r)
        cu.gpt2_allocate_state(m, B, T)
        assert m.acts_memory.dtype == m.acts_fp32_memory.dtype == np.float32
        sizes[r] = m.acts_memory.size
        assert sizes[r] == activation_floats(r), f"-r {r}: {sizes[r]} floats, expected {activation_floats(r)}"
        assert m.acts_fp32_memory.size == statistics_floats()              # recompute keeps every statistic
        assert m.m_memory.size == m.v_memory.size == num_parameters()
    assert sizes[0] - sizes[1] == (L - 1) * B * T * 4 * C                 # L-1 fewer GELU outputs
    assert sizes[1] - sizes[2] == 2 * (L - 1) * B * T * C                 # L-1 fewer ln1 and ln2


def expected_report(r, precision="fp32", master_weights=True):
    """The memory report's lines on the emulator for CONFIG at (B, T), -r r, -p precision, -w, from the
    sizes above: the floatX buffers in FLOATX[precision] bytes, the rest in 4. Returns (lines, total bytes)."""
    n, X = num_parameters(), FLOATX[precision]
    acts, acts0 = X * activation_floats(r), X * activation_floats(0)
    what = {0: "none", 1: "GELU", 2: "GELU and LayerNorm"}[r]
    total = 2 * X * n + state_bytes(r, precision=precision, master_weights=master_weights)
    if precision == "fp32":
        master = "master weights: none (fp32 parameters)"
    elif master_weights:
        master = f"allocating {mib(FLOAT * n)} for master weights"
    else:
        master = "master weights: none (-w 0: AdamW updates the bf16 weights)"
    (b80, limit), (b141, _) = (largest_b_on(d, r, precision, master_weights) for d in REPORT_GPU_BYTES)
    return [
        attention_line(precision),
        f"allocating {mib(X * n)} for parameters",
        f"allocating {mib(X * n)} for parameter gradients",
        f"allocating {mib(acts)} for activations",
        f"allocating {mib(FLOAT * statistics_floats())} for activation statistics",
        f"allocating {mib(X * (B * T * 4 * C + B * NH * T * T + B * T * C))} for activation gradients",
        f"allocating {mib(FLOAT * (2 * 3 * C + 2))} for layernorm backward scratch",
        f"allocating {mib(FLOAT * matmul_scratch_floats(B * T, 16 // X))} for matmul backward bias scratch",
        f"allocating {mib(INT * (3 * B * T + 1))} for encoder backward buckets",
        f"allocating {mib(FLOAT * n)} for AdamW optimizer state m",
        f"allocating {mib(FLOAT * n)} for AdamW optimizer state v",
        master,
        f"recompute: -r {r} ({what}): activations {mib(acts)}, {mib(acts0 - acts)} less than -r 0",
        f"largest B at T={T} on an 80 GB / 141 GB GPU: {b80} / {b141} (materialized attention; the 32-bit index "
        f"limit: {limit})",
        f"total: {mib(total)}",
        "estimated maximum batch size: n/a (emulator)",
    ], total


def allocated_bytes(m):
    """The bytes of every device buffer the model holds after gpt2_allocate_state."""
    buffers = (m.params_memory, m.grads_memory, m.acts_memory, m.acts_fp32_memory, m.grads_acts_memory,
               m.layernorm_scratch, m.matmul_scratch, m.bucket_memory, m.m_memory, m.v_memory)
    return sum(a.nbytes for a in buffers) + (0 if m.master_memory is None else m.master_memory.nbytes)


@pytest.mark.parametrize("r", [0, 1, 2])
def test_memory_report_numbers(cuda_trainer, tiny_checkpoint, capsys, r):
    cu = cuda_trainer
    m = cu.gpt2_build_from_checkpoint(tiny_checkpoint, recompute=r)
    cu.gpt2_forward(m, *batch(1), B, T)                   # the first pass allocates, with the report
    lines = capsys.readouterr().out.splitlines()
    expected, total = expected_report(r)
    assert lines == expected, "\n".join(lines)
    assert m.master_memory is None and allocated_bytes(m) == total


def test_largest_batch_size_against_a_given_free_memory(cuda_trainer, tiny_checkpoint, monkeypatch, capsys):
    """With the device's free memory faked, the report's estimate is the largest B whose state fits."""
    cu = cuda_trainer
    free = state_bytes(1, B=37) + 100                        # room for B=37 at -r 1, not 38
    assert state_bytes(1, B=38) > free
    monkeypatch.setattr(cu, "device_memory", lambda: (free, 2 * free))
    m = cu.gpt2_build_from_checkpoint(tiny_checkpoint, recompute=1)
    cu.gpt2_allocate_state(m, B, T)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [f"total: {mib(2 * FLOAT * num_parameters() + state_bytes(1))} "
                          f"(device: {mib(free)} free of {mib(2 * free)}, {mib(cu.CUBLAS_HEADROOM)} more kept for cuBLAS)",
                          f"estimated maximum batch size at T={T}: 37"]
    expected = max(b for b in range(1, 200) if state_bytes(2, B=b) <= free)   # -r 2 fits more
    assert expected > 37 and cu.largest_batch_size(CONFIG, T, 2, free) == expected
    assert cu.largest_batch_size(CONFIG, T, 1, state_bytes(1, B=1) - 1) == 0


def test_help_lists_recompute():
    r = run_python(["-c", "import sys; sys.modules['cupy'] = None; import train_gpt2_cuda as t; t.main(['-h'])"])
    assert r.returncode == 0, r.stderr
    assert ("  -r         recompute in the backward to save memory: 0 none, 1 GELU, 2 GELU and LayerNorm "
            "(default: 1)") in r.stdout.splitlines()


# ----------------------------------------------------------------------------------------------
# bad input on the command line: one line, exit 1, nothing written

@pytest.fixture
def tiny_data(tmp_path):
    rng = np.random.default_rng(4)
    train, val = tmp_path / "tiny_train.bin", tmp_path / "tiny_val.bin"
    formats.write_data_shard(str(train), rng.integers(0, V, size=2000))
    formats.write_data_shard(str(val), rng.integers(0, V, size=500))
    return str(train), str(val)


def assert_one_error_line(r, expected, out_dir):
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [expected], r.stderr
    assert not os.path.exists(out_dir), "nothing may be written"


@pytest.mark.parametrize("value", ["3", "-1"])
def test_recompute_out_of_range(tmp_path, tiny_checkpoint, tiny_data, value):
    out = tmp_path / "out"
    r = run_python([os.path.join(REPO, "train_gpt2_cuda.py")], "-e", tiny_checkpoint, "-i", tiny_data[0],
                   "-j", tiny_data[1], "-o", out, "-b", B, "-t", T, "-r", value, env={"LLMC_EMULATE": "1"},
                   cwd=str(tmp_path))
    assert_one_error_line(r, "error: -r must be 0, 1 or 2 (what the backward recomputes: 0 nothing, 1 GELU, "
                             f"2 GELU and LayerNorm), got {value}", str(out))


FAKE_FREE_MEMORY_RUN = """
import sys
sys.path.insert(0, {repo!r})
import train_gpt2_cuda as cu
assert cu.EMULATE
cu.device_memory = lambda: ({free}, {total})     # the emulator has no device: pretend to one this small
cu.main(sys.argv[1:])
"""


@pytest.mark.parametrize("recompute, fits, precision", [(1, 3, "bf16"), (2, 3, "bf16"), (1, 0, "bf16"), (1, 3, "fp32")],
                         ids=["r1", "r2", "nothing-fits", "r1-fp32"])
def test_batch_too_large_for_the_device(tmp_path, tiny_checkpoint, tiny_data, recompute, fits, precision):
    """B=8 against a device with room for `fits` sequences: the report, then one line naming the bytes
    needed and the largest B that fits, before any allocation or file. bf16 is the CLI's default on the
    emulator (with master weights); -p fp32 counts 4-byte floatX buffers and no master weights."""
    big_B = 8
    need = lambda b: state_bytes(recompute, B=b, precision=precision)  # noqa: E731
    free = need(fits) if fits else need(1) - 1
    assert need(fits + 1) > free
    out = tmp_path / "out"
    script = FAKE_FREE_MEMORY_RUN.format(repo=REPO, free=free, total=4 * free)
    r = run_python(["-c", script, "-e", tiny_checkpoint, "-i", tiny_data[0], "-j", tiny_data[1], "-o", str(out),
                    "-b", str(big_B), "-t", str(T), "-r", str(recompute),
                    *(["-p", "fp32"] if precision == "fp32" else [])], env={"LLMC_EMULATE": "1"},
                   cwd=str(tmp_path))
    if fits == 0:
        fix = "even B=1 does not fit: use a smaller -t"
    else:
        fix = f"use -b {fits} or less" + (", or -r 2 (recompute more)" if recompute < 2 else "")
    assert_one_error_line(r, f"error: B={big_B} T={T} needs {mib(need(big_B))} of device memory "
                             f"for activations, gradients and optimizer state, but {mib(free)} is free; "
                             f"the largest B that fits at T={T} is {fits}: {fix}", str(out))
    lines = r.stdout.splitlines()
    assert f"estimated maximum batch size at T={T}: {fits}" in lines   # the report came first
    assert (f"allocating {mib(FLOATX[precision] * num_parameters())} for parameters") in lines
