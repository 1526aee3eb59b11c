"""dev/bench_gpu.py's arithmetic and round logic, and dev/gpu_check.sh's syntax, without a GPU: the largest-B
estimate for PyTorch, the attention kernels' index limit, the retry when PyTorch runs out of memory at the
largest B, and the summary's target verdict. (tests/test_end_to_end.py runs the whole script with --dry_run 1.)"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import bench_gpu
from llmc.model import GPT2Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


# ----------------------------------------------------------------------------
# dev/gpu_check.sh, without a GPU

GPU_CHECK = os.path.join(REPO, "dev", "gpu_check.sh")
BENCHMARKS = ("bench_attention", "bench_bf16", "bench_fp32")
NOT_CHECKS = ("env", "data", "export_d12", "test_trainer") + BENCHMARKS   # test_trainer: the emulator, as CI


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", GPU_CHECK]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", GPU_CHECK], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def documented_stages():
    """The stages the script's header lists, in its order ("#   name   what it runs" lines)."""
    text = open(GPU_CHECK).read()
    header = text[text.index("# Stages, in this order"):text.index("# Offline data")]
    return re.findall(r"^#   (\w+) ", header, re.M)


def test_gpu_check_stages_are_the_documented_ones():
    """Every stage the header and dev/README.md list is run (a `stage NAME` call) in their order, and every
    check function a stage runs in a child bash is defined and exported to it."""
    text = open(GPU_CHECK).read()
    stages = documented_stages()
    assert len(stages) == 20 and stages[0] == "env"
    assert re.findall(r"^\s*(?:STAGES=\"\" )?(?:stage|sanitized) (\w+) ", text, re.M) == stages
    readme = open(os.path.join(REPO, "dev", "README.md")).read()
    table = readme[readme.index("## gpu_check.sh"):]
    table = table[:table.index("\n## ")] if "\n## " in table else table      # this section's table only
    assert [n for row in re.findall(r"^\| `([^|]+)` \|", table, re.M) for n in re.findall(r"\w+", row)] == stages
    exported = re.search(r"^export -f (.*)$", text, re.M)[1].split()
    for fn in set(re.findall(r"bash -c '(\w+) ", text)):
        assert re.search(rf"^{fn}\(\) {{", text, re.M) and fn in exported, fn


# The fake python3: records its arguments, answers as each program would on a GPU (CuPy finds one), and
# writes the files the script looks for; a fake `python` records that it was called and fails.
FAKE_PYTHON3 = r"""#!SYS_EXECUTABLE
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(["python3"] + args) + "\n")
joined = " ".join(args)

def option(flag, default=None):
    return args[args.index(flag) + 1] if flag in args else default

def train():   # train_gpt2_cuda.py: step lines, and a checkpoint every -n steps into -o
    steps, out, resume = int(option("-x")), option("-o"), option("-y") == "1"
    fused = option("-ge", "0") != "0"                      # -ge 1|2: cuBLASLt's GELU epilogues, a loss a little off
    if fused:
        print(f"gelu fusion: -ge {option('-ge')} (bias + GELU in the fc GEMM, the other biases in theirs, GELU's gradient in fcproj's, cuBLASLt epilogues)")
    first = 11 if resume else 1
    if resume:
        print("resumed from checkpoint 10")
    for s in range(first, steps + 1):
        loss = 10 - 0.1 * s + (0.003 * (s % 3) if fused else 0.0)
        print(f"step {s:4d}/{steps}: train loss {loss:.6f} (acc) (12.1 ms, 1000 tok/s) norm {1 + s / 64:.4f} (x) lr 3.00e-04")
        if out and s % 10 == 0:
            os.makedirs(out, exist_ok=True)
            for name in (f"model_{s:08d}.bin", f"state_{s:08d}_00000.bin", f"DONE_{s:08d}"):
                open(os.path.join(out, name), "w").write(f"{name} of a deterministic run")

if args[0] == "-c":
    if "platform" in args[1]:
        print("python 3.12.3 numpy 2.5.2")
        print("cupy 14.2.0")
        print("torch 2.11.0")
        print("tiktoken 0.14.0")
    sys.exit(0)                                            # also `import cupy ... getDeviceCount()`: one GPU
if args[:2] == ["-m", "pytest"]:
    print("12 passed in 1.0s")
elif args[:2] == ["-m", "torch.distributed.run"]:
    train()
elif args[0] == "prepro_tinyshakespeare.py":
    os.makedirs("data/tinyshakespeare", exist_ok=True)
    for split in ("val", "train"):
        open(f"data/tinyshakespeare/tiny_shakespeare_{split}.bin", "w").write(split)
    print("writing 32,768 tokens to data/tinyshakespeare/tiny_shakespeare_val.bin")
elif args[0] == "train_gpt2_torch.py":
    for name in ("gpt2_d12.bin", "gpt2_d12_bf16.bin", "gpt2_d12_debug_state.bin"):
        open(name, "w").write(name)
        print(f"wrote {name}")
elif args[0] == "test_gpt2.py":
    print("overall okay: 1")
elif args[0] == "train_gpt2_cuda.py":
    train()
elif args[0] == "dev/bench_gpu.py":
    precision = option("--precision")
    print(f"== {precision}, B=16, T=1024")
    print(f"ours (CuPy, -p {precision}) 100.0 ms 163,840 tokens/s 40.0%")
    print("")
    if precision == "bf16":
        print("ratio ours/PyTorch in tokens/s (bf16, B=16): 1.100x (target >= 1.07x: met)")
elif args[0] == "dev/bench_attention.py":           # --time 0: the comparison only; else timings and the step
    print("== B=4 NH=12 hs=64 T=1, bf16: max |x - SDPA fp32| / max(max |SDPA fp32|, 1), on the same bf16 inputs")
    print("flash and materialized agree with SDPA: every error within 2 x SDPA bf16's + 3.91e-03")
    if option("--time") == "0":
        print("summary: flash and materialized agree with SDPA at B=4 NH=12, 12 shapes (hs 64,128, T 1,7,64,100,257,1024)")
    else:
        print("flash / SDPA time (T=1024): 1.10x (target <= 1.3x: met); materialized / flash: 3.00x")
        print("summary: flash / SDPA fwd+bwd at B=16 NH=12: hs=64 T=1024 1.10x, hs=64 T=2048 1.05x (target <= 1.3x: met)")
        print("== the d12 step (d12), B=16 T=1024 bf16, 8 steps each")
        print("step -fa 1 / -fa 0 in tokens/s: 1.31x (target >= 1.2x: met)")
elif args[0] == "dev/perf_model.py":               # the formulas' summary block, for the shape asked
    B, T, p = option("-b"), option("-t"), option("-p")
    print(f"step ({int(B) * int(T):,} tokens, ...), {p}:")
    print("  H100-SXM      30.9 ms/step   530,000 tokens/s MFU 43.0% (counted) |    28.1 ms/step   583,000 tokens/s MFU 47.3% (DRAM estimate)")
    print("  H200          23.0 ms/step   712,000 tokens/s MFU 57.8% (counted) |    20.9 ms/step   784,000 tokens/s MFU 63.6% (DRAM estimate)")
elif args[0] == "dev/check_kernel.py":
    print("24 kernels, 60 outputs within tolerance")
    print("timing on the GPU (d12)")
    print("layernorm_forward  0.010 ms")
else:
    print("fake python3: unexpected " + joined, file=sys.stderr)
    sys.exit(2)
"""
FAKE_PYTHON = """#!/bin/sh
echo '["python"]' >> "$FAKE_CALLS"
exit 127
"""
FAKE_NVIDIA_SMI = """#!/bin/sh
echo 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-fake)'
"""
FAKE_SANITIZER = """#!/bin/sh
echo "[\\"compute-sanitizer\\", \\"$2\\", \\"$LLMC_TEST_BACKENDS\\"]" >> "$FAKE_CALLS"
while [ "$1" != python3 ]; do shift; done
"$@"; rc=$?
echo '========= ERROR SUMMARY: 0 errors'
exit $rc
"""


def rehearse(tmp_path, *args):
    """dev/gpu_check.sh ARGS in a copy of the checkout, a fake python3 (and nvidia-smi, compute-sanitizer)
    first on PATH saying there is a GPU: (the completed process, $OUT, the file of recorded calls)."""
    repo = tmp_path / "repo"
    (repo / "dev").mkdir(parents=True)
    shutil.copy(GPU_CHECK, repo / "dev" / "gpu_check.sh")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_kernels_bf16.py").write_text("")
    (repo / "test_gpt2.py").write_text("# --precision")
    (repo / "dev" / "check_kernel.py").write_text("# --precision")
    (repo / "kernels").mkdir()
    (repo / "kernels" / "flash_attention.cu").write_text("")
    (repo / "shared" / "data" / "tinyshakespeare").mkdir(parents=True)
    (repo / "shared" / "data" / "tinyshakespeare" / "input.txt").write_text("First Citizen:")
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("python3", FAKE_PYTHON3.replace("SYS_EXECUTABLE", sys.executable)), ("python", FAKE_PYTHON),
                       ("nvidia-smi", FAKE_NVIDIA_SMI), ("compute-sanitizer", FAKE_SANITIZER)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    calls, out = tmp_path / "calls.jsonl", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "GPU_CHECK_STAGES", "GPU_CHECK_BUDGET")}
    env.update(PATH=f"{fake}{os.pathsep}{env['PATH']}", OUT=str(out), FAKE_CALLS=str(calls), TMPDIR=str(tmp_path))
    r = subprocess.run(["bash", str(repo / "dev" / "gpu_check.sh"), *args], env=env, capture_output=True,
                       text=True, timeout=300)
    return r, out, calls


def test_gpu_check_runs_end_to_end_with_a_fake_python3(tmp_path):
    """Every stage passes, in the documented order, the checks of the results before the benchmarks;
    every command goes to python3, none to python; $OUT holds at most 8 files (what the device tool brings
    back), the summary and the full log; the checkpoints go elsewhere."""
    r, out, calls = rehearse(tmp_path)
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    stages = documented_stages()
    lines = [line.split() for line in summary.splitlines()[:len(stages)]]
    assert [(line[0], line[1]) for line in lines] == [(name, "PASS") for name in stages], summary
    checks = [i for i, name in enumerate(stages) if name not in NOT_CHECKS]
    assert max(checks) < min(stages.index(name) for name in BENCHMARKS)
    notes = {line[0]: " ".join(line[3:]) for line in lines}
    assert notes["bf16_determinism"].startswith("bf16 determinism: 10 steps twice, identical losses and norms")
    assert notes["bf16_resume"].startswith("bf16 resume: 20 steps = 10 + 10 resumed (-y 1)")
    assert notes["nccl_one_rank"].startswith("nccl one rank: NCCL started through torchrun, 10 steps identical")
    assert notes["gelu_fusion"] == ("gelu fusion: -ge 2 vs -ge 0, 10 bf16 steps: max |loss difference| 0.0060 "
                                    "(tolerance 0.05), last losses 9.003000 (-ge 2) and 9.000000 (-ge 0)")
    ge = [p for p in map(json.loads, calls.read_text().splitlines()) if "-ge" in p]
    assert [p[p.index("-ge") + 1] for p in ge] == ["0", "2", "2"]          # the two runs, then test_gpt2.py -ge 2
    assert all("gpt2_d12_bf16.bin" in p for p in ge[:2]) and "gpt2_d12.bin" in ge[2] and "test_gpt2.py" in ge[2]
    assert notes["bench_bf16"] == "(bf16, B=16): 1.100x (>= 1.07x: met)"
    assert notes["flash_check"] == ("summary: flash and materialized agree with SDPA at B=4 NH=12, 12 shapes "
                                    "(hs 64,128, T 1,7,64,100,257,1024)")
    assert notes["bench_attention"] == ("flash/SDPA hs=64 T=1024 1.10x, hs=64 T=2048 1.05x (target <= 1.3x: met) "
                                        "step -fa 1/-fa 0 1.31x (target >= 1.2x: met)")
    assert "(bench_attention)" in summary and "step -fa 1 / -fa 0 in tokens/s: 1.31x" in summary
    # the perf model's prediction beside each benchmark round's measurement, for the same shape
    for p in ("bf16", "fp32"):
        assert (f"modeled by dev/perf_model.py ({p}, B=16, T=1024): H100-SXM 30.9 ms/step from the counted bytes, "
                f"28.1 from the DRAM estimate") in summary.splitlines(), summary
        assert f"modeled by dev/perf_model.py ({p}, B=16, T=1024): H200 23.0 ms/step" in summary
    asked = [c for c in map(json.loads, calls.read_text().splitlines()) if c[1:2] == ["dev/perf_model.py"]]
    assert [c[1:] for c in asked] == [["dev/perf_model.py", "-e", "d12", "-b", "16", "-t", "1024", "-p", p]
                                      for p in ("bf16", "fp32")]
    assert notes["check_kernel"] == "24 kernels, 60 outputs within tolerance"

    assert notes["sanitize_memcheck"] == "========= ERROR SUMMARY: 0 errors 12 passed in 1.0s"
    programs = [json.loads(line) for line in calls.read_text().splitlines()]
    for tool in ("memcheck", "racecheck"):                  # on the GPU backend only, never the emulator's
        assert ["compute-sanitizer", tool, "cupy"] in programs, programs
    programs = [p for p in programs if p[0] != "compute-sanitizer"]
    assert programs and all(p[0] == "python3" for p in programs), [p for p in programs if p[0] != "python3"]
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert sorted(os.path.relpath(f, out) for f in files) == ["stages.log", "summary.txt"] and len(files) <= 8
    log = (out / "stages.log").read_text()
    assert [m for m in re.findall(r"^== (\w+) \(timeout", log, re.M)] == stages
    assert sorted(os.listdir(tmp_path)) == ["bin", "calls.jsonl", "out", "repo"]      # the temporary folders gone


def test_gpu_check_quick_runs_the_short_list_within_its_budget(tmp_path):
    r, out, calls = rehearse(tmp_path, "--quick")
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ran = [line.split()[0] for line in summary.splitlines() if re.match(r"^\w+\s+PASS ", line)]
    assert ran == ["env", "test_kernels_bf16", "sanitize_memcheck", "data", "export_d12", "test_gpt2_bf16",
                   "bf16_determinism", "test_gpt2_fp32"], summary
    assert "of a 220s budget" in summary
    assert "not in GPU_CHECK_STAGES" in summary and "bench_bf16" in summary      # the rest: SKIP lines
    r = subprocess.run(["bash", GPU_CHECK, "--fast"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == "gpu_check.sh: unknown argument '--fast' (the only one is --quick)\n"
