"""Data parallel in train_gpt2_cuda.py, on the kernel emulator (LLMC_EMULATE=1), with real processes started
by torchrun. On the emulator the trainer's arrays are NumPy arrays, so its collectives run over the same
torch.distributed gloo World as the NumPy trainer's (llmc/collectives.py); on GPUs the same calls go to NCCL
(NcclWorld), which needs GPUs to test (dev/gpu_check.sh). The rank logic, ZeRO-1's shards of m, v and the
master weights, and the per-rank state files are one code path, tested here.

fp32: the same total batch over 1 and 2 processes, ZeRO-0 and ZeRO-1, is the same optimization up to the
order of the additions: losses, norms and the final model within 1e-5, as the NumPy trainer's test.
bf16: the gradients are bf16, so where they are summed (over micro-steps in one process, over ranks in
fp32 then rounded once with two) changes their last bits: the losses stay within 1% of the one-process
run (the same bound as the bf16-vs-fp32 test), and a 2-rank ZeRO-1 run checkpointed and resumed prints
bit-identical losses and writes the same final model as an uninterrupted one.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from test_data_parallel import BASE, P, compare, final_model, needs_gloo, steps, workdir  # noqa: F401 (fixture)
from llmc import checkpoint, formats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(workdir, nproc, *args, timeout=300):
    """train_gpt2_cuda.py on the emulator under torchrun with nproc processes (0: one plain process)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", LLMC_EMULATE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    runner = [] if nproc == 0 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run([sys.executable, *runner, os.path.join(REPO, "train_gpt2_cuda.py"), *map(str, args)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def run(workdir, nproc, precision, out, *extra):
    p = launch(workdir, nproc, *BASE, "-p", precision, "-o", out, *extra)
    return steps(p), final_model(workdir / out / "model_00000010.bin"), p.stdout


ONE_PROCESS = {}


def one_process_fp32(workdir):
    """The one-process fp32 run both ZeRO stages compare with: run once (a second run into its -o would be
    refused, as a new run over an earlier run's files)."""
    if workdir not in ONE_PROCESS:
        ONE_PROCESS[workdir] = run(workdir, 0, "fp32", "cu_fp32_1")
    return ONE_PROCESS[workdir]


@needs_gloo
@pytest.mark.parametrize("zero", [0, 1])
def test_fp32_two_ranks_equal_one_process(workdir, zero):
    one = one_process_fp32(workdir)
    two = run(workdir, 2, "fp32", f"cu_fp32_2z{zero}", "-z", zero)
    assert "data parallel: 2 processes (torch.distributed, gloo), ZeRO stage " + str(zero) in two[2]
    compare(one[:2], two[:2])


@needs_gloo
def test_bf16_two_ranks_zero1_within_one_percent_of_one_process(workdir):
    (one, one_model, _), (two, two_model, out) = run(workdir, 0, "bf16", "cu_bf16_1"), \
        run(workdir, 2, "bf16", "cu_bf16_2z1", "-z", 1)
    assert f"{P // 2:,} parameters' m and v on each" in out
    assert [s for s, _, _ in two] == list(range(1, 11))
    for (s, a, _), (_, b, _) in zip(one, two):
        assert abs(a - b) <= 0.01 * a, (s, a, b)
    assert two[-1][1] < 0.5 * two[0][1]                   # it learned: the bound is not met by a dead run
    with open(workdir / "cu_bf16_2z1" / "model_00000010.bin", "rb") as f:
        assert np.frombuffer(f.read(8), "<i4")[1] == 5     # rank 0 wrote the run's precision


@needs_gloo
def test_bf16_two_ranks_zero1_resume_is_bit_exact(workdir):
    """Shuffled loader (no -a), decaying lr, ZeRO-1: 10 steps straight vs 5 + checkpoint + -y 1 for 5 more."""
    shuffled = [a for i, a in enumerate(BASE) if not (a == "-a" or (i > 0 and BASE[i - 1] == "-a"))]   # no -a 1
    args = [*shuffled, "-p", "bf16", "-z", "1", "-q", "0.1", "-n", 5]
    straight = steps(launch(workdir, 2, *args, "-o", "cu_resume"))
    final = final_model(workdir / "cu_resume" / "model_00000010.bin")
    state = checkpoint.read_state_file(checkpoint.state_path(str(workdir / "cu_resume"), 5, 1), P // 2, 2, 1)
    assert state.master_weights is not None and state.master_weights.size == P // 2   # rank 1's shard
    checkpoint.delete_checkpoint(str(workdir / "cu_resume"), 10)   # as if killed after checkpoint 5
    resumed = steps(launch(workdir, 2, *args, "-o", "cu_resume", "-y", 1))
    assert resumed == straight[5:]                        # steps 6..10: bit-identical losses and norms
    assert np.array_equal(final_model(workdir / "cu_resume" / "model_00000010.bin"), final)
