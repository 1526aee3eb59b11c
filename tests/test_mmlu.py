"""dev/data/mmlu.py: MMLU's csv files -> llm.c's eval file. The expected bytes are built here from the format's
description (llm.c's data_common.write_evalfile docstring: a 256-int32 header, then per example a uint16
stream) and llm.c's rendering of a question (dev/data/mmlu.py's render_example), with tiktoken directly, on a
hand-made set with the csv's awkward cases (quotes, commas and a line break inside a cell, non-ASCII text, an
answer that looks like a number or like "None"); then the trainers' EvalLoader must read the file back into
those tokens. Also the one-line errors."""

import struct
import tarfile

import numpy as np
import pytest

from conftest import run_script
from llmc.hellaswag import EvalLoader

SUBJECTS = {   # file name -> csv text (no header: question, A, B, C, D, the right letter)
    "b_subject_test.csv": 'What is 2+2?,3,4,5,6,B\n"A ""quoted"" question, with a comma",x,y,z,w,D\n',
    "a_subject_test.csv": '"Two lines:\nwhich one?",None,0.50,Zürich,élan,C\n',
}
# the same questions as llm.c's pandas would read them, in sorted file order: (question, answers, label)
QUESTIONS = [
    ("Two lines:\nwhich one?", ["None", "0.50", "Zürich", "élan"], 2),
    ("What is 2+2?", ["3", "4", "5", "6"], 1),
    ('A "quoted" question, with a comma', ["x", "y", "z", "w"], 3),
]


def expected_bytes(questions):
    """llm.c's eval file for these questions, from the format's description."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    streams = []
    for index, (question, answers, label) in enumerate(questions):
        ctx = enc.encode(f"Question: {question}\n\nAnswer:")
        body = [index, label, 4, len(ctx), *ctx]
        for answer in answers:
            tokens = enc.encode(" " + answer)
            body += [len(tokens), *tokens]
        nbytes = 2 * (len(body) + 2)                   # <START_EXAMPLE> and <EXAMPLE_BYTES> count too
        streams.append([65535, nbytes, *body])
    header = [20240522, 1, len(questions), max(s[1] for s in streams)] + [0] * 252
    return struct.pack("<256i", *header) + b"".join(struct.pack(f"<{len(s)}H", *s) for s in streams)


@pytest.fixture
def csv_dir(tmp_path):
    folder = tmp_path / "data" / "test"
    folder.mkdir(parents=True)
    for name, text in SUBJECTS.items():
        (folder / name).write_bytes(text.encode("utf-8"))
    return folder


def write(tmp_path, source):
    r = run_script("dev/data/mmlu.py", "--input", source, "--data_dir", tmp_path / "out", cwd=tmp_path)
    return r, tmp_path / "out" / "mmlu_test.bin"


def test_bytes_equal_llmc_writer_from_folder_and_tar(tmp_path, csv_dir):
    want = expected_bytes(QUESTIONS)
    r, out = write(tmp_path, csv_dir)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == want
    assert f"writing 3 examples to {out} ({len(want):,} bytes)" in r.stdout
    tar_path = tmp_path / "data.tar"                   # MMLU's own layout: data/test/<subject>_test.csv
    with tarfile.open(tar_path, "w") as tar:
        tar.add(tmp_path / "data", arcname="data")
    out.unlink()
    r, out = write(tmp_path, tar_path)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == want


def test_eval_loader_reads_it(tmp_path, csv_dir):
    """The trainers' loader (-h 1's) gives back each question's context and answers, 4 rows per question."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    r, out = write(tmp_path, csv_dir)
    assert r.returncode == 0, r.stderr
    loader = EvalLoader(str(out), B=8, T=32)
    assert (loader.num_examples, loader.num_batches) == (3, 2)
    rows = []
    for inputs, targets, mask, labels in loader:
        rows += [(inputs[i], targets[i], mask[i]) for i in range(8)]
    got_labels = [label for _, _, _, ls in loader for label in ls if label >= 0]
    assert got_labels == [label for _, _, label in QUESTIONS]
    for q, (question, answers, _) in enumerate(QUESTIONS):
        ctx = enc.encode(f"Question: {question}\n\nAnswer:")
        for a, answer in enumerate(answers):
            inputs, targets, mask = rows[4 * q + a]
            tokens = enc.encode(" " + answer)
            n, m = len(ctx), len(tokens)
            assert list(inputs[:n + m]) == ctx + tokens
            assert list(targets[n - 1:n - 1 + m]) == tokens              # the last context token predicts the answer
            assert np.flatnonzero(mask).tolist() == list(range(n - 1, n - 1 + m))


def test_too_short_T_is_one_line(tmp_path, csv_dir):
    from llmc.utils import ConfigError
    r, out = write(tmp_path, csv_dir)
    with pytest.raises(ConfigError, match=r"an example has \d+ tokens .* raise -t"):
        EvalLoader(str(out), B=4, T=8)


@pytest.mark.parametrize("text, line", [
    ("Q?,a,b,c,d,E\n",
     "bad_test.csv:1: expected 6 cells (question, answers A-D, the right letter), got 6 ending in ['E']"),
    ("Q?,a,b,c,d,A\nQ2?,a,b\n", "bad_test.csv:2: expected 6 cells (question, answers A-D, the right letter), got 3"),
])
def test_bad_row_is_one_line(tmp_path, text, line):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "bad_test.csv").write_text(text)
    r, out = write(tmp_path, tmp_path / "csv")
    assert r.returncode == 1
    assert r.stderr.strip().startswith(f"error: {line}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("make, line", [
    (lambda p: None, "error: --input {p}: no such file or folder"),
    (lambda p: p.write_text("not a tar"), "error: {p}: not a tar file"),
    (lambda p: p.mkdir(), "error: {p}: no csv files (of the test split) in it"),
])
def test_bad_input_is_one_line(tmp_path, make, line):
    source = tmp_path / "source"
    make(source)
    r, out = write(tmp_path, source)
    assert r.returncode == 1
    assert r.stderr.strip().startswith(line.format(p=source)), r.stderr
    assert not out.exists()


def test_offline_download_is_one_line(tmp_path):
    r = run_script("dev/data/mmlu.py", "--data_dir", tmp_path, "--url", "http://127.0.0.1:9/data.tar", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: could not download http://127.0.0.1:9/data.tar (ConnectionError); put a copy of the file at "
        f"{tmp_path / 'data.tar'} or run python dev/data/mmlu.py --input PATH/data.tar")


def test_loader_errors_name_mmlu_py(tmp_path, csv_dir):
    """A missing or damaged MMLU file names the script that writes it (HellaSwag's files keep theirs)."""
    from llmc.utils import FormatError
    missing = r"mmlu_test.bin: no such file; create it with python dev/data/mmlu.py$"
    with pytest.raises(FileNotFoundError, match=missing):
        EvalLoader(str(tmp_path / "mmlu_test.bin"), B=4, T=64)
    r, out = write(tmp_path, csv_dir)
    out.write_bytes(out.read_bytes()[:-2])
    with pytest.raises(FormatError, match=r"; re-run python dev/data/mmlu.py$"):
        EvalLoader(str(out), B=4, T=64)
