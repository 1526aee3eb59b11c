"""dev/loss_checker_ci.py on a short real run: train_gpt2.py's 10 steps on the tiny exported model's first
batch (-a 1) against the PyTorch reference's losses for the same steps (conftest's tiny_export, whose
main.log train_gpt2_torch.py wrote), from the run's main.log and from its captured output; the same run at
10x the learning rate must fail. Then llm.c's default table and tolerance, its own step line, a resumed log,
and the one-line errors (exit status 2)."""

import os

import pytest

from conftest import run_script
from test_gpt2 import LLMC_124M_LOSSES

import loss_checker_ci as checker


def train(tiny_export, tiny_data, out_dir, lr):
    """train_gpt2.py's 10 steps at learning rate lr on the export's batch: (main.log, captured output)."""
    r = run_script("train_gpt2.py", "-e", tiny_export.model, "-i", tiny_data, "-j", tiny_data, "-a", 1,
                   "-b", tiny_export.B, "-t", tiny_export.T, "-x", tiny_export.steps, "-l", lr, "-v", 0, "-s", 0,
                   "-o", out_dir, cwd=os.path.dirname(str(out_dir)))
    assert r.returncode == 0, r.stderr[-2000:]
    captured = out_dir.parent / f"{out_dir.name}.txt"
    captured.write_text(r.stdout)
    return str(out_dir / "main.log"), str(captured)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_export, tiny_data):
    return train(tiny_export, tiny_data, tmp_path_factory.mktemp("run") / "lr1e-4", 1e-4)


def check(capsys, *argv):
    """checker.main(argv) in this process: (its exit status, stdout, stderr)."""
    code = checker.main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("which", [0, 1])
def test_short_run_within_tolerance(capsys, short_run, tiny_export, which):
    """The NumPy trainer's 10 losses (main.log, or the step lines) within 0.01% of PyTorch's: the optimizers
    differ only where Adam hardly feels it (betas (0.9, 0.999) without clipping here, (0.9, 0.95) with
    clipping at 1.0 there), and main.log keeps 4 decimals."""
    code, out, err = check(capsys, "-f", short_run[which], "--reference", tiny_export.log, "-a", 0.01)
    assert code == 0, out + err
    assert out.strip().splitlines()[-1] == "OK: all 10 losses within 0.01% of the expected"
    assert len([line for line in out.splitlines() if line[:4].strip().isdigit()]) == 10


def test_changed_run_fails(capsys, short_run, tiny_export, tiny_data, tmp_path):
    """10x the learning rate: the first loss is the same (no update yet), the nine after it are not."""
    log, _ = train(tiny_export, tiny_data, tmp_path / "lr1e-3", 1e-3)
    code, out, err = check(capsys, "-f", log, "--reference", tiny_export.log, "-a", 0.01)
    assert code == 1
    assert out.strip().splitlines()[-1] == "FAIL: 9 of 10 losses differ from the expected by more than 0.01%"
    r = run_script("dev/loss_checker_ci.py", "-f", log, "--reference", short_run[0], "-a", 0.01, cwd=tmp_path)
    assert r.returncode == 1                             # the exit status, as CI sees it


def write_log(path, losses, first_step=0):
    with open(path, "w") as f:
        for step, loss in enumerate(losses, first_step):
            f.write(f"s:{step} tel:{loss + 0.5:.4f}\ns:{step} trl:{loss:.6f} lr:0.000100 norm:1.00\n")
    return str(path)


@pytest.mark.parametrize("scale, code", [(1.049, 0), (0.951, 0), (1.051, 1)])
def test_llmc_table_at_llmc_tolerance(capsys, tmp_path, scale, code):
    """Without --expected: llm.c's table, at llm.c's CI tolerance of 5% by default."""
    log = write_log(tmp_path / "main.log", [v * scale for v in LLMC_124M_LOSSES])
    got, out, _ = check(capsys, "-f", log)
    assert got == code, out
    assert f"{LLMC_124M_LOSSES[-1]:10.6f}" in out


def test_llmc_step_lines_and_a_resumed_log(capsys, tmp_path):
    """llm.c's own output (`step N/M | loss X`), and a main.log where a resumed run logged steps 3-4 again:
    the later lines count."""
    lines = [f"step {s:4d}/5 | loss {v:.6f} (+0.00z)| norm 1.0 (+0.00z)| lr 1.00e-04 | 10.0 ms" for s, v in
             enumerate([5.0, 4.0, 3.0, 2.0, 1.0], 1)]
    (tmp_path / "llmc.txt").write_text("header line\n" + "\n".join(lines) + "\n")
    code, out, _ = check(capsys, "-f", tmp_path / "llmc.txt", "--expected", "5,4,3,2,1", "-a", 0)
    assert code == 0, out
    log = write_log(tmp_path / "main.log", [5.0, 4.0, 9.0, 9.0])
    with open(log, "a") as f:                           # resumed from the checkpoint of step 2
        f.write("s:2 trl:3.0 lr:0.000100 norm:1.00\ns:3 trl:2.0 lr:0.000100 norm:1.00\ns:4 trl:1.0\n")
    code, out, _ = check(capsys, "-f", log, "--expected", "5,4,3,2,1", "-a", 0)
    assert code == 0, out


@pytest.mark.parametrize("content, line", [
    (None, "error: {f}: no such file"),
    ("nothing here\n", "error: {f}: no train losses in it"),
    ("s:0 trl:4.0\ns:1 trl:3.0\n", "error: {f} has 2 train losses, fewer than the 3 expected: did the run stop early?"),
    ("s:0 trl:x4\n", "error: {f}: cannot read a loss in 's:0 trl:x4'"),
])
def test_unusable_file_is_exit_2(capsys, tmp_path, content, line):
    f = tmp_path / "main.log"
    if content is not None:
        f.write_text(content)
    code, out, err = check(capsys, "-f", f, "--expected", "4,3,2")
    assert code == 2
    assert err.strip().startswith(line.format(f=f)), err


def test_nan_loss_fails(capsys, tmp_path):
    log = write_log(tmp_path / "main.log", [4.0, float("nan")])
    code, out, _ = check(capsys, "-f", log, "--expected", "4,3", "-a", 50)
    assert code == 1 and "FAIL: 1 of 2" in out
