"""dev/data/fineweb.py, offline: a small dataset laid out as the Hub's HuggingFaceFW/fineweb repository
(README.md naming the sample-10BT configuration, parquet files under sample/10BT/ with FineWeb's columns)
goes through the script's own datasets.load_dataset call. Its shards hold exactly tiktoken's encoding of the
documents in order, each after an EOT; shard 0 is val; every shard but the last has -s tokens, also where one
document spans several shards; streaming and downloading, one worker or two, give the same bytes."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from llmc import formats
from llmc.dataloader import DataLoader
from conftest import REPO, TIKTOKEN_CACHE


def need_datasets():
    """Skip (with the reason) where Hugging Face datasets, and so pyarrow, is not installed."""
    pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (pip install datasets)")
    pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install datasets)")

EOT = 50256
SHARD = 1000
README = """---
license: odc-by
configs:
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
# FineWeb, a few made-up documents in the Hub's layout (for tests/test_fineweb.py)
"""


def make_docs():
    rng = random.Random(0)
    words = "the of and a to in is you that it was for on are as with his they I at be this have from".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 250))) for _ in range(60)]
    docs[7] = ""                                                         # an empty document: EOT alone
    docs[11] = "Ünïcödé, 日本語 and 😀.\n\nA second paragraph.\n"
    docs[20] = " ".join(rng.choice(words) for _ in range(2600))          # longer than two shards
    return docs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    need_datasets()
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("fineweb_repo")
    docs = make_docs()
    (root / "sample" / "10BT").mkdir(parents=True)
    for k, part in enumerate((docs[:30], docs[30:])):
        n = len(part)
        table = pa.table({"text": part, "id": [f"<urn:uuid:{k}-{i}>" for i in range(n)],
                          "dump": ["CC-MAIN-2013-20"] * n, "url": ["http://example.com/"] * n,
                          "date": ["2013-05-18T07:24:47Z"] * n, "file_path": ["s3://commoncrawl/x.gz"] * n,
                          "language": ["en"] * n, "language_score": [0.9] * n, "token_count": [0] * n})
        pq.write_table(table, str(root / "sample" / "10BT" / f"{k:03d}_00000.parquet"))
    (root / "README.md").write_text(README)
    return root, docs


def fineweb(*args, cwd):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf"),
               HF_DATASETS_CACHE=str(cwd / "hf_datasets"), PYTHONDONTWRITEBYTECODE="1")
    if TIKTOKEN_CACHE:
        env["TIKTOKEN_CACHE_DIR"] = TIKTOKEN_CACHE
    return subprocess.run([sys.executable, os.path.join(REPO, "dev", "data", "fineweb.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def read_shards(out, name):
    files = sorted(os.listdir(out), key=lambda f: f[-10:])   # by number: val_000000 before train_000001
    assert all(f.startswith(name + "_") for f in files), files
    return files, [np.array(formats.read_data_shard(os.path.join(out, f))) for f in files]


def test_fineweb_shards(tmp_path, dataset):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    root, docs = dataset
    ref = []
    for d in docs:
        ref += [EOT] + enc.encode_ordinary(d)
    ntok = len(ref)
    nshards = -(-ntok // SHARD)

    r = fineweb("--dataset_path", root, "-s", SHARD, "-o", tmp_path / "out", "-w", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    files, shards = read_shards(tmp_path / "out", "fineweb")
    assert files == ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, nshards)]
    assert [s.size for s in shards] == [SHARD] * (nshards - 1) + [ntok - SHARD * (nshards - 1)]
    assert np.concatenate(shards).tolist() == ref
    assert f"{len(docs)} documents, {ntok:,} tokens in {nshards} shard(s)" in r.stdout
    assert "docs/s" in r.stderr  # tqdm's rate

    # the trainer's loader reads them: val is shard 0, train starts at token SHARD
    train = DataLoader(str(tmp_path / "out" / "fineweb_train_*.bin"), B=2, T=8)
    x, y = train.next_batch()
    assert x.ravel().tolist() == ref[SHARD:SHARD + 16] and y.ravel().tolist() == ref[SHARD + 1:SHARD + 17]
    assert train.num_tokens == ntok - SHARD
    assert DataLoader(str(tmp_path / "out" / "fineweb_val_*.bin"), B=1, T=8).next_batch()[0].ravel().tolist() == ref[:8]

    # streaming, one worker, -t edu: the same tokens under edu_fineweb_ names, byte for byte
    r = fineweb("--dataset_path", root, "-s", SHARD, "-o", tmp_path / "edu", "-w", 1, "--streaming", 1,
                "-t", "edu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    edu_files, _ = read_shards(tmp_path / "edu", "edu_fineweb")
    assert edu_files == ["edu_" + f for f in files]
    for f in files:
        assert (tmp_path / "edu" / ("edu_" + f)).read_bytes() == (tmp_path / "out" / f).read_bytes(), f

    # again into the same folder: its own shards are replaced (the same bytes), a shard of an earlier run
    # under this name that this run does not write is removed, the user's file stays
    first = {f: (tmp_path / "out" / f).read_bytes() for f in files}
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "fineweb_train_000099.bin").write_bytes(first[files[-1]])
    r = fineweb("--dataset_path", root, "-s", SHARD, "-o", tmp_path / "out", "-w", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"removed {tmp_path / 'out' / 'fineweb_train_000099.bin'}: a shard of an earlier run" in r.stdout
    assert sorted(os.listdir(tmp_path / "out")) == sorted(files + ["notes.txt"])
    assert {f: (tmp_path / "out" / f).read_bytes() for f in files} == first


def test_fineweb_errors(tmp_path):
    """Bad flags fail in one line before datasets is imported (so also where it is not installed)."""
    for args, words in [(["-t", "web"], "type must be one of edu, classic"),
                        (["-v", "1B"], "version one of 10B, 100B"),
                        (["-m", "llama-3"], "only gpt-2"),
                        (["-s", "0"], "-s 0"),
                        (["--dataset_path", tmp_path / "nope"], "no such file or folder")]:
        r = fineweb(*args, "-o", tmp_path / "o", cwd=tmp_path)
        assert r.returncode == 1, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, r.stderr)
        assert not (tmp_path / "o").exists()


def test_fineweb_never_replaces_a_file_that_is_not_a_shard(tmp_path):
    """A file under a shard's name that is not an llm.c shard stops the run in one line, before the
    dataset is loaded (so also where datasets is not installed); -o's files stay as they were."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "fineweb_val_000000.bin").write_text("my own file")
    (out / "notes.txt").write_text("mine")
    r = fineweb("-o", out, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {out / 'fineweb_val_000000.bin'}: not an llm.c data shard (magic 20240520), so not this "
        "program's to replace; nothing was written: move it away, or choose another output folder (-o) or name")
    assert sorted(os.listdir(out)) == ["fineweb_val_000000.bin", "notes.txt"]
    assert (out / "fineweb_val_000000.bin").read_text() == "my own file"


def test_fineweb_not_a_dataset(tmp_path):
    """A folder that is not a dataset: one line naming it."""
    need_datasets()
    (tmp_path / "empty").mkdir()
    r = fineweb("--dataset_path", tmp_path / "empty", "-o", tmp_path / "o", cwd=tmp_path)
    assert r.returncode == 1 and "empty: cannot load" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
