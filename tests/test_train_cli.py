"""train_gpt2.py's command line: llm.c's flags, the errors a user can make, and a tiny run."""

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import train_gpt2 as m
from llmc import formats, run
from llmc.model import GPT2Config, num_parameters
from llmc.dataloader import DataLoader
from conftest import run_main
from conftest import write_tiny_model

ROOT = os.path.join(os.path.dirname(__file__), "..")

TINY = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=1, num_heads=2, channels=32, padded_vocab_size=50304)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory with a tiny checkpoint and tiny train/val shards."""
    r = np.random.default_rng(0)
    write_tiny_model(tmp_path / "tiny.bin", TINY, r, 0.02)
    # a repetitive text, so the loss can fall in a few steps
    text = np.tile(r.integers(0, 50257, size=40), 20)
    formats.write_data_shard(str(tmp_path / "train.bin"), text)
    formats.write_data_shard(str(tmp_path / "val.bin"), text[:300])
    monkeypatch.chdir(tmp_path)
    return tmp_path


BASE = ["-e", "tiny.bin", "-i", "train.bin", "-j", "val.bin", "-b", "2", "-t", "16"]


def test_tiny_run_logs_samples_and_checkpoint(workdir, capsys):
    code, out, err = run_main(BASE + ["-x", "4", "-v", "2", "-m", "2", "-s", "4", "-g", "6", "-l", "3e-3",
                                      "-o", "log"], capsys)
    assert code == 0, err
    pad = (50304 - 50257) * 32
    for line in ("[GPT-2]", "max_seq_len: 32", "vocab_size: 50257", "padded_vocab_size: 50304", "num_layers: 1",
                 "num_heads: 2", "channels: 32", "OpenBLAS core",
                 f"num_parameters: {num_parameters(TINY)} ({num_parameters(TINY) - pad:,} + {pad:,} "
                 f"in wte's 47 zero pad rows: the vocabulary 50257 is padded to 50304, a multiple of 128)"):
        assert line in out, line
    steps = [l for l in out.splitlines() if l.startswith("step ")]
    assert len(steps) == 4 and all(STEP_RE.match(l) for l in steps), steps
    assert all(STEP_RE.match(l)["zloss"] == STEP_RE.match(l)["zgrad"] == "+nan" for l in steps)  # window filling
    assert all(STEP_RE.match(l)["mfu"] == "MFU n/a" for l in steps)     # the CPU has no peak FLOP/s
    assert "FLOPs per token (6N + 6LCT); no peak FLOP/s known for CPU, so MFU n/a" in out
    losses = [float(l.split("train loss ")[1].split()[0]) for l in steps]
    assert losses[-1] < losses[0]
    assert out.count("val loss ") == 3                          # steps 0, 2 and the last
    assert "generating:\n---\n" in out and "WARNING: failed to read the tokenizer" in out
    sample = out.split("generating:\n---\n")[1].split("\n---")[0].split()
    assert len(sample) == 5 and all(0 <= int(t) < 50257 for t in sample)   # 5 ids (no tokenizer file)
    log = open("log/main.log").read().splitlines()
    # llm.c's logger.h: the loop's 0-based step, 4 decimals, the first update's loss at s:0
    assert [l.split()[0] for l in log] == ["s:0", "s:0", "s:1", "s:2", "s:2", "s:3", "s:4"], log
    assert re.fullmatch(r"s:0 tel:\d+\.\d{4}", log[0]) and log[-1].startswith("s:4 tel:")
    first = STEP_RE.match(steps[0])
    assert log[1] == f"s:0 trl:{losses[0]:.4f} lr:{float(first['lr']):.6f} norm:{float(first['norm']):.2f}", log[1]
    config, params = formats.read_model_file("log/model_00000004.bin")
    assert config == TINY and np.isfinite(params).all()


# the step line: loss and its z-score (llm.c's "(%+.2fz)", "+nan" for the first 128 steps), time, tokens/s
# (a moving average), MFU (or "MFU n/a"), gradient norm and its z-score, learning rate, the run's ETA
STEP_RE = re.compile(r"^step +(?P<step>\d+)/(?P<steps>\d+): train loss (?P<loss>\S+) "
                     r"\((?P<zloss>[+-](?:nan|\d+\.\d\d))z\) \((?P<ms>\S+) ms, (?P<tok_s>\d+) tok/s, "
                     r"(?P<mfu>MFU n/a|\d+\.\d% (?:bf16|tf32|fp32) MFU)\) "
                     r"norm (?P<norm>\S+) \((?P<zgrad>[+-](?:nan|\d+\.\d\d))z\) lr (?P<lr>\S+) "
                     r"\(eta (?P<eta>\d+h\d\dm|\d+m\d\ds|\d+s)\)$")


def test_step_line_shows_tokens_per_second_and_mfu(workdir, capsys, monkeypatch):
    """With a device the peak table knows (pretended here) and step times we choose (a fake timer), the
    MFU is each step's model FLOPs over its time and that peak, and tok/s the bias-corrected moving
    average of 0.95 that leaves the first step out, as computed by hand."""
    times = iter([4.0, 0.002, 0.001])                 # ms per step (the first a slow warm-up)

    class FixedTimer:
        def start(self):
            pass

        def stop(self):
            return next(times)

    cpu_setup = m.device_setup
    monkeypatch.setattr(m, "device_setup", lambda args, world: dataclasses.replace(
        cpu_setup(args, world), name="NVIDIA H100 80GB HBM3", gemm_precision="tf32"))
    monkeypatch.setattr(m, "StepTimer", FixedTimer)
    code, out, err = run_main(BASE + ["-x", "3", "-v", "0", "-s", "0"], capsys)
    assert code == 0, err
    assert "against NVIDIA H100 80GB HBM3's tf32 peak, 494.5 TFLOP/s" in out
    steps = [STEP_RE.match(l) for l in out.splitlines() if l.startswith("step ")]
    assert len(steps) == 3 and all(steps), out
    tokens = 2 * 16                                   # B * T
    flops = (6 * num_parameters(TINY) + 6 * 1 * 32 * 16) * tokens
    rates = [tokens / 4e-3, tokens / 2e-6, tokens / 1e-6]
    want_tok_s = [rates[0], rates[1], (0.95 * 0.05 * rates[1] + 0.05 * rates[2]) / (1 - 0.95 ** 2)]
    for s, t, tok_s in zip(steps, (4e-3, 2e-6, 1e-6), want_tok_s):
        assert s["mfu"] == f"{100 * flops / t / 494.5e12:.1f}% tf32 MFU"
        assert int(s["tok_s"]) == round(tok_s)


def test_overfit_single_batch_and_accumulation(workdir, capsys):
    code, out, err = run_main(BASE + ["-x", "6", "-a", "1", "-v", "0", "-s", "0", "-l", "1e-2"], capsys)
    assert code == 0, err
    losses = [float(l.split("train loss ")[1].split()[0]) for l in out.splitlines() if l.startswith("step ")]
    assert losses[-1] < losses[0] - 1.5 and all(b < a for a, b in zip(losses, losses[1:]))
    code, out, err = run_main(BASE + ["-x", "1", "-d", "64", "-v", "0", "-s", "0"], capsys)
    assert code == 0 and "total 64 tokens = 2 micro-step(s)" in out


def test_overfit_single_batch_resets_once_per_step(workdir, capsys):
    """-a 1 with 2 micro-steps: each step trains on the val split's first TWO batches (the loader is
    reset once per optimizer step, as llm.c), not on the first batch twice."""
    code, out, err = run_main(BASE + ["-x", "2", "-a", "1", "-d", "64", "-v", "0", "-s", "0", "-l", "0"], capsys)
    assert code == 0, err
    losses = [float(STEP_RE.match(l)["loss"]) for l in out.splitlines() if l.startswith("step ")]
    model = m.gpt2_build_from_checkpoint("tiny.bin")
    loader = DataLoader("val.bin", 2, 16)
    per_batch = []
    for _ in range(2):
        x, y = loader.next_batch()
        m.gpt2_forward(model, x, y, 2, 16)
        per_batch.append(model.mean_loss)
    assert per_batch[0] != pytest.approx(per_batch[1], abs=1e-3)        # the two batches differ
    assert losses == pytest.approx([sum(per_batch) / 2] * 2, abs=2e-6)   # lr 0: both steps see both batches


@pytest.mark.parametrize("argv,message", [
    (["-zz", "1"], "unknown flag -zz"),
    (["-b"], "flag -b needs a value"),
    (["-b", "four"], "flag -b needs an integer, got 'four'"),
    (["-l", "fast"], "flag -l needs a number, got 'fast'"),
    (["-x", "1.5e0"], "flag -x needs an integer, got '1.5e0'"),
    (["x", "1"], "expected a flag, got 'x'"),
    (["--b", "2"], "unknown flag --b"),
    (["-x", "-o", "dir"], "flag -x needs a value"),          # blames -x, not the directory
])
def test_bad_flags_print_usage(argv, message, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 1 and f"error: {message}" in err and "Usage:" in err and "-x" in err


def test_help_prints_usage_and_succeeds(capsys):
    code, out, err = run_main(["-h"], capsys)
    assert code == 0 and "Usage:" in out and "-e " in out and err == ""
    # the defaults decided at run time are spelled out, not shown as ''
    assert "(default: data/tinyshakespeare/tiny_shakespeare_train.bin if it exists, else " \
           "data/tinystories/TinyStories_train.bin)" in out
    assert "(default: gpt2_124M.bin, or gpt2_d12.bin when only that exists)" in out
    assert "''" not in out


def test_flags_become_llmc_named_attributes():
    args = m.parse_args(["-l", "3e-3", "-k", "wsd", "-u", "5", "-x", "1e2", "-b", "2"], m.TRAIN_GPT2_C_DEFAULTS)
    assert (args.learning_rate, args.lr_scheduler_type, args.warmup_iterations, args.max_steps, args.B) == \
        (3e-3, "wsd", 5, 100, 2)
    assert (args.T, args.val_loss_every, args.genT) == (64, 10, 64)              # train_gpt2.c's defaults
    assert args.given == {"learning_rate", "lr_scheduler_type", "warmup_iterations", "max_steps", "B"}
    assert type(args.learning_rate) is float and type(args.max_steps) is int


def test_trainer_api_is_complete():
    """llmc/run.py's Trainer lists what the shared loop takes from a trainer module (its annotations and its
    functions), and train_gpt2.py has every one of them (train_gpt2_cuda.py: test_cuda_trainer.py)."""
    assert len(run.TRAINER_API) == 24 and run.TRAINER_API[:3] == ("BETA1", "BETA2", "ADAM_EPS"), run.TRAINER_API
    assert {"StepTimer", "device_setup", "gpt2_forward", "gpt2_update", "log_gpu_info"} < set(run.TRAINER_API)
    assert [name for name in run.TRAINER_API if not hasattr(m, name)] == []


def test_default_T_shrinks_to_a_small_model(workdir, capsys):
    """-t not given and the default longer than the model's max_seq_len: T becomes max_seq_len, with a note;
    the same T asked for with -t is an error (see test_one_line_errors)."""
    saved = m.TRAIN_GPT2_C_DEFAULTS["T"]
    m.TRAIN_GPT2_C_DEFAULTS["T"] = 1024
    try:
        code, out, err = run_main(["-e", "tiny.bin", "-i", "train.bin", "-j", "val.bin", "-b", "1", "-x", "1",
                                   "-v", "0", "-s", "0"], capsys)
    finally:
        m.TRAIN_GPT2_C_DEFAULTS["T"] = saved
    assert code == 0, err
    assert "T = 32: the model's max_seq_len (the default -t 1024 is longer)" in out and "B=1 T=32" in out


@pytest.mark.parametrize("extra,message", [
    (["-t", "33"], "error: sequence length -t 33 exceeds the model's max_seq_len 32"),
    (["-j", "small.bin"], "small.bin: 20 tokens, fewer than the 33 one batch needs (B=2, T=16)"),
    (["-d", "50"], "-d 50 is not a multiple of B*T = 32"),
    (["-k", "cosin"], "unknown learning rate schedule 'cosin'"),
    (["-e", "d7"], "unknown model 'd7'"),
    (["-i", "missing_*.bin"], "no data files match 'missing_*.bin'"),
])
def test_one_line_errors(workdir, extra, message, capsys):
    formats.write_data_shard("small.bin", np.arange(20))
    code, out, err = run_main(BASE + extra, capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_default_checkpoint_and_fallback(workdir, capsys):
    args = ["-i", "train.bin", "-j", "val.bin", "-b", "2", "-t", "16", "-x", "1", "-v", "0", "-s", "0"]
    code, out, err = run_main(args, capsys)
    assert code == 1 and "gpt2_124M.bin: no such file" in err
    os.rename("tiny.bin", "gpt2_d12.bin")
    code, out, err = run_main(args, capsys)
    assert code == 0 and "gpt2_124M.bin not found: using gpt2_d12.bin" in out


def test_profile_flag_prints_per_layer_table(workdir):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py")] + BASE +
                         ["-x", "2", "-v", "0", "-s", "0", "--profile", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    table, floors = res.stdout.split("profile (ms per step)")[1].strip().split("\n\n")[:2]
    table = table.splitlines()[1:]
    rows = {" ".join(line.split()[:-3]): line.split()[-3:] for line in table[:-1]}
    # calls per step for L=1: every layer once, layernorm 2L+1, residual 2L each way, the four matmuls
    # of the block and the classifier once each way
    calls = {name: int(c) for name, (_, c, _) in rows.items()}
    for key, n in {"matmul_forward 32->50304": 1, "matmul_backward 32->50304": 1, "matmul_forward 32->96": 1,
                   "matmul_forward 128->32": 1, "matmul_backward 32->128": 1, "attention_backward": 1,
                   "gpt2_update": 1, "gpt2_zero_grad": 1, "layernorm_forward": 3, "layernorm_backward": 3,
                   "residual_forward": 2, "gelu_backward": 1, "encoder_forward": 1}.items():
        assert calls.get(key) == n, (key, calls)
    ms = {name: float(v) for name, (v, _, _) in rows.items()}
    total = table[-1].split()
    assert total[0] == "total" and abs(float(total[1]) - sum(ms.values())) <= 0.01 * len(ms)
    assert abs(sum(float(p) for _, _, p in rows.values()) - 100) <= 0.1 * len(rows)
    # the profiled time fits inside the counted step (step 2; step 1 allocates and is not counted)
    step2 = float(re.search(r"^step    2/2: train loss \S+ \(\S+z\) \((\S+) ms", res.stdout, re.M)[1])
    assert 0 < float(total[1]) <= step2
    # the floor per phase (llmc/floor.py): the profiled ms of each phase beside its floor on this machine;
    # the phases add up to the table's total; reached = floor / ms (the floor is measured after the run: on a
    # busy machine it can come out above the step's own time)
    lines = floors.splitlines()
    assert lines[0].startswith("floor per phase: this machine: memory ") and "GFLOP/s" in lines[0]
    phases = {line[:20].strip(): line[20:].split() for line in lines[2:]}
    assert list(phases) == ["products", "AdamW", "zeroing", "the rest", "total"], lines
    assert abs(float(phases["total"][0]) - float(total[1])) <= 0.05
    assert abs(sum(float(phases[p][0]) for p in list(phases)[:4]) - float(phases["total"][0])) <= 0.05
    assert phases["zeroing"][1:] == ["0.00", "-"]          # step 2: the update of step 1 zeroed the gradients
    for phase in ("products", "AdamW", "the rest"):
        ms, floor_ms, reached = phases[phase]
        assert 0 < float(floor_ms), (phase, phases[phase])
        assert abs(int(reached.rstrip("%")) - 100 * float(floor_ms) / float(ms)) <= 0.5 + 0.5 / float(ms)


def test_profiler_wraps_and_unwraps(monkeypatch):
    """enable() wraps the layers once, records only while ACTIVE, keys matmuls by shape; disable()
    puts the very same functions back."""
    from llmc import profiler
    monkeypatch.setattr(profiler, "PROFILE", {})
    monkeypatch.setattr(profiler, "ACTIVE", [False])
    originals = {name: getattr(m, name) for name in profiler.NAMES if hasattr(m, name)}
    assert "matmul_forward" in originals and "gpt2_update" in originals
    profiler.enable(m)
    profiler.enable(m)  # a second call does nothing: one wrapper deep
    try:
        for name, fn in originals.items():
            assert getattr(m, name) is not fn and getattr(m, name).__wrapped__ is fn
        x = np.ones((1, 2, 4), np.float32)
        w = np.ones((3, 4), np.float32)
        out = np.empty((1, 2, 3), np.float32)
        m.matmul_forward(out, x, w, None, 1, 2, 4, 3)
        assert profiler.PROFILE == {}
        profiler.ACTIVE[0] = True
        m.matmul_forward(out, x, w, None, 1, 2, 4, 3)
        m.matmul_forward(out, x, w, None, 1, 2, 4, 3)
        assert np.array_equal(out, np.full((1, 2, 3), 4, np.float32))
        (key, (seconds, n)), = profiler.PROFILE.items()
        assert n == 2 and seconds > 0 and "matmul_forward 4->3" in profiler.report(1)
    finally:
        profiler.disable(m)
    for name, fn in originals.items():
        assert getattr(m, name) is fn


def test_outlier_guard_skips_the_update_of_a_spike(workdir, capsys, monkeypatch):
    """-sl / -sg as llm.c's train_gpt2.cu: the loss and grad norm we choose (a fake forward and norm) go
    through the real loop; a step whose z-score is above the value prints a note and calls no gpt2_update,
    every other step updates with its own step's t and lr (a skipped step still counts). The printed
    z-scores are NumPy's over the last 128 values, "+nan" while the window fills."""
    from test_outlier import window_zscores
    N = 145
    r = np.random.default_rng(1)
    losses = 5.0 + 0.1 * r.standard_normal(N)
    norms = 1.0 + 0.05 * r.standard_normal(N)
    losses[50] = 9.0                                  # a spike while the window fills: NaN z, never skipped
    losses[130] = 8.0                                 # loss spike
    norms[136] = 3.0                                  # grad norm spike
    losses[140] = 5.5                                 # a bump below the threshold
    feed = iter(losses)
    monkeypatch.setattr(m, "gpt2_forward", lambda model, x, y, B, T: setattr(model, "mean_loss", next(feed)))
    monkeypatch.setattr(m, "gpt2_backward", lambda model: None)
    norm_feed = iter(norms)
    monkeypatch.setattr(m, "gpt2_calculate_grad_norm", lambda model: next(norm_feed))
    updates = []
    monkeypatch.setattr(m, "gpt2_update", lambda model, lr, b1, b2, eps, wd, t, grad_scale, shard:
                        updates.append((t, lr)))
    code, out, err = run_main(BASE + ["-x", str(N), "-v", "0", "-s", "0", "-l", "1e-3", "-u", "10",
                                      "-sl", "5", "-sg", "4.5"], capsys)
    assert code == 0, err
    assert "outlier guard: skip an update at loss z-score > 5 or grad norm z-score > 4.5" in out
    zl, zg = window_zscores(losses), window_zscores(norms)
    skipped = [s for s in range(N) if zl[s] > 5 or zg[s] > 4.5]
    assert skipped == [130, 136] and 1 < zl[140] < 5, (skipped, zl[140])
    assert f"skipping update due to loss z-score of {zl[130]:f}" in out
    assert f"skipping update due to grad z-score of {zg[136]:f}" in out
    lr = [m.get_lr(s, "cosine", 1e-3, 10, N, 1.0) for s in range(N)]
    assert updates == [(s + 1, lr[s]) for s in range(N) if s not in skipped]
    steps = [STEP_RE.match(l) for l in out.splitlines() if l.startswith("step ")]
    assert len(steps) == N and all(steps)
    assert [s["zloss"] for s in steps] == [f"{z:+.2f}" for z in zl]     # "+nan" for the first 128
    assert [s["zgrad"] for s in steps] == [f"{z:+.2f}" for z in zg]
    assert steps[0]["zloss"] == "+nan" and steps[128]["zloss"] != "+nan"
    # off (the default 0): the same spikes update
    feed, norm_feed, updates[:] = iter(losses), iter(norms), []
    code, out, err = run_main(BASE + ["-x", str(N), "-v", "0", "-s", "0"], capsys)
    assert code == 0 and "skipping" not in out and "outlier guard" not in out
    assert [t for t, _ in updates] == list(range(1, N + 1))


def test_outlier_flags_parse_and_are_listed():
    args = m.parse_args(["-sl", "7", "-sg", "6.5", "-s", "3"], m.TRAIN_GPT2_C_DEFAULTS)
    assert (args.skip_update_lossz, args.skip_update_gradz, args.sample_every) == (7.0, 6.5, 3)
    assert type(args.skip_update_lossz) is float and args.given == {"skip_update_lossz", "skip_update_gradz",
                                                                    "sample_every"}
    defaults = m.parse_args([], m.TRAIN_GPT2_C_DEFAULTS)
    assert (defaults.skip_update_lossz, defaults.skip_update_gradz) == (0.0, 0.0)   # off, as llm.c
    help_lines = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), "-h"], capture_output=True,
                                text=True).stdout.splitlines()
    assert "  -sl        skip an update whose loss z-score (last 128 steps) is above this (0 = off) " \
           "(default: 0.0)" in help_lines
    assert "  -sg        skip an update whose grad norm z-score (last 128 steps) is above this (0 = off) " \
           "(default: 0.0)" in help_lines


@pytest.mark.parametrize("argv,message", [
    (["-sl", "-s", "3"], "flag -sl needs a value"),
    (["-sl", "high"], "flag -sl needs a number, got 'high'"),
    (["-sx", "1"], "unknown flag -sx"),
])
def test_outlier_flags_bad_values(argv, message, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 1 and f"error: {message}" in err


def test_no_llmc_module_imports_a_trainer():
    """llmc/ is what the programs share: the loop's machinery (llmc/run.py) takes the trainer module as an
    argument, so no module of llmc/ imports train_gpt2 or train_gpt2_cuda (at the top or inside a function)."""
    import ast
    import glob
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "llmc", "*.py"))):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            found += [(os.path.basename(path), name) for name in names if name.split(".")[0].startswith("train_gpt2")]
    assert len(glob.glob(os.path.join(ROOT, "llmc", "*.py"))) > 15 and found == [], found
