"""test_gpt2.py --trainer cuda in bf16, on the kernel emulator (LLMC_EMULATE=1), on a tiny PyTorch export.

The export (conftest's tiny_export: L2 NH2 C32 maxT32 V50257, B2 T16, 10 AdamW steps) is fp32, and so is
its debug state; test_gpt2.py rounds the weights to bf16 at load and judges our bf16 passes against that
fp32 reference with llm.c test_gpt2.cu's bf16 tolerances. Every tensor's ratio (max |ours - ref| /
tolerance) must be within our target, 0.5 (twice as tight as llm.c's). Then the check must be able to fail: a debug state with
one gradient value moved by 3 tolerances fails it; one moved by 0.75 of a tolerance passes llm.c's
thresholds but misses the target, and --target 0.5 turns that into exit status 1.
"""

import os
import re
import shutil

import numpy as np
import pytest

from conftest import run_script

import test_gpt2
from llmc import formats
from llmc.model import param_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAMES = ["logits", "loss"] + ["d" + name for name in test_gpt2.BF16_GRAD_THRESHOLDS]
RATIO_LINE = re.compile(r"^ratio (.+?)\s+(\S+)$", re.M)

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or not os.path.exists(os.path.join(REPO, "emulator", "__init__.py")),
    reason="the kernel emulator needs emulator/ and g++")


def run_bf16(model, state, *extra):
    return run_script("test_gpt2.py", "--trainer", "cuda", "--checkpoint", model, "--debug_state", state, *extra,
                      cwd=os.path.dirname(model), env={"LLMC_EMULATE": "1"}, timeout=300)


def summary_ratios(out):
    """The [bf16 summary]'s ratios by name."""
    return {name: float(r) for name, r in RATIO_LINE.findall(out.split("[bf16 summary]")[1])}


def test_bf16_matches_pytorch_within_target(tiny_export):
    """Default precision on the emulator is bf16; every tensor's ratio printed, all <= 0.5; exit 0."""
    r = run_bf16(tiny_export.model, tiny_export.state)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-2000:]
    assert "precision: bf16, fp32 master weights (-w 1); the reference is PyTorch's fp32" in out
    # each tensor's own line, with test_gpt2.cu's tolerance rule, then the summary
    lines = re.findall(r"^  max abs err (\S+)  tolerance (.+?)  ratio (\S+)  OK$", out, re.M)
    assert len(lines) == 2 + 16
    assert [rule for _, rule, _ in lines] == ["25", "0.05"] + [f"{t:g} + 0.079|ref|"
                                                            for t in test_gpt2.BF16_GRAD_THRESHOLDS.values()]
    ratios = summary_ratios(out)
    assert list(ratios) == NAMES + ["losses (10 steps, worst)"]
    assert [float(r) for _, _, r in lines] == [ratios[n] for n in NAMES]
    assert all(0 <= r <= 0.5 for r in ratios.values()), ratios
    # bf16 really ran: fp32 on the emulator reproduces PyTorch's gradients to ~1e-7 of their tolerance
    assert max(ratios[n] for n in NAMES[2:]) > 1e-3
    steps = re.findall(r"^step (\d+): loss (\S+) expected (\S+) err \S+ norm \S+ ratio (\S+) OK \(", out, re.M)
    assert len(steps) == 10
    for _, ours, ref, ratio in steps:
        assert abs(float(ours) - float(ref)) <= 0.5 * 0.05
        assert float(ratio) <= ratios["losses (10 steps, worst)"]
    assert "llm.c thresholds (every ratio <= 1): pass" in out
    assert "target (every ratio <= 0.5): met" in out
    assert out.rstrip().endswith("overall okay: 1")


def test_without_master_weights(tiny_export):
    """-w 0: AdamW updates the bf16 weights themselves (stochastic rounding); two steps still within the target."""
    r = run_bf16(tiny_export.model, tiny_export.state, "--precision", "bf16", "-w", "0", "--steps", "2",
                 "--target", "0.5")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "precision: bf16, no master weights (-w 0); the reference is PyTorch's fp32" in r.stdout
    assert list(summary_ratios(r.stdout)) == NAMES + ["losses (2 steps, worst)"]
    assert len(re.findall(r"^step \d+: .* OK \(", r.stdout, re.M)) == 2
    assert r.stdout.rstrip().endswith("overall okay: 1")


def moved_state(tiny_export, tmp_path, k):
    """A copy of the debug state with one dfcprojw value (a non-negative one) moved up by k of its bf16
    tolerance: |moved - ref| = k (0.02 + 0.079 |moved|)."""
    config, _ = formats.read_model_file(tiny_export.model)
    s = formats.read_debug_state(tiny_export.state, config)
    offset = 0
    for name, shape in param_shapes(config):
        if name == "fcprojw":
            break
        offset += int(np.prod(shape))
    i = offset + int(np.argmax(s.grads[offset:offset + 64] >= 0))
    ref = float(s.grads[i])
    s.grads[i] = ref + k * (0.02 + 0.079 * ref) / (1 - k * 0.079)
    path = tmp_path / "moved_debug_state.bin"
    formats.write_debug_state(str(path), s.x, s.y, s.logits, s.loss, s.grads, s.losses, s.optimizer)
    return str(path)


def test_wrong_gradient_fails(tiny_export, tmp_path):
    """One gradient value 3 tolerances off: dfcprojw NOT OK, exit 1."""
    r = run_bf16(tiny_export.model, moved_state(tiny_export, tmp_path, 3.0), "--steps", "0")
    out = r.stdout
    assert r.returncode == 1, out[-3000:] + r.stderr[-2000:]
    assert re.search(r"^dfcprojw .*\n(.*\n){5}  max abs err .* NOT OK \(1 of 8192 values over 1x the tolerance\)$",
                     out, re.M)
    ratios = summary_ratios(out)
    assert abs(ratios["dfcprojw"] - 3.0) < 0.05  # our own error on that value is < 1% of its tolerance
    assert all(r <= 0.5 for n, r in ratios.items() if n != "dfcprojw")
    assert "worst: dfcprojw" in out
    assert "llm.c thresholds (every ratio <= 1): FAIL" in out
    assert "target (every ratio <= 0.5): NOT met" in out
    assert out.rstrip().endswith("overall okay: 0")


def test_target_sets_the_exit_status(tiny_export, tmp_path):
    """0.75 of a tolerance: within llm.c's thresholds (exit 0) but not the 0.5 target; --target 0.5 exits 1."""
    state = moved_state(tiny_export, tmp_path, 0.75)
    r = run_bf16(tiny_export.model, state, "--steps", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert abs(summary_ratios(r.stdout)["dfcprojw"] - 0.75) < 0.05
    assert "llm.c thresholds (every ratio <= 1): pass" in r.stdout
    assert "target (every ratio <= 0.5): NOT met" in r.stdout
    assert r.stdout.rstrip().endswith("overall okay: 1")
    r = run_bf16(tiny_export.model, state, "--steps", "0", "--target", "0.5")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert "NOT OK (1 of 8192 values over 0.5x the tolerance)" in r.stdout
    assert "llm.c thresholds (every ratio <= 1): pass" in r.stdout
    assert r.stdout.rstrip().endswith("overall okay: 0")


def test_ratio_rule():
    """The ratio: max |ours - ref| / (threshold + rel |ref|); NaN counts as infinitely far."""
    ref = np.array([0.0, 10.0, -2.0], dtype=np.float32)
    ours = ref + np.array([0.05, 0.89, 0.0], dtype=np.float32)  # tolerances 0.1, 0.89, 0.258
    assert test_gpt2.bf16_ratio("t", ours, ref, 0.1, 0.079, 1.0) == pytest.approx(1.0, rel=1e-5)
    assert test_gpt2.bf16_ratio("t", ours, ref, 0.1, 0.0, 1.0) == pytest.approx(8.9, rel=1e-5)  # logits: no rel
    assert test_gpt2.bf16_ratio("t", [np.nan, 10.0, -2.0], ref, 0.1, 0.079, 1.0) == np.inf


def test_bf16_flags_in_the_wrong_mode(tiny_export):
    """--precision bf16 needs the CUDA trainer; --target is bf16's, --atol fp32's: one usage line each."""
    for extra, message in [(["--trainer", "numpy", "--precision", "bf16"], "needs --trainer cuda"),
                           (["--precision", "fp32", "--target", "0.5"], "--target is the bf16 check's"),
                           (["--atol", "1e-3"], "--atol/--rtol set the fp32 check")]:
        r = run_script("test_gpt2.py", "--trainer", "cuda", "--checkpoint", tiny_export.model, *extra,
                       cwd=tiny_export.dir, env={"LLMC_EMULATE": "1"})
        assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr
