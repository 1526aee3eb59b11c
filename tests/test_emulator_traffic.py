"""The emulator's traffic counter (emulator.count_traffic): the bytes each launch reads and writes in
global memory, counted at the loads and stores themselves (emulator.h, "the traffic counter").

First small kernels written here, whose traffic is known by construction: a copy, its 128-bit packed
twin (the same bytes in a quarter of the accesses), a kernel that reads each element twice (counted
twice: there are no caches), shared memory (not counted), atomicAdd (one read and one write of its
size), bf16 (2-byte accesses), guarded arrays (the canary is not counted). Then the real kernels of
kernels/, each against the byte count its definition implies, in fp32 and bf16 (s = sizeof(floatX)).
Last, dev/perf_model.py's table for one step of the tiny model: its totals are the sums of the launches.
"""

import numpy as np
import pytest

from emulator import RawModule, count_traffic
from llmc.cuda_common import ceil_div, kernel_source

import perf_model
from check_kernel import PRECISION_OPTIONS, recorded_launches
from conftest import emulated_cuda_trainer

i32, i64, f32, u32 = np.int32, np.int64, np.float32, np.uint32

SOURCE = r"""
#include <cuda_bf16.h>

extern "C" __global__ void copy(float* out, const float* inp, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = inp[i]; }
}

// one thread per 4 floats: a 128-bit load and a 128-bit store (n a multiple of 4)
extern "C" __global__ void copy_packed(float* out, const float* inp, int n) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i < n) { __stcs(reinterpret_cast<float4*>(out + i), __ldcs(reinterpret_cast<const float4*>(inp + i))); }
}

// every element is read by two threads: i and n-1-i
extern "C" __global__ void mirror_sum(float* out, const float* inp, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = inp[i] + inp[n - 1 - i]; }
}

// through shared memory: each block reverses its 256 floats (n a multiple of 256)
extern "C" __global__ void reverse_blocks(float* out, const float* inp, int n) {
    __shared__ float tile[256];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = inp[i];
    __syncthreads();
    out[i] = tile[blockDim.x - 1 - threadIdx.x];
}

extern "C" __global__ void sum_atomic(float* out, const float* inp, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { atomicAdd(out, inp[i]); }
}

extern "C" __global__ void copy_bf16(__nv_bfloat16* out, const __nv_bfloat16* inp, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = inp[i]; }
}
"""


@pytest.fixture(scope="module")
def mod():
    return RawModule(code=SOURCE, options=("--std=c++17",))


def launch(fn, grid, block, args, **kw):
    """Launch once inside count_traffic(); return its one Traffic record."""
    with count_traffic() as launches:
        fn(grid if isinstance(grid, tuple) else (grid,), (block,), args, **kw)
    assert len(launches) == 1
    return launches[0]


def launched(file, precision, call, packed=None):
    """The one launch call(cu) makes on the trainer's launchers (its grid, block and arguments), counted."""
    [lc] = recorded_launches(call, packed=packed)
    return launch(module(file, precision).get_function(lc.kernel), lc.grid, lc.block, lc.args,
                  shared_mem=lc.shared_mem)


def traffic(record):
    return record.bytes_read, record.bytes_written, record.reads, record.writes


# n = 1000: the last block is partly idle; n = 65536: enough threads that blocks run on every OS
# thread of the pool, whose sums must all arrive
@pytest.mark.parametrize("n", [1000, 65536])
@pytest.mark.parametrize("guard", [False, True])
def test_copy(mod, n, guard):
    inp, out = np.arange(n, dtype=np.float32), np.zeros(n, np.float32)
    r = launch(mod.get_function("copy"), ceil_div(n, 256), 256, (out, inp, i32(n)), guard=guard)
    np.testing.assert_array_equal(out, inp)
    assert traffic(r) == (4 * n, 4 * n, n, n)
    assert (r.kernel, r.grid, r.block) == ("copy", (ceil_div(n, 256), 1, 1), (256, 1, 1))


def test_copy_packed_same_bytes_in_16_byte_accesses(mod):
    n = 4096
    inp, out = np.arange(n, dtype=np.float32), np.zeros(n, np.float32)
    r = launch(mod.get_function("copy_packed"), ceil_div(n // 4, 256), 256, (out, inp, i32(n)))
    np.testing.assert_array_equal(out, inp)
    assert traffic(r) == (4 * n, 4 * n, n // 4, n // 4)


def test_an_element_read_twice_counts_twice(mod):
    n = 1000
    inp, out = np.arange(n, dtype=np.float32), np.zeros(n, np.float32)
    r = launch(mod.get_function("mirror_sum"), ceil_div(n, 256), 256, (out, inp, i32(n)))
    np.testing.assert_array_equal(out, inp + inp[::-1])
    assert traffic(r) == (8 * n, 4 * n, 2 * n, n)


def test_shared_memory_is_not_counted(mod):
    n = 1024
    inp, out = np.arange(n, dtype=np.float32), np.zeros(n, np.float32)
    r = launch(mod.get_function("reverse_blocks"), n // 256, 256, (out, inp, i32(n)))
    np.testing.assert_array_equal(out, inp.reshape(-1, 256)[:, ::-1].reshape(-1))
    assert traffic(r) == (4 * n, 4 * n, n, n)


def test_atomic_add_is_one_read_and_one_write(mod):
    n = 1000
    inp, out = np.ones(n, np.float32), np.zeros(1, np.float32)
    r = launch(mod.get_function("sum_atomic"), ceil_div(n, 256), 256, (out, inp, i32(n)))
    assert out[0] == n
    # inp[i] (4 bytes), then the read-modify-write of out[0] (4 read, 4 written), per thread
    assert traffic(r) == (8 * n, 4 * n, 2 * n, n)


def test_bf16_two_byte_accesses(mod):
    n = 1000
    inp, out = np.arange(n, dtype=np.uint16), np.zeros(n, np.uint16)
    r = launch(mod.get_function("copy_bf16"), ceil_div(n, 256), 256, (out, inp, i32(n)))
    np.testing.assert_array_equal(out, inp)
    assert traffic(r) == (2 * n, 2 * n, n, n)


def test_only_inside_the_block_and_in_every_open_block(mod):
    n = 256
    inp, out = np.ones(n, np.float32), np.zeros(n, np.float32)
    copy = mod.get_function("copy")
    with count_traffic() as outer:
        copy((1,), (256,), (out, inp, i32(n)))
        with count_traffic() as inner:
            copy((1,), (256,), (out, inp, i32(n)))
    copy((1,), (256,), (out, inp, i32(n)))                # not counted
    assert len(outer) == 2 and inner == outer[1:]


# ---- the real kernels: s = sizeof(floatX), N elements (or rows of C)

PRECISIONS = {"fp32": (np.float32, 4), "bf16": (np.uint16, 2)}


def module(file, precision):
    return RawModule(code=kernel_source(file), options=PRECISION_OPTIONS[precision])


def values(rng, n, precision):
    """n floatX values: float32, or bf16 bits of float32 values (their top 16 bits)."""
    x = rng.standard_normal(n).astype(np.float32)
    return x if precision == "fp32" else (x.view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True])
def test_residual_forward(precision, packed):
    # out = inp1 + inp2: reads 2N, writes N elements
    N = 4096
    dtype, s = PRECISIONS[precision]
    rng = np.random.default_rng(0)
    out, inp1, inp2 = np.zeros(N, dtype), values(rng, N, precision), values(rng, N, precision)
    per_thread = 16 // s if packed else 1
    r = launched("residual", precision, lambda cu: cu.residual_forward(out, inp1, inp2, N), packed)
    assert r.kernel == ("residual_forward_packed_kernel" if packed else "residual_forward_kernel")
    assert (r.bytes_read, r.bytes_written) == (2 * N * s, N * s)
    assert (r.reads, r.writes) == (2 * N // per_thread, N // per_thread)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gelu_forward(precision):
    # out = gelu(inp), 128-bit packed: reads N, writes N elements, in N*s/16 accesses each
    N = 4096
    dtype, s = PRECISIONS[precision]
    out, inp = np.zeros(N, dtype), values(np.random.default_rng(0), N, precision)
    r = launched("gelu", precision, lambda cu: cu.gelu_forward(out, inp, N), packed=True)
    assert r.kernel == "gelu_forward_packed_kernel"
    assert traffic(r) == (N * s, N * s, N * s // 16, N * s // 16)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layernorm_forward(precision):
    # one warp per row, each reading its row three times (mean, variance, normalize) and all of weight
    # and bias once: reads 3NC + NC + NC elements; writes out (N, C) plus mean and rstd (N floats each)
    N, C = 64, 96
    dtype, s = PRECISIONS[precision]
    rng = np.random.default_rng(0)
    out, mean, rstd = np.zeros(N * C, dtype), np.zeros(N, np.float32), np.zeros(N, np.float32)
    inp, weight, bias = values(rng, N * C, precision), values(rng, C, precision), values(rng, C, precision)
    r = launched("layernorm", precision, lambda cu: cu.layernorm_forward(out, mean, rstd, inp, weight, bias, 1, N, C),
                 packed=False)
    assert r.kernel == "layernorm_forward_kernel"
    assert (r.bytes_read, r.bytes_written) == (5 * N * C * s, N * C * s + 2 * 4 * N)
    assert (r.reads, r.writes) == (5 * N * C, N * C + 2 * N)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("master", [False, True])
def test_adamw(precision, master):
    # per parameter: reads grad (s), m and v (4 each), and the old weight: the fp32 master copy (4) or
    # the parameter (s); writes m, v (4 each), the parameter (s) and the master copy (4) when there is one
    n = 3000
    dtype, s = PRECISIONS[precision]
    rng = np.random.default_rng(0)
    params, grads = values(rng, n, precision), values(rng, n, precision)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    master_params = rng.standard_normal(n).astype(np.float32) if master else None
    r = launched("adamw", precision, lambda cu: cu.adamw_update(params, master_params, grads, m, v, n, n, 1, 1e-3, 0.9,
                                                                0.999, 0.1, 0.001, 1e-8, 0.0, 1.0, 7))
    assert r.kernel == "adamw_kernel"
    old = 4 if master else s
    assert (r.bytes_read, r.bytes_written) == (n * (s + 8 + old), n * (s + 8 + (4 if master else 0)))
    assert (r.reads, r.writes) == (4 * n, (4 if master else 3) * n)



@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("master", [False, True])
def test_adamw_multi_tensor(precision, master):
    # adamw_kernel's bytes per parameter, plus per block thread 0's look-up: a binary search of the table
    # (log2 of its rows, a power of two: 3 tensors pad to 4 rows, 2 reads), the row's 7 fields (8 bytes each)
    # and the tensor's 4-byte seed. Tensors: 2 rows of 700, 1 row of 1000, 3 rows of 100 (one block each row)
    dtype, s = PRECISIONS[precision]
    shapes = [(2, 700), (1, 1000), (3, 100)]
    n = sum(r * c for r, c in shapes)
    rng = np.random.default_rng(1)
    params, grads = values(rng, n, precision), values(rng, n, precision)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    master_params = rng.standard_normal(n).astype(np.float32) if master else None
    table = np.zeros((4, 8), np.int64)
    table[:, 0] = np.iinfo(np.int64).max
    first = offset = 0
    for t, (rows, cols) in enumerate(shapes):
        per_row = ceil_div(cols, 512)
        table[t, :7] = (first, per_row, cols, offset, cols, offset, t % 2)
        first, offset = first + per_row * rows, offset + rows * cols
    seeds = np.array([5, 6, 7], np.uint32)
    r = launched("adamw", precision, lambda cu: cu.adamw_multi_tensor(
        params, master_params, grads, m, v, table.reshape(-1), 4, first, seeds, 1e-3, 0.9, 0.999, 0.1, 0.001, 1e-8,
        0.01, 1.0))
    assert r.kernel == "adamw_multi_tensor_kernel"
    old = 4 if master else s
    per_block = (2 + 7) * 8 + 4
    assert first == 2 * 2 + 1 * 2 + 3 * 1
    written = n * (s + 8 + (4 if master else 0))
    assert (r.bytes_read, r.bytes_written) == (n * (s + 8 + old) + first * per_block, written)
    assert (r.reads, r.writes) == (4 * n + first * (2 + 7 + 1), (4 if master else 3) * n)


# ---- dev/perf_model.py

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_perf_model_totals_are_the_sums_of_the_launches(precision, capsys):
    trainer = emulated_cuda_trainer("train_gpt2_cuda_perf_model")
    result = perf_model.main(["--tiny", "1", "-b", "2", "-t", "16", "-p", precision, "--count", "1"], trainer=trainer)
    launches, gemms, counted, rows, total = (result[k] for k in ("launches", "gemms", "counted", "rows", "total"))
    out = capsys.readouterr().out
    assert gemms and launches and trainer.gemm.__name__ == "gemm"        # counted, then put back
    assert len(counted) == len(launches) + len(gemms)
    # every table row: its launches and bytes are those of the records with its name
    assert sorted(r.name for r in rows) == sorted({t.kernel for t in launches} | {f"gemm ({g.caller})" for g in gemms})
    for row in rows:
        mine = [t for t in launches if t.kernel == row.name] or [g for g in gemms if f"gemm ({g.caller})" == row.name]
        assert row.launches == len(mine) > 0
        assert row.bytes_read == sum(t.bytes_read for t in mine) > 0
        assert row.bytes_written == sum(t.bytes_written for t in mine) > 0
        assert row.flops == sum(getattr(t, "flops", 0) for t in mine)
        assert all(s >= row.launches * perf_model.LAUNCH_OVERHEAD_S for s in row.seconds)
        assert row.seconds == sorted(row.seconds, reverse=True)            # more bandwidth is never slower
    assert total.launches == len(launches) + len(gemms)
    assert total.bytes_read == sum(t.bytes_read for t in launches) + sum(g.bytes_read for g in gemms)
    assert total.bytes_written == sum(t.bytes_written for t in launches) + sum(g.bytes_written for g in gemms)
    assert total.flops == sum(g.flops for g in gemms) > 0
    assert total.seconds == pytest.approx([sum(r.seconds[i] for r in rows) for i in range(len(perf_model.GPUS))])
    # what the step launched: AdamW once for all 16 tensors, the fused classifier once (in the forward)
    assert sum(t.kernel == "adamw_multi_tensor_kernel" for t in launches) == 1
    assert not any(t.kernel == "adamw_kernel" for t in launches)
    assert sum(t.kernel.startswith("fused_classifier") for t in launches) == 1   # its x128 or plain kernel
    # the classifier's GEMM: (B*T, C) @ (Vp, C)^T in the forward, 2 * B*T * Vp * C FLOPs
    c = perf_model.TINY
    assert 2 * 2 * 16 * c.padded_vocab_size * c.channels in [g.flops for g in gemms if g.caller == "matmul_forward"]
    assert "total" in out and "A100-40GB" in out and "H200" in out and "counted on the emulator" in out


# the formulas against the counter, launch by launch: (B, T), precision, -r, -w, -ge. The tiny model is L2 NH2
# C64 V1000 (Vp 1024) maxT 64
FORMULA_CASES = [(2, 16, "bf16", 1, 1, 0), (2, 16, "fp32", 1, 1, 0), (2, 64, "bf16", 0, 1, 0), (2, 64, "fp32", 2, 1, 0),
                 (3, 32, "bf16", 2, 1, 0), (3, 32, "fp32", 0, 1, 0), (3, 32, "bf16", 1, 0, 0),
                 (2, 16, "bf16", 1, 1, 2), (2, 16, "fp32", 0, 1, 1), (3, 32, "bf16", 0, 1, 1), (2, 64, "fp32", 2, 1, 2)]


@pytest.mark.parametrize("B, T, precision, recompute, master, gelu_fusion", FORMULA_CASES)
def test_perf_model_formulas_are_the_counted_step(B, T, precision, recompute, master, gelu_fusion, capsys):
    trainer = emulated_cuda_trainer("train_gpt2_cuda_perf_model")
    result = perf_model.main(["--tiny", "1", "-b", str(B), "-t", str(T), "-p", precision, "-r", str(recompute),
                              "-w", str(master), "-ge", str(gelu_fusion), "--check", "1"], trainer=trainer)
    formulas = [f for f in result["formulas"] if f.counted]       # CuPy's fills and copies are not counted
    counted = result["counted"]
    kernels = [f for f in formulas if not f.kernel.startswith("gemm")]
    products = [f for f in formulas if f.kernel.startswith("gemm")]
    # the same launches in the same order (so per layer too): kernels, then GEMMs (the counter's two lists)
    assert [t.kernel for t in result["launches"]] == [f.kernel for f in kernels]
    assert [f"gemm ({g.caller})" for g in result["gemms"]] == [f.kernel for f in products]
    assert all(c.where == f.where for c, f in zip(counted, kernels + products))      # counted took the places
    # every launch's bytes exactly, GEMM FLOPs exactly
    for c, f in zip(counted, kernels + products):
        assert (c.kernel, c.bytes_read, c.bytes_written, c.flops) == (f.kernel, f.bytes_read, f.bytes_written, f.flops)
        assert f.dram_read <= f.bytes_read                          # the estimate only removes rereads
    # the launches per layer: what -r adds to the backward (GELU; and the two LayerNorms), what -ge takes away
    # (the forward's GELU and every bias copy (bf16) or bias kernel (fp32): the BIAS epilogue; -ge 2 the backward's GELU)
    layer0 = [f.kernel for f in formulas if f.where == "layer 0"]
    assert layer0.count("gelu_forward_packed_kernel") == (gelu_fusion == 0) + (recompute >= 1)
    assert layer0.count("gelu_backward_packed_kernel") == (gelu_fusion < 2)
    assert layer0.count("add_bias_packed_kernel") == (4 if precision == "fp32" and gelu_fusion == 0 else 0)
    assert sum(k.startswith("layernorm_forward") for k in layer0) == 1 + 2 * (recompute >= 2)   # ln1, recomputed
    assert sum(k.startswith("fused_residual_layernorm_forward") for k in layer0) == 2
    out = capsys.readouterr().out
    assert "counted vs formulas" in out and "+0.00%" in out and "DRAM estimate" in out


def test_perf_model_formulas_at_d12(capsys):
    # d12 B=16 T=1024 bf16, which the emulator cannot run: the formulas' launches and the GEMMs' FLOPs (the
    # materialized attention, -fa 0: its batched GEMMs; flash is test_perf_model_flash_at_d12's)
    trainer = emulated_cuda_trainer("train_gpt2_cuda_perf_model")
    result = perf_model.main(["-e", "d12", "-b", "16", "-t", "1024", "-p", "bf16", "-fa", "0"], trainer=trainer)
    formulas, total = result["formulas"], result["total"]
    assert result["counted"] is None
    L, C, Vp, N, T = 12, 768, 50304, 16 * 1024, 1024
    # the linear layers: 3 GEMMs of 2 * N * weight elements each (forward, dinp, dweight): 6 * N * the 4 weights
    # per layer and the classifier's wte; attention: 6 batched GEMMs per layer (2 forward, 4 backward) of
    # 2 * T * T * hs * B * NH = 2 * N * T * C FLOPs each
    linear = L * (3 * C * C + C * C + 4 * C * C + 4 * C * C) + Vp * C
    assert total.flops == 6 * N * linear + 6 * L * 2 * N * T * C
    assert sum(f.kernel == "adamw_multi_tensor_kernel" for f in formulas) == 1
    assert not any(f.kernel == "adamw_kernel" for f in formulas)
    assert sum(f.kernel == "softmax_forward_kernel" for f in formulas) == L
    out = capsys.readouterr().out
    assert "from the formulas" in out and "ms/step" in out and "MFU" in out


def test_perf_model_gelu_fusion_at_d12(capsys):
    # -ge 2 against -ge 0 at d12 B=16 T=1024 bf16 (-r 1, the default): per layer the forward's GELU, the four
    # bias copies (the BIAS and GELU_AUX_BIAS epilogues) and the backward's GELU go (6 L launches fewer; -ge 1 5 L),
    # and with them their reads and writes; the GEMMs' FLOPs stay. The numbers are printed for the README
    trainer = emulated_cuda_trainer("train_gpt2_cuda_perf_model")
    totals = {}
    for ge in (0, 1, 2):
        totals[ge] = perf_model.main(["-e", "d12", "-b", "16", "-t", "1024", "-p", "bf16", "-ge", str(ge)],
                                     trainer=trainer)["total"]
    capsys.readouterr()
    L = 12
    assert totals[0].launches - totals[2].launches == 6 * L and totals[0].launches - totals[1].launches == 5 * L
    moved = {ge: t.bytes_read + t.bytes_written for ge, t in totals.items()}
    assert moved[2] < moved[1] < moved[0]
    assert totals[2].flops == totals[0].flops
    assert all(totals[2].seconds[i] < totals[0].seconds[i] for i in range(len(perf_model.GPUS)))
    h100 = [label for label, _, _ in perf_model.GPUS].index("H100-SXM")
    with capsys.disabled():
        for ge, t in totals.items():
            print(f"\nd12 B=16 T=1024 bf16 -r 1 -ge {ge}: {t.launches} launches, {moved[ge] / 1e9:.2f} GB counted, "
                  f"H100 {t.seconds[h100] * 1e3:.1f} ms/step")


# flash attention (-fa 1, where it runs: bf16, head size 64): its three kernels' bytes against the counter, on
# --tiny 2 (L2 NH2 C128, hs 64) at a T that leaves tails in every tile (40: forward tiles of 64 query rows,
# backward tiles of 32, key tiles of 32), launch by launch and exactly, as the other kernels' formulas
def test_perf_model_flash_formulas_are_the_counted_step(capsys):
    trainer = emulated_cuda_trainer("train_gpt2_cuda_perf_model")
    result = perf_model.main(["--tiny", "2", "-b", "1", "-t", "40", "-p", "bf16", "-fa", "1", "--check", "1"],
                             trainer=trainer)
    formulas = [f for f in result["formulas"] if f.counted]
    counted = result["counted"]
    kernels = [f for f in formulas if not f.kernel.startswith("gemm")]
    products = [f for f in formulas if f.kernel.startswith("gemm")]
    assert [t.kernel for t in result["launches"]] == [f.kernel for f in kernels]
    assert [f"gemm ({g.caller})" for g in result["gemms"]] == [f.kernel for f in products]
    for c, f in zip(counted, kernels + products):
        assert (c.kernel, c.bytes_read, c.bytes_written) == (f.kernel, f.bytes_read, f.bytes_written)
    layer0 = [f.kernel for f in formulas if f.where == "layer 0"]
    assert [k for k in layer0 if "attention" in k or "softmax" in k or "permute" in k] == [
        "flash_attention_forward_kernel", "flash_attention_backward_dq_kernel", "flash_attention_backward_dkdv_kernel"]
    assert not [g for g in result["gemms"] if g.caller.startswith("attention")]     # no batched attention GEMMs
    assert "flash (-fa 1" in capsys.readouterr().out


def test_perf_model_flash_at_d12(capsys):
    """d12 B=16 T=1024 bf16 with -fa 1 (the default there) against -fa 0: 3 flash launches per layer in place of
    the materialized path's 6 kernels and 6 batched GEMMs; the tensor-core FLOPs of the causal half (forward
    2*2*B*NH*T*T*hs/2, the diagonal tiles computed whole: +6%; the backward 3.5x that, its two kernels each
    recomputing S); far fewer bytes; and the step's time target with -ge 2: <= 40 ms on an H100 (printed)."""
    trainer = emulated_cuda_trainer("train_gpt2_cuda_perf_model")
    runs = {}
    for fa, ge in ((0, 0), (1, 0), (1, 2)):
        runs[fa, ge] = perf_model.main(["-e", "d12", "-b", "16", "-t", "1024", "-p", "bf16", "-fa", str(fa),
                                        "-ge", str(ge)], trainer=trainer)
    out = capsys.readouterr().out
    assert "attention: flash (-fa 1, kernels/flash_attention.cu)" in out
    L, B, NH, T, hs = 12, 16, 12, 1024, 64
    flash = [f for f in runs[1, 0]["formulas"] if f.kernel.startswith("flash_attention")]
    assert len(flash) == 3 * L
    half = 2 * 2 * B * NH * T * T * hs / 2                      # the forward's two products on the causal half
    forward = sum(f.flops for f in flash if "forward" in f.kernel) / L
    backward = sum(f.flops for f in flash if "backward" in f.kernel) / L
    assert 1.0 < forward / half < 1.1 and backward / forward == pytest.approx(3.5, rel=0.03)
    materialized, fa1, fa1ge2 = runs[0, 0]["total"], runs[1, 0]["total"], runs[1, 2]["total"]
    assert materialized.launches - fa1.launches == L * (6 + 6 - 3)       # 6 kernels, 6 GEMMs -> 3
    # counted, every K/V tile a query tile rereads is new traffic (the counter has no cache): 28% less at d12;
    # the DRAM estimate (each input read once a launch, the rereads from L2) nearly halves
    assert fa1.bytes_read + fa1.bytes_written < 0.8 * (materialized.bytes_read + materialized.bytes_written)
    assert fa1.dram_read < 0.6 * materialized.dram_read
    h100 = [label for label, _, _ in perf_model.GPUS].index("H100-SXM")
    assert fa1ge2.seconds[h100] < fa1.seconds[h100] < materialized.seconds[h100]
    assert fa1ge2.seconds[h100] <= 0.040, fa1ge2.seconds[h100]                   # the time target (modeled)
    with capsys.disabled():
        for (fa, ge), r in runs.items():
            t = r["total"]
            gemms = sum(f.kernel.startswith("gemm") for f in r["formulas"])
            print(f"\nd12 B=16 T=1024 bf16 -r 1 -fa {fa} -ge {ge}: {t.launches} launches ({gemms} GEMMs), "
                  f"{(t.bytes_read + t.bytes_written) / 1e9:.2f} GB counted, H100 {t.seconds[h100] * 1e3:.1f} ms/step, "
                  f"H200 {t.seconds[-1] * 1e3:.1f}")


def test_perf_model_call_counts_at_d12(capsys):
    """The launch count we bound: the d12 B=16 T=1024 bf16 step (flash, -r 1) by kind, as perf_model prints it. -ge 2
    takes the GELU launches and every bias copy (the epilogues); the bias gradients are one launch each, and
    attproj's and fcproj's come with the LayerNorm backward after them (24 = 2 per layer), itself one launch (25);
    AdamW is one launch for the 16 tensors after one copy of their seeds (a CuPy call): 280, within 282 (60% of 471)."""
    trainer = emulated_cuda_trainer("train_gpt2_cuda_perf_model")
    lines = {}
    for ge in (0, 2):
        result = perf_model.main(["-e", "d12", "-b", "16", "-t", "1024", "-p", "bf16", "-ge", str(ge)], trainer=trainer)
        lines[ge] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("calls per step")]
        assert len(lines[ge]) == 1 and result["total"].launches == len(result["formulas"])
    assert lines[2][0] == ("calls per step: 280 (147 GEMMs, 5 CuPy, 36 attention, 25 LayerNorm forward, 25 LayerNorm "
                           "backward, 24 bias, 12 GELU, 2 AdamW and norm, 4 embedding and classifier); the bound "
                           "at d12 B=16 T=1024 bf16: 282")
    assert int(lines[2][0].split()[3]) <= 282
    assert lines[0][0].startswith("calls per step: 352 (147 GEMMs, 53 CuPy, 36 attention, 25 LayerNorm forward, "
                                  "25 LayerNorm backward, 24 bias, 36 GELU,")
