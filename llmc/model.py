"""GPT-2's shape: the config (llm.c's GPT2Config), the padded vocabulary, the named depths, and the 16
parameter tensors in checkpoint order. What the model is, apart from how a file stores it (llmc/formats.py
reads and writes the files; both trainers, the tests and the dev tools build models from these)."""

from dataclasses import dataclass

import numpy as np

from llmc.utils import ConfigError


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
# GPT-3's shapes by width, as llm.c's "-e gpt3:c768" names them (train_gpt2.cu's gpt3_set_hyperparameters):
# C -> (L, head size), so NH = C / head size, and GPT-3's context of 2048 tokens. The attention is GPT-2's,
# dense in every layer, where GPT-3 alternated dense and banded layers (llm.c says the same of its own).
# llm.c's table also names 5140, the GPT-3 paper's 13B width, which its head size 128 does not divide
# (the paper's 40 heads of 128 make 5120): llm.c stops there at an assert; here it is not offered.
GPT3_WIDTHS = {384: (6, 64), 768: (12, 64), 1024: (24, 64), 1536: (24, 96), 2048: (24, 128), 2560: (32, 80),
               4096: (32, 128), 12288: (96, 128)}
GPT2_VOCAB_SIZE = 50257                 # V of every descriptor: GPT-2's tokenizer (GPT-3's is the same)
MAX_SEQ_LEN = {"gpt2": 1024, "gpt3": 2048}


def descriptor_config(descriptor):
    """The GPT2Config a model descriptor names: dN or gpt2:dN (GPT-2's depths) or gpt3:cN (GPT-3's widths),
    GPT-2's vocabulary padded to 50304. Anything else is a ConfigError of one line listing the valid ones."""
    family, _, name = descriptor.rpartition(":")
    if family == "gpt3":
        width = name[1:] if name[:1] == "c" else ""
        C = int(width) if width.isdigit() else None
        if C not in GPT3_WIDTHS:
            why = " (llm.c lists 5140, which no head size divides)" if C == 5140 else ""
            raise ConfigError(f"unknown GPT-3 size '{descriptor}'{why}: use one of "
                              f"{', '.join(f'gpt3:c{c}' for c in GPT3_WIDTHS)} (c = channels)")
        L, head_size = GPT3_WIDTHS[C]
        NH = C // head_size
    else:
        depth = int(name[1:]) if family in ("", "gpt2") and name[:1] == "d" and name[1:].isdigit() else None
        if depth not in MODEL_DEPTHS:
            raise ConfigError(f"unknown model '{descriptor}': use d6, d12, d24, d36, d48 (GPT-2's depths), gpt3:cN "
                              f"for N in {', '.join(map(str, GPT3_WIDTHS))} (GPT-3's widths) or a .bin checkpoint")
        family, L, (NH, C) = "gpt2", depth, MODEL_DEPTHS[depth]
    return GPT2Config(max_seq_len=MAX_SEQ_LEN[family], vocab_size=GPT2_VOCAB_SIZE, num_layers=L, num_heads=NH,
                      channels=C, padded_vocab_size=padded_vocab(GPT2_VOCAB_SIZE))


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
