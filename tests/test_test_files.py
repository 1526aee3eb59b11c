"""Two rules for the test files themselves (CONTRIBUTING.md): they import through pytest.ini's pythonpath,
never editing sys.path at module level, and no module-level random generator feeds their tests (each test
seeds its own, so its data do not depend on which tests ran before it). Child scripts inside strings are
not module-level statements and may set their own path."""

import ast
import glob
import os

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
FILES = sorted(glob.glob(os.path.join(TESTS, "*.py")))


def module_statements(path):
    with open(path) as f:
        return ast.parse(f.read(), path).body


def offending_lines(path, is_bad):
    """Line numbers of the module-level statements (and the bodies of module-level if/for/with) with code that
    is_bad: is_bad(source) on each attribute and call in them (the text of a string is not code)."""
    found, todo = [], list(module_statements(path))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue                                  # runs when called, not when the module loads
        if isinstance(node, (ast.If, ast.For, ast.With, ast.Try)):
            todo.extend(node.body + getattr(node, "orelse", []))
        elif any(is_bad(ast.unparse(n)) for n in ast.walk(node) if isinstance(n, (ast.Attribute, ast.Call))):
            found.append(node.lineno)
    return sorted(found)


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_no_module_level_sys_path_edit(path):
    lines = offending_lines(path, lambda src: "sys.path" in src)
    assert lines == [], f"{os.path.basename(path)}:{lines}: edits sys.path; pytest.ini's pythonpath has the folder"


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_no_module_level_random_generator(path):
    lines = offending_lines(path, lambda src: "default_rng(" in src or "np.random.seed(" in src
                            or "RandomState(" in src)
    assert lines == [], f"{os.path.basename(path)}:{lines}: a generator shared by the tests; seed one in each test"


def test_the_rules_can_fail(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("import sys\nimport numpy as np\nsys.path.insert(0, '..')\nif True:\n    rng = np.random.default_rng(1)\n"
                   "SCRIPT = '''\nsys.path.insert(0, 'x')\n'''\n")
    assert offending_lines(str(bad), lambda src: "sys.path" in src) == [3]
    assert offending_lines(str(bad), lambda src: "default_rng(" in src) == [5]
