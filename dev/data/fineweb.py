"""
FineWeb or FineWeb-Edu -> llm.c data shards, as llm.c's dev/data/fineweb.py does it (GPT-2 tokens, uint16):

  python dev/data/fineweb.py -t classic -v 10B     # HuggingFaceFW/fineweb,     sample-10BT -> dev/data/fineweb10B/
  python dev/data/fineweb.py -t edu -v 100B        # HuggingFaceFW/fineweb-edu, sample-100BT -> dev/data/edu_fineweb100B/

  fineweb_val_000000.bin     shard 0: the first -s tokens (default 1e8), the val split
  fineweb_train_000001.bin   shards 1, 2, ...: train, -s tokens each, the last one with what is left
  ...                        (edu_fineweb_val_000000.bin, edu_fineweb_train_000001.bin, ... for -t edu)

then train with
  python train_gpt2.py -i "dev/data/fineweb10B/fineweb_train_*.bin" -j "dev/data/fineweb10B/fineweb_val_*.bin" ...

The download goes through Hugging Face `datasets` (pip install datasets) into its cache (HF_DATASETS_CACHE,
~/.cache/huggingface by default): the parquet files plus datasets' Arrow copy of them, tens of GB for 10B;
the shards take 2 bytes a token (about 20 GB for 10B, in ~100 shards of 1e8 tokens).
--streaming 1 reads the parquet files over the network as it goes instead of downloading them first
(nothing but the shards lands on disk). --dataset_path reads a local copy instead of the Hub: a clone of the
dataset repository (its README.md names the sample-10BT/sample-100BT configurations), or any folder of
parquet/jsonl files with a "text" column that datasets.load_dataset reads.

Each document is <|endoftext|> (50256) then its GPT-2 tokens (tiktoken encode_ordinary), as llm.c. Documents
are tokenized in -w worker processes (Pool.imap with chunks of 16, in order, so the shards are the same on
every run) and streamed into a shard buffer: a document that does not fit finishes in the next shard (also
one longer than a whole shard, which llm.c's script mishandles). Each shard appears under its real name only
once it is complete, so after an interruption (or a full disk: one line) the files present are whole.
Re-running replaces the shards of the same name in -o; a file under one of their names that is not an
llm.c data shard stops the run before the download, in one line, and the other files in -o stay.
"""

import argparse
import os
import sys
from multiprocessing import Pool

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..", "..")))
from llmc.shards import EOT, ShardWriter  # noqa: E402
from llmc.tokenizer import gpt2_encoding  # noqa: E402
from llmc.utils import one_line_errors  # noqa: E402

# (-t, -v) -> (output folder, the dataset's configuration name), as llm.c
DIRECTORIES = {
    ("classic", "10B"): ("fineweb10B", "sample-10BT"),
    ("classic", "100B"): ("fineweb100B", "sample-100BT"),
    ("edu", "10B"): ("edu_fineweb10B", "sample-10BT"),
    ("edu", "100B"): ("edu_fineweb100B", "sample-100BT"),
}
REPOS = {"classic": ("HuggingFaceFW/fineweb", "fineweb"), "edu": ("HuggingFaceFW/fineweb-edu", "edu_fineweb")}


def load(source, config, streaming):
    """The dataset's train split, only its "text" column: a Dataset (downloaded), or an IterableDataset."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("fineweb.py needs Hugging Face datasets: pip install datasets") from None
    try:
        ds = load_dataset(source, name=config, split="train", streaming=streaming)
    except ValueError as e:
        if config not in str(e) or not os.path.isdir(source):
            raise SystemExit(f"{source}: cannot load configuration {config} ({type(e).__name__}: {e})") from None
        # a local folder of data files without the Hub's README configurations: load it as it is
        print(f"{source} has no configuration {config}; loading its data files as they are")
        ds = load_dataset(source, split="train", streaming=streaming)
    except Exception as e:  # network, missing files, bad parquet: one line with what and where
        raise SystemExit(f"{source}: cannot load the dataset ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         f"{'' if os.path.isdir(source) else '; offline, point --dataset_path at a local copy'}") from None
    if "text" not in (ds.column_names or []):
        raise SystemExit(f"{source}: no 'text' column (columns: {ds.column_names})")
    return ds.select_columns(["text"])


_enc = None


def _init_worker():
    global _enc
    _enc = gpt2_encoding()


def tokenize(text):
    """One document -> uint16 tokens: <|endoftext|>, then the text's GPT-2 tokens."""
    ids = _enc.encode_ordinary(text)
    tokens = np.empty(len(ids) + 1, dtype=np.uint16)
    tokens[0] = EOT
    tokens[1:] = ids  # GPT-2's ids are below 50257 < 2**16
    return tokens


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description="FineWeb and FineWeb-Edu -> llm.c GPT-2 token shards",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-t", "--type", default="classic", help="FineWeb type, edu|classic")
    p.add_argument("-v", "--version", default="10B", help="FineWeb sample size, 10B|100B")
    p.add_argument("-m", "--model_desc", default="gpt-2", help="tokenizer: gpt-2 (llama-3 is not ported)")
    p.add_argument("-s", "--shard_size", type=float, default=10**8, help="tokens per shard")
    p.add_argument("-o", "--output_dir", default="", help="where the shards go (default: dev/data/fineweb10B etc.)")
    p.add_argument("--dataset_path", default="", help="a local copy of the dataset instead of the Hub")
    p.add_argument("--streaming", type=int, default=0, help="1: read the dataset as it goes, no download first")
    p.add_argument("-w", "--workers", type=int, default=max(1, (os.cpu_count() or 1) - 2), help="tokenizer processes")
    p.add_argument("--chunksize", type=int, default=16, help="documents per worker task")
    args = p.parse_args(argv)

    if (args.type, args.version) not in DIRECTORIES:
        raise SystemExit(f"-t {args.type} -v {args.version}: type must be one of edu, classic and version one of 10B, 100B")
    if args.model_desc != "gpt-2":
        raise SystemExit(f"-m {args.model_desc}: only gpt-2 (uint16 shards) is ported")
    shard_size = int(args.shard_size)
    if shard_size != args.shard_size or shard_size < 1:
        raise SystemExit(f"-s {args.shard_size:g}: a whole number of tokens, at least 1")
    local_dir, config = DIRECTORIES[(args.type, args.version)]
    repo, name = REPOS[args.type]
    out_dir = args.output_dir or os.path.join(HERE, local_dir)
    source = args.dataset_path or repo
    if args.dataset_path and not os.path.exists(args.dataset_path):
        raise SystemExit(f"--dataset_path {args.dataset_path}: no such file or folder")

    # first: -o's files are checked before the download (see ShardWriter)
    writer = ShardWriter(out_dir, name, shard_size, val_tokens=shard_size, staged=False)
    gpt2_encoding()  # fail here, in one line, rather than in every worker
    print(f"loading {source} ({config}, {'streaming' if args.streaming else 'downloaded first'})")
    fw = load(source, config, bool(args.streaming))
    ndocs = len(fw) if hasattr(fw, "__len__") else None  # an IterableDataset has no length
    os.makedirs(out_dir, exist_ok=True)

    from tqdm import tqdm
    bar = tqdm(total=ndocs, unit="docs", desc=f"{name} -> {out_dir}", file=sys.stderr)
    writer.log = bar.write  # lines printed above the bar
    texts = (row["text"] for row in fw)
    n = 0

    def consume(token_arrays):
        nonlocal n
        for tokens in token_arrays:
            writer.add(tokens)
            n += 1
            bar.update(1)
            if n % 1024 == 0:
                bar.set_postfix(shard=writer.index, tokens=f"{writer.total + writer.fill:,}", refresh=False)

    try:
        if args.workers <= 1:
            _init_worker()
            consume(map(tokenize, texts))
        else:
            with Pool(args.workers, initializer=_init_worker) as pool:
                # imap keeps the documents' order; the chunks keep the inter-process traffic low
                consume(pool.imap(tokenize, texts, chunksize=max(1, args.chunksize)))
        if n == 0:
            raise SystemExit(f"{source}: no documents in {config}'s train split")
        written = writer.finish()
    finally:
        bar.close()
    ntok = sum(k for _, k, _ in written)
    print(f"{n:,} documents, {ntok:,} tokens in {len(written)} shard(s) in {out_dir}")
    if len(written) == 1:
        print(f"note: all {ntok:,} tokens fit in the val shard; there is no train shard (lower -s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
