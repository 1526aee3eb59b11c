"""The CPU step's floor (llmc/floor.py, dev/bench_cpu.py): the byte formulas against the arrays each call is
given, the floor's arithmetic in the bench's output, --threads reaching the pool (clamped), the gradient
zeroing folded into AdamW against the separate zeroing, and two identical runs giving the same bytes."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import bench_cpu
import train_gpt2 as m
from llmc import cpu, floor, formats, profiler
from llmc.model import GPT2Config
from conftest import run_main, write_tiny_model
from test_optim import CONFIG, tiny_model  # (AdamW's tests' tiny GPT-2: L2, NH3, C48, V101)

ROOT = os.path.join(os.path.dirname(__file__), "..")


def train_steps(model, steps, B, T, seed=1):
    """bench_cpu's step (zero_grad, forward, backward, AdamW) on seeded random tokens."""
    r = np.random.default_rng(seed)
    for t in range(1, steps + 1):
        tokens = r.integers(0, CONFIG.vocab_size, size=B * T + 1)
        m.gpt2_zero_grad(model)
        m.gpt2_forward(model, tokens[:-1].reshape(B, T), tokens[1:].reshape(B, T), B, T)
        m.gpt2_backward(model)
        m.gpt2_update(model, 1e-3, 0.9, 0.999, 1e-8, 0.1, t)


def test_step_bytes_match_the_arrays_each_call_is_given(monkeypatch):
    """step_bytes' formula of every layer and optimizer phase equals the bytes llmc.floor counts from the
    arrays each call of a real step is given (the profiler's count), summed over the step."""
    monkeypatch.setattr(profiler, "PROFILE", {})
    monkeypatch.setattr(profiler, "WORK", {})
    monkeypatch.setattr(profiler, "ACTIVE", [False])
    B, T = 3, 8
    model = tiny_model()
    profiler.enable(m)
    try:
        train_steps(model, 1, B, T)                  # allocates; its zero_grad finds no gradients yet
        profiler.ACTIVE[0] = True
        train_steps(model, 1, B, T, seed=2)
    finally:
        profiler.ACTIVE[0] = False
        profiler.disable(m)
    counted = {}
    for key, (nbytes, _) in profiler.WORK.items():
        name = profiler.function_name(key)
        if not name.startswith("matmul"):
            counted[name] = counted.get(name, 0) + nbytes
    counted["activation gradients"] = model.grads_acts_memory.nbytes
    formulas = bench_cpu.step_bytes(CONFIG, B, T)
    assert set(formulas) == set(counted), (set(formulas) ^ set(counted))
    for name, nbytes in formulas.items():
        assert nbytes == counted[name], (name, nbytes, counted[name])
    assert formulas["gpt2_zero_grad"] == 0 and formulas["gpt2_update"] == 32 * model.num_parameters
    # the products: the profiler's shapes are step_gemms' (M, K, N) with their calls per step
    products = {}
    for key, (_, shapes) in profiler.WORK.items():
        for (M, K, N, _), n in shapes.items():
            products[(M, K, N)] = products.get((M, K, N), 0) + n
    listed = {}
    for M, K, N, _, calls in bench_cpu.step_gemms(CONFIG, B, T):
        listed[(M, K, N)] = listed.get((M, K, N), 0) + calls
    assert products == listed


def test_call_bytes_counts_gathered_rows_not_whole_tables():
    """The encoder reads only the rows of wte its tokens pick (and wpe[:T]); crossentropy one probability per
    position: counting the whole arrays would charge d12's 154 MB wte to a 2-token lookup."""
    wte, wpe = np.zeros((50, 4), np.float32), np.zeros((16, 4), np.float32)
    inp, out = np.array([[3, 3]], np.int32), np.zeros((1, 2, 4), np.float32)
    assert floor.call_bytes("encoder_forward", (out, inp, wte, wpe, 1, 2, 4)) == 32 + 8 + 32 + 32
    assert floor.call_bytes("encoder_backward", (wte, wpe, out, inp, 1, 2, 4)) == 64 + 64 + 32 + 8
    losses, probs = np.zeros((1, 2), np.float32), np.zeros((1, 2, 50), np.float32)
    assert floor.call_bytes("crossentropy_forward", (losses, probs, inp, 1, 2, 50)) == 8 + 8 + 8
    assert floor.call_bytes("softmax_forward", (probs, probs, 1, 2, 50, 50)) == 2 * probs.nbytes
    assert floor.call_bytes("matmul_forward", (out, out, wte, None, 1, 2, 4, 4)) == 0     # a product, not bytes
    assert floor.call_products("matmul_backward", (out, wte, None, out, out, wte, 1, 2, 4, 50)) == \
        [(2, 50, 4, False), (50, 2, 4, False)]


def test_set_threads_clamps_to_the_usable_cpus():
    before = cpu.NUM_THREADS
    usable = cpu.usable_cpus()
    try:
        note = cpu.set_threads(usable + 3)
        assert cpu.NUM_THREADS == usable
        assert note == (f"threads: {usable + 3} asked, but this process may use {usable} CPUs (its affinity): "
                        f"using {usable}")
        assert cpu.set_threads(1) is None and cpu.NUM_THREADS == 1
        assert cpu.parallel_rows(lambda r: (r.start, r.stop), 10) == [(0, 10)]     # one thread: one slice
        for bad in (0, -2, 1.5, True):
            with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
                cpu.set_threads(bad)
    finally:
        cpu.set_threads(before)
    assert cpu.NUM_THREADS == before


def test_zeroing_in_adamw_gives_the_bits_of_separate_zeroing(monkeypatch):
    """The gradients zeroed in AdamW's pass (adamw_and_zero_grad) and gpt2_zero_grad skipping them: the same
    parameters, m and v, bit for bit, as the update leaving them and gpt2_zero_grad filling them."""
    fused = tiny_model()
    train_steps(fused, 3, 2, 8)
    assert fused.zeroed_grads is fused.grads_memory and not fused.grads_memory.any()
    monkeypatch.setattr(m, "ZERO_GRAD_IN_UPDATE", False)          # the update leaves the gradients alone
    separate = tiny_model()
    zeroings = []
    real_zero = m.zero
    monkeypatch.setattr(m, "zero", lambda a: zeroings.append(a.size) or real_zero(a))
    train_steps(separate, 3, 2, 8)
    assert zeroings.count(separate.num_parameters) == 2                # steps 2 and 3 zeroed them themselves
    for name in ("params_memory", "m_memory", "v_memory"):
        np.testing.assert_array_equal(getattr(fused, name), getattr(separate, name), err_msg=name)


def test_zero_grad_after_a_backward_still_zeroes():
    """A backward after the update makes the gradients live again: gpt2_zero_grad must clear them."""
    model = tiny_model()
    train_steps(model, 1, 2, 8)
    r = np.random.default_rng(5)
    tokens = r.integers(0, CONFIG.vocab_size, size=17)
    m.gpt2_forward(model, tokens[:-1].reshape(2, 8), tokens[1:].reshape(2, 8), 2, 8)
    m.gpt2_backward(model)
    assert model.zeroed_grads is None and model.grads_memory.any()
    m.gpt2_zero_grad(model)
    assert not model.grads_memory.any() and model.zeroed_grads is model.grads_memory


def test_two_identical_runs_write_the_same_bytes(tmp_path, monkeypatch, capsys):
    """train_gpt2.py twice with the same flags: the same step lines (less their times) and the same model file."""
    config = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=1, num_heads=2, channels=32,
                        padded_vocab_size=50304)
    write_tiny_model(tmp_path / "tiny.bin", config, np.random.default_rng(0), 0.02)
    text = np.tile(np.random.default_rng(1).integers(0, 50257, size=40), 20)
    formats.write_data_shard(str(tmp_path / "train.bin"), text)
    monkeypatch.chdir(tmp_path)
    lines, files = [], []
    for run in ("a", "b"):
        code, out, err = run_main(["-e", "tiny.bin", "-i", "train.bin", "-j", "train.bin", "-b", "2", "-t", "16",
                                   "-x", "3", "-v", "0", "-s", "0", "-o", run], capsys)
        assert code == 0, err
        steps = [re.sub(r"\(\S+ ms, [^)]*\)|\(eta [^)]*\)", "", line)        # less the times
                 for line in out.splitlines() if line.startswith("step ")]
        assert len(steps) == 3
        lines.append(steps)
        files.append((tmp_path / run / "model_00000003.bin").read_bytes())
    assert lines[0] == lines[1]
    assert files[0] == files[1]


def test_bench_prints_the_floor_per_phase(tmp_path):
    """dev/bench_cpu.py on a tiny model, --threads clamped, --scaling 1: the floor table's arithmetic."""
    config = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=2, num_heads=2, channels=32,
                        padded_vocab_size=50304)
    write_tiny_model(tmp_path / "tiny.bin", config, np.random.default_rng(0), 0.02)
    asked = cpu.usable_cpus() + 5
    r = subprocess.run([sys.executable, os.path.join(ROOT, "dev", "bench_cpu.py"), "--checkpoint",
                        str(tmp_path / "tiny.bin"), "--data", "", "-b", "2", "-t", "16", "--steps", "2", "--warmup",
                        "1", "--trainers", "numpy", "--gemm_repeats", "1", "--threads", str(asked), "--scaling", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    usable = cpu.usable_cpus()
    assert f"bench_cpu.py: threads: {asked} asked, but this process may use {usable} CPUs" in out
    assert f"{usable} threads (of" in out
    assert f"llmc's thread pool: {usable} threads (llmc.cpu.set_threads)" in out       # the worker's own pool
    copy, triad, bandwidth = map(float, re.search(r"memory copy (\S+) GB/s, triad (\S+) GB/s; this machine: "
                                                  r"memory (\S+) GB/s", out).groups())
    assert bandwidth == max(copy, triad) > 0
    table = out.split("(ours: the mean of the profiled steps)\n")[1].splitlines()[:5]
    rows = {line[:12].strip(): line[12:].split() for line in table}
    assert list(rows) == ["products", "AdamW", "zeroing", "the rest", "step"]
    ms = {k: float(v[0]) for k, v in rows.items()}
    floors = {k: float(v[1]) for k, v in rows.items()}
    assert abs(sum(floors[p] for p in floor.PHASES) - floors["step"]) <= 0.25
    assert abs(sum(ms[p] for p in floor.PHASES) - ms["step"]) <= 0.25
    for phase in ("products", "AdamW", "the rest", "step"):           # reached = floor / ours
        assert abs(int(rows[phase][2].rstrip("%")) - 100 * floors[phase] / ms[phase]) <= 0.5 + 5 / ms[phase]
    assert rows["zeroing"][1:] == ["0.0", "-"]                        # folded into AdamW's pass
    roofline = float(re.search(r"^GEMM roofline: (\S+) ms", out, re.M)[1])
    assert abs(floors["products"] - roofline) <= 0.1
    nbytes = bench_cpu.step_bytes(config, 2, 16)                     # AdamW's bytes at the printed bandwidth
    want = 1e3 * nbytes["gpt2_update"] / (bandwidth * 1e9)
    assert abs(floors["AdamW"] - want) <= 0.051 + want * 0.06 / bandwidth
    median = float(re.search(r"^ours \(NumPy, train_gpt2.py\)\s+(\S+)", out, re.M)[1])
    reached, total, step = re.search(r"^the step reaches (\d+)% of its floor \((\S+) ms of the median (\S+) ms",
                                     out, re.M).groups()
    assert float(step) == median and abs(float(total) - floors["step"]) <= 0.1
    assert abs(int(reached) - 100 * float(total) / median) <= 0.5 + 5 / median
    single, threaded = map(float, re.search(r"^scaling from 1 to \d+ threads \(median ms/step\): ours \S+x "
                                            r"\((\S+) -> (\S+) ms\)", out, re.M).groups())
    speedup = float(re.search(r"ours (\S+)x", out)[1])
    assert threaded == median and abs(speedup - single / threaded) <= 0.006 + 0.1 / threaded
