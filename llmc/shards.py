"""llm.c data shards as the data scripts write them: ShardWriter streams tokens into numbered val and train
shards (dev/data/prepro_text.py, dev/data/fineweb.py), refuse_foreign_shards keeps a script from replacing a
file that is not a shard (prepro_tinyshakespeare.py, prepro_tinystories.py too). The file format itself is
llmc/formats.py's."""

import os
import re

import numpy as np

from llmc.formats import DATA_MAGIC, write_data_shard
from llmc.utils import OutputInUse, has_magic, refuse_foreign_files

EOT = 50256                 # <|endoftext|>, the token before each document
SHARD_NAME = re.compile(r"_(val|train)_\d{6}\.bin(\.partial)?")  # after "<name>": a shard's, or its staged copy's
VAL_MAX, VAL_SHARE = 32768, 10   # the default val split: the smaller of 32,768 tokens and 1/10 of the text


def is_data_shard(path):
    return has_magic(path, DATA_MAGIC)


def refuse_foreign_shards(paths, advice):
    """Stop (OutputInUse, one line) before writing when one of the output shards' names holds a file that
    is not an llm.c data shard: it is not the script's to replace. `advice` says how to go on."""
    refuse_foreign_files(paths, is_data_shard, f"an llm.c data shard (magic {DATA_MAGIC})", advice)


def default_val_tokens(ntok):
    """The default val split of a text of ntok tokens: the smaller of 32,768 and 10% of it (rounded down)."""
    return min(VAL_MAX, ntok // VAL_SHARE)


class ShardWriter:
    """Collects uint16 tokens and writes them as llm.c shards of `shard_size` tokens: the first `val_tokens`
    into val shards, the rest into train shards, numbered on from 000000 (<name>_val_000000.bin,
    <name>_train_000001.bin, ... as llm.c's fineweb.py). `staged`: write "<path>.partial" files and rename
    them all in finish() (all or nothing); else each shard gets its real name as soon as it is full.
    val_tokens None: the default split, default_val_tokens of the whole text (see settle_val).
    It refuses (OutputInUse) to start where it would replace a file that is not an llm.c data shard."""

    def __init__(self, out_dir, name, shard_size, val_tokens, staged=True, log=print):
        if shard_size < 1:
            raise SystemExit(f"--shard_size {shard_size}: must be at least 1 token")
        if shard_size >= 2**31:
            raise SystemExit(f"--shard_size {shard_size}: llm.c's shard header counts tokens in an int32; "
                             f"use at most {2**31 - 1}")
        self.out_dir, self.name = out_dir, name
        self.shard_size, self.val_tokens, self.staged, self.log = shard_size, val_tokens, staged, log
        self.buf = np.empty(shard_size, dtype=np.uint16)  # the shard being filled
        self.fill = 0
        self.index = 0                                    # the shard being filled
        self.total = 0                                    # tokens written to files so far
        self.written = []                                 # (final path, ntok, split)
        self.held, self.nheld = [], 0                     # the tokens so far, while val_tokens is None
        self.check_out_dir()

    def check_out_dir(self):
        """Refuse an -o that is a file, or that holds a file under one of this writer's names (a shard's,
        or its .partial copy's) that is not an llm.c data shard: the run would replace or remove it."""
        if os.path.lexists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise OutputInUse(f"-o {self.out_dir}: is a file, not a folder; nothing was written: choose another -o")
        refuse_foreign_shards(self.named_like_ours(), "move it away, or choose another output folder (-o) or name")

    def named_like_ours(self):
        """The paths in out_dir under this writer's names: its shards' and their .partial copies'."""
        if not os.path.isdir(self.out_dir):
            return []
        return [os.path.join(self.out_dir, f) for f in sorted(os.listdir(self.out_dir))
                if f.startswith(self.name) and SHARD_NAME.fullmatch(f[len(self.name):])]

    def ntok(self):
        """Tokens added so far."""
        return self.total + self.fill + self.nheld

    def split(self):
        return "val" if self.total < self.val_tokens else "train"

    def capacity(self):
        """Tokens the current shard takes: a full shard, or what is left of the val split."""
        if self.total < self.val_tokens:
            return min(self.shard_size, self.val_tokens - self.total)
        return self.shard_size

    def path(self, split, index):
        return os.path.join(self.out_dir, f"{self.name}_{split}_{index:06d}.bin")

    def add(self, tokens):
        tokens = np.asarray(tokens, dtype=np.uint16)
        if self.val_tokens is None:                       # the default split needs the text's length: hold on
            self.held.append(tokens)
            self.nheld += tokens.size
            if self.nheld >= VAL_SHARE * VAL_MAX:         # long enough: val is VAL_MAX whatever follows
                self.settle_val()
            return
        while tokens.size:
            take = min(self.capacity() - self.fill, tokens.size)
            self.buf[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.capacity():
                self._write()

    def _write(self):
        split, ntok = self.split(), self.fill
        path = self.path(split, self.index)
        write_data_shard(path + ".partial" if self.staged else path, self.buf[:ntok])
        self.written.append((path, ntok, split))
        self.log(f"writing {ntok:,} tokens to {path}")
        self.total += ntok
        self.index += 1
        self.fill = 0

    def settle_val(self):
        """Fix the default split from the tokens held (the whole text, or 10 x VAL_MAX of it) and add them."""
        if self.val_tokens is None:
            self.val_tokens = default_val_tokens(self.nheld)
            held, self.held, self.nheld = self.held, [], 0
            for tokens in held:
                self.add(tokens)

    def finish(self):
        """Write the last, partly filled shard, rename the staged files, remove stale shards of this name
        (data shards only, see check_out_dir). Returns [(path, ntok, split)]."""
        self.settle_val()
        if self.fill:
            self._write()
        if self.staged:
            for path, _, _ in self.written:
                os.replace(path + ".partial", path)
        ours = {os.path.abspath(p) for p, _, _ in self.written}
        for old in self.named_like_ours():
            if os.path.abspath(old) not in ours and is_data_shard(old):
                os.remove(old)
                self.log(f"removed {old}: a shard of an earlier run that this run did not write")
        return self.written

    def abort(self):
        """Remove this run's staged files (an error stopped it)."""
        if self.staged:
            for path, _, _ in self.written:
                if os.path.exists(path + ".partial"):
                    os.remove(path + ".partial")
