"""NVRTC without a GPU: compile kernels/<file>.cu to a cubin as cupy.RawModule does on a GPU, and read
what ptxas says each kernel uses (registers, spills, static shared memory).

NVRTC is a library, not a driver call: it compiles CUDA C++ to PTX and, for a real architecture
(-arch=sm_90), runs ptxas to a cubin, with no GPU in the machine. It is loaded through ctypes from the
CUDA toolkit (lib64/libnvrtc.so) or, where the toolkit has none, from the nvidia-cuda-nvrtc wheel
(site-packages/nvidia/cu13/lib/libnvrtc.so.13). tests/test_nvrtc.py compiles every module with it.

    import nvrtc                          # with dev/ on sys.path
    lib = nvrtc.load()                    # OSError saying what was tried when there is none
    options = nvrtc.cupy_options(("--std=c++17",), arch=90) + ("-Xptxas=-v",)
    ok, log, cubin = nvrtc.compile_program(lib, kernel_source("gelu"), "gelu.cu", options)
    nvrtc.ptxas_usage(log)                # {"gelu_forward_kernel": {"registers": 13, ...}, ...}
"""

import ctypes
import glob
import importlib.util
import os
import re
import shutil


def cuda_roots():
    """The folders where a CUDA toolkit may be, in the order the trainer and CuPy look: $CUDA_PATH,
    $CUDA_HOME, the folder above nvcc's bin/ (nvcc found on PATH, links resolved), /usr/local/cuda."""
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    return [r for r in dict.fromkeys(roots) if r and os.path.isdir(r)]


def toolkit_root():
    """The first toolkit folder whose include/ holds cuda_bf16.h (common.cuh includes it; NVRTC has no
    copy of its own), or None."""
    return next((r for r in cuda_roots() if os.path.exists(os.path.join(r, "include", "cuda_bf16.h"))), None)


def libnvrtc_candidates():
    """libnvrtc.so files to try, best first: each toolkit's lib64/ and lib/, then the nvidia-cuda-nvrtc
    wheel (nvidia/cu13/lib for CUDA 13, nvidia/cuda_nvrtc/lib for 12), newest version first in a folder."""
    folders = [os.path.join(r, sub) for r in cuda_roots() for sub in ("lib64", "lib", "targets/x86_64-linux/lib")]
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        folders += [os.path.join(base, "*", "lib") for base in spec.submodule_search_locations]
    found = []
    for folder in folders:
        names = [p for p in glob.glob(os.path.join(folder, "libnvrtc.so*")) if "builtins" not in p]
        found += sorted(names, key=lambda p: [int(n) for n in re.findall(r"\d+", os.path.basename(p))], reverse=True)
    return list(dict.fromkeys(os.path.realpath(p) for p in found))


def load():
    """NVRTC's library with the argument types of the calls used here, .path and .version = (major, minor).
    OSError, saying where it looked, when none is found or none loads."""
    tried = []
    for path in libnvrtc_candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path}: {e}")
            continue
        P, S, I = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(P), ctypes.c_char_p, ctypes.c_char_p, I, P, P]
        lib.nvrtcCompileProgram.argtypes = [P, I, ctypes.POINTER(ctypes.c_char_p)]
        for get in ("ProgramLog", "CUBIN"):
            getattr(lib, f"nvrtcGet{get}Size").argtypes = [P, ctypes.POINTER(S)]
            getattr(lib, f"nvrtcGet{get}").argtypes = [P, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(P)]
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = I(), I()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        lib.path, lib.version = path, (major.value, minor.value)
        return lib
    where = "; ".join(tried) or ("no libnvrtc.so* in " + ", ".join(cuda_roots() or ["(no CUDA toolkit found)"])
                                 + " or in the nvidia-cuda-nvrtc wheel")
    raise OSError(f"NVRTC not found: {where} (pip install nvidia-cuda-nvrtc, or set CUDA_PATH)")


def cupy_options(options, arch, cuda_include=None):
    """The options cupy.RawModule(code=..., options=options) hands NVRTC on a GPU of compute capability
    `arch` (80, 90), as CuPy 14 (v14.0.0 to v14.2.0) assembles them; the source goes to NVRTC as it is
    (RawModule passes prepend_cupy_headers=False):
    - cupy/_core/core.pyx, assemble_cupy_compiler_options(): CuPy's bundled CCCL folders first
      (-I<cupy>/_core/include/cupy/_cccl/{cub,thrust,libcudacxx}), then `options` (--std=c++17 is
      added only when they name no -std), then -I<cupy>/_core/include, then -I<the CUDA headers>
      (14.2: cuda.pathfinder's find_nvidia_header_directory("cudart"); 14.0: $CUDA_PATH/include, and
      after -ftz=true the nvidia wheels' include folders). CuPy's own folders are added only where
      CuPy is installed: kernels/ include nothing from them.
    - cupy/cuda/compiler.py, _compile_with_cache_cuda(): -ftz=true.
    - cupy/cuda/compiler.py, _get_arch_for_options_for_nvrtc(): -arch=sm_<arch>, a cubin (not PTX)
      for any arch up to NVRTC's newest (121 from CUDA 12.9), unless CUPY_COMPILE_WITH_PTX=1.
    - cupy/cuda/compiler.py, _compile_using_nvrtc_no_warning(): --device-as-default-execution-space
      (without jitify; --pch only with CUPY_NVRTC_USE_PCH=1).
    cuda_include: the folder with cuda_bf16.h (default: toolkit_root()/include)."""
    options = tuple(options)
    if not any("-std=" in o for o in options):
        options += ("--std=c++17",)
    spec = importlib.util.find_spec("cupy")
    if spec is not None and spec.origin:
        cupy_include = os.path.join(os.path.dirname(spec.origin), "_core", "include")
        cccl = os.path.join(cupy_include, "cupy", "_cccl")
        options = tuple(f"-I{cccl}/{d}" for d in ("cub", "thrust", "libcudacxx")) + options + (f"-I{cupy_include}",)
    root = toolkit_root()
    if cuda_include is None and root is not None:
        cuda_include = os.path.join(root, "include")
    if cuda_include is not None:
        options += (f"-I{cuda_include}",)
    return options + ("-ftz=true", f"-arch=sm_{arch}", "--device-as-default-execution-space")


def compile_program(lib, source, name, options):
    """One NVRTC program: source (str) named `name` in messages, compiled with `options`.
    -> (ok, the program log (ptxas's report with -Xptxas=-v, or the errors), the cubin bytes or None).
    Each call has a program of its own, so calls may run in threads (ctypes lets go of the GIL)."""
    prog = ctypes.c_void_p()
    result = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if result != 0:
        raise RuntimeError(f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(result).decode()}")
    try:
        argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        ok = lib.nvrtcCompileProgram(prog, len(options), argv) == 0
        log = _get(lib, prog, "ProgramLog").rstrip(b"\0").decode(errors="replace")
        cubin = _get(lib, prog, "CUBIN") if ok else None
        return ok, log, cubin
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _get(lib, prog, what):
    size = ctypes.c_size_t()
    getattr(lib, f"nvrtcGet{what}Size")(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    getattr(lib, f"nvrtcGet{what}")(prog, buf)
    return buf.raw


# ptxas -v, per entry function (the "Used" line names smem only when there is some):
#   ptxas info    : Compiling entry function 'gelu_forward_kernel' for 'sm_90'
#   ptxas info    : Function properties for gelu_forward_kernel
#   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 13 registers, used 1 barriers, 128 bytes smem, 384 bytes cmem[0]
_ENTRY_RE = re.compile(r"Compiling entry function '(\w+)' for '\w+'\n.*?Function properties for \1\n"
                       r"[^\n]*?(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
                       r"[^\n]*?Used (\d+) registers([^\n]*)", re.S)


def ptxas_usage(log):
    """{kernel: {"registers", "smem" (static shared bytes), "stack", "spill_stores", "spill_loads"}}
    from a log compiled with -Xptxas=-v."""
    usage = {}
    for name, stack, stores, loads, registers, rest in _ENTRY_RE.findall(log):
        smem = re.search(r"(\d+) bytes smem", rest)
        usage[name] = {"registers": int(registers), "smem": int(smem.group(1)) if smem else 0,
                       "stack": int(stack), "spill_stores": int(stores), "spill_loads": int(loads)}
    return usage
