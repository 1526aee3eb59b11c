"""GPT-2's shape: the config (llm.c's GPT2Config), the padded vocabulary, the named depths, and the 16
parameter tensors in checkpoint order. What the model is, apart from how a file stores it (llmc/formats.py
reads and writes the files; both trainers, the tests and the dev tools build models from these)."""

from dataclasses import dataclass

import numpy as np


@dataclass
class GPT2Config:
    max_seq_len: int        # maxT, 1024 for GPT-2
    vocab_size: int         # V, 50257
    num_layers: int         # L
    num_heads: int          # NH
    channels: int           # C
    padded_vocab_size: int  # Vp, V rounded up to a multiple of 128 (50304)


def padded_vocab(vocab_size):
    return (vocab_size + 127) // 128 * 128


# GPT-2's shapes by depth, as llm.c's "-e d12" descriptors name them: L -> (NH, C)
MODEL_DEPTHS = {6: (6, 384), 12: (12, 768), 24: (16, 1024), 36: (20, 1280), 48: (25, 1600)}


def param_shapes(config):
    """The 16 parameter tensors in checkpoint order, with their shapes."""
    Vp, maxT = config.padded_vocab_size, config.max_seq_len
    L, C = config.num_layers, config.channels
    return [
        ("wte", (Vp, C)), ("wpe", (maxT, C)),
        ("ln1w", (L, C)), ("ln1b", (L, C)),
        ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)),
        ("attprojw", (L, C, C)), ("attprojb", (L, C)),
        ("ln2w", (L, C)), ("ln2b", (L, C)),
        ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
        ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
        ("lnfw", (C,)), ("lnfb", (C,)),
    ]


def num_parameters(config):
    return sum(int(np.prod(shape)) for _, shape in param_shapes(config))


def padding_note(config):
    """Why the trainers count more parameters than PyTorch: wte has Vp rows, V of them real. One line."""
    pad_rows = config.padded_vocab_size - config.vocab_size
    if pad_rows == 0:
        return "no vocabulary padding"
    return (f"{num_parameters(config) - pad_rows * config.channels:,} + {pad_rows * config.channels:,} in wte's "
            f"{pad_rows} zero pad rows: the vocabulary {config.vocab_size} is padded to {config.padded_vocab_size}, "
            f"a multiple of 128")


def print_config(config, extra_lines=()):
    """The [GPT-2] block the programs print for a model: llm.c's fields, the parameter count (with
    the padded vocabulary explained), then the caller's own lines."""
    print("[GPT-2]")
    for field in ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels"):
        print(f"{field}: {getattr(config, field)}")
    print(f"num_parameters: {num_parameters(config)} ({padding_note(config)})")
    for line in extra_lines:
        print(line)
