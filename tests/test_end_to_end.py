"""End to end: export a tiny model with PyTorch, then run test_gpt2.py on it as a user would.

The exporter (train_gpt2_torch.py) runs once per session on a tiny shape (conftest's tiny_export: L2,
NH2, C32, maxT32, V50257; B2, T16, 10 AdamW steps) over a synthetic data shard. test_gpt2.py must pass
on it with the NumPy trainer (and with the CUDA trainer on the CPU emulator, when that exists), and
must fail on a checkpoint with one weight changed.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import test_gpt2
from llmc import formats
from llmc.model import param_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def run(cmd, cwd, env=None, timeout=300):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def child_env():
    env = dict(os.environ)
    cache = os.path.join(REPO, "..", "shared", "data", "tiktoken_cache")
    if "TIKTOKEN_CACHE_DIR" not in env and os.path.isdir(cache):
        env["TIKTOKEN_CACHE_DIR"] = os.path.abspath(cache)
    return env


def run_test_gpt2(ckpt, state, *extra, env=None, timeout=300):
    cmd = [sys.executable, os.path.join(REPO, "test_gpt2.py"), "--checkpoint", str(ckpt),
           "--debug_state", str(state), *extra]
    return run(cmd, cwd=os.path.dirname(ckpt), env=env, timeout=timeout)


def assert_passed(r, nsteps):
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-2000:]
    assert out.rstrip().endswith("overall okay: 1")
    assert "NOT OK" not in out
    # every tensor was checked: logits, loss and the 16 gradients, then each recorded step
    assert len(re.findall(r"max abs err .* OK$", out, flags=re.M)) == 2 + 16
    for name, _ in param_shapes(formats.read_model_file(r.args[3])[0]):
        assert re.search(rf"^d{name} \(", out, flags=re.M), f"gradient d{name} not checked"
    steps = re.findall(r"^step (\d+): loss (\S+) expected (\S+) .* OK \(", out, flags=re.M)
    assert len(steps) == nsteps
    for _, ours, ref in steps:
        assert abs(float(ours) - float(ref)) <= 1e-4 + 1e-4 * abs(float(ref))


def paths(tiny_export):
    return tiny_export.model, tiny_export.state


def test_state_records_training(tiny_export):
    """The exporter recorded its 10 training steps, and they trained (loss falls on one batch)."""
    ckpt, state_path = paths(tiny_export)
    config, _ = formats.read_model_file(str(ckpt))
    state = formats.read_debug_state(str(state_path), config)
    assert state.x.shape == (tiny_export.B, tiny_export.T)
    assert state.losses.size == tiny_export.steps == 10
    assert state.losses[-1] < state.losses[0]
    assert abs(state.losses[0] - state.loss) <= 1e-6 * abs(state.loss)
    assert set(state.optimizer) == set(formats.STATE_OPT_FIELDS)


def test_numpy_trainer_matches_pytorch(tiny_export):
    ckpt, state = paths(tiny_export)
    assert_passed(run_test_gpt2(ckpt, state), nsteps=10)


def test_perturbed_weight_fails(tiny_export, tmp_path):
    """One weight changed by 1e-2 must be caught: exit 1, NOT OK, overall okay: 0."""
    ckpt, state = paths(tiny_export)
    config, params = formats.read_model_file(str(ckpt))
    offset = 0
    for name, shape in param_shapes(config):
        if name == "fcw":
            break
        offset += int(np.prod(shape))
    params[offset + 7] += np.float32(1e-2)  # one element of layer 0's fcw
    bad = tmp_path / os.path.basename(ckpt)
    formats.write_model_file(str(bad), config, params)
    r = run_test_gpt2(bad, state)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "NOT OK" in r.stdout
    assert r.stdout.rstrip().endswith("overall okay: 0")


def test_state_without_losses(tiny_export, tmp_path):
    """A state as llm.c's own exporter writes it (no recorded losses): forward and backward are still checked."""
    ckpt, state_path = paths(tiny_export)
    config, _ = formats.read_model_file(str(ckpt))
    s = formats.read_debug_state(str(state_path), config)
    bare = tmp_path / "bare_debug_state.bin"
    formats.write_debug_state(str(bare), s.x, s.y, s.logits, s.loss, s.grads)
    r = run_test_gpt2(ckpt, bare)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "steps: 0 (the state records no losses)" in r.stdout
    assert len(re.findall(r"max abs err .* OK$", r.stdout, flags=re.M)) == 2 + 16
    assert not re.search(r"^step \d", r.stdout, flags=re.M)
    assert r.stdout.rstrip().endswith("overall okay: 1")


def test_missing_files_say_what_to_run(tmp_path):
    r = run_test_gpt2(tmp_path / "gpt2_d12.bin", tmp_path / "gpt2_d12_debug_state.bin")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "python train_gpt2_torch.py --model d12" in lines[0]


def test_cuda_trainer_without_gpu_says_so(tiny_export):
    if cuda_trainer_missing() or importlib.util.find_spec("cupy") is not None:
        pytest.skip("needs train_gpt2_cuda.py and a machine without CuPy")
    env = child_env()
    env.pop("LLMC_EMULATE", None)
    r = run_test_gpt2(tiny_export.model, tiny_export.state, "--trainer", "cuda", env=env)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [  # train_gpt2_cuda.py's one line, then test_gpt2.py's way on the CPU
        "train_gpt2_cuda.py: CuPy is not installed (pip install cupy-cuda12x, with an NVIDIA GPU); without a GPU run "
        "the NumPy trainer: python train_gpt2.py; or, for a tiny model, on the kernel emulator: LLMC_EMULATE=1 "
        "python test_gpt2.py --trainer cuda --checkpoint ..."], r.stderr


def test_check_tensor_rule():
    """|ours - ref| <= atol + rtol |ref|, elementwise; NaN fails."""
    ref = np.array([1.0, -2.0, 1000.0], dtype=np.float32)
    assert test_gpt2.check_tensor("t", ref + np.float32(1.9e-4) * np.array([1, 1, 0], np.float32), ref, 1e-4, 1e-4)
    assert not test_gpt2.check_tensor("t", ref + np.array([0, 0, 0.2], np.float32), ref, 1e-4, 1e-4)
    assert not test_gpt2.check_tensor("t", np.array([np.nan, -2.0, 1000.0], np.float32), ref, 1e-4, 1e-4)


def cuda_trainer_missing():
    return not all(os.path.exists(os.path.join(REPO, f)) for f in ("train_gpt2_cuda.py", "emulator/__init__.py"))


def test_cuda_trainer_on_emulator(tiny_export):
    """train_gpt2_cuda.py with its kernels on the CPU emulator passes the same check, in fp32 at the same
    1e-4 (its bf16 check, against llm.c's bf16 thresholds, is tests/test_gpt2_bf16.py)."""
    if cuda_trainer_missing():
        pytest.skip("train_gpt2_cuda.py or emulator/ is not there yet")
    if shutil.which("g++") is None:
        pytest.skip("the kernel emulator needs g++")
    ckpt, state = paths(tiny_export)
    env = child_env()
    env["LLMC_EMULATE"] = "1"
    assert_passed(run_test_gpt2(ckpt, state, "--trainer", "cuda", "--precision", "fp32", env=env, timeout=600),
                  nsteps=10)


def test_bench_cpu_trains_alike(tiny_export):
    """make bench's script on a tiny model: both trainers take the same steps (losses agree), the table is there."""
    r = run([sys.executable, os.path.join(REPO, "dev", "bench_cpu.py"), "--checkpoint", str(tiny_export.model),
             "--data", "", "-b", "2", "-t", "16", "--steps", "2", "--warmup", "1"], cwd=REPO, env=child_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    gap = float(re.search(r"max \|loss ours - loss PyTorch\| over the 3 steps = (\S+)", r.stdout)[1])
    assert gap < 1e-5
    medians = {}
    for row in ("ours (NumPy, train_gpt2.py)", "PyTorch eager"):
        ms, fastest, slowest, tok_s, rss = map(float, re.search(
            rf"^{re.escape(row)}\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", r.stdout, re.M).groups())
        assert fastest <= ms <= slowest and 10 < rss < 4096
        assert abs(tok_s - 2 * 16 / ms * 1000) <= 0.5 + tok_s * 0.051 / ms  # tokens/s = B*T / median (ms: 0.1)
        medians[row] = ms
    ratio = float(re.search(r"^ratio ours/PyTorch: (\S+) of the medians", r.stdout, re.M)[1])
    a, b = medians["ours (NumPy, train_gpt2.py)"], medians["PyTorch eager"]
    assert abs(ratio - a / b) <= 0.0006 + (a / b) * 0.051 * (1 / a + 1 / b)
    assert "target" not in r.stdout.split("ratio ours/PyTorch")[1].splitlines()[0]
    # the GEMM roofline: the step's GEMM FLOPs, counted here for L2 C32 Vp50304, B*T = 32: every matmul
    # layer does 3 products (forward, dinp, dweight) of 2 * BT * C_in * OC FLOPs each
    BT, C, L, Vp = 32, 32, 2, 50304
    flops = 3 * 2 * BT * (L * (C * 3 * C + C * C + C * 4 * C + 4 * C * C) + C * Vp)
    x, y, pct, gflop, rate = re.search(r"^GEMM roofline: (\S+) ms of the step's (\S+) ms \((\d+)%\) for its (\S+) GFLOP "
                                       r"of GEMMs \((\S+) GFLOP/s\)$", r.stdout, re.M).groups()
    assert float(gflop) == round(flops / 1e9, 2) and float(y) == medians["ours (NumPy, train_gpt2.py)"]
    share = 100 * float(x) / float(y)  # x and y printed to 0.1 ms, the share to 1%
    assert abs(int(pct) - share) <= 0.5 + share * 0.051 * (1 / float(x) + 1 / float(y))
    assert 0 < float(x)
    assert abs(float(rate) - flops / float(x) / 1e6) <= float(rate) * 0.051 / float(x) + 0.1  # x has 1 decimal
    # the profiler's cost: both medians, and the verdict on the 5% rule
    profiled, plain, change = re.search(r"^ours with the per-layer profiler: median (\S+) ms/step, without (\S+) ms "
                                        r"\(([-+]\S+)%\)$", r.stdout, re.M).groups()
    assert float(plain) == medians["ours (NumPy, train_gpt2.py)"]
    p, q = float(profiled), float(plain)  # printed to 0.1 ms, the change to 0.1%
    assert abs(float(change) - 100 * (p / q - 1)) <= 100 * 0.051 * (1 / p + 1 / q) * max(1, p / q) + 0.051
    verdict = ("the profiled step is within 5% of the unprofiled one" if abs(float(change)) <= 5 else
               "WARNING: the profiled step is ")
    assert verdict in r.stdout
    assert len(re.findall(r"^  numpy step \d+: .*profiled\)$", r.stderr, re.M)) == 2   # one per timed step
    assert re.search(r"^forward\s+\(phase total\)", r.stdout, re.M)
    assert re.search(r"^update\s+\(phase total\)", r.stdout, re.M)


def test_bench_gpu_dry_run():
    """bench_gpu.py without a GPU: one line saying so; --dry_run 1 runs ours on the emulator against PyTorch."""
    script = os.path.join(REPO, "dev", "bench_gpu.py")
    if cuda_trainer_missing():
        pytest.skip("train_gpt2_cuda.py or emulator/ is not there yet")
    env = child_env()
    env.pop("LLMC_EMULATE", None)
    if importlib.util.find_spec("cupy") is None:  # no CuPy, so no GPU run: the one-line exit
        r = run([sys.executable, script], cwd=REPO, env=env)
        assert r.returncode == 1 and r.stdout == "", r.stdout[-2000:]
        assert r.stderr.strip().splitlines() == [
            "bench_gpu.py: CuPy is not installed (pip install cupy-cuda12x on a machine with an NVIDIA GPU); nothing "
            "to time here (python dev/bench_gpu.py --dry_run 1 checks the plumbing on the CPU, python "
            "dev/bench_cpu.py times the NumPy trainer)"], r.stderr
    r = run([sys.executable, script, "--dry_run", "1"], cwd=REPO, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    gap = float(re.search(r"max \|loss ours - loss PyTorch\| over the steps = (\S+)", r.stdout)[1])
    assert gap < 1e-5
    assert re.search(r"^\s+fused_classifier\s", r.stdout, re.M)
