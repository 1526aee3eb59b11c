"""The data loader, llm.c's llmc/dataloader.h.

A pattern (one file or a glob) names the shards; each batch is B*T+1 consecutive tokens, inputs the
first B*T and targets the last B*T. Sample i of a shard starts at token i*B*T*num_processes +
rank*B*T. Sequentially (the val loader, llm.c's train_gpt2.py) the samples come in order, shard after
shard, and after the last shard it starts over. Shuffled (the C trainers' train loader) a Mersenne
Twister seeded 42 + rank permutes the shard order at each epoch and the sample order inside each
shard as it is opened.
"""

import glob as globlib
import re

import numpy as np

from llmc.formats import read_data_shard
from llmc.rand import MT19937, random_permutation
from llmc.utils import ConfigError


# the folders the prepro scripts write, and the command that writes each (the first that matches a path wins)
PREPROS = (
    (r"edu_fineweb(10B|100B)", "python dev/data/fineweb.py -t edu -v {0}"),
    (r"fineweb(10B|100B)", "python dev/data/fineweb.py -t classic -v {0}"),
    (r"tinyshakespeare", "python prepro_tinyshakespeare.py"),
    (r"tinystories", "python prepro_tinystories.py"),
    (r"hellaswag", "python dev/data/hellaswag.py"),
    (r"mmlu", "python dev/data/mmlu.py"),
)


def prepro_for(path):
    """The command that makes the data file(s) `path` names, read off its folder (tiny shakespeare, the
    trainers' default data, when the folder is not one of PREPROS')."""
    for folder, command in PREPROS:
        found = re.search(folder, path)
        if found:
            return command.format(*found.groups())
    return "python prepro_tinyshakespeare.py"


class DataLoader:
    def __init__(self, pattern, B, T, process_rank=0, num_processes=1, should_shuffle=False):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.should_shuffle = should_shuffle
        if not 0 <= process_rank < num_processes:
            raise ConfigError(f"process_rank {process_rank} must be below num_processes {num_processes}")
        self.files = sorted(globlib.glob(pattern))
        if not self.files:
            raise ConfigError(f"no data files match '{pattern}'; create them with {prepro_for(pattern)}")
        need = num_processes * B * T + 1
        self.num_tokens = 0
        for path in self.files:                          # check every shard now, not mid-run
            ntok = read_data_shard(path).size
            if ntok < need:
                raise ConfigError(f"{path}: {ntok} tokens, fewer than the {need} one batch needs "
                                  f"(B={B}, T={T}); use smaller -b/-t or more data")
            self.num_tokens += ntok
        if should_shuffle:
            self.shuffle_rng = MT19937(42 + process_rank)
            self.shard_indices = list(range(len(self.files)))
        self.reset()

    def _load_shard(self, shard_idx, permute=True):
        if self.should_shuffle:
            shard_idx = self.shard_indices[shard_idx]
        self.tokens = read_data_shard(self.files[shard_idx])
        # the -1: a sample reads B*T+1 tokens but the next one starts B*T later
        self.shard_num_samples = (self.tokens.size - 1) // (self.num_processes * self.B * self.T)
        if self.should_shuffle and permute:
            self.intra_shard_indices = list(range(self.shard_num_samples))
            random_permutation(self.intra_shard_indices, self.shuffle_rng)

    def reset(self):
        """Back to the first shard (a new shard order when shuffling: the old order shuffled again)."""
        self.current_shard_idx = 0
        self.current_sample_idx = -1                      # no sample drawn yet
        if self.should_shuffle:
            random_permutation(self.shard_indices, self.shuffle_rng)
        self._load_shard(0)

    def _advance(self):
        if self.current_shard_idx == len(self.files) - 1:
            self.reset()                                   # past the last shard: a new epoch
            return
        self.current_shard_idx += 1
        self.current_sample_idx = -1
        self._load_shard(self.current_shard_idx)

    # -- resume (llm.c's dataloader_resume): a checkpoint's state file holds the position and, when
    # shuffling, the two permutations and the generator, so the batches go on exactly where they were.
    # llm.c's current_sample_idx is the next sample to draw; ours is the last one drawn: one less.

    def state(self):
        """(current_shard_idx, current_sample_idx as llm.c counts it, shard_indices, intra_shard_indices,
        generator bytes); the last three None when not shuffling."""
        position = (self.current_shard_idx, self.current_sample_idx + 1)
        if not self.should_shuffle:
            return (*position, None, None, None)
        return (*position, list(self.shard_indices), list(self.intra_shard_indices), self.shuffle_rng.state_bytes())

    def resume(self, current_shard_idx, current_sample_idx, shard_indices=None, intra_shard_indices=None,
               rng_bytes=None):
        """Go on from state()'s values; a mismatch with this loader's data or B, T is a ConfigError."""
        nfiles = len(self.files)
        if (shard_indices is not None) != self.should_shuffle:
            raise ConfigError(f"the state's train loader was {'' if shard_indices is not None else 'not '}shuffled, "
                              f"this run's is {'' if self.should_shuffle else 'not'}: resume with the same -a")
        if self.should_shuffle:
            if len(shard_indices) != nfiles:
                raise ConfigError(f"the state was written for {len(shard_indices)} train shard(s), "
                                  f"the -i pattern matches {nfiles}; resume with the same data")
            self.shard_indices = list(shard_indices)
        if not 0 <= current_shard_idx < nfiles:
            raise ConfigError(f"the state's shard {current_shard_idx} is past the {nfiles} train shard(s); "
                              f"resume with the same data")
        self.current_shard_idx = current_shard_idx
        self._load_shard(current_shard_idx, permute=False)
        if self.should_shuffle:
            if len(intra_shard_indices) != self.shard_num_samples:
                raise ConfigError(f"the state's shard holds {len(intra_shard_indices)} samples, with this data "
                                  f"and B={self.B}, T={self.T} it holds {self.shard_num_samples}; "
                                  f"resume with the same data, -b and -t")
            self.intra_shard_indices = list(intra_shard_indices)
            self.shuffle_rng = MT19937.from_state_bytes(rng_bytes)
        if not 0 <= current_sample_idx <= self.shard_num_samples:
            raise ConfigError(f"the state's sample {current_sample_idx} is past the shard's {self.shard_num_samples}; "
                              f"resume with the same data, -b and -t")
        self.current_sample_idx = current_sample_idx - 1

    def next_batch(self):
        """Returns (inputs, targets), int32 arrays of shape (B, T)."""
        self.current_sample_idx += 1
        if self.current_sample_idx >= self.shard_num_samples:
            self._advance()
            self.current_sample_idx = 0
        idx = self.current_sample_idx
        if self.should_shuffle:
            idx = self.intra_shard_indices[idx]
        B, T = self.B, self.T
        start = idx * self.num_processes * B * T + self.process_rank * B * T
        buf = np.asarray(self.tokens[start:start + B * T + 1], dtype=np.int32)
        return buf[:-1].reshape(B, T), buf[1:].reshape(B, T)
