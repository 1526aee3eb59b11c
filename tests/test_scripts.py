"""scripts/: each reproduction script run under LLMC_DRY_RUN=1, where the trainer parses and checks every flag
the script passes, prints them and exits without data or a GPU (llmc/dryrun.py). The flags it parsed must be
llm.c's for that run (LLMC_FLAGS below, copied from llm.c's scripts), so a flag renamed in llmc/cli.py, or a
value mistyped in a script, fails here. Also: the scripts' one-line stops (no data, no slurm job), the
restart loop of scripts/lib.sh, and the dry run's own checks."""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from llmc.dataloader import prepro_for

# llm.c's flags for each run (its scripts/, HEAD f1e2ace), and what ours add: -x where llm.c runs one epoch
# (the script waits for DONE_<-x>), -pg for mpirun (llm.c's default 8, given so the script says it)
LLMC_124M = "-v 250 -s 20000 -g 144 -h 1 -b 64 -t 1024 -d 524288 -r 0 -z 1 -c 0.1 -l 0.0006 -q 0.0 -u 700 -n 5000 -y 1"
LLMC_MULTI = ("-v 250 -s 20000 -g 144 -h 1 -b 64 -t 1024 -d 2097152 -r 0 -z 1 -c 0.1 -l 0.0006 -q 0.0 -u 700 "
              "-n 5000 -y 1 -e d12 -pn 16 -pr 0 -pg 8")
LLMC_FLAGS = {
    "run_gpt2_124M.sh": LLMC_124M + " -e d12 -x 18865",
    "run_gpt2_350M.sh": "-v 250 -s 100000 -g 144 -h 1 -b 64 -t 1024 -d 524288 -r 0 -z 1 -c 0.1 -l 0.0003 -q 0.0 "
                        "-u 700 -n 2000 -x 60000 -y 1 -e d24",
    "run_gpt2_774M.sh": "-v 250 -s 300000 -g 144 -h 1 -b 32 -t 1024 -d 524288 -r 0 -z 1 -c 0.1 -l 0.00025 -q 0.0 "
                        "-u 700 -n 4000 -x 286102 -y 1 -e d36",
    "run_gpt2_1558M.sh": "-v 250 -s 300000 -g 384 -h 1 -b 16 -t 1024 -d 1048576 -r 0 -z 1 -c 0.1 -k cosine "
                         "-l 0.0006 -q 0.1 -u 700 -n 2000 -x 32000 -ge 1 -y 1 -e d48",
    "run_gpt3_125M.sh": "-v 250 -s 20000 -g 144 -h 1 -b 32 -t 2048 -d 524288 -r 0 -z 1 -c 0.1 -l 0.0006 -q 0.1 "
                        "-u 700 -n 10000 -nk 5 -nm 50000 -ge 1 -sl 7.0 -sg 7.0 -y 1 -x 572204 -e gpt3:c768",
    # the NumPy trainer: micro-batches of 4 (its attention tensors), no -r (no recompute there)
    "run_gpt2_124M_cpu.sh": LLMC_124M.replace("-b 64", "-b 4").replace(" -r 0", "") + " -e d12 -x 18865",
    "multi_node/run_gpt2_124M_mpi.sh": LLMC_MULTI.replace("-q 0.0", "-q 0.1").replace("-n 5000", "-n 1000")
                                       .replace("-y 1", "-y 0").replace(" -pn 16 -pr 0", "") + " -pi mpi",
    "multi_node/run_gpt2_124M_fs.sbatch": LLMC_MULTI + " -pi fs",
    "multi_node/run_gpt2_124M_tcp.sbatch": LLMC_MULTI + " -pi tcp -ps 10.0.1.220",
}
DATA = {"fineweb100B": ("run_gpt2_350M.sh", "run_gpt2_774M.sh", "run_gpt3_125M.sh"),
        "edu_fineweb100B": ("run_gpt2_1558M.sh",)}
PARSED = re.compile(r"^  (-\S+)\s+(\w+) = (.*?)( \(given\))?$", re.M)


def shell(script, cwd=REPO, dry=True, env=None):
    full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    full_env.pop("SLURM_JOB_ID", None)
    if dry:
        full_env["LLMC_DRY_RUN"] = "1"
    else:
        full_env.pop("LLMC_DRY_RUN", None)
    return subprocess.run(["bash", script], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60)


def given_flags(stdout):
    """{flag: value} of the flags the dry run says were given, the values as Python reads them."""
    return {flag: ast.literal_eval(value) for flag, _, value, given in PARSED.findall(stdout) if given}


def as_values(flags):
    words = flags.split()
    return dict(zip(words[::2], words[1::2]))


def test_every_script_is_listed():
    found = sorted(os.path.relpath(os.path.join(d, f), os.path.join(REPO, "scripts"))
                   for d, _, files in os.walk(os.path.join(REPO, "scripts")) for f in files
                   if f.endswith((".sh", ".sbatch")) and f != "lib.sh")
    assert found == sorted(LLMC_FLAGS)


@pytest.mark.parametrize("name", sorted(LLMC_FLAGS))
def test_dry_run_parses_llmc_flags(name):
    r = shell(os.path.join("scripts", name))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "flags parsed and checked; nothing trained" in r.stdout
    got = given_flags(r.stdout)
    want = as_values(LLMC_FLAGS[name])
    # the data and output paths are the script's to choose; every other flag is llm.c's, with its value
    paths = {flag: got.pop(flag) for flag in ("-i", "-j", "-o", "-pf") if flag in got}
    assert set(got) == set(want), (sorted(got), sorted(want))
    for flag, value in want.items():
        assert got[flag] == type(got[flag])(value), (flag, got[flag], value)
    folder = next((d for d, names in DATA.items() if os.path.basename(name) in names), "fineweb10B")
    assert paths["-i"] == f"dev/data/{folder}/{folder.replace('100B', '').replace('10B', '')}_train_*.bin"
    assert paths["-j"] == paths["-i"].replace("_train_", "_val_")
    trainer = "train_gpt2.py" if name.endswith("_cpu.sh") else "train_gpt2_cuda.py"
    assert re.search(rf"^would run: .*\b{trainer} -", r.stdout, re.M), r.stdout[:500]


def copy_scripts(tmp_path, name, edit=None):
    """The scripts folder in tmp_path beside links to the trainers (so a script's `cd ..` finds them), with
    `edit` (old, new) applied to `name`. Returns the path of the copy of `name`."""
    shutil.copytree(os.path.join(REPO, "scripts"), tmp_path / "scripts")
    for trainer in ("train_gpt2.py", "train_gpt2_cuda.py"):
        os.symlink(os.path.join(REPO, trainer), tmp_path / trainer)
    path = tmp_path / "scripts" / name
    if edit:
        text = path.read_text()
        assert text.count(edit[0]) == 1
        path.write_text(text.replace(*edit))
    return str(path)


def test_renamed_flag_fails_the_dry_run(tmp_path):
    script = copy_scripts(tmp_path, "run_gpt2_124M.sh", (" -r 0 ", " -rr 0 "))
    r = shell(script, cwd=tmp_path, env={"PYTHONPATH": REPO})
    assert r.returncode != 0
    assert r.stderr.splitlines()[0] == "error: unknown flag -rr", r.stderr


def test_bad_value_fails_the_dry_run(tmp_path):
    script = copy_scripts(tmp_path, "run_gpt2_1558M.sh", ("-k cosine", "-k cosin"))
    r = shell(script, cwd=tmp_path, env={"PYTHONPATH": REPO})
    assert r.returncode == 1
    assert r.stderr.strip() == "error: -k cosin: expected one of cosine, linear, constant, wsd"


@pytest.mark.parametrize("name, prepro", [("run_gpt2_124M.sh", "python dev/data/fineweb.py -t classic -v 10B"),
                                          ("run_gpt2_1558M.sh", "python dev/data/fineweb.py -t edu -v 100B"),
                                          ("run_gpt2_124M_cpu.sh", "python dev/data/fineweb.py -t classic -v 10B")])
def test_missing_data_is_one_line(tmp_path, name, prepro):
    """A real run (no dry run) without the shards stops before launching anything, naming the prepro."""
    r = shell(copy_scripts(tmp_path, name), cwd=tmp_path, dry=False)
    assert r.returncode == 1
    assert r.stdout.strip().splitlines() == [f"error: no files match {prepro_folder(prepro)}: make them first "
                                             f"with {prepro}"]
    assert not any(p.name.startswith("log") for p in tmp_path.iterdir())


def prepro_folder(prepro):
    kind, version = prepro.split()[-3], prepro.split()[-1]
    prefix = "edu_fineweb" if kind == "edu" else "fineweb"
    return f"dev/data/{prefix}{version}/{prefix}_train_*.bin"


def test_sbatch_outside_slurm_is_one_line(tmp_path):
    r = shell(copy_scripts(tmp_path, "multi_node/run_gpt2_124M_tcp.sbatch"), cwd=tmp_path, dry=False)
    assert r.returncode == 1
    assert r.stdout.strip() == "error: not inside a slurm job: submit this script with sbatch"


def lib(tmp_path, body, max_failures=2):
    """Run `body` in bash after sourcing a copy of scripts/lib.sh in tmp_path/scripts (it moves to tmp_path,
    the copy's repository root), no dry run."""
    os.makedirs(tmp_path / "scripts", exist_ok=True)
    shutil.copy(os.path.join(REPO, "scripts", "lib.sh"), tmp_path / "scripts")
    env = dict(os.environ, MAX_FAILURES=str(max_failures))
    env.pop("LLMC_DRY_RUN", None)
    return subprocess.run(["bash", "-c", f"source scripts/lib.sh; {body}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_run_until_done_stops_when_done(tmp_path):
    """A TASK that writes the DONE_ file ends the loop at once; one that writes checkpoints goes on while it
    makes progress (an attempt per checkpoint here) and stops once the last one is there."""
    os.mkdir(tmp_path / "out")
    counter = tmp_path / "attempts"
    # each attempt writes the next DONE_ marker, and fails (as a crash would) until DONE_00000003
    step = (f'n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $n > {counter}; '
            f'touch out/DONE_0000000$n; [ $n -ge 3 ]')
    r = lib(tmp_path, f"LAUNCH=(); TASK=(bash -c '{step}'); run_until_done out 3 x")
    assert r.returncode == 0, r.stdout + r.stderr
    assert counter.read_text().strip() == "3"
    assert r.stdout.strip().splitlines()[-1] == "out/DONE_00000003 exists: the run is complete"


def test_run_until_done_gives_up_without_progress(tmp_path):
    counter = tmp_path / "attempts"
    r = lib(tmp_path, f"LAUNCH=(); TASK=(bash -c 'echo x >> {counter}; exit 1'); run_until_done out 10 x")
    assert r.returncode == 1
    assert len(counter.read_text().split()) == 2                  # MAX_FAILURES attempts, then it stops
    assert r.stdout.strip() == "error: 2 attempts in a row ended without a new checkpoint: see the errors above"


def test_run_until_done_refuses_a_wrong_done_name(tmp_path):
    r = lib(tmp_path, "LAUNCH=(); TASK=(true); run_until_done out 10 x")
    assert r.returncode == 1
    assert "the run ended without out/DONE_00000010: does -x match the step in its name?" in r.stdout


@pytest.mark.parametrize("path, command", [
    ("dev/data/fineweb10B/fineweb_train_*.bin", "python dev/data/fineweb.py -t classic -v 10B"),
    ("dev/data/fineweb100B/fineweb_val_*.bin", "python dev/data/fineweb.py -t classic -v 100B"),
    ("/big/edu_fineweb10B/edu_fineweb_train_*.bin", "python dev/data/fineweb.py -t edu -v 10B"),
    ("data/tinystories/TinyStories_val.bin", "python prepro_tinystories.py"),
    ("dev/data/mmlu/mmlu_val.bin", "python dev/data/mmlu.py"),
    ("mine/*.bin", "python prepro_tinyshakespeare.py"),
])
def test_prepro_for(path, command):
    assert prepro_for(path) == command


def dry_run(*argv, trainer="train_gpt2_cuda.py"):
    env = dict(os.environ, LLMC_DRY_RUN="1")
    return subprocess.run([sys.executable, os.path.join(REPO, trainer), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv, line", [
    (["-e", "d12", "-t", "2048"], "error: sequence length -t 2048 exceeds d12's max_seq_len 1024"),
    (["-e", "d7"], "error: unknown model 'd7'"),
    (["-e", "gpt3:c5140", "-t", "2048"], "error: unknown GPT-3 size 'gpt3:c5140'"),
    (["-e", "gpt3:c768", "-t", "4096"], "error: sequence length -t 4096 exceeds gpt3:c768's max_seq_len 2048"),
    (["-z", "2"], "error: -z 2: expected one of 0, 1"),
    (["-r", "3"], "error: -r 3: expected one of 0, 1, 2"),
    (["-b", "4", "-t", "64", "-d", "1000"], "error: -d 1000 is not a multiple of B*T = 4*64"),
    (["-n", "100"], "error: -n 100 writes checkpoints into the output dir: add -o DIR"),
])
def test_dry_run_checks(argv, line):
    r = dry_run(*argv)
    assert r.returncode == 1
    assert r.stderr.strip().startswith(line), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_dry_run_of_a_model_file(tmp_path):
    r = dry_run("-e", str(tmp_path / "mine.bin"), "-i", "data/tinystories/TinyStories_train.bin", "-j", "x.bin",
                trainer="train_gpt2.py")
    assert r.returncode == 0, r.stderr
    assert f"model: model file {tmp_path / 'mine.bin'} (not here" in r.stdout
    notes = [line for line in r.stdout.splitlines() if line.startswith("note:")]
    if not os.path.exists(os.path.join(REPO, "data/tinystories/TinyStories_train.bin")):
        assert notes[0] == ("note: no files match -i 'data/tinystories/TinyStories_train.bin': "
                            "python prepro_tinystories.py makes them")
    assert notes[-1] == "note: no files match -j 'x.bin': python prepro_tinyshakespeare.py makes them"


def test_trainers_name_the_prepro(tmp_path):
    """The trainers' loader, given shards that are not there, names the same prepro as the scripts."""
    from llmc.dataloader import DataLoader
    from llmc.utils import ConfigError
    pattern = str(tmp_path / "edu_fineweb100B" / "edu_fineweb_train_*.bin")
    with pytest.raises(ConfigError) as e:
        DataLoader(pattern, 4, 64)
    assert str(e.value) == (f"no data files match '{pattern}'; create them with "
                            f"python dev/data/fineweb.py -t edu -v 100B")
