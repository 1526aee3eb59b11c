"""-as N (llmc/actstats.py): per-layer activation and gradient statistics, checked against a float64 NumPy
computation written here: the five statistics on values chosen to sit on bf16's edges; both trainers on a tiny
model (the CUDA one on the emulator: fp32 against the NumPy trainer, bf16 -r 2 and flash against the arrays
its own forward pass left before the backward reused them); the flash entropy's sampled rows; training
untouched by a stats step; and the CLI: stats.jsonl's lines, -as without -o, the same steps and model bytes
with and without -as, and a file that is not ours."""

import json
import os
import sys

import numpy as np
import pytest

import train_gpt2 as npt
from conftest import emulated_cuda_trainer, run_main
from llmc import actstats, checkpoint
from test_checkpoint import BASE, events, one_line_error, workdir  # noqa: F401  (workdir: a fixture)
from test_cuda_trainer import CONFIG, B, T, batch, random_params, run_python, tiny_checkpoint  # noqa: F401
from test_flash_trainer import FLASH_CONFIG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BF16_LARGEST = (2 - 2.0 ** -7) * 2.0 ** 127          # 0x7f7f: the largest finite bf16
SMALLEST_NORMAL = 2.0 ** -126
PER_LAYER = ["ln1", "att_entropy", "residual2", "ln2", "fch", "residual3"]
GRADS = [f"grad.{name}" for name in ("wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w",
                                     "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb")]
QUIET = ["-v", "0", "-s", "0"]


def ref_stats(x):
    """The five statistics in float64, from the definition."""
    x = np.asarray(x, dtype=np.float64).ravel()
    a = np.abs(x)
    return [x.mean(), x.std(), a.max(), np.mean(a > BF16_LARGEST), np.mean((a > 0) & (a < SMALLEST_NORMAL))]


def ref_entropy(att):
    """att (B, NH, T, T) causal probabilities -> -sum p log p of every row, row by row over t."""
    rows = []
    for t in range(att.shape[-1]):
        p = np.asarray(att[..., t, :t + 1], dtype=np.float64)
        rows.append(-(p * np.log(np.where(p > 0, p, 1))).sum(-1))
    return np.stack(rows, axis=-1).ravel()


def ref_entropy_from_qkv(qkv, NH):
    """qkv (B, T, 3C) -> the entropies of the causal softmax(q k / sqrt(hs)) rows, every row, in float64."""
    qkv = np.asarray(qkv, dtype=np.float64)
    Bq, Tq, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    hs = C // NH
    out = np.zeros((Bq, NH, Tq))
    for b in range(Bq):
        for h in range(NH):
            q, k = qkv[b, :, h * hs:(h + 1) * hs], qkv[b, :, C + h * hs:C + (h + 1) * hs]
            for t in range(Tq):
                s = k[:t + 1] @ q[t] / np.sqrt(hs)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, h, t] = -(p * np.log(p)).sum()
    return out


def reference(acts, grads, L, V, entropies):
    """{tensor: {stat: [per layer]}} from host arrays: acts {name: array (L, ...) or (...)}, grads {name: array}."""
    table = {"encoded": [ref_stats(acts["encoded"])]}
    for name in PER_LAYER:
        table[name] = [ref_stats(entropies[l]) if name == "att_entropy" else ref_stats(acts[name][l]) for l in range(L)]
    table["lnf"] = [ref_stats(acts["lnf"])]
    for name in GRADS:
        g = grads[name[5:]]
        table[name] = [ref_stats(g[:V])] if name == "grad.wte" else \
            [ref_stats(g[l]) for l in range(L)] if g.ndim > 1 and g.shape[0] == L and name != "grad.wpe" else \
            [ref_stats(g)]
    return table


def assert_matches(record, ref, rtol):
    """Every statistic of every layer of every tensor: mean within rtol of the std, std and max_abs within
    rtol, the fractions exactly; the entropy's bf16 fractions absent."""
    tensors = record["tensors"]
    assert set(tensors) == set(ref), list(tensors)
    for name, want in ref.items():
        got = tensors[name]
        want = np.array(want)                                    # (layers, 5)
        assert list(got) == (list(actstats.STATS[:3]) if name == "att_entropy" else list(actstats.STATS)), name
        for i, stat in enumerate(got):
            ours = np.array(got[stat])
            assert ours.shape == want[:, i].shape, (name, stat)
            scale = want[:, 1] if stat == "mean" else np.abs(want[:, i])
            tol = 0 if stat.startswith("bf16") else rtol * scale + 1e-12
            err = np.abs(ours - want[:, i])
            assert (err <= tol).all(), f"{name} {stat}: ours {ours} want {want[:, i]} (err {err.max():.2e})"


# ----------------------------------------------------------------------------------------------
# the statistics themselves

def test_moments_on_bf16s_edges():
    edge = np.float32(BF16_LARGEST)
    x = np.array([0, 0, 1.5, -2.25, 3.3900e38, -3.3899e38, edge, 1e-39, -1e-40, 1e-45,
                  np.float32(SMALLEST_NORMAL), 0.5], dtype=np.float32)
    got = np.asarray(actstats.moments(x))
    assert got.dtype == np.float64 and got.shape == (5,)
    np.testing.assert_allclose(got[:3], ref_stats(x)[:3], rtol=1e-6)
    assert got[3] == 2 / 12 and got[4] == 3 / 12             # the largest bf16 and 2^-126 themselves are fine
    bits = np.array([0x3FC0, 0xC010, 0x7F7F, 0x0001, 0x8000, 0x7F80], dtype=np.uint16)   # 1.5 -2.25 max sub -0 inf
    got = np.asarray(actstats.moments(bits))
    assert got[2] == np.inf and got[3] == 1 / 6 and got[4] == 1 / 6
    huge = np.full(1000, 3e38, dtype=np.float32)
    huge[0] = -3e38                                          # squares overflow float32; the std must not
    np.testing.assert_allclose(np.asarray(actstats.moments(huge))[:3], ref_stats(huge)[:3], rtol=1e-6)


def test_sampled_entropy_reads_the_sampled_rows():
    rng = np.random.default_rng(1)
    NH, hs, Tq = 2, 64, 70
    qkv = rng.standard_normal((5, Tq, 3 * NH * hs)).astype(np.float32)
    positions = actstats.sample_positions(Tq)
    assert len(positions) == 64 and positions[0] == 0 and positions[-1] == Tq - 1 and (np.diff(positions) > 0).all()
    want = ref_entropy_from_qkv(qkv[:4], NH)[:, :, positions].ravel()    # sequences 0..3, the sampled positions
    got = actstats.sampled_entropy(qkv, NH)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the trainers on a tiny model

def stats_record(trainer, model):
    keys, table = actstats.collect(model, trainer.gpt2_stats_activations(model))
    return actstats.to_record(0, keys, trainer.to_numpy(table))


def numpy_reference_model():
    model = npt.GPT2(CONFIG, random_params(CONFIG))
    npt.gpt2_forward(model, *batch(0), B, T)
    npt.gpt2_zero_grad(model)
    npt.gpt2_backward(model)
    acts = {name: getattr(model.acts, name) for name in ("encoded", "ln1", "residual2", "ln2", "fch", "residual3",
                                                          "lnf")}
    grads = {name: getattr(model.grads, name) for name, _ in model.param_shapes}
    entropies = [ref_entropy(model.acts.att[l]) for l in range(CONFIG.num_layers)]
    return model, reference(acts, grads, CONFIG.num_layers, CONFIG.vocab_size, entropies)


def test_numpy_trainer_against_float64():
    model, ref = numpy_reference_model()
    record = stats_record(npt, model)
    assert list(record["tensors"]) == ["encoded"] + PER_LAYER + ["lnf"] + GRADS
    assert_matches(record, ref, rtol=1e-5)
    assert all(len(v["mean"]) == CONFIG.num_layers for k, v in record["tensors"].items() if k in PER_LAYER)


@pytest.fixture(scope="module")
def cu():
    return emulated_cuda_trainer("train_gpt2_cuda_actstats")


def cuda_step(cu, config, precision, recompute, params, flash=0, snapshot=False, tokens=None):
    """A CUDA-trainer model after one forward and backward pass on tokens (inputs, targets), batch(0) by
    default; snapshot: also the activations (host copies) as the forward pass left them, before the backward
    reused any."""
    model = cu.GPT2(config, params, recompute=recompute, precision=precision, flash_attention=flash)
    x, y = tokens or batch(0)
    cu.gpt2_forward(model, x, y, *x.shape)
    names = ("encoded", "ln1", "residual2", "ln2", "fch", "residual3", "lnf", "qkv" if model.flash else "att")
    acts = {name: cu.to_numpy(getattr(model.acts, name)).copy() for name in names} if snapshot else None
    cu.gpt2_zero_grad(model)
    cu.gpt2_backward(model)
    return model, acts


def host_grads(cu, model):
    return {name: cu.to_numpy(getattr(model.grads, name)) for name, _ in model.param_shapes}


@pytest.mark.parametrize("recompute", [0, 2])
def test_cuda_trainer_fp32_against_the_numpy_trainer(cu, capsys, recompute):
    """fp32 (the materialized attention): every statistic within fp32's rounding of the NumPy trainer's;
    -r 2 recomputes ln1 and ln2 per layer, and fch, which the backward overwrote, at every -r."""
    _, ref = numpy_reference_model()
    model, _ = cuda_step(cu, CONFIG, "fp32", recompute, random_params(CONFIG))
    assert_matches(stats_record(cu, model), ref, rtol=2e-4)


def test_cuda_trainer_bf16_recompute_2_against_its_forward_and_training_untouched(cu, capsys):
    """bf16 -r 2: the statistics of the buffers -r 0's forward pass kept (the same bits at every -r), and a
    following step after the stats is bit for bit the step of a model that had none."""
    params = random_params(CONFIG)
    plain, acts = cuda_step(cu, CONFIG, "bf16", 0, params, snapshot=True)
    L = CONFIG.num_layers
    ref = reference(acts, host_grads(cu, plain), L, CONFIG.vocab_size, [ref_entropy(acts["att"][l]) for l in range(L)])
    model, _ = cuda_step(cu, CONFIG, "bf16", 2, params)
    record = stats_record(cu, model)
    assert_matches(record, ref, rtol=1e-5)
    assert record["tensors"]["fch"]["max_abs"] != record["tensors"]["ln2"]["max_abs"]
    for m in (plain, model):
        cu.gpt2_forward(m, *batch(1), B, T)
        cu.gpt2_zero_grad(m)
        cu.gpt2_backward(m)
    assert plain.mean_loss == model.mean_loss
    assert np.array_equal(cu.to_numpy(plain.grads_memory), cu.to_numpy(model.grads_memory))


def test_cuda_trainer_flash_entropy_from_q_and_k(cu, capsys):
    """bf16 with flash attention (head size 64): no probabilities kept, so the entropies come from q and k
    (at T=16 all rows of the batch's 2 sequences are in the sample), against float64 from the kept qkv."""
    ids = np.random.default_rng(2).integers(0, FLASH_CONFIG.vocab_size, size=(2, 17))
    model, acts = cuda_step(cu, FLASH_CONFIG, "bf16", 1, random_params(FLASH_CONFIG), flash=1, snapshot=True,
                            tokens=(ids[:, :-1], ids[:, 1:]))
    assert model.flash
    L, NH = FLASH_CONFIG.num_layers, FLASH_CONFIG.num_heads
    ref = reference(acts, host_grads(cu, model), L, FLASH_CONFIG.vocab_size,
                    [ref_entropy_from_qkv(acts["qkv"][l], NH) for l in range(L)])
    assert_matches(stats_record(cu, model), ref, rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# the command line

def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_cli_writes_stats_every_n_steps_and_changes_nothing_else(workdir, capsys):
    code, out_plain, err = run_main(BASE + ["-x", "5", "-n", "5", "-o", "plain"], capsys)
    assert code == 0, err
    code, out, err = run_main(BASE + ["-x", "5", "-n", "5", "-o", "out", "-as", "2"], capsys)
    assert code == 0, err
    assert "activation statistics: every 2 steps into out/stats.jsonl" in out
    lines = read_lines("out/stats.jsonl")
    assert [line["step"] for line in lines] == [0, 2, 4]                 # main.log's s:<step> numbering
    tensors = lines[0]["tensors"]
    assert list(tensors) == ["encoded"] + PER_LAYER + ["lnf"] + GRADS
    assert all(len(tensors[name]["std"]) == 2 for name in PER_LAYER + ["grad.qkvw"])
    assert all(tensors[name]["std"][0] > 0 for name in tensors)
    assert events(out) == events(out_plain)                              # the same steps, losses, samples
    with open("out/model_00000005.bin", "rb") as a, open("plain/model_00000005.bin", "rb") as b:
        assert a.read() == b.read()
    # resumed or not, the file is appended to, never replaced: a new run refuses the dir as for main.log
    line = one_line_error(*run_main(BASE + QUIET + ["-x", "2", "-o", "out", "-as", "1"], capsys)[::2])
    assert "holds an earlier run's files (DONE_00000005, main.log, model_00000005.bin and 2 more)" in line, line
    assert checkpoint.earlier_run_files("out")[-1] == "stats.jsonl"
    code, _, err = run_main(BASE + QUIET + ["-x", "7", "-o", "out", "-as", "2", "-y", "1"], capsys)
    assert code == 0, err
    assert [line["step"] for line in read_lines("out/stats.jsonl")] == [0, 2, 4, 6]     # resumed at 5: appended


def test_cuda_cli_writes_stats_and_changes_nothing_else(tmp_path, tiny_checkpoint):
    """train_gpt2_cuda.py on the emulator (bf16, -r 1, -d 2 micro-steps): the loop's call reaches the CUDA
    trainer's tables, the file has steps 0 and 1, and the steps and the final model are those of a run without."""
    from llmc import formats
    rng = np.random.default_rng(4)
    formats.write_data_shard(str(tmp_path / "train.bin"), rng.integers(0, CONFIG.vocab_size, size=1000))
    formats.write_data_shard(str(tmp_path / "val.bin"), rng.integers(0, CONFIG.vocab_size, size=300))
    runs = {}
    for out, extra in (("plain", []), ("stats", ["-as", "1"])):
        r = run_python([os.path.join(REPO, "train_gpt2_cuda.py")], "-e", tiny_checkpoint, "-i", tmp_path / "train.bin",
                       "-j", tmp_path / "val.bin", "-o", tmp_path / out, "-b", B, "-t", T, "-d", 2 * B * T, "-x", 2,
                       "-l", 1e-2, *QUIET, *extra, env={"LLMC_EMULATE": "1"}, cwd=str(tmp_path))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[out] = (events(r.stdout), (tmp_path / out / "model_00000002.bin").read_bytes())
    assert runs["stats"] == runs["plain"] and len(runs["plain"][0]) == 2
    lines = read_lines(tmp_path / "stats" / "stats.jsonl")
    assert [line["step"] for line in lines] == [0, 1]
    assert list(lines[1]["tensors"]) == ["encoded"] + PER_LAYER + ["lnf"] + GRADS
    assert all(v["std"][0] > 0 and np.isfinite(v["max_abs"]).all() for v in lines[1]["tensors"].values())


def test_cli_without_o_says_where_the_stats_go_and_trains(workdir, capsys):
    code, out, err = run_main(BASE + QUIET + ["-x", "2", "-as", "1"], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("-as")]
    assert notes == ["-as 1 without -o: the activation statistics go nowhere, so they are not computed (give -o DIR "
                     "to have them in DIR/stats.jsonl); training goes on"], notes
    assert sum(line.startswith("step ") for line in out.splitlines()) == 2 and not os.path.exists("stats.jsonl")
    line = one_line_error(*run_main(BASE + QUIET + ["-x", "2", "-as", "-3", "-o", "out"], capsys)[::2])
    assert line == "error: -as -3: give how many steps apart the statistics are, or 0 for none", line


def test_cli_refuses_a_stats_file_that_is_not_ours(workdir, capsys):
    os.makedirs("out")
    with open("out/stats.jsonl", "w") as f:
        f.write("my notes\n")
    line = one_line_error(*run_main(BASE + QUIET + ["-x", "2", "-o", "out", "-y", "1", "-as", "1"], capsys)[::2])
    assert line == ("error: out/stats.jsonl: not a stats.jsonl written by -as, so not this program's to replace; "
                    "nothing was written: move it away or give another -o"), line
    with open("out/stats.jsonl") as f:
        assert f.read() == "my notes\n"


# ----------------------------------------------------------------------------------------------
# dev/vislog.py --stats

def write_stats(path, steps, L=3, offset=0.0):
    """stats.jsonl as ActivationStats writes it: per-layer ln1 and att_entropy, one-entry grad.wte; each value
    made from its step and layer so the heat maps can be checked cell by cell."""
    writer = actstats.ActivationStats.__new__(actstats.ActivationStats)
    writer.path = str(path)
    for s in steps:
        ln1 = {stat: [offset + s + 10.0 ** (i - l) for l in range(L)] for i, stat in enumerate(actstats.STATS)}
        entropy = {stat: [offset + s + l / 10 for l in range(L)] for stat in actstats.ENTROPY_STATS}
        wte = {stat: [offset + 0.5 * s] for stat in actstats.STATS}
        writer.write({"step": s, "tensors": {"ln1": ln1, "att_entropy": entropy, "grad.wte": wte}})


def test_vislog_stats_draws_each_cell(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    from test_vislog import load_vislog
    vislog = load_vislog()
    path = tmp_path / "stats.jsonl"
    write_stats(path, [0, 5, 10], offset=1000.0)               # a killed run's lines for steps 0..10,
    write_stats(path, [5, 10, 15])                             # then the resumed run's from its checkpoint at 5
    records = actstats.read_stats(str(path))
    assert list(records) == [0, 5, 10, 15] and records[5]["ln1"]["mean"][0] == 6.0     # the later line won
    fig = vislog.plot_stats(records, ["ln1", "att_entropy", "grad.wte"])
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert [im.axes.get_title() for im in images][:6] == ["ln1 mean", "ln1 std (log10)", "ln1 max_abs (log10)",
                                                           "ln1 bf16_sat", "ln1 bf16_under", "att_entropy mean"]
    ln1_std = np.array([[1000 + 0 + 10.0 ** (1 - l) for l in range(3)]] + [[s + 10.0 ** (1 - l) for l in range(3)]
                                                                          for s in (5, 10, 15)]).T
    np.testing.assert_allclose(images[1].get_array(), np.log10(ln1_std))         # layers up, steps across
    np.testing.assert_allclose(images[5].get_array(), np.array([[1000.0, 5, 10, 15]]) + np.arange(3)[:, None] / 10)
    assert images[8].get_array().shape == (1, 4) and len(images) == 3 * 5 - 2   # entropy: no bf16 panels


def test_vislog_stats_writes_a_png_and_refuses_a_foreign_file(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    from test_vislog import load_vislog
    vislog = load_vislog()
    write_stats(tmp_path / "stats.jsonl", [0, 2, 4])
    png = tmp_path / "stats.png"
    assert vislog.main(["--stats", str(tmp_path / "stats.jsonl"), "-o", str(png), "--tensors", "ln1"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert "3 stats steps (0..4), 1 tensors" in capsys.readouterr().out
    (tmp_path / "main.log").write_text("s:0 trl:5.0 lr:0.1 norm:1.0\n")
    stats = str(tmp_path / "stats.jsonl")
    for argv, want in ((["--stats", str(tmp_path / "main.log")], "main.log:1: not a stats.jsonl line"),
                       (["--stats", stats, "--tensors", "fch"], "--tensors: fch not in the file"),
                       (["--stats", stats, str(tmp_path / "main.log")], "--stats draws one stats.jsonl"),
                       ([], "give main.log files to plot, or --stats DIR/stats.jsonl")):
        with pytest.raises(SystemExit):
            vislog.main(argv + ["-o", str(png)])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err


def test_a_line_cut_by_a_kill_is_dropped_and_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "stats.jsonl"
    write_stats(path, [0, 1])
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"step":2,"tensors":{"ln1":{"mean":[0.')          # killed in the middle of step 2's line
    assert list(actstats.read_stats(str(path))) == [0, 1]          # a reader leaves the cut line out
    writer = actstats.ActivationStats(str(tmp_path), 1)            # a resumed run cuts it off first
    assert path.read_bytes() == whole
    writer.write({"step": 2, "tensors": {}})
    assert list(actstats.read_stats(str(path))) == [0, 1, 2]

    def full(fd, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(actstats.WriteError) as e:
        writer.write({"step": 3, "tensors": {}})
    assert str(e.value).startswith(f"could not write {path}: the disk is full (24 bytes needed"), str(e.value)
    assert list(actstats.read_stats(str(path))) == [0, 1, 2]


def test_data_parallel_rank_0_writes_the_gradients_summed_over_the_ranks(workdir, capsys):
    """Two processes (torchrun, gloo, -z 0) against one with the same total batch: one file, written by rank 0,
    whose gradient statistics are the one process's (the gradients are summed over the ranks before the stats)."""
    pytest.importorskip("torch.distributed", reason="torch.distributed is not installed")
    import subprocess
    flags = BASE + QUIET + ["-x", "1", "-as", "1", "-a", "1"]
    code, _, err = run_main(flags + ["-o", "one"], capsys)
    assert code == 0, err
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(REPO, "train_gpt2.py"), *flags, "-o", "two"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    one, two = read_lines("one/stats.jsonl"), read_lines("two/stats.jsonl")
    assert [line["step"] for line in two] == [0] and len(one) == 1        # rank 1 wrote nothing
    for a, b in zip(one, two):
        for name in GRADS:
            for stat in ("mean", "std", "max_abs"):
                scale = np.abs(a["tensors"][name]["std"]) + 1e-12
                err = np.abs(np.subtract(a["tensors"][name][stat], b["tensors"][name][stat]))
                assert (err <= 1e-4 * scale).all(), (name, stat, a["tensors"][name][stat], b["tensors"][name][stat])
