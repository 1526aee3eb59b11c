"""The CPU stand-in for cupy.RawModule: kernels/*.cu compiled by g++ and run on the CPU (README.md here).

    from emulator import RawModule
    fn = RawModule(code=kernel_source("gelu"), options=("--std=c++17",)).get_function("gelu_forward_kernel")
    fn((grid,), (block,), (out, inp, np.int32(N)))      # NumPy arrays and NumPy scalars

rawmodule.py is the Python side (compile, cache, check arguments, launch), emulator.h the CUDA
built-ins g++ compiles the kernels against (threads as fibers, barriers, shuffles, shared memory).
`with count_traffic() as launches:` counts the bytes each launch reads and writes in global memory.
fn(..., racecheck=True) (or LLMC_EMULATOR_RACECHECK=1) raises RaceError when two threads race.
import_emulated(path, name) imports a CUDA trainer (train_gpt2_cuda.py or an older copy) on the emulator.
"""

import importlib.util
import os
import sys

from .rawmodule import (GUARD_BYTES, THREAD_ORDERS, CompileError, Function, RaceError, RawModule, Traffic,
                        count_traffic)



def import_emulated(path, name, register=False):
    """The CUDA trainer at `path` imported with LLMC_EMULATE=1 as a module object of its own called `name`
    (so the switch at its top sees the variable whatever was imported before, and NumPy arrays stand in for
    CuPy's); register=True also puts it in sys.modules (its main() hands train_gpt2.run the module by
    name), and the caller removes it. The environment is left as it was."""
    old = os.environ.get("LLMC_EMULATE")
    os.environ["LLMC_EMULATE"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        if register:
            sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["LLMC_EMULATE"]
        else:
            os.environ["LLMC_EMULATE"] = old
    return module


__all__ = ["import_emulated", "RawModule", "Function", "CompileError", "RaceError", "THREAD_ORDERS", "GUARD_BYTES", "count_traffic",
           "Traffic"]
