"""The tutorials in doc/: their scripts run and their numbers are small, their quotes are still true,
and the reading order names functions that exist.

Scripts. doc/<page>.py prints one line per check, `[f64] <what> ... max abs err <x>` (or [f32]); here
every such line is parsed and held to 1e-10 (float64) or 1e-5 (float32), independently of the
script's own verdict, and the number of checks in each section (the word before the first colon) is
fixed, so a check that silently stops printing fails too.

Quotes. doc/<page>.md introduces each ```python / ```cuda block with a citation "(<file>, <function>)":
the block must appear verbatim (up to one uniform indent) inside that function's source: a def or
class of a Python file (found with ast), or a __global__ / __device__ function of a .cu/.cuh file
(its text up to the matching brace). Every other "(<file>, <function>)" in the prose must name a
function that exists, and no page may cite line numbers, which drift. When a quote stops matching,
the failure names the page, the citation and the quote's first line, and lists every stale quote at
once, so they can be refreshed together.

Reading order. doc/README.md is a list of stops, each a heading "### N. `<path>` ... (~M min)". In a
stop, `name()` is a function or class of that path and `other/path.py:name()` one of another file;
each must exist.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "doc")
TOL = {"f64": 1e-10, "f32": 1e-5}
CHECK_RE = re.compile(r"^\[(f64|f32)\] (.+?)\s+max abs err (\S+)$")

# per page: the number of checks in each section when the emulator runs ("cuda" is 0 without g++),
# and how many check names are printed twice (once in float64, once in float32)
PAGES = {
    "layernorm": dict(sections={"torch": 1, "paper": 5, "numpy": 12, "cuda": 6}, repeated=6),
    "attention": dict(sections={"torch": 4, "paper": 9, "numpy": 28, "cuda": 10, "flash": 13}, repeated=14),
    "classifier": dict(sections={"torch": 2, "paper": 6, "numpy": 10, "cuda": 5, "vocab": 2, "tied": 5},
                       repeated=5),
    "precision": dict(sections={"bits": 3, "sums": 1, "update": 2}, repeated=0,
                      without_emulator={"bits": 2, "sums": 0, "update": 0}),
}


# ---------------------------------------------------------------------------- the scripts

_runs = {}


def run_page(page, tmp_path_factory):
    if page not in _runs:
        cwd = tmp_path_factory.mktemp("doc")              # not the repo root: the script finds its imports
        _runs[page] = subprocess.run(
            [sys.executable, os.path.join(DOC, page + ".py")], cwd=cwd, capture_output=True, text=True,
            timeout=300, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    return _runs[page]


def parse_checks(stdout):
    checks = []
    for line in stdout.splitlines():
        m = CHECK_RE.match(line)
        if m:
            checks.append((m.group(1), m.group(2), float(m.group(3))))
    return checks


@pytest.mark.parametrize("page", sorted(PAGES))
def test_script_passes(page, tmp_path_factory):
    r = run_page(page, tmp_path_factory)
    assert r.returncode == 0, f"doc/{page}.py failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    assert r.stdout.rstrip().endswith("all checks passed"), r.stdout


@pytest.mark.parametrize("page", sorted(PAGES))
def test_script_errors_are_small(page, tmp_path_factory):
    r = run_page(page, tmp_path_factory)
    checks = parse_checks(r.stdout)
    too_big = [f"[{tag}] {what}: max abs err {err:.2e} > {TOL[tag]:.0e}"
               for tag, what, err in checks if not err <= TOL[tag]]      # a NaN error is too big too
    assert not too_big, f"doc/{page}.py:\n" + "\n".join(too_big)
    names = [what for _, what, _ in checks]
    assert len(names) - len(set(names)) == PAGES[page]["repeated"], \
        f"doc/{page}.py: each NumPy check runs once in float64 and once in float32"
    expected = dict(PAGES[page]["sections"])
    if "[skip] emulator" in r.stdout:
        expected = dict(PAGES[page].get("without_emulator", dict(expected, cuda=0)))
    found = {s: sum(what.startswith(s + ":") for what in names) for s in expected}
    assert found == expected and sum(found.values()) == len(names), (found, names)


def test_checks_can_fail():
    """The parser reads an error that is too large as one (guards the regex against a format change)."""
    tag, what, err = parse_checks("[f32] cuda: backward dinp - old vs autograd      max abs err 2.50e-01")[0]
    assert (tag, what, err) == ("f32", "cuda: backward dinp - old vs autograd", 0.25) and err > TOL[tag]


# ---------------------------------------------------------------------------- quotes and citations

CITATION_RE = re.compile(r"\(([\w/.]+\.(?:py|cuh?)),\s+`?([A-Za-z_][\w.]*)`?\)")


def function_source(path, name):
    """The source lines of function (or class, or Class.method) `name` in the repo file `path`,
    or None if the file has no such function."""
    text = open(os.path.join(REPO, path)).read()
    if path.endswith(".py"):
        lines = text.split("\n")
        scopes = [ast.parse(text).body]
        for part in name.split("."):
            found = [n for body in scopes for n in body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part]
            if not found:
                return None
            node = found[0]
            scopes = [node.body]
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        return lines[first - 1:node.end_lineno]
    # .cu / .cuh: a __global__ or __device__ function, from its line to the brace that closes its body
    m = re.search(r"^[^\n]*\b(?:__global__|__device__)\b[^;{]*?\b" + re.escape(name) + r"\s*\(", text, re.M)
    if not m:
        return None
    depth, i = 0, text.index("{", m.end())
    while True:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[m.start():i + 1].split("\n")
        i += 1


def quote_inside(block, source):
    """True if the lines of `block` are consecutive lines of `source`, all shifted by one indent."""
    first = block[0]
    for i in range(len(source) - len(block) + 1):
        line = source[i]
        if not line.endswith(first) or line[:len(line) - len(first)].strip():
            continue
        indent = line[:len(line) - len(first)]
        if all((source[i + j] == indent + b) if b.strip() else not source[i + j].strip()
               for j, b in enumerate(block)):
            return True
    return False


def quoted_blocks(md_path):
    """(file, function, block lines) for each ```python / ```cuda block of a tutorial page, with the
    last citation in the 300 characters before it."""
    text = open(md_path).read()
    out = []
    for m in re.finditer(r"```(?:python|cuda)\n(.*?)```", text, re.S):
        refs = CITATION_RE.findall(text[max(0, m.start() - 300):m.start()])
        block = m.group(1).rstrip("\n").split("\n")
        out.append((*(refs[-1] if refs else (None, None)), block))
    return out


def stale_quotes(md_name):
    """The problems with the quotes and citations of doc/<md_name>, one line each."""
    md_path = os.path.join(DOC, md_name)
    text = open(md_path).read()
    problems = [f"doc/{md_name}: cites line numbers ({m.group(0)!r}), which drift; cite a function"
                for m in re.finditer(r"\blines? \d+(?:-\d+)?", text)]
    for path, name in CITATION_RE.findall(text):
        if not os.path.exists(os.path.join(REPO, path)):
            problems.append(f"doc/{md_name}: cites {path}, which does not exist")
        elif function_source(path, name) is None:
            problems.append(f"doc/{md_name}: cites ({path}, {name}), but {path} has no function {name}")
    for path, name, block in quoted_blocks(md_path):
        if path is None:
            problems.append(f"doc/{md_name}: a code block without a '(<file>, <function>)' citation just "
                            f"before it: {block[0].strip()!r}")
            continue
        if not os.path.exists(os.path.join(REPO, path)):
            continue                                         # reported above
        source = function_source(path, name)
        if source is not None and not quote_inside(block, source):
            problems.append(f"doc/{md_name}: the quote of ({path}, {name}) starting {block[0].strip()!r} "
                            f"({len(block)} lines) is no longer in {name}: refresh it and the text around it")
    return problems


@pytest.mark.parametrize("md_name", [p + ".md" for p in sorted(PAGES)])
def test_md_quotes_are_current(md_name):
    assert len(quoted_blocks(os.path.join(DOC, md_name))) >= 4
    problems = stale_quotes(md_name)
    assert not problems, "\n".join(problems)


def test_stale_quote_is_reported(tmp_path, monkeypatch):
    """A quote that no longer matches its function is named in the failure, with its citation."""
    (tmp_path / "doc").mkdir()
    (tmp_path / "m.py").write_text("def f(x):\n    y = x + 1\n    return y\n")
    (tmp_path / "doc" / "p.md").write_text(
        "ok (m.py, f):\n\n```python\n    y = x + 1\n```\n\nstale (m.py, f):\n\n```python\ny = x + 2\n```\n"
        "gone (m.py, g)\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "DOC", str(tmp_path / "doc"))
    problems = stale_quotes("p.md")
    assert len(problems) == 2, problems
    assert "m.py, g" in problems[0] and "the quote of (m.py, f) starting 'y = x + 2'" in problems[1]


def test_cu_function_source():
    src = function_source("kernels/common.cuh", "warp_sum")
    assert src[0].startswith("__device__ float warp_sum") and src[-1] == "}"


# ---------------------------------------------------------------------------- the reading order

def readme_stops():
    """(path, minutes, [(file, name)]) for each stop of doc/README.md."""
    text = open(os.path.join(DOC, "README.md")).read()
    stops = []
    parts = re.split(r"^### ", text, flags=re.M)[1:]
    for part in parts:
        head, _, body = part.partition("\n")
        m = re.match(r"\d+\. `([\w/.]+)`.*\(~(\d+) min[^)]*\)\s*$", head)
        assert m, f"doc/README.md: a stop heading without `path` and (~M min): {head!r}"
        path = m.group(1)
        refs = []
        for file, name in re.findall(r"`(?:([\w/.]+):)?([A-Za-z_][\w.]*)\(\)`", body):
            refs.append((file or path, name))
        stops.append((path, int(m.group(2)), refs))
    return stops


def test_readme_is_an_afternoon():
    stops = readme_stops()
    assert len(stops) >= 10
    minutes = sum(m for _, m, _ in stops)
    assert 150 <= minutes <= 330, f"doc/README.md adds up to {minutes} min"
    for path, _, _ in stops:
        assert os.path.exists(os.path.join(REPO, path)), f"doc/README.md: stop {path} does not exist"


def _readme_refs():
    try:
        stops = readme_stops()
    except (AssertionError, OSError):
        return []                          # test_readme_is_an_afternoon reports it
    refs = {}
    for _, _, rs in stops:
        for file, name in rs:
            refs.setdefault(file, []).append(name)
    return sorted(refs.items())


def defined_names(path):
    """Top-level functions, classes and names bound by import of a Python file."""
    tree = ast.parse(open(os.path.join(REPO, path)).read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


@pytest.mark.parametrize("file,names", _readme_refs(), ids=[f for f, _ in _readme_refs()])
def test_readme_functions_exist(file, names):
    full = os.path.join(REPO, file)
    assert os.path.isfile(full), f"doc/README.md names {file}, which is not a file"
    missing = []
    for name in names:
        if file.endswith(".py") and "." not in name:
            ok = name in defined_names(file)
        else:
            ok = function_source(file, name) is not None
        if not ok:
            missing.append(name)
    assert not missing, f"doc/README.md cites {', '.join(n + '()' for n in missing)} in {file}, which has none"
