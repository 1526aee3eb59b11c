"""
Validate one kernel file against its NumPy twins and, on a GPU, time it: llm.c's dev/cuda loop
(check a kernel against the CPU reference, then benchmark it) for kernels/*.cu.

  python dev/check_kernel.py layernorm        # every kernel of kernels/layernorm.cu
  python dev/check_kernel.py all              # every file
  python dev/check_kernel.py gelu --kernel_dir /tmp/my_kernels   # an edited copy of kernels/
  python dev/check_kernel.py all --backend emulator               # the CPU emulator even on a GPU

For each kernel: random inputs on an odd shape (B=3 T=13 C=48 NH=3 V=101 Vp=128), one launch as
train_gpt2_cuda.py's launcher makes it (its grid, block, shared memory and arguments, recorded by
recorded_launches; the few kernels the trainer never launches alone on its launcher's grid), and the
max error of each output against train_gpt2.py's layer
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

kernels/flash_attention.cu is bf16 only: with --precision bf16 its three kernels are launched through
train_gpt2_cuda.py's own launchers on B=2 T=37 NH=2 hs=64 (flash takes head
sizes 64 and 128), checked against causal attention in float64, and timed at B=16 NH=12 hs=64 T=1024 with
dev/perf_model.py's flash_tiles bytes in the model column; in fp32 the file is skipped with a line saying so.

tests/test_kernels.py imports its harness from here (DeviceModule, Emulated, rand, max_error, close), and the
kernel tests their launches (recorded_launches, run_launches): no launch shape is written twice.
"""

import argparse
import dataclasses
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
from llmc.formats import bf16_to_f32, f32_to_bf16  # noqa: E402

i32, i64, f32, u32 = np.int32, np.int64, np.float32, np.uint32
OPTIONS = ("--std=c++17",)
PRECISION_OPTIONS = {"fp32": OPTIONS, "bf16": OPTIONS + ("-DENABLE_BF16",)}   # floatX = float / __nv_bfloat16
# a kernel's name and parameter list: extern "C" __global__ void [__launch_bounds__(n)] name(params)
KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')

# ---------------------------------------------------------------------------------------------
# the harness: one interface (mod.get_function(name)(grid, block, args, shared_mem)) over NumPy
# arrays, whether the kernel runs on the emulator or on a GPU


class DeviceModule:
    """The kernels on a real GPU through CuPy, behind the emulator's interface: NumPy arrays go to
    the device, the kernel runs, and the arrays behind non-const pointers come back. An array
    passed twice (in place) is one device array. `xp` is cupy (or a stand-in for testing this)."""

    def __init__(self, xp, raw_module, code, options=OPTIONS):
        self.xp = xp
        self.mod = raw_module(code=code, options=options)
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
    floatx: str = "fp32"                              # "bf16": the kernels built with -DENABLE_BF16


def pack(s):
    """Elements per 128-bit load of the packed kernels (common.cuh's x128::size): 4 floats or 8 bf16."""
    return 4 if s.floatx == "fp32" else 8


def floatx_values(s):
    """The rounding a floatX input goes through: none in fp32; in bf16 to the nearest bf16 (as a float32),
    so that the references are computed from exactly the values the kernel reads."""
    if s.floatx == "fp32":
        return lambda x: x
    return lambda x: bf16_to_f32(f32_to_bf16(x)).reshape(np.shape(x))


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
    model_bytes: int = 0                              # the perf model's bytes where they are not the arguments'


def f64(x):
    return np.asarray(x, dtype=np.float64)


def encoder_launches(s, rng, reference):
    B, T, C, Vp = s.B, s.T, s.C, s.Vp
    fx = floatx_values(s)
    wte, wpe = fx(rand(rng, Vp, C)), fx(rand(rng, s.maxT, C))
    inp = rng.integers(0, min(Vp, 7 if reference else Vp), size=(B, T)).astype(np.int32)  # few ids: repeats
    if reference:
        inp.flat[::2] = 3                             # and one heavy bucket: token 3 at every other position
    out = np.full((B, T, C), np.nan, np.float32)
    dout = fx(rand(rng, B, T, C))
    dwte, dwpe = fx(rand(rng, Vp, C)), fx(rand(rng, s.maxT, C))   # nonzero: the backward must add
    forward = lambda cu, out, wte, wpe: cu.encoder_forward(out, inp, wte, wpe, B, T, C)  # noqa: E731
    [fwd] = launcher_launches(s, forward, out, wte, wpe, packed=False)
    out_packed = np.full((B, T, C), np.nan, np.float32)  # C is a multiple of the pack on every shape here
    [fwd_packed] = launcher_launches(s, forward, out_packed, wte, wpe, packed=True)
    backward = lambda cu, dwte, dwpe, dout: cu.encoder_backward(dwte, dwpe, dout, inp, B, T, C, seed=1337)  # noqa: E731
    bwd_wte, bwd_wpe = launcher_launches(s, backward, dwte, dwpe, dout, packed=False)
    dwpe_x128 = dwpe.copy()                           # the x128 twin on the same inputs (C a multiple of the pack)
    [_, bwd_wpe_x128] = launcher_launches(s, backward, dwte.copy(), dwpe_x128, dout, packed=True)
    for lc in (bwd_wte, bwd_wpe, bwd_wpe_x128):
        lc.read_write = (0,)
    if reference:
        want = np.zeros((B, T, C))
        tg.encoder_forward(want, inp, f64(wte), f64(wpe), B, T, C)
        fwd.outputs = [Output("out", out, want, "encoder_forward", 1e-6)]
        fwd_packed.outputs = [Output("out", out_packed, want, "encoder_forward", 1e-6)]
        w_dwte, w_dwpe = f64(dwte), f64(dwpe)
        tg.encoder_backward(w_dwte, w_dwpe, f64(dout), inp, B, T, C)
        bwd_wte.outputs = [Output("dwte", dwte, w_dwte, "encoder_backward (+=)", 1e-5)]
        bwd_wpe.outputs = [Output("dwpe", dwpe, w_dwpe, "encoder_backward (+=)", 1e-5)]
        bwd_wpe_x128.outputs = [Output("dwpe", dwpe_x128, w_dwpe, "encoder_backward (+=)", 1e-5)]
    return [fwd, fwd_packed, bwd_wte, bwd_wpe, bwd_wpe_x128]


def layernorm_launches(s, rng, reference):
    B, T, C = s.B, s.T, s.C
    fx = floatx_values(s)
    row_scale = np.logspace(-2, 1, B * T, dtype=np.float32).reshape(B, T, 1)  # variances near eps too
    inp = fx(((rand(rng, B, T, C) + 2.0) * row_scale).astype(np.float32))
    weight, bias = fx(rand(rng, C)), fx(rand(rng, C))
    out = np.full((B, T, C), np.nan, np.float32)
    mean, rstd = np.full((B, T), np.nan, np.float32), np.full((B, T), np.nan, np.float32)
    forward = lambda cu, out, *inputs: cu.layernorm_forward(out, mean, rstd, *inputs, B, T, C)  # noqa: E731
    [fwd] = launcher_launches(s, forward, out, inp, weight, bias, packed=False)
    dout = fx(rand(rng, B, T, C))
    dinp, dweight, dbias = fx(rand(rng, B, T, C)), fx(rand(rng, C)), fx(rand(rng, C))   # the backward adds into these
    dinp0 = dinp.copy()                               # for the x128 twin
    b_mean = inp.mean(-1, dtype=np.float64).astype(np.float32)
    b_rstd = (1 / np.sqrt(inp.var(-1, dtype=np.float64) + 1e-5)).astype(np.float32)
    cu = launch_trainer()
    block = cu.LAYERNORM_BACKWARD_BLOCK               # 16 rows per block (the last block partly empty on ODD)
    grid = ceil_div(32 * B * T, block)
    scratch = np.full((grid, 2, C), np.nan, np.float32)   # per-block partials, written by the first kernel

    def backward(cu, dinp, dweight, dbias, dout, inp, weight, linear_dbias=None):
        cu.layernorm_backward(dinp, dweight, dbias, scratch, dout, inp, weight, b_mean, b_rstd, B, T, C, linear_dbias)
    bwd, bwd_sum = launcher_launches(s, backward, dinp, dweight, dbias, dout, inp, weight, packed=False)
    # the GPU-filling sum of the same partials (C % 4 == 0): the launcher's pick where the rows cannot take
    # the x128 kernel but scratch is packable (arrays off a 16-byte boundary)
    dweight_s, dbias_s = dweight.copy(), dbias.copy()
    [_, bwd_split] = launcher_launches(s, backward, dinp.copy(), dweight_s, dbias_s, dout, inp, weight,
                                       packed=lambda n, *arrays: arrays[0] is scratch)
    bwd.read_write, bwd_sum.read_write, bwd_split.read_write = (0,), (0, 1), (0, 1)
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
        bwd_split.outputs = [Output(name, got, w, "layernorm_backward (+=)", 2e-5, 1e-5)
                             for name, got, w in zip(("dweight", "dbias"), (dweight_s, dbias_s), want[1:])]
    # the fused residual + LayerNorm: residual = inp1 + inp2 (stored as floatX), then its LayerNorm
    inp1 = fx(rand(rng, B, T, C))
    inp2 = fx((inp - inp1).astype(np.float32))        # so that the residual is about inp, variances and all
    residual, normed = np.full((B, T, C), np.nan, np.float32), np.full((B, T, C), np.nan, np.float32)
    f_mean, f_rstd = np.full((B, T), np.nan, np.float32), np.full((B, T), np.nan, np.float32)
    fused_forward = lambda cu, residual, normed, mean, rstd, *rest: cu.fused_residual_forward(  # noqa: E731
        residual, normed, mean, rstd, *rest, B, T, C)
    [fused] = launcher_launches(s, fused_forward, residual, normed, f_mean, f_rstd, inp1, inp2, weight, bias,
                                packed=False)
    if reference:
        w_res = np.zeros((B, T, C))
        tg.residual_forward(w_res, f64(inp1), f64(inp2), B * T * C)
        stored = f64(fx(w_res.astype(np.float32)))    # the LayerNorm reads the residual as the kernel stored it
        w_norm, w_mean, w_rstd = np.zeros((B, T, C)), np.zeros((B, T)), np.zeros((B, T))
        tg.layernorm_forward(w_norm, w_mean, w_rstd, stored, f64(weight), f64(bias), B, T, C)
        fused.outputs = [Output("residual", residual, w_res, "residual_forward", 1e-6, 1e-6),
                         Output("normed", normed, w_norm, "layernorm_forward", 1e-5, 1e-5),
                         Output("mean", f_mean, w_mean, "layernorm_forward", 1e-6, 1e-6),
                         Output("rstd", f_rstd, w_rstd, "layernorm_forward", 0.0, 1e-5)]
    # the x128 twins on the same inputs (C is a multiple of the pack on every shape here), against the same
    # references: their sums run in another order, within the plain kernels' tolerances
    out_x = np.full((B, T, C), np.nan, np.float32)
    mean_x, rstd_x = np.full((B, T), np.nan, np.float32), np.full((B, T), np.nan, np.float32)
    fwd_x = launcher_launches(s, lambda cu, out, *rest: cu.layernorm_forward(out, mean_x, rstd_x, *rest, B, T, C),
                              out_x, inp, weight, bias, packed=True)[0]
    # The trainer launches the next two only as the one-pass kernel's pieces, so they are launched here by hand
    # on its grid: layernorm_backward_x128_kernel with dinp_sums = 1 (a third partial row per block, the column
    # sums of the updated dinp), which layernorm_backward_sum3_split_kernel adds into a linear layer's dbias
    # beside dweight and dbias, its blocks as the two-row split sum's above (one per pack of 4 of the 3C)
    dinp_x, scratch_x = dinp0.copy(), np.full((grid, 3, C), np.nan, np.float32)
    bwd_x = Launch("layernorm_backward_x128_kernel", grid, block,
                   (dinp_x, scratch_x, dout, inp, weight, b_mean, b_rstd, i32(B), i32(T), i32(C), i32(1)),
                   read_write=(0,))
    dweight_3, dbias_3, dlinear_3 = dweight.copy(), dbias.copy(), fx(rand(rng, C))
    bwd_sum3 = Launch("layernorm_backward_sum3_split_kernel", 3 * C // 4, bwd_split.block,
                      (dweight_3, dbias_3, dlinear_3, scratch_x, i32(grid), i32(C)), read_write=(0, 1, 2))
    residual_x, normed_x = np.full((B, T, C), np.nan, np.float32), np.full((B, T, C), np.nan, np.float32)
    f_mean_x, f_rstd_x = np.full((B, T), np.nan, np.float32), np.full((B, T), np.nan, np.float32)
    [fused_x] = launcher_launches(s, fused_forward, residual_x, normed_x, f_mean_x, f_rstd_x, inp1, inp2, weight,
                                  bias, packed=True)
    if reference:
        fwd_x.outputs = [dataclasses.replace(o, got=got)
                         for o, got in zip(fwd.outputs, (out_x, mean_x, rstd_x))]
        # the dinp sums are of dinp AS STORED (bf16: rounded), known only after the launch: their references are
        # filled in place when the check reads the output (got is a function, called first)
        w_dinp_sums, w_dlinear = np.zeros((grid, C)), f64(dlinear_3).copy()

        def stored_dinp_sums():
            rows = np.zeros((grid * block // 32, C))
            rows[:B * T] = f64(dinp_x).reshape(B * T, C)
            w_dinp_sums[...] = rows.reshape(grid, block // 32, C).sum(axis=1)
            return scratch_x[:, 2]

        def dlinear_after():
            w_dlinear[...] += f64(dinp_x).reshape(B * T, C).sum(0)
            return dlinear_3
        bwd_x.outputs = [dataclasses.replace(bwd.outputs[0], got=dinp_x),
                         dataclasses.replace(bwd.outputs[1], got=lambda: scratch_x[:, :2]),
                         Output("dinp sums", stored_dinp_sums, w_dinp_sums, "column sums of the stored dinp",
                                1e-5, 1e-6)]
        bwd_sum3.outputs = [Output(name, got, w, "layernorm_backward (+=)", 2e-5, 1e-5) for name, got, w in
                            zip(("dweight", "dbias", "dlinear_bias"), (dweight_3, dbias_3, dlinear_after),
                                (want[1], want[2], w_dlinear))]
        fused_x.outputs = [dataclasses.replace(o, got=got)
                           for o, got in zip(fused.outputs, (residual_x, normed_x, f_mean_x, f_rstd_x))]
    # the trainer's: the x128 rows and every sum in one launch (ticket counters, start at 0), with the linear bias
    dinp_1, dweight_1, dbias_1, dlinear_1 = dinp0.copy(), dweight.copy(), dbias.copy(), fx(rand(rng, C))
    scratch_1 = np.full(cu.layernorm_scratch_size(B, T, C), np.nan, np.float32)
    scratch_1[-(ceil_div(grid, cu.LAYERNORM_GROUP) + 1):] = 0   # the ticket counters at its end start at 0
    onepass = lambda cu, dinp, dweight, dbias, dlinear, dout, inp, weight: cu.layernorm_backward(  # noqa: E731
        dinp, dweight, dbias, scratch_1, dout, inp, weight, b_mean, b_rstd, B, T, C, dlinear)
    [bwd_one] = launcher_launches(s, onepass, dinp_1, dweight_1, dbias_1, dlinear_1, dout, inp, weight, packed=True)
    bwd_one.read_write = (0, 1, 2, 3)
    if reference:
        w_dlinear_1 = f64(dlinear_1).copy()

        def dlinear_1_after():                        # the stored dinp's sums, known after the launch
            w_dlinear_1[...] += f64(dinp_1).reshape(B * T, C).sum(0)
            return dlinear_1
        bwd_one.outputs = [Output("dinp", dinp_1, want[0], "layernorm_backward (+=)", 2e-5, 1e-5),
                           Output("dweight", dweight_1, want[1], "layernorm_backward (+=)", 2e-5, 1e-5),
                           Output("dbias", dbias_1, want[2], "layernorm_backward (+=)", 2e-5, 1e-5),
                           Output("dlinear_bias", dlinear_1_after, w_dlinear_1, "column sums of dinp (+=)",
                                  2e-5, 1e-5)]
    return [fwd, bwd, bwd_sum, bwd_split, fused, fwd_x, bwd_x, bwd_sum3, fused_x, bwd_one]


def matmul_launches(s, rng, reference):
    # the bias parts of the linear layer; the GEMMs are cuBLAS's (here NumPy's, in float64)
    B, T, C = s.B, s.T, s.C
    N, OC = B * T, (100 if reference else 4 * C)     # OC not a multiple of 32 when checking
    fx = floatx_values(s)
    inp, weight, bias = fx(rand(rng, N, C)), fx(rand(rng, OC, C)), fx(rand(rng, OC))
    out = fx((inp @ weight.T).astype(np.float32))     # the GEMM's output (floatX), which the kernel adds the bias to
    [fwd] = launcher_launches(s, lambda cu, out, bias: cu.add_bias(out, bias, N, OC), out, bias, packed=False)
    dout, dbias = fx(rand(rng, N, OC)), fx(rand(rng, OC))
    [bwd] = launcher_launches(s, lambda cu, dbias, dout: cu.matmul_backward_bias(dbias, None, dout, N, OC),
                              dbias, dout)            # no scratch: the plain kernel
    fwd.read_write = bwd.read_write = (0,)
    if reference:
        w_out = np.zeros((B, T, OC))
        tg.matmul_forward(w_out, f64(inp).reshape(B, T, C), f64(weight), f64(bias), B, T, C, OC)
        twin = "matmul_forward (GEMM + bias)"
        if s.floatx != "fp32":                        # the GEMM's output was rounded to bf16 before the bias
            w_out, twin = f64(out) + f64(bias), "GEMM output (bf16) + bias"
        fwd.outputs = [Output("out", out, w_out.reshape(N, OC), twin, 1e-4, 1e-5)]
        w_dinp, w_dweight, w_dbias = np.zeros((B, T, C)), np.zeros((OC, C)), f64(dbias)
        tg.matmul_backward(w_dinp, w_dweight, w_dbias, f64(dout).reshape(B, T, OC), f64(inp).reshape(B, T, C),
                           f64(weight), B, T, C, OC)
        bwd.outputs = [Output("dbias", dbias, w_dbias, "matmul_backward dbias (+=)", 1e-5, 1e-6)]
    # the packed bias add needs OC a multiple of the pack: its own arrays, OC rounded up to 8
    OCp = ceil_div(OC, 8) * 8
    weight_p, bias_p = fx(rand(rng, OCp, C)), fx(rand(rng, OCp))
    out_p = fx((inp @ weight_p.T).astype(np.float32))
    [fwd_p] = launcher_launches(s, lambda cu, out, bias: cu.add_bias(out, bias, N, OCp), out_p, bias_p, packed=True)
    fwd_p.read_write = (0,)
    if reference:
        fwd_p.outputs = [Output("out", out_p, f64(out_p) + f64(bias_p), "GEMM output + bias", 1e-4, 1e-5)]
    # the GPU-filling bias backward (OC a multiple of the pack too): column sums per block row into an fp32
    # scratch, then the block rows' partials added into dbias: the trainer launches the pair only as
    # matmul_backward_bias_x128_kernel (below), so they run here by hand on its grid (matmul_bias_grid) and
    # block, the sum on the plain kernel's shape (32 columns per block of 32 warps)
    cu = launch_trainer()
    columns, row_blocks, rows_per_block = cu.matmul_bias_grid(N, OCp, pack(s))
    dout_p, dbias_p = fx(rand(rng, N, OCp)), fx(rand(rng, OCp))
    [plain] = recorded_launches(lambda cu: cu.matmul_backward_bias(dbias_p, None, dout_p, N, OCp))
    scratch = np.full((row_blocks, OCp), np.nan, np.float32)
    dbias_1 = dbias_p.copy()                          # for the one-launch kernel below
    scratch_1 = np.full(row_blocks * OCp + columns, np.nan, np.float32)
    scratch_1[row_blocks * OCp:] = 0                  # its ticket counters, at the end, start at 0
    [bwd_one] = launcher_launches(s, lambda cu, dbias, dout: cu.matmul_backward_bias(dbias, scratch_1, dout, N, OCp),
                                  dbias_1, dout_p)
    bwd_partial = Launch("matmul_backward_bias_partial_kernel", bwd_one.grid, bwd_one.block,
                         (scratch, dout_p, i32(N), i32(OCp), i32(rows_per_block)), shared_mem=bwd_one.shared_mem)
    bwd_sum = Launch("matmul_backward_bias_sum_kernel", plain.grid, plain.block,
                     (dbias_p, scratch, i32(row_blocks), i32(OCp)), shared_mem=plain.shared_mem, read_write=(0,))
    if reference:
        w_partial = np.stack([f64(dout_p)[y:y + rows_per_block].sum(0) for y in range(0, N, rows_per_block)])
        bwd_partial.outputs = [Output("scratch", scratch, w_partial, "column sums per block row", 1e-5, 1e-6)]
        w_dbias_p, w_dinp, w_dweight = f64(dbias_p), np.zeros((B, T, C)), np.zeros((OCp, C))
        tg.matmul_backward(w_dinp, w_dweight, w_dbias_p, f64(dout_p).reshape(B, T, OCp), f64(inp).reshape(B, T, C),
                           f64(weight_p), B, T, C, OCp)
        bwd_sum.outputs = [Output("dbias", dbias_p, w_dbias_p, "matmul_backward dbias (+=)", 1e-5, 1e-6)]
    # the same in one launch (the last block of each column block adds the partials)
    bwd_one.read_write = (0,)
    if reference:
        bwd_one.outputs = [Output("dbias", dbias_1, w_dbias_p, "matmul_backward dbias (+=)", 1e-5, 1e-6)]
    return [fwd, fwd_p, bwd, bwd_partial, bwd_sum, bwd_one]


def attention_launches(s, rng, reference):
    """Each kernel of the chain gets the inputs the NumPy layer's own intermediates give it, so each
    is compared on its own: q, k, v split from inp; preatt = q @ k^T (unscaled, as the kernel takes
    it); att and out from attention_forward; dpreatt and dinp from attention_backward."""
    B, T, C, NH = s.B, s.T, s.C, s.NH
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    heads = lambda x: x.reshape(B, T, -1, NH, hs).transpose(2, 0, 3, 1, 4)  # noqa: E731  (B,T,g*C) -> (g,B,NH,T,hs)
    fx = floatx_values(s)
    inp, dout = fx(rand(rng, B, T, 3 * C)), fx(rand(rng, B, T, C))
    q, k, v = (np.full((B, NH, T, hs), np.nan, np.float32) for _ in range(3))
    if reference:
        w_out, w_preatt, w_att = np.zeros((B, T, C)), np.zeros((B, NH, T, T)), np.zeros((B, NH, T, T))
        tg.attention_forward(w_out, w_preatt, w_att, f64(inp), B, T, C, NH)
        w_dinp, w_dpreatt, w_datt = np.zeros((B, T, 3 * C)), np.zeros((B, NH, T, T)), np.zeros((B, NH, T, T))
        tg.attention_backward(w_dinp, w_dpreatt, w_datt, f64(dout), f64(inp), w_att, B, T, C, NH)
        q_, k_, v_ = heads(inp)
        preatt = fx(np.ascontiguousarray(q_ @ k_.transpose(0, 1, 3, 2), dtype=np.float32))  # unscaled
        att = fx(w_att.astype(np.float32))
        vaccum = fx(np.ascontiguousarray(att @ v_, dtype=np.float32))
        datt = fx(w_datt.astype(np.float32))
        dq, dk, dv = (fx(np.ascontiguousarray(x, dtype=np.float32)) for x in heads(w_dinp))
    else:
        preatt, att, datt = (rand(rng, B, NH, T, T) for _ in range(3))
        vaccum, dq, dk, dv = (rand(rng, B, NH, T, hs) for _ in range(4))
    out = np.full((B, T, C), np.nan, np.float32)
    att_out = np.full((B, NH, T, T), np.nan, np.float32)
    dvaccum = np.full((B, NH, T, hs), np.nan, np.float32)
    dpreatt = np.full((B, NH, T, T), np.nan, np.float32)
    dinp = np.full((B, T, 3 * C), np.nan, np.float32)
    # the launchers' kernels in order, each given its own inputs in place of the buffers the launcher chains
    # them through (its GEMMs do not run here): their grids, blocks and scalars are the launchers'
    big = lambda: np.zeros(3 * B * T * C + B * NH * T * T, np.float32)   # noqa: E731  (any buffer the layer views)
    forward = launcher_launches(s, lambda cu, *buffers: cu.attention_forward(*buffers, B, T, C, NH),
                                out, big(), att_out, big())
    backward = launcher_launches(s, lambda cu, *buffers: cu.attention_backward(*buffers, B, T, C, NH),
                                 dinp, big(), dpreatt, big(), big(), dout, big(), att)
    launches = [with_arrays(lc, *arrays) for lc, arrays in zip(forward + backward, (
        (q, k, v, inp), (att_out, preatt), (out, vaccum), (dvaccum, dout), (dpreatt, datt, att), (dinp, dq, dk, dv)))]
    if reference:
        split = "inp (B,T,3C) split into heads"
        launches[0].outputs = [Output(name, got, want, split, 0.0)
                               for name, got, want in zip("qkv", (q, k, v), heads(f64(inp)))]
        att_twin, dpreatt_twin = "attention_forward att", "attention_backward dpreatt * scale"
        w_dpreatt = scale * w_dpreatt
        if s.floatx != "fp32":
            # bf16: the layer's intermediates reach the softmax kernels rounded, which moves att by far more
            # than one rounding; so those two are compared with the same formulas on the values they read
            causal = np.tril(np.ones((T, T), bool))
            x = np.where(causal, scale * f64(preatt), -np.inf)
            w_att = np.exp(x - x.max(-1, keepdims=True))
            w_att /= w_att.sum(-1, keepdims=True)
            a, da = f64(att), f64(datt)
            w_dpreatt = np.where(causal, scale * a * (da - (a * da * causal).sum(-1, keepdims=True)), 0.0)
            att_twin, dpreatt_twin = "causal softmax(scale preatt) (bf16 preatt)", "scale att (datt - sum att datt)"
        launches[1].outputs = [Output("att", att_out, w_att, att_twin, 1e-6, 1e-5)]
        launches[3].outputs = [Output("dinp", dvaccum, heads(f64(dout))[0], "dout (B,T,C) split into heads", 0.0)]
        launches[4].outputs = [Output("dpreatt", dpreatt, w_dpreatt, dpreatt_twin, 1e-6, 1e-5)]
        if s.floatx == "fp32":
            launches[2].outputs = [Output("out", out, w_out, "attention_forward out", 1e-5, 1e-5)]
            launches[5].outputs = [Output("dinp", dinp, w_dinp, "attention_backward dinp", 1e-5, 1e-5)]
        else:                                         # the two moves of bits, checked as such on their bf16 inputs
            merged = lambda x: x.transpose(0, 2, 1, 3).reshape(B, T, -1)  # noqa: E731  (B,NH,T,hs) -> (B,T,C)
            launches[2].outputs = [Output("out", out, merged(f64(vaccum)), "vaccum merged from heads", 0.0)]
            launches[5].outputs = [Output("dinp", dinp, np.concatenate([merged(f64(x)) for x in (dq, dk, dv)], -1),
                                          "dq, dk, dv merged from heads", 0.0)]
    return launches


def gelu_launches(s, rng, reference):
    N = s.B * s.T * 4 * s.C                           # the MLP's hidden activations
    fx = floatx_values(s)
    inp = rand(rng, N, scale=3.0)
    inp[:4] = [0.0, 20.0, -20.0, 60.0]                # coshf overflows at 60: the gradient must stay finite
    inp = fx(inp)
    out, dinp = np.full(N, np.nan, np.float32), np.full(N, np.nan, np.float32)
    dout = fx(rand(rng, N))
    forward = lambda cu, out, inp: cu.gelu_forward(out, inp, N)                       # noqa: E731
    backward = lambda cu, dinp, inp, dout: cu.gelu_backward(dinp, inp, dout, N)       # noqa: E731
    [fwd], [bwd] = launcher_launches(s, forward, out, inp, packed=False), \
        launcher_launches(s, backward, dinp, inp, dout, packed=False)
    out_p, dinp_p = np.full(N, np.nan, np.float32), dout.copy()      # the packed backward runs in place
    [fwd_p], [bwd_p] = launcher_launches(s, forward, out_p, inp, packed=True), \
        launcher_launches(s, lambda cu, d, inp: cu.gelu_backward(d, inp, d, N), dinp_p, inp, packed=True)
    bwd_p.read_write = (0,)
    if reference:
        want = np.zeros(N)
        tg.gelu_forward(want, f64(inp), N)
        fwd.outputs = [Output("out", out, want, "gelu_forward", 1e-6, 1e-6)]
        fwd_p.outputs = [Output("out", out_p, want, "gelu_forward", 1e-6, 1e-6)]
        want = np.zeros(N)                            # the kernel writes; the NumPy layer adds into zeros
        tg.gelu_backward(want, f64(inp), f64(dout), N)
        bwd.outputs = [Output("dinp", dinp, want, "gelu_backward (into zeros)", 1e-6, 1e-5)]
        bwd_p.outputs = [Output("dinp", dinp_p, want, "gelu_backward (in place)", 1e-6, 1e-5)]
    return [fwd, bwd, fwd_p, bwd_p]


def residual_launches(s, rng, reference):
    N = s.B * s.T * s.C
    fx = floatx_values(s)
    inp1, inp2 = fx(rand(rng, N)), fx(rand(rng, N))
    out = np.full(N, np.nan, np.float32)
    forward = lambda cu, out, inp1, inp2: cu.residual_forward(out, inp1, inp2, N)     # noqa: E731
    [launch] = launcher_launches(s, forward, out, inp1, inp2, packed=False)
    out_p = np.full(N, np.nan, np.float32)
    [packed] = launcher_launches(s, forward, out_p, inp1, inp2, packed=True)
    if reference:
        want = np.zeros(N)
        tg.residual_forward(want, f64(inp1), f64(inp2), N)
        launch.outputs = [Output("out", out, want, "residual_forward", 1e-6)]
        packed.outputs = [Output("out", out_p, want, "residual_forward", 1e-6)]
    return [launch, packed]


def classifier_launches(s, rng, reference):
    """The backward call (write_dlogits = 1), which computes everything the forward call does too."""
    B, T, V, Vp = s.B, s.T, s.V, s.Vp
    logits = rand(rng, B, T, Vp, scale=4.0)
    logits[..., V:] = 1e3                             # pad columns must be ignored by the softmax
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    targets.flat[:2] = 0, V - 1                       # first and last real column
    row = logits.reshape(B * T, Vp)[2]
    row[targets.flat[2]] = row[:V].max() - 100.0      # a target 100 below the max: -ftz=true must not make it inf
    logits = floatx_values(s)(logits)
    dlosses = rand(rng, B, T)
    losses = np.full((B, T), np.nan, np.float32)
    classifier = lambda cu, logits, losses: cu.fused_classifier(  # noqa: E731
        logits, losses, dlosses, targets, B, T, V, Vp, 1)
    [launch] = launcher_launches(s, classifier, logits, losses, packed=False)
    logits_w, losses_w = logits.copy(), np.full((B, T), np.nan, np.float32)   # the x128 twin (Vp % pack == 0)
    [wide] = launcher_launches(s, classifier, logits_w, losses_w, packed=True)
    launch.read_write = wide.read_write = (0,)
    if reference:
        probs, w_losses, w_dlogits = np.zeros((B, T, Vp)), np.zeros((B, T)), np.zeros((B, T, Vp))
        tg.softmax_forward(probs, f64(logits), B, T, V, Vp)
        tg.crossentropy_forward(w_losses, probs, targets, B, T, Vp)
        tg.crossentropy_softmax_backward(w_dlogits, f64(dlosses), probs, targets, B, T, V, Vp)
        launch.outputs = [Output("losses", losses, w_losses, "softmax_forward + crossentropy_forward", 1e-5, 1e-6),
                          Output("logits", logits, w_dlogits, "crossentropy_softmax_backward (dlogits)", 1e-7, 1e-5)]
        wide.outputs = [Output("losses", losses_w, w_losses, "softmax_forward + crossentropy_forward", 1e-5, 1e-6),
                        Output("logits", logits_w, w_dlogits, "crossentropy_softmax_backward (dlogits)", 1e-7, 1e-5)]
    return [launch, wide]


def adamw_multi_tensor_launch(s, rng, reference):
    """adamw_multi_tensor_kernel, the whole update in one launch over GPT-2's 16 tensors (C, Vp, maxT of the
    shape; 12 layers at d12's T, else 3), its table and grid made by train_gpt2_cuda._adamw_table. Checked on
    rank 1 of a ZeRO-1 shard of 2 (m, v, master hold that rank's half; the parameters outside its pieces must
    stay as they were), timed on one rank. The reference: AdamW in float64 on each piece, decay on the 2-D
    weights only (the table's flag)."""
    from llmc.collectives import ShardLayout
    from llmc.model import param_shapes
    cu = launch_trainer()
    config = argparse.Namespace(padded_vocab_size=s.Vp, max_seq_len=s.maxT, num_layers=L12 if s.T == D12.T else 3,
                                channels=s.C)
    rank, size = (1, 2) if reference else (0, 1)
    layout = ShardLayout(param_shapes(config), rank, size)
    table, table_rows, blocks = cu._adamw_table(argparse.Namespace(adamw_table=None), layout)
    n, ns = layout.num_parameters, layout.num_state
    fx = floatx_values(s)
    params, grads = rand(rng, n), fx(rand(rng, n))
    m, v = rand(rng, ns, scale=0.1), np.abs(rand(rng, ns, scale=0.1))
    seeds = rng.integers(0, 2 ** 32, size=len(layout.tensors), dtype=np.uint32)
    lr, b1, b2, eps, wd, grad_scale, t = 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5, 3
    master = None if s.floatx == "fp32" else rand(rng, ns)       # bf16 with master weights, as -w 1
    params = fx(params)
    [launch] = launcher_launches(s, lambda cu, params, grads: cu.adamw_multi_tensor(
        params, master, grads, m, v, np.asarray(table), table_rows, blocks, seeds, lr, b1, b2, 1 - b1 ** t,
        1 - b2 ** t, eps, wd, grad_scale), params, grads)
    launch.read_write = (0, 3, 4) if master is None else (0, 1, 3, 4)
    if reference:
        w_p, w_m, w_v = f64(params), f64(m), f64(v)
        w_master = None if master is None else f64(master)
        for index, layer, w, st, part in layout.pieces:
            name = layout.tensors[index][1]
            g = f64(grads[w:w + part]) * grad_scale
            mi = b1 * w_m[st:st + part] + (1 - b1) * g
            vi = b2 * w_v[st:st + part] + (1 - b2) * g * g
            old = w_p[w:w + part] if master is None else w_master[st:st + part]
            decay = wd if name in tg.DECAYED_PARAMS else 0.0
            new = old - lr * (mi / (1 - b1 ** t) / (np.sqrt(vi / (1 - b2 ** t)) + eps) + decay * old)
            w_m[st:st + part], w_v[st:st + part], w_p[w:w + part] = mi, vi, new
            if master is not None:
                w_master[st:st + part] = new
        expression = "AdamW in float64 per piece (rank 1 of 2)"
        launch.outputs = [Output("params", params, w_p, expression, 1e-6, 1e-6),
                          Output("m", m, w_m, expression, 1e-7, 1e-6), Output("v", v, w_v, expression, 1e-8, 1e-5)]
        if master is not None:
            launch.outputs.append(Output("master", master, w_master, expression, 1e-6, 1e-6))
    return launch


def adamw_launches(s, rng, reference):
    n = s.n_params
    fx = floatx_values(s)
    params, grads = rand(rng, n), fx(rand(rng, n))
    m, v = rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))   # a later step: moments already nonzero
    lr, b1, b2, eps, wd, grad_scale, t = 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5, 3
    # fp32 runs without master weights (NULL); bf16 with them, as the trainer's default -w 1: the fp32
    # master copy is the weight before the step, the bf16 parameters its rounding
    master = None if s.floatx == "fp32" else params.copy()
    weights = params if master is None else master
    params = fx(params)
    [step] = launcher_launches(s, lambda cu, params, grads: cu.adamw_update(
        params, master, grads, m, v, n, n, 1, lr, b1, b2, 1 - b1 ** t, 1 - b2 ** t, eps, wd, grad_scale, 4242),
        params, grads)                                # one row of n: the row strides unused
    step.read_write = (0, 3, 4) if master is None else (0, 1, 3, 4)
    partials = np.full(launch_trainer().NORM_BLOCKS, np.nan, np.float32)
    [norm] = launcher_launches(s, lambda cu, grads: cu.global_norm_squared(partials, grads, n), grads)
    if reference:
        # AdamW as torch.optim.AdamW computes it, in float64 (the NumPy trainer's adamw_chunk is the
        # same step rearranged for speed)
        g = f64(grads) * grad_scale
        w_m = b1 * f64(m) + (1 - b1) * g
        w_v = b2 * f64(v) + (1 - b2) * g * g
        w = f64(weights)
        w_p = w - lr * (w_m / (1 - b1 ** t) / (np.sqrt(w_v / (1 - b2 ** t)) + eps) + wd * w)
        expression = "AdamW in float64 (torch.optim.AdamW)"
        step.outputs = [Output("params", params, w_p, expression, 1e-6, 1e-6),
                        Output("m", m, w_m, expression, 1e-7, 1e-6), Output("v", v, w_v, expression, 1e-8, 1e-5)]
        if master is not None:
            step.outputs.append(Output("master", master, w_p, expression, 1e-6, 1e-6))
        norm.outputs = [Output("sum(out)", lambda: f64(partials[:norm.grid]).sum(), np.sum(f64(grads) ** 2),
                               "sum(grads**2) in float64", 0.0, 1e-5)]   # the host adds the per-block partials
    # llm.c's init_from_master on a 2-row grid (two layers of n // 2): each row's floatX weights from its master
    half = n // 2
    source, rebuilt = rand(rng, n), np.zeros(n, np.float32)
    [rebuild] = launcher_launches(s, lambda cu, params: cu.init_from_master(params, source, half, half, 2, 4243),
                                  rebuilt)
    if reference:
        want = f64(source)
        want[2 * half:] = 0.0                         # an odd n's last element is in no row: left as it was
        rebuild.outputs = [Output("params", rebuilt, want, "the master weights (stochastically rounded)", 1e-7, 1e-7)]
    return [step, norm, rebuild, adamw_multi_tensor_launch(s, rng, reference)]


# The launch shapes (grids, block, shared memory) and argument lists live in train_gpt2_cuda.py's launchers
# alone: every check above calls them on a copy of the trainer whose kernel() records each launch instead of
# making it, and the recorded launches are what gets checked and timed (here, and by the kernel tests).

_trainer = []


def launch_trainer():
    """train_gpt2_cuda.py imported once with LLMC_EMULATE=1 under a name of its own (NumPy arrays in its
    launchers; nothing compiled), for the launch shapes of its launchers."""
    if not _trainer:
        from emulator import import_emulated
        module = import_emulated(os.path.join(REPO, "train_gpt2_cuda.py"), "check_kernel_trainer")
        _trainer.append(module)
    return _trainer[0]


def recorded_launches(call, widen=None, packed=None):
    """The launches a trainer launcher makes, as Launch rows (no outputs yet), in order, none of them run:
    call(cu) runs the launcher (with bf16 bits arrays in bf16); widen maps id(bits) to the float32 array the
    harness passes in their place. packed True or False: the launcher's packable() answers that, whatever
    the arrays (to reach the packed kernels or their per-element twins on one shape), or a function standing in
    for packable; None: its own rule. The launchers' GEMMs (cuBLAS's, not kernels of kernels/) are not run."""
    cu, made, widen = launch_trainer(), [], widen or {}

    def kernel(file, name, floatx=np.float32):
        def record(grid, block, args, shared_mem=0):
            grid = grid[0] if isinstance(grid, tuple) and len(grid) == 1 else grid
            block = block[0] if isinstance(block, tuple) and len(block) == 1 else block
            args = tuple(widen.get(id(a), a) if isinstance(a, np.ndarray) else a for a in args)
            made.append(Launch(name, grid, block, args, shared_mem))
        return record
    real = cu.kernel, cu.packable, cu.gemm
    cu.kernel, cu.gemm = kernel, lambda *args, **kw: None
    if packed is not None:
        cu.packable = packed if callable(packed) else lambda n, *arrays: packed
    try:
        call(cu)
    finally:
        cu.kernel, cu.packable, cu.gemm = real
    return made


def with_arrays(lc, *arrays):
    """A recorded Launch with its array arguments replaced, in order, by `arrays` (its scalars and shape kept)."""
    given = iter(arrays)
    args = tuple(next(given) if isinstance(a, np.ndarray) else a for a in lc.args)
    assert next(given, None) is None, f"{lc.kernel}: more arrays than the launch takes"
    return dataclasses.replace(lc, args=args)


def launcher_launches(s, call, *floatx, packed=None):
    """recorded_launches of call(cu, *floatx) on shape s's precision: in bf16 the launcher gets bf16 bits in
    place of the float32 floatX arrays (their dtype picks the build and the pack), and the rows the float32
    arrays back (check_file rounds them to bits at the launch, as every row's)."""
    if s.floatx == "fp32":
        return recorded_launches(lambda cu: call(cu, *floatx), packed=packed)
    bits = [f32_to_bf16(a).reshape(a.shape) for a in floatx]
    return recorded_launches(lambda cu: call(cu, *bits), {id(b): a for b, a in zip(bits, floatx)}, packed)


def run_launches(mod, launches, **kw):
    """Run Launch rows in order through mod.get_function (an Emulated or DeviceModule, or an emulator
    RawModule with kw such as order=, guard=): the tests' way to run what a launcher made."""
    for lc in launches:
        mod.get_function(lc.kernel)(lc.grid, lc.block, lc.args, shared_mem=lc.shared_mem, **kw)


# flash attention (kernels/flash_attention.cu, bf16 only)
FLASH_CHECK = (2, 37, 128, 2)                         # B, T, C, NH: hs 64, T a tail of 32- and 64-row tiles
FLASH_D12 = (16, 1024, 768, 12)                       # d12's attention at llm.c's B=16 (dev/bench_attention.py's)
FLASH_KERNELS = ("flash_attention_forward_kernel", "flash_attention_backward_dq_kernel",
                 "flash_attention_backward_dkdv_kernel")


def flash_reference(q, k, v, dout):
    """Causal attention in float64 on (B,NH,T,hs) arrays: out, lse, dq, dk, dv (the same layouts) and each
    result's scale, the largest of the same sums over |terms| (tests/test_flash_attention.py's): rounding
    each term by u moves a result by at most u of its scale."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    T = q.shape[2]
    s = np.where(np.tril(np.ones((T, T), bool)), scale * q @ k.swapaxes(-1, -2), -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    p = e / e.sum(-1, keepdims=True)
    dp = dout @ v.swapaxes(-1, -2)
    rowdot = (p * dp).sum(-1, keepdims=True)
    ds = p * (dp - rowdot)
    ads = p * (np.abs(dp) + np.abs(rowdot))
    want = {"out": p @ v, "lse": (m + np.log(e.sum(-1, keepdims=True)))[..., 0], "dq": scale * ds @ k,
            "dk": scale * ds.swapaxes(-1, -2) @ q, "dv": p.swapaxes(-1, -2) @ dout}
    mag = {"out": p @ np.abs(v), "dq": scale * ads @ np.abs(k), "dk": scale * ads.swapaxes(-1, -2) @ np.abs(q),
           "dv": p.swapaxes(-1, -2) @ np.abs(dout)}
    return want, {name: float(x.max()) for name, x in mag.items()}


def flash_launches(s, rng, reference):
    """The forward, then the backward's two kernels, on FLASH_CHECK (flash takes head sizes 64 and 128 only, so
    not ODD's 16), or FLASH_D12 when timed at d12's T. Tolerances as tests/test_flash_attention.py derives
    them: out, dq, dk, dv within 2u of their scale (one bf16 rounding of P or dS, one of the result), lse
    (fp32 throughout) within 1e-5. The backward reads the reference's out (rounded to bf16) and lse, so a
    wrong forward fails its own rows only. Each launch's model bytes: dev/perf_model.py's flash_tiles."""
    if s.floatx != "bf16":
        return []                                     # never launched in fp32 (check_file and time_file skip it)
    B, T, C, NH = FLASH_D12 if s.T == D12.T else FLASH_CHECK
    hs = C // NH
    fx = floatx_values(s)
    qkv, dout = fx(rand(rng, B, T, 3 * C)), fx(rand(rng, B, T, C))
    out, dqkv = np.full((B, T, C), np.nan, np.float32), np.full((B, T, 3 * C), np.nan, np.float32)
    lse = np.full((B, NH, T), np.nan, np.float32)
    cu = launch_trainer()
    scratch = np.full(cu.flash_scratch_size(B, T, C, NH), np.nan, np.float32)
    heads = lambda x: f64(x).reshape(B, T, -1, NH, hs).transpose(2, 0, 3, 1, 4)   # noqa: E731 (->, B, NH, T, hs)
    to_btc = lambda x: x.transpose(0, 2, 1, 3).reshape(B, T, C)                   # noqa: E731
    b_out, b_lse = out.copy(), lse.copy()             # the backward's inputs: the reference's, when checking
    if reference:
        q, k, v = heads(qkv)
        want, mag = flash_reference(q, k, v, heads(dout)[0])
        b_out[...] = fx(to_btc(want["out"]).astype(np.float32))
        b_lse[...] = want["lse"]
    # the launchers take bf16 bits (they check the dtype); the recorded launches get the float32 arrays back
    floatx = {"out": out, "qkv": qkv, "dqkv": dqkv, "dout": dout, "b_out": b_out}
    bits = {name: f32_to_bf16(a) for name, a in floatx.items()}
    widen = {id(bits[name]): a for name, a in floatx.items()}
    launches = recorded_launches(lambda cu: cu.flash_attention_forward(bits["out"], lse, bits["qkv"], B, T, C, NH),
                                 widen)
    launches += recorded_launches(lambda cu: cu.flash_attention_backward(bits["dqkv"], scratch, bits["dout"],
                                                                          bits["qkv"], bits["b_out"], b_lse,
                                                                          B, T, C, NH), widen)
    if [lc.kernel for lc in launches] != list(FLASH_KERNELS):
        raise RuntimeError(f"check_kernel.py: the flash launchers made {[lc.kernel for lc in launches]}, not "
                           f"{list(FLASH_KERNELS)}; update FLASH_KERNELS and flash_launches' outputs")
    import perf_model
    tiles = perf_model.flash_tiles(cu, T, hs)
    for lc in launches:
        read, written, _ = tiles[lc.kernel]
        lc.model_bytes = B * NH * (read + written)
    if reference:
        fwd, dq, dkdv = launches
        twin = f"causal attention f64, B={B} NH={NH} T={T} hs={hs}"   # flash's own shape, not ODD
        part = lambda i: lambda: f64(dqkv).reshape(B, T, 3, C)[:, :, i]   # noqa: E731 (dq, dk, dv of dqkv)
        fwd.outputs = [Output("out", out, to_btc(want["out"]), twin, 2 * BF16_ROUNDING * mag["out"]),
                       Output("lse", lse, want["lse"], twin, 1e-5)]
        dq.outputs = [Output("dq", part(0), to_btc(want["dq"]), twin, 2 * BF16_ROUNDING * mag["dq"])]
        dkdv.outputs = [Output(name, part(i), to_btc(want[name]), twin, 2 * BF16_ROUNDING * mag[name])
                        for i, name in ((1, "dk"), (2, "dv"))]
    return launches


LAUNCHES = {"encoder": encoder_launches, "layernorm": layernorm_launches, "matmul": matmul_launches,
            "attention": attention_launches, "gelu": gelu_launches, "residual": residual_launches,
            "classifier": classifier_launches, "adamw": adamw_launches, "flash_attention": flash_launches}
BF16_ONLY = {"flash_attention"}                        # files whose kernels have no fp32 variant


def kernel_files(kernel_dir=KERNEL_DIR):
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(kernel_dir, "*.cu")))


def kernels_in(code):
    return [name for name, _ in re.findall(KERNEL_RE, code)]


# ---------------------------------------------------------------------------------------------
# running them


def device_options(cupy, precision):
    """NVRTC's options on a GPU: in bf16 also the CUDA toolkit's include folder, where NVRTC finds cuda_bf16.h
    and flash's mma.h (searched as train_gpt2_cuda.nvrtc_options searches; a stand-in CuPy without
    get_cuda_path, as in the tests, gets the plain options)."""
    options = PRECISION_OPTIONS[precision]
    cuda_path = getattr(cupy.cuda, "get_cuda_path", None)
    if precision != "bf16" or cuda_path is None:
        return options
    for root in (os.environ.get("CUDA_PATH"), cuda_path(), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "include", "cuda_bf16.h")):
            return options + ("-I" + os.path.join(root, "include"),)
    return options


def load(file, backend, kernel_dir, order="forward", precision="fp32"):
    code = kernel_source(file, kernel_dir)
    if backend == "cupy":
        import cupy
        return code, DeviceModule(cupy, cupy.RawModule, code, device_options(cupy, precision))
    from emulator import RawModule
    return code, Emulated(RawModule(code=code, options=PRECISION_OPTIONS[precision]), order)


def floatx_args(code, kernel, args, precision):
    """The launch's arguments as the kernel takes them. In bf16 each float32 array behind a floatX*
    parameter goes in as a uint16 array of its bf16 bits (rounded to nearest even; an array passed
    twice stays one array). Returns (args, back): back pairs each float32 array the kernel may write
    with its bits, for copy_back to widen into after the launch."""
    if precision == "fp32":
        return tuple(args), []
    params = dict(re.findall(KERNEL_RE, code))[kernel].split(",")
    bits, back, out = {}, [], []
    for param, a in zip(params, args):
        if isinstance(a, np.ndarray) and "floatX" in param:
            if id(a) not in bits:
                bits[id(a)] = f32_to_bf16(a)
                if not param.strip().startswith("const"):
                    back.append((a, bits[id(a)]))
            a = bits[id(a)]
        out.append(a)
    return tuple(out), back


def copy_back(back):
    for a, bits in back:
        a[...] = bf16_to_f32(bits)


# bf16's tolerances. bf16 keeps 8 significant bits (7 stored), so round to nearest (a floatX store) is
# within 2^-8 |x| of the float x it rounds (the unit roundoff), and stochastic rounding, which may take
# either neighbour, within one spacing, 2^-7 |x|. A kernel computes in float from floatX inputs the
# references also read, so its float result y is within the fp32 tolerance e = atol + rtol |want| of
# want, and its output within e + r |y| <= e (1 + r) + r |want|: the fp32 tolerance, widened by r.
BF16_ROUNDING = 2.0 ** -8
STOCHASTIC_OUTPUTS = {("adamw_kernel", "params"), ("adamw_multi_tensor_kernel", "params"), ("init_from_master_kernel", "params"),
                      ("encoder_backward_wte_kernel", "dwte"),
                      ("encoder_backward_wpe_kernel", "dwpe"),
                      ("encoder_backward_wpe_x128_kernel", "dwpe")}   # common.cuh's stochastic_round


def tolerance(code, kernel, output, precision):
    """(atol, rtol) of one output: the fp32 ones, widened in bf16 where the kernel stores it as floatX.
    An exact fp32 comparison (a permute, which moves bits) stays exact; the flash rows' tolerances count
    their bf16 roundings already (flash_launches)."""
    atol, rtol = output.atol, output.rtol
    params = [p.strip() for p in dict(re.findall(KERNEL_RE, code))[kernel].split(",")]
    floatx = any("floatX" in p and p.split()[-1] == output.name for p in params)
    if precision == "fp32" or not floatx or (atol == 0 and rtol == 0) or kernel in FLASH_KERNELS:
        return atol, rtol
    r = 2 * BF16_ROUNDING if (kernel, output.name) in STOCHASTIC_OUTPUTS else BF16_ROUNDING
    return atol * (1 + r), rtol * (1 + r) + r


def check_file(file, backend, kernel_dir, order="forward", seed=0, precision="fp32"):
    """Run every kernel of one file once on ODD and compare; print one row per output.
    Returns the rows (file, kernel, output, max abs err, worst/tol, ok); none for a bf16-only file in fp32."""
    if file in BF16_ONLY and precision != "bf16":
        print(f"skipped: kernels/{file}.cu is bf16-only (no fp32 variant); check it with --precision bf16")
        return []
    code, mod = load(file, backend, kernel_dir, order, precision)
    shape = dataclasses.replace(ODD, floatx=precision)
    launches = LAUNCHES[file](shape, np.random.default_rng(seed), reference=True) if file in LAUNCHES else []
    rows = []
    for lc in launches:
        args, back = floatx_args(code, lc.kernel, lc.args, precision)
        mod.get_function(lc.kernel)(lc.grid, lc.block, args, shared_mem=lc.shared_mem)
        copy_back(back)
        for o in lc.outputs:
            got = o.got() if callable(o.got) else o.got
            atol, rtol = tolerance(code, lc.kernel, o, precision)
            err, ratio, nbad, _ = max_error(got, o.want, atol, rtol)
            tol = " + ".join([f"{atol:.0e}"] * bool(atol) + [f"{rtol:.0e}|want|"] * bool(rtol)) or "0 (exact)"
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


def time_file(file, kernel_dir, repeats, seed=0, shape=D12, precision="fp32", bandwidth=None):
    """Time every kernel of one file at `shape` (d12's) on the GPU with CUDA events; print and return
    (file, kernel, ms, GB/s) rows. bandwidth (bytes/s, modeled_bandwidth's): each row also prints the
    traffic model's time, the bytes over that bandwidth (dev/perf_model.py's per-launch rule without its
    launch cost: the timed launches run back to back), and the measured time over it."""
    if file in BF16_ONLY and precision != "bf16":
        print(f"{file}: not timed, bf16-only")
        return []
    import cupy
    code = kernel_source(file, kernel_dir)
    mod = cupy.RawModule(code=code, options=device_options(cupy, precision))
    rows = []
    for lc in LAUNCHES[file](dataclasses.replace(shape, floatx=precision), np.random.default_rng(seed),
                             reference=False):
        fn = mod.get_function(lc.kernel)
        lc.args, _ = floatx_args(code, lc.kernel, lc.args, precision)   # bf16: 2-byte arrays, counted as such
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
        modeled = lc.model_bytes or nbytes            # flash: its tiles' traffic, not its arguments once
        model = f"{modeled / bandwidth * 1e3:10.4f} {ms / (modeled / bandwidth * 1e3):8.2f}x" if bandwidth else ""
        print(f"{lc.kernel:<40} {'x'.join(map(str, grid)):>9} x {lc.block:<5} {ms:10.4f} {gbs:10.1f} {model}")
        rows.append((file, lc.kernel, ms, gbs))
        del on_device, args
    return rows


def modeled_bandwidth(name):
    """(label, bytes/s) of the GPU called `name` (as CUDA reports it) in dev/perf_model.py's table: the exact
    name, else the first of its family (H100, H200, A100), else None (no model column)."""
    import perf_model
    for label, device, bandwidth in perf_model.GPUS:
        if device == name:
            return label, bandwidth
    for label, device, bandwidth in perf_model.GPUS:
        if label.split("-")[0] in name:
            return label, bandwidth
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check the kernels of kernels/<file>.cu against their NumPy "
                                                 "twins; on a GPU, also time them at d12 shapes.")
    parser.add_argument("file", help=f"a kernel file without .cu ({', '.join(kernel_files())}) or 'all'")
    parser.add_argument("--backend", choices=["auto", "emulator", "cupy"], default="auto",
                        help="auto: cupy when it sees a GPU, else the emulator")
    parser.add_argument("--kernel_dir", default=KERNEL_DIR, help="the folder of .cu files (default: kernels/)")
    parser.add_argument("--order", default="forward", choices=["forward", "reverse", "warps"],
                        help="the emulator's thread order (see emulator/README.md)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: build with -DENABLE_BF16 (floatX = __nv_bfloat16) and compare with bf16's tolerances")
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
          f"(elementwise N = B*T*4C or B*T*C, AdamW over {s.n_params} floats), float64 NumPy twins, "
          f"floatX = {'bf16 (-DENABLE_BF16)' if args.precision == 'bf16' else 'float'}")
    rows = []
    for f in files:
        print(f"\n== kernels/{f}.cu")
        print(f"{'kernel':<40} {'output':<13} {'compared with':<42} {'max abs err':>11}  {'tolerance':<20} "
              f"{'worst/tol':>9}  result")
        rows += check_file(f, backend, args.kernel_dir, args.order, precision=args.precision)
    failed = [r for r in rows if not r[5]]
    kernels = {(r[0], r[1]) for r in rows}
    skipped = [f for f in files if f in BF16_ONLY and args.precision != "bf16"]
    print(f"\n{len(kernels)} kernels, {len(rows)} outputs: "
          + ("all within tolerance" if not failed else
             f"{len(failed)} NOT OK: " + ", ".join(f"{r[1]}.{r[2]}" for r in failed))
          + "".join(f" ({f}.cu skipped: bf16-only)" for f in skipped))

    if backend == "cupy" and args.time:
        s = D12
        fb, ft, fc, fnh = FLASH_D12
        print(f"\ntiming on the GPU at d12 shapes: B={s.B} T={s.T} C={s.C} NH={s.NH} Vp={s.Vp}, AdamW over "
              f"{s.n_params} floats, flash attention (bf16) at B={fb} NH={fnh} hs={fc // fnh} T={ft}; mean of {args.repeats} launches after 2 warm-up (CUDA events); GB/s counts "
              f"each array argument once (twice if read and written)")
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        model = modeled_bandwidth(name.decode() if isinstance(name, bytes) else str(name))
        print("model: the bytes (flash: dev/perf_model.py's flash_tiles, K and V read once per query tile) over " + (f"{model[0]}'s {model[1] / 1e12:g} TB/s (dev/perf_model.py's table)"
                                          if model else "no bandwidth: this GPU is not in dev/perf_model.py's table"))
        print(f"{'kernel':<40} {'grid':>9} x {'block':<5} {'ms':>10} {'GB/s':>10}"
              + (f" {'model ms':>10} {'/ model':>9}" if model else ""))
        for f in files:
            if f in LAUNCHES:
                time_file(f, args.kernel_dir, args.repeats, precision=args.precision,
                          bandwidth=model[1] if model else None)
    elif args.time:
        print("\nnothing timed: the emulator's times say nothing about a GPU's")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
