"""The emulator's fiber stacks: cut from slabs, so that many modules with 1024-thread blocks stay far below the
process's limit on memory maps (vm.max_map_count, 65530: a mapping and a guard page per stack once made a full
test session abort with "cannot map a fiber stack"), and a thread that runs past the bottom of its stack is
caught: a fault on the slab's guard page, or a launch error from the canary of the others."""

import numpy as np
import pytest

import emulator

FILL = """
extern "C" __global__ void fill(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = VALUE; }
}
"""

DEEP = """
extern "C" __global__ void deep(float* out) {
    if (threadIdx.x == 1) {                   // not a slab's first stack: that one would fault on its guard page
        volatile char big[126 * 1024];        // the stack has 124 KiB above its 4 KiB red zone
        for (int i = 0; i < (int)sizeof(big); i++) { big[i] = (char)i; }
        out[0] = big[7];
    }
}
"""


def memory_maps():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_many_modules_with_full_blocks_take_few_memory_maps():
    before = memory_maps()
    for k in range(8):                        # 8 modules, each its own runtime and workers, 1024 threads a block
        mod = emulator.RawModule(code=FILL.replace("VALUE", f"{k}.5f"), options=("--std=c++17",))
        out = np.zeros(4096, np.float32)
        mod.get_function("fill")((4,), (1024,), (out, np.int32(4096)))
        assert (out == k + 0.5).all()
    grown = memory_maps() - before
    # a slab of 64 stacks is one mapping (two with its guard page): 16 slabs per worker for 1024 threads, a few
    # workers per module; one mapping and one guard per stack took 2,048 per worker
    assert grown < 8 * 400, grown


def test_a_stack_overflow_is_a_launch_error():
    mod = emulator.RawModule(code=DEEP, options=("--std=c++17",))
    out = np.zeros(1, np.float32)
    with pytest.raises(RuntimeError, match=r"ran past the bottom of its 124 KiB stack"):
        mod.get_function("deep")((1,), (2,), (out,))
    fill = emulator.RawModule(code=DEEP.replace("126 * 1024", "64 * 1024"), options=("--std=c++17",))
    fill.get_function("deep")((1,), (2,), (out,))                 # 64 KiB fits
    assert out[0] == 7


PAST_SHARED = """
extern "C" __global__ void past(float* out, int n) {
    extern __shared__ float tile[];
    tile[threadIdx.x] = 1.0f;                 // n floats asked for at the launch; threads beyond n write past them
    __syncthreads();
    if (threadIdx.x == 0) { out[blockIdx.x] = tile[0]; }
}
"""


@pytest.mark.parametrize("grid", [1, 256])     # on the calling thread, and on the pool (8,192 threads)
def test_a_write_past_dynamic_shared_memory_is_a_launch_error(grid):
    """Dynamic shared memory ends in a red zone checked after each block: a launcher that asks for fewer bytes than
    its kernel uses (once a heap corruption and a crash at some later launch) is a launch error naming the size."""
    mod = emulator.RawModule(code=PAST_SHARED, options=("--std=c++17",))
    out = np.zeros(grid, np.float32)
    fn = mod.get_function("past")
    with pytest.raises(RuntimeError, match=r"wrote past the end of its 64 bytes of dynamic shared memory"):
        fn((grid,), (32,), (out, np.int32(16)), shared_mem=64)              # 32 floats written into 16
    fn((grid,), (32,), (out, np.int32(32)), shared_mem=128)                 # enough: no error, and nothing left over
    assert (out == 1.0).all()
