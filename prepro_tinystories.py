"""
TinyStories -> llm.c data shards, as llm.c's dev/data/tinystories.py does it, but deterministic:

  data/tinystories/TinyStories_all_data.tar.gz   downloaded once (~1.5 GB, from Hugging Face)
  data/tinystories/TinyStories_all_data/         its 50 JSON shards, data00.json ... data49.json
  data/tinystories/TinyStories_val.bin           shard 0: 19,043,638 GPT-2 tokens
  data/tinystories/TinyStories_train.bin         shards 1..49: 925,653,391 tokens

  python prepro_tinystories.py
  python prepro_tinystories.py --archive PATH/TinyStories_all_data.tar.gz   # a local copy

Each JSON shard is a list of {"story": ...}. A shard's stories are shuffled with
random.Random(1337 + shard_index), then each story is stripped and written as
<|endoftext|> followed by its tokens. Shards are tokenized in worker processes but
collected in shard order, so the output is byte-identical on every run (llm.c's script
concatenates the train shards in completion order, which changes run to run).

Nothing lost: the archive is unpacked into a new temporary folder of this run's own, renamed into
place when complete; a re-run replaces its own two .bin files (llm.c data shards) and stops, in one
line and before writing, where a file of another kind has one of their names.
"""

import argparse
import glob
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
from multiprocessing import Pool

import numpy as np

from llmc.download import download
from llmc.formats import write_data_shard
from llmc.shards import refuse_foreign_shards
from llmc.tokenizer import gpt2_encoding
from llmc.utils import OutputInUse, WriteError, one_line_errors

URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
ARCHIVE = "TinyStories_all_data.tar.gz"


def fetch(data_dir, url, archive):
    """Return the folder of JSON shards: download (or copy) the archive and unpack it, unless done."""
    os.makedirs(data_dir, exist_ok=True)
    shards_dir = os.path.join(data_dir, "TinyStories_all_data")
    if os.path.isdir(shards_dir):
        print(f"{shards_dir} already exists, skipping download and unpacking")
        return shards_dir
    if os.path.lexists(shards_dir):
        raise OutputInUse(f"{shards_dir}: is a file, not the folder of JSON shards; nothing was written: "
                          f"move it away, or choose another --data_dir")
    if not archive:
        archive = os.path.join(data_dir, ARCHIVE)
        if os.path.exists(archive):
            print(f"{archive} already exists, skipping download")
        else:
            download(url, archive, f"python prepro_tinystories.py --archive PATH/{ARCHIVE}", chunk_size=1 << 20)
    elif not os.path.isfile(archive):
        raise SystemExit(f"--archive {archive}: no such file")
    print(f"unpacking {archive}...")
    tmp = tempfile.mkdtemp(prefix=os.path.basename(shards_dir) + ".tmp", dir=data_dir)   # this run's own
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:          # a full disk, no permission: not the archive
            raise WriteError(f"could not unpack {archive} into {shards_dir}: {e.strerror}; the part unpacked "
                             f"was removed, the archive is kept") from None
        raise SystemExit(f"{archive}: cannot unpack it ({type(e).__name__}: {e}); delete it and re-run "
                         "python prepro_tinystories.py")
    os.replace(tmp, shards_dir)  # only a completely unpacked folder gets the real name
    return shards_dir


def shard_files(shards_dir):
    """data00.json, data01.json, ... wherever the archive put them, in order."""
    files = sorted(glob.glob(os.path.join(shards_dir, "**", "data*.json"), recursive=True),
                   key=os.path.basename)
    if len(files) < 2:
        raise SystemExit(f"{shards_dir}: found {len(files)} data*.json shard(s), need at least 2 (val + train); "
                         f"delete the folder and re-run python prepro_tinystories.py")
    return files


_enc = None


def _init_worker():
    global _enc
    _enc = gpt2_encoding()   # main() loaded it once already, so this reads tiktoken's cache


def tokenize_shard(job):
    """(shard index, path) -> the shard's GPT-2 tokens (uint16), stories shuffled with Random(1337 + index)."""
    shard_index, path = job
    eot = _enc.eot_token  # 50256, <|endoftext|>
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    rng = random.Random(1337 + shard_index)
    rng.shuffle(data)
    tokens = []
    for example in data:
        tokens.append(eot)
        tokens.extend(_enc.encode_ordinary(example["story"].strip()))
    return np.array(tokens, dtype=np.uint16)


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description="TinyStories -> llm.c GPT-2 token shards")
    p.add_argument("--data_dir", default=os.path.join("data", "tinystories"), help="where the files go")
    p.add_argument("--archive", default="", help=f"a local copy of {ARCHIVE} (no download)")
    p.add_argument("--url", default=URL, help=f"where to download {ARCHIVE} from")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    args = p.parse_args(argv)

    outputs = {split: os.path.join(args.data_dir, f"TinyStories_{split}.bin") for split in ("val", "train")}
    refuse_foreign_shards(list(outputs.values()), "move it away, or choose another --data_dir")
    shards_dir = fetch(args.data_dir, args.url, args.archive)
    files = shard_files(shards_dir)
    print(f"tokenizing {len(files)} shards with {args.workers} worker(s)")
    from tqdm import tqdm
    gpt2_encoding()   # fail here, in one line, rather than in every worker, when it cannot load
    with Pool(max(1, args.workers), initializer=_init_worker) as pool:
        # imap, not imap_unordered: results come back in shard order, so the output never changes
        parts = list(tqdm(pool.imap(tokenize_shard, enumerate(files)), total=len(files), unit="shard"))
    # the parts go into each shard one after another, never concatenated (train: 1.85 GB of tokens)
    for split, split_parts in (("val", parts[:1]), ("train", parts[1:])):
        write_data_shard(outputs[split], *split_parts)
        print(f"writing {sum(p.size for p in split_parts):,} tokens to {outputs[split]}")


if __name__ == "__main__":
    sys.exit(main())
