"""dev/vislog.py: the series parsed from a main.log this test writes (a resumed run's repeated steps
taken from the later lines), the lines matplotlib draws from them, the PNG, one-line errors, and -o: only
a PNG is replaced, and a full disk leaves no half file."""

import importlib.util
import os

import numpy as np
import pytest

from conftest import REPO, disk_full_after, run_main, run_script
from llmc.logger import Logger

SCRIPT = os.path.join("dev", "vislog.py")


def load_vislog():
    spec = importlib.util.spec_from_file_location("vislog", os.path.join(REPO, SCRIPT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(out_dir, steps=12, every=4, hellaswag=True, crash_at=None):
    """A main.log written through llmc.logger as train() writes it; crash_at: the run is resumed from a
    checkpoint at step crash_at - 2 after logging step crash_at, so steps crash_at-2.. are logged twice,
    the first time with values + 1000 (which only steps < crash_at - 2 keep)."""
    log = Logger(str(out_dir))
    want = {"trl": {}, "lr": {}, "norm": {}, "tel": {}, "eval": {}}

    def run(first, last, offset):
        for step in range(first, last + 1):
            if step % every == 0 or step == steps:
                log.log_val(step, 5.0 - 0.1 * step + offset)
                want["tel"][step] = round(5.0 - 0.1 * step + offset, 4)
                if hellaswag and step > 0:
                    log.log_eval(step, 0.25 + 0.001 * step)
                    want["eval"][step] = round(0.25 + 0.001 * step, 4)
            if step < steps:
                log.log_train(step, 6.0 - 0.2 * step + offset, 3e-4, 1.5 + step)
                want["trl"][step] = round(6.0 - 0.2 * step + offset, 4)
                want["lr"][step], want["norm"][step] = 3e-4, 1.5 + step

    if crash_at:
        run(0, crash_at, 1000.0)
        run(crash_at - 2, steps, 0.0)
    else:
        run(0, steps, 0.0)
    return os.path.join(str(out_dir), "main.log"), {k: v for k, v in want.items() if v}


def test_parse(tmp_path):
    vislog = load_vislog()
    path, want = write_run(tmp_path / "run", crash_at=7)
    streams = vislog.parse_logfile(path)
    assert sorted(streams) == sorted(want)
    for key, d in want.items():
        xs, ys = streams[key]
        assert xs.tolist() == sorted(d)
        np.testing.assert_allclose(ys, [d[s] for s in sorted(d)], rtol=0, atol=1e-9)
    trl = streams["trl"][1]             # steps 5.. logged twice: the resumed run's lines won, 0..4 are the first run's
    assert streams["trl"][0].tolist() == list(range(12)) and trl[5:].max() < 100 and trl[:5].min() > 1000
    assert streams["eval"][0].tolist() == [4, 8, 12]


def test_plot_lines_and_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    vislog = load_vislog()
    ours, want_ours = write_run(tmp_path / "ours")
    theirs, want_theirs = write_run(tmp_path / "llmc", steps=8, every=2, hellaswag=False)
    runs = [("ours", vislog.parse_logfile(ours)), ("llm.c", vislog.parse_logfile(theirs))]
    fig = vislog.plot(runs, baseline=0.2955)
    loss_ax, hella_ax = fig.axes
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss_ax.get_lines()}
    for label, want in (("ours", want_ours), ("llm.c", want_theirs)):
        for stream, name in (("trl", "train loss"), ("tel", "val loss")):
            xs, ys = drawn[f"{label} {name}"]
            assert xs == sorted(want[stream]) and np.allclose(ys, [want[stream][s] for s in xs], atol=1e-9)
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in hella_ax.get_lines()}
    assert set(drawn) == {"ours", "baseline 0.2955"}                  # llm.c's run has no eval lines
    assert drawn["ours"][0] == [4, 8, 12] and np.allclose(drawn["ours"][1], [0.254, 0.258, 0.262])
    assert np.allclose(drawn["baseline 0.2955"][1], 0.2955)
    # vislog's size baselines: GPT-2's val loss, GPT-2's and GPT-3's HellaSwag
    fig = vislog.plot(runs[:1], baseline="124M")
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert "OpenAI GPT-2 (124M) checkpoint val loss" in labels and "OpenAI GPT-3 (124M) checkpoint" in labels

    # --smooth: vislog's centred moving average of the train loss, the ends padded with the edge values
    fig = vislog.plot(runs[:1], smooth=3)
    ys = np.array([want_ours["trl"][s] for s in sorted(want_ours["trl"])])
    padded = np.concatenate([ys[:1], ys, ys[-1:]])
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), (padded[:-2] + padded[1:-1] + padded[2:]) / 3)

    # the command line: a PNG, the runs named after their folders, a summary line each
    png = tmp_path / "plots" / "out.png"
    r = run_script(SCRIPT, ours, theirs, "-o", png, "--baseline", "0.2955", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ours: 12 train steps, min train loss 3.8000, min val loss 3.8000, max HellaSwag 0.2620" in r.stdout
    assert "llmc: 8 train steps" in r.stdout
    data = png.read_bytes()
    assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_one_line(tmp_path):
    vislog = load_vislog()
    no_train = tmp_path / "val_only.log"
    no_train.write_text("s:0 tel:5.0000\ns:10 tel:4.0000\n")
    garbage = tmp_path / "garbage.log"
    garbage.write_text("s:0 trl:5.0 lr:0.1 norm:1.0\nstep 1/40: train loss 4.5\n")
    with pytest.raises(vislog.LogError, match="no train loss lines"):
        vislog.parse_logfile(str(no_train))
    with pytest.raises(vislog.LogError, match=r"garbage.log:2: not a main.log line"):
        vislog.parse_logfile(str(garbage))
    for args, message in (([no_train], "no train loss lines"), ([garbage], "garbage.log:2: not a main.log line"),
                          ([tmp_path / "nope.log"], "no such file"),
                          ([garbage, no_train, "--labels", "a"], "--labels has 1 names for 2 logs"),
                          ([no_train, "--baseline", "huge"], "--baseline huge: a model size")):
        r = run_script(SCRIPT, *args, "-o", tmp_path / "x.png", cwd=tmp_path)
        assert r.returncode == 1 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_replaces_only_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    vislog = load_vislog()
    log, _ = write_run(tmp_path / "run")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (tmp_path / "plots").mkdir()
    for out, found in ((notes, notes), (tmp_path / "plots", tmp_path / "plots")):
        code, stdout, err = run_main([log, "-o", str(out)], capsys, vislog)
        assert code == 1 and err.strip() == (f"error: {found}: not a PNG, so not this program's to replace; "
                                             "nothing was written: give -o another name"), err
    assert notes.read_text() == "my notes" and os.listdir(tmp_path / "plots") == []
    png = tmp_path / "plot.png"
    for _ in range(2):                                      # the second run replaces the first's PNG
        code, stdout, err = run_main([log, "-o", str(png)], capsys, vislog)
        assert code == 0 and f"wrote {png}" in stdout, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "plot.png", "plots", "run"]


def test_disk_full_partway_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    vislog = load_vislog()
    log, _ = write_run(tmp_path / "run")
    earlier = tmp_path / "earlier.png"
    assert run_main([log, "-o", str(earlier)], capsys, vislog)[0] == 0
    before = earlier.read_bytes()
    disk_full_after(monkeypatch, 1000)
    for out in (earlier, tmp_path / "new.png"):
        code, stdout, err = run_main([log, "-o", str(out)], capsys, vislog)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: could not write {out}: the disk is full (")
    assert earlier.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["earlier.png", "run"]
