"""The README's commands run as written. The emulator example (README.md, "Without a GPU") is copied out of the
README, not restated here: its exporter command makes the tiny model the next two commands use, then the
CUDA trainer's test and a 10-step bf16 run go through the kernel emulator. `make data` is replaced by two
small shards at tiny shakespeare's paths (the prepro script has its own tests)."""

import os
import re
import shlex
import subprocess
import sys

import numpy as np

from conftest import REPO, TIKTOKEN_CACHE
from llmc import formats


def readme_block(after):
    """The commands of the first ```sh block after the line containing `after`, continuation lines joined,
    comments dropped."""
    text = open(os.path.join(REPO, "README.md")).read()
    block = text[text.index(after):].split("```sh\n", 1)[1].split("```", 1)[0]
    block = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_emulator_example_runs_as_written(tmp_path):
    commands = readme_block("**Without a GPU.**")
    assert commands[0].startswith("make data") and len(commands) == 4, commands
    exporter = commands[1]
    model = re.search(r"-e (\S+)", commands[3])[1]
    assert exporter.startswith("python train_gpt2_torch.py ") and model in commands[2]
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "data" / "tinyshakespeare")
    for split, n in (("val", 2000), ("train", 4000)):        # what `make data` writes, small
        formats.write_data_shard(str(tmp_path / "data" / "tinyshakespeare" / f"tiny_shakespeare_{split}.bin"),
                                 rng.integers(0, 50257, n))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TIKTOKEN_CACHE_DIR=TIKTOKEN_CACHE)
    outputs = []
    for command in commands[1:]:
        words = shlex.split(command)
        extra = {}
        while "=" in words[0]:                                # LLMC_EMULATE=1 python ...
            name, value = words.pop(0).split("=", 1)
            extra[name] = value
        assert words[0] == "python", command
        r = subprocess.run([sys.executable, os.path.join(REPO, words[1]), *words[2:]], cwd=tmp_path,
                           env=dict(env, **extra), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-2000:])
        outputs.append(r.stdout)
    assert os.path.exists(tmp_path / model)
    assert "overall okay: 1" in outputs[1]
    steps = re.findall(r"^step +(\d+)/10: train loss (\S+)", outputs[2], re.M)
    assert [int(s) for s, _ in steps] == list(range(1, 11)) and all(np.isfinite(float(x)) for _, x in steps)
    assert "precision: bf16 parameters, gradients and activations" in outputs[2]
    assert "genT = 16: the sequence length T (the default -g 64 is longer)" in outputs[2]
    assert outputs[2].count("generating:\n---\n") == 1                 # the sample of the last step


def test_the_reading_section_quotes_train_s_length():
    """README's "Reading the code" says how long train_gpt2.py's loop (train()) is; the number is the
    function's line count (docstring included), and at most 120, the bound that keeps it reading like
    train_gpt2.c's main()."""
    import ast
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("## Reading the code")[1].split("\n## ")[0]
    quoted = re.search(r"`train\(\)`, (\d+) lines", section)
    assert quoted, "README's reading section no longer says how many lines train() has"
    tree = ast.parse(open(os.path.join(REPO, "train_gpt2.py")).read())
    train = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    length = train.end_lineno - train.lineno + 1
    assert int(quoted.group(1)) == length <= 120, (quoted.group(1), length)
