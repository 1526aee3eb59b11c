"""
Tiny shakespeare -> llm.c data shards, as llm.c's dev/data/tinyshakespeare.py does it:

  data/tinyshakespeare/input.txt                    downloaded once (char-rnn's copy)
  data/tinyshakespeare/tiny_shakespeare_val.bin     the first 32,768 GPT-2 tokens
  data/tinyshakespeare/tiny_shakespeare_train.bin   the other 305,260

  python prepro_tinyshakespeare.py                       # download (skipped if input.txt is there)
  python prepro_tinyshakespeare.py --input PATH/input.txt   # offline: use a local copy

Tokenization: split the text on blank lines ("\\n\\n"); every section starts with the
<|endoftext|> token (50256) and is followed by its GPT-2 tokens, encoded with "\\n\\n"
appended except for the last section (llm.c keeps this quirk for backwards compatibility).

Nothing lost: a re-run replaces its own .bin files (llm.c data shards), never a file of another kind
under their names, nor an input.txt with other text than --input's; either stops the run in one line
before it writes anything. A failed write (a full disk) is one line and leaves no half file.
"""

import argparse
import filecmp
import os
import sys

import numpy as np

from llmc.download import download
from llmc.formats import write_data_shard
from llmc.shards import refuse_foreign_shards
from llmc.tokenizer import gpt2_encoding
from llmc.utils import OutputInUse, one_line_errors, write_atomic

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
VAL_TOKENS = 32768


def fetch(data_dir, url, local_copy):
    """Put input.txt in data_dir: from `local_copy` if given, else download it unless it is there."""
    fname = os.path.join(data_dir, "input.txt")
    os.makedirs(data_dir, exist_ok=True)
    if local_copy:
        if not os.path.isfile(local_copy):
            raise SystemExit(f"--input {local_copy}: no such file")
        if os.path.lexists(fname) and not (os.path.isfile(fname) and filecmp.cmp(local_copy, fname, shallow=False)):
            raise OutputInUse(f"{fname}: already there with other text than --input {local_copy}, so not replaced; "
                              f"nothing was written: remove it to use {local_copy}, or choose another --data_dir")
        if not os.path.exists(fname):
            write_atomic(fname, [np.fromfile(local_copy, dtype=np.uint8)])
            print(f"copied {local_copy} to {fname}")
    elif os.path.exists(fname):
        print(f"{fname} already exists, skipping download")
    else:
        download(url, fname, "python prepro_tinyshakespeare.py --input PATH/input.txt")
    return fname


def tokenize(text):
    """llm.c's tokenization of tiny shakespeare: a list of GPT-2 token ids."""
    enc = gpt2_encoding()
    eot = enc.eot_token  # 50256, <|endoftext|>
    sections = text.split("\n\n")
    tokens = []
    for i, s in enumerate(sections):
        tokens.append(eot)
        # the last section gets no trailing "\n\n" (llm.c: kept for backwards compatibility)
        tokens.extend(enc.encode_ordinary(s + "\n\n" if i != len(sections) - 1 else s))
    return tokens


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description="tiny shakespeare -> llm.c GPT-2 token shards")
    p.add_argument("--input", default="", help="a local copy of input.txt (no download)")
    p.add_argument("--data_dir", default=os.path.join("data", "tinyshakespeare"), help="where the files go")
    p.add_argument("--url", default=URL, help="where to download input.txt from")
    args = p.parse_args(argv)

    outputs = {split: os.path.join(args.data_dir, f"tiny_shakespeare_{split}.bin") for split in ("val", "train")}
    refuse_foreign_shards(list(outputs.values()), "move it away, or choose another --data_dir")
    fname = fetch(args.data_dir, args.url, args.input)
    with open(fname, "r", encoding="utf-8") as f:
        text = f.read()
    tokens = np.array(tokenize(text), dtype=np.uint16)
    for split, part in (("val", tokens[:VAL_TOKENS]), ("train", tokens[VAL_TOKENS:])):
        write_data_shard(outputs[split], part)
        print(f"writing {len(part):,} tokens to {outputs[split]}")


if __name__ == "__main__":
    sys.exit(main())
