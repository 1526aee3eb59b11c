"""Data parallel in the NumPy trainer (llmc/collectives.py over torch.distributed's gloo), with real
processes started by torchrun (python -m torch.distributed.run --standalone --nproc_per_node N).

The same total batch (-d) split over 1, 2 and 4 processes is the same optimization: with -a 1 (the
sequential loader) rank r of N reads the r-th B*T of every N*B*T tokens, so the N ranks' micro-steps
together read the tokens one process reads in its N times as many micro-steps, and the summed gradients
differ only in the order of the additions. So the step losses, the gradient norms and the final model
must agree within 1e-5; ZeRO-1 (-z 1) must agree with ZeRO-0 the same way. A 2-rank run checkpointed
at step 5 and resumed with -y 1 must print bit-identical losses to an uninterrupted one (the shuffled
loader, each rank with its own seed 42 + rank, and ZeRO-1's per-rank m and v in the state files).
"""

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import train_gpt2 as m
from llmc import checkpoint, collectives, formats, run
from llmc.model import GPT2Config, num_parameters, param_shapes
from llmc.utils import ConfigError
from conftest import write_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import torch.distributed as dist
    HAVE_GLOO = dist.is_available() and dist.is_gloo_available()
except ImportError:
    HAVE_GLOO = False
needs_gloo = pytest.mark.skipif(not HAVE_GLOO, reason="torch.distributed with gloo is not installed")

TINY = GPT2Config(max_seq_len=32, vocab_size=101, num_layers=2, num_heads=2, channels=32,
                  padded_vocab_size=128)
P = num_parameters(TINY)                   # 30,592: divisible by 2 and 4 (ZeRO-1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model (V=101), two train shards and a val shard of a learnable repeated phrase."""
    d = tmp_path_factory.mktemp("dp")
    rng = np.random.default_rng(0)
    write_tiny_model(d / "tiny.bin", TINY, rng, 0.1)
    text = np.tile(rng.integers(0, TINY.vocab_size, size=23), 60)
    formats.write_data_shard(str(d / "train_000.bin"), text[:300])     # 2 ranks, B*T 16: 9 samples each
    formats.write_data_shard(str(d / "train_001.bin"), text[300:550])  # and 7: an epoch is 8 steps of -d 64
    formats.write_data_shard(str(d / "val.bin"), text[550:])
    return d


# -a 1: the sequential loader over the val shard, 4 micro-batches of B*T = 16 tokens per step
BASE = ["-e", "tiny.bin", "-i", "train_*.bin", "-j", "val.bin", "-b", "2", "-t", "8", "-d", "64", "-x", "10",
        "-l", "1e-2", "-k", "cosine", "-u", "2", "-c", "0.1", "-v", "0", "-s", "0", "-a", "1"]
STEP = re.compile(r"step +(\d+)/\d+: train loss ([\d.]+) .* norm ([\d.]+)")


def launch(workdir, nproc, *args, timeout=300):
    """train_gpt2.py under torchrun with nproc processes (nproc 0: plain python, one process)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    runner = [] if nproc == 0 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    p = subprocess.run([sys.executable, *runner, os.path.join(REPO, "train_gpt2.py"), *map(str, args)],
                       cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    return p


def steps(p):
    """[(step, loss, norm)] from a run's step lines; the run must have succeeded."""
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    found = [(int(s), float(loss), float(norm)) for s, loss, norm in STEP.findall(p.stdout)]
    assert found, p.stdout[-2000:]
    return found


def final_model(path):
    return formats.read_model_file(str(path))[1]


@pytest.fixture(scope="module")
def one_process(workdir):
    p = launch(workdir, 0, *BASE, "-o", "out1")
    return steps(p), final_model(workdir / "out1" / "model_00000010.bin")


def key_bias_mask():
    """True everywhere but the attention's key biases (qkvb[:, C:2C]). Their exact gradient is 0 (a key bias
    adds q.b to every score of a row, which the softmax ignores), so what the backward computes is rounding
    noise, different in every summation order, and AdamW's m / sqrt(v) turns noise of either sign into
    steps of about lr: those parameters wander in any run and are not compared."""
    keep, start = np.ones(P, bool), 0
    for name, shape in param_shapes(TINY):
        size = int(np.prod(shape))
        if name == "qkvb":
            C = TINY.channels
            keep[start:start + size].reshape(shape)[:, C:2 * C] = False
        start += size
    return keep


def compare(ref, got):
    (ref_steps, ref_params), (got_steps, got_params) = ref, got
    print("step  loss (1 process)  loss (N)  |diff|")
    for (s, a, _), (_, b, _) in zip(ref_steps, got_steps):
        print(f"{s:4d}  {a:.6f}  {b:.6f}  {abs(a - b):.1e}")
    assert [s for s, _, _ in got_steps] == list(range(1, 11))
    np.testing.assert_allclose([x[1] for x in got_steps], [x[1] for x in ref_steps], rtol=0, atol=1e-5)
    np.testing.assert_allclose([x[2] for x in got_steps], [x[2] for x in ref_steps], rtol=1e-5, atol=1e-5)
    err = np.abs(got_params - ref_params)[key_bias_mask()].max()
    print(f"final parameters: max |diff| {err:.1e}")
    assert err < 1e-5


@needs_gloo
@pytest.mark.parametrize("nproc,zero", [(2, 0), (4, 0), (2, 1), (4, 1)])
def test_ranks_match_one_process(workdir, one_process, nproc, zero):
    out = f"out{nproc}z{zero}"
    p = launch(workdir, nproc, *BASE, "-z", zero, "-o", out)
    compare(one_process, (steps(p), final_model(workdir / out / "model_00000010.bin")))
    assert len(re.findall(r"step +1/10:", p.stdout)) == 1           # only rank 0 prints
    assert f"data parallel: {nproc} processes" in p.stdout
    log = (workdir / out / "main.log").read_text().splitlines()
    assert len(log) == 10 and log[0].startswith("s:0 trl:")


@needs_gloo
@pytest.mark.parametrize("zero", [0, 1])
def test_two_rank_resume_is_bit_exact(workdir, zero):
    """The shuffled train loader (two shards, an epoch ending at step 8), a cosine schedule decaying to 0.1 of -l,
    a val loss averaged over the ranks, checkpoints at steps 5 and 10. Then the step-10 checkpoint is
    taken away (as if the run had died after step 5) and the run resumed with -y 1 from step 5: its step
    and val lines are the first run's from step 5 on, byte for byte, and so are the step-10 model and each
    rank's state file (ZeRO-1: each holding its shard's m and v)."""
    flags = [*BASE[:-2], "-q", "0.1", "-v", "5", "-m", "2", "-n", "5", "-z", zero]
    out = workdir / f"resume{zero}"
    full = launch(workdir, 2, *flags, "-o", out.name)
    steps(full)
    names = ("model_00000010.bin", "state_00000010_00000.bin", "state_00000010_00001.bin")
    first = {name: (out / name).read_bytes() for name in names}
    for name in ("DONE_00000010", *names):
        os.remove(out / name)
    resumed = launch(workdir, 2, *flags, "-o", out.name, "-y", "1")
    assert "resumed from checkpoint 5" in resumed.stdout and steps(resumed)[0][0] == 6
    # (step, train loss, norm, lr) of each step line, (val loss,) of each val line; not the times
    lines = re.compile(r"^step +(\d+)/\d+: train loss (\S+) .* norm (\S+) .* lr (\S+) \(eta \S+\)$|^val loss (\S+)$", re.M)
    ours, theirs = lines.findall(resumed.stdout), lines.findall(full.stdout)
    print("\n".join(map(str, ours)))
    assert len(ours) == 7 and ours == theirs[-7:]                  # val at 5, steps 6..10, val at 10
    assert theirs[1][3] != theirs[-2][3]                           # the lr does change
    for name in names:
        assert (out / name).read_bytes() == first[name], name
    state = checkpoint.read_state_file(str(out / "state_00000010_00001.bin"), P // 2 if zero else P, 2, 1)
    assert (state.num_processes, state.rank, state.m.size) == (2, 1, P // 2 if zero else P)


@needs_gloo
def test_a_rank_that_dies_stops_the_others(workdir):
    """Rank 1 stops with its one-line error (its state file of the checkpoint is missing) while rank 0 goes on
    to the first collective: rank 0 must not wait forever for it. It exits with one line of its own (gloo sees
    the connection close), or torchrun stops it; either way the run ends within seconds, with status 1."""
    flags = [*BASE[:-2], "-x", "4", "-n", "2"]
    out = workdir / "dies"
    steps(launch(workdir, 2, *flags, "-o", out.name))
    os.remove(out / "state_00000004_00001.bin")
    t0 = time.time()
    p = launch(workdir, 2, *[f if f != "4" else "6" for f in flags], "-o", out.name, "-y", "1", timeout=120)
    assert p.returncode != 0 and time.time() - t0 < 90
    assert "error: dies/state_00000004_00001.bin: no such file (the checkpoint is incomplete)" in p.stderr, p.stderr[-3000:]
    rank0 = "error: rank 0: a collective failed because another process stopped (its error is above)"
    assert rank0 in p.stderr or "exitcode  : -15" in p.stderr, p.stderr[-3000:]
    assert "[rank0]: Traceback" not in p.stderr and "[rank1]: Traceback" not in p.stderr, p.stderr[-3000:]


@needs_gloo
def test_total_batch_not_a_multiple_of_the_ranks(workdir):
    p = launch(workdir, 2, *[f if f != "64" else "48" for f in BASE])
    assert p.returncode != 0
    assert "error: -d 48 is not a multiple of B*T*processes = 2*8*2 = 32" in p.stderr


def test_zero1_needs_a_divisible_parameter_count():
    assert collectives.shard_range(P, 3, 4) == (3 * P // 4, P)
    with pytest.raises(ConfigError, match=r"-z 1 shards the 30,592 parameters over 3 processes, which does not "
                                          r"divide them; use -z 0"):
        collectives.shard_range(P, 0, 3)


def test_one_process_needs_no_torch():
    """Without torchrun's environment the World is one process and its collectives do nothing."""
    code = ("import os, sys; os.environ.pop('WORLD_SIZE', None); from llmc import collectives; import numpy as np; "
            "w = collectives.init(); x = np.ones(4, np.float32); w.all_reduce_sum(x); w.barrier(); "
            "print(w.rank, w.size, x.sum(), w.mean(2.5), 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert p.stdout.split() == ["0", "1", "4.0", "2.5", "False"], p.stderr


def test_a_trainer_without_the_whole_interface_is_refused():
    """A trainer module without one of the interface's functions (here a stand-in named train_gpt2_cuda.py
    without ZeRO-1's gpt2_pieces_sum_squares) stops with one line naming it, before any collective; with
    all of them the run gets as far as its flags."""
    import types
    partial, whole = types.ModuleType("partial"), types.ModuleType("whole")
    partial.__file__ = whole.__file__ = "train_gpt2_cuda.py"
    for name in run.TRAINER_API:
        setattr(whole, name, getattr(m, name))
        if name != "gpt2_pieces_sum_squares":
            setattr(partial, name, getattr(m, name))
    args = m.parse_args([], m.TRAIN_GPT2_C_DEFAULTS)
    with pytest.raises(ConfigError, match=r"^train_gpt2_cuda.py lacks gpt2_pieces_sum_squares, which the training "
                                          r"loop calls \(llmc/run.py's Trainer interface\)$"):
        m.train(args, partial, collectives.World(0, 2, None))
    args = m.parse_args(["-z", "2"], m.TRAIN_GPT2_C_DEFAULTS)
    with pytest.raises(ConfigError, match=r"^-z 2: ZeRO stage 0 or 1"):
        m.train(args, whole)
