"""Every kernels/<file>.cu compiled by NVRTC as the CUDA trainer compiles it on a GPU, with no GPU.

NVRTC needs no device: dev/nvrtc.py calls it through ctypes (the CUDA toolkit's libnvrtc.so, or the
nvidia-cuda-nvrtc wheel's). Each module is compiled from the text the trainer compiles
(kernel_source(file): common.cuh pasted in), with the options train_gpt2_cuda.nvrtc_options() gives
cupy.RawModule plus those CuPy 14 adds itself (nvrtc.cupy_options: -ftz=true, -arch=sm_XX,
--device-as-default-execution-space, the include folders), for sm_80 and sm_90, fp32 and bf16.
-arch=sm_XX makes a cubin, so ptxas runs too; -Xptxas=-v makes it report each kernel's registers,
spills and static shared memory, which `pytest -s` prints as one table.

Each module, arch and precision must: compile; report every extern "C" __global__ kernel of its source
(no more, no fewer) to ptxas; spill nothing; and declare at most 48 KiB of static shared memory per
block (the limit without an opt-in; ptxas refuses more itself, this says it in our words). Dynamic
shared memory is sized at launch and not seen here. Without a libnvrtc the test skips with one line
saying where it looked.
"""

import os
import time
import types
from multiprocessing.pool import ThreadPool

import pytest

from conftest import emulated_cuda_trainer
from llmc.cuda_common import KERNEL_DIR, kernel_source

import nvrtc
from check_kernel import KERNEL_RE  # (a kernel's name and parameters in the source)

try:
    LIB = nvrtc.load()
except OSError as e:
    pytest.skip(str(e), allow_module_level=True)

MODULES = sorted(f[:-3] for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))
ARCHS = (80, 90)                 # A100; H100 and H200
PRECISIONS = ("fp32", "bf16")
MAX_STATIC_SMEM = 48 * 1024      # bytes per block


def trainer_options():
    """{precision: what train_gpt2_cuda.kernel() passes cupy.RawModule on a GPU}: its nvrtc_options(bf16),
    asked of the trainer itself (imported on the emulator, then told it is not, with nvrtc.toolkit_root
    standing in for cupy.cuda.get_cuda_path), so a change there is compiled here."""
    cu = emulated_cuda_trainer("train_gpt2_cuda_nvrtc")
    cu.EMULATE = False
    cu.xp = types.SimpleNamespace(cuda=types.SimpleNamespace(get_cuda_path=nvrtc.toolkit_root))
    return {p: cu.nvrtc_options(p == "bf16") for p in PRECISIONS}


@pytest.fixture(scope="module")
def builds():
    """{(module, arch, precision): (ok, log, cubin, usage)} for every combination, compiled in threads,
    and the table of what ptxas reported printed."""
    trainer = trainer_options()
    options = {(arch, p): nvrtc.cupy_options(trainer[p], arch) + ("-Xptxas=-v",) for arch in ARCHS for p in PRECISIONS}
    jobs = [(m, arch, p) for m in MODULES for arch in ARCHS for p in PRECISIONS]

    def build(job):
        module, arch, precision = job
        ok, log, cubin = nvrtc.compile_program(LIB, kernel_source(module), module + ".cu", options[(arch, precision)])
        return job, (ok, log, cubin, nvrtc.ptxas_usage(log))

    start = time.perf_counter()
    with ThreadPool(os.cpu_count()) as pool:
        results = dict(pool.map(build, jobs))
    seconds = time.perf_counter() - start
    print(f"\nNVRTC {LIB.version[0]}.{LIB.version[1]} ({LIB.path}): {len(jobs)} compiles in {seconds:.1f} s "
          f"on {os.cpu_count()} threads\noptions (sm_90 bf16): {' '.join(options[(90, 'bf16')])}")
    print_table(results)
    return results


def print_table(results):
    """One row per kernel, one column per arch and precision: registers, static smem bytes, spill bytes."""
    columns = [(arch, p) for arch in ARCHS for p in PRECISIONS]
    print(f"{'module':<10} {'kernel':<40}" + "".join(f"{f'sm_{a} {p}':>17}" for a, p in columns))
    print(f"{'':<10} {'':<40}" + f"{'regs  smem spill':>17}" * len(columns))
    for module in MODULES:
        kernels = sorted({k for (m, _, _), (_, _, _, usage) in results.items() if m == module for k in usage})
        for kernel in kernels:
            cells = []
            for arch, p in columns:
                u = results[(module, arch, p)][3].get(kernel)
                cells.append(f"{u['registers']:>7}{u['smem']:>6}{u['spill_stores'] + u['spill_loads']:>4}"
                             if u else f"{'-':>17}")
            print(f"{module:<10} {kernel:<40}" + "".join(cells))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", MODULES)
def test_nvrtc_compiles(builds, module, arch, precision):
    ok, log, cubin, usage = builds[(module, arch, precision)]
    assert ok, f"{module}.cu does not compile with NVRTC for sm_{arch} {precision}:\n{log}"
    assert cubin[:4] == b"\x7fELF", f"{module}.cu: NVRTC made no cubin for sm_{arch}"
    names = {name for name, _ in KERNEL_RE.findall(kernel_source(module))}
    assert names, f"{module}.cu: no extern \"C\" __global__ kernel found in the source"
    assert set(usage) == names, (f"{module}.cu sm_{arch} {precision}: ptxas reported {sorted(usage)}, "
                                 f"the source defines {sorted(names)}:\n{log}")
    problems = [f"{k}: {u['spill_stores']} bytes spill stores, {u['spill_loads']} bytes spill loads"
                for k, u in usage.items() if u["spill_stores"] or u["spill_loads"]]
    problems += [f"{k}: {u['smem']} bytes static shared memory > {MAX_STATIC_SMEM}"
                 for k, u in usage.items() if u["smem"] > MAX_STATIC_SMEM]
    assert not problems, f"{module}.cu sm_{arch} {precision}:\n" + "\n".join(problems)
