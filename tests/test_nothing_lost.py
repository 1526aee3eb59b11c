"""Nothing lost, whatever the user does (the trainer's side): a sample longer than the context, a run that
diverges, a disk that fills up, what killed runs leave behind, Ctrl-C, flags that make no sense, an -o
holding another run, and errors whose advice fits the case. Each bad input is one line and exit 1 (Ctrl-C:
130), and no file the user had is lost or replaced by a worse one.
"""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import train_gpt2 as m
from llmc import checkpoint, formats, run
from llmc.model import num_parameters
from conftest import run_main
from test_checkpoint import BASE, TINY, events, one_line_error, workdir  # noqa: F401  (workdir: a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUIET = ["-v", "0", "-s", "0"]
NO_G = BASE[:BASE.index("-g")] + BASE[BASE.index("-g") + 2:]          # the default -g 64, with -t 8


def read(path):
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------
# the sampler never writes past its (B, T) buffer

def test_default_sample_length_shrinks_to_T_and_the_run_ends_with_its_checkpoints(workdir, capsys):
    code, out, err = run_main(NO_G + ["-x", "10", "-n", "5", "-o", "out"], capsys)
    assert code == 0, err
    assert "genT = 8: the sequence length T (the default -g 64 is longer)" in out
    samples = [e for e in events(out) if e.startswith("sample: ")]
    assert len(samples) == 2 and all(len(e.split()) == 1 + 7 for e in samples), samples   # T - 1 ids each
    assert checkpoint.done_steps("out") == [5, 10]


def test_a_sample_longer_than_T_asked_for_is_refused_before_training(workdir, capsys):
    code, out, err = run_main(NO_G + ["-g", "9", "-x", "10", "-n", "5", "-o", "out"], capsys)
    line = one_line_error(code, err)
    assert line == "error: tokens to sample -g 9 exceeds the sequence length T 8; use -g 8 or less", line
    assert "step " not in out and not os.path.exists("out")
    code, out, err = run_main(NO_G + ["-g", "9", "-s", "0", "-x", "1"], capsys)   # no sampling: no check
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# divergence: one line, exit 1, no NaN file over a good one

def test_divergence_stops_the_run_before_it_writes_anything(workdir, capsys):
    code, out, err = run_main(BASE + ["-x", "10", "-n", "1", "-l", "1e9", "-o", "out"], capsys)
    line = one_line_error(code, err)
    m_ = re.fullmatch(r"error: step (\d+): train loss (\S+), gradient norm (\S+): the run diverged \(NaN or inf\) "
                      r"and stops, writing nothing; lower -l \(it is 1e\+09\), or -y 1 resumes from checkpoint "
                      r"(\d+) \(with a lower -l\)", line)
    assert m_, line
    step, loss, norm, resume = int(m_[1]), float(m_[2]), float(m_[3]), int(m_[4])
    assert not (np.isfinite(loss) and np.isfinite(norm)) and resume == step - 1
    assert checkpoint.done_steps("out") == list(range(1, step))               # nothing after the last good one
    assert sorted(os.listdir("out")) == sorted(["main.log"] + [f"{k}_{s:08d}{t}" for s in range(1, step) for k, t in
                                                (("DONE", ""), ("model", ".bin"), ("state", "_00000.bin"))])
    for s in range(1, step):
        assert np.isfinite(formats.read_model_file(f"out/model_{s:08d}.bin")[1]).all()
    assert f"step {step - 1:4d}/10" in out and f"step {step:4d}/10" not in out   # the bad step never printed


def test_weights_gone_nan_are_never_written(workdir, capsys, monkeypatch):
    """The last update leaves an inf (every loss was finite): the final write stops the run instead."""
    update = m.gpt2_update

    def poisoned(model, learning_rate, beta1, beta2, eps, weight_decay, t, **kwargs):
        update(model, learning_rate, beta1, beta2, eps, weight_decay, t, **kwargs)
        if t == 3:
            model.params.qkvw[1, 0, 0] = np.inf
    monkeypatch.setattr(m, "gpt2_update", poisoned)
    line = one_line_error(*run_main(BASE + QUIET + ["-x", "3", "-o", "out"], capsys)[::2])
    assert line == ("error: step 3: 1 non-finite weights (NaN or inf), the first in qkvw: the run diverged, so "
                    "out/model_00000003.bin was not written; lower -l, or resume from an earlier checkpoint with -y 1")
    assert os.listdir("out") == ["main.log"]


def test_a_model_file_with_nan_weights_is_refused_at_load(workdir, capsys):
    config, params = formats.read_model_file("tiny.bin")
    params[num_parameters(config) - 5] = np.nan                      # in lnfb, the last tensor
    formats.write_model_file("nan.bin", config, params)
    line = one_line_error(*run_main(["-e", "nan.bin"] + BASE[2:] + ["-x", "1"], capsys)[::2])
    assert line == ("error: nan.bin: 1 non-finite weights (NaN or inf), the first in lnfb: written by a run that "
                    "diverged; load an earlier checkpoint, or re-export the model with python train_gpt2_torch.py "
                    "--model d12"), line


# ----------------------------------------------------------------------------------------------
# a full disk: one line, the file's name never half-written

def failing_after_first_chunk(real):
    def write_atomic(path, chunks):
        chunks = iter(chunks)

        def half():
            yield next(chunks)
            raise OSError(28, "No space left on device")
        return real(path, half())
    return write_atomic


def test_a_full_disk_at_the_final_model_is_one_line(workdir, capsys, monkeypatch):
    monkeypatch.setattr(formats, "write_atomic", failing_after_first_chunk(formats.write_atomic))
    line = one_line_error(*run_main(BASE + QUIET + ["-x", "2", "-o", "out"], capsys)[::2])
    assert re.fullmatch(r"error: could not write out/model_00000002\.bin: the disk is full \(stopped after 1\.0 KiB, "
                        r"[\d.]+ (bytes|KiB|MiB|GiB) free there\)", line), line
    assert os.listdir("out") == ["main.log"]


# ----------------------------------------------------------------------------------------------
# litter: what killed runs leave in -o goes, complete checkpoints stay

def test_litter_of_killed_runs_is_removed_and_complete_checkpoints_kept(workdir, capsys):
    code, _, err = run_main(BASE + QUIET + ["-x", "6", "-n", "2", "-o", "out"], capsys)
    assert code == 0, err
    complete = {name: read(f"out/{name}") for name in os.listdir("out") if name != "main.log"}
    litter = ["model_00000003.bin.tmp4242", "state_00000004_00000.bin.tmp17",   # killed while writing
              "model_00000001.bin", "state_00000001_00000.bin",                 # a checkpoint without DONE_
              "state_00000003_00000.bin"]                                       # orphaned by -nk's deletion
    kept = ["model_00000005.bin",        # a model with no state: a final model (-n 0), not a checkpoint's
            "state_00000009_00000.bin",  # newer than the newest DONE_: a later write replaces it
            "notes.txt"]                 # not ours
    for name in litter + kept:
        with open(f"out/{name}", "wb") as f:
            f.write(b"x" * 100)
    code, out, err = run_main(BASE + QUIET + ["-x", "8", "-n", "2", "-o", "out", "-y", "1"], capsys)
    assert code == 0, err
    assert ("removed 5 file(s) a killed run left in out: model_00000001.bin, model_00000003.bin.tmp4242, "
            "state_00000001_00000.bin, state_00000003_00000.bin and 1 more") in out, out
    names = set(os.listdir("out"))
    assert not names & set(litter) and set(kept) <= names
    assert all(read(f"out/{name}") == data for name, data in complete.items())
    assert checkpoint.done_steps("out") == [2, 4, 6, 8]


def test_litter_is_removed_after_each_checkpoint(workdir, capsys, monkeypatch):
    write = checkpoint.write_checkpoint

    def write_and_leave_a_temporary(output_dir, step, *args, **kwargs):
        write(output_dir, step, *args, **kwargs)
        with open(checkpoint.model_path(output_dir, step) + ".tmp99", "wb") as f:
            f.write(b"half")
    monkeypatch.setattr(checkpoint, "write_checkpoint", write_and_leave_a_temporary)
    code, out, err = run_main(BASE + QUIET + ["-x", "4", "-n", "2", "-o", "out"], capsys)
    assert code == 0, err
    for step in (2, 4):
        assert out.count(f"removed 1 file(s) a killed run left in out: model_{step:08d}.bin.tmp99") == 1
    assert not [name for name in os.listdir("out") if ".tmp" in name]


# ----------------------------------------------------------------------------------------------
# Ctrl-C

def test_ctrl_c_stops_after_the_step_with_a_checkpoint_that_resumes_bit_exactly(workdir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, os.path.join(REPO, "train_gpt2.py")] + BASE + ["-x", "60"]
    full = subprocess.run(args + ["-o", "full"], capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode == 0, full.stderr
    p = subprocess.Popen(args + ["-o", "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step    3/60"):
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=300)
    out = "".join(lines) + out
    assert p.returncode == 130, err
    assert "Ctrl-C: stopping at the end of this step (press it again to stop at once)" in out
    stopped = int(re.findall(r"^step +(\d+)/60", out, re.M)[-1])
    assert 3 <= stopped < 60 and err == f"stopped by Ctrl-C after step {stopped} of 60: checkpoint {stopped} is in " \
                                        f"run: -y 1 goes on from it\n", err
    assert checkpoint.done_steps("run") == [stopped]
    resumed = subprocess.run(args + ["-o", "run", "-y", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0 and f"resumed from checkpoint {stopped} in run" in resumed.stdout, resumed.stderr
    assert read("run/model_00000060.bin") == read("full/model_00000060.bin")


def test_a_second_ctrl_c_stops_at_once_in_one_line(workdir, capsys, monkeypatch):
    with run.StopOnCtrlC() as ctrl_c:
        ctrl_c.in_loop = True
        os.kill(os.getpid(), signal.SIGINT)                    # the first: a request, the run goes on
        assert ctrl_c.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)                # the second: at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # put back

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(m, "train", interrupted)
    code, out, err = run_main(BASE, capsys)
    assert code == 130 and err == "stopped at once by Ctrl-C: nothing written since the last checkpoint\n", err


# ----------------------------------------------------------------------------------------------
# flags

@pytest.mark.parametrize("flags, expected", [
    (["-x", "0"], "-x 0: give a positive number of steps, or -1 for one epoch"),
    (["-x", "-5"], "-x -5: give a positive number of steps, or -1 for one epoch"),
    (["-l", "-1"], "-l -1: the learning rate must be 0 or positive"),
    (["-e", "."], ".: a directory, not an llm.c model file; give the path of the file"),
    (["-i", "."], '.: a directory, not an llm.c data shard; give the shards in it as a glob, such as "./*train*.bin"'),
    (["-j", "."], '.: a directory, not an llm.c data shard; give the shards in it as a glob, such as "./*train*.bin"'),
])
def test_flags_that_make_no_sense_are_one_line(workdir, capsys, flags, expected):
    assert one_line_error(*run_main(BASE + flags, capsys)[::2]) == f"error: {expected}"


def test_a_header_whose_heads_do_not_divide_the_channels(workdir, capsys):
    data = bytearray(read("tiny.bin"))
    data[20:24] = np.int32(3).tobytes()                                      # header[5]: NH 3, C 32
    with open("nh3.bin", "wb") as f:
        f.write(data)
    line = one_line_error(*run_main(["-e", "nh3.bin"] + BASE[2:], capsys)[::2])
    assert line == ("error: nh3.bin: 3 heads do not divide the 32 channels (expected NH dividing C: the head size is "
                    "C / NH); re-run python train_gpt2_torch.py --model d12"), line


def test_resume_says_which_settings_changed(workdir, capsys):
    code, _, err = run_main(BASE + QUIET + ["-x", "3", "-n", "3", "-o", "out"], capsys)
    assert code == 0, err
    changed = ["-d", "16", "-x", "6", "-u", "1", "-l", "0.02", "-q", "0", "-c", "0.1", "-k", "linear"]
    code, out, err = run_main(BASE + QUIET + changed + ["-n", "3", "-o", "out", "-y", "1"], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("-y 1: ")]
    assert lines == ["-y 1: -d changes from 32 (the checkpoint's run) to 16",
                     "-y 1: -x changes from 3 (the checkpoint's run) to 6",
                     "-y 1: -u changes from 3 (the checkpoint's run) to 1",
                     "-y 1: -l changes from 0.01 (the checkpoint's run) to 0.02",
                     "-y 1: -q changes from 0.1 (the checkpoint's run) to 0",
                     "-y 1: -c changes from 0 (the checkpoint's run) to 0.1",
                     "-y 1: -k changes from cosine (the checkpoint's run) to linear"], lines
    state = checkpoint.read_state_file("out/state_00000006_00000.bin", num_parameters(TINY))
    assert state.settings == dict(total_batch_size=16, max_steps=6, warmup_iterations=1, learning_rate=0.02,
                                  final_learning_rate_frac=0.0, weight_decay=0.1, lr_scheduler_type="linear")
    code, out, err = run_main(BASE + QUIET + changed + ["-x", "9", "-n", "3", "-o", "out", "-y", "1"], capsys)
    assert code == 0 and [line for line in out.splitlines() if line.startswith("-y 1: ")] == \
        ["-y 1: -x changes from 6 (the checkpoint's run) to 9"]


# ----------------------------------------------------------------------------------------------
# -o: a new run never writes over (or -nk deletes) another run's files

def test_a_new_run_refuses_an_output_dir_holding_another_run(workdir, capsys):
    code, _, err = run_main(BASE + QUIET + ["-x", "4", "-n", "2", "-o", "out"], capsys)
    assert code == 0, err
    before = {name: read(f"out/{name}") for name in os.listdir("out")}
    line = one_line_error(*run_main(BASE + QUIET + ["-x", "2", "-n", "1", "-nk", "1", "-o", "out"], capsys)[::2])
    assert line == ("error: -o out holds an earlier run's files (DONE_00000002, DONE_00000004, main.log and 4 more): "
                    "-y 1 resumes that run; for a new one give another -o, or delete them"), line
    assert {name: read(f"out/{name}") for name in os.listdir("out")} == before
    with open("afile", "w") as f:
        f.write("mine")
    line = one_line_error(*run_main(BASE + QUIET + ["-x", "2", "-o", "afile"], capsys)[::2])
    assert line == "error: -o afile: a file, not a directory; give a directory for the logs and checkpoints"
    assert read("afile") == b"mine"
    os.makedirs("own")
    with open("own/notes.txt", "w") as f:                                    # a folder of the user's: fine
        f.write("mine")
    code, _, err = run_main(BASE + QUIET + ["-x", "2", "-o", "own"], capsys)
    assert code == 0 and read("own/notes.txt") == b"mine", err


# ----------------------------------------------------------------------------------------------
# advice that fits the case

def test_a_checkpoints_bad_model_file_says_to_fall_back_to_the_previous_one(workdir, capsys):
    code, _, err = run_main(BASE + QUIET + ["-x", "6", "-n", "3", "-o", "out"], capsys)
    assert code == 0, err
    data = read("out/model_00000006.bin")
    advice = "delete out/DONE_00000006 and -y 1 resumes from checkpoint 3, the previous complete one; or run without -y 1"
    resume = BASE + QUIET + ["-x", "9", "-o", "out", "-y", "1"]
    os.remove("out/model_00000006.bin")
    assert one_line_error(*run_main(resume, capsys)[::2]) == f"error: out/model_00000006.bin: no such file; {advice}"
    with open("out/model_00000006.bin", "wb") as f:
        f.write(data[:-4])
    line = one_line_error(*run_main(resume, capsys)[::2])
    assert line == (f"error: out/model_00000006.bin: {len(data) - 4} bytes (expected {len(data)} bytes as its header "
                    f"says); {advice}"), line
    with open("out/model_00000006.bin", "wb") as f:
        f.write(data)
    os.remove("out/state_00000006_00000.bin")
    line = one_line_error(*run_main(resume, capsys)[::2])
    assert line == ("error: out/state_00000006_00000.bin: no such file (the checkpoint is incomplete); " + advice), line
    os.remove("out/DONE_00000006")                                          # as the advice says
    code, out, err = run_main(resume, capsys)
    assert code == 0 and "resumed from checkpoint 3 in out" in out, err


def test_a_text_file_as_data_says_to_tokenize_it(workdir, capsys):
    with open("input.txt", "w") as f:
        f.write("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40)
    line = one_line_error(*run_main(BASE + ["-i", "input.txt"], capsys)[::2])
    assert line == ("error: input.txt: a text file, not an llm.c data shard; tokenize it into shards with "
                    "python dev/data/prepro_text.py input.txt"), line


def test_a_random_init_stand_in_is_a_warning_at_both_ends_of_the_run(workdir, capsys):
    os.rename("tiny.bin", "gpt2_d12.bin")
    code, out, err = run_main(BASE[2:] + QUIET + ["-x", "1"], capsys)
    warning = ("WARNING: gpt2_124M.bin not found: using gpt2_d12.bin, a RANDOM init of the same shape, so this run "
               "trains from scratch, not from OpenAI's weights (python train_gpt2_torch.py --model gpt2 gets them, "
               "with the network)")
    lines = out.splitlines()
    assert code == 0 and lines.count(warning) == 2 and lines[-1] == warning, err
