"""What the doc scripts (layernorm.py, attention.py, classifier.py) share: every check prints one
line, `[f64] <what> ... max abs err <x>` (or [f32]), and verdict() ends the script with the count
of checks above tolerance, exiting 1 if there is any. tests/test_doc.py parses those lines.
kernel_module(file) compiles a kernel file on the CPU emulator for the CUDA sections, and launched(mod, call)
runs on it the launches train_gpt2_cuda.py's launchers make (dev/check_kernel.py records them), so no script
writes a grid, a block or an argument list of its own."""

import os
import shutil
import sys

import numpy as np

DEV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dev")
if DEV not in sys.path:
    sys.path.insert(0, DEV)
from check_kernel import recorded_launches, run_launches, with_arrays  # noqa: E402,F401  (the trainer's launches)

TOL = {"f64": 1e-10, "f32": 1e-5}    # float64 is exact to rounding; float32 has 24 bits
failed = []


def check(tag, what, a, b, width=60):
    """Print the max abs difference of a and b (any shapes that broadcast) and hold it to TOL[tag]."""
    err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    print(f"[{tag}] {what:<{width}} max abs err {err:.2e}")
    if not err <= TOL[tag]:
        failed.append(what)


def verdict():
    if failed:
        print(f"FAILED: {len(failed)} check(s) above tolerance: {', '.join(failed)}")
        sys.exit(1)
    print("all checks passed")


def kernel_module(file, bf16=False):
    """kernels/<file>.cu on the emulator, compiled from the very text train_gpt2_cuda.py hands NVRTC:
    RawModule(code=kernel_source(file), options=("--std=c++17",)), kernel_source being the .cu file
    with common.cuh pasted in for its #include; bf16=True adds -DENABLE_BF16 (floatX = __nv_bfloat16,
    whose arrays are uint16 bit patterns). None, after a [skip] line, where there is no g++."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        print("[skip] emulator: no g++ on this machine")
        return None
    from emulator import RawModule
    from llmc.cuda_common import kernel_source
    return RawModule(code=kernel_source(file), options=("--std=c++17",) + (("-DENABLE_BF16",) if bf16 else ()))


def launched(mod, call, packed=None):
    """Run on `mod` (kernel_module's) the launches call(cu) makes on train_gpt2_cuda.py's launchers, cu the
    trainer imported on the emulator: their grids, blocks and arguments, recorded by dev/check_kernel.py's
    recorded_launches. packed=False: the per-element (plain) kernels where the launcher would take a 128-bit
    twin. Returns the launches, in order."""
    launches = recorded_launches(call, packed=packed)
    run_launches(mod, launches)
    return launches
