"""The data scripts: tiny shakespeare gives llm.c's published token counts and sha256, offline
(--input) and with a failed download; TinyStories on a small archive of the same layout is
byte-identical run to run, with token counts computed here independently. Neither replaces a file
it did not write (a re-run over its own output works), and a full disk is one line, no half file."""

import hashlib
import json
import os
import random
import shutil
import socket
import tarfile

import numpy as np
import pytest

from llmc import formats
from conftest import SHARED, disk_full_after, file_size_as_read, run_main, run_script

SHAKESPEARE = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")
SHA256 = {  # from ../shared/data/README.md (llm.c's tokenization)
    "tiny_shakespeare_val.bin": "fe99db720dc7c83e694806d4e047a952909411da1daccde4ccc2e55f40882a62",
    "tiny_shakespeare_train.bin": "8a70606be574040c26d225694f5f9759973b419852d22f7fe5c118e1b359dcc8",
}


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def closed_port_url(name):
    """An http URL on localhost where nothing listens: the download fails at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/{name}"


# ----------------------------------------------------------------------------
# tiny shakespeare


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="no offline copy of tiny shakespeare")
def test_tinyshakespeare_offline(tmp_path):
    copy = tmp_path / "my_input.txt"
    shutil.copyfile(SHAKESPEARE, copy)
    r = run_script("prepro_tinyshakespeare.py", "--input", copy, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "writing 32,768 tokens" in r.stdout and "writing 305,260 tokens" in r.stdout
    out = tmp_path / "data" / "tinyshakespeare"
    assert (out / "input.txt").read_bytes() == copy.read_bytes()
    for name, digest in SHA256.items():
        assert sha256(out / name) == digest, name
    val = formats.read_data_shard(str(out / "tiny_shakespeare_val.bin"))
    train = formats.read_data_shard(str(out / "tiny_shakespeare_train.bin"))
    assert len(val) == 32768 and len(train) == 305260
    assert val[:8].tolist() == [50256, 5962, 22307, 25, 198, 8421, 356, 5120]
    assert int((np.asarray(val) == 50256).sum()) + int((np.asarray(train) == 50256).sum()) == 7222  # one per section
    # a second run finds input.txt in place (no download, no --input) and writes the same bytes
    r = run_script("prepro_tinyshakespeare.py", "--url", closed_port_url("input.txt"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "already exists, skipping download" in r.stdout
    for name, digest in SHA256.items():
        assert sha256(out / name) == digest, name


def test_tokenize_sections():
    """llm.c's quirk: every section after a blank line gets EOT first, all but the last get "\\n\\n"."""
    import tiktoken
    import prepro_tinyshakespeare
    enc = tiktoken.get_encoding("gpt2")
    got = prepro_tinyshakespeare.tokenize("A:\nhi\n\nB:\nho")
    assert got == [50256] + enc.encode_ordinary("A:\nhi\n\n") + [50256] + enc.encode_ordinary("B:\nho")


def test_tinyshakespeare_download_fails(tmp_path):
    url = closed_port_url("input.txt")
    r = run_script("prepro_tinyshakespeare.py", "--url", url, cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    msg = r.stderr.strip()
    assert "\n" not in msg, msg
    assert url in msg and os.path.join("data", "tinyshakespeare", "input.txt") in msg and "--input" in msg
    assert not os.path.exists(tmp_path / "data" / "tinyshakespeare" / "input.txt")  # no half file left
    assert [f for f in os.listdir(tmp_path / "data" / "tinyshakespeare")] == []


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="no offline copy of tiny shakespeare")
def test_no_tokenizer_files_offline(tmp_path):
    """An empty tiktoken cache and no way out (a proxy on a closed port): one line saying what to do,
    for the prepro script and the exporter alike."""
    proxy = closed_port_url("")
    formats.write_data_shard(str(tmp_path / "tokens.bin"), np.arange(1000) % 50257)
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy,
           "https_proxy": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    runs = [run_script("prepro_tinyshakespeare.py", "--input", SHAKESPEARE, cwd=tmp_path, env=env),
            run_script("train_gpt2_torch.py", "--model", "d6", "--input_bin", tmp_path / "tokens.bin",
                       cwd=tmp_path, env=env)]
    for r in runs:
        msg = r.stderr.strip()
        assert r.returncode == 1 and "\n" not in msg, msg
        assert "tiktoken could not load the gpt2 encoding" in msg and "TIKTOKEN_CACHE_DIR" in msg
    assert not os.path.exists(tmp_path / "data" / "tinyshakespeare" / "tiny_shakespeare_val.bin")


def test_tinyshakespeare_missing_input(tmp_path):
    r = run_script("prepro_tinyshakespeare.py", "--input", tmp_path / "nope.txt", cwd=tmp_path)
    assert r.returncode == 1 and "nope.txt" in r.stderr and "\n" not in r.stderr.strip()


SMALL_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


def test_tinyshakespeare_never_replaces_what_it_did_not_write(tmp_path):
    """A file under a shard's name that is not a shard, or an input.txt with other text than --input's,
    stops the run in one line before it writes anything; a re-run over its own output works."""
    text = tmp_path / "small.txt"
    text.write_text(SMALL_TEXT)
    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny_shakespeare_train.bin").write_text("my notes")
    r = run_script("prepro_tinyshakespeare.py", "--input", text, "--data_dir", data, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {data / 'tiny_shakespeare_train.bin'}: not an llm.c data shard (magic 20240520), so not this "
        "program's to replace; nothing was written: move it away, or choose another --data_dir")
    assert os.listdir(data) == ["tiny_shakespeare_train.bin"] and (data / "tiny_shakespeare_train.bin").read_text() == "my notes"
    os.remove(data / "tiny_shakespeare_train.bin")
    (data / "input.txt").write_text("my own text")
    r = run_script("prepro_tinyshakespeare.py", "--input", text, "--data_dir", data, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {data / 'input.txt'}: already there with other text than --input {text}, so not replaced; "
        f"nothing was written: remove it to use {text}, or choose another --data_dir")
    assert os.listdir(data) == ["input.txt"] and (data / "input.txt").read_text() == "my own text"
    os.remove(data / "input.txt")
    outputs = []
    for _ in range(2):                                        # the second run replaces the first's files
        r = run_script("prepro_tinyshakespeare.py", "--input", text, "--data_dir", data, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outputs.append({f: (data / f).read_bytes() for f in os.listdir(data)})
    assert outputs[0] == outputs[1] and sorted(outputs[0]) == ["input.txt", "tiny_shakespeare_train.bin",
                                                              "tiny_shakespeare_val.bin"]
    assert "copied" not in r.stdout                          # the same text: not copied again


def test_tinyshakespeare_disk_full_partway(tmp_path, capsys, monkeypatch):
    """The val shard's write stops with ENOSPC after 100 bytes: one line, and no half file; an earlier
    run's files are as they were."""
    import prepro_tinyshakespeare
    text = tmp_path / "small.txt"
    text.write_text(SMALL_TEXT)
    earlier, fresh = tmp_path / "earlier", tmp_path / "fresh"
    assert run_main(["--input", str(text), "--data_dir", str(earlier)], capsys, prepro_tinyshakespeare)[0] == 0
    before = {f: (earlier / f).read_bytes() for f in os.listdir(earlier)}
    # earlier: input.txt is there (not copied again); fresh: input.txt's copy is written first
    for data_dir, room, kept in ((earlier, 100, before), (fresh, text.stat().st_size + 100, {"input.txt": text.read_bytes()})):
        disk_full_after(monkeypatch, room)
        code, out, err = run_main(["--input", str(text), "--data_dir", str(data_dir)], capsys, prepro_tinyshakespeare)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: could not write {data_dir / 'tiny_shakespeare_val.bin'}: the disk is full (")
        assert {f: (data_dir / f).read_bytes() for f in os.listdir(data_dir)} == kept


# ----------------------------------------------------------------------------
# TinyStories on a small archive


def make_archive(tmp_path, nshards=4, per_shard=30):
    """A TinyStories_all_data.tar.gz in the real layout: data00.json ... each a list of {"story": ...}."""
    rng = random.Random(7)
    words = ["Once", "upon", "a", "time", "Lily", "saw", "a", "big", "red", "ball", "\u00e9t\u00e9", "dog", "sun",
             "happy", "and", "the", ".", ",", "!", "\n", "  "]
    src = tmp_path / "src"
    src.mkdir()
    shards = []
    for i in range(nshards):
        stories = [{"story": "  " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) + " \n",
                    "instruction": {"words": ["x"]}, "source": "test"} for _ in range(per_shard)]
        (src / f"data{i:02d}.json").write_text(json.dumps(stories))
        shards.append([s["story"] for s in stories])
    archive = tmp_path / "TinyStories_all_data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(nshards):
            tar.add(src / f"data{i:02d}.json", arcname=f"data{i:02d}.json")
    return archive, shards


def expected_tokens(stories, shard_index):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    stories = list(stories)
    random.Random(1337 + shard_index).shuffle(stories)
    out = []
    for s in stories:
        out += [50256] + enc.encode_ordinary(s.strip())
    return out


def test_tinystories_small_archive(tmp_path):
    archive, shards = make_archive(tmp_path)
    want_val = expected_tokens(shards[0], 0)
    want_train = sum((expected_tokens(s, i) for i, s in enumerate(shards) if i > 0), [])
    outputs = []
    for run in ("a", "b"):
        data_dir = tmp_path / run
        r = run_script("prepro_tinystories.py", "--archive", archive, "--data_dir", data_dir, "--workers", 2,
                       cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"writing {len(want_val):,} tokens" in r.stdout and f"writing {len(want_train):,} tokens" in r.stdout
        val, train = data_dir / "TinyStories_val.bin", data_dir / "TinyStories_train.bin"
        assert np.array_equal(formats.read_data_shard(str(val)), want_val)
        assert np.array_equal(formats.read_data_shard(str(train)), want_train)
        outputs.append((val.read_bytes(), train.read_bytes()))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][1]) == file_size_as_read(formats.read_data_shard, tmp_path / "a" / "TinyStories_train.bin",
                                                   tmp_path)
    # one worker gives the same bytes; the unpacked folder is reused (no archive needed)
    r = run_script("prepro_tinystories.py", "--data_dir", tmp_path / "a", "--workers", 1,
                   "--url", closed_port_url("x.tar.gz"), cwd=tmp_path)
    assert r.returncode == 0 and "skipping download" in r.stdout, r.stderr[-2000:]
    assert (tmp_path / "a" / "TinyStories_train.bin").read_bytes() == outputs[0][1]


def test_tinystories_never_replaces_what_it_did_not_write(tmp_path):
    """A file under an output's name that is not a shard stops the run before it unpacks; a folder of the
    user's named like the unpacking's temporary one is left alone."""
    archive, _ = make_archive(tmp_path, nshards=2, per_shard=3)
    data = tmp_path / "ts"
    (data / "TinyStories_all_data.tmp" / "mine").mkdir(parents=True)
    (data / "TinyStories_all_data.tmp" / "mine" / "notes.txt").write_text("mine")
    (data / "TinyStories_val.bin").write_text("not a shard")
    r = run_script("prepro_tinystories.py", "--archive", archive, "--data_dir", data, "--workers", 1, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {data / 'TinyStories_val.bin'}: not an llm.c data shard (magic 20240520), so not this "
        "program's to replace; nothing was written: move it away, or choose another --data_dir")
    assert sorted(os.listdir(data)) == ["TinyStories_all_data.tmp", "TinyStories_val.bin"]
    os.remove(data / "TinyStories_val.bin")
    r = run_script("prepro_tinystories.py", "--archive", archive, "--data_dir", data, "--workers", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(data)) == ["TinyStories_all_data", "TinyStories_all_data.tmp", "TinyStories_train.bin",
                                        "TinyStories_val.bin"]
    assert (data / "TinyStories_all_data.tmp" / "mine" / "notes.txt").read_text() == "mine"


def test_tinystories_download_fails(tmp_path):
    url = closed_port_url("TinyStories_all_data.tar.gz")
    r = run_script("prepro_tinystories.py", "--url", url, "--data_dir", tmp_path / "ts", cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    msg = r.stderr.strip()
    assert "\n" not in msg and url in msg and "--archive" in msg, msg
    assert os.listdir(tmp_path / "ts") == []


def test_tinystories_bad_archive(tmp_path):
    bad = tmp_path / "TinyStories_all_data.tar.gz"
    bad.write_bytes(b"not a tarball")
    r = run_script("prepro_tinystories.py", "--archive", bad, "--data_dir", tmp_path / "ts", cwd=tmp_path)
    assert r.returncode == 1
    msg = r.stderr.strip()
    assert "\n" not in msg and str(bad) in msg, msg
    assert os.listdir(tmp_path / "ts") == []  # no half-unpacked folder
