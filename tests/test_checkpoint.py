"""Checkpoints (-o -n -nk -nm) and resume (-y 1): llm.c's state file byte for byte, files that are never
half-written, retention, and resume that is bit-exact in both trainers (the CUDA one on the emulator).

The resume test is test_gpt2.cu's idea run through the command line: a 20-step run, against a run with
the same flags killed (os._exit, no clean-up) right after its checkpoint at step 10 and then resumed with
-y 1. With the shuffled loader over two shards (crossing an epoch), two micro-steps per step (-d) and a
cosine schedule with warmup, every printed loss, val loss and sampled token, every main.log line and
the final model and state files must be the same bytes.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import train_gpt2 as m
from llmc import checkpoint, formats, utils
from llmc.model import GPT2Config, num_parameters
from llmc.dataloader import DataLoader
from llmc.rand import MT_STATE_DTYPE, MT19937
from conftest import run_main
from conftest import write_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = GPT2Config(max_seq_len=32, vocab_size=101, num_layers=2, num_heads=2, channels=32,
                  padded_vocab_size=128)
P = num_parameters(TINY)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A tiny model (V=101), two small train shards (18 and 12 samples at B=2, T=8) and a val shard."""
    rng = np.random.default_rng(0)
    write_tiny_model(tmp_path / "tiny.bin", TINY, rng, 0.1)
    text = np.tile(rng.integers(0, TINY.vocab_size, size=23), 30)       # learnable: a repeated phrase
    formats.write_data_shard(str(tmp_path / "train_000.bin"), text[:300])
    formats.write_data_shard(str(tmp_path / "train_001.bin"), text[300:500])
    formats.write_data_shard(str(tmp_path / "val.bin"), text[500:])
    monkeypatch.chdir(tmp_path)
    return tmp_path


BASE = ["-e", "tiny.bin", "-i", "train_*.bin", "-j", "val.bin", "-b", "2", "-t", "8", "-d", "32",
        "-l", "1e-2", "-k", "cosine", "-u", "3", "-q", "0.1", "-v", "5", "-m", "2", "-s", "5", "-g", "6"]


# ----------------------------------------------------------------------------------------------
# the state file, byte for byte

def shuffled_loader(path, draws):
    loader = DataLoader(str(path / "train_*.bin"), 2, 8, should_shuffle=True)
    batches = [loader.next_batch() for _ in range(draws)]
    return loader, batches


def test_state_file_layout_byte_for_byte(workdir):
    loader, _ = shuffled_loader(workdir, 23)                      # an epoch (30 samples) not yet over: shard 2
    rng = np.random.default_rng(1)
    mm, vv = rng.standard_normal(P).astype(np.float32), rng.random(P).astype(np.float32)
    st = checkpoint.TrainState(step=1234, m=mm, v=vv, loader=loader.state(), rng_state=(1 << 40) + 7,
                               rng_state_last_update=(3 << 33) + 5)
    path = str(workdir / "state_00001234_00000.bin")
    checkpoint.write_state_file(path, st)
    data = open(path, "rb").read()
    header = np.frombuffer(data, "<i4", 256)
    assert list(header[:6]) == [20240527, 1, 1, 0, 0, 1] and header[10] == 1234
    u64 = lambda slot: int(np.frombuffer(data, "<u8", 1, offset=4 * slot)[0])     # noqa: E731
    assert u64(20) == (1 << 40) + 7 and u64(22) == (3 << 33) + 5
    first_shard = 30 - loader.shard_num_samples                    # 18 or 12 samples, as the shuffle put them
    assert u64(30) == loader.current_shard_idx == 1 and u64(32) == 23 - first_shard   # the next sample to draw
    untouched = np.ones(256, bool)
    untouched[[0, 1, 2, 3, 4, 5, 10, 20, 21, 22, 23, 30, 31, 32, 33]] = False
    assert not header[untouched].any()
    pos = 1024
    assert data[pos:pos + 4 * P] == mm.tobytes() and data[pos + 4 * P:pos + 8 * P] == vv.tobytes()
    pos += 8 * P
    assert u64(pos // 4) == 2 and list(np.frombuffer(data, "<i4", 2, pos + 8)) == loader.shard_indices
    pos += 8 + 8
    n = loader.shard_num_samples
    assert u64(pos // 4) == n and list(np.frombuffer(data, "<i4", n, pos + 8)) == loader.intra_shard_indices
    pos += 8 + 4 * n
    assert len(data) - pos == MT_STATE_DTYPE.itemsize == 2520      # llm.c's sizeof(mt19937_state)
    mt = np.frombuffer(data, MT_STATE_DTYPE, 1, pos)[0]
    rng_now = loader.shuffle_rng
    assert (mt["seed"], mt["left"], mt["next"]) == (42, rng_now.left, rng_now.next)
    assert list(mt["state"]) == rng_now.state and list(mt["matrix_a"]) == [0, 0x9908B0DF]
    # offsets of the C struct's fields (seed_ u64, left_ int, next_ uint, state_[624], MATRIX_A[2])
    assert [MT_STATE_DTYPE.fields[f][1] for f in ("seed", "left", "next", "state", "matrix_a")] == [0, 8, 12, 16, 2512]

    back = checkpoint.read_state_file(path, P)
    assert back.step == 1234 and back.m.tobytes() == mm.tobytes() and back.v.tobytes() == vv.tobytes()
    assert back.loader[:4] == loader.state()[:4] and back.loader[4] == rng_now.state_bytes()
    assert (back.rng_state, back.rng_state_last_update) == (st.rng_state, st.rng_state_last_update)


def test_loader_resumes_where_it_was_across_shards_and_epochs(workdir):
    """A loader restored from a state file (in a fresh process's shoes: a new loader) serves the very
    batches the original goes on to serve, through the shard change and the next epoch's reshuffle."""
    for drawn in (0, 5, 17, 18, 29, 30, 41):
        loader, _ = shuffled_loader(workdir, drawn)
        path = str(workdir / "state.bin")
        checkpoint.write_state_file(path, checkpoint.TrainState(7, np.zeros(3, np.float32), np.zeros(3, np.float32),
                                                                loader.state()))
        fresh, _ = shuffled_loader(workdir, 0)
        fresh.resume(*checkpoint.read_state_file(path, 3).loader)
        for _ in range(40):
            (x1, y1), (x2, y2) = loader.next_batch(), fresh.next_batch()
            assert np.array_equal(x1, x2) and np.array_equal(y1, y2), f"after {drawn} draws"


def test_mt19937_state_round_trip_and_bad_bytes():
    rng = MT19937(1337)
    for _ in range(1000):
        rng.randint32()
    again = MT19937.from_state_bytes(rng.state_bytes())
    assert [rng.randint32() for _ in range(700)] == [again.randint32() for _ in range(700)]   # over a twist
    with pytest.raises(ValueError, match="2520"):
        MT19937.from_state_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="not an mt19937_state"):
        MT19937.from_state_bytes(b"\0" * 2520)


# ----------------------------------------------------------------------------------------------
# atomic writes, retention

def test_write_atomic_leaves_nothing_half_written(tmp_path):
    path = str(tmp_path / "f.bin")
    utils.write_atomic(path, [np.arange(4, dtype=np.int32)])

    def chunks():
        yield np.zeros(1000, np.float32)
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        utils.write_atomic(path, chunks())
    assert os.listdir(tmp_path) == ["f.bin"] and open(path, "rb").read() == np.arange(4, dtype=np.int32).tobytes()


def test_a_failed_checkpoint_leaves_the_previous_one_usable(workdir, capsys, monkeypatch):
    """The disk fills up halfway through the state file of step 10: no DONE_00000010, no temporary files,
    and -y 1 resumes from step 5 to the same model a run that never failed ends with."""
    real = checkpoint.write_atomic

    def full_disk(path, chunks):
        if "state_00000010" in path:
            chunks = iter(chunks)

            def half():
                yield next(chunks)
                raise OSError(28, "No space left on device")
            return real(path, half())
        return real(path, chunks)
    monkeypatch.setattr(checkpoint, "write_atomic", full_disk)
    args = BASE + ["-x", "10", "-n", "5", "-v", "0", "-s", "0"]
    line = one_line_error(*run_main(args + ["-o", "out"], capsys)[::2])
    assert line.startswith("error: could not write out/state_00000010_00000.bin: the disk is full (stopped after ")
    assert line.endswith("checkpoint 10 not written (its files removed), checkpoint 5 is whole: make room and -y 1 "
                         "resumes from it"), line
    assert checkpoint.done_steps("out") == [5]
    assert not [f for f in os.listdir("out") if ".tmp" in f] and not os.path.exists("out/state_00000010_00000.bin")
    monkeypatch.setattr(checkpoint, "write_atomic", real)
    code, out, err = run_main(args + ["-o", "out", "-y", "1"], capsys)
    assert code == 0 and "resumed from checkpoint 5 in out" in out, err
    code, _, err = run_main(args + ["-o", "clean"], capsys)
    assert code == 0, err
    assert open("out/model_00000010.bin", "rb").read() == open("clean/model_00000010.bin", "rb").read()
    assert open("out/state_00000010_00000.bin", "rb").read() == open("clean/state_00000010_00000.bin", "rb").read()


def test_retention_keeps_the_last_k_and_every_major(workdir, capsys):
    code, out, err = run_main(BASE + ["-x", "20", "-n", "2", "-nk", "2", "-nm", "5", "-v", "0", "-s", "0",
                                      "-o", "out"], capsys)
    assert code == 0, err
    assert checkpoint.done_steps("out") == [10, 18, 20]                 # 10 and 20 are major, 18 is recent
    files = sorted(f for f in os.listdir("out") if f != "main.log")
    assert files == sorted(f"{kind}_{s:08d}{tail}" for s in (10, 18, 20)
                           for kind, tail in (("DONE", ""), ("model", ".bin"), ("state", "_00000.bin")))
    assert "deleted checkpoint 16" in out and out.count("wrote checkpoint") == 10
    assert checkpoint.checkpoints_to_delete([2, 4, 6], 0, 0) == []      # -nk 0 keeps everything


# ----------------------------------------------------------------------------------------------
# resume is bit-exact, in both trainers

KILL_AFTER_CHECKPOINT = """
import os, runpy, sys
sys.path.insert(0, {repo!r})
from llmc import checkpoint
write = checkpoint.write_checkpoint

def write_then_die(output_dir, step, *args, **kwargs):
    write(output_dir, step, *args, **kwargs)
    if step == {stop}:
        sys.stdout.flush()
        os._exit(0)                     # a kill: no clean-up, no final files
checkpoint.write_checkpoint = write_then_die
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_trainer(script, args, cwd, emulate, kill_after=None):
    env = dict(os.environ)
    env.pop("LLMC_EMULATE", None)
    if emulate:
        env["LLMC_EMULATE"] = "1"
    argv = [os.path.join(REPO, script), *args]
    cmd = [sys.executable, *argv] if kill_after is None else \
        [sys.executable, "-c", KILL_AFTER_CHECKPOINT.format(repo=REPO, stop=kill_after, argv=argv)]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def assert_log_resumed_at_10(full_path, run_path, lines):
    """main.log of a run killed after step 10 and resumed: the uninterrupted run's `lines` lines, appended,
    with step 10's val line twice (written before the kill and again on resume, as llm.c)."""
    log_full = open(full_path).read().splitlines()
    log_run = open(run_path).read().splitlines()
    tel10 = [line for line in log_full if line.startswith("s:10 tel:")]
    assert len(tel10) == 1 and log_run.count(tel10[0]) == 2
    log_run.remove(tel10[0])
    assert log_run == log_full and len(log_full) == lines


def events(stdout):
    """What a run computed, in order: val losses, sampled token ids, step lines without their timings."""
    out, lines = [], stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("val loss "):
            out.append(line)
        elif line == "generating:":
            out.append("sample: " + lines[i + 2])
        elif line.startswith("step "):
            out.append(re.sub(r" \([\d.]+ ms, [^)]*\)| \(eta [^)]*\)", "", line))   # the timings and the ETA
    return out


@pytest.mark.parametrize("script, emulate", [("train_gpt2.py", False), ("train_gpt2_cuda.py", True)],
                         ids=["numpy", "cuda-emulator"])
def test_resume_is_bit_exact(workdir, script, emulate):
    # the CUDA trainer in fp32 here (its default on the emulator is bf16: tests/test_bf16.py resumes that)
    args = BASE + ["-x", "20", "-n", "5", "-p", "fp32", "-f", "0"] if emulate else BASE + ["-x", "20", "-n", "5"]
    full = run_trainer(script, args + ["-o", "full"], workdir, emulate)
    stopped = run_trainer(script, args + ["-o", "run"], workdir, emulate, kill_after=10)
    assert checkpoint.done_steps("run") == [5, 10] and "step   10/20" in stopped and "step   11/20" not in stopped
    resumed = run_trainer(script, args + ["-o", "run", "-y", "1"], workdir, emulate)
    assert "resumed from checkpoint 10 in run" in resumed

    full_ev, stopped_ev, resumed_ev = events(full), events(stopped), events(resumed)
    assert len(full_ev) == 5 + 4 + 20 and full_ev[0].startswith("val loss")
    # the resumed run first redoes step 10's val loss and sample (as llm.c), then goes on
    assert resumed_ev[:2] == stopped_ev[-2:] and resumed_ev[1].startswith("sample: ")
    assert stopped_ev + resumed_ev[2:] == full_ev
    losses = [float(e.split("train loss ")[1].split()[0]) for e in full_ev if e.startswith("step ")]
    assert losses[-1] < losses[0] and len(set(losses)) == 20           # it trained, and every step differs

    assert_log_resumed_at_10("full/main.log", "run/main.log", 5 + 20)

    assert checkpoint.done_steps("run") == checkpoint.done_steps("full") == [5, 10, 15, 20]
    for name in ("model_00000020.bin", "state_00000020_00000.bin", "model_00000015.bin"):
        assert open(f"run/{name}", "rb").read() == open(f"full/{name}", "rb").read(), name


# ----------------------------------------------------------------------------------------------
# bad input: one line, nothing lost

def one_line_error(code, err):
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_resume_with_no_checkpoint_starts_fresh(workdir, capsys):
    code, out, err = run_main(BASE + ["-x", "2", "-v", "0", "-s", "0", "-o", "empty", "-y", "1"], capsys)
    assert code == 0, err
    assert "-y 1: no checkpoint (DONE_ file) in empty: starting fresh" in out and "step    1/2" in out


@pytest.mark.parametrize("flags, expected", [(["-n", "5"], "-n 5 writes checkpoints into the output dir: add -o DIR"),
                                             (["-y", "1"], "-y 1 resumes from the checkpoints in the output dir: add -o DIR")])
def test_checkpoint_flags_need_an_output_dir(workdir, capsys, flags, expected):
    assert one_line_error(*run_main(BASE + ["-x", "2"] + flags, capsys)[::2]) == f"error: {expected}"


@pytest.fixture
def one_checkpoint(workdir, capsys):
    code, _, err = run_main(BASE + ["-x", "3", "-n", "3", "-v", "0", "-s", "0", "-o", "out"], capsys)
    assert code == 0, err
    return workdir / "out" / "state_00000003_00000.bin"


def resume_error(capsys):
    return one_line_error(*run_main(BASE + ["-x", "6", "-v", "0", "-s", "0", "-o", "out", "-y", "1"], capsys)[::2])


def test_truncated_state_file(one_checkpoint, capsys):
    data = one_checkpoint.read_bytes()
    for size in (100, 1024 + 4 * P, len(data) - 1):
        one_checkpoint.write_bytes(data[:size])
        line = resume_error(capsys)
        assert "state_00000003_00000.bin" in line and "truncated" in line and "DONE_" in line, line


def test_foreign_state_file(one_checkpoint, capsys):
    one_checkpoint.write_bytes(open("tiny.bin", "rb").read())              # a model file where the state goes
    line = resume_error(capsys)
    assert "bad magic 20240326 (expected 20240527): not an llm.c state file" in line, line


def test_state_from_another_world_size(one_checkpoint, capsys):
    data = bytearray(one_checkpoint.read_bytes())
    data[8:12] = np.int32(2).tobytes()
    one_checkpoint.write_bytes(bytes(data))
    assert "written by rank 0 of 2 process(es), this run is rank 0 of 1" in resume_error(capsys)


def test_state_from_another_model(one_checkpoint, capsys):
    st = checkpoint.read_state_file(str(one_checkpoint), P)
    for other in (P - 1000, P + 1000):                                   # a smaller model, a larger one
        st.m = st.v = np.zeros(other, np.float32)
        checkpoint.write_state_file(str(one_checkpoint), st)
        line = resume_error(capsys)
        assert f"this model ({P:,} parameters)" in line, line


def test_state_from_other_data(one_checkpoint, workdir, capsys):
    formats.write_data_shard(str(workdir / "train_002.bin"), np.arange(300) % 101)
    assert "the state was written for 2 train shard(s), the -i pattern matches 3" in resume_error(capsys)


def test_resume_past_the_last_step(one_checkpoint, capsys):
    line = one_line_error(*run_main(BASE + ["-x", "2", "-v", "0", "-s", "0", "-o", "out", "-y", "1"], capsys)[::2])
    assert line == "error: the checkpoint in out is at step 3, past -x 2: give a larger -x", line
