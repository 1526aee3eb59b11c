"""dev/data/prepro_text.py: text files -> llm.c shards. The shards' tokens equal tiktoken's encoding of the
stripped documents with an EOT before each, whatever the block and chunk sizes (the streaming cuts are
invisible); val takes the first --val_tokens, by default 10% of a small text; shards hold --shard_size
tokens; two runs write the same bytes; reading is chunked and memory flat; the DataLoader and train_gpt2.py
read the result; bad input or a full disk is one line and leaves nothing behind; a file under a shard's
name that is not a shard is never replaced."""

import glob
import hashlib
import os
import random
import re
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from llmc import formats
from llmc.dataloader import DataLoader
from llmc.utils import human_bytes
from conftest import REPO, TIKTOKEN_CACHE, disk_full_after, run_script

import prepro_text

EOT = 50256


@pytest.fixture(scope="module")
def enc():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def run(argv, capsys):
    """prepro_text.main in this process: (exit code, stdout, stderr)."""
    try:
        code = prepro_text.main([str(a) for a in argv])
    except SystemExit as e:                 # an error: one line "error: ..." on stderr, exit status 1
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err):
    """The one error line of a failed run (stderr may hold tqdm's bar before it)."""
    assert err.count("error:") == 1, err
    return err.strip().splitlines()[-1]


def shards(out_dir, name="text"):
    """[(split, index, tokens)] in index order (a plain sort would put train before val)."""
    found = []
    for fname in os.listdir(str(out_dir)):
        m = re.fullmatch(re.escape(name) + r"_(val|train)_(\d{6})\.bin", fname)
        if m:
            found.append((m[1], int(m[2]), np.array(formats.read_data_shard(os.path.join(str(out_dir), fname)))))
    found.sort(key=lambda s: s[1])
    assert [i for _, i, _ in found] == list(range(len(found))), "shard numbers must run 0, 1, 2, ..."
    return found


def all_tokens(out_dir, name="text"):
    return np.concatenate([t for _, _, t in shards(out_dir, name)]).tolist()


def reference(enc, docs):
    """What the shards must hold: EOT + tokens of each stripped, non-empty document."""
    out = []
    for d in docs:
        if d.strip():
            out += [EOT] + enc.encode_ordinary(d.strip())
    return out


def tricky_text(seed, n):
    """Text that stresses GPT-2's pre-tokenizer at every possible cut: runs of spaces and newlines,
    contractions, digits, punctuation, accented letters, CJK, emoji (4 UTF-8 bytes), tabs, \\r\\n, and
    characters that Python and Unicode may class differently as space."""
    rng = random.Random(seed)
    atoms = ["the", "cat", "'s", "'ll", "don't", " ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "\t", "\r\n",
             "42", "3.14", "!", "?!", "...", "--", "é", "naïve", "日本語", "😀", "🙂x", "a", "I", "(", ")", '"',
             "\u00a0", "\u3000", "\u2028", "\x0b", "\x1c", "\u200b", "\u0301"]  # other spaces, zero width, combining
    return "".join(rng.choice(atoms) for _ in range(n))


def write(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


# ----------------------------------------------------------------------------
# the tokens


def test_round_trip_files(tmp_path, capsys, enc):
    docs = ["  First file.\nIt has two lines.\n\n", tricky_text(1, 400), "Ünïcödé 😀 and\r\nCRLF\r\n", "x"]
    files = [write(tmp_path / f"doc{i}.txt", d) for i, d in enumerate(docs)]
    out = tmp_path / "out"
    code, stdout, err = run([*files, "-o", out, "-s", 64, "-v", 100, "--workers", 1], capsys)
    assert code == 0, err
    ref = reference(enc, docs)
    got = all_tokens(out)
    assert got == ref
    # decoded, the shards are the stripped documents, each after <|endoftext|>
    assert enc.decode(got) == "".join("<|endoftext|>" + d.strip() for d in docs)
    # EOT exactly at each document's start
    starts = np.cumsum([0] + [1 + len(enc.encode_ordinary(d.strip())) for d in docs[:-1]])
    assert np.flatnonzero(np.array(got) == EOT).tolist() == starts.tolist()
    assert f"{len(docs)} documents, {len(ref):,} tokens: 100 val, {len(ref) - 100:,} train" in stdout


def test_val_split_and_shard_boundaries(tmp_path, capsys, enc):
    text = tricky_text(2, 3000)
    f = write(tmp_path / "a.txt", text)
    ref = reference(enc, [text])
    n = len(ref)
    code, _, err = run([f, "-o", tmp_path / "o", "-n", "mine", "-s", 500, "-v", 1200, "--workers", 1], capsys)
    assert code == 0, err
    got = shards(tmp_path / "o", "mine")
    # val: 1200 tokens in shards of at most 500 (500, 500, 200), then train shards of 500, the last the rest
    sizes = [t.size for _, _, t in got]
    nval = 3
    assert [s for s, _, _ in got] == ["val"] * nval + ["train"] * (len(got) - nval)
    assert sizes[:nval] == [500, 500, 200]
    assert all(s == 500 for s in sizes[nval:-1]) and 0 < sizes[-1] <= 500
    assert sum(sizes) == n
    assert np.concatenate([t for s, _, t in got if s == "val"]).tolist() == ref[:1200]
    assert np.concatenate([t for s, _, t in got if s == "train"]).tolist() == ref[1200:]
    # file names as llm.c's fineweb.py: the number counts shards across both splits
    names = sorted(os.listdir(tmp_path / "o"))
    assert names[0] == "mine_train_000003.bin" and "mine_val_000000.bin" in names and "mine_val_000002.bin" in names
    # --val_tokens 0: no val split, train from shard 0
    code, _, err = run([f, "-o", tmp_path / "o0", "-s", 1e9, "-v", 0, "--workers", 1], capsys)
    assert code == 0, err
    assert [(s, i, t.size) for s, i, t in shards(tmp_path / "o0")] == [("train", 0, n)]


def test_paragraph_and_line_documents(tmp_path, capsys, enc):
    a = "Para one,\nline two.  \n\n\n  Para two\n \t \nPara three\n"
    b = "\n\nOnly para of b, no final newline"
    fa, fb = write(tmp_path / "a.txt", a), write(tmp_path / "b.txt", b)
    code, stdout, err = run([fa, fb, "-o", tmp_path / "p", "-d", "paragraph", "-v", 3, "--workers", 1], capsys)
    assert code == 0, err
    paras = ["Para one,\nline two.", "Para two", "Para three", "Only para of b, no final newline"]
    assert all_tokens(tmp_path / "p") == reference(enc, paras)
    assert "4 documents" in stdout
    code, stdout, err = run([fa, fb, "-o", tmp_path / "l", "-d", "line", "-v", 3, "--workers", 1], capsys)
    assert code == 0, err
    lines = [ln for ln in (a + "\n" + b).split("\n") if ln.strip()]
    assert all_tokens(tmp_path / "l") == reference(enc, lines) and f"{len(lines)} documents" in stdout


@pytest.mark.parametrize("doc", ["file", "paragraph"])
def test_streaming_cuts_are_invisible(tmp_path, capsys, enc, monkeypatch, doc):
    """Blocks of 7 bytes (UTF-8 characters split across reads) and pieces of ~50 characters give the
    same tokens as encoding each document whole."""
    text = tricky_text(3, 3000)
    f = write(tmp_path / "t.txt", text)
    monkeypatch.setattr(prepro_text, "BLOCK_BYTES", 7)
    code, _, err = run([f, "-o", tmp_path / "s", "-d", doc, "-v", 10, "--chunk_chars", 50, "--workers", 1], capsys)
    assert code == 0, err
    docs = [text] if doc == "file" else _paragraphs(text)
    assert all_tokens(tmp_path / "s") == reference(enc, docs)


def _paragraphs(text):
    paras, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    return paras + (["\n".join(cur)] if cur else [])


def test_cut_points(enc):
    """pieces() cuts a long document into parts near chunk_chars, and only where the tokens do not change."""
    text = tricky_text(4, 20000)
    parts = list(prepro_text.pieces([("doc", None), ("text", text)], 200))
    assert "".join(t for _, t in parts) == text and [s for s, _ in parts] == [True] + [False] * (len(parts) - 1)
    assert len(parts) > 50 and max(len(t) for _, t in parts) < 2000
    assert sum((enc.encode_ordinary(t) for _, t in parts), []) == enc.encode_ordinary(text)


# ----------------------------------------------------------------------------
# the files


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_deterministic(tmp_path, capsys):
    files = [write(tmp_path / f"{i}.txt", tricky_text(10 + i, 2000)) for i in range(4)]
    pattern = str(tmp_path / "*.txt")
    runs = [("1", 1, 1 << 20), ("2", 2, 1 << 20), ("3", 2, 300)]  # workers and task sizes differ, not the bytes
    for tag, workers, chunk in runs:
        code, _, err = run([pattern, "-o", tmp_path / tag, "-s", 700, "-v", 500, "--workers", workers,
                            "--chunk_chars", chunk], capsys)
        assert code == 0, err
    names = sorted(os.listdir(tmp_path / "1"))
    assert len(names) >= 4 and not [n for n in names if not n.endswith(".bin")]
    for tag, _, _ in runs[1:]:
        assert sorted(os.listdir(tmp_path / tag)) == names
        for n in names:
            assert sha(tmp_path / tag / n) == sha(tmp_path / "1" / n), (tag, n)
    # the same file through two globs is read once; the order is the globs', each one's matches sorted
    code, out, err = run([files[2], pattern, "-o", tmp_path / "dup", "--workers", 1, "-v", 1], capsys)
    assert code == 0 and "tokenizing 4 file(s)" in out, err


def test_streaming_memory_is_flat(tmp_path, capsys, monkeypatch):
    """Reads are at most BLOCK_BYTES, and the peak of Python allocations does not grow with the input."""
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def close(self):
            self.f.close()

    monkeypatch.setattr(prepro_text, "open", lambda p, m: Spy(real_open(p, m)), raising=False)
    monkeypatch.setattr(prepro_text, "BLOCK_BYTES", 1 << 13)
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "42", "\n", "\n\n", ",", "."]
    unit = " ".join(rng.choice(words) for _ in range(100_000))   # ~380 kB
    peaks = {}
    for copies in (1, 2, 8):   # the first run loads what a first run loads (tqdm, ...): not measured
        path = tmp_path / f"big{copies}.txt"
        with real_open(path, "w") as f:
            for _ in range(copies):
                f.write(unit)
        size = os.path.getsize(path)
        reads.clear()
        tracemalloc.start()
        # an explicit -v: the default split holds the first 327,680 tokens (640 KiB) until it can decide
        code, _, err = run([path, "-o", tmp_path / f"o{copies}", "-s", 20_000, "-v", 32768, "--workers", 1,
                            "--chunk_chars", 1 << 13], capsys)
        peaks[copies] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert code == 0, err
        assert reads and max(reads) == 1 << 13 and len(reads) >= size // (1 << 13)
        assert len(shards(tmp_path / f"o{copies}")) > 5
        print(f"{size:,} bytes of input: peak {peaks[copies]:,} bytes traced")
    big = 8 * len(unit)
    assert peaks[8] < big / 4, peaks                      # far below the input
    assert peaks[8] < 1.25 * peaks[2] + (1 << 18), peaks  # 4x the input, about the same peak


def test_stdin(tmp_path, enc):
    text = "from a pipe\n\nsecond paragraph\n"
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=TIKTOKEN_CACHE) if TIKTOKEN_CACHE else None
    r = subprocess.run([sys.executable, os.path.join(REPO, "dev", "data", "prepro_text.py"), "-", "-n", "piped",
                        "-d", "paragraph", "-v", "2"], cwd=tmp_path, input=text, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all_tokens(tmp_path / "data" / "piped", "piped") == reference(enc, text.split("\n\n"))
    assert "reading" in r.stderr and "B/s" in r.stderr   # the tqdm bar: bytes and rate


def test_dataloader_and_train_gpt2(tmp_path, capsys, enc):
    """The shards feed llmc's DataLoader and one step of train_gpt2.py on a d6 model made from scratch."""
    text = tricky_text(6, 4000)
    f = write(tmp_path / "t.txt", text)
    out = tmp_path / "d"
    code, _, err = run([f, "-o", out, "-s", 2000, "-v", 300, "--workers", 1], capsys)
    assert code == 0, err
    ref = np.array(reference(enc, [text]))
    loader = DataLoader(str(out / "text_train_*.bin"), B=2, T=16)
    x, y = loader.next_batch()
    assert x.ravel().tolist() == ref[300:332].tolist() and y.ravel().tolist() == ref[301:333].tolist()
    assert loader.num_tokens == ref.size - 300
    val = DataLoader(str(out / "text_val_*.bin"), B=1, T=32)
    assert val.next_batch()[0].ravel().tolist() == ref[:32].tolist()
    t0 = time.time()
    r = run_script("train_gpt2.py", "-i", out / "text_train_*.bin", "-j", out / "text_val_*.bin", "-e", "d6",
                   "-b", 1, "-t", 32, "-x", 1, "-v", 1, "-m", 1, "-s", 0, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"({ref.size - 300:,} tokens" in r.stdout and "(300 tokens" in r.stdout
    loss = float(r.stdout.split("train loss ")[1].split()[0])
    assert abs(loss - np.log(50257)) < 1.0, loss   # a fresh model: about ln V
    print(f"train_gpt2.py -e d6, 1 step: {time.time() - t0:.1f} s, loss {loss}")


# ----------------------------------------------------------------------------
# bad input


def test_errors(tmp_path, capsys):
    good = write(tmp_path / "good.txt", "Some text here, enough for a few tokens of train and val.")
    empty = write(tmp_path / "empty.txt", "  \n\t\n")
    out = tmp_path / "o"

    def fails(argv, *words):
        code, stdout, err = run([*argv, "-o", out, "--workers", 1], capsys)
        assert code == 1, (stdout, err)
        msg = err.strip().splitlines()[-1]
        for w in words:
            assert w in msg, msg
        assert not os.path.exists(out) or not os.listdir(out), os.listdir(out)  # nothing written
        return msg

    fails([str(tmp_path / "nothing" / "*.txt")], "no files match")
    fails([str(tmp_path / "missing.txt")], "missing.txt: no such file")
    fails([str(tmp_path)], "is a directory")
    fails([empty], "no text in")
    fails([good, "-v", 1000], "all of them val", "--val_tokens")
    fails([good, "-s", 0], "--shard_size")
    fails([good, "-s", 1.5], "whole numbers")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("plenty of good text first. " .encode() * 50 + "caf\xe9".encode("latin-1"))
    msg = fails([good, str(bad), "-s", 10, "-v", 5], "latin1.txt: not UTF-8", "byte 1,353")
    assert not glob.glob(str(out / "*.partial"))
    # an empty file among others: a warning, and the others' tokens
    code, stdout, err = run([good, empty, "-o", out, "-v", 3, "--workers", 1], capsys)
    assert code == 0 and "empty.txt: no text, skipped" in stdout + err
    assert len(shards(out)) == 2


def test_stale_shards_are_removed(tmp_path, capsys):
    f = write(tmp_path / "a.txt", tricky_text(7, 2000))
    out = tmp_path / "o"
    assert run([f, "-o", out, "-s", 100, "-v", 50, "--workers", 1], capsys)[0] == 0
    many = len(shards(out))
    keep = [out / "text_notes.bin", out / "text_x_val_000000.bin"]  # not this name's shards: left alone
    for k in keep:
        k.write_bytes(b"x")
    code, stdout, _ = run([f, "-o", out, "-s", 1000, "-v", 50, "--workers", 1], capsys)
    assert code == 0 and "removed" in stdout
    assert len(shards(out)) < many and all(k.exists() for k in keep)


# ----------------------------------------------------------------------------
# the default val split, and the batches it leaves


def words_text(nwords, seed):
    """nwords common words, one GPT-2 token each (with the space before): a text of about nwords tokens."""
    rng = random.Random(seed)
    words = "the of and a to in is you that it was for on are as with his they at be this have from".split()
    return " ".join(rng.choice(words) for _ in range(nwords))


@pytest.mark.parametrize("nwords", [13_000, 40_000])
def test_default_val_is_a_tenth_of_a_small_text(tmp_path, capsys, enc, nwords):
    """llm.c's 32,768 val tokens would refuse a 13K-token text and take 83% of a 40K one: the default is
    10% of them (rounded down), and the summary counts each split's batches of train_gpt2.py's B*T = 4*64."""
    text = words_text(nwords, nwords)
    ref = reference(enc, [text])
    ntok, nval = len(ref), len(ref) // 10
    assert 0.99 * nwords < ntok < 1.01 * nwords + 1
    f = write(tmp_path / "small.txt", text)
    code, out, err = run([f, "-o", tmp_path / "o", "--workers", 1], capsys)
    assert code == 0, err
    assert [(s, t.size) for s, _, t in shards(tmp_path / "o")] == [("val", nval), ("train", ntok - nval)]
    assert all_tokens(tmp_path / "o") == ref
    assert (f"1 documents, {ntok:,} tokens: {nval:,} val (the default: the smaller of 32,768 and 10% of the text), "
            f"{ntok - nval:,} train, in 2 shard(s)") in out
    assert f"val: {nval:,} tokens = {(nval - 1) // 256:,} batches of B*T = 4*64 (train_gpt2.py's default)" in out
    train = ntok - nval
    assert f"train: {train:,} tokens = {(train - 1) // 256:,} batches of B*T = 4*64 (train_gpt2.py's default)" in out
    print(out)
    if nwords == 13_000:   # standard input: the same split (decided at its end), the same bytes
        r = subprocess.run([sys.executable, os.path.join(REPO, "dev", "data", "prepro_text.py"), "-", "-o", "piped"],
                           cwd=tmp_path, input=text, env=dict(os.environ, TIKTOKEN_CACHE_DIR=TIKTOKEN_CACHE or ""),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        for name in os.listdir(tmp_path / "o"):
            assert sha(tmp_path / "piped" / name) == sha(tmp_path / "o" / name), name


def test_default_val_stops_at_its_maximum_mid_stream(tmp_path, capsys, enc, monkeypatch):
    """Once the text reaches 10 x the maximum, val is the maximum whatever follows: the held tokens are
    written out then, and the rest streams as before. (The maximum cut from 32,768 to 100.)"""
    monkeypatch.setattr("llmc.shards.VAL_MAX", 100)  # the writer's default split
    text = words_text(5_000, 3)
    ref = reference(enc, [text])
    f = write(tmp_path / "t.txt", text)
    code, out, err = run([f, "-o", tmp_path / "o", "-s", 700, "--chunk_chars", 500, "--workers", 1], capsys)
    assert code == 0, err
    got = shards(tmp_path / "o")
    assert [(s, t.size) for s, _, t in got][:2] == [("val", 100), ("train", 700)]
    assert all_tokens(tmp_path / "o") == ref and f"{len(ref):,} tokens: 100 val (the default" in out


def test_explicit_val_tokens_keep_their_meaning(tmp_path, capsys, enc):
    text = words_text(3_000, 4)
    f = write(tmp_path / "t.txt", text)
    code, out, err = run([f, "-o", tmp_path / "o", "-v", 32768, "--workers", 1], capsys)
    assert code == 1 and error_line(err) == (f"error: only {len(reference(enc, [text])):,} tokens, all of them val "
                                         "(--val_tokens 32,768); lower --val_tokens to leave some for train")
    code, out, err = run([f, "-o", tmp_path / "o", "-v", 2000, "--workers", 1], capsys)
    assert code == 0 and [t.size for _, _, t in shards(tmp_path / "o")][0] == 2000, err
    assert "2,000 val," in out and "(the default" not in out


def test_help_states_the_default_split(capsys):
    with pytest.raises(SystemExit):
        prepro_text.main(["--help"])
    assert "(default: the smaller of 32,768 and 10% of the text; 0: no val split)" in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------
# nothing lost: only its own shards are replaced or removed


def test_never_replaces_a_file_that_is_not_a_shard(tmp_path, capsys):
    f = write(tmp_path / "a.txt", words_text(3_000, 5))
    out = tmp_path / "o"
    out.mkdir()
    (out / "text_train_000001.bin").write_text("my own notes, under a shard's name")
    (out / "notes.txt").write_text("more notes")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    code, stdout, err = run([f, "-o", out, "--workers", 1], capsys)
    assert code == 1 and err.strip() == (
        f"error: {out / 'text_train_000001.bin'}: not an llm.c data shard (magic 20240520), so not this program's "
        "to replace; nothing was written: move it away, or choose another output folder (-o) or name")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, stdout, err = run([f, "-o", a_file, "--workers", 1], capsys)
    assert code == 1 and err.strip() == f"error: -o {a_file}: is a file, not a folder; nothing was written: choose another -o"
    # moved away: the run writes its shards beside notes.txt; run again over its own shards, the same bytes
    os.remove(out / "text_train_000001.bin")
    assert run([f, "-o", out, "--workers", 1], capsys)[0] == 0
    first = {n: sha(out / n) for n in os.listdir(out)}
    code, stdout, err = run([f, "-o", out, "--workers", 1], capsys)
    assert code == 0 and {n: sha(out / n) for n in os.listdir(out)} == first, err
    assert sorted(first) == ["notes.txt", "text_train_000001.bin", "text_val_000000.bin"]
    assert (out / "notes.txt").read_text() == "more notes"


def test_disk_full_partway_one_line_nothing_half_written(tmp_path, capsys, monkeypatch):
    """The third shard's write stops with ENOSPC: one line naming it, no shard of this run under its name
    (nor a staged one), and the earlier run's shards as they were."""
    f = write(tmp_path / "a.txt", words_text(3_000, 6))
    out = tmp_path / "o"
    assert run([f, "-o", out, "-s", 1000, "-v", 500, "--workers", 1], capsys)[0] == 0
    before = {n: sha(out / n) for n in os.listdir(out)}
    disk_full_after(monkeypatch, 2 * (1024 + 2 * 600) + 1024 + 100)    # two shards of 600 tokens, then 100 bytes
    code, stdout, err = run([f, "-o", out, "-s", 600, "-v", 600, "--workers", 1], capsys)
    assert code == 1 and error_line(err).startswith(
        f"error: could not write {out / 'text_train_000002.bin.partial'}: the disk is full "
        f"({human_bytes(1024 + 2 * 600)} needed, ")
    assert {n: sha(out / n) for n in os.listdir(out)} == before
