"""HellaSwag: dev/data/hellaswag.py writes llm.c's eval file byte for byte (the expected bytes are built
here from the layout in llm.c's data_common.py), llmc/hellaswag.py reads it back into llm.c's batches
(B/4 examples, 4 rows each, the mask one position left of the completion, llm.c's rank split), and
its score of a model, run by the NumPy trainer on those batches, equals a PyTorch scorer's that works
from the jsonl one example at a time, example by example. The script replaces only its own eval file,
and a full disk is one line that leaves no half file."""

import importlib.util
import json
import os
import struct

import numpy as np
import pytest

from conftest import REPO, disk_full_after, run_main, run_script, write_tiny_model
from llmc.model import GPT2Config, padded_vocab
from llmc.hellaswag import EvalLoader, completion_losses, read_evalfile, stat_losses
from llmc.utils import ConfigError, FormatError, human_bytes

SCRIPT = os.path.join("dev", "data", "hellaswag.py")

EXAMPLES = [  # the first is HellaSwag val's example 24, as llm.c's docstring shows it
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ctx": "The cat sat", "label": 0, "endings": ["on the mat.", "in a car", "quietly", "up"]},
]


@pytest.fixture(scope="module")
def enc():
    try:
        from llmc.tokenizer import gpt2_encoding
        return gpt2_encoding()
    except (SystemExit, ImportError) as e:
        pytest.skip(f"no GPT-2 tokenizer (tiktoken offline): {e}")


def write_jsonl(path, examples):
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    return str(path)


def make_bin(tmp_path, examples, name="hellaswag_val.bin"):
    """Run the prepro on `examples`: the path of the .bin it writes."""
    jsonl = write_jsonl(tmp_path / "in.jsonl", examples)
    r = run_script(SCRIPT, "--input", jsonl, "--data_dir", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return str(tmp_path / "out" / name)


def random_examples(n, seed):
    """n synthetic examples of a few words each (short enough for T=32), seeded."""
    words = ("the a dog cat man woman ran sat jumped over under table roof car quickly slowly red blue "
             "house tree river ball played with threw caught saw big small").split()
    rng = np.random.default_rng(seed)
    sentence = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return [{"ctx": sentence(rng.integers(3, 8)).capitalize(), "label": int(rng.integers(4)),
             "endings": [sentence(rng.integers(1, 6)) + "." for _ in range(4)]} for _ in range(n)]


# ----------------------------------------------------------------------------
# the file

def test_layout_byte_for_byte(tmp_path, enc):
    out = make_bin(tmp_path, EXAMPLES)
    body = b""
    longest = 0
    for i, ex in enumerate(EXAMPLES):
        ctx = enc.encode(ex["ctx"])
        endings = [enc.encode(" " + e) for e in ex["endings"]]
        # <START_EXAMPLE> <EXAMPLE_BYTES> <EXAMPLE_INDEX> <LABEL> <NUM_COMPLETIONS> <NUM><CONTEXT>, 4 x <NUM><ENDING>
        words = [65535, 0, i, ex["label"], 4, len(ctx)] + ctx
        for e in endings:
            words += [len(e)] + e
        words[1] = 2 * len(words)
        longest = max(longest, words[1])
        body += struct.pack(f"<{len(words)}H", *words)
    header = struct.pack("<256i", 20240522, 1, len(EXAMPLES), longest, *([0] * 252))
    assert open(out, "rb").read() == header + body
    assert longest == 106             # what llm.c's data_common.write_evalfile writes here (checked once)
    # a second run writes the same bytes
    (tmp_path / "again").mkdir()
    again = make_bin(tmp_path / "again", EXAMPLES)
    assert open(again, "rb").read() == header + body


def test_read_back_and_batches(tmp_path, enc):
    out = make_bin(tmp_path, EXAMPLES)
    examples = read_evalfile(out)
    for (label, ctx, endings), ex in zip(examples, EXAMPLES):
        assert label == ex["label"] and ctx.tolist() == enc.encode(ex["ctx"])
        assert [e.tolist() for e in endings] == [enc.encode(" " + e) for e in ex["endings"]]

    B, T = 9, 24                                     # two examples per batch, and a 9th row that stays empty
    loader = EvalLoader(out, B, T)
    assert (loader.num_examples, loader.num_batches) == (2, 1)
    inputs, targets, mask, labels = loader.batch(0)
    assert inputs.dtype == targets.dtype == labels.dtype == np.int32 and inputs.shape == mask.shape == (B, T)
    assert labels.tolist() == [3, 0]
    for j, ex in enumerate(EXAMPLES):
        ctx = enc.encode(ex["ctx"])
        for c, ending in enumerate(ex["endings"]):
            row, e = 4 * j + c, enc.encode(" " + ending)
            want_in = np.zeros(T, np.int32)
            want_in[:len(ctx) + len(e)] = ctx + e
            want_tg, want_mask = np.zeros(T, np.int32), np.zeros(T, np.uint8)
            want_tg[len(ctx) - 1:len(ctx) - 1 + len(e)] = e          # the last context token predicts e[0]
            want_mask[len(ctx) - 1:len(ctx) - 1 + len(e)] = 1
            np.testing.assert_array_equal(inputs[row], want_in)
            np.testing.assert_array_equal(targets[row], want_tg)
            np.testing.assert_array_equal(mask[row], want_mask)
    assert not inputs[8].any() and not mask[8].any()
    # B=4: one example per batch
    loader = EvalLoader(out, 4, T)
    assert loader.num_batches == 2 and [b[3].tolist() for b in loader] == [[3], [0]]


def test_rank_split_as_llmc(tmp_path, enc):
    exs = random_examples(5, seed=1)
    out = make_bin(tmp_path, exs)
    # llm.c: ceil(5/2) = 3 examples per process (rank 1 gets 2), ceil(3 / (B/4)) batches on every rank
    seen = []
    for rank in range(2):
        loader = EvalLoader(out, 8, 32, rank, 2)
        assert loader.num_batches == 2
        assert (loader.start_example_index, loader.end_example_index) == [(0, 3), (3, 5)][rank]
        batches = list(loader)
        for _, _, mask, labels in batches:
            seen += [int(v) for v in labels if v >= 0]
            for j, v in enumerate(labels):                           # a slot has a label iff it has tokens
                assert (v >= 0) == bool(mask[4 * j:4 * j + 4].any())
        if rank == 1:
            assert batches[1][3].tolist() == [-1, -1]                # the last batch: nothing left, all empty
    assert seen == [ex["label"] for ex in exs]
    with pytest.raises(ConfigError, match="5 examples for 6 processes"):
        EvalLoader(out, 8, 32, 0, 6)


def test_bad_input_one_line(tmp_path, enc):
    out = make_bin(tmp_path, EXAMPLES)
    with pytest.raises(ConfigError, match=r"batch size 3 is < 4 .* -h 0, or raise -b"):
        EvalLoader(out, 3, 64)
    longest = max(len(enc.encode(ex["ctx"])) + max(len(enc.encode(" " + e)) for e in ex["endings"]) for ex in EXAMPLES)
    assert longest == 20                                         # example 24: 9 context tokens + 11
    with pytest.raises(ConfigError, match="an example has 20 tokens.*needs T > 20, got -t 20"):
        EvalLoader(out, 4, 20)                                   # llm.c: context + completion < T
    EvalLoader(out, 4, 21)
    raw = bytearray(open(out, "rb").read())
    for offset, value, message in ((0, 1234, "bad magic 1234 .expected 20240522"),
                                   (4, 2, "unsupported version 2 .expected 1"),
                                   (12, 50, "header says the longest example has 50 bytes")):
        bad = tmp_path / f"bad{offset}.bin"
        bad.write_bytes(raw[:offset] + struct.pack("<i", value) + raw[offset + 4:])
        with pytest.raises(FormatError, match=message) as e:
            EvalLoader(str(bad), 4, 64)
        assert "\n" not in str(e.value) and "dev/data/hellaswag.py" in str(e.value)
    (tmp_path / "short.bin").write_bytes(raw[:-2])
    with pytest.raises(FormatError, match="example 1 says it has 44 bytes, past the end of the file"):
        EvalLoader(str(tmp_path / "short.bin"), 4, 64)
    with pytest.raises(FileNotFoundError, match="python dev/data/hellaswag.py"):
        EvalLoader(str(tmp_path / "missing.bin"), 4, 64)


def test_prepro_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(EXAMPLES[1]) + "\n" + json.dumps({"ctx": "x", "label": 5, "endings": list("abcd")}) + "\n")
    r = run_script(SCRIPT, "--input", bad, "--data_dir", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and f"{bad}:2:" in r.stderr
    assert not (tmp_path / "out" / "hellaswag_val.bin").exists()
    r = run_script(SCRIPT, "--input", tmp_path / "nope.jsonl", cwd=tmp_path)
    assert r.returncode == 1 and "no such file" in r.stderr
    # no network: a URL where nothing listens fails at once, in one line that says what to do
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = run_script(SCRIPT, "--data_dir", tmp_path / "dl", "--url", f"http://127.0.0.1:{port}/hellaswag_val.jsonl",
                   cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "could not download" in r.stderr and "--input" in r.stderr
    assert not os.listdir(tmp_path / "dl")                       # no half-written jsonl


def test_prepro_replaces_only_its_own_file(tmp_path, enc):
    """A file of another kind at hellaswag_val.bin stops the script in one line and stays; a re-run over
    its own file writes the same bytes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "hellaswag_val.bin").write_text("my notes")
    jsonl = write_jsonl(tmp_path / "in.jsonl", EXAMPLES)
    r = run_script(SCRIPT, "--input", jsonl, "--data_dir", out, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {out / 'hellaswag_val.bin'}: not an llm.c eval file (magic 20240522), so not this program's "
        "to replace; nothing was written: move it away, or choose another --data_dir")
    assert os.listdir(out) == ["hellaswag_val.bin"] and (out / "hellaswag_val.bin").read_text() == "my notes"
    os.remove(out / "hellaswag_val.bin")
    first = open(make_bin(tmp_path, EXAMPLES), "rb").read()
    assert open(make_bin(tmp_path, EXAMPLES), "rb").read() == first and os.listdir(out) == ["hellaswag_val.bin"]


def test_prepro_disk_full_partway(tmp_path, enc, capsys, monkeypatch):
    """The eval file's write stops with ENOSPC after 500 bytes: one line; the earlier file as it was."""
    dev = load_dev_script()
    jsonl = write_jsonl(tmp_path / "in.jsonl", EXAMPLES)
    earlier = open(make_bin(tmp_path, EXAMPLES), "rb").read()
    disk_full_after(monkeypatch, 500)
    code, stdout, err = run_main(["--input", jsonl, "--data_dir", str(tmp_path / "out")], capsys, dev)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: could not write {tmp_path / 'out' / 'hellaswag_val.bin'}: the disk is full "
                          f"({human_bytes(len(earlier))} needed, ")
    assert os.listdir(tmp_path / "out") == ["hellaswag_val.bin"] and open(tmp_path / "out" / "hellaswag_val.bin", "rb").read() == earlier


# ----------------------------------------------------------------------------
# scoring

def test_stat_losses_by_hand():
    B, T = 8, 6
    mask = np.zeros((B, T), np.uint8)
    losses = np.full((B, T), 100.0, np.float32)                  # unmasked positions must not count
    # example 0: row 1 has the lowest mean (1.0 over 3 tokens) but not the lowest sum (row 2: 1.5 over 1)
    for row, values in ((0, [2.0, 2.0]), (1, [1.0, 1.0, 1.0]), (2, [1.5]), (3, [3.0])):
        mask[row, 1:1 + len(values)] = 1
        losses[row, 1:1 + len(values)] = values
    # example 1: rows 4 and 6 tie at 0.5: the first wins, as llm.c's strict "<"
    for row, values in ((4, [0.5, 0.5]), (5, [0.7]), (6, [0.25, 0.75]), (7, [0.9])):
        mask[row, 2:2 + len(values)] = 1
        losses[row, 2:2 + len(values)] = values
    means = completion_losses(losses, mask, 2)
    np.testing.assert_allclose(means, [[2.0, 1.0, 1.5, 3.0], [0.5, 0.7, 0.5, 0.9]])
    assert stat_losses(losses, mask, np.array([1, 0])) == 2
    assert stat_losses(losses, mask, np.array([2, 2])) == 0
    assert stat_losses(losses, mask, np.array([1, -1])) == 1
    # an empty slot never counts, whatever its label (llm.c's "active")
    mask[4:] = 0
    assert stat_losses(losses, mask, np.array([1, 0])) == 1
    # the mean is a left-to-right float32 sum, as llm.c's loop
    rng = np.random.default_rng(0)
    losses = rng.random((8, 300), dtype=np.float32) * 10
    mask = (rng.random((8, 300)) < 0.7).astype(np.uint8)
    want = []
    for row in range(8):
        acc = np.float32(0)
        for t in range(300):
            if mask[row, t]:
                acc = np.float32(acc + losses[row, t])
        want.append(acc / np.float32(mask[row].sum()))
    assert completion_losses(losses, mask, 2).ravel().tolist() == want


def load_dev_script():
    spec = importlib.util.spec_from_file_location("dev_data_hellaswag", os.path.join(REPO, SCRIPT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_equals_pytorch_example_by_example(tmp_path, enc, capsys):
    """A 2-layer model with GPT-2's vocabulary: the NumPy trainer's forward on EvalLoader's packed
    batches, scored by stat_losses, against the PyTorch reference model scoring each jsonl example
    on its own (dev/data/hellaswag.py's scorer, llm.c's evaluate)."""
    import torch
    import train_gpt2
    import train_gpt2_torch
    torch.manual_seed(0)
    exs = random_examples(14, seed=2)
    out = make_bin(tmp_path, exs)
    config = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=2, num_heads=2, channels=32,
                        padded_vocab_size=padded_vocab(50257))
    model_path = tmp_path / "model.bin"
    write_tiny_model(model_path, config, np.random.default_rng(0), 0.3)

    # ours: 3 ranks, B=9 (2 examples and an idle row per batch), T=32
    B, T = 9, 32
    model = train_gpt2.gpt2_build_from_checkpoint(str(model_path))
    ours_means, ours_correct = {}, 0
    for rank in range(3):
        loader = EvalLoader(out, B, T, rank, 3)
        for i, (x, y, mask, labels) in enumerate(loader):
            train_gpt2.gpt2_forward(model, x, y, B, T)
            losses = train_gpt2.to_numpy(model.acts.losses)
            assert losses.shape == (B, T) and losses.dtype == np.float32
            ours_correct += stat_losses(losses, mask, labels)
            first = loader.start_example_index + i * loader.can_fit
            for j, mean in enumerate(completion_losses(losses, mask, len(labels))):
                if labels[j] >= 0:
                    ours_means[first + j] = mean
    assert sorted(ours_means) == list(range(len(exs)))

    # PyTorch, from the jsonl, one example at a time
    dev = load_dev_script()
    ref = train_gpt2_torch.model_from_file(str(model_path)).eval()
    ref_correct, margins = 0, []
    for n, ex in enumerate(exs):
        label, ctx, endings = dev.render_example(enc, ex["ctx"], ex["label"], ex["endings"])
        _, mean = dev.score_example(ref, ctx, endings, "cpu")
        np.testing.assert_allclose(ours_means[n], mean, rtol=2e-5, atol=1e-5, err_msg=f"example {n}")
        assert int(np.argmin(ours_means[n])) == int(np.argmin(mean)), f"example {n}"
        ref_correct += int(np.argmin(mean)) == label
        margins.append(np.sort(mean)[1] - np.sort(mean)[0])
    assert min(margins) > 1e-3                                   # no near-tie: the argmins really agree
    assert ours_correct == ref_correct
    assert 0 < ours_correct < len(exs)                           # a test that could tell right from wrong

    # and the dev script's own report (-m with an llm.c model file) says the same
    capsys.readouterr()
    dev.main(["--input", str(tmp_path / "in.jsonl"), "--data_dir", str(tmp_path / "out2"), "-m", str(model_path),
              "-d", "cpu"])
    n = len(exs)
    stdout = capsys.readouterr().out
    assert f"{n} acc: " in stdout and f"acc_norm: {ref_correct}/{n}={ref_correct / n:.4f}" in stdout
    assert open(tmp_path / "out2" / "hellaswag_val.bin", "rb").read() == open(out, "rb").read()


# ----------------------------------------------------------------------------
# the trainer's -h 1 (skipped until train_gpt2.py takes the flag)

def test_trainer_h1_prints_and_logs_the_score(tmp_path, enc, tiny_data, monkeypatch, capsys):
    """train_gpt2.py -h 1 with -l 0 (the weights never change): its HellaSwag line and main.log's eval
    line give the count stat_losses finds here for the same model on the same file."""
    import train_gpt2
    from conftest import run_main
    if "hellaswag_eval" not in train_gpt2.TRAIN_GPT2_C_DEFAULTS:
        pytest.skip("train_gpt2.py has no -h (hellaswag_eval) flag yet")
    exs = random_examples(16, seed=4)
    monkeypatch.chdir(tmp_path)
    path = make_bin(tmp_path, exs)
    os.makedirs(os.path.join("dev", "data", "hellaswag"))
    os.replace(path, os.path.join("dev", "data", "hellaswag", "hellaswag_val.bin"))
    config = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=1, num_heads=2, channels=32,
                        padded_vocab_size=padded_vocab(50257))
    write_tiny_model(tmp_path / "tiny.bin", config, np.random.default_rng(1), 0.3)
    B, T = 8, 32
    model = train_gpt2.gpt2_build_from_checkpoint("tiny.bin")
    want = 0
    for x, y, mask, labels in EvalLoader(os.path.join("dev", "data", "hellaswag", "hellaswag_val.bin"), B, T):
        train_gpt2.gpt2_forward(model, x, y, B, T)
        want += stat_losses(model.acts.losses, mask, labels)
    assert 0 < want < 16

    code, out, err = run_main([str(a) for a in ("-e", "tiny.bin", "-i", tiny_data, "-j", tiny_data, "-b", B, "-t", T,
                                                "-x", 1, "-l", 0.0, "-v", 1, "-m", 1, "-s", 0, "-h", 1, "-o", "log")],
                              capsys)
    assert code == 0, err
    assert f"HellaSwag: {want}/16 = {want / 16:f}" in out
    assert f"s:1 eval:{want / 16:.4f}" in open(os.path.join("log", "main.log")).read().splitlines()
    code, out, err = run_main(["-e", "tiny.bin", "-i", tiny_data, "-j", tiny_data, "-b", "3", "-t", str(T),
                               "-x", "1", "-h", "1"], capsys)
    assert code == 1 and "batch size 3 is < 4" in err
