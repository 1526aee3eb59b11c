"""
Your own text -> llm.c data shards (GPT-2 tokens, uint16), for finetuning or pretraining:

  python dev/data/prepro_text.py "books/*.txt"                        # each file is one document
  python dev/data/prepro_text.py notes.txt --doc paragraph -o data/notes -n notes
  cat a.txt b.txt | python dev/data/prepro_text.py - -n mystdin       # "-" reads standard input

writes, into -o (default data/<name>):

  <name>_val_000000.bin     the first --val_tokens tokens (default: 10% of the text, at most 32,768;
                            0 = no val split)
  <name>_train_000001.bin   then the rest, --shard_size tokens per shard (default 1e8, as fineweb.py),
  <name>_train_000002.bin   the last one with what is left
  ...

and says how many batches of train_gpt2.py's default B*T = 4*64 each split holds, e.g.
  train: 36,123 tokens = 141 batches of B*T = 4*64 (train_gpt2.py's default)

and the trainer reads them with
  python train_gpt2.py -i "data/<name>/<name>_train_*.bin" -j "data/<name>/<name>_val_*.bin" -e gpt2_124M.bin

Documents. A document is a whole file (--doc file, the default; standard input is one file), a paragraph
(--doc paragraph: lines up to a blank line; a paragraph never runs across two files) or a line (--doc line).
Each is stripped of leading and trailing whitespace; one with nothing left is skipped (a file with no text
is skipped with a warning; an input with no text at all is an error). As in llm.c's fineweb.py, every
document starts with <|endoftext|> (50256) and is followed by its GPT-2 tokens (tiktoken, encode_ordinary:
a literal "<|endoftext|>" in the text is encoded as plain text). The val split is a count of tokens, not of
documents: it may end inside a document, whose rest opens the train split. Inputs are UTF-8; "\\r\\n" is
kept as it is. Files are read in the order given, each glob's matches sorted, a file matched twice read once.

The default val split. 32,768 tokens is llm.c's val for tiny shakespeare (338K tokens); it would take
most of a small text, so the default is the smaller of 32,768 and 10% of the text. The text's length in
tokens is known only once it is tokenized (its bytes say ~4 per token, not exactly), so until the
tokens reach 10 x 32,768 (640 KiB of uint16) they are held in memory; then val is 32,768 whatever
follows, or, at the end of a shorter input, 10% of what there is. Files and standard input alike.

Streaming. Files are read in 1 MiB blocks, and a long document is cut into pieces of about --chunk_chars
characters for the tokenizer, only where a single space or newline stands between two non-space characters:
GPT-2's pre-tokenizer never joins text across such a point, so the pieces' tokens are the document's tokens.
Memory stays flat in the input size: a few pieces per worker, one shard's uint16 buffer (200 MB at
1e8 tokens) and the default split's 640 KiB; only a stretch of text with no such cut point (one giant
"word") is held whole.

Output. Same input and flags, same bytes. Shards are written under temporary names and renamed only when
the whole input is done, so an error (a full disk too: one line) leaves no half set behind; old shards of
the same name in -o that this run did not write again are removed, so that a glob over -o never mixes two
runs. Only llm.c data shards are replaced or removed: a file under one of the shards' names that is not
one (its first int32 is not 20240520) stops the run before it writes anything, in one line naming it.
Other files in -o are left alone.
"""

import argparse
import codecs
import glob as globlib
import os
import re
import sys
from multiprocessing import Pool

import numpy as np

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")))
from llmc.shards import EOT, VAL_MAX, VAL_SHARE, ShardWriter  # noqa: E402
from llmc.tokenizer import gpt2_encoding  # noqa: E402
from llmc.utils import one_line_errors  # noqa: E402

BLOCK_BYTES = 1 << 20       # read files this many bytes at a time
# a safe cut: one space or newline between two non-space characters; the cut goes before the space/newline.
# GPT-2's pattern ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) ends the piece before it at
# the non-space character either way, and the piece from the cut on depends only on the text that follows
# it, so tokenizing the two sides apart gives the same tokens as tokenizing them together. (Python's \S is
# "not str.isspace()", which is narrower than "not Unicode White_Space" that the tokenizer uses: safe.)
CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


# ----------------------------------------------------------------------------
# reading: text blocks -> documents -> pieces for the tokenizer


def expand_inputs(patterns):
    """The input files in order: "-" (stdin), a file, or a glob's matching files sorted; each file once."""
    files, seen = [], set()
    for pattern in patterns:
        if pattern == "-":
            matches = ["-"]
        elif globlib.has_magic(pattern):
            matches = sorted(m for m in globlib.glob(pattern, recursive=True) if not os.path.isdir(m))
            if not matches:
                raise SystemExit(f"no files match '{pattern}'")
        elif os.path.isdir(pattern):
            raise SystemExit(f"{pattern}: is a directory; pass its files, e.g. '{os.path.join(pattern, '*.txt')}'")
        elif not os.path.isfile(pattern):
            raise SystemExit(f"{pattern}: no such file")
        else:
            matches = [pattern]
        for m in matches:
            key = m if m == "-" else os.path.realpath(m)
            if key not in seen:
                seen.add(key)
                files.append(m)
    return files


def read_blocks(path, bar):
    """The UTF-8 text of a file (or stdin for "-"), in blocks decoded from BLOCK_BYTES reads."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        f = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as e:
        raise SystemExit(f"{path}: cannot read it ({e.strerror})") from None
    offset = 0  # bytes read before this block
    try:
        while True:
            data = f.read(BLOCK_BYTES)
            held = len(decoder.getstate()[0])  # the previous block's unfinished character
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise SystemExit(f"{'stdin' if path == '-' else path}: not UTF-8 text (byte {offset - held + e.start:,} "
                                 f"cannot be decoded); convert it, e.g. with iconv -t utf-8, or leave it out") from None
            offset += len(data)
            bar.update(len(data))
            if text:
                yield text
            if not data:
                return
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def strip_stream(pieces):
    """Yields the pieces' text with the leading and trailing whitespace of the whole removed: trailing
    whitespace is held back until text follows it."""
    pending, started = "", False
    for text in pieces:
        if not started:
            text = text.lstrip()
            if not text:
                continue
            started = True
        stripped = text.rstrip()
        if stripped:
            yield pending + stripped
            pending = text[len(stripped):]
        else:
            pending += text


def lines_of(blocks):
    """The lines of a stream of text blocks, without their "\\n" (one line is held at a time)."""
    rest = []
    for text in blocks:
        lines = text.split("\n")
        if len(lines) == 1:
            rest.append(text)
            continue
        yield "".join(rest) + lines[0]
        yield from lines[1:-1]
        rest = [lines[-1]]
    yield "".join(rest)


def documents(files, doc, bar, warn):
    """Yields ("doc", None) at the start of each document, then ("text", str) pieces of it: whole files,
    paragraphs or lines, each stripped; empty ones are dropped, and a file with no text gets a warning."""
    for path in files:
        has_text = False
        if doc == "file":
            for text in strip_stream(read_blocks(path, bar)):
                if not has_text:
                    has_text = True
                    yield "doc", None
                yield "text", text
        elif doc == "line":
            for line in lines_of(read_blocks(path, bar)):
                line = line.strip()
                if line:
                    has_text = True
                    yield "doc", None
                    yield "text", line
        else:  # paragraph: a run of non-blank lines; handed on line by line, the last line's end stripped
            open_para, pending = False, ""
            for line in lines_of(read_blocks(path, bar)):
                if not line.strip():
                    open_para = False
                    continue
                if not open_para:
                    open_para, has_text, pending = True, True, ""
                    yield "doc", None
                    text = line.lstrip()
                else:
                    text = pending + "\n" + line
                stripped = text.rstrip()
                yield "text", stripped
                pending = text[len(stripped):]
        if not has_text:
            warn(f"{'stdin' if path == '-' else path}: no text, skipped")


def pieces(events, chunk_chars):
    """The events as pieces for the tokenizer, (starts_doc, text), each about `chunk_chars` long, cut only
    at CUT points; a document's end ends its last piece."""
    parts, size, starts = [], 0, False
    for kind, text in events:
        if kind == "doc":
            if parts:
                yield starts, "".join(parts)
            parts, size, starts = [], 0, True
            continue
        parts.append(text)
        size += len(text)
        if size >= chunk_chars:
            buf = "".join(parts)
            while len(buf) >= chunk_chars:
                cut = last_cut(buf, chunk_chars)
                if cut is None:
                    break  # no cut point yet: wait for more text
                yield starts, buf[:cut]
                buf, starts = buf[cut:], False
            parts, size = [buf], len(buf)
    if parts:
        yield starts, "".join(parts)


def last_cut(text, near):
    """The last CUT position at or before `near`, else the first after it, else None."""
    lo = near
    while lo > 0:
        lo = max(0, lo - 4096 if lo == near else 2 * lo - near)  # widen the window back from `near`
        cut = None
        for m in CUT.finditer(text, lo, near + 2):
            cut = m.start()
        if cut:
            return cut
    m = CUT.search(text, near)
    return m.start() if m else None


# ----------------------------------------------------------------------------
# tokenizing


_enc = None


def _init_worker():
    global _enc
    _enc = gpt2_encoding()


def encode_task(task):
    """A list of (starts_doc, text) pieces -> their uint16 tokens, EOT before each document."""
    out = []
    for starts, text in task:
        if starts:
            out.append(np.array([EOT], dtype=np.uint16))
        out.append(np.array(_enc.encode_ordinary(text), dtype=np.uint16))  # GPT-2's ids are < 2**16
    return np.concatenate(out)


def tasks(pieces_, chunk_chars):
    """Group pieces into tasks of about chunk_chars characters (many short documents per task)."""
    task, size = [], 0
    for starts, text in pieces_:
        task.append((starts, text))
        size += len(text)
        if size >= chunk_chars:
            yield task
            task, size = [], 0
    if task:
        yield task


def batched(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_into(writer, events, chunk_chars, workers):
    """Tokenize the events' documents and add the tokens to `writer`, in order. Returns the document count.
    At most 2 tasks per worker are in memory at once (Pool.imap would read the whole input ahead)."""
    ndocs = [0]

    def counted(events):
        for e in events:
            if e[0] == "doc":
                ndocs[0] += 1
            yield e

    work = tasks(pieces(counted(events), chunk_chars), chunk_chars)
    if workers <= 1:
        _init_worker()
        for task in work:
            writer.add(encode_task(task))
    else:
        with Pool(workers, initializer=_init_worker) as pool:
            for batch in batched(work, 2 * workers):
                for tokens in pool.map(encode_task, batch):
                    writer.add(tokens)
    return ndocs[0]


def batches_line(split, written):
    """'train: 36,123 tokens = 141 batches of B*T = 4*64 (train_gpt2.py's default)': a batch takes B*T+1
    tokens of one shard and the next starts B*T later, as the trainers' DataLoader reads them."""
    from train_gpt2 import TRAIN_GPT2_C_DEFAULTS
    B, T = TRAIN_GPT2_C_DEFAULTS["B"], TRAIN_GPT2_C_DEFAULTS["T"]
    ntok = sum(n for _, n, s in written if s == split)
    batches = sum((n - 1) // (B * T) for _, n, s in written if s == split)
    return f"{split}: {ntok:,} tokens = {batches:,} batches of B*T = {B}*{T} (train_gpt2.py's default)"


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description="text files -> llm.c GPT-2 token shards")
    p.add_argument("inputs", nargs="+", help='text files or globs (quote them: "dir/*.txt"), or - for stdin')
    p.add_argument("-n", "--name", default="text", help="shard name prefix: <name>_val_000000.bin, ... (default: text)")
    p.add_argument("-o", "--output_dir", default="", help="where the shards go (default: data/<name>)")
    p.add_argument("-d", "--doc", choices=("file", "paragraph", "line"), default="file",
                   help="what one document is (each starts with <|endoftext|>; default: file)")
    p.add_argument("-s", "--shard_size", type=float, default=1e8, help="tokens per shard (default: 1e8)")
    p.add_argument("-v", "--val_tokens", type=float, default=None,
                   help=f"the first this many tokens are val (default: the smaller of {VAL_MAX:,} and "
                        f"{100 // VAL_SHARE}%% of the text; 0: no val split)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizer processes (default: the cores, at most 8)")
    p.add_argument("--chunk_chars", type=int, default=1 << 20, help="characters per tokenizer task (default: 2^20)")
    args = p.parse_args(argv)

    shard_size = int(args.shard_size)
    val_tokens = None if args.val_tokens is None else int(args.val_tokens)
    if shard_size != args.shard_size or (val_tokens is not None and (val_tokens != args.val_tokens or val_tokens < 0)):
        raise SystemExit(f"--shard_size {args.shard_size:g} / --val_tokens {args.val_tokens or 0:g}: "
                         f"need whole numbers of tokens (val >= 0)")
    if args.chunk_chars < 1:
        raise SystemExit(f"--chunk_chars {args.chunk_chars}: must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.name):
        raise SystemExit(f"--name {args.name!r}: use letters, digits and _.+- only")
    out_dir = args.output_dir or os.path.join("data", args.name)
    writer = ShardWriter(out_dir, args.name, shard_size, val_tokens, staged=True)  # checks the sizes
    files = expand_inputs(args.inputs)
    gpt2_encoding()  # fail here, in one line, rather than in every worker

    from tqdm import tqdm
    total = None if "-" in files else sum(os.path.getsize(f) for f in files)
    print(f"tokenizing {len(files)} file(s) ({'stdin, ' if total is None else f'{total:,} bytes, '}"
          f"one document per {args.doc}) into {out_dir} with {max(1, args.workers)} worker(s)")
    os.makedirs(out_dir, exist_ok=True)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="reading", file=sys.stderr)
    writer.log = bar.write  # lines printed above the bar

    def warn(msg):
        bar.write(f"warning: {msg}", file=sys.stderr)

    try:
        ndocs = tokenize_into(writer, documents(files, args.doc, bar, warn), args.chunk_chars, args.workers)
        ntok = writer.ntok()
        if ndocs == 0:
            raise SystemExit(f"no text in {' '.join(args.inputs)}: every input is empty or whitespace")
        writer.settle_val()
        if ntok <= writer.val_tokens:
            raise SystemExit(f"only {ntok:,} tokens, all of them val (--val_tokens {val_tokens:,}); "
                             f"lower --val_tokens to leave some for train")
        written = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    nval = sum(n for _, n, s in written if s == "val")
    default = f" (the default: the smaller of {VAL_MAX:,} and {100 // VAL_SHARE}% of the text)" if val_tokens is None else ""
    print(f"{ndocs:,} documents, {ntok:,} tokens: {nval:,} val{default}, {ntok - nval:,} train, "
          f"in {len(written)} shard(s)")
    for split in ("val", "train") if nval else ("train",):
        print(batches_line(split, written))
    for path, n, _ in written:
        if n < 4097:
            print(f"note: {path} has {n:,} tokens, fewer than one batch at -b 4 -t 1024 takes (4,097): "
                  f"train on it with a smaller -b or -t (every shard needs B*T+1 tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
