"""HellaSwag in the training loop (-h 1): llm.c's eval file and its EvalLoader (llmc/dataloader.h).

The eval file, dev/data/hellaswag/hellaswag_val.bin (written by dev/data/hellaswag.py through
write_evalfile below, as llm.c's dev/data/data_common.py writes it):

    header   256 int32: [0] magic 20240522, [1] version 1, [2] number of examples,
             [3] the longest example in bytes, the rest 0
    then, per example, a stream of uint16:
             65535               <START_EXAMPLE>
             nbytes              <EXAMPLE_BYTES>, this whole example, the delimiter included
             index               <EXAMPLE_INDEX>, 0, 1, 2, ... in file order
             label               <LABEL>, which completion is right (0..3)
             4                   <NUM_COMPLETIONS>
             n, n tokens         the context
             n, n tokens         each completion in turn (its GPT-2 tokens start with a space)

The loader packs floor(B/4) examples into a (B, T) batch, the 4 completions of an example in 4
consecutive rows: each row is context + completion, and mask marks the positions whose target is a
completion token (the last context token predicts the first completion token). The model's
per-position losses, averaged over the masked positions of a row, score that completion; the lowest
average is the prediction (acc_norm, "completion style"), right when it equals the label.

Ranks split the examples as llm.c: each takes ceil(N / ranks) consecutive examples (the last rank
fewer), and every rank runs the same number of batches, so the ranks' counts are summed at the end.
Slots past a rank's examples stay empty (mask 0) and count for nothing.

One difference from llm.c, invisible in the result: llm.c leaves the previous batch's tokens in a
row past its completion, we write 0 there. Causal attention keeps a masked position from seeing
anything to its right, so the scores are the same.
"""

import os
import sys

import numpy as np

from llmc.utils import ConfigError, FormatError, write_atomic

EVAL_MAGIC = 20240522
EVAL_VERSION = 1
HEADER_INTS = 256
START_EXAMPLE = 65535         # <START_EXAMPLE>, 2**16 - 1: a token id never reaches it
NUM_COMPLETIONS = 4           # llm.c's ASSUMED_NUM_COMPLETIONS
WRITER = "python dev/data/hellaswag.py"
MMLU_WRITER = "python dev/data/mmlu.py"     # writes the same format: mmlu_test.bin, read the same way


# ----------------------------------------------------------------------------
# the file

def example_stream(index, label, ctx_tokens, ending_tokens):
    """One example as llm.c's uint16 stream (a list of ints), <EXAMPLE_BYTES> filled in."""
    if len(ending_tokens) != NUM_COMPLETIONS:
        raise ValueError(f"example {index}: {len(ending_tokens)} completions (llm.c's file holds {NUM_COMPLETIONS})")
    if not 0 <= label < NUM_COMPLETIONS:
        raise ValueError(f"example {index}: label {label} is not in 0..{NUM_COMPLETIONS - 1}")
    stream = [START_EXAMPLE, 0, index, label, len(ending_tokens), len(ctx_tokens), *ctx_tokens]
    for tokens in ending_tokens:
        stream += [len(tokens), *tokens]
    if any(not 0 <= t < START_EXAMPLE for t in stream[5:]):
        raise ValueError(f"example {index}: a token id outside 0..{START_EXAMPLE - 1}")
    stream[1] = 2 * len(stream)                           # bytes, 2 per uint16
    if stream[1] >= 2 ** 16:
        raise ValueError(f"example {index}: {stream[1]} bytes, more than <EXAMPLE_BYTES> (uint16) can say")
    return stream


def write_evalfile(path, examples):
    """examples: (label, context tokens, [4 lists of completion tokens]) in order. Writes llm.c's
    eval file through a temporary name; returns the number of bytes written."""
    if not 0 < len(examples) < 2 ** 16:
        raise ValueError(f"{len(examples)} examples: <EXAMPLE_INDEX> is a uint16, so 1..65535")
    streams = [example_stream(i, label, ctx, endings) for i, (label, ctx, endings) in enumerate(examples)]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = EVAL_MAGIC, EVAL_VERSION, len(streams), max(s[1] for s in streams)
    body = np.array([t for s in streams for t in s], dtype="<u2")
    write_atomic(path, [header, body])
    return header.nbytes + body.nbytes


def writer_of(path):
    """The script that writes the eval file at `path` (MMLU's by its name, else HellaSwag's)."""
    return MMLU_WRITER if os.path.basename(path).startswith("mmlu") else WRITER


def _bad(path, what):
    raise FormatError(f"{path}: {what}; re-run {writer_of(path)}")


def read_evalfile(path):
    """The examples of an eval file: a list of (label, ctx tokens, [4 completion token arrays]),
    after checking the header and every example's delimiter, index, counts and size."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file; create it with {writer_of(path)}")
    size = os.path.getsize(path)
    if size < 4 * HEADER_INTS:
        _bad(path, f"only {size} bytes (expected a {4 * HEADER_INTS}-byte header)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != EVAL_MAGIC:
        _bad(path, f"bad magic {header[0]} (expected {EVAL_MAGIC}, llm.c's eval file)")
    if header[1] != EVAL_VERSION:
        _bad(path, f"unsupported version {header[1]} (expected {EVAL_VERSION})")
    num_examples, longest = int(header[2]), int(header[3])
    stream = np.fromfile(path, dtype="<u2", offset=4 * HEADER_INTS)
    if (size - 4 * HEADER_INTS) % 2:
        _bad(path, f"{size} bytes: the body is not whole uint16s")
    examples, pos, seen_longest = [], 0, 0
    for i in range(num_examples):
        head = stream[pos:pos + 6]
        if len(head) < 6:
            _bad(path, f"ends inside example {i} of {num_examples}")
        start, nbytes, index, label, num_completions, ctx_len = (int(v) for v in head)
        if start != START_EXAMPLE or index != i:
            _bad(path, f"example {i} at byte {4 * HEADER_INTS + 2 * pos} does not start with <START_EXAMPLE> "
                       f"{START_EXAMPLE} and index {i} (found {start}, {index})")
        if num_completions != NUM_COMPLETIONS or not 0 <= label < NUM_COMPLETIONS:
            _bad(path, f"example {i} has {num_completions} completions and label {label} "
                       f"(expected {NUM_COMPLETIONS} and 0..{NUM_COMPLETIONS - 1})")
        end = pos + nbytes // 2
        if nbytes % 2 or end > len(stream):
            _bad(path, f"example {i} says it has {nbytes} bytes, past the end of the file")
        q = pos + 6
        ctx = stream[q:q + ctx_len]
        q += ctx_len
        endings = []
        for _ in range(num_completions):
            n = int(stream[q]) if q < end else 0
            endings.append(stream[q + 1:q + 1 + n])
            q += 1 + n
        if q != end:
            _bad(path, f"example {i}: its tokens take {2 * (q - pos)} bytes, its <EXAMPLE_BYTES> says {nbytes}")
        examples.append((label, ctx, endings))
        seen_longest = max(seen_longest, nbytes)
        pos = end
    if pos != len(stream):
        _bad(path, f"{2 * (len(stream) - pos)} bytes after the {num_examples} examples its header counts")
    if seen_longest != longest:
        _bad(path, f"header says the longest example has {longest} bytes, the longest has {seen_longest}")
    return examples


# ----------------------------------------------------------------------------
# the loader

class EvalLoader:
    """llm.c's EvalLoader: this rank's examples of an eval file in (B, T) batches.

    num_examples  in the file (all ranks); the accuracy divides by it
    num_batches   batches every rank runs, ceil(ceil(N / ranks) / floor(B / 4))
    batch(i)      (inputs, targets (B, T) int32, mask (B, T) uint8, labels (B // 4,) int32, -1 = empty slot)
    iterating     gives batch(0), batch(1), ... batch(num_batches - 1)
    """

    def __init__(self, path, B, T, process_rank=0, num_processes=1):
        self.path, self.B, self.T = path, B, T
        self.can_fit = B // NUM_COMPLETIONS                 # examples per batch
        if self.can_fit == 0:
            raise ConfigError(f"HellaSwag: batch size {B} is < {NUM_COMPLETIONS} (4 completions per example): "
                              f"disable it with -h 0, or raise -b")
        self.examples = read_evalfile(path)
        self.num_examples = len(self.examples)
        if self.num_examples < num_processes:
            raise ConfigError(f"{path}: {self.num_examples} examples for {num_processes} processes")
        # llm.c's check, for every example up front rather than at the batch that fails: the context and
        # the longest completion must fit in a row, with one position to spare
        longest = max(len(ctx) + max(len(e) for e in endings) for _, ctx, endings in self.examples)
        if longest >= T:
            raise ConfigError(f"{path}: an example has {longest} tokens (context + completion), HellaSwag needs "
                              f"T > {longest}, got -t {T}: raise -t or disable it with -h 0")
        for i, (_, ctx, endings) in enumerate(self.examples):
            if len(ctx) == 0 or min(len(e) for e in endings) == 0:
                _bad(path, f"example {i} has an empty context or completion")
        per_process = -(-self.num_examples // num_processes)           # ceil
        self.num_batches = -(-per_process // self.can_fit)
        self.start_example_index = per_process * process_rank
        self.end_example_index = min(per_process * (process_rank + 1), self.num_examples)

    def batch(self, i):
        B, T = self.B, self.T
        inputs = np.zeros((B, T), dtype=np.int32)
        targets = np.zeros((B, T), dtype=np.int32)
        mask = np.zeros((B, T), dtype=np.uint8)
        labels = np.full(self.can_fit, -1, dtype=np.int32)
        first = self.start_example_index + i * self.can_fit
        for j, e in enumerate(range(first, min(first + self.can_fit, self.end_example_index))):
            label, ctx, endings = self.examples[e]
            labels[j] = label
            n = len(ctx)
            for c, tokens in enumerate(endings):
                row, m = j * NUM_COMPLETIONS + c, len(tokens)
                inputs[row, :n] = ctx                       # the shared context in each of the 4 rows
                inputs[row, n:n + m] = tokens               # then this completion
                targets[row, n - 1:n - 1 + m] = tokens      # position n-1 (the last context token) predicts
                mask[row, n - 1:n - 1 + m] = 1              # the first completion token, and so on
        return inputs, targets, mask, labels

    def __iter__(self):
        return (self.batch(i) for i in range(self.num_batches))

    def stat_losses(self, losses, mask, labels):
        return stat_losses(losses, mask, labels)


def completion_losses(losses, mask, num_examples):
    """losses, mask (B, T) -> (num_examples, 4) float32: each completion's mean loss over its masked
    positions, summed left to right in float32 as llm.c's loop does (cumsum is sequential)."""
    rows = num_examples * NUM_COMPLETIONS
    m = mask[:rows].astype(bool)
    masked = np.where(m, np.asarray(losses[:rows], dtype=np.float32), np.float32(0))
    total = np.cumsum(masked, axis=1, dtype=np.float32)[:, -1]
    count = m.sum(axis=1)
    mean = np.where(count > 0, total / np.maximum(count, 1).astype(np.float32), np.float32(0))
    return mean.astype(np.float32).reshape(num_examples, NUM_COMPLETIONS)


def stat_losses(losses, mask, labels):
    """llm.c's evalloader_stat_losses: how many examples of the batch the model gets right. losses:
    the model's per-position losses (B, T) on the batch's inputs and targets; mask, labels: the batch's.
    The prediction is the completion of lowest mean loss (the first one on a tie); an empty slot
    (no masked position) never counts."""
    labels = np.asarray(labels)
    mean = completion_losses(losses, mask, len(labels))                     # (E, 4)
    active = mask[:len(labels) * NUM_COMPLETIONS].reshape(len(labels), -1).any(axis=1)
    return int(np.sum(active & (mean.argmin(axis=1) == labels)))


HELLASWAG_PATH = os.path.join("dev", "data", "hellaswag", "hellaswag_val.bin")   # train_gpt2.cu's, from the cwd


def open_hellaswag(enabled, B, T, world):
    """-h 1: this rank's EvalLoader of HELLASWAG_PATH, with a line saying what it holds; None when -h 0, or
    when the file is not there (a line says how to make it, and the run goes on without it)."""
    if not enabled:
        return None
    if not os.path.exists(HELLASWAG_PATH):
        print(f"HellaSwag eval not found at {HELLASWAG_PATH}, skipping it: python dev/data/hellaswag.py makes it")
        return None
    hellaswag = EvalLoader(HELLASWAG_PATH, B, T, world.rank, world.size)
    print(f"HellaSwag: {hellaswag.num_examples} examples from {HELLASWAG_PATH}, {hellaswag.num_batches} "
          f"batches of {hellaswag.can_fit} per process")
    return hellaswag


def evaluate_hellaswag(trainer, model, hellaswag, B, T, world):
    """llm.c's HellaSwag eval: B/4 examples per batch, the completion with the lowest mean loss over its own
    tokens is the prediction; the ranks score their own examples and add the counts. trainer: the training
    loop's trainer module (its gpt2_forward and to_numpy)."""
    correct = 0
    progress = sys.stdout.isatty()
    for i, (x, y, mask, labels) in enumerate(hellaswag):
        if progress and i % 10 == 0:
            print(f"evaluating HellaSwag: {i}/{hellaswag.num_batches}", end="\r", flush=True)
        trainer.gpt2_forward(model, x, y, B, T)
        correct += stat_losses(trainer.to_numpy(model.acts.losses), mask, labels)
    correct = world.sum(correct)
    accuracy = correct / hellaswag.num_examples
    print(f"HellaSwag: {int(correct)}/{hellaswag.num_examples} = {accuracy:f}")
    return accuracy
