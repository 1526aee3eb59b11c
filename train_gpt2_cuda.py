"""
GPT-2 training on NVIDIA GPUs, a port of llm.c's train_gpt2.cu (its mainline) driven from Python by CuPy.

It is train_gpt2.py (the NumPy trainer) with the arithmetic moved to the GPU: the same functions,
flags, files and log lines, and the host code (file formats, data loader, tokenizer, sampler, CLI,
the training loop) imported from train_gpt2.py. What changes is where the numbers live and who computes them:
  - parameters, gradients, AdamW's m and v and the activations are flat buffers in GPU memory,
    allocated once, with named views into them (llm.c's cudaMalloc + pointer tables);
  - every layer except the matrix products is a raw CUDA kernel from kernels/*.cu, compiled at
    first use with cupy.RawModule (NVRTC) and launched with an explicit grid;
  - the matrix products are cuBLAS calls, strided-batched for attention, as in llm.c; with -ge 1|2 (llm.c's
    gelu_fusion) the fc layer's GEMMs take GELU (and its gradient) in cuBLASLt epilogues, through ctypes.
Precision (-p), llm.c's mainline recipe by default: bf16 parameters, gradients and activations, with
LayerNorm's statistics, the losses, AdamW's m and v and an fp32 copy of the weights (master weights, -w 1)
in fp32, every sum accumulated in fp32, and the bf16 weights rounded stochastically after each update.
-p fp32 is llm.c's train_gpt2_fp32.cu: fp32 everywhere, TF32 tensor cores for the GEMMs (-f 1).
The kernels are the same text for both: common.cuh's floatX is __nv_bfloat16 or float.
Several GPUs, and machines: data parallel over NCCL (-z 0 all-reduce, -z 1 ZeRO-1), started by torchrun
or mpirun (llmc/collectives.py).
Read it side by side with train_gpt2.py: each launcher has its NumPy twin's name and llm.c's
argument order, and gpt2_forward / gpt2_backward call them in the same order.

  pip install cupy-cuda12x
  python train_gpt2_cuda.py -e gpt2_d12.bin         # bf16 on SM >= 80 (fp32 before), B=4, T=1024, lr 3e-4
  python train_gpt2_cuda.py -e gpt2_d12.bin -p fp32 -f 0      # full fp32 matmuls
  torchrun --standalone --nproc_per_node 8 train_gpt2_cuda.py -e gpt2_d12.bin -z 1   # 8 GPUs, ZeRO-1
  LLMC_EMULATE=1 python train_gpt2_cuda.py ...      # no GPU: NumPy + the same kernels on the CPU (tiny models)
"""

import ctypes
import math
from dataclasses import dataclass
import os
import sys
import time

import numpy as np

import train_gpt2 as host  # the model's host side (views, the seeded init) and the training loop
from train_gpt2 import grad_clip_scale  # noqa: F401  (test_gpt2.py clips with its trainer's own)
from llmc import actstats
from llmc.cli import parse_args
from llmc.collectives import ShardLayout
from llmc.cuda_common import ceil_div, kernel_source
from llmc.formats import bf16_to_f32, f32_to_bf16, read_header, read_model_file, MODEL_MAGIC
from llmc.gpuinfo import GpuLog
from llmc.model import num_parameters, param_shapes
from llmc.run import DeviceSettings, launch
from llmc.sampler import random_u32
from llmc.utils import ConfigError

# ----------------------------------------------------------------------------
# the switch: CuPy on a GPU, or (LLMC_EMULATE=1) NumPy with the CPU emulator of the kernels.
# Everything below this section is the same code in both modes: `xp` is the array module,
# RawModule compiles kernels/*.cu, gemm is cuBLAS (or NumPy's matmul), Event times the GPU.

EMULATE = os.environ.get("LLMC_EMULATE", "0") == "1"
NO_GPU = None  # one line saying why the GPU path cannot run here, or None
# bf16 lives in uint16 arrays of its bit patterns, on the device and on the host alike (CuPy needs no
# bfloat16 dtype for it; llmc.formats' bf16_to_f32 / f32_to_bf16 convert); fp32 in float32 arrays
BF16 = np.dtype(np.uint16)

if EMULATE:
    import numpy as xp
    from emulator import RawModule
    NULL = None  # a null pointer kernel argument

    GELU_SCALING_FACTOR = np.float32(math.sqrt(2.0 / math.pi))

    def gelu_value(x):
        # kernels/gelu.cu's gelu_value in float32: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = np.float32(0.044715) * x * x * x
        return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(GELU_SCALING_FACTOR * (x + cube)))

    def gelu_grad(x):
        # kernels/gelu.cu's gelu_grad in float32: d gelu(x) / dx
        cube = np.float32(0.044715) * x * x * x
        tanh_arg = GELU_SCALING_FACTOR * (x + cube)
        sech = np.float32(1.0) / (np.cosh(tanh_arg) * np.cosh(tanh_arg))
        return (np.float32(0.5) * (np.float32(1.0) + np.tanh(tanh_arg)) + x * np.float32(0.5) * sech
                * GELU_SCALING_FACTOR * (np.float32(1.0) + np.float32(3.0 * 0.044715) * x * x))

    def gemm(out, a, b, transpose_a=False, transpose_b=False, accumulate=False, epilogue=None, bias=None, aux=None):
        """out (batch, m, n) (+)= op(a) @ op(b), with NumPy's matmul standing in for cuBLAS.
        bf16 arrays (uint16 bits) as cuBLAS's bf16 GEMM with fp32 compute: the bf16 inputs widened
        exactly, products summed in fp32 (NumPy's sgemm), beta*out added in fp32, one rounding to
        bf16 (to nearest even) at the store.
        epilogue: cuBLASLt's (-ge; cublaslt_gemm on a GPU), out (m, n) written, not accumulated. Everything
        between the product and the store is fp32, and each stored tensor is rounded to floatX once:
          "GELU_AUX_BIAS": pre = product + bias (n,) in fp32; aux (m, n) = pre, rounded; out = gelu(pre),
                           rounded (GELU of the unrounded sum: -ge 0's gelu_forward reads the rounded aux)
          "DGELU":         out = product * gelu'(aux) in fp32 (aux as stored, widened), rounded once
                           (-ge 0 rounds the product into dinp, then gelu_backward rounds again)
          "BIAS":          out = product + bias (n,) in fp32, rounded once: -ge 0's bits (bf16: the bias copied
                           into out, then the beta = 1 GEMM; fp32: the GEMM, then add_bias_kernel's float sum)"""
        if out.dtype == BF16:
            a, b = bf16_to_f32(a), bf16_to_f32(b)
        a = a.swapaxes(-1, -2) if transpose_a else a
        b = b.swapaxes(-1, -2) if transpose_b else b
        if epilogue is not None:
            assert epilogue in ("BIAS", "GELU_AUX_BIAS", "DGELU") and not accumulate and out.ndim == 2
            widen = bf16_to_f32 if out.dtype == BF16 else np.asarray
            store = f32_to_bf16 if out.dtype == BF16 else np.asarray
            product = np.matmul(a, b)
            if epilogue == "BIAS":
                out[...] = store(product + widen(bias))
            elif epilogue == "GELU_AUX_BIAS":
                pre = product + widen(bias)
                aux[...] = store(pre)
                out[...] = store(gelu_value(pre))
            else:
                out[...] = store(product * gelu_grad(widen(aux)))
            return
        if out.dtype == BF16:
            product = np.matmul(a, b)
            if accumulate:
                product += bf16_to_f32(out)
            out[...] = f32_to_bf16(product)
        elif accumulate:
            out += np.matmul(a, b)
        else:
            np.matmul(a, b, out=out)

    def set_tf32(enabled):
        return False  # NumPy has no TF32: the emulator always computes in full fp32

    class Event:
        """A stand-in for cupy.cuda.Event: NumPy finishes every call before returning."""
        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

    def elapsed_ms(start, end):
        return (end.t - start.t) * 1000.0

    def device_name():
        return "CPU (LLMC_EMULATE=1: NumPy + the kernel emulator, emulator/)"

    def to_numpy(x):
        """Device array -> NumPy array (here they already are); bf16 bits widened exactly to float32."""
        x = np.asarray(x)
        return bf16_to_f32(x) if x.dtype == BF16 else x
else:
    try:
        import cupy as xp
        if xp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CUDA reports 0 devices")
        from cupy_backends.cuda.libs import cublas
    except ImportError as e:
        xp = None
        if e.name == "cupy":
            NO_GPU = ("train_gpt2_cuda.py: CuPy is not installed (pip install cupy-cuda12x, with an NVIDIA GPU); "
                      "without a GPU run the NumPy trainer: python train_gpt2.py")
        else:  # CuPy is there but one of its CUDA libraries is not
            NO_GPU = (f"train_gpt2_cuda.py: CuPy does not load ({str(e).strip().splitlines()[0]}); check that "
                      "the cupy-cudaXXx package matches your CUDA driver, or run python train_gpt2.py")
    except Exception as e:  # cupy is there but no driver / no device
        xp = None
        NO_GPU = (f"train_gpt2_cuda.py: no CUDA GPU found ({type(e).__name__}: {str(e).strip()}); "
                  "run the NumPy trainer instead: python train_gpt2.py")

    if xp is not None:
        RawModule = xp.RawModule
        NULL = np.uint64(0)  # a null pointer argument (CuPy 13 turns None into 0xffffffff, cupy issue #9046)
        Event = xp.cuda.Event
        elapsed_ms = xp.cuda.get_elapsed_time
        # the host scalars cuBLAS reads for alpha and beta, made once: two float32 arrays that live as
        # long as the module, and their addresses (a .ctypes.data per call built a new object per GEMM)
        _ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)
        _ONE_PTR, _ZERO_PTR = _ONE.ctypes.data, _ZERO.ctypes.data
        # cublasGemmStridedBatchedEx's enums (cuda's library_types.h and cublas_api.h), as CuPy names them
        CUDA_R_16BF = 14
        CUBLAS_COMPUTE_32F = getattr(cublas, "CUBLAS_COMPUTE_32F", 68)
        CUBLAS_GEMM_DEFAULT = getattr(cublas, "CUBLAS_GEMM_DEFAULT", -1)

        def gemm(out, a, b, transpose_a=False, transpose_b=False, accumulate=False, epilogue=None, bias=None,
                 aux=None):
            """out (batch, m, n) (+)= op(a) @ op(b) for C-contiguous float32 arrays of 2 or 3 dims
            (a 2-D operand is shared by the whole batch), as one cublasSgemmStridedBatched call.
            cuBLAS is column-major, and a row-major (r, c) array is a column-major (c, r) matrix, so
            we ask it for out^T = op(b)^T @ op(a)^T, which needs no copy and no transpose.
            (cupy.matmul would do the same products, but it first copies a transposed batched operand
            such as att^T (B,NH,T,T) into a contiguous array, and it cannot accumulate: no beta.)
            epilogue, bias, aux: a cuBLASLt epilogue (-ge), as the emulator's gemm describes them:
            one cublasLtMatmul call instead (cublaslt_gemm below)."""
            if epilogue is not None:
                cublaslt_gemm(out, a, b, transpose_a, transpose_b, epilogue, bias, aux)
                return
            m, n = out.shape[-2:]
            k = a.shape[-2] if transpose_a else a.shape[-1]
            batch = out.size // (m * n)
            stride = lambda x: x.shape[-2] * x.shape[-1] if x.ndim == 3 else 0  # noqa: E731
            for x in (out, a, b):
                assert x.flags.c_contiguous and x.dtype == out.dtype
            beta = _ONE_PTR if accumulate else _ZERO_PTR
            op_b = cublas.CUBLAS_OP_T if transpose_b else cublas.CUBLAS_OP_N
            op_a = cublas.CUBLAS_OP_T if transpose_a else cublas.CUBLAS_OP_N
            handle = xp.cuda.device.get_cublas_handle()
            if out.dtype == BF16:   # bf16 in and out, fp32 compute (the tensor cores' bf16 path)
                cublas.gemmStridedBatchedEx(
                    handle, op_b, op_a, n, m, k, _ONE_PTR,
                    b.data.ptr, CUDA_R_16BF, b.shape[-1], stride(b),
                    a.data.ptr, CUDA_R_16BF, a.shape[-1], stride(a),
                    beta, out.data.ptr, CUDA_R_16BF, n, stride(out), batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
            else:
                cublas.sgemmStridedBatched(
                    handle, op_b, op_a, n, m, k, _ONE_PTR,
                    b.data.ptr, b.shape[-1], stride(b),
                    a.data.ptr, a.shape[-1], stride(a),
                    beta, out.data.ptr, n, stride(out), batch)

        def set_tf32(enabled):
            """TF32 tensor cores for the float32 GEMMs, as llm.c's fp32 trainer does on sm >= 80
            (torch.set_float32_matmul_precision('high')). Our GEMMs are sgemm calls, which follow the
            cuBLAS handle's math mode, so that is the switch: cublasSetMathMode(TF32_TENSOR_OP_MATH).
            CuPy's own matmul/dot pick their compute type separately (CUPY_TF32=1 in the environment,
            read once at the first float32 matmul, or _routines_linalg.set_compute_type), so we set
            that too, for any cupy.matmul a reader adds; that function is private, and a CuPy without
            it keeps the math mode alone (our GEMMs need nothing more). On GPUs before Ampere this is a no-op."""
            tf32 = bool(enabled) and int(xp.cuda.Device().compute_capability) >= 80
            mode = getattr(cublas, "CUBLAS_TF32_TENSOR_OP_MATH", 3) if tf32 else cublas.CUBLAS_DEFAULT_MATH
            cublas.setMathMode(xp.cuda.device.get_cublas_handle(), mode)
            try:
                from cupy._core import _routines_linalg as linalg
                linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_DEFAULT)
            except (ImportError, AttributeError):
                pass  # a CuPy without the private switch: cupy.matmul follows CUPY_TF32 only
            return tf32

        def device_name():
            props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
            name = props["name"]
            return name.decode() if isinstance(name, bytes) else str(name)

        def to_numpy(x):
            """Device array -> NumPy array (a copy to the host); bf16 bits widened exactly to float32."""
            x = xp.asnumpy(x)
            return bf16_to_f32(x) if x.dtype == BF16 else x
    else:
        def to_numpy(x):
            return np.asarray(x)


def require_gpu():
    """Stop with one line if neither a GPU with CuPy nor the emulator is available."""
    if NO_GPU is not None:
        raise SystemExit(NO_GPU)


# ----------------------------------------------------------------------------
# cuBLASLt (GPU only, -ge 1|2): llm.c's matmul_cublaslt for the two GEMMs that carry GELU, through ctypes into
# the libcublasLt that CuPy's cuBLAS has loaded already (no extra package). One handle and a 32 MiB workspace,
# made at the first fused GEMM; descriptors made and destroyed per call, as llm.c does. The emulator's gemm
# stands in for all of it on the CPU.

CUBLASLT_WORKSPACE_BYTES = 32 << 20                   # llm.c's cublaslt_workspace_size
# cublasLt.h's enums (the values are the ABI: they do not change between CUDA 11 and 13)
CUDA_R_32F_, CUDA_R_16BF_ = 0, 14                     # cudaDataType_t (library_types.h)
COMPUTE_32F, COMPUTE_32F_FAST_TF32 = 68, 77           # cublasComputeType_t
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8        # cublasLtMatmulDescAttributes_t
DESC_EPILOGUE_AUX_POINTER, DESC_EPILOGUE_AUX_LD, DESC_EPILOGUE_AUX_DATA_TYPE, DESC_BIAS_DATA_TYPE = 11, 12, 22, 26
LAYOUT_BATCH_COUNT, LAYOUT_STRIDED_BATCH_OFFSET = 5, 6                          # cublasLtMatrixLayoutAttribute_t
PREF_MAX_WORKSPACE_BYTES = 1                                                    # cublasLtMatmulPreferenceAttributes_t
EPILOGUES = {"BIAS": 4, "GELU_AUX_BIAS": 164, "DGELU": 192}   # cublasLtEpilogue_t (the -ge uses; BGRADB 512 not)


class CublasLtHeuristic(ctypes.Structure):
    # cublasLtMatmulHeuristicResult_t: the algorithm (cublasLtMatmulAlgo_t, 8 uint64), its workspace, status
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_p, _i, _u64, _i64, _sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
CUBLASLT_FUNCTIONS = {  # name: argument types; every one returns a cublasStatus_t (0 = success)
    "cublasLtCreate": (_p,),
    "cublasLtMatmulDescCreate": (_p, _i, _i),
    "cublasLtMatmulDescSetAttribute": (_p, _i, _p, _sz),
    "cublasLtMatmulDescDestroy": (_p,),
    "cublasLtMatrixLayoutCreate": (_p, _i, _u64, _u64, _i64),
    "cublasLtMatrixLayoutSetAttribute": (_p, _i, _p, _sz),
    "cublasLtMatrixLayoutDestroy": (_p,),
    "cublasLtMatmulPreferenceCreate": (_p,),
    "cublasLtMatmulPreferenceSetAttribute": (_p, _i, _p, _sz),
    "cublasLtMatmulPreferenceDestroy": (_p,),
    "cublasLtMatmulAlgoGetHeuristic": (_p, _p, _p, _p, _p, _p, _p, _i, _p, _p),
    "cublasLtMatmul": (_p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _sz, _p),
}


def cublaslt_library():
    """The loaded libcublasLt (a ctypes.CDLL): the one already in this process (CuPy's libcublas needs it),
    else by its usual names. Raises OSError with what was tried. (Tests put a table of stand-ins here.)"""
    tried = []
    try:
        with open("/proc/self/maps") as maps:
            loaded = sorted({line.split()[-1] for line in maps if "libcublasLt.so" in line})
    except OSError:
        loaded = []
    for name in loaded + ["libcublasLt.so.12", "libcublasLt.so.13", "libcublasLt.so.11", "libcublasLt.so"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            tried.append(name)
    raise OSError(f"no libcublasLt found (tried {', '.join(tried)})")


class CublasLt:
    """The entry points of CUBLASLT_FUNCTIONS bound to a library (their addresses called through prototypes,
    so a table of Python stand-ins binds the same way), one handle, one workspace."""

    def __init__(self, library):
        self.f = {}
        for name, argtypes in CUBLASLT_FUNCTIONS.items():
            address = ctypes.cast(getattr(library, name), ctypes.c_void_p).value
            self.f[name] = ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(address)
        self.handle = ctypes.c_void_p()
        self.call("cublasLtCreate", ctypes.byref(self.handle))
        self.workspace = xp.zeros(CUBLASLT_WORKSPACE_BYTES, dtype=np.uint8)

    def call(self, name, *args):
        status = self.f[name](*args)
        if status != 0:
            raise RuntimeError(f"{name} failed: cublasStatus_t {status}")

    def set(self, setter, obj, attribute, value):
        """Set one attribute from a ctypes value (its size is the one cuBLASLt expects for that attribute)."""
        self.call(setter, obj, attribute, ctypes.byref(value), ctypes.sizeof(value))


_cublaslt = None   # the CublasLt of this process, made at the first fused GEMM (cublaslt_gemm)


def cublaslt_available():
    """None if cuBLASLt can be used here, else one line saying why (device_setup then runs -ge 0)."""
    global _cublaslt
    if EMULATE or _cublaslt is not None:
        return None
    try:
        _cublaslt = CublasLt(cublaslt_library())
    except (OSError, AttributeError, RuntimeError) as e:
        return str(e).strip().splitlines()[0]
    return None


def cublaslt_gemm(out, a, b, transpose_a, transpose_b, epilogue, bias=None, aux=None):
    """gemm's epilogue path on a GPU: out (m, n) = op(a) @ op(b) with the epilogue, as one cublasLtMatmul.
    As cuBLAS's gemm, the row-major operands are column-major transposes, so cuBLASLt computes
    out^T = op(b)^T @ op(a)^T: its A is our b, its B our a, its (rows, cols) of D our (n, m). So the bias of
    GELU_AUX_BIAS (one per row of its D) is one per column of out, the aux matrix (pre-GELU) has out's shape
    and leading dimension n.
    floatX operands, fp32 compute (TF32 with -p fp32 -f 1, as the cuBLAS GEMMs), alpha 1, beta 0."""
    if cublaslt_available() is not None:
        raise RuntimeError("cublaslt_gemm: cuBLASLt is not available (device_setup runs -ge 0 then)")
    lt, f = _cublaslt, ctypes
    m, n = out.shape[-2:]
    k = a.shape[-2] if transpose_a else a.shape[-1]
    batch = out.size // (m * n)
    for x in (out, a, b) + tuple(x for x in (bias, aux) if x is not None):
        assert x.flags.c_contiguous and x.dtype == out.dtype
        if x.data.ptr % 16:    # llm.c's matmul_cublaslt asks the same ("All cuBLASLt pointers must be aligned!")
            raise ConfigError("-ge 1 and 2: cuBLASLt needs its operands on 16-byte boundaries, and at this shape "
                              "one of the activation buffers is not (odd sizes before it): run -ge 0")
    dtype = CUDA_R_16BF_ if out.dtype == BF16 else CUDA_R_32F_
    # TF32 as the cuBLAS GEMMs: set_tf32 (-f) switches the cuBLAS handle's math mode, read back here
    tf32 = cublas.getMathMode(xp.cuda.device.get_cublas_handle()) == getattr(cublas, "CUBLAS_TF32_TENSOR_OP_MATH", 3)
    compute = COMPUTE_32F_FAST_TF32 if tf32 else COMPUTE_32F
    desc, pref = f.c_void_p(), f.c_void_p()
    layouts = [f.c_void_p() for _ in range(4)]                          # A, B, C, D
    lt.call("cublasLtMatmulDescCreate", f.byref(desc), compute, CUDA_R_32F_)
    try:
        lt.set("cublasLtMatmulDescSetAttribute", desc, DESC_TRANSA, f.c_int(int(transpose_b)))   # CUBLAS_OP_T = 1
        lt.set("cublasLtMatmulDescSetAttribute", desc, DESC_TRANSB, f.c_int(int(transpose_a)))
        lt.set("cublasLtMatmulDescSetAttribute", desc, DESC_EPILOGUE, f.c_int(EPILOGUES[epilogue]))
        if bias is not None:
            lt.set("cublasLtMatmulDescSetAttribute", desc, DESC_BIAS_POINTER, f.c_void_p(bias.data.ptr))
            lt.set("cublasLtMatmulDescSetAttribute", desc, DESC_BIAS_DATA_TYPE, f.c_int(dtype))
        if aux is not None:
            assert aux.shape == out.shape
            lt.set("cublasLtMatmulDescSetAttribute", desc, DESC_EPILOGUE_AUX_POINTER, f.c_void_p(aux.data.ptr))
            lt.set("cublasLtMatmulDescSetAttribute", desc, DESC_EPILOGUE_AUX_LD, f.c_int64(n))
            lt.set("cublasLtMatmulDescSetAttribute", desc, DESC_EPILOGUE_AUX_DATA_TYPE, f.c_int(dtype))
        stride = lambda x: x.shape[-2] * x.shape[-1] if x.ndim == 3 else 0  # noqa: E731
        # (rows, cols, ld) of each column-major matrix: a row-major (r, c) array is (c, r) with ld c
        for layout, x, (rows, cols) in zip(layouts, (b, a, out, out), ((b.shape[-1], b.shape[-2]),
                                           (a.shape[-1], a.shape[-2]), (n, m), (n, m))):
            lt.call("cublasLtMatrixLayoutCreate", f.byref(layout), dtype, rows, cols, rows)
            if batch > 1:
                lt.set("cublasLtMatrixLayoutSetAttribute", layout, LAYOUT_BATCH_COUNT, f.c_int(batch))
                lt.set("cublasLtMatrixLayoutSetAttribute", layout, LAYOUT_STRIDED_BATCH_OFFSET, f.c_int64(stride(x)))
        lt.call("cublasLtMatmulPreferenceCreate", f.byref(pref))
        lt.set("cublasLtMatmulPreferenceSetAttribute", pref, PREF_MAX_WORKSPACE_BYTES,
               f.c_size_t(CUBLASLT_WORKSPACE_BYTES))
        heuristic, found = CublasLtHeuristic(), f.c_int(0)
        lt.call("cublasLtMatmulAlgoGetHeuristic", lt.handle, desc, *layouts, pref, 1, f.byref(heuristic),
                f.byref(found))
        if found.value == 0:
            raise RuntimeError(f"cuBLASLt has no algorithm for {epilogue}: m={m} n={n} k={k} batch={batch}; "
                               "run -ge 0")
        alpha, beta = f.c_float(1.0), f.c_float(0.0)
        lt.call("cublasLtMatmul", lt.handle, desc, f.byref(alpha), b.data.ptr, layouts[0], a.data.ptr, layouts[1],
                f.byref(beta), out.data.ptr, layouts[2], out.data.ptr, layouts[3], f.byref(heuristic, 0),
                lt.workspace.data.ptr, CUBLASLT_WORKSPACE_BYTES, xp.cuda.get_current_stream().ptr)
    finally:
        if pref.value:
            lt.call("cublasLtMatmulPreferenceDestroy", pref)
        for layout in layouts:
            if layout.value:
                lt.call("cublasLtMatrixLayoutDestroy", layout)
        lt.call("cublasLtMatmulDescDestroy", desc)


# ----------------------------------------------------------------------------
# kernels: each kernels/<file>.cu is compiled once, at its first launch

_modules, _functions = {}, {}


def nvrtc_options(bf16):
    """The compile options: C++17, and for bf16 -DENABLE_BF16 (common.cuh's floatX) plus, on a GPU,
    the CUDA toolkit's include folder, where NVRTC finds cuda_bf16.h (CuPy's own search covers its
    elementwise kernels, not necessarily a RawModule)."""
    options = ("--std=c++17",)
    if not bf16:
        return options
    options += ("-DENABLE_BF16",)
    if not EMULATE:
        for root in (os.environ.get("CUDA_PATH"), xp.cuda.get_cuda_path(), "/usr/local/cuda"):
            if root and os.path.exists(os.path.join(root, "include", "cuda_bf16.h")):
                return options + ("-I" + os.path.join(root, "include"),)
    return options


def kernel(file, name, floatx=np.float32):
    """The __global__ function `name` of kernels/<file>.cu, compiled on first use for floatX = floatx:
    float32, or BF16 (compiled with -DENABLE_BF16). The text compiled is kernel_source(file)
    (llmc/cuda_common.py): <file>.cu with common.cuh pasted in for its #include."""
    bf16 = np.dtype(floatx) == BF16
    if (file, name, bf16) not in _functions:
        if (file, bf16) not in _modules:
            _modules[(file, bf16)] = RawModule(code=kernel_source(file), options=nvrtc_options(bf16))
        _functions[(file, name, bf16)] = _modules[(file, bf16)].get_function(name)
    return _functions[(file, name, bf16)]


i32, i64, f32, u32 = np.int32, np.int64, np.float32, np.uint32  # kernel scalar arguments carry their C type


def pack_size(x):
    """Elements per 128-bit load or store of x's dtype: common.cuh's x128::size (8 bf16, 4 floats)."""
    return 16 // x.dtype.itemsize


def packable(n, *arrays):
    """Whether the packed kernels may run: n (the elements per row, or all of them) a multiple of the
    pack and every array's first element on a 16-byte boundary, as a 128-bit access needs (a misaligned
    one is a launch error). GPT-2's shapes always are; a flat buffer of odd-sized views (an odd T makes
    the (B,NH,T,T) attention tensors odd) may not be, and the launchers then take the per-element twin
    of the kernel, which gives the same bits."""
    size = pack_size(arrays[0])
    address = (lambda x: x.ctypes.data) if EMULATE else (lambda x: x.data.ptr)
    return n % size == 0 and all(address(x) % 16 == 0 for x in arrays)


def launch_elementwise(file, name, count, row, arrays, args):
    """Launch kernels/<file>.cu's `name` over `count` elements, or its 128-bit twin `name` with _packed before
    _kernel (one thread per x128) when packable(row, *arrays): row is the length the packs must not cross
    (a row of C or OC, or count itself for a flat array). 256-thread blocks; args are the kernel's own."""
    block, floatx = 256, arrays[0].dtype
    if packable(row, *arrays):
        packed = name.replace("_kernel", "_packed_kernel")
        kernel(file, packed, floatx)((ceil_div(count, block * pack_size(arrays[0])),), (block,), args)
    else:
        kernel(file, name, floatx)((ceil_div(count, block),), (block,), args)


def view(buffer, *shape):
    """The first prod(shape) floats of a contiguous buffer, seen with `shape`. llm.c reuses big
    buffers as scratch space for other shapes; this is that pointer cast, made visible."""
    n = math.prod(shape)
    return buffer.reshape(-1)[:n].reshape(shape)


# ----------------------------------------------------------------------------
# layers: one launcher per NumPy layer, same name, llm.c's argument order (outputs, inputs, sizes).
#
# Gradients of PARAMETERS accumulate (+=) into buffers zeroed once per step, as in the NumPy
# trainer. Gradients of ACTIVATIONS follow llm.c's CUDA trainer instead: they are written (=),
# because their buffers are scratch space reused layer after layer; the one exception is the
# residual stream, whose gradient layernorm_backward adds into (+=) so the two branches meet.

def encoder_forward(out, inp, wte, wpe, B, T, C):
    # out (B,T,C) = wte[inp] + wpe[:T]; inp (B,T) int32 on the device. One thread per x128 (8 bf16 or
    # 4 floats of a row: C a multiple of the pack), else one per element
    launch_elementwise("encoder", "encoder_forward_kernel", B * T * C, C, (out, wte, wpe),
                       (out, inp, wte, wpe, i32(B), i32(T), i32(C)))


def encoder_buckets(inp, out=None):
    # inp (B,T) token ids on the HOST. Groups the B*T positions by token id (no atomics needed in
    # the backward): positions (B*T,) sorted by token, then by position; starts (n+1,) where
    # bucket k is positions[starts[k]:starts[k+1]]; tokens (n,) the n distinct ids. Returns
    # (positions, starts, tokens, n) on the device, in `out` (>= 3*B*T + 1 int32) when given.
    flat = np.asarray(inp, dtype=np.int32).reshape(-1)
    positions = np.argsort(flat, kind="stable").astype(np.int32)  # stable: positions stay in order
    tokens, starts = np.unique(flat[positions], return_index=True)
    starts = np.append(starts, flat.size).astype(np.int32)
    n, BT = len(tokens), flat.size
    if out is None:
        out = xp.zeros(3 * BT + 1, dtype=np.int32)
    out[:BT] = xp.asarray(positions)                                # host -> device, three small copies
    out[BT:BT + n + 1] = xp.asarray(starts)
    out[2 * BT + 1:2 * BT + 1 + n] = xp.asarray(tokens.astype(np.int32))
    return out[:BT], out[BT:BT + n + 1], out[2 * BT + 1:2 * BT + 1 + n], n


def encoder_backward(dwte, dwpe, dout, inp, B, T, C, buckets=None, seed=0):
    # dwte[inp] += dout; dwpe[:T] += dout summed over b. inp (B,T) token ids on the HOST; buckets:
    # encoder_buckets(inp), if the caller made them already. Deterministic: each float of dwte and
    # dwpe is summed by one thread, in a fixed order (no atomics). bf16: each sum is rounded once,
    # stochastically, with `seed` (llm.c's encoder backward takes one from the model's generator)
    positions, starts, tokens, n = buckets if buckets is not None else encoder_buckets(inp)
    block = 256
    kernel("encoder", "encoder_backward_wte_kernel", dwte.dtype)(
        (ceil_div(C, block), n), (block,), (dwte, dout, starts, positions, tokens, i32(n), i32(C), u32(seed)))
    # wpe: a thread per x128 of dwpe[:T] (its B rows of dout in 128-bit loads, 4 in flight) where C is a
    # multiple of the pack, else a thread per element
    args = (dwpe, dout, i32(B), i32(T), i32(C), u32(seed))
    if packable(C, dwpe, dout):
        kernel("encoder", "encoder_backward_wpe_x128_kernel", dwpe.dtype)(
            (ceil_div(T * C, ENCODER_WPE_BLOCK * pack_size(dwpe)),), (ENCODER_WPE_BLOCK,), args)
    else:
        kernel("encoder", "encoder_backward_wpe_kernel", dwpe.dtype)((ceil_div(T * C, block),), (block,), args)


ENCODER_WPE_BLOCK = 128   # encoder_backward_wpe_x128_kernel: 768 blocks at d12 (256 would leave < 3 per SM)


def layernorm_forward(out, mean, rstd, inp, weight, bias, B, T, C):
    # out (B,T,C); mean, rstd (B,T) cached for the backward; one warp per row, reading 128-bit packs where
    # C is a multiple of the pack (layernorm_x128_name)
    block = 256
    kernel("layernorm", layernorm_x128_name("layernorm_forward_kernel", C, out, inp, weight, bias), out.dtype)(
        (ceil_div(B * T * 32, block),), (block,), (out, mean, rstd, inp, weight, bias, i32(B * T), i32(C)))


def layernorm_x128_name(name, C, *arrays):
    # the x128 twin of a LayerNorm kernel (its lanes read 128-bit packs: not the plain kernel's bits, within
    # fp32 rounding of them, tests/test_layernorm_x128.py) when C is a multiple of the pack and every array is
    # 16-byte aligned, else the plain kernel
    return name.replace("_kernel", "_x128_kernel") if packable(C, *arrays) else name


LAYERNORM_BACKWARD_BLOCK = 512   # 16 rows (warps) per block
LAYERNORM_SUM_BLOCK = 128        # layernorm_backward_sum_split_kernel: 128 threads split the partial rows


LAYERNORM_GROUP = 32             # layernorm_backward_onepass_kernel: blocks per group (its sum's first level)


def layernorm_scratch_size(B, T, C):
    # floats of scratch layernorm_backward needs: 3*C partial sums per block of its grid (dbias, dweight and,
    # with linear_dbias, the column sums of dinp), 3*C per group of LAYERNORM_GROUP blocks, and at the end the
    # one-launch kernel's ticket counters (groups + 1 uint32: zero-allocated, every launch leaves them 0)
    grid = ceil_div(32 * B * T, LAYERNORM_BACKWARD_BLOCK)
    groups = ceil_div(grid, LAYERNORM_GROUP)
    return (grid + groups) * 3 * C + groups + 1


def layernorm_backward(dinp, dweight, dbias, scratch, dout, inp, weight, mean, rstd, B, T, C, linear_dbias=None,
                       linear_scratch=None):
    # dinp (B,T,C) += ..., dweight, dbias (C) += ...; one warp per row for dinp. Each block writes
    # its rows' share of dbias/dweight to scratch (>= layernorm_scratch_size floats), and they are added in a
    # fixed order: deterministic, no float atomics. linear_dbias (C) given: it also gets += the column sums of
    # dinp after the update (the bias gradient of the linear layer whose output is added into the residual
    # stream dinp is the gradient of). Where C is a multiple of the pack and the arrays are 16-byte aligned:
    # ONE launch, layernorm_backward_onepass_kernel (the x128 rows, then the last block of each group of
    # LAYERNORM_GROUP blocks adds the group's partials, and the last group the groups', found by atomic ticket
    # counters at the end of scratch). Else the plain kernel, then a second kernel adds the shares (one block
    # per pack of 4 columns of the (2, C) rows where C is a multiple of 4, else one thread per channel), and
    # matmul_backward_bias(linear_dbias, linear_scratch, dinp) after them
    block = LAYERNORM_BACKWARD_BLOCK
    grid = ceil_div(32 * B * T, block)
    if layernorm_x128_name("layernorm_backward_kernel", C, dinp, dout, inp, weight) != "layernorm_backward_kernel":
        groups = ceil_div(grid, LAYERNORM_GROUP)
        assert scratch.size >= (grid + groups) * 3 * C + groups + 1, \
            "layernorm_backward: scratch too small (layernorm_scratch_size)"
        counters = scratch.reshape(-1)[scratch.size - (groups + 1):].view(np.uint32)
        kernel("layernorm", "layernorm_backward_onepass_kernel", dinp.dtype)(
            (grid,), (block,), (dinp, dweight, dbias, NULL if linear_dbias is None else linear_dbias, scratch,
                                counters, dout, inp, weight, mean, rstd, i32(B), i32(T), i32(C)))
        return
    kernel("layernorm", "layernorm_backward_kernel", dinp.dtype)(
        (grid,), (block,), (dinp, scratch, dout, inp, weight, mean, rstd, i32(B), i32(T), i32(C)))
    if packable(C, scratch):
        kernel("layernorm", "layernorm_backward_sum_split_kernel", dinp.dtype)(
            (2 * C // 4,), (LAYERNORM_SUM_BLOCK,), (dweight, dbias, scratch, i32(grid), i32(C)))
    else:
        kernel("layernorm", "layernorm_backward_sum_kernel", dinp.dtype)(
            (ceil_div(C, 256),), (256,), (dweight, dbias, scratch, i32(grid), i32(C)))
    if linear_dbias is not None:
        matmul_backward_bias(linear_dbias, linear_scratch, dinp, B * T, C)


def matmul_forward(out, inp, weight, bias, B, T, C, OC, pre_gelu=None, gelu_fusion=0):
    # out (B,T,OC) = inp (B,T,C) @ weight^T (C,OC) + bias (OC); weight is (OC,C) like nn.Linear.
    # pre_gelu (B,T,OC) given (the fc layer): out = gelu(that), and pre_gelu keeps the sum for the backward.
    # gelu_fusion >= 1 (-ge): one GEMM with cuBLASLt's GELU_AUX_BIAS epilogue (bias, GELU, the aux store);
    # else, as llm.c's matmul_forward_cublaslt, the plain matmul into pre_gelu, then gelu_forward
    if pre_gelu is not None:
        if gelu_fusion >= 1:
            gemm(out.reshape(B * T, OC), inp.reshape(B * T, C), weight, transpose_b=True,
                 epilogue="GELU_AUX_BIAS", bias=bias, aux=pre_gelu.reshape(B * T, OC))
        else:
            matmul_forward(pre_gelu, inp, weight, bias, B, T, C, OC)
            gelu_forward(out, pre_gelu, B * T * OC)
        return
    # gelu_fusion >= 1: the bias in cuBLASLt's BIAS epilogue, as llm.c's matmul_forward_cublaslt (product + bias
    # in fp32, one rounding: -ge 0's bits, below, without its copy or bias launch)
    if bias is not None and gelu_fusion >= 1:
        gemm(out.reshape(B * T, OC), inp.reshape(B * T, C), weight, transpose_b=True, epilogue="BIAS", bias=bias)
        return
    # bf16: the bias goes in first and the GEMM adds onto it (beta = 1), so product and bias are summed in
    # fp32 and rounded ONCE, as llm.c's cuBLASLt bias epilogue does. Rounding the product to bf16 and then
    # the sum again loses most of a bias smaller than half a bf16 step of the output (AdamW moves biases by
    # ~lr per step), the same shift at every position: the residual stream shrank layer after layer, and
    # the bf16 loss drifted below fp32's. fp32 keeps the product, then the bias kernel (bits as before).
    if bias is not None and out.dtype == BF16:
        rows = out.reshape(B * T, OC)
        rows[...] = bias                                # broadcast over the rows: a copy of bits
        gemm(rows, inp.reshape(B * T, C), weight, transpose_b=True, accumulate=True)
        return
    gemm(out.reshape(B * T, OC), inp.reshape(B * T, C), weight, transpose_b=True)
    if bias is not None:
        add_bias(out, bias, B * T, OC)


def add_bias(out, bias, N, OC):
    # out (N,OC) += bias (OC) on every row, in place (fp32's matmul_forward after its GEMM)
    launch_elementwise("matmul", "add_bias_kernel", N * OC, OC, (out, bias), (out, bias, i32(N), i32(OC)))


MATMUL_BIAS_BLOCK = 256          # matmul_backward_bias_partial_kernel: 8 warps
MATMUL_BIAS_BLOCKS = 8 * 132     # its target grid: one full wave of 256-thread blocks on an H100 (2048 x 132 / 256)


def matmul_bias_grid(N, OC, pack):
    # (column blocks, row blocks, rows per block) of matmul_backward_bias_partial_kernel: 32 packs of
    # columns per block, and the rows split so that the grid is about MATMUL_BIAS_BLOCKS blocks; rows per
    # block a multiple of 32 (8 warps x 4 loads in flight), so each thread makes full unrolled steps
    columns = ceil_div(OC, 32 * pack)
    row_blocks = min(ceil_div(N, 32), max(1, ceil_div(MATMUL_BIAS_BLOCKS, columns)))
    rows_per_block = ceil_div(ceil_div(N, row_blocks), 32) * 32
    return columns, ceil_div(N, rows_per_block), rows_per_block


def matmul_bias_scratch_size(B, T, C, floatx):
    # floats of scratch matmul_backward needs for the biased linear layers (OC = 3C, C, 4C): the partial
    # kernel's (row blocks, OC) column sums, at the largest of them, and after them the one-launch kernel's
    # ticket counters (one uint32 per column block, kept at the scratch's end: zero-allocated, left 0)
    pack = 16 // np.dtype(floatx).itemsize
    return (max(matmul_bias_grid(B * T, OC, pack)[1] * OC for OC in (3 * C, C, 4 * C))
            + max(matmul_bias_grid(B * T, OC, pack)[0] for OC in (3 * C, C, 4 * C)))


def matmul_bias_counters(scratch, columns):
    # the ticket counters of matmul_backward_bias_x128_kernel: the last `columns` floats of scratch, as uint32
    return scratch.reshape(-1)[scratch.size - columns:].view(np.uint32)


def matmul_backward_bias(dbias, scratch, dout, N, OC):
    # dbias (OC) += dout (N,OC) summed over rows. Packed path (OC a multiple of the pack, dout 16-byte
    # aligned, scratch given): rows and columns split across ~MATMUL_BIAS_BLOCKS blocks, each writing its
    # column sums to scratch (row blocks, OC) in fp32; the last block of each column block to finish (a
    # ticket counter) adds them in block order, in the same launch: deterministic, the bits of the
    # partial + sum kernel pair. Otherwise the plain kernel: 32 columns per block, its 32 warps splitting
    # the rows (the same sum in another fixed order)
    floatx = dout.dtype
    if scratch is not None and packable(OC, dout):
        columns, row_blocks, rows_per_block = matmul_bias_grid(N, OC, pack_size(dout))
        assert scratch.size >= row_blocks * OC + columns, \
            "matmul_backward_bias: scratch too small (matmul_bias_scratch_size)"
        block = MATMUL_BIAS_BLOCK
        kernel("matmul", "matmul_backward_bias_x128_kernel", floatx)(
            (columns, row_blocks), (block,),
            (dbias, scratch, matmul_bias_counters(scratch, columns), dout, i32(N), i32(OC), i32(rows_per_block)),
            shared_mem=block * pack_size(dout) * 4)
    else:
        block = 1024  # 32 columns per block, its 32 warps splitting the rows
        kernel("matmul", "matmul_backward_bias_kernel", floatx)(
            (ceil_div(OC, 32),), (block,), (dbias, dout, i32(N), i32(OC)), shared_mem=block * 4)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, scratch, B, T, C, OC, pre_gelu=None, gelu_fusion=0):
    # dinp (B,T,C) = dout @ weight (written); dweight (OC,C) += dout^T @ inp; dbias (OC) += sum of dout.
    # scratch: >= matmul_bias_scratch_size floats for the bias's partial sums (llm.c's dbias_buffer), or None.
    # pre_gelu (B,T,C) given (fcproj, whose inp is gelu(pre_gelu)): dinp is the gradient of pre_gelu instead,
    # dinp * gelu'(pre_gelu): in the GEMM's DGELU epilogue with gelu_fusion >= 2 (-ge 2), else gelu_backward
    # in place at the end. The bias gradient stays with matmul_backward_bias, as in llm.c (its matmul_backward
    # never lets cuBLASLt's BGRADB make it: that epilogue writes, and a gradient must accumulate)
    fused = pre_gelu is not None and gelu_fusion >= 2
    gemm(dinp.reshape(B * T, C), dout.reshape(B * T, OC), weight,
         **(dict(epilogue="DGELU", aux=pre_gelu.reshape(B * T, C)) if fused else {}))
    gemm(dweight, dout.reshape(B * T, OC), inp.reshape(B * T, C), transpose_a=True, accumulate=True)
    if dbias is not None:
        matmul_backward_bias(dbias, scratch, dout, B * T, OC)
    if pre_gelu is not None and not fused:
        gelu_backward(dinp, pre_gelu, dinp, B * T * C)


def attention_forward(out, qkvr, att, inp, B, T, C, NH):
    # inp (B,T,3C) = q|k|v per position, in the first B*T*3C floats of a scratch buffer that is
    # big enough to hold (B,NH,T,T) as well: inp is consumed by the permute and then reused for
    # preatt and for att @ v. qkvr (3,B,NH,T,hs) keeps q, k, v and att (B,NH,T,T) the
    # probabilities for the backward pass; out (B,T,C).
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    q, k, v = view(qkvr, 3, B, NH, T, hs)
    block = 256
    kernel("attention", "permute_kernel", out.dtype)(
        (ceil_div(B * NH * T * hs, block),), (block,), (q, k, v, inp, i32(B), i32(T), i32(NH), i32(hs)))
    preatt = view(inp, B * NH, T, T)
    gemm(preatt, q.reshape(B * NH, T, hs), k.reshape(B * NH, T, hs), transpose_b=True)  # q @ k^T, unscaled
    kernel("attention", "softmax_forward_kernel", out.dtype)(
        (ceil_div(B * NH * T * 32, block),), (block,), (att, preatt, f32(scale), i32(B), i32(NH), i32(T)))
    vaccum = view(inp, B * NH, T, hs)
    gemm(vaccum, att.reshape(B * NH, T, T), v.reshape(B * NH, T, hs))  # (T,T) @ (T,hs) per head
    kernel("attention", "unpermute_kernel", out.dtype)(
        (ceil_div(B * NH * T * hs, block),), (block,), (out, vaccum, i32(B), i32(T), i32(NH), i32(hs)))


def attention_backward(dinp, dqkvr, dpreatt, datt, scratch, dout, qkvr, att, B, T, C, NH):
    # dinp (B,T,3C) = d(q|k|v), written; dout (B,T,C). Scratch buffers, each used from its start:
    # dqkvr >= 3*B*T*C floats, dpreatt and datt >= B*NH*T*T, scratch >= B*T*C.
    # Every line undoes one line of attention_forward, from the last to the first.
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    q, k, v = (x.reshape(B * NH, T, hs) for x in view(qkvr, 3, B, NH, T, hs))
    dq, dk, dv = (x.reshape(B * NH, T, hs) for x in view(dqkvr, 3, B, NH, T, hs))
    att = att.reshape(B * NH, T, T)
    dpreatt, datt = view(dpreatt, B * NH, T, T), view(datt, B * NH, T, T)
    block = 256
    dvaccum = view(scratch, B * NH, T, hs)
    kernel("attention", "unpermute_backward_kernel", dinp.dtype)(                       # out <- vaccum
        (ceil_div(B * NH * T * hs, block),), (block,), (dvaccum, dout, i32(B), i32(T), i32(NH), i32(hs)))
    gemm(datt, dvaccum, v, transpose_b=True)                                 # vaccum = att @ v
    gemm(dv, att, dvaccum, transpose_a=True)
    kernel("attention", "softmax_autoregressive_backward_kernel", dinp.dtype)(           # att = softmax(scale*preatt)
        (ceil_div(B * NH * T * 32, block),), (block,),
        (dpreatt, datt, att, f32(scale), i32(B), i32(NH), i32(T)))
    gemm(dq, dpreatt, k)                                                     # preatt = q @ k^T
    gemm(dk, dpreatt, q, transpose_a=True)
    kernel("attention", "permute_backward_kernel", dinp.dtype)(                          # q, k, v <- inp
        (ceil_div(B * NH * T * hs, block),), (block,), (dinp, dq, dk, dv, i32(B), i32(T), i32(NH), i32(hs)))


# Flash attention (kernels/flash_attention.cu, bf16 only): the same layer without the (B,NH,T,T) tensors.
# q, k, v are read from qkv (B,T,3C) as the matmul wrote it and the output lands in (B,T,C), so there is
# no permute; the forward saves lse (B,NH,T, fp32), from which the backward recomputes the probabilities.

FLASH_HEAD_SIZES = (64, 128)        # the head sizes flash_attention.cu takes
FLASH_THREADS = 128                 # 4 warps per block
FLASH_BC = 32                       # keys per tile; query rows per tile: flash_rows


def flash_rows(hs, backward):
    """Query rows per block: 64 in the forward for hs 64, else 32 (the kernel's tiles, see its header)."""
    return 64 if hs == 64 and not backward else 32


def flash_shared_bytes(hs, backward):
    """Dynamic shared memory of one block, the sum of the tiles the kernel's header lists."""
    BR, BC = flash_rows(hs, backward), FLASH_BC   # rows padded by 16 bytes: hs + 8 bf16, hs + 4 and BC + 4 floats
    if not backward:   # q, k, v bf16; s f32 (p over it); o f32; m, l, alpha
        return 2 * (BR + 2 * BC) * (hs + 8) + 4 * BR * (BC + 4) + 4 * BR * (hs + 4) + 12 * BR
    return 4 * (BR + BC) * (hs + 8) + 8 * BR * (BC + 4) + 8 * BR   # q, dout, k, v bf16; s, dp f32 (p, ds over them); lse, D


def flash_check(name, qkv, B, T, C, NH, *aligned):
    """The one-line error for what the flash kernels do not take (the caller picks the path; a wrong
    shape here is a bug, never a silent wrong result)."""
    hs = C // NH
    address = (lambda x: x.ctypes.data) if EMULATE else (lambda x: x.data.ptr)
    if qkv.dtype != BF16:
        raise ValueError(f"{name}: flash attention is bf16 only, got {qkv.dtype}; use attention_forward/backward")
    if hs * NH != C or hs not in FLASH_HEAD_SIZES:
        raise ValueError(f"{name}: head size C/NH = {C}/{NH} is not one of {FLASH_HEAD_SIZES}; "
                         f"use attention_forward/backward")
    if not 1 <= T <= 65535 * FLASH_BC:
        raise ValueError(f"{name}: needs 1 <= T <= {65535 * FLASH_BC} (tiles of 32 on the grid's y), got T={T}")
    if any(address(x) % 16 for x in (qkv,) + aligned):
        raise ValueError(f"{name}: qkv and dout must start on 16-byte boundaries (the kernels load 16-byte pieces)")


def flash_attention_forward(out, lse, qkv, B, T, C, NH):
    # qkv (B,T,3C) bf16 -> out (B,T,C) bf16, lse (B,NH,T) fp32: the softmax's log-sum-exp per row, kept
    # for flash_attention_backward. One launch; a block per (query tile, head).
    flash_check("flash_attention_forward", qkv, B, T, C, NH)
    hs = C // NH
    grid = (B * NH, ceil_div(T, flash_rows(hs, False)))
    kernel("flash_attention", "flash_attention_forward_kernel", BF16)(
        grid, (FLASH_THREADS,), (out, lse, qkv, i32(B), i32(T), i32(NH), i32(hs)),
        shared_mem=flash_shared_bytes(hs, False))


def flash_scratch_size(B, T, C, NH):
    """Floats of fp32 scratch flash_attention_backward needs: D = rowsum(dout * out), (B,NH,T)."""
    return B * NH * T


def flash_attention_backward(dqkv, scratch, dout, qkv, out, lse, B, T, C, NH):
    # dqkv (B,T,3C) bf16 = d(q|k|v), written; dout, out (B,T,C); lse (B,NH,T) from the forward;
    # scratch: >= flash_scratch_size(B, T, C, NH) floats. Two launches, no atomics: dq per query tile
    # (computing D as it goes), then dk and dv per key tile (reading D).
    flash_check("flash_attention_backward", qkv, B, T, C, NH, dout)
    hs = C // NH
    D = view(scratch, B, NH, T)
    shared = flash_shared_bytes(hs, True)
    kernel("flash_attention", "flash_attention_backward_dq_kernel", BF16)(
        (B * NH, ceil_div(T, flash_rows(hs, True))), (FLASH_THREADS,),
        (dqkv, D, dout, qkv, out, lse, i32(B), i32(T), i32(NH), i32(hs)), shared_mem=shared)
    kernel("flash_attention", "flash_attention_backward_dkdv_kernel", BF16)(
        (B * NH, ceil_div(T, FLASH_BC)), (FLASH_THREADS,),
        (dqkv, dout, qkv, lse, D, i32(B), i32(T), i32(NH), i32(hs)), shared_mem=shared)


# The elementwise launchers below run one thread per x128 (8 bf16 or 4 floats, 128-bit loads and stores)
# when packable(...), else the per-element twin kernel: the same bits either way (launch_elementwise).

def gelu_forward(out, inp, N):
    launch_elementwise("gelu", "gelu_forward_kernel", N, N, (out, inp), (out, inp, i32(N)))


def gelu_backward(dinp, inp, dout, N):
    # dinp = gelu'(inp) * dout, written; may run in place (dinp is dout)
    launch_elementwise("gelu", "gelu_backward_kernel", N, N, (dinp, inp, dout), (dinp, inp, dout, i32(N)))


def residual_forward(out, inp1, inp2, N):
    launch_elementwise("residual", "residual_forward_kernel", N, N, (out, inp1, inp2), (out, inp1, inp2, i32(N)))


def fused_residual_forward(residual, normed, mean, rstd, inp1, inp2, weight, bias, B, T, C):
    # residual_forward(residual, inp1, inp2) then layernorm_forward(normed, mean, rstd, residual, ...)
    # in one launch (llm.c's fused_residual_forward5), bit for bit the same: the LayerNorm reads the
    # residual as stored (rounded to floatX). One warp per row, as layernorm_forward. Where layernorm_forward
    # would take its x128 kernel (residual, normed, weight, bias aligned) but inp1 or inp2 is off a 16-byte
    # boundary, the two launches it replaces run instead: a LayerNorm recomputed from the residual (-r 2)
    # then gives the forward's bits, as it must
    block = 256
    if packable(C, residual, normed, weight, bias) and not packable(C, inp1, inp2):
        residual_forward(residual, inp1, inp2, B * T * C)
        layernorm_forward(normed, mean, rstd, residual, weight, bias, B, T, C)
        return
    name = layernorm_x128_name("fused_residual_layernorm_forward_kernel", C, residual, normed, inp1, inp2, weight, bias)
    kernel("layernorm", name, residual.dtype)(
        (ceil_div(B * T * 32, block),), (block,),
        (residual, normed, mean, rstd, inp1, inp2, weight, bias, i32(B * T), i32(C)))


def fused_classifier(logits, losses, dlosses, targets, B, T, V, Vp, write_dlogits):
    # softmax_forward + crossentropy_forward (+ crossentropy_softmax_backward) in one kernel:
    # losses (B,T) written; with write_dlogits=1 the logits (B,T,Vp) are overwritten with their
    # gradient for dlosses (B,T), or 1/(B*T) everywhere (the mean loss) when dlosses is None.
    # One block per row; its threads read and write 128-bit packs, 4 in flight, where every row starts on
    # a pack (Vp a multiple of it, logits 16-byte aligned), else one floatX at a time (the plain kernel)
    block = 1024
    name = "fused_classifier_x128_kernel" if packable(Vp, logits) else "fused_classifier_kernel"
    kernel("classifier", name, logits.dtype)(
        (B * T,), (block,),
        (logits, losses, NULL if dlosses is None else dlosses, targets,
         i32(B), i32(T), i32(V), i32(Vp), i32(write_dlogits)))


# ----------------------------------------------------------------------------
# the model: flat device buffers with named views, as llm.c's GPT2 struct

def activation_shapes(config, B, T, recompute=0, flash=False):
    """llm.c train_gpt2_fp32.cu's activations (21 tensors). `output` is the scratch buffer: it
    holds the logits (B,T,Vp) after the forward pass and, inside each layer, qkv (B,T,3C),
    preatt (B,NH,T,T) and att @ v; in the backward pass the logits' gradient and datt.
    flash (-fa 1, where flash_attention.cu runs): each layer keeps its qkv (B,T,3C) as the kernel reads it
    (instead of qkvr, the permuted copy) and the softmax's log-sum-exp lse (B,NH,T, fp32) instead of att
    (B,NH,T,T); the backward recomputes the probabilities from them. `output` then holds only the logits.
    recompute (-r, as llm.c's train_gpt2.cu) is decided here and only here: a tensor the backward
    pass recomputes gets ONE buffer, (1, ...), that every layer shares, instead of (L, ...):
    -r 1 shares fch_gelu (the backward recomputes GELU(fch) before fcproj's matmul_backward),
    -r 2 also ln1 and ln2 (it reruns their layernorm_forward; mean and rstd stay per layer)."""
    L, NH, C, Vp = config.num_layers, config.num_heads, config.channels, config.padded_vocab_size
    L_gelu = 1 if recompute >= 1 else L   # layers of fch_gelu kept
    L_ln = 1 if recompute >= 2 else L     # layers of ln1 and ln2 kept
    if flash:
        probabilities, qkv, rows = ("lse", (L, B, NH, T)), ("qkv", (L, B, T, 3 * C)), Vp
    else:
        probabilities, qkv = ("att", (L, B, NH, T, T)), ("qkvr", (L, 3, B, NH, T, C // NH))
        rows = max(3 * C, NH * T, Vp)
    return [
        ("encoded", (B, T, C)),
        ("ln1", (L_ln, B, T, C)), ("ln1_mean", (L, B, T)), ("ln1_rstd", (L, B, T)),
        ("atty", (L, B, T, C)),                 # attention output before the projection
        probabilities,                          # attention probabilities att, or flash's lse
        ("attproj", (L, B, T, C)),
        ("residual2", (L, B, T, C)),
        ("ln2", (L_ln, B, T, C)), ("ln2_mean", (L, B, T)), ("ln2_rstd", (L, B, T)),
        ("fch", (L, B, T, 4 * C)), ("fch_gelu", (L_gelu, B, T, 4 * C)),
        ("fcproj", (L, B, T, C)),
        ("residual3", (L, B, T, C)),
        ("lnf", (B, T, C)), ("lnf_mean", (B, T)), ("lnf_rstd", (B, T)),
        ("losses", (B, T)),
        qkv,                                    # q, k, v permuted to (B,NH,T,hs), or flash's (B,T,3C)
        ("output", (B * T * rows,)),
    ]


# the activations that stay fp32 in bf16 (llm.c's mainline): LayerNorm's per-row statistics and the losses;
# the rest are floatX. They live in two flat buffers, "activations" and "activation statistics".
FP32_ACTIVATIONS = ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean", "lnf_rstd", "losses", "lse")


def split_activations(shapes):
    """activation_shapes(...) -> (the floatX ones, the fp32 ones), each in its order."""
    return ([(n, s) for n, s in shapes if n not in FP32_ACTIVATIONS],
            [(n, s) for n, s in shapes if n in FP32_ACTIVATIONS])


def layer(activation, l):
    """Layer l's slice of a per-layer activation (L, ...), or the one slice all layers share when
    recompute keeps a single buffer (1, ...) for it."""
    return activation[l if activation.shape[0] > 1 else 0]


def grad_activation_shapes(config, B, T, flash=False):
    """The backward pass needs only three buffers, reused by every layer (llm.c's GradActTensors); with
    flash (-fa 1) two: no (B,NH,T,T) dpreatt."""
    NH, C = config.num_heads, config.channels
    preatt = [] if flash else [("preatt", (B, NH, T, T))]
    return [("bt4c", (B, T, 4 * C))] + preatt + [("residual3", (B, T, C))]


def count(shapes):
    """The number of elements of a shape table [(name, shape), ...]: one flat buffer's length."""
    return sum(math.prod(shape) for _, shape in shapes)


# ----------------------------------------------------------------------------
# memory: every device buffer of a run, sized from the shape tables it is allocated with

PRECISIONS = {"fp32": np.dtype(np.float32), "bf16": BF16}   # -p: floatX, the dtype of parameters,
OPT_DTYPE = np.float32     # gradients and activations; AdamW's m, v and the master weights are always fp32
RECOMPUTE = {0: "none", 1: "GELU", 2: "GELU and LayerNorm"}   # -r: what the backward pass recomputes


GELU_FUSION = {0: "none", 1: "bias + GELU in the fc GEMM, the other biases in theirs",
               2: "bias + GELU in the fc GEMM, the other biases in theirs, GELU's gradient in fcproj's"}


def check_gelu_fusion(gelu_fusion):
    if gelu_fusion not in GELU_FUSION:
        raise ConfigError(f"-ge must be 0, 1 or 2 (GELU fused into the fc GEMMs by cuBLASLt: 0 none, 1 forward, "
                          f"2 forward and backward), got {gelu_fusion}")


FLASH_ATTENTION = {0: "materialized", 1: "flash"}   # -fa: which attention path (flash where it can run)


def check_flash_attention(flash_attention):
    if flash_attention not in FLASH_ATTENTION:
        raise ConfigError(f"-fa must be 0 or 1 (attention: 1 flash, 0 the materialized path with its (B,NH,T,T) "
                          f"tensors), got {flash_attention}")


def flash_unavailable(config, precision):
    """None where kernels/flash_attention.cu can run this model in this precision, else why not (a phrase)."""
    if precision != "bf16":
        return "fp32 has no flash variant (flash_attention.cu is bf16 on the tensor cores)"
    sizes = globals().get("FLASH_HEAD_SIZES")          # the launchers' (below attention_backward)
    if sizes is None:
        return "kernels/flash_attention.cu is not in this tree"
    hs = config.channels // config.num_heads
    if hs not in sizes:
        return f"head size {hs} is not one flash_attention.cu takes ({' or '.join(map(str, sizes))})"
    return None


def attention_path(config, precision, flash_attention=1):
    """-fa for this model and precision -> (whether flash runs, the start-up line saying which path and why).
    -fa 1 asks for flash where it can run; elsewhere the materialized path runs, as -fa 0."""
    check_flash_attention(flash_attention)
    if flash_attention == 0:
        return False, "attention: materialized, (B,NH,T,T) tensors (-fa 0)"
    why_not = flash_unavailable(config, precision)
    if why_not is not None:
        return False, f"attention: materialized, (B,NH,T,T) tensors: {why_not}"
    return True, "attention: flash (-fa 1, kernels/flash_attention.cu): no (B,NH,T,T) tensors"


def check_recompute(recompute):
    if recompute not in RECOMPUTE:
        raise ConfigError(f"-r must be 0, 1 or 2 (what the backward recomputes: 0 nothing, 1 GELU, "
                          f"2 GELU and LayerNorm), got {recompute}")


def state_buffers(config, B, T, recompute, precision="fp32", master_weights=True, shard_size=None, flash=False):
    """Every device buffer of a run at (B, T): [(name, element count, dtype, at_build), ...].
    at_build: allocated by GPT2() (parameters and their gradients); the rest by gpt2_allocate_state,
    which allocates from these very counts, so the memory report and the allocation cannot disagree.
    The bytes of a buffer are count * dtype's itemsize: the precision changes only the dtypes.
    Master weights: an fp32 copy of the parameters that AdamW updates, when they are bf16 and -w 1.
    shard_size: ZeRO-1's share of the parameters whose m, v (and master weights) this rank keeps.
    flash: the flash attention path's tables (no (B,NH,T,T) buffers) and its backward's fp32 scratch."""
    n, C, NH = num_parameters(config), config.channels, config.num_heads
    ns = n if shard_size is None else shard_size
    floatx = PRECISIONS[precision]
    keep_master = master_weights and floatx != np.dtype(OPT_DTYPE)
    floatx_acts, fp32_acts = split_activations(activation_shapes(config, B, T, recompute, flash))
    flash_scratch = [("flash attention backward scratch", flash_scratch_size(B, T, C, NH), np.float32, False)] \
        if flash else []
    return [
        ("parameters", n, floatx, True),
        ("parameter gradients", n, floatx, True),
        ("activations", count(floatx_acts), floatx, False),
        ("activation statistics", count(fp32_acts), np.float32, False),
        ("activation gradients", count(grad_activation_shapes(config, B, T, flash)), floatx, False),
    ] + flash_scratch + [
        ("layernorm backward scratch", layernorm_scratch_size(B, T, C), np.float32, False),
        ("matmul backward bias scratch", matmul_bias_scratch_size(B, T, C, floatx), np.float32, False),
        ("encoder backward buckets", 3 * B * T + 1, np.int32, False),   # see encoder_buckets
        ("AdamW optimizer state m", ns, OPT_DTYPE, False),
        ("AdamW optimizer state v", ns, OPT_DTYPE, False),
        ("master weights", ns if keep_master else 0, OPT_DTYPE, False),
    ]


def nbytes(count, dtype):
    return count * np.dtype(dtype).itemsize


def state_bytes_to_allocate(config, B, T, recompute, precision="fp32", master_weights=True, shard_size=None,
                            flash=False):
    """Bytes gpt2_allocate_state asks the device for at (B, T) (the model's own are there already)."""
    return sum(nbytes(n, dtype) for _, n, dtype, at_build in
               state_buffers(config, B, T, recompute, precision, master_weights, shard_size, flash) if not at_build)


INDEX_LIMIT = 2**31   # the kernels index with 32-bit ints: every tensor (the (B,NH,T,T) attention above all) below this


def largest_indexable_batch(config, T, flash=False):
    """The largest B whose tensors the kernels can index: B*NH*T*T (the materialized attention) and B*T*4C
    below 2^31 (the classifier, the one kernel on (B,T,Vp), addresses its rows with 64-bit offsets). With
    flash there is no (B,NH,T,T) tensor: (B,T,4C) is the largest (d12 at T=1024: 682 against 170)."""
    per_sequence = max(0 if flash else config.num_heads * T * T, T * 4 * config.channels)
    return (INDEX_LIMIT - 1) // per_sequence


def largest_batch_size(config, T, recompute, free_bytes, precision="fp32", master_weights=True, shard_size=None,
                       flash=False):
    """The largest B whose state fits in free_bytes at this T (0 if not even B=1), found by
    bisection over state_bytes_to_allocate itself, so it is exactly the check's answer; never above
    what the kernels' 32-bit indices reach (largest_indexable_batch: 170 for d12 at T=1024, 682 with flash)."""
    def fits(B):
        return B <= largest_indexable_batch(config, T, flash) and \
            state_bytes_to_allocate(config, B, T, recompute, precision, master_weights, shard_size, flash) <= free_bytes
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:                    # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# device memory kept out of the report's "free": cuBLAS's workspace, which its first GEMM allocates (32 MiB per
# stream on Hopper since CUDA 12, 4 MiB before), and what else its first calls take, with room to spare
CUBLAS_HEADROOM = 64 << 20


def device_memory():
    """(free, total) bytes of device memory, or None on the emulator (no device to ask). Free is read once
    the cuBLAS handle exists (creating it takes memory), counts what CuPy's memory pool holds unused (the
    pool hands it out again before asking CUDA), and leaves out CUBLAS_HEADROOM: a run at the reported
    largest B must not fail at its first GEMM."""
    if EMULATE:
        return None
    xp.cuda.device.get_cublas_handle()
    free, total = xp.cuda.runtime.memGetInfo()
    return max(0, free + xp.get_default_memory_pool().free_bytes() - CUBLAS_HEADROOM), total


# the GPUs every memory report sizes the batch for, besides the one it runs on: the total memory nvidia-smi shows
# for an H100 80 GB and an H200 141 GB; and what the CUDA context and CuPy take there before the first buffer
REPORT_GPUS = (("80 GB", 81559 << 20), ("141 GB", 143771 << 20))
CUDA_CONTEXT_BYTES = 1 << 30     # an assumption: a few hundred MiB on recent GPUs, rounded up; no GPU here has said


def largest_batch_on_gpu(config, T, recompute, device_bytes, precision="fp32", master_weights=True,
                         shard_size=None, flash=False):
    """largest_batch_size on an empty GPU of device_bytes: free is all of it but the CUDA context, cuBLAS's
    headroom and the parameters and their gradients (which the model holds before the state is sized)."""
    model_bytes = 2 * nbytes(num_parameters(config), PRECISIONS[precision])
    free = device_bytes - CUDA_CONTEXT_BYTES - CUBLAS_HEADROOM - model_bytes
    return largest_batch_size(config, T, recompute, free, precision, master_weights, shard_size, flash)


def MiB(n_bytes):
    return f"{n_bytes / 2**20:,.2f} MiB"


def memory_report(config, B, T, recompute, memory, precision="fp32", master_weights=True, shard_size=None,
                  flash=False):
    """llm.c's start-up lines: what each buffer takes, the total, what recompute saves, the largest B
    at this T on an 80 GB and a 141 GB GPU, and the largest B that fits the device at this T. memory:
    device_memory(). flash: the attention path's buffers (-fa 1 where it runs: no (B,NH,T,T) tensors)."""
    buffers = state_buffers(config, B, T, recompute, precision, master_weights, shard_size, flash)
    lines = []
    for name, n, dtype, _ in buffers:
        if name == "master weights" and n == 0:
            why = "fp32 parameters" if precision == "fp32" else "-w 0: AdamW updates the bf16 weights"
            lines.append(f"master weights: none ({why})")
        else:
            lines.append(f"allocating {MiB(nbytes(n, dtype))} for {name}")
    floatx = PRECISIONS[precision]
    acts, acts_r0 = (nbytes(count(split_activations(activation_shapes(config, B, T, r, flash))[0]), floatx)
                     for r in (recompute, 0))
    lines.append(f"recompute: -r {recompute} ({RECOMPUTE[recompute]}): activations {MiB(acts)}, "
                 f"{MiB(acts_r0 - acts)} less than -r 0")
    sizes = [largest_batch_on_gpu(config, T, recompute, device_bytes, precision, master_weights, shard_size, flash)
             for _, device_bytes in REPORT_GPUS]
    lines.append(f"largest B at T={T} on an {' / '.join(name for name, _ in REPORT_GPUS)} GPU: "
                 f"{' / '.join(map(str, sizes))} ({FLASH_ATTENTION[flash]} attention; the 32-bit index limit: "
                 f"{largest_indexable_batch(config, T, flash)})")
    total = sum(nbytes(n, dtype) for _, n, dtype, _ in buffers)
    if memory is None:
        lines.append(f"total: {MiB(total)}")
        lines.append("estimated maximum batch size: n/a (emulator)")
    else:
        free, device_total = memory          # measured with the parameters and their gradients in place
        lines.append(f"total: {MiB(total)} (device: {MiB(free)} free of {MiB(device_total)}, "
                     f"{MiB(CUBLAS_HEADROOM)} more kept for cuBLAS)")
        lines.append(f"estimated maximum batch size at T={T}: "
                     f"{largest_batch_size(config, T, recompute, free, precision, master_weights, shard_size, flash)}")
    return lines


class GPT2:
    """The model: config, parameters and their gradients (flat device buffers with named views),
    and, from gpt2_allocate_state (for one B and T), the activations, their gradients and AdamW's
    m and v (and master weights); the recompute setting (-r), the precision (-p) and -w; the
    stochastic rounding's generator; the state of the last forward pass. flash_attention (-fa): 1 runs
    flash attention where kernels/flash_attention.cu can (bf16, its head sizes), 0 the materialized path."""

    def __init__(self, config, params_host, recompute=1, precision="fp32", master_weights=True, rank=0,
                 gelu_fusion=0, flash_attention=1):
        require_gpu()
        check_recompute(recompute)
        check_gelu_fusion(gelu_fusion)
        if precision not in PRECISIONS:
            raise ConfigError(f"-p must be bf16 or fp32, got {precision}")
        # which attention path runs (flash, or the materialized one) and the start-up line that says why
        self.flash, self.attention_line = attention_path(config, precision, flash_attention)
        self.config = config
        self.recompute = recompute
        self.gelu_fusion = gelu_fusion   # -ge: 0 none, 1 every bias (and fc's GELU) in its GEMM, 2 also GELU's gradient
        self.precision = precision
        self.floatx = PRECISIONS[precision]
        self.use_master_weights = bool(master_weights) and precision != "fp32"
        # llm.c's fp32 build keeps master weights too under -w 1 (its default): a copy equal to the fp32
        # parameters bit for bit, so here the state file's master weights are the parameters themselves
        self.master_in_state = bool(master_weights)
        self.num_parameters = num_parameters(config)
        self.param_shapes = param_shapes(config)
        params_host = np.asarray(params_host, dtype=np.float32)
        # bf16: the fp32 values rounded to nearest even, once, on the host (a v5 file's are exact)
        # a copy always (xp.array): on the emulator xp.asarray would hand back the caller's own array
        self.params_memory = xp.array(f32_to_bf16(params_host) if self.floatx == BF16 else params_host)
        self.grads_memory = xp.zeros(self.num_parameters, dtype=self.floatx)
        # the master weights start from the fp32 values themselves, not their bf16 rounding: a v3 file
        # or the seeded init keeps its precision there (gpt2_allocate_state uploads them)
        self.master_init = params_host if self.use_master_weights else None
        self.master_memory = None
        # stochastic rounding's generator (llm.c's rng_state, seeded 13371337 + rank): a seed per
        # parameter tensor per update and one per encoder backward; a checkpoint keeps it
        self.rng_state = [13371337 + rank]
        self.rng_state_last_update = self.rng_state[0]
        # llm.c's one classifier pass per micro-step: a forward with targets writes dlogits over the logits
        # (train_gpt2.train turns it on; callers that read the logits after such a forward leave it off)
        self.dlogits_in_forward = False
        self.params = host.views(self.params_memory, self.param_shapes)
        self.grads = host.views(self.grads_memory, self.param_shapes)
        self.m_memory = self.v_memory = None
        self.acts_memory = self.acts = None
        self.grads_acts_memory = self.grads_acts = None
        self.norm_partials = xp.zeros(NORM_BLOCKS, dtype=np.float32)     # gpt2_calculate_grad_norm's
        self.adamw_table = None     # gpt2_update's per-tensor table ((rank, ranks), device array), built once
        self.batch_size = self.seq_len = 0
        self.inputs = self.targets = None                                  # (B,T) int32 on the device
        self.inputs_host = None                  # (B,T) int32: the last batch's inputs, kept for encoder_buckets
        self.layernorm_scratch = self.bucket_memory = None  # the deterministic backward's scratch
        self.matmul_scratch = None
        self.flash_scratch = None                # flash attention's backward scratch (fp32), when flash runs
        self.mean_loss = -1.0


def gpt2_build_from_checkpoint(path, recompute=1, precision="fp32", master_weights=True, gelu_fusion=0,
                               flash_attention=1):
    """Load an llm.c model file onto the GPU in `precision`: a v5 (bf16) file loads exactly in bf16,
    a v3 (fp32) file is rounded to bf16 (its fp32 values become the master weights); in fp32 a v5
    file is widened exactly."""
    require_gpu()
    config, params = read_model_file(path)
    return GPT2(config, params, recompute, precision, master_weights, gelu_fusion=gelu_fusion,
                flash_attention=flash_attention)


def gpt2_build_from_descriptor(descriptor, seed=42, settings=None, recompute=None, precision=None,
                               master_weights=None, gelu_fusion=None, flash_attention=None):
    """A fresh model from a descriptor such as "d12" (or a .bin path), initialised on the host by
    train_gpt2.py's seeded init (the same weights as the NumPy trainer), then copied to the GPU.
    settings: device_setup's CudaSettings (-r, -p, -w, -ge, -fa and the rounding's rank; None: their
    defaults, fp32); recompute, precision, master_weights, gelu_fusion, flash_attention override them."""
    require_gpu()
    s = settings or CudaSettings()
    cpu_model = host.gpt2_build_from_descriptor(descriptor, seed)
    return GPT2(cpu_model.config, cpu_model.params_memory, s.recompute if recompute is None else recompute,
                s.precision if precision is None else precision,
                s.master_weights if master_weights is None else master_weights, s.rank,
                s.gelu_fusion if gelu_fusion is None else gelu_fusion,
                s.flash_attention if flash_attention is None else flash_attention)


def gpt2_allocate_state(model, B, T, shard=None, dlogits_in_forward=False):
    """Everything a run at (B, T) needs besides the parameters and their gradients, allocated once
    (llm.c's gpt2_allocate_state): the activations (as many as model.recompute keeps), the backward's
    buffers and scratch, AdamW's m and v. First the memory report; and if the device has not got the
    bytes, one line that says how many are needed and the largest B that fits, before allocating any.
    train_gpt2.train calls it at start-up; gpt2_forward calls it at the first pass if nobody did.
    shard: ZeRO-1's collectives.ShardLayout, the pieces whose m, v and master weights this rank keeps, in
    llm.c's compact order (None: all parameters, in their own order). dlogits_in_forward: the training loop
    reads no logits of a forward with targets, so the classifier writes their gradient in that pass (llm.c's
    one pass; see gpt2_forward)."""
    if dlogits_in_forward:
        model.dlogits_in_forward = True
    config, recompute = model.config, model.recompute
    precision, master = model.precision, model.use_master_weights
    model.shard = shard or ShardLayout(model.param_shapes)
    shard_size = model.shard.num_state
    flash = model.flash
    memory = device_memory()
    print(model.attention_line)
    for line in memory_report(config, B, T, recompute, memory, precision, master, shard_size, flash):
        print(line)
    if B > largest_indexable_batch(config, T, flash):
        largest = largest_indexable_batch(config, T, flash)
        attention_binds = not flash and config.num_heads * T > 4 * config.channels
        tensor = (f"the attention tensor (B,NH,T,T) has {B * config.num_heads * T * T:,}" if attention_binds
                  else f"the MLP's (B,T,4C) has {B * T * 4 * config.channels:,}")
        raise ConfigError(f"B={B} T={T}: {tensor} elements, more than the kernels' 32-bit indices reach (2^31); "
                          f"use -b {largest} or less at T={T}")
    needed = state_bytes_to_allocate(config, B, T, recompute, precision, master, shard_size, flash)
    if memory is not None and needed > memory[0]:
        largest = largest_batch_size(config, T, recompute, memory[0], precision, master, shard_size, flash)
        fix = (f"use -b {largest} or less" if largest > 0 else "even B=1 does not fit: use a smaller -t") + \
            (", or -r 2 (recompute more)" if recompute < 2 and largest > 0 else "")
        raise ConfigError(f"B={B} T={T} needs {MiB(needed)} of device memory for activations, gradients and "
                          f"optimizer state, but {MiB(memory[0])} is free; the largest B that fits at T={T} is "
                          f"{largest}: {fix}")
    buffers = {name: (n, dtype) for name, n, dtype, _ in
               state_buffers(config, B, T, recompute, precision, master, shard_size, flash)}
    model.batch_size, model.seq_len = B, T
    floatx_shapes, fp32_shapes = split_activations(activation_shapes(config, B, T, recompute, flash))
    model.acts_memory = xp.zeros(*buffers["activations"])
    model.acts_fp32_memory = xp.zeros(*buffers["activation statistics"])
    model.acts = host.views(model.acts_memory, floatx_shapes)
    vars(model.acts).update(vars(host.views(model.acts_fp32_memory, fp32_shapes)))
    model.acts.logits = view(model.acts.output, B, T, config.padded_vocab_size)  # the logits live in the scratch buffer
    model.grads_acts_memory = xp.zeros(*buffers["activation gradients"])
    model.grads_acts = host.views(model.grads_acts_memory, grad_activation_shapes(config, B, T, flash))
    if flash:
        model.flash_scratch = xp.zeros(*buffers["flash attention backward scratch"])
    # scratch of the deterministic backward kernels: per-block partial sums of dweight/dbias
    # (layernorm), and the positions of the batch grouped by token (encoder)
    model.layernorm_scratch = xp.zeros(*buffers["layernorm backward scratch"])
    model.matmul_scratch = xp.zeros(*buffers["matmul backward bias scratch"])  # matmul_backward's bias partials
    model.bucket_memory = xp.zeros(*buffers["encoder backward buckets"])
    model.m_memory = xp.zeros(*buffers["AdamW optimizer state m"])
    model.v_memory = xp.zeros(*buffers["AdamW optimizer state v"])
    if model.use_master_weights:
        # this rank's pieces of the fp32 values, compact; one host -> device copy
        model.master_memory = xp.array(model.shard.gather(model.master_init))
        model.master_init = None
    model.inputs = xp.zeros((B, T), dtype=np.int32)
    model.targets = xp.zeros((B, T), dtype=np.int32)


def gpt2_forward(model, inputs, targets, B, T):
    """inputs, targets: host int arrays (B,T); targets may be None. Leaves the logits (B,T,Vp) in
    model.acts.logits and, with targets, sets model.mean_loss (reading it back waits for the GPU).
    With targets and model.dlogits_in_forward set (a training loop that always runs gpt2_backward
    next), the classifier kernel overwrites the logits with their gradient in this same pass, as llm.c
    does, and gpt2_backward skips its own classifier launch: one read of the (B,T,Vp) logits fewer
    per micro-step, the same bits; model.acts.logits then holds dlogits, not logits."""
    config = model.config
    V, Vp, L, NH, C = (config.vocab_size, config.padded_vocab_size, config.num_layers,
                       config.num_heads, config.channels)
    inputs, targets = host.check_batch(config, inputs, targets, B, T)

    # the activations are allocated for one B and T (as llm.c, which then insists on them)
    if model.acts_memory is None:
        gpt2_allocate_state(model, B, T)
    elif (B, T) != (model.batch_size, model.seq_len):
        raise ConfigError(f"gpt2_forward: the model was set up for B={model.batch_size} T={model.seq_len}, "
                         f"got B={B} T={T}")

    model.inputs[...] = xp.asarray(inputs)       # host -> device
    model.inputs_host = np.array(inputs, dtype=np.int32)  # a host copy: the encoder's backward groups it by token
    if targets is not None:
        model.targets[...] = xp.asarray(targets)

    params, acts = model.params, model.acts
    scratch = acts.output
    encoder_forward(acts.encoded, model.inputs, params.wte, params.wpe, B, T, C)
    # every LayerNorm that reads a residual just made is fused with the residual_forward that makes it
    # (fused_residual_forward: the same bits, one launch and one read of the residual fewer); only the
    # first, on the embeddings, runs alone. With recompute, ln1, ln2 and fch_gelu are buffers all
    # layers share: layer() picks the right one
    layernorm_forward(layer(acts.ln1, 0), acts.ln1_mean[0], acts.ln1_rstd[0], acts.encoded,
                      params.ln1w[0], params.ln1b[0], B, T, C)
    for l in range(L):
        residual = acts.encoded if l == 0 else acts.residual3[l - 1]
        # qkv: kept per layer for flash's backward; else in the scratch buffer, which the permute consumes
        qkv = acts.qkv[l] if model.flash else view(scratch, B, T, 3 * C)
        ln1, ln2, fch_gelu = layer(acts.ln1, l), layer(acts.ln2, l), layer(acts.fch_gelu, l)
        # ln1 = layernorm(residual): made before the loop (l = 0) or by the last line of layer l-1
        matmul_forward(qkv, ln1, params.qkvw[l], params.qkvb[l], B, T, C, 3 * C, gelu_fusion=model.gelu_fusion)
        if model.flash:   # atty and the softmax's log-sum-exp straight from qkv: no (B,NH,T,T) tensor
            flash_attention_forward(acts.atty[l], acts.lse[l], qkv, B, T, C, NH)
        else:
            attention_forward(acts.atty[l], acts.qkvr[l], acts.att[l], scratch, B, T, C, NH)
        matmul_forward(acts.attproj[l], acts.atty[l], params.attprojw[l], params.attprojb[l], B, T, C, C,
                       gelu_fusion=model.gelu_fusion)
        # residual2 = residual + attproj; ln2 = layernorm(residual2)
        fused_residual_forward(acts.residual2[l], ln2, acts.ln2_mean[l], acts.ln2_rstd[l], residual,
                               acts.attproj[l], params.ln2w[l], params.ln2b[l], B, T, C)
        # fch_gelu = gelu(fch), fch = fc(ln2) kept for the backward (-ge 1|2: one fused GEMM)
        matmul_forward(fch_gelu, ln2, params.fcw[l], params.fcb[l], B, T, C, 4 * C, pre_gelu=acts.fch[l],
                       gelu_fusion=model.gelu_fusion)
        matmul_forward(acts.fcproj[l], fch_gelu, params.fcprojw[l], params.fcprojb[l], B, T, 4 * C, C,
                       gelu_fusion=model.gelu_fusion)
        # residual3 = residual2 + fcproj, and the LayerNorm that reads it: the next layer's ln1, or lnf
        if l + 1 < L:
            next_ln = (layer(acts.ln1, l + 1), acts.ln1_mean[l + 1], acts.ln1_rstd[l + 1],
                       params.ln1w[l + 1], params.ln1b[l + 1])
        else:
            next_ln = (acts.lnf, acts.lnf_mean, acts.lnf_rstd, params.lnfw, params.lnfb)
        normed, mean, rstd, weight, bias = next_ln
        fused_residual_forward(acts.residual3[l], normed, mean, rstd, acts.residual2[l], acts.fcproj[l],
                               weight, bias, B, T, C)

    matmul_forward(acts.logits, acts.lnf, params.wte, None, B, T, C, Vp)   # wte is the classifier

    # what model.acts.logits holds now: the logits, or (dlogits_in_forward) already their gradient
    model.dlogits_ready = targets is not None and getattr(model, "dlogits_in_forward", False)
    if targets is not None:
        # the losses; the logits stay as they are (the backward pass turns them into dlogits) unless
        # dlogits_in_forward asks for the gradient now, in the same launch
        fused_classifier(acts.logits, acts.losses, None, model.targets, B, T, V, Vp,
                         write_dlogits=int(model.dlogits_ready))
        model.mean_loss = float(acts.losses.mean())                         # device -> host, the sync
    else:
        model.mean_loss = -1.0


def gpt2_zero_grad(model):
    # the activation gradients need no zeroing: the kernels write (=) them, and the one buffer
    # the layernorms add into (the residual stream's) is cleared at the start of gpt2_backward
    model.grads_memory.fill(0)


def gpt2_backward(model):
    """Gradients of the mean loss of the last forward pass (with targets) into model.grads.
    model.reduce_in_backward: None, or (data parallel on GPUs, the last micro-step) a
    collectives.OverlappedReduction that sums each layer's gradients over the ranks as soon as they are
    final, on a second stream, as llm.c's gpt2_backward_and_reduce; cleared once used."""
    if model.mean_loss == -1.0:
        raise RuntimeError("gpt2_backward: run gpt2_forward with targets first")
    reduction, model.reduce_in_backward = getattr(model, "reduce_in_backward", None), None
    config = model.config
    B, T = model.batch_size, model.seq_len
    V, Vp, L, NH, C = (config.vocab_size, config.padded_vocab_size, config.num_layers,
                       config.num_heads, config.channels)
    params, grads, acts, grads_acts = model.params, model.grads, model.acts, model.grads_acts
    dresidual = grads_acts.residual3  # the gradient of the residual stream (B,T,C): the layernorms add into it
    dresidual.fill(0)                 # (so it starts from zero at every micro-step of gradient accumulation)
    # the loss is the mean over B*T positions: the classifier kernel seeds dloss = 1/(B*T) and
    # overwrites the logits with dlogits (B,T,Vp), pad columns 0 (unless the forward pass did already)
    if not getattr(model, "dlogits_ready", False):
        fused_classifier(acts.logits, acts.losses, None, model.targets, B, T, V, Vp, write_dlogits=1)
    model.dlogits_ready = False       # acts.output is the backward's scratch from here on
    dlogits = acts.logits
    # llm.c's two scratch buffers for the activation gradients of one layer at a time:
    buffer_b = grads_acts.bt4c        # (B,T,4C): the backward's own scratch, nothing in it yet
    dlnf = view(buffer_b, B, T, C)
    matmul_backward(dlnf, grads.wte, None, dlogits, acts.lnf, params.wte, None, B, T, C, Vp)
    buffer_a = acts.lnf               # (B,T,C): lnf is no longer needed after the classifier's backward
    residual = acts.residual3[L - 1]
    ln_scratch = model.layernorm_scratch  # every layernorm_backward's per-block partials of dweight/dbias
    mm_scratch = model.matmul_scratch     # every matmul_backward's per-block partials of dbias
    # each LayerNorm backward also takes the bias gradient of the linear layer whose output joined the residual
    # stream there, from the stream's gradient it has just updated: lnf the last fcproj's, ln2 attproj's, ln1 the
    # previous layer's fcproj's (so those matmul_backward calls get no dbias)
    layernorm_backward(dresidual, grads.lnfw, grads.lnfb, ln_scratch, dlnf, residual, params.lnfw,
                       acts.lnf_mean, acts.lnf_rstd, B, T, C,
                       linear_dbias=grads.fcprojb[L - 1], linear_scratch=mm_scratch)
    # the materialized attention backward's scratch, the same buffers for every layer (flash needs neither):
    datt = acts.output                # >= (B,NH,T,T): held dlogits, no longer needed after the classifier's backward
    dpreatt = None if model.flash else grads_acts.preatt   # (B,NH,T,T): the backward's own scratch

    for l in reversed(range(L)):
        residual = acts.encoded if l == 0 else acts.residual3[l - 1]
        ln1, ln2, fch_gelu = layer(acts.ln1, l), layer(acts.ln2, l), layer(acts.fch_gelu, l)
        # recompute (-r): the shared buffers hold the last layer's values; the same kernels on the same
        # inputs (kept per layer) give this layer's bits back, so every -r trains bit for bit alike.
        # With -ge 1|2 too, as llm.c: fch (the GEMM's aux) is kept per layer and gelu_forward recomputes
        # from it; in bf16 that is GELU of the ROUNDED pre-GELU where the fused forward took the unrounded
        # sum, so -r 1 and -r 0 may then differ by a bf16 rounding in fch_gelu (and dfcprojw)
        if model.recompute >= 1:
            gelu_forward(fch_gelu, acts.fch[l], B * T * 4 * C)
        if model.recompute >= 2:
            layernorm_forward(ln2, acts.ln2_mean[l], acts.ln2_rstd[l], acts.residual2[l],
                              params.ln2w[l], params.ln2b[l], B, T, C)
        # residual3 = residual2 + fcproj(gelu(fc(ln2(residual2))))
        # buffer_b = dfch, through GELU's gradient (-ge 2: in the GEMM's epilogue)
        matmul_backward(buffer_b, grads.fcprojw[l], None, dresidual, fch_gelu,   # dbias: the LayerNorm after it
                        params.fcprojw[l], mm_scratch, B, T, 4 * C, C, pre_gelu=acts.fch[l],
                        gelu_fusion=model.gelu_fusion)
        matmul_backward(buffer_a, grads.fcw[l], grads.fcb[l], buffer_b, ln2, params.fcw[l], mm_scratch, B, T, C, 4 * C)
        layernorm_backward(dresidual, grads.ln2w[l], grads.ln2b[l], ln_scratch, buffer_a, acts.residual2[l],
                           params.ln2w[l], acts.ln2_mean[l], acts.ln2_rstd[l], B, T, C,
                           linear_dbias=grads.attprojb[l], linear_scratch=mm_scratch)
        # residual2 = residual + attproj(attention(qkv(ln1(residual))))
        matmul_backward(buffer_a, grads.attprojw[l], None, dresidual, acts.atty[l],   # dbias: ln2's backward
                        params.attprojw[l], mm_scratch, B, T, C, C)
        dqkv = view(buffer_b, B, T, 3 * C)
        if model.flash:   # the probabilities recomputed from q, k and lse; atty (the forward's out) still intact
            flash_attention_backward(dqkv, model.flash_scratch, buffer_a, acts.qkv[l], acts.atty[l], acts.lse[l],
                                     B, T, C, NH)
        else:
            dqkvr = acts.fch[l]       # (B,T,4C) >= 3*B*T*C: layer l's fch was read for the last time by gelu_backward
            dvaccum = acts.atty[l]    # (B,T,C): layer l's atty was read for the last time by attproj's matmul_backward
            attention_backward(dqkv, dqkvr, dpreatt, datt, dvaccum, buffer_a,
                               acts.qkvr[l], acts.att[l], B, T, C, NH)
        if model.recompute >= 2:
            layernorm_forward(ln1, acts.ln1_mean[l], acts.ln1_rstd[l], residual,
                              params.ln1w[l], params.ln1b[l], B, T, C)
        matmul_backward(buffer_a, grads.qkvw[l], grads.qkvb[l], dqkv, ln1, params.qkvw[l], mm_scratch, B, T, C, 3 * C)
        layernorm_backward(dresidual, grads.ln1w[l], grads.ln1b[l], ln_scratch, buffer_a, residual, params.ln1w[l],
                           acts.ln1_mean[l], acts.ln1_rstd[l], B, T, C,
                           linear_dbias=grads.fcprojb[l - 1] if l > 0 else None, linear_scratch=mm_scratch)
        if reduction is not None:     # layer l's gradients are final: reduce them while the layers below run
            reduction.layer(l)
    buckets = encoder_buckets(model.inputs_host, model.bucket_memory)  # the batch's positions grouped by token
    encoder_backward(grads.wte, grads.wpe, dresidual, model.inputs_host, B, T, C, buckets,
                     seed=random_u32(model.rng_state))
    if reduction is not None:
        reduction.outside()
        reduction.finish()


def gpt2_stats_activations(model):
    """-as (llmc/actstats.py): (name, layer or None, device array) of the tensors whose statistics it writes, as
    train_gpt2.py's, after the backward pass. That pass used some activations as its scratch (lnf; fch as
    dqkvr on the materialized path), and -r 2 keeps one ln1 and one ln2 for all layers: those are recomputed
    here by the forward pass's own launches from what is kept per layer (the residual stream, LayerNorm's mean
    and rstd), into buffers the next forward pass writes before it reads them, so training is untouched. The
    entropies: of att's rows on the materialized path; with flash (no probabilities kept) of a sample of rows
    recomputed from q and k (actstats.sampled_entropy). Each tensor is reduced before the next launch reuses
    its buffer (one stream), and nothing here waits for the GPU."""
    config, acts, params = model.config, model.acts, model.params
    B, T, L, NH, C = model.batch_size, model.seq_len, config.num_layers, config.num_heads, config.channels
    yield "encoded", None, acts.encoded
    for l in range(L):
        residual = acts.encoded if l == 0 else acts.residual3[l - 1]
        ln1, ln2, fch_gelu = layer(acts.ln1, l), layer(acts.ln2, l), layer(acts.fch_gelu, l)
        if model.recompute >= 2:
            layernorm_forward(ln1, acts.ln1_mean[l], acts.ln1_rstd[l], residual, params.ln1w[l], params.ln1b[l],
                              B, T, C)
        yield "ln1", l, ln1
        entropies = actstats.sampled_entropy(acts.qkv[l], NH) if model.flash else actstats.row_entropy(acts.att[l])
        yield actstats.ENTROPY, l, entropies
        yield "residual2", l, acts.residual2[l]
        if model.recompute >= 2:
            layernorm_forward(ln2, acts.ln2_mean[l], acts.ln2_rstd[l], acts.residual2[l], params.ln2w[l],
                              params.ln2b[l], B, T, C)
        yield "ln2", l, ln2
        if not model.flash:
            matmul_forward(fch_gelu, ln2, params.fcw[l], params.fcb[l], B, T, C, 4 * C, pre_gelu=acts.fch[l],
                           gelu_fusion=model.gelu_fusion)
        yield "fch", l, acts.fch[l]
        yield "residual3", l, acts.residual3[l]
    layernorm_forward(acts.lnf, acts.lnf_mean, acts.lnf_rstd, acts.residual3[L - 1], params.lnfw, params.lnfb,
                      B, T, C)
    yield "lnf", None, acts.lnf


# ----------------------------------------------------------------------------
# optimizer

REDUCES_IN_BACKWARD = True   # train(): with NCCL, the last micro-step's backward reduces the gradients itself

NORM_BLOCKS = 1024   # partial sums of the gradient norm kernel (a fixed grid: deterministic)


def _grad_sum_squares_on_device(model, lo, hi):
    """sum g^2 over grads[lo:hi] left on the device (a 0-d float32 array, no host sync): per-block partial
    sums of squares (a fixed grid: deterministic) into model.norm_partials, added there by CuPy. The next
    call may reuse norm_partials at once: the stream runs this sum before that call's kernel."""
    if not 0 <= lo < hi <= model.num_parameters:
        raise ValueError(f"gradient norm: range [{lo}, {hi}) is empty or outside the {model.num_parameters} "
                         f"gradients; pass 0 <= lo < hi <= the parameter count")
    grid = global_norm_squared(model.norm_partials, model.grads_memory[lo:hi], hi - lo)
    return model.norm_partials[:grid].sum()


def global_norm_squared(out, data, count):
    """out[:grid] = per-block partial sums of data[:count]**2 on a fixed grid of up to NORM_BLOCKS blocks of
    512 (deterministic: each block strides over the same elements every time). Returns grid, the partials
    to add (llm.c's global_norm_squared)."""
    block = 512
    grid = min(ceil_div(count, block), NORM_BLOCKS)
    kernel("adamw", "global_norm_squared_kernel", data.dtype)((grid,), (block,), (out, data, i64(count)))
    return grid


def gpt2_grad_sum_squares(model, lo=0, hi=None):
    """sum g^2 over grads[lo:hi] (a python float): added on the device; reading it is a host sync, as in
    llm.c."""
    return float(_grad_sum_squares_on_device(model, lo, model.num_parameters if hi is None else hi))


def gpt2_pieces_sum_squares(model, ranges):
    """sum g^2 over several ranges (ZeRO-1's pieces of this rank's shard, (lo, hi) each) with ONE host sync:
    each range's float32 sum stays on the device, the sums are copied to the host together, and added there
    in float64 in the ranges' order. The same bits as adding gpt2_grad_sum_squares range by range (one sync
    each). ZeRO-1 adds each rank's result across the ranks."""
    sums = [_grad_sum_squares_on_device(model, lo, hi) for lo, hi in ranges]
    return sum(float(x) for x in to_numpy(xp.stack(sums))) if sums else 0.0


def gpt2_calculate_grad_norm(model):
    """The L2 norm of all gradients together (python float)."""
    return math.sqrt(gpt2_grad_sum_squares(model))


def gpt2_update(model, learning_rate, beta1, beta2, eps, weight_decay, t, grad_scale=1.0, shard=None):
    """AdamW as PyTorch's: gradients scaled by grad_scale (clipping), weight decay on the 2-D
    weights only; each parameter tensor with its own stochastic-rounding seed from the model's generator
    (drawn in llm.c's order), on a grid with one row per layer (llm.c's gpt2_update and adamw_kernel3: an
    element's random draw is fixed by its place in its layer and its layer). All the tensors in ONE
    launch (adamw_multi_tensor_kernel, bit for bit llm.c's per-tensor launches) after one upload of the
    16 seeds; gpt2_update_per_tensor launches them one by one (the reference the tests compare). With
    master weights (bf16, -w 1) AdamW updates the fp32 copy and rounds it into the bf16 parameters;
    without (-w 0) it updates the bf16 weights. shard: ZeRO-1's collectives.ShardLayout, only this
    rank's 1/N of each layer of each tensor moves; m, v and the master weights hold those pieces
    compactly (as gpt2_allocate_state made them)."""
    if model.m_memory is None:
        raise RuntimeError("gpt2_update: run gpt2_forward first (gpt2_allocate_state makes AdamW's m and v)")
    layout = shard or ShardLayout(model.param_shapes)
    assert model.m_memory.size == layout.num_state, "the optimizer state is not this shard's"
    beta1_correction = 1.0 - beta1 ** t
    beta2_correction = 1.0 - beta2 ** t
    model.rng_state_last_update = model.rng_state[0]   # saved in a checkpoint, as llm.c
    table, table_rows, blocks = _adamw_table(model, layout)
    seeds = xp.asarray(np.array([random_u32(model.rng_state) for _ in layout.tensors], dtype=np.uint32))  # one copy
    adamw_multi_tensor(model.params_memory, model.master_memory, model.grads_memory, model.m_memory, model.v_memory,
                       table, table_rows, blocks, seeds, learning_rate, beta1, beta2, beta1_correction,
                       beta2_correction, eps, weight_decay, grad_scale)


def adamw_multi_tensor(params, master, grads, m, v, table, table_rows, blocks, seeds, learning_rate, beta1, beta2,
                       beta1_correction, beta2_correction, eps, weight_decay, grad_scale):
    """Every tensor's AdamW in one launch of `blocks` blocks of ADAMW_BLOCK: table (table_rows x ADAMW_FIELDS
    long longs) and blocks as _adamw_table makes them, seeds one per tensor; master None without master
    weights. The decay is per tensor, from the table's flag times weight_decay."""
    kernel("adamw", "adamw_multi_tensor_kernel", params.dtype)(
        (blocks,), (ADAMW_BLOCK,),
        (params, NULL if master is None else master, grads, m, v, table, i32(table_rows), seeds, f32(learning_rate),
         f32(beta1), f32(beta2), f32(beta1_correction), f32(beta2_correction), f32(eps), f32(weight_decay),
         f32(grad_scale)))


def gpt2_update_per_tensor(model, learning_rate, beta1, beta2, eps, weight_decay, t, grad_scale=1.0, shard=None):
    """gpt2_update as llm.c launches it: adamw_kernel once per parameter tensor (16 launches). The same
    bits as gpt2_update's one launch; kept as the reference the tests hold that launch to."""
    if model.m_memory is None:
        raise RuntimeError("gpt2_update_per_tensor: run gpt2_forward first (gpt2_allocate_state makes AdamW's m and v)")
    layout = shard or ShardLayout(model.param_shapes)
    assert model.m_memory.size == layout.num_state, "the optimizer state is not this shard's"
    beta1_correction = 1.0 - beta1 ** t
    beta2_correction = 1.0 - beta2 ** t
    model.rng_state_last_update = model.rng_state[0]
    for index, name, w, s, part, rows, stride in _update_launches(layout):
        seed = random_u32(model.rng_state)                # one per tensor, as llm.c
        wd = weight_decay if name in host.DECAYED_PARAMS else 0.0  # the 2-D weights only
        master = None if model.master_memory is None else model.master_memory[s:]
        adamw_update(model.params_memory[w:], master, model.grads_memory[w:], model.m_memory[s:], model.v_memory[s:],
                     part, stride, rows, learning_rate, beta1, beta2, beta1_correction, beta2_correction, eps, wd,
                     grad_scale, seed)


def adamw_update(params, master, grads, m, v, part, stride, rows, learning_rate, beta1, beta2, beta1_correction,
                 beta2_correction, eps, weight_decay, grad_scale, seed):
    """llm.c's adamw_update: AdamW on `rows` rows (layers) of `part` elements, row y of the parameters and
    gradients at y * stride, of m, v and master (None: no master weights) at y * part; a grid row per layer
    of blocks of ADAMW_BLOCK, whose (thread, block, row) place fixes each element's stochastic rounding."""
    kernel("adamw", "adamw_kernel", params.dtype)(
        (ceil_div(part, ADAMW_BLOCK), rows), (ADAMW_BLOCK,),
        (params, NULL if master is None else master, grads, m, v, i64(part), i64(stride), i64(part),
         f32(learning_rate), f32(beta1), f32(beta2), f32(beta1_correction), f32(beta2_correction), f32(eps),
         f32(weight_decay), f32(grad_scale), u32(seed)))


ADAMW_BLOCK = 512   # llm.c's: the stochastic rounding's draws depend on it, so it is part of the checkpoint format


ADAMW_FIELDS = 8    # long longs per tensor in adamw_multi_tensor_kernel's table (kernels/adamw.cu)


def _adamw_table(model, layout):
    """adamw_multi_tensor_kernel's table for this rank's layout, uploaded on the first update and kept
    (the layout of a run never changes): (device table, its rows (a power of two), the grid's blocks)."""
    key = (layout.rank, layout.size)
    cached = getattr(model, "adamw_table", None)        # None too on a model an older trainer made (tests)
    if cached is None or cached[0] != key:
        launches = list(_update_launches(layout))
        table_rows = 1 << max(len(launches) - 1, 0).bit_length()       # a power of two >= the tensors
        table = np.zeros((table_rows, ADAMW_FIELDS), dtype=np.int64)
        table[:, 0] = np.iinfo(np.int64).max                           # padding rows: never a block's tensor
        first = 0
        for t, (index, name, w, s, part, rows, stride) in enumerate(launches):
            per_row = ceil_div(part, ADAMW_BLOCK)
            decay = name in host.DECAYED_PARAMS                          # the 2-D weights only
            table[t, :7] = (first, per_row, part, w, stride, s, int(decay))
            first += per_row * rows
        model.adamw_table = (key, xp.asarray(table.reshape(-1)), table_rows, first)
    return model.adamw_table[1:]


def _update_launches(layout):
    """Per tensor, AdamW's launch over this rank's pieces (llm.c's gpt2_update): (index, name, first piece's
    start in the parameters, in the state, the piece's size, rows = layers, the parameters' row stride)."""
    for index, name, offset, slice_size, layers in layout.tensors:
        part = slice_size // layout.size
        yield index, name, offset + layout.rank * part, offset // layout.size, part, layers, slice_size


def gpt2_rebuild_from_master(model):
    """llm.c's init_from_master: this rank's pieces of the bf16 parameters rounded again from the master
    weights with the generator as it was before the last update (the seeds that update drew), so they come
    out as that update wrote them. Returns how many of those parameters changed (0 when the master
    weights and the parameters belong together)."""
    if model.master_memory is None or model.floatx != BF16:
        return 0
    before = model.shard.gather(to_numpy(model.params_memory))
    generator = [model.rng_state_last_update]
    for index, name, w, s, part, rows, stride in _update_launches(model.shard):
        init_from_master(model.params_memory[w:], model.master_memory[s:], part, stride, rows,
                         random_u32(generator))
    return int(np.count_nonzero(model.shard.gather(to_numpy(model.params_memory)) != before))


def init_from_master(params, master, part, stride, rows, seed):
    """llm.c's init_from_master: the floatX params rounded (stochastically, with seed) from the fp32 master
    weights, on adamw_update's grid (rows of `part`, params' rows `stride` apart), so that each element
    draws what adamw_update's launch with the same seed drew."""
    kernel("adamw", "init_from_master_kernel", params.dtype)(
        (ceil_div(part, ADAMW_BLOCK), rows), (ADAMW_BLOCK,), (params, master, i64(part), i64(stride), i64(part),
                                                           u32(seed)))


def gpt2_optimizer_state(model, size=None):
    """AdamW's (m, v) copied to the host as float32, for a checkpoint's state file (this rank's shard of
    them under ZeRO-1: gpt2_allocate_state sized them; `size` is for the NumPy trainer's interface)."""
    return to_numpy(model.m_memory).astype(np.float32, copy=False), to_numpy(model.v_memory).astype(np.float32, copy=False)


def gpt2_load_optimizer_state(model, m, v):
    """AdamW's m and v from a checkpoint (host float32 arrays) uploaded into the buffers
    gpt2_allocate_state made."""
    if model.m_memory is None:
        raise RuntimeError("gpt2_load_optimizer_state: call gpt2_allocate_state first")
    model.m_memory[...] = xp.asarray(m, dtype=OPT_DTYPE)
    model.v_memory[...] = xp.asarray(v, dtype=OPT_DTYPE)


def gpt2_master_state(model):
    """What a checkpoint keeps besides m and v: (this rank's master weights on the host in m's compact
    layout, or None without them, the generator's state, its state before the last update). fp32 with
    -w 1 gives its parameters' pieces, which are what llm.c's fp32 build keeps as master weights."""
    if model.master_memory is not None:
        master = to_numpy(model.master_memory)
    elif model.master_in_state and model.floatx != BF16:
        master = model.shard.gather(to_numpy(model.params_memory)).astype(np.float32)
    else:
        master = None
    return master, model.rng_state[0], model.rng_state_last_update


def gpt2_load_master_state(model, master, rng_state, rng_state_last_update):
    """Restore gpt2_master_state's three from a checkpoint (after gpt2_allocate_state and the model file's
    parameters). bf16 with master weights: the parameters are then rebuilt from them as llm.c's load_state
    does (gpt2_rebuild_from_master), which gives the model file's bits back; where it does not (a checkpoint
    written before the first update, whose master weights the first update has not yet rounded), the
    model file's are kept, with a line saying so. fp32 keeps its parameters from the model file."""
    model.rng_state[0] = rng_state
    model.rng_state_last_update = rng_state_last_update
    if not model.use_master_weights:
        return
    model.master_memory[...] = xp.asarray(master, dtype=OPT_DTYPE)
    saved = model.params_memory.copy()
    changed = gpt2_rebuild_from_master(model)
    if changed:
        model.params_memory[...] = saved
        print(f"the master weights round to {changed:,} parameters other than the model file's (a checkpoint "
              f"before the first update): the model file's kept")


# ----------------------------------------------------------------------------
# main: train_gpt2.py's loop (train_gpt2.train) and flags, with llm.c train_gpt2.cu's defaults

TRAIN_GPT2_CU_DEFAULTS = {name: v for name, v in host.TRAIN_GPT2_C_DEFAULTS.items() if name != "profile"}
TRAIN_GPT2_CU_DEFAULTS.update({
    "T": 1024,                   # sequence length (a smaller model's max_seq_len when -t is not given)
    "max_steps": -1,             # one epoch
    "learning_rate": 3e-4,
    "val_loss_every": 20, "val_max_steps": 20,
    "load_filename": "gpt2_124M_bf16.bin",   # llm.c's; gpt2_124M.bin in fp32; gpt2_d12.bin when neither is there
    "precision": "auto",         # bf16 (mixed precision, llm.c's mainline) where the GPU has it (SM >= 80), else fp32
    "use_master_weights": 1,     # bf16: AdamW updates an fp32 copy of the weights (0: the bf16 weights themselves)
    "override_enable_tf32": 1,   # TF32 tensor cores for the fp32 matmuls (0: full fp32, as test_gpt2.py uses)
    "recompute": 1,              # what the backward pass recomputes to save memory: 0 nothing, 1 GELU, 2 + LayerNorm
    # GELU fused into the fc GEMMs by cuBLASLt's epilogues: llm.c's default is 2 on sm_90 (0 before); here 0 until
    # dev/gpu_check.sh's gelu_fusion stage has compared -ge 2 with -ge 0 on a GPU
    "gelu_fusion": 0,
    # attention: flash (kernels/flash_attention.cu) where it runs (bf16, head size 64 or 128), else materialized
    "flash_attention": 1,
    # several GPUs and machines (NCCL; llm.c's flags and defaults): without torchrun or mpirun, -pn processes
    # started by hand, each with its -pr, find each other through -pi fs (-pf dir) or tcp (-ps IP)
    "num_processes": 1, "process_rank": 0, "gpus_per_node": 8,
    "nccl_init_method": "mpi", "server_ip": "", "fs_path": "",
    "log_gpu_every": -1,         # -lg N: the GPU's NVML readings every N steps (llmc/gpuinfo.py), off
})
SHOWN_DEFAULTS = dict(host.SHOWN_DEFAULTS, load_filename="gpt2_124M_bf16.bin in bf16, gpt2_124M.bin in fp32, "
                      "or gpt2_d12.bin when that is not there",
                      precision="auto: bf16 on GPUs with bf16 (SM >= 80) and the emulator, else fp32",
                      gelu_fusion="0; llm.c's 2 on sm_90 waits for a GPU check of -ge 2 against -ge 0",
                      flash_attention="1: flash in bf16 at head size 64 or 128; materialized in fp32 and elsewhere")
USAGE_NOTES = ("Without a GPU: LLMC_EMULATE=1 python train_gpt2_cuda.py ... runs the same kernels on the CPU",
               "(kernel emulator, slow: for tiny models and tests).")
# AdamW settings fixed in train_gpt2.cu (no flags): betas (0.9, 0.95), eps 1e-8, gradient clipping at 1.0
BETA1, BETA2, ADAM_EPS, GRAD_CLIP = 0.9, 0.95, 1e-8, 1.0


# what train_gpt2.train takes from its trainer module besides the model's functions (llmc/run.py's Trainer;
# NumPy's are in train_gpt2.py, next to the loop)

COLLECTIVES = "gloo" if EMULATE else "nccl"   # data parallel: NumPy arrays on the emulator, CuPy's on GPUs


@dataclass
class CudaSettings(DeviceSettings):
    """What device_setup decided for the run, which gpt2_build_from_descriptor builds the model with (the
    defaults: the library's, fp32)."""
    master_weights: bool = True                           # -w (bf16 updates them; fp32 -w 1 writes them)
    recompute: int = TRAIN_GPT2_CU_DEFAULTS["recompute"]  # -r
    gelu_fusion: int = 0                                  # -ge as it runs (0 where cuBLASLt cannot be loaded)
    flash_attention: int = 1                              # -fa as given (GPT2's attention_path decides)
    rank: int = 0                                         # the stochastic rounding is seeded 13371337 + this
    gpu_log: GpuLog = None                                # -lg's readings


def compute_capability():
    """The GPU's SM version as an int (80 for sm_80); the emulator stands in for an sm_90."""
    return 90 if EMULATE else int(xp.cuda.Device().compute_capability)


def choose_precision(args):
    """-p auto|bf16|fp32 -> "bf16" or "fp32", with the one-line errors of a GPU without bf16."""
    if args.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"-p must be bf16, fp32 or auto, got {args.precision}")
    if args.use_master_weights not in (0, 1):
        raise ConfigError(f"-w must be 0 or 1 (keep fp32 master weights?), got {args.use_master_weights}")
    sm = compute_capability()
    if args.precision == "bf16" and sm < 80:
        raise ConfigError(f"-p bf16 needs a GPU with bf16 (SM >= 80); {device_name()} is sm_{sm}: use -p fp32")
    if args.precision != "auto":
        return args.precision
    if sm >= 80:
        return "bf16"
    model_file = args.load_filename      # only a file the user named: without -e, fp32 takes gpt2_124M.bin
    if "load_filename" in args.given and os.path.exists(model_file) and model_file.endswith(".bin") and \
            read_header(model_file, MODEL_MAGIC, (3, 5))[0][1] == 5:
        raise ConfigError(f"{model_file} is bf16 (version 5) and {device_name()} (sm_{sm}) has no bf16 "
                          f"(SM >= 80 needed); -p fp32 runs it widened to fp32")
    return "fp32"


def device_setup(args, world=None):
    """Runs before the model is built: checks -r, -p, -w, -fa and -ge (cuBLASLt loaded, else -ge 0), picks the
    default model file for the precision, TF32 on or off (-f); returns the run's CudaSettings, with the lines
    print_config adds. world: the data-parallel World. Each rank seeds its stochastic rounding with
    13371337 + rank, as llm.c, under ZeRO-1 (each rank rounds its own shard, then all-gathers it). Under
    ZeRO-0 every rank updates all the parameters, and rounding them with different seeds (as llm.c does)
    would leave the ranks' bf16 weights different by an ulp here and there: there all ranks use rank 0's seed."""
    world_rank = world.rank if world is not None else 0
    check_recompute(args.recompute)
    check_gelu_fusion(args.gelu_fusion)
    check_flash_attention(args.flash_attention)
    precision = choose_precision(args)
    settings = CudaSettings(name=device_name(), precision=precision, master_weights=bool(args.use_master_weights),
                            recompute=args.recompute, gelu_fusion=args.gelu_fusion,
                            flash_attention=args.flash_attention, rank=world_rank if args.zero_stage == 1 else 0)
    if precision == "fp32" and "load_filename" not in args.given:
        args.load_filename = "gpt2_124M.bin"             # llm.c's fp32 build's default
    tf32 = set_tf32(args.override_enable_tf32) if precision == "fp32" else False
    settings.gemm_precision = "bf16" if precision == "bf16" else "tf32" if tf32 else "fp32"
    lines = settings.lines
    lines.append(f"device: {settings.name}")
    why_not = cublaslt_available() if settings.gelu_fusion else None
    if why_not is not None:
        print(f"-ge {settings.gelu_fusion}: cuBLASLt cannot be loaded ({why_not}): running -ge 0 (no GELU fusion)")
        settings.gelu_fusion = 0
    if settings.gelu_fusion:
        lines.append(f"gelu fusion: -ge {settings.gelu_fusion} ({GELU_FUSION[settings.gelu_fusion]}, cuBLASLt "
                     f"epilogues)")
    if precision == "fp32" and args.flash_attention == 1 and "flash_attention" in args.given:
        print(f"-fa 1: {flash_unavailable(None, 'fp32')}: running the materialized attention")
    if precision == "bf16":
        master = "fp32 master weights" if settings.master_weights else "no master weights (-w 0)"
        lines.append(f"precision: bf16 parameters, gradients and activations; fp32 AdamW state, {master}")
    else:
        lines += ["precision: fp32", f"TF32: {'enabled' if tf32 else 'disabled'}"]
    settings.gpu_log = GpuLog(args.log_gpu_every, args.output_log_dir,
                              None if EMULATE or args.log_gpu_every <= 0 else xp.cuda.Device().pci_bus_id)
    return settings


def log_gpu_info(step, logger, settings):
    """-lg N: the GPU's readings after the step line of every N-th step (train_gpt2.train calls this)."""
    if settings.gpu_log is not None:
        settings.gpu_log.after_step(step, logger)


class StepTimer:
    """Times one training step on the GPU's clock with two CUDA events; stop() waits for the
    end event, the step's only sync besides reading the gradient norm."""

    def __init__(self):
        self.begin, self.end = Event(), Event()

    def start(self):
        self.begin.record()

    def stop(self):
        """Milliseconds between the two events."""
        self.end.record()
        self.end.synchronize()
        return elapsed_ms(self.begin, self.end)


def next_token_probs(model, tokens, t):
    """The probabilities (V,) of the token after tokens[0, :t]. The pass runs on the model's own
    (B, T), as llm.c's CUDA trainer: only row 0's logits at position t-1 travel to the host, where
    a softmax makes them probabilities for the shared sampler."""
    B, T = tokens.shape
    V = model.config.vocab_size
    gpt2_forward(model, tokens, None, B, T)
    logits = to_numpy(model.acts.logits[0, t - 1, :V])          # (V,) device -> host (bf16 widened)
    probs = np.exp(logits - logits.max(), dtype=np.float32)
    probs /= probs.sum(dtype=np.float32)
    return probs


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv, TRAIN_GPT2_CU_DEFAULTS, SHOWN_DEFAULTS,
                      USAGE_NOTES)   # -h needs no GPU
    require_gpu()
    launch(host.train, args, sys.modules[__name__])   # train_gpt2.py's loop, running this module


if __name__ == "__main__":
    main()
