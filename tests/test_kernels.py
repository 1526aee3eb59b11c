"""The CUDA kernels of kernels/*.cu, checked without a GPU.

1. Every .cu compiles with nvcc for sm_80 and sm_90 (PTX only, C++17, all warnings are errors), twice:
   alone, as `nvcc -I kernels --ptx kernels/<file>.cu`, and as the one text NVRTC gets
   (llmc.cuda_common.kernel_source: common.cuh pasted in for the #include); and its header names each
   kernel with its exact parameters.
2. Every kernel runs on the CPU emulator (emulator/) against train_gpt2.py's NumPy layer
   evaluated in float64, on odd shapes (N=1000, C=48, T=13, V=101, Vp=128) and odd launch shapes.
3. The emulator itself: barriers after early returns, shuffles, shared memory, atomics, multi-dim
   launches, and the errors it must raise (wrong scalar dtypes, deadlocks, shuffles from exited lanes).

The checks of 2 and 3 run in three thread orders on the emulator (first to last, "reverse", and
"warps": each warp runs ahead to the next barrier), which exposes races between the threads of a block,
and on guarded copies of the arrays, which turns out-of-bounds writes into errors.
Where CuPy sees a GPU, the checks of 2 and the semantics checks of 3 also run on it (backend "cupy",
through DeviceModule, which copies the NumPy arrays in and out). LLMC_TEST_BACKENDS=emulator,adapter
runs that harness over the emulator, to check the harness itself without a GPU. The harness (DeviceModule,
Emulated, rand, close) lives in dev/check_kernel.py, the command-line check of one kernel file, which
tests/test_check_kernel.py runs.
"""

import concurrent.futures
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import emulator
import train_gpt2 as tg
from llmc.cuda_common import KERNEL_DIR, ceil_div, kernel_source  # <file>.cu with common.cuh pasted in

# the harness is shared with dev/check_kernel.py, the command-line check of one kernel file
from check_kernel import (DeviceModule, Emulated, close, gpu_available, launch_trainer, rand,
                          recorded_launches, run_launches, with_arrays)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KERNEL_FILES = sorted(glob.glob(os.path.join(KERNEL_DIR, "*.cu")))
KERNEL_NAMES = [os.path.basename(p)[:-3] for p in KERNEL_FILES]
i32, f32, i64, u32 = np.int32, np.float32, np.int64, np.uint32


def _sources():
    return {name: kernel_source(name) for name in KERNEL_NAMES}


# backends for the kernel checks: the emulator in its three thread orders always (guarded arrays), CuPy when a GPU is there,
# and "adapter" (the CuPy harness driving the emulator) on request: LLMC_TEST_BACKENDS=emulator,adapter
BACKENDS = os.environ.get("LLMC_TEST_BACKENDS",
                          "emulator,reverse,warps" + (",cupy" if gpu_available() else "")).split(",")


def _build_all(make):
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(KERNEL_NAMES, pool.map(make, _sources().values())))


@pytest.fixture(scope="module")
def emu_mods():
    """All kernel modules on the emulator, compiled in parallel (g++ runs outside the GIL; cached on disk)."""
    return _build_all(lambda code: emulator.RawModule(code=code, options=("--std=c++17",)))


@pytest.fixture(scope="module", params=BACKENDS)
def mods(request, emu_mods):
    if request.param in ("emulator", "reverse", "warps"):
        order = "forward" if request.param == "emulator" else request.param
        return {name: Emulated(mod, order) for name, mod in emu_mods.items()}
    if request.param == "adapter":
        host = type("xp", (), {"asarray": staticmethod(np.array), "asnumpy": staticmethod(np.asarray)})
        return _build_all(lambda code: DeviceModule(host, emulator.RawModule, code))
    import cupy
    return _build_all(lambda code: DeviceModule(cupy, cupy.RawModule, code))


def fn(mods, module, name):
    return mods[module].get_function(name)


def launched(mods, module, call, packed=None, kernels=None):
    """call(cu) on train_gpt2_cuda.py's launchers, their launches (the trainer's grid, block, shared memory and
    arguments, recorded by dev/check_kernel.py) run on mods[module]: this test's backend and thread order.
    packed: recorded_launches' (None: the launcher's own choice of the packed or per-element kernel); kernels:
    the names the launches must have, in order."""
    launches = recorded_launches(call, packed=packed)
    assert kernels is None or [lc.kernel for lc in launches] == kernels, launches
    run_launches(mods[module], launches)


# ---------------------------------------------------------------------------------------------
# 1. compiles for real GPUs, and the headers say what the code does

def _nvcc(path, arch, include_dir=None, defines=()):
    cmd = ["nvcc", "--ptx", f"-arch=compute_{arch}", "-std=c++17", "-Werror", "all-warnings", *defines]
    cmd += ["-I", include_dir] if include_dir else []
    res = subprocess.run(cmd + [path, "-o", os.devnull], capture_output=True, text=True)
    return f"{path}{' ' if defines else ''}{' '.join(defines)}", arch, res.returncode, res.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed (CUDA toolkit)")
def test_every_kernel_compiles_with_nvcc_for_sm80_and_sm90(tmp_path):
    """Each file on its own (`nvcc -I kernels --ptx kernels/<file>.cu`), in fp32 and with -DENABLE_BF16
    (floatX = __nv_bfloat16), and the expanded text NVRTC gets."""
    jobs = [(p, arch, KERNEL_DIR, defines) for p in KERNEL_FILES for arch in (80, 90)
            for defines in ((), ("-DENABLE_BF16",))]
    for name, code in _sources().items():             # <name>.cu with common.cuh pasted in: the text NVRTC gets
        path = str(tmp_path / (name + ".cu"))
        with open(path, "w") as f:
            f.write(code)
        jobs += [(path, arch, None, ()) for arch in (80, 90)]   # no -I: nothing left to include
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda j: _nvcc(*j), jobs))
    failures = [f"{p} sm_{a}:\n{err}" for p, a, rc, err in results if rc != 0]
    assert not failures, "\n".join(failures)
    assert len(results) == 6 * len(KERNEL_FILES) >= 48


def _split_bf16_blocks(code):
    """(code outside, code inside) the `#ifdef ENABLE_BF16` blocks, each block up to its #else or #endif."""
    blocks = re.findall(r"#\s*ifdef\s+ENABLE_BF16\b(.*?)#\s*(?:else|endif)", code, re.S)
    return re.sub(r"(#\s*ifdef\s+ENABLE_BF16\b).*?(#\s*(?:else|endif))", r"\1\n\2", code, flags=re.S), "".join(blocks)


# CUDA headers a bf16-only file includes inside its `#ifdef ENABLE_BF16` (NVRTC has them; fp32 builds never see them):
# flash_attention.cu's tensor-core fragments (nvcuda::wmma) have no fp32 16x16x16 form
BF16_ONLY_INCLUDES = {"flash_attention": ["#include <mma.h>"]}


@pytest.mark.parametrize("name", KERNEL_NAMES + ["common.cuh"])
def test_kernel_source_is_nvrtc_clean_and_header_matches(name):
    """NVRTC has no host headers: the one #include is `#include "common.cuh"` (every .cu has it; the
    loader pastes the file in, so the text NVRTC gets has none), and no FLT_MAX, INFINITY, std:: or
    assert. The one exception is common.cuh's `#include <cuda_bf16.h>` inside `#ifdef ENABLE_BF16`
    (a CUDA header NVRTC has; the fp32 build never sees it). Each extern "C" kernel's parameter list
    appears verbatim (modulo whitespace) in the file's opening comment."""
    with open(os.path.join(KERNEL_DIR, name if name.endswith(".cuh") else name + ".cu")) as f:
        src = f.read()
    code = re.sub(r"//.*", "", src)                   # comments may name what the code must not use
    outside, inside = _split_bf16_blocks(code)
    includes = re.findall(r"#\s*include.*", outside)
    bf16_includes = re.findall(r"#\s*include.*", inside)
    if name == "common.cuh":
        assert includes == [], "common.cuh includes nothing outside #ifdef ENABLE_BF16"
        assert bf16_includes == ["#include <cuda_bf16.h>"], \
            f"common.cuh: the bf16 build includes {bf16_includes}, expected <cuda_bf16.h> once"
        assert "__global__" not in code, "common.cuh holds __device__ helpers only"
        assert re.search(r"#ifndef (\w+)\s+#define \1\b", code) and code.rstrip().endswith("#endif"), \
            "common.cuh needs an include guard"
        return
    assert includes == ['#include "common.cuh"'], f"{name}.cu: includes {includes}, expected common.cuh once"
    own = BF16_ONLY_INCLUDES.get(name, [])
    assert bf16_includes == own, f"{name}.cu: includes {bf16_includes} for bf16, expected {own}; common.cuh has cuda_bf16.h"
    expanded, expanded_bf16 = _split_bf16_blocks(re.sub(r"//.*", "", kernel_source(name)))
    assert "#include" not in expanded and "warp_sum" in expanded
    assert re.findall(r"#\s*include.*", expanded_bf16) == ["#include <cuda_bf16.h>"] + own
    for banned in ("FLT_MAX", "INFINITY", "std::", "assert("):
        assert banned not in code, f"{name} uses {banned}, which NVRTC does not provide"
    header = " ".join(line.lstrip()[2:] for line in opening_comment(src))
    kernels = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)', code)
    assert kernels, f"{name}.cu defines no extern \"C\" __global__ kernel"
    assert len(kernels) == len(re.findall(r"__global__", code)), "every kernel must be extern \"C\""
    for kname, params in kernels:
        m = re.search(re.escape(kname) + r"\(([^)]*)\)", header)
        assert m, f"{name}.cu: header does not document {kname}(...)"
        norm = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
        assert norm(m.group(1)) == norm(params), f"{name}.cu: header says {kname}({norm(m.group(1))})"


def opening_comment(src):
    """The comment lines a file opens with (blank lines among them skipped), up to its first line of code:
    a kernel file's spec, however long it grows."""
    lines = []
    for line in src.splitlines():
        if line.strip() and not line.lstrip().startswith("//"):
            break
        if line.strip():
            lines.append(line)
    return lines


def test_kernel_source_keeps_line_numbers(tmp_path):
    """The #line directives around the pasted header: an error in a kernel file is reported at its line
    in that file, an error in common.cuh at its line there (checked with g++ through the emulator)."""
    for f in ("common.cuh", "gelu.cu"):
        shutil.copy(os.path.join(KERNEL_DIR, f), tmp_path / f)
    gelu = (tmp_path / "gelu.cu").read_text().split("\n")
    line = next(i for i, text in enumerate(gelu) if "gelu_forward_kernel(" in text and "__global__" in text) + 2
    gelu.insert(line, "    undefined_in_gelu = 1;")
    (tmp_path / "gelu.cu").write_text("\n".join(gelu))
    with pytest.raises(emulator.CompileError, match=rf"gelu\.cu:{line + 1}:.*undefined_in_gelu"):
        emulator.RawModule(code=kernel_source("gelu", str(tmp_path)), options=("--std=c++17",))
    common = (tmp_path / "common.cuh").read_text().split("\n")
    at = next(i for i, text in enumerate(common) if text.startswith("__device__ float warp_sum")) + 1
    common.insert(at, "    undefined_in_common = 1;")
    (tmp_path / "common.cuh").write_text("\n".join(common))
    with pytest.raises(emulator.CompileError, match=rf"common\.cuh:{at + 1}:.*undefined_in_common"):
        emulator.RawModule(code=kernel_source("gelu", str(tmp_path)), options=("--std=c++17",))


# ---------------------------------------------------------------------------------------------
# 2. each kernel against the NumPy layer (float64)

B, T, C, NH = 3, 13, 48, 3
V, Vp = 101, 128


def test_encoder_forward_backward(mods):
    rng = np.random.default_rng(0)
    wte, wpe = rand(rng, Vp, C), rand(rng, T + 3, C)
    inp = rng.integers(0, 7, size=(B, T)).astype(np.int32)      # few ids: many repeats for the scatter
    inp.flat[1::3] = 5                                          # and one heavy bucket
    out = np.full((B, T, C), np.nan, np.float32)
    launched(mods, "encoder", lambda cu: cu.encoder_forward(out, inp, wte, wpe, B, T, C), packed=False,
             kernels=["encoder_forward_kernel"])
    want = np.zeros((B, T, C))
    tg.encoder_forward(want, inp, wte.astype(np.float64), wpe.astype(np.float64), B, T, C)
    close(out, want, atol=1e-6)

    dout = rand(rng, B, T, C)
    dwte, dwpe = rand(rng, Vp, C), rand(rng, T + 3, C)           # nonzero: backward must accumulate
    want_dwte, want_dwpe = dwte.astype(np.float64), dwpe.astype(np.float64)
    f32_dwte = dwte.copy()                                       # np.add.at in float32: the same additions
    dwte_chunks = dwte.copy()
    positions, starts, tokens, n = launch_trainer().encoder_buckets(inp)
    assert n <= 7 and np.all(np.diff(positions[starts[0]:starts[1]]) > 0)
    launched(mods, "encoder", lambda cu: cu.encoder_backward(dwte, dwpe, dout, inp, B, T, C), packed=False,
             kernels=["encoder_backward_wte_kernel", "encoder_backward_wpe_kernel"])
    tg.encoder_backward(want_dwte, want_dwpe, dout.astype(np.float64), inp, B, T, C)
    close(dwte, want_dwte, atol=1e-5)
    close(dwpe, want_dwpe, atol=1e-5)
    np.add.at(f32_dwte, inp, dout)                               # each position added in turn, in order
    assert np.array_equal(dwte, f32_dwte), "dwte must add a token's positions in increasing order"
    # not the launcher's block (256 > C: one chunk of channels): 32, so 2 chunks, the second partly empty
    block = 32
    fn(mods, "encoder", "encoder_backward_wte_kernel")((ceil_div(C, block), n), block,
                                                       (dwte_chunks, dout, starts, positions, tokens, i32(n), i32(C),
                                                        u32(7)))   # fp32: the seed is unused (plain stores)
    assert np.array_equal(dwte_chunks, f32_dwte), "the channel chunks must not change a sum"


@pytest.mark.parametrize("block", [None, 32, 1024])   # None: the launcher's (256); the others probe the row math
def test_layernorm_forward(mods, block):
    rng = np.random.default_rng(1)
    row_scale = np.logspace(-2, 1, B * T).reshape(B, T, 1)  # variances near eps too: eps must be 1e-5
    inp = ((rand(rng, B, T, C) + 2.0) * row_scale).astype(np.float32)
    weight, bias = rand(rng, C), rand(rng, C)
    out = np.full((B, T, C), np.nan, np.float32)
    mean, rstd = np.zeros((B, T), np.float32), np.zeros((B, T), np.float32)
    [lc] = recorded_launches(lambda cu: cu.layernorm_forward(out, mean, rstd, inp, weight, bias, B, T, C), packed=False)
    if block is not None:                             # a warp per row at any block size: the grid as the launcher's
        lc.grid, lc.block = ceil_div(lc.grid * lc.block, block), block
    run_launches(mods["layernorm"], [lc])
    w_out, w_mean, w_rstd = np.zeros((B, T, C)), np.zeros((B, T)), np.zeros((B, T))
    tg.layernorm_forward(w_out, w_mean, w_rstd, inp.astype(np.float64), weight.astype(np.float64),
                         bias.astype(np.float64), B, T, C)
    close(out, w_out, atol=1e-5, rtol=1e-5)
    close(mean, w_mean, atol=1e-6, rtol=1e-6)
    close(rstd, w_rstd, atol=0, rtol=1e-5)
    # mean and rstd may be NULL (inference): None, or np.uint64(0) as CuPy needs it
    out2 = np.full_like(out, np.nan)
    fn(mods, "layernorm", "layernorm_forward_kernel")(lc.grid, lc.block, (out2, None, np.uint64(0)) + lc.args[3:])
    assert np.array_equal(out2, out)


def test_layernorm_backward(mods):
    rng = np.random.default_rng(2)
    inp, dout = rand(rng, B, T, C, scale=2.0), rand(rng, B, T, C)
    weight = rand(rng, C)
    mean = inp.astype(np.float64).mean(-1)
    rstd = 1 / np.sqrt(inp.astype(np.float64).var(-1) + 1e-5)
    dinp, dweight, dbias = rand(rng, B, T, C), rand(rng, C), rand(rng, C)   # accumulate into these
    want = [x.astype(np.float64) for x in (dinp, dweight, dbias)]
    tg.layernorm_backward(*want, dout.astype(np.float64), inp.astype(np.float64), weight.astype(np.float64),
                          mean, rstd, B, T, C)
    mean32, rstd32 = mean.astype(np.float32), rstd.astype(np.float32)
    dweight2, dbias2 = dweight.copy(), dbias.copy()
    # the launcher's rows kernel (16 rows per block: 3 blocks, the last one partial); its sum, one thread per
    # channel, on blocks of 32 instead of 256, so that there are 2 of them, the second partial
    scratch = np.full((ceil_div(32 * B * T, 512), 2, C), np.nan, np.float32)
    rows, total = recorded_launches(lambda cu: cu.layernorm_backward(dinp, dweight, dbias, scratch, dout, inp, weight,
                                                                     mean32, rstd32, B, T, C), packed=False)
    grid = rows.grid
    assert scratch.shape[0] == grid and total.kernel == "layernorm_backward_sum_kernel"
    total.grid, total.block = ceil_div(C, 32), 32
    run_launches(mods["layernorm"], [rows, total])
    close(dinp, want[0], atol=2e-5, rtol=1e-5)
    close(dweight, want[1], atol=2e-5, rtol=1e-5)
    close(dbias, want[2], atol=2e-5, rtol=1e-5)
    # the GPU-filling sum (one block per 4 columns, threads over the partials; tests/test_layernorm_sum.py
    # holds it bit for bit to a NumPy model of its order): 32 threads, not the launcher's 128, so one warp's
    # butterfly; its grid, one block per 4 columns of the 2 rows, the launcher's
    split = recorded_launches(lambda cu: cu.layernorm_backward(dinp.copy(), dweight2, dbias2, scratch, dout, inp,
                                                               weight, mean32, rstd32, B, T, C),
                              packed=lambda n, *arrays: arrays[0] is scratch)[1]
    split.block = 32
    run_launches(mods["layernorm"], [split])
    close(dweight2, want[1], atol=2e-5, rtol=1e-5)
    close(dbias2, want[2], atol=2e-5, rtol=1e-5)


def test_matmul_bias_forward_and_backward(mods):
    rng = np.random.default_rng(3)
    N, OC = B * T, 100                                # OC not a multiple of 32
    out, bias = rand(rng, N, OC), rand(rng, OC)
    want = out.astype(np.float64) + bias
    launched(mods, "matmul", lambda cu: cu.add_bias(out, bias, N, OC), packed=False)
    close(out, want, atol=1e-6)

    # the full linear layer: host GEMMs (as cuBLAS would do them) + these kernels == matmul_forward/backward
    inp, weight = rand(rng, B, T, C), rand(rng, OC, C)
    out = (inp.reshape(N, C) @ weight.T).astype(np.float32)
    launched(mods, "matmul", lambda cu: cu.add_bias(out, bias, N, OC), packed=False)
    w_out = np.zeros((B, T, OC))
    tg.matmul_forward(w_out, inp.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64),
                      B, T, C, OC)
    close(out.reshape(B, T, OC), w_out, atol=1e-4, rtol=1e-5)

    dout = rand(rng, B, T, OC)
    w_dinp, w_dweight, w_dbias = np.zeros((B, T, C)), np.zeros((OC, C)), rand(rng, OC).astype(np.float64)
    for block in (None, 32, 128):                     # None: as matmul_backward launches it; any multiple of 32 works
        dbias = w_dbias.astype(np.float32)
        [lc] = recorded_launches(lambda cu: cu.matmul_backward_bias(dbias, None, dout, N, OC))
        if block is not None:                         # a float of shared memory per thread
            lc.block, lc.shared_mem = block, block * lc.shared_mem // lc.block
        run_launches(mods["matmul"], [lc])
        want = w_dbias + dout.astype(np.float64).reshape(N, OC).sum(0)
        close(dbias, want, atol=1e-5, rtol=1e-6)
    tg.matmul_backward(w_dinp, w_dweight, w_dbias, dout.astype(np.float64), inp.astype(np.float64),
                       weight.astype(np.float64), B, T, C, OC)
    close(dbias, w_dbias, atol=1e-5, rtol=1e-6)       # the same as the NumPy layer's dbias

    # the GPU-filling pair (OC a multiple of the pack): column sums per block row of R rows into a scratch, then
    # the block rows added into dbias; any R and block (tests/test_matmul_bias.py checks the bits of the order), so
    # not the launcher's (matmul_bias_grid's R, 256), and the pair the trainer runs as one kernel (x128)
    OCp = 104
    dout, w_dbias = rand(rng, N, OCp), rand(rng, OCp).astype(np.float64)
    want = w_dbias + dout.astype(np.float64).sum(0)
    for R, block in ((32, 256), (7, 64)):
        dbias, row_blocks = w_dbias.astype(np.float32), ceil_div(N, R)
        scratch = np.full((row_blocks, OCp), np.nan, np.float32)
        fn(mods, "matmul", "matmul_backward_bias_partial_kernel")(        # fp32: 4 floats per 128-bit load
            (ceil_div(OCp, 32 * 4), row_blocks), block, (scratch, dout, i32(N), i32(OCp), i32(R)),
            shared_mem=block * 4 * 4)
        fn(mods, "matmul", "matmul_backward_bias_sum_kernel")(
            ceil_div(OCp, 32), 1024, (dbias, scratch, i32(row_blocks), i32(OCp)), shared_mem=1024 * 4)
        close(dbias, want, atol=1e-5, rtol=1e-6)


def _attention_forward_cuda(mods, inp, B, T, NH):
    """llm.c's attention_forward: permute, GEMM, softmax kernel, GEMM, unpermute (GEMMs on the host)."""
    C = inp.shape[-1] // 3
    hs = C // NH
    q, k, v = (np.full((B, NH, T, hs), np.nan, np.float32) for _ in range(3))
    preatt = np.full((B, NH, T, T), np.nan, np.float32)
    att, out = np.full_like(preatt, np.nan), np.full((B, T, C), np.nan, np.float32)
    vaccum = np.full((B, NH, T, hs), np.nan, np.float32)
    # attention_forward's three launches (its GEMMs are not kernels: they run here, between them, on the host)
    big = np.zeros(3 * B * T * C + B * NH * T * T, np.float32)
    launches = recorded_launches(lambda cu: cu.attention_forward(out, big, att, big.copy(), B, T, C, NH))
    assert [lc.kernel for lc in launches] == ["permute_kernel", "softmax_forward_kernel", "unpermute_kernel"]
    permute, softmax, unpermute = launches
    run_launches(mods["attention"], [with_arrays(permute, q, k, v, inp)])
    preatt[...] = q @ k.transpose(0, 1, 3, 2)                             # (B,NH,T,T), unscaled
    run_launches(mods["attention"], [with_arrays(softmax, att, preatt)])
    vaccum[...] = att @ v                                                 # (B,NH,T,hs)
    run_launches(mods["attention"], [with_arrays(unpermute, out, vaccum)])
    return out, preatt, att, (q, k, v)


def test_attention_forward_backward(mods):
    rng = np.random.default_rng(4)
    hs = C // NH
    inp = rand(rng, B, T, 3 * C)
    out, preatt, att, (q, k, v) = _attention_forward_cuda(mods, inp, B, T, NH)

    w_out, w_preatt, w_att = np.zeros((B, T, C)), np.zeros((B, NH, T, T)), np.zeros((B, NH, T, T))
    tg.attention_forward(w_out, w_preatt, w_att, inp.astype(np.float64), B, T, C, NH)
    close(out, w_out, atol=1e-5, rtol=1e-5)
    close(att, w_att, atol=1e-6, rtol=1e-5)           # includes the exact zeros above the diagonal
    causal = np.tril(np.ones((T, T), bool))
    scale = 1.0 / math.sqrt(hs)
    close((preatt * scale)[:, :, causal], w_preatt[:, :, causal], atol=1e-5, rtol=1e-5)

    # backward, llm.c's order: unpermute_backward, GEMMs, softmax backward, GEMMs, permute_backward
    dout = rand(rng, B, T, C)
    dvaccum = np.full((B, NH, T, hs), np.nan, np.float32)
    dinp = np.full((B, T, 3 * C), np.nan, np.float32)
    big = np.zeros(3 * B * T * C + B * NH * T * T, np.float32)
    launches = recorded_launches(lambda cu: cu.attention_backward(dinp, big, big.copy(), big.copy(), big.copy(), dout,
                                                                  big.copy(), att, B, T, C, NH))
    assert [lc.kernel for lc in launches] == ["unpermute_backward_kernel", "softmax_autoregressive_backward_kernel",
                                              "permute_backward_kernel"]
    unpermute_back, softmax_back, permute_back = launches
    run_launches(mods["attention"], [with_arrays(unpermute_back, dvaccum, dout)])
    datt = (dvaccum @ v.transpose(0, 1, 3, 2)).astype(np.float32)
    dv = (att.transpose(0, 1, 3, 2) @ dvaccum).astype(np.float32)
    dpreatt = np.full_like(datt, np.nan)
    run_launches(mods["attention"], [with_arrays(softmax_back, dpreatt, datt, att)])
    dq = (dpreatt @ k).astype(np.float32)
    dk = (dpreatt.transpose(0, 1, 3, 2) @ q).astype(np.float32)
    run_launches(mods["attention"], [with_arrays(permute_back, dinp, dq, dk, dv)])

    w_dinp, w_dpreatt, w_datt = np.zeros((B, T, 3 * C)), np.zeros((B, NH, T, T)), np.zeros((B, NH, T, T))
    tg.attention_backward(w_dinp, w_dpreatt, w_datt, dout.astype(np.float64), inp.astype(np.float64),
                          w_att, B, T, C, NH)
    close(datt[:, :, causal], w_datt[:, :, causal], atol=1e-5, rtol=1e-5)
    close(dpreatt, scale * w_dpreatt, atol=1e-6, rtol=1e-5)              # kernel's is w.r.t. unscaled q.k
    close(dinp, w_dinp, atol=1e-5, rtol=1e-5)


def test_softmax_long_rows_and_large_logits(mods):
    """T > 32 so each lane visits several columns; logits of size 80 exercise the online rescaling."""
    rng = np.random.default_rng(5)
    b, nh, t = 1, 2, 70
    preatt = rand(rng, b, nh, t, t, scale=80.0)
    att = np.full_like(preatt, np.nan)
    scale = f32(0.25)
    # blocks of 64 (the launcher's 256 would make one block): a warp per row, as the launcher's
    fn(mods, "attention", "softmax_forward_kernel")(ceil_div(b * nh * t * 32, 64), 64,
                                                    (att, preatt, scale, i32(b), i32(nh), i32(t)))
    x = preatt.astype(np.float64) * 0.25
    x[..., ~np.tril(np.ones((t, t), bool))] = -np.inf
    want = np.exp(x - x.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    close(att, want, atol=1e-6, rtol=1e-5)


def test_permute_roundtrip_is_exact(mods):
    rng = np.random.default_rng(6)
    hs = C // NH
    inp = rand(rng, B, T, 3 * C)
    q, k, v = (np.zeros((B, NH, T, hs), np.float32) for _ in range(3))
    n = B * NH * T * hs                               # blocks of 100 threads, not the launchers' 256: a partial warp
    fn(mods, "attention", "permute_kernel")(ceil_div(n, 100), 100, (q, k, v, inp, i32(B), i32(T), i32(NH), i32(hs)))
    qkv = inp.reshape(B, T, 3, NH, hs)
    for i, x in enumerate((q, k, v)):
        assert np.array_equal(x, qkv[:, :, i].transpose(0, 2, 1, 3))
    back = np.zeros_like(inp)
    fn(mods, "attention", "permute_backward_kernel")(ceil_div(n, 100), 100,
                                                     (back, q, k, v, i32(B), i32(T), i32(NH), i32(hs)))
    assert np.array_equal(back, inp)
    out = np.zeros((B, T, C), np.float32)
    fn(mods, "attention", "unpermute_kernel")(ceil_div(n, 100), 100, (out, q, i32(B), i32(T), i32(NH), i32(hs)))
    assert np.array_equal(out, inp[:, :, :C])


def test_gelu_forward_backward(mods):
    rng = np.random.default_rng(7)
    N = 1000
    inp = rand(rng, N, scale=3.0)
    inp[:4] = [0.0, 20.0, -20.0, 60.0]                # coshf overflows at 60: the gradient must stay finite
    out = np.full(N, np.nan, np.float32)
    launched(mods, "gelu", lambda cu: cu.gelu_forward(out, inp, N), packed=False)
    want = np.zeros(N)
    tg.gelu_forward(want, inp.astype(np.float64), N)
    close(out, want, atol=1e-6, rtol=1e-6)

    dout = rand(rng, N)
    dinp = np.full(N, np.nan, np.float32)
    launched(mods, "gelu", lambda cu: cu.gelu_backward(dinp, inp, dout, N), packed=False)
    want = np.zeros(N)                                # the kernel writes; the NumPy layer adds into zeros
    tg.gelu_backward(want, inp.astype(np.float64), dout.astype(np.float64), N)
    close(dinp, want, atol=1e-6, rtol=1e-5)
    inplace = dout.copy()                             # llm.c runs it in place on its scratch buffer
    launched(mods, "gelu", lambda cu: cu.gelu_backward(inplace, inp, inplace, N), packed=False)
    assert np.array_equal(inplace, dinp)


def test_residual_forward(mods):
    rng = np.random.default_rng(8)
    N = 1000
    a, b = rand(rng, N), rand(rng, N)
    out = np.full(N, np.nan, np.float32)
    launched(mods, "residual", lambda cu: cu.residual_forward(out, a, b, N), packed=False)
    assert np.array_equal(out, a + b)
    acc = a.copy()
    launched(mods, "residual", lambda cu: cu.residual_forward(acc, acc, b, N), packed=False)
    assert np.array_equal(acc, a + b)                 # in place: a += b


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("block,use_dlosses", [(None, True), (64, False), (32, True)])
def test_fused_classifier(mods, block, use_dlosses, packed):
    """The plain kernel and its x128 twin (Vp = 128: rows start on a pack; V = 101 is not a whole number of
    packs, so the last real pack holds pad columns; tests/test_classifier_x128.py compares the two), launched
    by fused_classifier, on its block (None: 1024) or on fewer threads per row, which the kernels allow."""
    rng = np.random.default_rng(9)
    logits = rand(rng, B, T, Vp, scale=4.0)
    logits[..., V:] = 1e3                             # pad columns must be ignored by the softmax
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    targets[0, 0], targets[0, 1] = 0, V - 1           # first and last real column
    dlosses = rand(rng, B, T) if use_dlosses else None

    def classifier(logits, losses, write_dlogits):
        [lc] = recorded_launches(lambda cu: cu.fused_classifier(logits, losses, dlosses, targets, B, T, V, Vp,
                                                                write_dlogits), packed=packed)
        assert lc.kernel == ("fused_classifier_x128_kernel" if packed else "fused_classifier_kernel")
        lc.block = lc.block if block is None else block
        run_launches(mods["classifier"], [lc])

    probs = np.zeros((B, T, Vp))
    tg.softmax_forward(probs, logits.astype(np.float64), B, T, V, Vp)
    w_losses = np.zeros((B, T))
    tg.crossentropy_forward(w_losses, probs, targets, B, T, Vp)
    w_dlogits = np.zeros((B, T, Vp))
    dl = dlosses.astype(np.float64) if use_dlosses else np.full((B, T), 1.0 / (B * T))
    tg.crossentropy_softmax_backward(w_dlogits, dl, probs, targets, B, T, V, Vp)

    x = logits.copy()
    losses = np.full((B, T), np.nan, np.float32)
    classifier(x, losses, 0)
    close(losses, w_losses, atol=1e-5, rtol=1e-6)
    assert np.array_equal(x, logits)                  # forward only: the logits stay readable

    losses[:] = np.nan
    classifier(x, losses, 1)
    close(losses, w_losses, atol=1e-5, rtol=1e-6)
    close(x, w_dlogits, atol=1e-7, rtol=1e-5)
    assert np.all(x[..., V:] == 0)


def _ftz(x):
    """float32 with CuPy's -ftz=true: a result below 2^-126 in magnitude (a denormal) becomes 0."""
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)


def test_classifier_loss_of_a_target_far_below_the_max(mods):
    """A target logit 100 below its row's max: exp(-100) is a float32 denormal (~3.7e-44), which a GPU
    built with -ftz=true flushes to 0, so a loss of -log(exp(x_t - max) / sum) would be inf there.
    The emulator keeps denormals and cannot show it; a float32 twin with the flush shows both
    formulas, and the kernel's text is checked to take the loss from the log-sum-exp."""
    rng = np.random.default_rng(12)
    logits = rand(rng, B, T, Vp, scale=4.0)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    rows = logits.reshape(B * T, Vp)
    for r in (0, 5):
        rows[r, targets.flat[r]] = rows[r, :V].max() - 100.0
    x64 = logits[..., :V].astype(np.float64)
    w_losses = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1) \
        - np.take_along_axis(x64, targets[..., None].astype(np.int64), -1)[..., 0]
    assert w_losses.flat[0] > 100 and w_losses.flat[5] > 100
    for packed in (False, True):                      # fused_classifier_kernel, then its x128 twin
        losses = np.full((B, T), np.nan, np.float32)
        x = logits.copy()
        launched(mods, "classifier", lambda cu: cu.fused_classifier(x, losses, None, targets, B, T, V, Vp, 1),
                 packed=packed)
        assert np.all(np.isfinite(losses)), packed
        close(losses, w_losses, atol=1e-5, rtol=1e-6)

    # the float32 twin under flush-to-zero: the old formula's exp is flushed, the new one's terms are not
    row = rows[0, :V]
    mx, xt = row.max(), row[targets.flat[0]]
    total = _ftz(np.exp(_ftz(row - mx)).sum(dtype=np.float32))
    with np.errstate(divide="ignore"):
        old = -np.log(_ftz(_ftz(np.exp(xt - mx)) / total))            # -logf(expf(x - max) * norm)
    new = np.log(total) - (xt - mx)                                   # the kernel's log-sum-exp form
    assert old == np.inf and np.isfinite(new) and abs(new - w_losses.flat[0]) < 1e-4
    source = open(os.path.join(KERNEL_DIR, "classifier.cu")).read().replace("(float)", "")   # casts of floatX
    assert source.count("logf(sum) - (x[target] - gmax)") == 2 and "logf(prob)" not in source   # both kernels


def _adamw_reference(p, g, m, v, lr, b1, b2, eps, wd, t, grad_scale):
    """float64 AdamW as torch.optim.AdamW computes it (decoupled weight decay)."""
    g = g * grad_scale
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    p -= lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)


def test_adamw_three_steps(mods):
    """Without master weights (NULL, as the fp32 trainer runs it) and with them: in an fp32 build the
    master copy and the parameters get the same floats, bit for bit the ones of the run without."""
    rng = np.random.default_rng(10)
    n = 1000
    p = rand(rng, n)
    p2, master = p.copy(), p.copy()
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    m2, v2 = m.copy(), v.copy()
    rp, rm, rv = p.astype(np.float64), np.zeros(n), np.zeros(n)
    lr, b1, b2, eps, wd, scale = 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5
    for t in range(1, 4):
        g = rand(rng, n)
        for params, master_params, moments in ((p, None, (m, v)), (p2, master, (m2, v2))):   # one row of n
            launched(mods, "adamw", lambda cu: cu.adamw_update(params, master_params, g, *moments, n, n, 1, lr, b1, b2,
                                                               1 - b1 ** t, 1 - b2 ** t, eps, wd, scale, 1234 + t))
        _adamw_reference(rp, g.astype(np.float64), rm, rv, lr, b1, b2, eps, wd, t, scale)
        close(m, rm, atol=1e-7, rtol=1e-6)
        close(v, rv, atol=1e-8, rtol=1e-5)
        close(p, rp, atol=1e-6, rtol=1e-6)
        for name, a, b in (("params", p2, p), ("master", master, p), ("m", m2, m), ("v", v2, v)):
            assert a.tobytes() == b.tobytes(), f"{name} with master weights differs from the run without"


@pytest.mark.parametrize("grid,block", [(7, 512), (1, 32), (300, 1024)])
def test_global_norm_squared(mods, grid, block):
    """Any grid and block give the sum (each block strides over the data): not only the launcher's."""
    rng = np.random.default_rng(11)
    count = 100_003
    data = rand(rng, count)
    out = np.full(grid, np.nan, np.float32)
    fn(mods, "adamw", "global_norm_squared_kernel")(grid, block, (out, data, i64(count)))
    want = np.sum(data.astype(np.float64) ** 2)
    close(out.astype(np.float64).sum(), want, atol=0, rtol=1e-5)


@pytest.mark.no_racecheck                           # the plain emulator's speed
def test_emulator_speed_adamw_over_1_7M_params(emu_mods):
    """The tiny-model training run launches AdamW over ~1.7M floats each step: it must stay well under 1 s."""
    n = 1_700_000
    rng = np.random.default_rng(12)
    p, g = rand(rng, n), rand(rng, n)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    update = recorded_launches(lambda cu: cu.adamw_update(p, None, g, m, v, n, n, 1, 1e-3, 0.9, 0.999, 0.1, 0.001,
                                                          1e-8, 0.0, 1.0, 0))
    run_launches(emu_mods["adamw"], update)           # warm up (fiber stacks, pool threads)
    t0 = time.perf_counter()
    run_launches(emu_mods["adamw"], update)
    elapsed = time.perf_counter() - t0
    print(f"adamw over {n} floats in blocks of 512: {elapsed * 1e3:.1f} ms")
    assert elapsed < 1.0


# the backward kernels that sum many floats into one (dwte, dwpe, dweight, dbias) do so in a fixed
# order, without atomics: the same inputs give the same bits, whatever order threads and blocks run in

def deterministic_backwards(mods):
    """encoder and layernorm backward on one fixed input (B=4 T=64 C=96: 16 LayerNorm blocks, dozens of
    token buckets, one of them heavy: token 7 at half the positions); returns every output."""
    Bd, Td, Cd, Vd = 4, 64, 96, 128
    rng = np.random.default_rng(42)
    inp = rng.integers(0, 50, size=(Bd, Td)).astype(np.int32)
    inp.flat[::2] = 7
    dout = rand(rng, Bd, Td, Cd)
    out = {"dwte": rand(rng, Vd, Cd), "dwpe": rand(rng, Td, Cd)}   # nonzero: the kernels add into them
    launched(mods, "encoder", lambda cu: cu.encoder_backward(out["dwte"], out["dwpe"], dout, inp, Bd, Td, Cd),
             packed=False)
    x = rand(rng, Bd, Td, Cd, scale=2.0)
    weight = rand(rng, Cd)
    mean = x.mean(-1, dtype=np.float64).astype(np.float32)
    rstd = (1 / np.sqrt(x.var(-1, dtype=np.float64) + 1e-5)).astype(np.float32)
    out.update(dinp=rand(rng, Bd, Td, Cd), dweight=rand(rng, Cd), dbias=rand(rng, Cd))
    scratch = np.full(launch_trainer().layernorm_scratch_size(Bd, Td, Cd), np.nan, np.float32)
    launched(mods, "layernorm", lambda cu: cu.layernorm_backward(out["dinp"], out["dweight"], out["dbias"], scratch,
                                                                 dout, x, weight, mean, rstd, Bd, Td, Cd), packed=False)
    return out


def assert_bitwise_equal(a, b, what):
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs bitwise {what}"


def test_backward_kernels_are_deterministic(mods):
    """The same launch twice on this backend (the GPU too, where one is found): bit-identical."""
    assert_bitwise_equal(deterministic_backwards(mods), deterministic_backwards(mods), "between two runs")


DETERMINISM_RUN = """
import sys
import numpy as np
sys.path[:0] = [{tests!r}, {dev!r}]   # pytest.ini's pythonpath, which a child process does not read
import emulator
from test_kernels import Emulated, deterministic_backwards, kernel_source
mods = {{name: Emulated(emulator.RawModule(code=kernel_source(name), options=("--std=c++17",)), {order!r})
        for name in ("encoder", "layernorm")}}
np.savez({path!r}, **deterministic_backwards(mods))
"""


def test_backward_kernels_are_deterministic_across_orders_and_threads(emu_mods, tmp_path):
    """On the emulator: the three thread orders, and 1 or 4 OS threads running the blocks
    (LLMC_EMULATOR_THREADS, read once per process, so in a child process): all bit-identical."""
    first = deterministic_backwards({name: Emulated(mod, "forward") for name, mod in emu_mods.items()})
    for order in ("reverse", "warps"):
        again = deterministic_backwards({name: Emulated(mod, order) for name, mod in emu_mods.items()})
        assert_bitwise_equal(first, again, f"between thread orders forward and {order}")
    for threads, order in (("1", "forward"), ("4", "warps"), ("4", "reverse")):
        path = str(tmp_path / f"run_{threads}_{order}.npz")
        script = DETERMINISM_RUN.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                        dev=os.path.join(REPO, "dev"), order=order, path=path)
        env = dict(os.environ, LLMC_EMULATOR_THREADS=threads)
        r = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        with np.load(path) as saved:
            assert_bitwise_equal(first, dict(saved), f"with LLMC_EMULATOR_THREADS={threads}, order {order}")


# ---------------------------------------------------------------------------------------------
# 3. the emulator itself

SELFTEST = r"""
extern "C" __global__ void early_return_barrier(int* out, int n) {
    __shared__ int counter[1];
    if (threadIdx.x == 0) { counter[0] = 0; }
    __syncthreads();
    if (threadIdx.x >= n) { return; }                 // these leave before the next two barriers
    atomicAdd(&counter[0], 1);
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = counter[0];
    __syncthreads();
}

extern "C" __global__ void shuffles(int* down, int* xr, int* idx, int* up, float* fsum, int* seg) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int lane = threadIdx.x % 32;
    int v = i * 10;
    down[i] = __shfl_down_sync(0xffffffff, v, 3);
    xr[i] = __shfl_xor_sync(0xffffffff, v, 5);
    idx[i] = __shfl_sync(0xffffffff, v, 7);
    up[i] = __shfl_up_sync(0xffffffff, v, 2);
    float s = (float)lane;
    for (int offset = 16; offset > 0; offset /= 2) { s += __shfl_xor_sync(0xffffffff, s, offset); }
    fsum[i] = s;
    seg[i] = __shfl_down_sync(0xffffffff, v, 1, 8);   // segments of 8 lanes
}

extern "C" __global__ void votes(unsigned int* ballot, int* any, int* all) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int lane = threadIdx.x % 32;
    ballot[i] = __ballot_sync(0xffffffff, lane % 3 == 0);
    any[i] = __any_sync(0xffffffff, lane == 31 && blockIdx.x == 1);
    all[i] = __all_sync(0xffffffff, lane < 32);
}

extern "C" __global__ void reverse_in_block(float* out, const float* inp, int read_before_write) {
    extern __shared__ float buf[];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (read_before_write) { out[i] = buf[threadIdx.x]; return; }
    buf[threadIdx.x] = inp[i];
    __syncthreads();
    out[i] = buf[blockDim.x - 1 - threadIdx.x];
}

extern "C" __global__ void atomics(float* fsum, int* icount, const float* inp, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    atomicAdd(fsum, inp[i]);
    atomicAdd(icount, 1);
}

extern "C" __global__ void indices(int* out) {
    int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    int nthreads = blockDim.x * blockDim.y * blockDim.z;
    out[block * nthreads + thread] = block * 10000 + thread;
}

extern "C" __global__ void divergent_deadlock(float* out) {
    if (threadIdx.x < 16) { out[threadIdx.x] = __shfl_xor_sync(0xffffffff, 1.0f, 1); }
    __syncthreads();
}

extern "C" __global__ void shuffle_from_exited_lane(float* out) {
    if (threadIdx.x >= 16) { return; }
    out[threadIdx.x] = __shfl_down_sync(0xffffffff, (float)threadIdx.x, 16);
}

extern "C" __global__ void out_of_bounds(float* out, const float* inp, int n, int offset) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i + offset] = inp[i] + 1.0f; }
}

extern "C" __global__ void scalars(double* out, int a, float b, long long c, double d, unsigned int e) {
    out[0] = a; out[1] = b; out[2] = (double)c; out[3] = d; out[4] = e;
}
"""


@pytest.fixture(scope="module")
def emu_selftest():
    return emulator.RawModule(code=SELFTEST, options=("--std=c++17",))


@pytest.fixture(scope="module", params=BACKENDS)
def selftest(request, emu_selftest):
    """The CUDA semantics the emulator must reproduce; on a GPU the expectations themselves are checked."""
    if request.param in ("emulator", "reverse", "warps"):
        return Emulated(emu_selftest, "forward" if request.param == "emulator" else request.param)
    if request.param == "adapter":
        host = type("xp", (), {"asarray": staticmethod(np.array), "asnumpy": staticmethod(np.asarray)})
        return DeviceModule(host, emulator.RawModule, SELFTEST)
    import cupy
    return DeviceModule(cupy, cupy.RawModule, SELFTEST)


def test_barrier_tolerates_early_returns(selftest):
    block, n = 96, 70
    out = np.full(2 * block, -1, np.int32)
    selftest.get_function("early_return_barrier")(2, block, (out, i32(n)))
    for b in range(2):
        assert np.all(out[b * block:b * block + n] == n)     # every live thread counted before reading
        assert np.all(out[b * block + n:(b + 1) * block] == -1)


def test_warp_shuffles(selftest):
    nblocks, block = 2, 64
    n = nblocks * block
    outs = [np.zeros(n, np.int32) for _ in range(4)] + [np.zeros(n, np.float32), np.zeros(n, np.int32)]
    selftest.get_function("shuffles")(nblocks, block, tuple(outs))
    down, xr, idx, up, fsum, seg = outs
    i = np.arange(n)
    lane, base = i % 32, i - i % 32
    v = i * 10
    assert np.array_equal(down, np.where(lane + 3 < 32, v + 30, v))
    assert np.array_equal(xr, (base + (lane ^ 5)) * 10)
    assert np.array_equal(idx, (base + 7) * 10)
    assert np.array_equal(up, np.where(lane >= 2, v - 20, v))
    assert np.all(fsum == 496.0)                      # sum of 0..31, in every lane
    assert np.array_equal(seg, np.where(lane % 8 < 7, v + 10, v))


def test_warp_votes(selftest):
    ballot, any_, all_ = np.zeros(128, np.uint32), np.full(128, -1, np.int32), np.full(128, -1, np.int32)
    selftest.get_function("votes")(2, 64, (ballot, any_, all_))
    assert np.all(ballot == sum(1 << lane for lane in range(0, 32, 3)))
    assert np.array_equal(any_ != 0, np.arange(128) >= 64)
    assert np.all(all_ != 0)


def test_dynamic_shared_memory(selftest):
    block = 100
    inp = np.arange(3 * block, dtype=np.float32)
    out = np.zeros_like(inp)
    kernel = selftest.get_function("reverse_in_block")
    kernel(3, block, (out, inp, i32(0)), shared_mem=block * 4)
    assert np.array_equal(out, inp.reshape(3, block)[:, ::-1].ravel())
    if isinstance(selftest, Emulated):
        kernel(3, block, (out, inp, i32(1)), shared_mem=block * 4)
        assert np.all(np.isnan(out))                  # the emulator's unwritten shared memory reads as NaN


def test_atomics_across_blocks(selftest):
    n = 300_001                                       # many blocks, so several OS threads add at once
    inp = np.ones(n, np.float32)
    fsum, icount = np.zeros(1, np.float32), np.zeros(1, np.int32)
    selftest.get_function("atomics")(ceil_div(n, 256), 256, (fsum, icount, inp, i64(n)))
    assert icount[0] == n and fsum[0] == n            # integers below 2^24 add exactly in float32


def test_multidimensional_grid_and_block(selftest):
    grid, block = (3, 2, 2), (4, 3, 2)
    nb, nt = 12, 24
    out = np.full(nb * nt, -1, np.int32)
    selftest.get_function("indices")(grid, block, (out,))
    assert np.array_equal(out, (np.arange(nb)[:, None] * 10000 + np.arange(nt)[None]).ravel())


def test_scalars_pass_through_exactly(selftest):
    out = np.zeros(5, np.float64)
    selftest.get_function("scalars")(1, 1, (out, i32(-7), f32(0.5), i64(2**40), np.float64(1e-300), np.uint32(4e9)))
    assert list(out) == [-7.0, 0.5, 2.0**40, 1e-300, 4e9]


def test_argument_errors_are_clear(emu_mods):
    mods = emu_mods
    gelu = fn(mods, "gelu", "gelu_forward_kernel")
    x = np.zeros(10, np.float32)
    with pytest.raises(TypeError, match=r"argument 2 \(int\) expects np.int32, got np.int64"):
        gelu(1, 32, (x, x, np.int64(10)))
    with pytest.raises(TypeError, match=r"expects np.int32, got Python int"):
        gelu(1, 32, (x, x, 10))
    with pytest.raises(TypeError, match=r"argument 1 \(const float\*\) expects a float32 array, got float64"):
        gelu(1, 32, (x, x.astype(np.float64), i32(10)))
    with pytest.raises(TypeError, match=r"takes 3 arguments"):
        gelu(1, 32, (x, x))
    with pytest.raises(ValueError, match=r"not C-contiguous"):
        gelu(1, 32, (x, np.zeros(20, np.float32)[::2], i32(10)))
    with pytest.raises(ValueError, match=r"exceeds CUDA's limits"):
        gelu(1, 2048, (x, x, i32(10)))
    adamw = fn(mods, "adamw", "adamw_kernel")
    with pytest.raises(TypeError, match=r"argument 8 \(float\) expects np.float32, got np.float64"):
        adamw(1, 32, (x, None, x, x, x, i64(10), i64(10), i64(10), np.float64(1e-3)) + (f32(0),) * 7 + (u32(0),))
    with pytest.raises(TypeError, match=r"argument 16 \(unsigned int\) expects np.uint32, got np.int32"):
        adamw(1, 32, (x, None, x, x, x, i64(10), i64(10), i64(10)) + (f32(0),) * 8 + (i32(0),))
    ln = fn(mods, "layernorm", "layernorm_backward_kernel")
    with pytest.raises(ValueError, match=r"dynamic shared memory"):
        ln(1, 32, (x,) * 7 + (i32(1),) * 3, shared_mem=64 * 1024)


def test_guarded_arrays_catch_out_of_bounds_writes(emu_selftest):
    kernel = emu_selftest.get_function("out_of_bounds")
    inp = np.arange(10, dtype=np.float32)
    out = np.zeros(10, np.float32)
    kernel(1, 32, (out, inp, i32(10), i32(0)), guard=True)
    assert np.array_equal(out, inp + 1)               # in bounds: results copied back
    with pytest.raises(RuntimeError, match=r"wrote past the end of argument 0 \(float\*, 10 elements\)"):
        kernel(1, 32, (out, inp, i32(10), i32(1)), guard=True)
    with pytest.raises(RuntimeError, match=r"wrote before the start of argument 0"):
        kernel(1, 32, (out, inp, i32(10), i32(-1)), guard=True)
    big = np.zeros(12, np.float32)
    kernel(1, 32, (big, inp[:9].copy(), i32(10), i32(0)), guard=True)  # reads inp[9], past a 9-float array
    assert np.array_equal(big[:9], inp[:9] + 1) and np.isnan(big[9])


def test_device_side_errors_are_raised(emu_selftest, emu_mods):
    selftest, mods = emu_selftest, emu_mods
    out = np.zeros(32, np.float32)
    with pytest.raises(RuntimeError, match=r"deadlock"):
        selftest.get_function("divergent_deadlock")(1, 32, (out,))
    with pytest.raises(RuntimeError, match=r"reads lane 16 of warp 0 .* exited"):
        selftest.get_function("shuffle_from_exited_lane")(1, 32, (out,))
    # a warp-per-row kernel launched with a block that is not a multiple of 32
    N, Cs = 2, 8
    x = np.ones(N * Cs, np.float32)
    with pytest.raises(RuntimeError, match=r"no thread \(block size not a multiple of 32\?\)"):
        fn(mods, "layernorm", "layernorm_forward_kernel")(1, 48, (x.copy(), None, None, x, x, x, i32(N), i32(Cs)))
    # and the module still works after an aborted launch
    block = 96
    res = np.full(block, -1, np.int32)
    selftest.get_function("early_return_barrier")(1, block, (res, i32(block)))
    assert np.all(res == block)


def test_portable_ucontext_fibers_give_the_same_results():
    """Off x86-64 the fibers switch with ucontext; -DEMU_UCONTEXT forces that path here."""
    mod = emulator.RawModule(code=SELFTEST, options=("--std=c++17", "-DEMU_UCONTEXT"))
    block, n = 96, 70
    out = np.full(2 * block, -1, np.int32)
    mod.get_function("early_return_barrier")(2, block, (out, i32(n)))
    assert np.all(out.reshape(2, block)[:, :n] == n) and np.all(out.reshape(2, block)[:, n:] == -1)
    outs = [np.zeros(64, np.int32) for _ in range(4)] + [np.zeros(64, np.float32), np.zeros(64, np.int32)]
    mod.get_function("shuffles")(1, 64, tuple(outs))
    assert np.all(outs[4] == 496.0) and np.array_equal(outs[1], (np.arange(64) ^ 5) * 10)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_launches_still_work_in_a_forked_child(emu_selftest):
    """A fork() child has no pool threads: the emulator must notice and start its own."""
    n = 300_001
    inp = np.ones(n, np.float32)
    fsum, icount = np.zeros(1, np.float32), np.zeros(1, np.int32)
    emu_selftest.get_function("atomics")(ceil_div(n, 256), 256, (fsum, icount, inp, i64(n)))  # pool up
    pid = os.fork()
    if pid == 0:                                      # child: launch again, report through the exit code
        ok = False
        try:
            fsum[0], icount[0] = 0, 0
            emu_selftest.get_function("atomics")(ceil_div(n, 256), 256, (fsum, icount, inp, i64(n)))
            ok = icount[0] == n and fsum[0] == n
        finally:
            os._exit(0 if ok else 1)
    deadline = time.time() + 30                       # a child waiting for helpers that are gone hangs
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.time() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the launch in the forked child hung")
    assert os.WEXITSTATUS(done[1]) == 0


def test_every_kernel_is_exercised_here():
    """A kernel added to kernels/*.cu without a check in this file or in a test file of its own (the 128-bit
    packed and fused kernels in test_kernels_fused.py, test_layernorm_x128.py, test_matmul_bias.py, ...; flash
    attention in test_flash_attention.py; AdamW's init_from_master in test_zero_layout.py) fails here. Files that
    only name kernels (check_kernel's and NVRTC's lists) do not count."""
    this = ""
    here = os.path.dirname(os.path.abspath(__file__))
    listing_only = {"test_check_kernel.py", "test_nvrtc.py", "test_emulator_traffic.py"}
    for name in sorted(glob.glob(os.path.join(here, "test_*.py"))):
        if os.path.basename(name) in listing_only:
            continue
        with open(name) as f:
            this += f.read()
    names = [k for path in KERNEL_FILES for k in re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', open(path).read())]
    assert len(names) >= 18
    missing = [k for k in names if this.count(f'"{k}"') < 1]
    assert not missing, f"kernels without a test: {missing}"
