"""dev/bench_attention.py without a GPU: a tiny shape end to end on the kernel emulator (flash, the materialized
path and PyTorch's SDPA on the CPU, compared, then "timed"), the comparison's verdict on planted errors, the
step lines' tokens/s and the training runs' command line (a fake python standing in for train_gpt2_cuda.py),
the one line without a GPU, and the bad arguments. No assertion is on a time."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "dev", "bench_attention.py")

import bench_attention  # noqa: E402

ROW = re.compile(r"^(flash|materialized|SDPA)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", re.M)


def run(*args, emulate=True):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("LLMC_EMULATE", None)
    if emulate:
        env["LLMC_EMULATE"] = "1"
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def has_flash():
    return os.path.exists(os.path.join(REPO, "kernels", "flash_attention.cu")) and \
        "def flash_attention_forward(" in open(os.path.join(REPO, "train_gpt2_cuda.py")).read()


emulated = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None or not has_flash(),
                              reason="the emulator needs g++, and the checkout kernels/flash_attention.cu")


@emulated
def test_tiny_shape_end_to_end_on_the_emulator():
    """B=1 NH=2 hs=64 T=33 (two key tiles, the second short): the three agree with SDPA in fp32 to a few
    bf16 steps, then each is run and reported, and the summary gives flash / SDPA."""
    r = run()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "== B=1 NH=2 hs=64 T=33, bf16" in r.stdout
    rows = {m[1]: [float(x) for x in m.groups()[1:]] for m in ROW.finditer(r.stdout)}
    assert set(rows) == {"flash", "materialized", "SDPA"}, r.stdout
    for path, errs in rows.items():                     # out, dq, dk, dv relative to SDPA fp32
        assert all(0 < e < 4 * 2**-8 for e in errs), (path, errs)
    assert "flash and materialized agree with SDPA" in r.stdout
    timed = re.findall(r"^(flash|materialized|SDPA)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", r.stdout, re.M)
    assert [t[0] for t in timed] == ["flash", "materialized", "SDPA"]
    assert all(abs(float(f) + float(b) - float(total)) < 2e-3 for _, f, b, total in timed)
    summary = r"^summary: flash / SDPA fwd\+bwd at B=1 NH=2: hs=64 T=33 [\d.]+x \(target <= 1.3x: (met|not met)\)$"
    assert re.search(summary, r.stdout, re.M), r.stdout
    assert "(the d12 step: not on the emulator)" in r.stdout


@emulated
def test_compare_only_over_several_shapes():
    """--time 0: T=1 (one key, dq = 0) and hs=128 too, no timing table."""
    r = run("--time", "0", "-B", "1", "--NH", "1", "-T", "1,17", "--hs", "64,128")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("flash and materialized agree with SDPA: every error within") == 4
    assert "forward ms" not in r.stdout
    assert "summary: flash and materialized agree with SDPA at B=1 NH=1, 4 shapes (hs 64,128, T 1,17)" in r.stdout


def test_errors_and_agreement_catch_a_planted_error():
    C, rng = 8, np.random.default_rng(0)
    ref = (3 * rng.standard_normal((2, 5, C)), 3 * rng.standard_normal((2, 5, 3 * C)))   # max |ref| > 1
    near = (ref[0] * (1 + 2**-9), ref[1] * (1 + 2**-9))
    errs = bench_attention.errors(near, ref, C)
    assert set(errs) == {"out", "dq", "dk", "dv"} and all(abs(e - 2**-9) < 1e-12 for e in errs.values())
    bad = (ref[0], ref[1].copy())
    bad[1][1, 3, C + 2] += 0.5 * np.abs(ref[1][..., C:2 * C]).max()        # one element of dk
    wrong = bench_attention.errors(bad, ref, C)
    assert wrong["dk"] == pytest.approx(0.5) and wrong["dq"] == wrong["dv"] == wrong["out"] == 0
    small = bench_attention.errors((ref[0], np.full_like(ref[1], 1e-7)), (ref[0], np.zeros_like(ref[1])), C)
    assert small["dq"] == pytest.approx(1e-7)                # a zero reference: the error is absolute
    sdpa = dict.fromkeys(errs, 2**-9)
    assert bench_attention.agree({"flash": errs, "materialized": errs, "SDPA": sdpa}) == []
    assert bench_attention.agree({"flash": wrong, "materialized": errs, "SDPA": sdpa}) == ["flash dk"]
    nan = dict(errs, out=float("nan"))
    assert bench_attention.agree({"flash": errs, "materialized": nan, "SDPA": sdpa}) == ["materialized out"]
    # 2 x 2^-9 + 2^-8 = 2^-7 is the edge for flash; the materialized path has one bf16 step more
    edge = dict.fromkeys(errs, 2**-7 + 2**-10)
    assert bench_attention.agree({"flash": edge, "materialized": edge, "SDPA": sdpa}) == \
        ["flash out", "flash dq", "flash dk", "flash dv"]


def test_step_tokens_per_second_is_the_median_after_two():
    line = "step {:4d}/6: train loss 10.5 (+0.00z) ({:.2f} ms, {} tok/s, 40.0% MFU) norm 1.2 (+0.00z) lr 3e-04 (eta 1s)"
    log = "\n".join(["attention: flash (-fa 1)"] + [line.format(i, 100.0, r) for i, r in
                                                     enumerate([10, 20, 300, 100, 200, 250], 1)])
    assert bench_attention.step_tokens_per_second(log) == 225
    with pytest.raises(ValueError, match="expected more than 2 step lines with tok/s, found 2"):
        bench_attention.step_tokens_per_second("\n".join(log.splitlines()[:3]))


def test_without_a_gpu_one_line_and_exit_0():
    if bench_attention.gpu_status() is None:
        pytest.skip("this machine has a GPU")
    r = run(emulate=False)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("bench_attention.py: no GPU (") and r.stdout.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["-T", "1024,x"], "-T and --hs must be comma-separated integers"),
    (["-T", "0"], "every T and every head size must be >= 1"),
    (["--step_steps", "2"], "--step_steps must be >= 3"),
])
def test_bad_arguments(args, message):
    r = run(*args)
    assert r.returncode == 2 and message in r.stderr


FAKE_TRAINER = r"""#!SYS_EXECUTABLE
import sys
args = sys.argv[1:]
fa = args[args.index("-fa") + 1]
assert args[0] == "train_gpt2_cuda.py" and args[args.index("-p") + 1] == "bf16", args
flash = fa == "1" and "NOFLASH" not in args[2]
print("attention: flash (-fa 1, kernels/flash_attention.cu): no (B,NH,T,T) tensors" if flash
      else "attention: materialized, (B,NH,T,T) tensors (-fa 0)")
for s, rate in enumerate([10, 20, 1300, 1200, 1250] if fa == "1" else [10, 20, 1000, 1000, 1000], 1):
    print(f"step {s:4d}/5: train loss 10.5 (+nanz) (12.00 ms, {rate} tok/s, MFU n/a) norm 1.0 (+nanz) "
          "lr 3e-04 (eta 0s)")
"""


def test_train_step_reads_the_trainer_and_refuses_a_run_without_flash(tmp_path, capsys):
    """train_step's command line and parsing through a fake python: the median after two steps, the start-up
    line printed; -fa 1 that runs the materialized path is an error, not a slow number."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_TRAINER.replace("SYS_EXECUTABLE", sys.executable))
    fake.chmod(0o755)
    assert bench_attention.train_step("d12", 1, 16, 1024, 5, str(fake)) == 1250
    assert bench_attention.train_step("d12", 0, 16, 1024, 5, str(fake)) == 1000
    out = capsys.readouterr().out
    assert "-e d12 -b 16 -t 1024 -p bf16 -x 5 -v 0 -s 0 -fa 1" in out and "attention: flash (-fa 1" in out
    with pytest.raises(SystemExit, match="-fa 1 did not run flash attention"):
        bench_attention.train_step("NOFLASH", 1, 16, 1024, 5, str(fake))
