"""dev/bench_gpu.py's arithmetic and round logic, and dev/gpu_check.sh's syntax, without a GPU: the largest-B
estimate for PyTorch, the attention kernels' index limit, the retry when PyTorch runs out of memory at the
largest B, and the summary's target verdict. (tests/test_end_to_end.py runs the whole script with --dry_run 1.)"""

import argparse
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
sys.path.insert(0, REPO)

import bench_gpu  # noqa: E402
from llmc.formats import GPT2Config  # noqa: E402

D12 = GPT2Config(max_seq_len=1024, vocab_size=50257, num_layers=12, num_heads=12, channels=768, padded_vocab_size=50304)


def test_attention_index_limit_for_d12():
    """B*NH*T*T < 2^31: at T=1024 with 12 heads, B=170 is the last that fits."""
    B = bench_gpu.attention_index_limit(D12, 1024)
    assert B == 170
    assert B * 12 * 1024 * 1024 < 2**31 <= (B + 1) * 12 * 1024 * 1024


def test_torch_largest_batch_is_linear_in_b():
    # peak(B) = fixed + B * per_sample: 2 GB fixed, 0.5 GB per sample, measured at B=16
    res = dict(free_at_start=100e9, fixed_bytes=2e9, peak_allocated=2e9 + 16 * 0.5e9)
    assert bench_gpu.torch_largest_batch(res, 16) == int((0.9 * 100e9 - 2e9) // 0.5e9)   # 176
    assert bench_gpu.torch_largest_batch(dict(res, free_at_start=0), 16) is None         # the dry run: no device
    assert bench_gpu.torch_largest_batch(dict(res, peak_allocated=1e9), 16) is None      # nothing to go on


def round_args():
    return argparse.Namespace(precision="bf16", batch_size=16, seq_len=1024, flash=-1, tf32=1, dry_run=0)


def test_largest_round_takes_the_smaller_and_says_why(capsys):
    results = {"ours": dict(largest_batch=170),
               "torch": dict(free_at_start=100e9, fixed_bytes=2e9, peak_allocated=2e9 + 16 * 0.5e9)}
    assert bench_gpu.largest_round_batch(round_args(), results) == 170
    line = capsys.readouterr().out.strip()
    assert line.startswith("largest B that fits both at T=1024 in bf16: 170: ours 170") and "PyTorch ~176" in line
    results["torch"]["free_at_start"] = 50e9
    assert bench_gpu.largest_round_batch(round_args(), results) == 86              # (45e9 - 2e9) // 0.5e9
    assert bench_gpu.largest_round_batch(round_args(), {"ours": {}, "torch": dict(out_of_memory=True)}) is None


@pytest.mark.parametrize("oom_above, expected_calls, expected_b", [
    (1000, [("torch", 150), ("ours", 150)], 150),                     # fits at once
    (100, [("torch", 150), ("torch", 127), ("ours", 127)], 127),      # once out of memory: 85% of B
    (10, [("torch", 150), ("torch", 127), ("ours", 127)], 127),       # twice: no third try, ours still runs
])
def test_largest_round_retries_pytorch_once(monkeypatch, oom_above, expected_calls, expected_b):
    calls = []

    def run_one(trainer, args, tmp):
        calls.append((trainer, args.batch_size))
        assert args.flash == 1 and args.precision == "bf16"          # bf16's recipe: flash attention
        return dict(out_of_memory=trainer == "torch" and args.batch_size > oom_above)

    monkeypatch.setattr(bench_gpu, "run_one", run_one)
    r, results = bench_gpu.run_largest_round(round_args(), "bf16", 150, ["ours", "torch"], "/nonexistent")
    assert calls == expected_calls and r.batch_size == expected_b and list(results) == ["ours", "torch"]


def test_round_args_pick_pytorch_attention_per_precision():
    args = round_args()
    assert bench_gpu.round_args(args, "fp32", 16).flash == 0 and bench_gpu.round_args(args, "bf16", 16).flash == 1
    args.flash = 0
    assert bench_gpu.round_args(args, "bf16", 32).flash == 0 and bench_gpu.round_args(args, "bf16", 32).batch_size == 32
    assert args.batch_size == 16                                      # a copy: the command line stays as it was


def test_print_round_target_verdict(capsys):
    def result(ms, device="NVIDIA H200"):
        return dict(times=[ms / 1000] * 3, losses=[5.0, 4.0], device=device, gemm="bf16", flops_per_token=1e9,
                    alloc_peak_mib=0, device_used_mib=0, tf32=False, flash=True, fused_adamw=True, torch="2",
                    out_of_memory=False)
    row = bench_gpu.print_round(round_args(), {"ours": result(100.0), "torch": result(110.0)})
    out = capsys.readouterr().out
    assert abs(row["ratio"] - 1.1) < 1e-9
    assert "ratio ours/PyTorch in tokens/s (bf16, B=16): 1.100x (target >= 1.07x: met)" in out
    # MFU: 1e9 FLOPs/token * 16384 tokens / 0.1 s against the H200's 989.5 TFLOP/s bf16 peak
    assert f"{100 * 1e9 * 16384 / 0.1 / 989.5e12:.1f}%" in out
    bench_gpu.print_round(round_args(), {"ours": result(110.0), "torch": result(105.0)})
    assert "(target >= 1.07x: not met)" in capsys.readouterr().out


def test_gpu_check_script_parses():
    script = os.path.join(REPO, "dev", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
