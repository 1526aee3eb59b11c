"""dev/eval/export_hf.py: an llm.c model file -> a transformers GPT-2 directory. transformers' model gives
our logits (train_gpt2.gpt2_forward), the directory reads back into the same model file (through
train_gpt2_torch.py's Hugging Face loader and through export_hf's own inverse), the tokenizer files are
GPT-2's, a bad input or a full disk leaves nothing behind, and -o is replaced only when it holds an earlier
export and --overwrite is given."""

import json
import os

import numpy as np
import pytest

from conftest import TIKTOKEN_CACHE, run_main, run_script, write_tiny_model

pytest.importorskip("torch", reason="export_hf needs torch")
pytest.importorskip("transformers", reason="export_hf needs transformers")
pytest.importorskip("safetensors", reason="export_hf needs safetensors")
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import export_hf  # noqa: E402
import train_gpt2 as tg  # noqa: E402
from llmc import formats  # noqa: E402
from llmc.model import GPT2Config  # noqa: E402

# V=101 padded to 128: the export must cut wte back to its real rows
CONFIG = GPT2Config(max_seq_len=32, vocab_size=101, num_layers=2, num_heads=4, channels=32,
                    padded_vocab_size=128)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_hf")
    fp32, bf16 = str(d / "tiny.bin"), str(d / "tiny_bf16.bin")
    params = write_tiny_model(fp32, CONFIG, np.random.default_rng(0), 0.2)
    formats.write_model_file(bf16, CONFIG, params, dtype="bfloat16")
    return fp32, bf16


def our_logits(path, tokens):
    model = tg.GPT2(*formats.read_model_file(path))
    B, T = tokens.shape
    tg.gpt2_forward(model, tokens, None, B, T)
    return model.acts.logits[..., :CONFIG.vocab_size].copy()


def hf_logits(out_dir, tokens):
    hf = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("which, dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_hf_logits_equal_ours(files, tmp_path, which, dtype):
    path = files[0] if which == "fp32" else files[1]
    out = str(tmp_path / "hf")
    export_hf.export(path, out, dtype, quiet=True)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"]) == (101, 32, 2, 4, 32)
    assert cfg["tie_word_embeddings"] and cfg["activation_function"] == "gelu_new" and cfg["dtype"] == dtype
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        wte = f.get_tensor("transformer.wte.weight")
        assert tuple(wte.shape) == (101, 32) and wte.dtype == getattr(torch, dtype)       # unpadded
        assert tuple(f.get_tensor("transformer.h.0.mlp.c_fc.weight").shape) == (32, 128)  # Conv1D: (in, out)
    tokens = np.random.default_rng(1).integers(0, 101, size=(2, 32)).astype(np.int32)
    ours, theirs = our_logits(path, tokens), hf_logits(out, tokens)
    err = np.abs(ours - theirs).max()
    print(f"{which} -> {dtype}: max |HF - ours| = {err:.2e}, max |logit| = {np.abs(ours).max():.2f}")
    assert err < 1e-4 and np.abs(ours).max() > 0.5
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()     # tied


def test_bf16_export_of_fp32_rounds_like_the_bf16_file(files, tmp_path):
    """The default dtype: an fp32 file exported in bf16 holds what the bf16 model file holds."""
    out = str(tmp_path / "hf")
    r = run_script("dev/eval/export_hf.py", "-i", files[0], "-o", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tokenizer: not written (V=101 is not GPT-2's vocabulary)" in r.stdout
    config, params16 = formats.read_model_file(files[1])
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k).float().numpy() for k in f.keys()}
    np.testing.assert_array_equal(export_hf.llmc_params(config, sd), params16)


@pytest.mark.parametrize("which, dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_round_trip_through_train_gpt2_torch(files, tmp_path, monkeypatch, which, dtype):
    """Export, load the directory with train_gpt2_torch.GPT.from_pretrained (its --model gpt2 path, which
    only knows OpenAI's names: the test adds the directory's shape to its table), write the model file
    as train_gpt2_torch.py does: the same bytes as the input."""
    import train_gpt2_torch as tgt
    path = files[0] if which == "fp32" else files[1]
    out = str(tmp_path / "hf")
    export_hf.export(path, out, dtype, quiet=True)
    monkeypatch.setitem(tgt.PRETRAINED, out, dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=101))
    monkeypatch.setattr(tgt, "hf_reachable", lambda: False)
    model = tgt.GPT.from_pretrained(out)
    back = str(tmp_path / "back.bin")
    formats.write_model_file(back, tgt.llmc_config(model.config), tgt.flat_tensors(model), dtype)
    assert open(back, "rb").read() == open(path, "rb").read()
    # and through export_hf's own inverse, from the safetensors file
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k).float().numpy() for k in f.keys()}
    formats.write_model_file(back, CONFIG, export_hf.llmc_params(CONFIG, sd), dtype)
    assert open(back, "rb").read() == open(path, "rb").read()


@pytest.mark.parametrize("which, dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_round_trip_through_the_train_gpt2_torch_command(files, tmp_path, which, dtype):
    """`python train_gpt2_torch.py --model <exported dir>` writes gpt2_<shape>.bin and _bf16.bin from the
    directory's weights before it trains: the one in the export's precision is the input file, byte for byte."""
    path = files[0] if which == "fp32" else files[1]
    out = str(tmp_path / "hf")
    export_hf.export(path, out, dtype, quiet=True)
    formats.write_data_shard(str(tmp_path / "tokens.bin"), np.arange(64) % CONFIG.vocab_size)   # ids < V
    r = run_script("train_gpt2_torch.py", "--model", out, "--input_bin", str(tmp_path / "tokens.bin"),
                   "--batch_size", "1", "--sequence_length", "8", "--total_batch_size", "8", "--num_iterations", "1",
                   cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    written = tmp_path / ("gpt2_L2H4C32T32V101.bin" if which == "fp32" else "gpt2_L2H4C32T32V101_bf16.bin")
    assert written.read_bytes() == open(path, "rb").read()


def test_truncated_input_one_line_nothing_written(files, tmp_path):
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(open(files[0], "rb").read()[:-1000])
    out = tmp_path / "hf"
    r = run_script("dev/eval/export_hf.py", "-i", str(bad), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "truncated.bin" in r.stderr and "expected" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["truncated.bin"]          # no output, no temporary dir
    r = run_script("dev/eval/export_hf.py", "-i", str(tmp_path / "missing.bin"), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 1 and "no such file" in r.stderr and not out.exists()


def test_refuses_what_it_did_not_write(files, tmp_path, capsys):
    """-o holding anything an export does not hold, or a file, is refused in one line naming it and left
    as it was; an empty folder is fine."""
    user = tmp_path / "mine"
    (user / "data").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes")
    (user / "config.json").write_text("{}")                            # an export's name beside the user's files
    code, out, err = run_main(["-i", files[0], "-o", str(user), "--overwrite"], capsys, export_hf)
    assert code == 1 and err.strip().splitlines() == [
        f"error: -o {user}: holds data/, notes.txt, which no export holds, so it is not this program's to "
        "replace; nothing was written: export to a new or empty folder"]
    assert sorted(os.listdir(user)) == ["config.json", "data", "notes.txt"] and (user / "notes.txt").read_text() == "my notes"
    a_file = tmp_path / "hf_as_a_file"
    a_file.write_text("not a folder")
    code, out, err = run_main(["-i", files[0], "-o", str(a_file), "--overwrite"], capsys, export_hf)
    assert code == 1 and err.strip() == (f"error: -o {a_file}: is a file, not a folder, and not an export; "
                                         "nothing was written: export to a new or empty folder")
    assert a_file.read_text() == "not a folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_main(["-i", files[0], "-o", str(empty), "-d", "float32"], capsys, export_hf)
    assert code == 0, err
    assert sorted(os.listdir(empty)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "hf_as_a_file", "mine"]   # no temporary folder left


def test_overwrite_replaces_an_earlier_export_whole(files, tmp_path, capsys):
    out = tmp_path / "hf"
    export_hf.export(files[0], str(out), "float32", quiet=True)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"a shard of an older, sharded export")
    capsys.readouterr()                                               # transformers' progress bar
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    code, _, err = run_main(["-i", files[1], "-o", str(out)], capsys, export_hf)
    assert code == 1 and err.strip() == (f"error: -o {out}: holds an earlier export (config.json, "
                                         "generation_config.json, model-00001-of-00002.safetensors and 1 more); "
                                         "nothing was written: add --overwrite to replace it")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    code, stdout, err = run_main(["-i", files[1], "-o", str(out), "--overwrite"], capsys, export_hf)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"          # the new export's
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_disk_full_partway_one_line_and_the_earlier_export_kept(files, tmp_path, capsys, monkeypatch):
    """The weights' write stops with ENOSPC after 1000 bytes: one line, no folder under -o's name (nor a
    temporary one), and with --overwrite the earlier export as it was, byte for byte."""
    import errno
    import transformers.modeling_utils

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    earlier = tmp_path / "earlier"
    export_hf.export(files[0], str(earlier), "float32", quiet=True)
    before = {f: (earlier / f).read_bytes() for f in os.listdir(earlier)}
    capsys.readouterr()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    for out, extra, kept in ((tmp_path / "new", [], ""), (earlier, ["--overwrite"], "; an earlier export there is as it was")):
        code, _, err = run_main(["-i", files[0], "-o", str(out), *extra, "-d", "float32"], capsys, export_hf)
        line = err.strip().splitlines()[-1]                          # after the progress bars: one error line
        assert code == 1 and err.count("error:") == 1, err
        assert line.startswith(f"error: could not write {out}: the disk is full (stopped after ")
        assert line.endswith(f"; nothing was written under that name{kept}")
    assert not (tmp_path / "new").exists() and sorted(os.listdir(tmp_path)) == ["earlier"]
    assert {f: (earlier / f).read_bytes() for f in os.listdir(earlier)} == before


def test_gpt2_tokenizer_files(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken's gpt2 encoding is not available offline ({type(e).__name__}): set TIKTOKEN_CACHE_DIR")
    from transformers import AutoTokenizer
    config = GPT2Config(max_seq_len=16, vocab_size=50257, num_layers=1, num_heads=2, channels=16,
                        padded_vocab_size=50304)
    path = str(tmp_path / "tiny_gpt2_vocab.bin")
    write_tiny_model(path, config, np.random.default_rng(2), 0.02)
    out = str(tmp_path / "hf")
    export_hf.export(path, out, "float32", quiet=True)
    tok = AutoTokenizer.from_pretrained(out)
    for text in ["Hello world", "First Citizen:\nBefore we proceed any further, hear me speak.",
                 "  spaces,\ttabs and émojis 🤗 ünïcödé 1234567", "<|endoftext|> after"]:
        assert tok.encode(text) == enc.encode(text, allowed_special="all"), text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == 50256
    # OpenAI's own files, where the offline cache holds them: the same bytes / the same table
    bpe = os.path.join(TIKTOKEN_CACHE, "6d1cbeee0f20b3d9449abfede4726ed8212e3aee")
    encoder = os.path.join(TIKTOKEN_CACHE, "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
    if TIKTOKEN_CACHE and os.path.exists(bpe) and os.path.exists(encoder):
        assert open(os.path.join(out, "merges.txt"), "rb").read() == open(bpe, "rb").read()
        assert json.load(open(os.path.join(out, "vocab.json"))) == json.load(open(encoder))
