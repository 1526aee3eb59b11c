"""The CPU stand-in for cupy.RawModule: kernels/*.cu compiled by g++ and run on the CPU (README.md here).

    from emulator import RawModule
    fn = RawModule(code=kernel_source("gelu"), options=("--std=c++17",)).get_function("gelu_forward_kernel")
    fn((grid,), (block,), (out, inp, np.int32(N)))      # NumPy arrays and NumPy scalars

rawmodule.py is the Python side (compile, cache, check arguments, launch), emulator.h the CUDA
built-ins g++ compiles the kernels against (threads as fibers, barriers, shuffles, shared memory).
`with count_traffic() as launches:` counts the bytes each launch reads and writes in global memory.
fn(..., racecheck=True) (or LLMC_EMULATOR_RACECHECK=1) raises RaceError when two threads race.
"""

from .rawmodule import (GUARD_BYTES, THREAD_ORDERS, CompileError, Function, RaceError, RawModule, Traffic,
                        count_traffic)

__all__ = ["RawModule", "Function", "CompileError", "RaceError", "THREAD_ORDERS", "GUARD_BYTES", "count_traffic",
           "Traffic"]
