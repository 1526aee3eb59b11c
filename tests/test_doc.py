"""The tutorial in doc/: its script runs and its numbers are small, and its quotes are still true.

doc/layernorm.py prints one line per check, `[f64] <what> ... max abs err <x>` (or [f32]); here every
such line is parsed and held to 1e-10 (float64) or 1e-5 (float32), independently of the script's own
verdict, and the number of checks is fixed, so a check that silently stops printing fails too.
doc/layernorm.md quotes code in ```python / ```cuda blocks, each introduced by "(<file>, lines A-B)":
quotes of doc/layernorm.py must be exactly those lines; quotes of other files (train_gpt2.py,
kernels/layernorm.cu, whose line numbers move as their owners edit them) must appear there verbatim.
Quotes are compared with the files as they are on disk.
"""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "doc")
TOL = {"f64": 1e-10, "f32": 1e-5}
CHECK_RE = re.compile(r"^\[(f64|f32)\] (.+?)\s+max abs err (\S+)$")


@pytest.fixture(scope="module")
def layernorm_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("doc")                  # not the repo root: the script finds its imports
    r = subprocess.run([sys.executable, os.path.join(DOC, "layernorm.py")], cwd=cwd, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    return r


def parse_checks(stdout):
    checks = []
    for line in stdout.splitlines():
        m = CHECK_RE.match(line)
        if m:
            checks.append((m.group(1), m.group(2), float(m.group(3))))
    return checks


def test_layernorm_script_passes(layernorm_run):
    r = layernorm_run
    assert r.returncode == 0, f"doc/layernorm.py failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    assert r.stdout.rstrip().endswith("all checks passed"), r.stdout


def test_layernorm_script_errors_are_small(layernorm_run):
    checks = parse_checks(layernorm_run.stdout)
    for tag, what, err in checks:
        assert err <= TOL[tag], f"doc/layernorm.py: [{tag}] {what}: max abs err {err:.2e} > {TOL[tag]:.0e}"
    names = [what for _, what, _ in checks]
    assert len(set(names)) == len(names) - 6, "each NumPy check runs once in float64 and once in float32"
    sections = {s: sum(what.startswith(s + ":") for what in names) for s in ("torch", "paper", "numpy", "cuda")}
    assert sections["torch"] == 1 and sections["paper"] == 5 and sections["numpy"] == 12, sections
    emulated = "[skip] emulator" not in layernorm_run.stdout
    assert sections["cuda"] == (6 if emulated else 0), sections


def test_layernorm_checks_can_fail():
    """The parser reads an error that is too large as one (guards the regex against a format change)."""
    tag, what, err = parse_checks("[f32] cuda: backward dinp - old vs autograd      max abs err 2.50e-01")[0]
    assert (tag, what, err) == ("f32", "cuda: backward dinp - old vs autograd", 0.25) and err > TOL[tag]


def quoted_blocks(md_path):
    """(file, first line, last line, block lines) for each ```python / ```cuda block of a tutorial page."""
    text = open(md_path).read()
    out = []
    for m in re.finditer(r"```(?:python|cuda)\n(.*?)```", text, re.S):
        before = text[max(0, m.start() - 300):m.start()]
        refs = re.findall(r"\(([\w/.]+\.(?:py|cuh?)),\s+lines?\s+(\d+)(?:-(\d+))?\)", before)
        assert refs, f"{md_path}: a code block without a '(<file>, lines A-B)' reference:\n{m.group(1)[:200]}"
        path, first, last = refs[-1]
        out.append((path, int(first), int(last or first), m.group(1).rstrip("\n").split("\n")))
    return out


def current_text(path):
    return open(os.path.join(REPO, path)).read()


def test_layernorm_md_quotes_are_current():
    blocks = quoted_blocks(os.path.join(DOC, "layernorm.md"))
    assert len(blocks) >= 6
    for path, first, last, block in blocks:
        lines = current_text(path).split("\n")
        assert len(block) == last - first + 1, f"doc/layernorm.md cites {path}:{first}-{last} for {len(block)} lines"
        if path.startswith("doc/"):
            assert lines[first - 1:last] == block, f"doc/layernorm.md: {path}:{first}-{last} is not the quote"
        else:
            at = [i for i in range(len(lines)) if lines[i:i + len(block)] == block]
            assert at, (f"doc/layernorm.md quotes {path} (lines {first}-{last}) but the code there has changed: "
                        f"update the quote and the text around it\n" + "\n".join(block))
