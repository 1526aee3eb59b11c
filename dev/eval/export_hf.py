"""
Export an llm.c model file to a Hugging Face `transformers` GPT-2 directory (llm.c's dev/eval/export_hf.py).

  python dev/eval/export_hf.py -i gpt2_d12.bin -o gpt2_d12_hf                 # bfloat16, as llm.c
  python dev/eval/export_hf.py -i log/model_00040.bin -o my_gpt2 -d float32

then, in Python:

  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained("gpt2_d12_hf")
  tokenizer = AutoTokenizer.from_pretrained("gpt2_d12_hf")

The input is any llm.c model file (version 3 fp32 or version 5 bf16, the vocabulary padded to Vp rows).
The output directory holds model.safetensors (wte cut back to its V real rows; lm_head is wte, tied,
stored once), config.json, generation_config.json and, for GPT-2's vocabulary, the tokenizer:
vocab.json and merges.txt (GPT-2's byte-level BPE, rebuilt from tiktoken's ranks, so it works offline
with TIKTOKEN_CACHE_DIR) and the tokenizer.json / tokenizer_config.json transformers writes from them.
Two layouts differ: llm.c (like nn.Linear) stores a matmul weight as (out, in); Hugging Face's GPT-2
uses OpenAI's Conv1D, which stores (in, out), so qkvw, attprojw, fcw and fcprojw are transposed.

--dtype bfloat16 (the default, as llm.c) or float32: the precision of the saved weights. The directory
is written under a temporary name beside it and renamed into place at the end, so an error (a full
disk) leaves no half-written export, and an earlier one stays as it was. -o must be a new or empty
folder, or an earlier export (only the files in EXPORT_FILES) with --overwrite, which replaces it whole,
at the end; a folder holding anything else, or a file, is refused in one line and left alone.
llm.c's --push (to the Hub) and --spin (a sample) need a network or a GPU; here sample with
dev/sample.py, or with transformers as above.
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from llmc.formats import read_model_file  # noqa: E402
from llmc.model import param_shapes
from llmc.utils import OutputInUse, WriteError, write_failure, foreign_entries, one_line_errors, some_names  # noqa: E402

GPT2_VOCAB, EOT = 50257, 50256
# llm.c's four matmul weights and their Hugging Face names (Conv1D: stored (in, out), the transpose of ours)
CONV1D = {"qkvw": "attn.c_attn", "attprojw": "attn.c_proj", "fcw": "mlp.c_fc", "fcprojw": "mlp.c_proj"}
# every file an export holds: transformers' weights (one file, or shards and their index), the two configs,
# and the tokenizer (vocab.json and merges.txt, and what GPT2Tokenizer.save_pretrained adds, by version)
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json"}
WEIGHT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
PER_LAYER = {"ln1w": "ln_1.weight", "ln1b": "ln_1.bias", "qkvb": "attn.c_attn.bias", "attprojb": "attn.c_proj.bias",
             "ln2w": "ln_2.weight", "ln2b": "ln_2.bias", "fcb": "mlp.c_fc.bias", "fcprojb": "mlp.c_proj.bias",
             **{k: v + ".weight" for k, v in CONV1D.items()}}


def named_tensors(config, params):
    """llm.c's 16 tensors as named views into the flat parameters (checkpoint order)."""
    out, offset = {}, 0
    for name, shape in param_shapes(config):
        n = int(np.prod(shape))
        out[name] = params[offset:offset + n].reshape(shape)
        offset += n
    return out


def hf_state_dict(config, params, progress=None):
    """Hugging Face GPT2LMHeadModel's parameters (NumPy float32) from llm.c's flat ones: wte's pad rows
    dropped, the Conv1D weights transposed to (in, out), lm_head left out (transformers ties it to wte)."""
    w = named_tensors(config, params)
    sd = {"transformer.wte.weight": w["wte"][:config.vocab_size],   # (Vp, C) -> (V, C)
          "transformer.wpe.weight": w["wpe"]}                       # (maxT, C)
    for l in range(config.num_layers):
        for ours, theirs in PER_LAYER.items():
            x = w[ours][l]
            sd[f"transformer.h.{l}.{theirs}"] = x.T if ours in CONV1D else x     # (out, in) -> (in, out)
        if progress:
            progress.update(1)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = w["lnfw"], w["lnfb"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def llmc_params(config, state_dict):
    """The inverse of hf_state_dict: llm.c's flat float32 parameters (wte zero-padded to Vp rows) from a
    Hugging Face GPT-2 state dict (NumPy arrays or tensors as float32)."""
    params = np.zeros(sum(int(np.prod(s)) for _, s in param_shapes(config)), dtype=np.float32)
    w = named_tensors(config, params)
    w["wte"][:config.vocab_size] = state_dict["transformer.wte.weight"]
    w["wpe"][...] = state_dict["transformer.wpe.weight"]
    for l in range(config.num_layers):
        for ours, theirs in PER_LAYER.items():
            x = np.asarray(state_dict[f"transformer.h.{l}.{theirs}"])
            w[ours][l] = x.T if ours in CONV1D else x
    w["lnfw"][...], w["lnfb"][...] = state_dict["transformer.ln_f.weight"], state_dict["transformer.ln_f.bias"]
    return params


def hf_config(config, dtype):
    from transformers import GPT2Config
    gpt2_vocab = config.vocab_size == GPT2_VOCAB
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.channels,
                      n_layer=config.num_layers, n_head=config.num_heads, n_inner=4 * config.channels,
                      activation_function="gelu_new",            # GELU's tanh approximation, as llm.c
                      layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=EOT if gpt2_vocab else None, eos_token_id=EOT if gpt2_vocab else None,
                      tie_word_embeddings=True, architectures=["GPT2LMHeadModel"], dtype=dtype)


# ----------------------------------------------------------------------------
# the tokenizer: GPT-2's vocab.json and merges.txt, rebuilt from tiktoken's byte-level BPE ranks

def byte_to_unicode():
    """GPT-2's printable stand-in for each byte: the 188 bytes that print (and are not a space) stand for
    themselves; the others, in order, get the characters from U+0100 on. vocab.json and merges.txt
    spell tokens with these characters."""
    keep = [b for b in range(256) if ord("!") <= b <= ord("~") or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_split(token, ranks):
    """The two tokens whose merge made `token` (bytes): byte-pair encoding of it with only the merges
    ranked before its own, which must stop at exactly two parts."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, f"token {token!r} does not split into two earlier tokens"
    return parts


def gpt2_vocab_and_merges(enc):
    """(vocab {spelled token: id}, merges ["a b", ...] in rank order) of a tiktoken GPT-2 encoding: what
    OpenAI's encoder.json and vocab.bpe hold."""
    ranks = enc._mergeable_ranks                                  # {token bytes: id}, ids 0..50255
    spell = byte_to_unicode()
    text = lambda b: "".join(spell[x] for x in b)                 # noqa: E731
    vocab = {text(b): r for b, r in ranks.items()}
    vocab["<|endoftext|>"] = enc.eot_token
    merges = [" ".join(text(p) for p in bpe_split(b, ranks))
              for b, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(b) > 1]
    return vocab, merges


def write_tokenizer(out_dir):
    """GPT-2's tokenizer files into out_dir; returns a line saying what was written (or why not)."""
    try:
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no cache and no network
        return (f"tokenizer: not written (tiktoken could not load gpt2: {type(e).__name__}); "
                f"set TIKTOKEN_CACHE_DIR to a filled cache, or use the stock one: AutoTokenizer.from_pretrained('gpt2')")
    vocab, merges = gpt2_vocab_and_merges(enc)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import GPT2Tokenizer
    tok = GPT2Tokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tok.model_max_length = 1024
    tok.save_pretrained(out_dir)
    return f"tokenizer: GPT-2's byte-level BPE ({len(vocab)} tokens, {len(merges)} merges)"


# ----------------------------------------------------------------------------
# the export

def is_export_file(path):
    name = os.path.basename(path)
    return name in EXPORT_FILES or WEIGHT_SHARD.fullmatch(name) is not None


def check_output(output_dir, overwrite):
    """Refuse (OutputInUse, one line) an -o that is a file, a folder holding anything an export does not
    hold, or an earlier export without --overwrite. A new or empty folder is fine."""
    if os.path.lexists(output_dir) and (not os.path.isdir(output_dir) or os.path.islink(output_dir)):
        raise OutputInUse(f"-o {output_dir}: is a file, not a folder, and not an export; nothing was written: "
                          f"export to a new or empty folder")
    found = foreign_entries(output_dir, is_export_file)
    if found:
        raise OutputInUse(f"-o {output_dir}: holds {some_names(found)}, which no export holds, so it is not this "
                          f"program's to replace; nothing was written: export to a new or empty folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise OutputInUse(f"-o {output_dir}: holds an earlier export ({some_names(sorted(os.listdir(output_dir)))}); "
                          f"nothing was written: add --overwrite to replace it")


def folder_bytes(folder):
    return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())


def export(input_path, output_dir, dtype="bfloat16", tokenizer=True, quiet=False, overwrite=False):
    """Write the Hugging Face directory for the model file `input_path` (atomically). An -o that holds
    anything is refused (check_output) unless it is an earlier export and `overwrite` is set."""
    t0 = time.perf_counter()
    check_output(output_dir, overwrite)                        # first: nothing to read when -o is refused
    config, params = read_model_file(input_path)               # then: a bad file fails before torch loads
    import torch
    from safetensors import SafetensorError
    from tqdm import tqdm
    from transformers import GenerationConfig, GPT2LMHeadModel

    V, Vp = config.vocab_size, config.padded_vocab_size
    say = (lambda *a: None) if quiet else print
    say(f"{input_path}: L={config.num_layers} NH={config.num_heads} C={config.channels} maxT={config.max_seq_len} "
        f"V={V} (padded {Vp}) -> {output_dir} in {dtype}")
    with tqdm(total=config.num_layers, desc="converting layers", unit="layer", disable=quiet) as bar:
        sd = hf_state_dict(config, params, bar)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    hf_conf = hf_config(config, dtype)
    with torch.device("meta"):
        model = GPT2LMHeadModel(hf_conf)                         # shapes only: no random init to pay for
    tensors = {k: torch.from_numpy(v).to(torch_dtype) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()                                          # lm_head is wte
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    model.eval()

    out = os.path.abspath(output_dir)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        GenerationConfig(bos_token_id=hf_conf.bos_token_id, eos_token_id=hf_conf.eos_token_id).save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)                           # mkdtemp's 0700: as a plain mkdir would
        note = write_tokenizer(tmp) if tokenizer and V == GPT2_VOCAB else \
            "tokenizer: not written (" + ("--tokenizer 0)" if not tokenizer else f"V={V} is not GPT-2's vocabulary)")
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        check_output(output_dir, overwrite)                      # again: -o may have changed meanwhile
        if os.path.exists(out):                                  # replace an earlier export only now
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(os.path.join(old, "x"), out)           # the earlier export back in its place
                os.rmdir(old)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except (OSError, SafetensorError) as e:                      # a full disk, no permission: one line
        if isinstance(e, OutputInUse):
            raise
        if not isinstance(e, OSError):                           # safetensors' own: "... (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            e = OSError(int(code[1]) if code else 0, str(e))
        kept = "; an earlier export there is as it was" if os.path.exists(out) else ""
        raise WriteError(f"{write_failure(out, e, folder_bytes(tmp), None)}; nothing was written under "
                         f"that name{kept}") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    say(note)
    say(f"wrote {out} ({size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s): "
        f"AutoModelForCausalLM.from_pretrained({output_dir!r})")
    return out


@one_line_errors
def main(argv=None):
    ap = argparse.ArgumentParser(description="Export an llm.c model file to a Hugging Face GPT-2 directory.")
    ap.add_argument("--input", "-i", required=True, help="llm.c model file (.bin, fp32 or bf16)")
    ap.add_argument("--output", "-o", required=True, help="the directory to write")
    ap.add_argument("--dtype", "-d", default="bfloat16", choices=("bfloat16", "float32"),
                    help="precision of the saved weights (llm.c's default: bfloat16)")
    ap.add_argument("--tokenizer", type=int, default=1, choices=(0, 1), help="also write GPT-2's tokenizer files")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier export at -o (nothing else)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    export(args.input, args.output, args.dtype, bool(args.tokenizer), overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
